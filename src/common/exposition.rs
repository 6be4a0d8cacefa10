//! The Prometheus exposition server, shared by the agent and the hub: `GET /healthz` answers
//! 200 `ok` when healthy and 503 with the reason otherwise; `GET /metrics` answers the
//! Prometheus text exposition format (version 0.0.4).
//!
//! Generic: it serves whatever [`MetricsSource`] it is given (the agent's in `agent::metrics`,
//! the hub's in `hub::metrics`) and knows neither. It only reads figures, never shows a key, and
//! listens where it is told (loopback unless configured otherwise), in plain HTTP: put it behind
//! a firewall or a TLS proxy if it must leave the machine.
//!
//! The HTTP side is a deliberately small HTTP/1.x responder on a `TcpListener` (one request per
//! connection, `Connection: close`), so that the device-only build links no HTTP server
//! framework: two read-only GET routes do not need one. Bounded: at most
//! [`MAX_CONNECTIONS`] at once (more wait in the kernel's backlog), a request head of at most
//! [`MAX_HEAD`] bytes read within [`READ_TIMEOUT`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Distinct label sets kept per labelled counter (method names come from the network); the
/// rest are counted under the label value [`OTHER`].
pub const MAX_SERIES: usize = 64;
pub const OTHER: &str = "(other)";

/// Scrapes served at once; a scraper opens one connection at a time.
pub const MAX_CONNECTIONS: usize = 16;
/// The longest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What a metrics endpoint serves.
pub trait MetricsSource: Send + Sync + 'static {
    /// `Ok` when healthy, else why not (one line, no secrets).
    fn health(&self) -> Result<(), String>;
    /// Appends every metric family.
    fn render(&self, out: &mut Exposition);
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running metrics endpoint; it stops when the token given to [`serve`] is cancelled.
pub struct MetricsServer {
    pub local_addr: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds `addr` (port 0: a free port, see [`MetricsServer::local_addr`]) and serves
/// `/healthz` and `/metrics` from `source` until `shutdown` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    source: Arc<dyn MetricsSource>,
    shutdown: CancellationToken,
) -> Result<MetricsServer, MetricsError> {
    let bind_error = |source| MetricsError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local_addr = listener.local_addr().map_err(bind_error)?;
    let task = tokio::spawn(accept_loop(listener, source, shutdown));
    tracing::info!(%local_addr, "serving /healthz and /metrics");
    Ok(MetricsServer { local_addr, task })
}

async fn accept_loop(
    listener: TcpListener,
    source: Arc<dyn MetricsSource>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Take the permit first: when all are out, new connections wait in the backlog.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // EMFILE and friends: wait a little rather than spin.
                    tracing::warn!(%error, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let source = source.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(error) = answer(stream, source.as_ref()).await {
                tracing::debug!(%error, "metrics endpoint: connection ended");
            }
        });
    }
}

/// Reads one request head and writes one response.
async fn answer(mut stream: TcpStream, source: &dyn MetricsSource) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request head too large\n",
                false,
            )
            .await
        }
        Ok(Err(error)) => return Err(error),
        Err(_) => {
            return respond(
                &mut stream,
                "408 Request Timeout",
                "text/plain",
                "request timeout\n",
                false,
            )
            .await
        }
    };
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        return respond(
            &mut stream,
            "400 Bad Request",
            "text/plain",
            "malformed request line\n",
            false,
        )
        .await;
    };
    if !version.starts_with("HTTP/1.") {
        return respond(
            &mut stream,
            "505 HTTP Version Not Supported",
            "text/plain",
            "HTTP/1.x only\n",
            false,
        )
        .await;
    }
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n",
            false,
        )
        .await;
    }
    let path = target.split('?').next().unwrap_or_default();
    match path {
        "/healthz" => match source.health() {
            Ok(()) => respond(&mut stream, "200 OK", "text/plain", "ok\n", head_only).await,
            Err(reason) => {
                let body = format!("{reason}\n");
                respond(
                    &mut stream,
                    "503 Service Unavailable",
                    "text/plain",
                    &body,
                    head_only,
                )
                .await
            }
        },
        "/metrics" => {
            let mut out = Exposition::default();
            source.render(&mut out);
            respond(
                &mut stream,
                "200 OK",
                CONTENT_TYPE,
                &out.finish(),
                head_only,
            )
            .await
        }
        _ => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "not found\n",
                head_only,
            )
            .await
        }
    }
}

/// The request head up to the blank line, or `None` when it exceeds [`MAX_HEAD`].
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        match buf.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(end) if end <= MAX_HEAD => {
                buf.truncate(end);
                return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
            }
            // Too long, whether it arrived whole or is still coming.
            Some(_) => return Ok(None),
            None if buf.len() > MAX_HEAD => return Ok(None),
            None => {}
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let mut response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        response.push_str(body);
    }
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// The Prometheus text format, written family by family: `# HELP`, `# TYPE`, then samples.
#[derive(Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// Starts a family. Counter names end in `_total` (checked in tests, not here).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{label}=\"{}\"", escape_label(value));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", format_value(value));
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    pub fn finish(self) -> String {
        self.text
    }
}

fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

pub fn load(counter: &AtomicU64) -> f64 {
    counter.load(Ordering::Relaxed) as f64
}

/// Counts per label value, at most [`MAX_SERIES`] values (then [`OTHER`]).
#[derive(Debug, Default)]
pub struct LabelledCounter(Mutex<BTreeMap<Vec<String>, u64>>);

impl LabelledCounter {
    pub fn bump(&self, labels: &[&str]) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let key: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        let key = if map.contains_key(&key) || map.len() < MAX_SERIES {
            key
        } else {
            labels.iter().map(|_| OTHER.to_string()).collect()
        };
        *map.entry(key).or_insert(0) += 1;
    }

    /// The count of one label set (0 if never bumped).
    pub fn get(&self, labels: &[&str]) -> u64 {
        let key: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&key).copied().unwrap_or(0)
    }

    pub fn snapshot(&self) -> Vec<(Vec<String>, u64)> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    pub fn render(&self, out: &mut Exposition, name: &str, label_names: &[&str]) {
        for (values, count) in self.snapshot() {
            let labels: Vec<(&str, &str)> = label_names
                .iter()
                .copied()
                .zip(values.iter().map(String::as_str))
                .collect();
            out.sample(name, &labels, count as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Result<(), String>);

    impl MetricsSource for Fixed {
        fn health(&self) -> Result<(), String> {
            self.0.clone()
        }
        fn render(&self, out: &mut Exposition) {
            out.single("up", Kind::Gauge, "Up.", 1.0);
        }
    }

    /// Sends `request` as it is and returns the whole answer.
    async fn ask(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request).await.expect("send");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.expect("read");
        String::from_utf8(answer).expect("utf-8")
    }

    #[tokio::test]
    async fn routes_methods_and_oversized_heads_get_their_status() {
        let stop = CancellationToken::new();
        let source = Arc::new(Fixed(Err("not connected".into())));
        let server = serve("127.0.0.1:0".parse().unwrap(), source, stop.clone())
            .await
            .expect("bind");
        let addr = server.local_addr;
        let metrics = ask(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
        assert!(metrics.contains(CONTENT_TYPE), "{metrics}");
        assert!(metrics.ends_with("# TYPE up gauge\nup 1\n"), "{metrics}");
        let health = ask(addr, b"GET /healthz?verbose HTTP/1.0\r\n\r\n").await;
        assert!(health.starts_with("HTTP/1.1 503 "), "{health}");
        assert!(health.ends_with("\r\n\r\nnot connected\n"), "{health}");
        let head = ask(addr, b"HEAD /healthz HTTP/1.1\r\n\r\n").await;
        assert!(
            head.ends_with("connection: close\r\n\r\n"),
            "no body: {head}"
        );
        let missing = ask(addr, b"GET /admin HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
        let post = ask(addr, b"POST /metrics HTTP/1.1\r\ncontent-length: 0\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        let http2 = ask(addr, b"PRI * HTTP/2.0\r\n\r\n").await;
        assert!(http2.starts_with("HTTP/1.1 505 "), "{http2}");
        let garbage = ask(addr, b"hello\r\n\r\n").await;
        assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
        let mut huge = b"GET /metrics HTTP/1.1\r\nx: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD + 100));
        huge.extend_from_slice(b"\r\n\r\n");
        let huge = ask(addr, &huge).await;
        assert!(huge.starts_with("HTTP/1.1 431 "), "{huge}");
        stop.cancel();
        server.task.await.expect("the server stops when told");
    }

    #[test]
    fn samples_escape_labels_and_format_values() {
        let mut out = Exposition::default();
        out.family("m_total", Kind::Counter, "A \\ help\nline.");
        out.sample("m_total", &[("a", "x\"y\\z\nw"), ("b", "2")], 3.0);
        out.single("g", Kind::Gauge, "G.", 0.5);
        assert_eq!(
            out.finish(),
            "# HELP m_total A \\\\ help\\nline.\n# TYPE m_total counter\n\
             m_total{a=\"x\\\"y\\\\z\\nw\",b=\"2\"} 3\n\
             # HELP g G.\n# TYPE g gauge\ng 0.5\n"
        );
    }

    #[test]
    fn labelled_counters_cap_their_series() {
        let counter = LabelledCounter::default();
        for i in 0..MAX_SERIES + 5 {
            counter.bump(&[&format!("m{i}"), "200"]);
        }
        counter.bump(&["m0", "200"]);
        let snapshot = counter.snapshot();
        assert_eq!(snapshot.len(), MAX_SERIES + 1);
        assert_eq!(counter.get(&["m0", "200"]), 2);
        assert_eq!(counter.get(&[OTHER, OTHER]), 5);
    }
}
