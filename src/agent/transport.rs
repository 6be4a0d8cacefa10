//! THE DIAL of the agent's connection: the byte stream MQTT runs on, opened in steps, each
//! with its own error: TCP to the hub, or to an HTTP proxy and a CONNECT tunnel through it
//! ([`tunnel`]); then TLS with the hub's name; then, for `transport = "websocket"`, the
//! WebSocket upgrade at `/$iothub/websocket` with the subprotocol `mqtt` ([`upgrade`]). The
//! wire (`mqtt`) reads and writes the resulting [`Stream`] without knowing which it is.
//!
//! No deadline here: the caller bounds the whole dial (the connect timeout). Nothing shows a
//! secret: a proxy's credentials print as `***` ([`crate::config::Proxy`]), and the only
//! thing quoted from a proxy's answer is its status line, cut short.
//!
//! Memory, per connection of a fleet: the TLS variant is the TLS stream alone; the WebSocket
//! variant (boxed, so that MQTT connections do not carry its size) adds tungstenite's state
//! and a read buffer that starts at 64 bytes and holds one frame at a time, and a write buffer
//! that keeps the capacity of the largest frame written.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::{InvalidDnsNameError, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{header, HeaderValue};
use tokio_tungstenite::tungstenite::Error as WsError;

use crate::common::ws_stream::{self, WsStream};
use crate::config::{ConnectionSettings, Identity, Proxy, Transport};

/// The largest WebSocket frame or message taken from the hub: the wire's largest packet
/// (`mqtt::MAX_PACKET`, which `mqtt` checks again per packet).
const MAX_FRAME: usize = 256 * 1024 + 8 * 1024;
/// The longest answer to CONNECT read (status line and headers).
const PROXY_ANSWER_MAX: usize = 8 * 1024;
/// How much of a proxy's status line an error quotes.
const REASON_MAX: usize = 80;

/// Where and how to dial the hub.
pub struct Dial<'a> {
    /// The hub's host: the TLS server name, and the WebSocket `Host`.
    pub host: String,
    pub port: u16,
    pub transport: Transport,
    pub proxy: Option<&'a Proxy>,
    pub tls: Arc<rustls::ClientConfig>,
}

impl<'a> Dial<'a> {
    /// The dial of a device: its gateway or host (the transport's port unless it names one),
    /// its transport and its proxy.
    pub fn new(
        identity: &Identity,
        settings: &'a ConnectionSettings,
        tls: Arc<rustls::ClientConfig>,
    ) -> Dial<'a> {
        let (host, port) = identity.dial_address(settings.transport);
        Dial {
            host,
            port,
            transport: settings.transport,
            proxy: settings.proxy.as_ref(),
            tls,
        }
    }

    /// `host:port`, with brackets around an IPv6 literal.
    pub fn authority(&self) -> String {
        authority(&self.host, self.port)
    }

    /// Every step in turn: the stream MQTT runs on.
    pub async fn open(&self) -> Result<Stream, DialError> {
        let tcp = self.tcp().await?;
        let tls = self.tls(tcp).await?;
        match self.transport {
            Transport::Mqtt => Ok(Stream::Tls(tls)),
            Transport::WebSocket => Ok(Stream::WebSocket(Box::new(self.upgrade(tls).await?))),
        }
    }

    /// TCP to the hub, or through the proxy's tunnel to it.
    pub async fn tcp(&self) -> Result<TcpStream, DialError> {
        match self.proxy {
            Some(proxy) => tunnel(proxy, &self.host, self.port).await,
            None => connect(&self.host, self.port)
                .await
                .map_err(|source| DialError::Connect {
                    host: self.host.clone(),
                    port: self.port,
                    source,
                }),
        }
    }

    /// The TLS handshake with the hub's name.
    pub async fn tls(&self, tcp: TcpStream) -> Result<TlsStream<TcpStream>, DialError> {
        let server_name =
            ServerName::try_from(self.host.clone()).map_err(|source| DialError::ServerName {
                host: self.host.clone(),
                source,
            })?;
        TlsConnector::from(self.tls.clone())
            .connect(server_name, tcp)
            .await
            .map_err(|source| DialError::Handshake {
                host: self.host.clone(),
                source,
            })
    }

    /// The WebSocket upgrade over TLS.
    pub async fn upgrade(
        &self,
        tls: TlsStream<TcpStream>,
    ) -> Result<WsStream<TlsStream<TcpStream>>, DialError> {
        let url = self.websocket_url();
        let mut request =
            url.as_str()
                .into_client_request()
                .map_err(|source| DialError::Upgrade {
                    url: url.clone(),
                    source: Box::new(source),
                })?;
        request.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(ws_stream::SUBPROTOCOL),
        );
        let config = ws_stream::config(MAX_FRAME);
        match tokio_tungstenite::client_async_with_config(request, tls, Some(config)).await {
            Ok((ws, _response)) => Ok(WsStream::new(ws)),
            Err(WsError::Http(response)) => Err(DialError::UpgradeRefused {
                url,
                status: response.status().as_u16(),
            }),
            Err(source) => Err(DialError::Upgrade {
                url,
                source: Box::new(source),
            }),
        }
    }

    /// `wss://host:port/$iothub/websocket`.
    pub fn websocket_url(&self) -> String {
        format!("wss://{}{}", self.authority(), ws_stream::PATH)
    }
}

/// Why a dial failed, naming the step. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot connect to {host}:{port}")]
    Connect {
        host: String,
        port: u16,
        #[source]
        source: io::Error,
    },
    /// The proxy itself cannot be reached (refused, unreachable, no such host).
    #[error("cannot connect to the proxy {proxy}")]
    ProxyConnect {
        proxy: Proxy,
        #[source]
        source: io::Error,
    },
    /// The proxy answered CONNECT with another status than 200.
    #[error("the proxy {proxy} refused the tunnel to {target}: HTTP {status} {reason}")]
    ProxyStatus {
        proxy: Proxy,
        target: String,
        status: u16,
        reason: String,
    },
    #[error("the proxy {proxy} closed the connection before answering CONNECT")]
    ProxyClosed { proxy: Proxy },
    #[error("the proxy {proxy} did not answer CONNECT with HTTP")]
    ProxyGarbled { proxy: Proxy },
    #[error("talking to the proxy {proxy} failed")]
    ProxyIo {
        proxy: Proxy,
        #[source]
        source: io::Error,
    },
    #[error("{host} is not a valid TLS server name")]
    ServerName {
        host: String,
        #[source]
        source: InvalidDnsNameError,
    },
    #[error("TLS handshake with {host} failed")]
    Handshake {
        host: String,
        #[source]
        source: io::Error,
    },
    /// The hub answered the upgrade with an HTTP status (404: not its WebSocket path).
    #[error("the hub refused the WebSocket upgrade at {url}: HTTP {status}")]
    UpgradeRefused { url: String, status: u16 },
    #[error("the WebSocket upgrade at {url} failed")]
    Upgrade {
        url: String,
        /// Boxed: tungstenite's error is large, and this path is rare.
        #[source]
        source: Box<WsError>,
    },
}

/// The byte stream the wire runs MQTT on.
// On purpose: the TLS stream, the common case, stays inline (one allocation fewer per
// connection); the WebSocket one is boxed so that MQTT connections do not carry its size.
#[allow(clippy::large_enum_variant)]
pub enum Stream {
    Tls(TlsStream<TcpStream>),
    WebSocket(Box<WsStream<TlsStream<TcpStream>>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
            Stream::WebSocket(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
            Stream::WebSocket(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
            Stream::WebSocket(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Stream::WebSocket(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

async fn connect(host: &str, port: u16) -> io::Result<TcpStream> {
    let tcp = TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// TCP to `proxy`, then `CONNECT host:port`: the tunnel once the proxy answers 200.
pub async fn tunnel(proxy: &Proxy, host: &str, port: u16) -> Result<TcpStream, DialError> {
    let mut tcp =
        connect(&proxy.host, proxy.port)
            .await
            .map_err(|source| DialError::ProxyConnect {
                proxy: proxy.clone(),
                source,
            })?;
    let target = authority(host, port);
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(authorization) = proxy.authorization() {
        request.push_str(&format!("Proxy-Authorization: {authorization}\r\n"));
    }
    request.push_str("\r\n");
    let io_error = |source| DialError::ProxyIo {
        proxy: proxy.clone(),
        source,
    };
    tcp.write_all(request.as_bytes()).await.map_err(io_error)?;
    // The answer ends at its blank line; nothing may follow it, since TLS (the client's
    // hello first) has not begun: reading in chunks takes nothing of the tunnel's.
    let mut answer = Vec::with_capacity(256);
    let end = loop {
        if let Some(end) = find_header_end(&answer) {
            break end;
        }
        if answer.len() >= PROXY_ANSWER_MAX {
            return Err(DialError::ProxyGarbled {
                proxy: proxy.clone(),
            });
        }
        let mut chunk = [0u8; 512];
        let n = tcp.read(&mut chunk).await.map_err(io_error)?;
        if n == 0 {
            return Err(DialError::ProxyClosed {
                proxy: proxy.clone(),
            });
        }
        answer.extend_from_slice(&chunk[..n]);
    };
    if end != answer.len() {
        return Err(DialError::ProxyGarbled {
            proxy: proxy.clone(),
        });
    }
    let (status, reason) = parse_status_line(&answer).ok_or_else(|| DialError::ProxyGarbled {
        proxy: proxy.clone(),
    })?;
    if status != 200 {
        return Err(DialError::ProxyStatus {
            proxy: proxy.clone(),
            target,
            status,
            reason,
        });
    }
    Ok(tcp)
}

/// Where the header of an HTTP answer ends (after its blank line).
fn find_header_end(answer: &[u8]) -> Option<usize> {
    answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

/// `HTTP/1.x CODE REASON`: the code, and the reason cut to [`REASON_MAX`] printable chars.
fn parse_status_line(answer: &[u8]) -> Option<(u16, String)> {
    let line_end = answer.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&answer[..line_end]).ok()?;
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let status = parts.next()?.parse::<u16>().ok()?;
    let reason = parts
        .next()
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(REASON_MAX)
        .collect();
    Some((status, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_read_and_cut_short() {
        assert_eq!(
            parse_status_line(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Some((200, "Connection established".into()))
        );
        assert_eq!(
            parse_status_line(b"HTTP/1.0 407\r\n\r\n"),
            Some((407, String::new()))
        );
        let long = format!("HTTP/1.1 502 {}\r\n\r\n", "x".repeat(500));
        assert_eq!(
            parse_status_line(long.as_bytes()).unwrap().1.len(),
            REASON_MAX
        );
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH\r\n\r\n"), None);
        assert_eq!(
            find_header_end(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n"),
            Some(25)
        );
        assert_eq!(find_header_end(b"HTTP/1.1 200 OK\r\n"), None);
    }

    #[test]
    fn frames_are_capped_at_the_wires_largest_packet() {
        assert_eq!(MAX_FRAME, crate::agent::mqtt::MAX_PACKET);
    }

    #[test]
    fn errors_never_show_proxy_credentials() {
        let proxy = Proxy::parse("http://alice:s3cret@proxy:3128").unwrap();
        let error = DialError::ProxyStatus {
            proxy,
            target: "hub:443".into(),
            status: 407,
            reason: "Proxy Authentication Required".into(),
        };
        let text = error.to_string();
        assert!(
            text.contains("407") && text.contains("***@proxy:3128"),
            "{text}"
        );
        assert!(
            !text.contains("s3cret") && !text.contains("alice"),
            "{text}"
        );
    }
}
