//! Health and metrics over plain HTTP, for the agent and for the hub: `GET /healthz` answers
//! 200 `ok` when healthy and 503 with the reason otherwise; `GET /metrics` answers the
//! Prometheus text exposition format (version 0.0.4).
//!
//! The server only reads figures that the agent and the hub keep anyway: the agent's
//! [`Counters`] (in its `HandlerContext`) and the hub's [`HubState`] (with the few counters
//! of [`HubCounters`]). It never changes them, never touches MQTT, and never shows a key. It
//! listens where it is told (loopback unless configured otherwise), in plain HTTP: put it
//! behind a firewall or a TLS proxy if it must leave the machine.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent::context::{Counters, HandlerContext};
use crate::hub::HubState;

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Distinct label sets kept per labelled counter (method names come from the network); the
/// rest are counted under the label value [`OTHER`].
pub const MAX_SERIES: usize = 64;
pub const OTHER: &str = "(other)";

/// What a metrics endpoint serves.
pub trait MetricsSource: Send + Sync + 'static {
    /// `Ok` when healthy, else why not (one line, no secrets).
    fn health(&self) -> Result<(), String>;
    /// Appends every metric family.
    fn render(&self, out: &mut Exposition);
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
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
    let health_source = source.clone();
    let router = Router::new()
        .route("/healthz", get(move || healthz(health_source.clone())))
        .route("/metrics", get(move || metrics(source.clone())));
    let task = tokio::spawn(async move {
        let server =
            axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned());
        if let Err(error) = server.await {
            tracing::warn!(%error, "the metrics endpoint stopped");
        }
    });
    tracing::info!(%local_addr, "serving /healthz and /metrics");
    Ok(MetricsServer { local_addr, task })
}

async fn healthz(source: Arc<dyn MetricsSource>) -> Response {
    match source.health() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response(),
    }
}

async fn metrics(source: Arc<dyn MetricsSource>) -> Response {
    let mut out = Exposition::default();
    source.render(&mut out);
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], out.finish()).into_response()
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

fn load(counter: &AtomicU64) -> f64 {
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

    fn render(&self, out: &mut Exposition, name: &str, label_names: &[&str]) {
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

/// What a running agent exposes: its counters, read through its handler context.
pub struct AgentMetrics {
    pub ctx: HandlerContext,
    /// `outbox.max_readings` (the daemon always has an outbox file).
    pub queue_capacity: usize,
}

impl MetricsSource for AgentMetrics {
    fn health(&self) -> Result<(), String> {
        let heartbeat = self.ctx.heartbeat();
        if !heartbeat.healthy() {
            return Err(format!(
                "an agent loop is stuck (no heartbeat for {} s)",
                heartbeat.oldest().as_secs()
            ));
        }
        let counters = self.ctx.counters();
        if counters.connected.load(Ordering::Relaxed) {
            return Ok(());
        }
        match counters.last_disconnect() {
            Some(reason) => Err(format!("not connected to IoT Hub: {reason}")),
            None => Err("not connected to IoT Hub yet".into()),
        }
    }

    fn render(&self, out: &mut Exposition) {
        use Kind::{Counter, Gauge};
        let c: &Counters = self.ctx.counters();
        let connected = if c.connected.load(Ordering::Relaxed) {
            1.0
        } else {
            0.0
        };
        out.single(
            "simdevice_agent_connected",
            Gauge,
            "1 while the device is connected to IoT Hub, else 0.",
            connected,
        );
        out.single(
            "simdevice_agent_connects_total",
            Counter,
            "Successful connections (CONNACK accepted).",
            load(&c.connects),
        );
        out.family(
            "simdevice_agent_reconnects_total",
            Counter,
            "Connections ended or attempts failed, by reason: renewal (new SAS token), \
             lost (an open connection ended), failed (no connection), refused (credentials).",
        );
        c.reconnects
            .render(out, "simdevice_agent_reconnects_total", &["reason"]);
        out.single(
            "simdevice_agent_token_renewals_total",
            Counter,
            "Reconnections made to renew the SAS token.",
            load(&c.token_renewals),
        );
        out.single(
            "simdevice_agent_readings_queued_total",
            Counter,
            "Readings produced into the outbox.",
            load(&c.readings_produced),
        );
        out.single(
            "simdevice_agent_readings_published_total",
            Counter,
            "Readings published (resends after a disconnect count again).",
            load(&c.readings_published),
        );
        out.single(
            "simdevice_agent_readings_acknowledged_total",
            Counter,
            "Readings acknowledged by the hub (PUBACK).",
            load(&c.readings_acknowledged),
        );
        out.single(
            "simdevice_agent_readings_dropped_total",
            Counter,
            "Readings dropped because the outbox was full.",
            load(&c.readings_dropped),
        );
        out.single(
            "simdevice_agent_queue_length",
            Gauge,
            "Readings in the outbox, waiting or in flight.",
            load(&c.queue_length),
        );
        out.single(
            "simdevice_agent_queue_capacity",
            Gauge,
            "Readings the outbox holds at most (outbox.max_readings).",
            self.queue_capacity as f64,
        );
        out.family(
            "simdevice_agent_method_calls_total",
            Counter,
            "Direct method calls answered, by method name and status.",
        );
        c.methods.render(
            out,
            "simdevice_agent_method_calls_total",
            &["method", "status"],
        );
        out.single(
            "simdevice_agent_desired_applied_total",
            Counter,
            "Desired properties applied.",
            load(&c.desired_applied),
        );
        out.single(
            "simdevice_agent_reported_patches_total",
            Counter,
            "Reported-property patches accepted by the hub.",
            load(&c.reported_patches),
        );
        out.single(
            "simdevice_agent_cloud_to_device_messages_total",
            Counter,
            "Cloud-to-device messages received.",
            load(&c.cloud_to_device),
        );
        out.single(
            "simdevice_agent_uptime_seconds",
            Gauge,
            "Seconds since the agent started.",
            self.ctx.uptime().as_secs_f64().floor(),
        );
    }
}

/// The hub's counters that nothing else keeps. Bumped where the event happens.
#[derive(Debug, Default)]
pub struct HubCounters {
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub twin_updates_device: AtomicU64,
    pub twin_updates_service: AtomicU64,
    pub queries: AtomicU64,
    /// Direct method calls by status: the device's, or the HTTP status of the hub's error.
    pub method_calls: LabelledCounter,
}

impl HubCounters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn method_call(&self, status: i32) {
        self.method_calls.bump(&[&status.to_string()]);
    }
}

/// What a running hub exposes.
pub struct HubMetrics {
    pub state: Arc<HubState>,
    /// Cancelled when the hub stops: `/healthz` then answers 503.
    pub stopping: CancellationToken,
}

impl MetricsSource for HubMetrics {
    fn health(&self) -> Result<(), String> {
        if self.stopping.is_cancelled() {
            Err("the hub is stopping".into())
        } else {
            Ok(())
        }
    }

    fn render(&self, out: &mut Exposition) {
        use Kind::{Counter, Gauge};
        let state = &self.state;
        let c = &state.counters;
        let stats = state.registry.stats();
        out.single(
            "simdevice_hub_devices",
            Gauge,
            "Devices in the registry.",
            stats.total as f64,
        );
        out.single(
            "simdevice_hub_connected_devices",
            Gauge,
            "Devices connected now.",
            stats.connected as f64,
        );
        out.family(
            "simdevice_hub_connections_total",
            Counter,
            "Device connections that sent CONNECT, by result (accepted, refused).",
        );
        let connections = "simdevice_hub_connections_total";
        out.sample(
            connections,
            &[("result", "accepted")],
            load(&c.connections_accepted),
        );
        out.sample(
            connections,
            &[("result", "refused")],
            load(&c.connections_refused),
        );
        out.single(
            "simdevice_hub_telemetry_messages_total",
            Counter,
            "Device-to-cloud messages accepted.",
            state.telemetry.total() as f64,
        );
        out.family(
            "simdevice_hub_twin_updates_total",
            Counter,
            "Twin changes applied, by source: device (reported patches) or service \
             (tags and desired properties).",
        );
        let twins = "simdevice_hub_twin_updates_total";
        out.sample(twins, &[("source", "device")], load(&c.twin_updates_device));
        out.sample(
            twins,
            &[("source", "service")],
            load(&c.twin_updates_service),
        );
        out.family(
            "simdevice_hub_method_calls_total",
            Counter,
            "Direct method calls, by status: the device's answer, or the HTTP status of the \
             hub's error (404 not online, 504 timeout).",
        );
        c.method_calls
            .render(out, "simdevice_hub_method_calls_total", &["status"]);
        out.single(
            "simdevice_hub_queries_total",
            Counter,
            "Queries run (POST /devices/query).",
            load(&c.queries),
        );
        out.single(
            "simdevice_hub_recent_events",
            Gauge,
            "Messages in the recent-events buffer (GET /simdevice/events).",
            state.telemetry.buffered() as f64,
        );
        out.single(
            "simdevice_hub_recent_events_dropped_total",
            Counter,
            "Messages dropped from the full recent-events buffer.",
            state.telemetry.dropped() as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
