//! The network checks, in the order a connection needs them: DNS, TCP to the MQTT port, the
//! TLS handshake and certificate chain, the clock against the hub's (an HTTPS `Date`), and SAS
//! authentication (one CONNECT as the device, then DISCONNECT). Each returns one [`Check`];
//! the caller decides what runs after a failure.
//!
//! Opens connections to the hub only; never prints the key or the token.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode};
use tokio::net::TcpStream;

use super::Check;
use crate::agent::mqtt::{Wire, WireError};
use crate::agent::transport::{self, Dial, DialError};
use crate::common::der::certificate_summary;
use crate::common::local_hub::HubInfo;
use crate::common::logging::error_chain;
use crate::config::{Config, Proxy};
use crate::protocol::sas;

/// Longest wait for any one network step.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Clock skew within this is fine; up to [`SKEW_FAIL`] is a warning.
const SKEW_OK: Duration = Duration::from_secs(30);
const SKEW_FAIL: Duration = Duration::from_secs(300);
/// A server certificate expiring sooner than this is a warning.
const EXPIRY_WARN_DAYS: i64 = 14;

pub(super) async fn dns(host: &str, port: u16) -> (Check, Vec<SocketAddr>) {
    const NAME: &str = "DNS";
    let hint = "check the host name (HostName, or GatewayHostName if set) and this machine's \
                DNS (/etc/resolv.conf)";
    match tokio::time::timeout(STEP_TIMEOUT, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(addrs)) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if addrs.is_empty() {
                return (
                    Check::fail(NAME, format!("{host} has no address"), hint),
                    addrs,
                );
            }
            let list: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
            let detail = format!("{host} resolves to {}", list.join(", "));
            (Check::ok(NAME, detail), addrs)
        }
        Ok(Err(error)) => (
            Check::fail(NAME, format!("cannot resolve {host}: {error}"), hint),
            Vec::new(),
        ),
        Err(_) => (
            Check::fail(NAME, format!("resolving {host} timed out"), hint),
            Vec::new(),
        ),
    }
}

pub(super) async fn tcp(host: &str, port: u16, addrs: &[SocketAddr]) -> (Check, Option<TcpStream>) {
    const NAME: &str = "TCP";
    let mut errors = Vec::new();
    for addr in addrs {
        match tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let detail = format!("{host}:{port} accepts connections ({addr})");
                return (Check::ok(NAME, detail), Some(stream));
            }
            Ok(Err(error)) => errors.push(format!("{addr}: {error}")),
            Err(_) => errors.push(format!("{addr}: timed out")),
        }
    }
    let detail = format!("cannot connect to {host}:{port} ({})", errors.join("; "));
    let hint = format!(
        "is the hub running and listening on port {port}? Is outbound TCP {port} allowed by \
         the firewall or proxy?"
    );
    (Check::fail(NAME, detail, hint), None)
}

/// The proxy's CONNECT tunnel to the hub: the tunnel, when the proxy answered 200.
pub(super) async fn proxy_connect(
    proxy: &Proxy,
    host: &str,
    port: u16,
) -> (Check, Option<TcpStream>) {
    const NAME: &str = "proxy CONNECT";
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    match tokio::time::timeout(STEP_TIMEOUT, transport::tunnel(proxy, host, port)).await {
        Ok(Ok(tunnel)) => {
            let detail = format!("{proxy} opened a tunnel to {target} (HTTP 200)");
            (Check::ok(NAME, detail), Some(tunnel))
        }
        Ok(Err(error)) => {
            let hint = match &error {
                DialError::ProxyStatus { status: 407, .. } => {
                    "the proxy wants credentials: connection.proxy = \"http://user:password@host:port\""
                }
                DialError::ProxyStatus { .. } => {
                    "the proxy does not let this host and port through: ask its administrator to \
                     allow CONNECT to it"
                }
                _ => "check connection.proxy (or HTTPS_PROXY): is it an HTTP proxy, and running?",
            };
            (Check::fail(NAME, error_chain(&error), hint), None)
        }
        Err(_) => {
            let hint = "the proxy did not answer CONNECT: check that it is an HTTP proxy";
            let detail = format!("no answer to CONNECT {target} from {proxy}");
            (Check::fail(NAME, detail, hint), None)
        }
    }
}

/// A fresh dial as the agent makes it, up to the WebSocket upgrade, which must be accepted
/// with the `mqtt` subprotocol; the failing step is named.
/// `port_key` is the configuration key a wrong port is fixed in, for the hint.
pub(super) async fn websocket(dial: &Dial<'_>, port_key: &str) -> Check {
    const NAME: &str = "WebSocket";
    let url = dial.websocket_url();
    match tokio::time::timeout(STEP_TIMEOUT, dial.open()).await {
        Ok(Ok(_stream)) => Check::ok(
            NAME,
            format!("{url} accepted the upgrade with the subprotocol mqtt"),
        ),
        Ok(Err(error)) => {
            let hint = match &error {
                DialError::UpgradeRefused { status: 404, .. } => format!(
                    "the server has no MQTT endpoint at /$iothub/websocket: is the port in \
                     {port_key} a WebSocket port (443; a local hub's ws_port or dps_ws_port in \
                     hub.json)?"
                ),
                DialError::UpgradeRefused { .. } | DialError::Upgrade { .. } => format!(
                    "the port does not serve MQTT over WebSocket; check the port in {port_key} \
                     (host:port)"
                ),
                _ => "the earlier checks passed a moment ago: try again".to_string(),
            };
            Check::fail(NAME, error_chain(&error), hint)
        }
        Err(_) => Check::fail(
            NAME,
            format!(
                "no WebSocket upgrade from {url} within {} s",
                STEP_TIMEOUT.as_secs()
            ),
            "something on the port speaks TLS but not HTTP: check the port",
        ),
    }
}

pub(super) async fn tls_check(
    host: &str,
    port: u16,
    tcp: TcpStream,
    tls: Arc<rustls::ClientConfig>,
) -> Check {
    const NAME: &str = "TLS";
    let server_name = match rustls::pki_types::ServerName::try_from(host.to_string()) {
        Ok(name) => name,
        Err(error) => {
            let hint = "the host must be a DNS name or an IP address";
            return Check::fail(NAME, format!("{host}: {error}"), hint);
        }
    };
    let connector = tokio_rustls::TlsConnector::from(tls);
    let stream = match tokio::time::timeout(STEP_TIMEOUT, connector.connect(server_name, tcp)).await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return tls_failure(host, port, &error),
        Err(_) => {
            let hint = "something on the port does not speak TLS; check the port";
            return Check::fail(NAME, format!("no TLS handshake from {host}:{port}"), hint);
        }
    };
    let (_, connection) = stream.get_ref();
    let version = match connection.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2",
        _ => "TLS",
    };
    let chain = connection.peer_certificates().unwrap_or_default();
    let Some(leaf) = chain.first().and_then(|der| certificate_summary(der)) else {
        return Check::ok(NAME, format!("{version}, certificate chain verified"));
    };
    let detail = format!(
        "{version}, chain of {} verified; certificate {}, issued by {}, valid until {}",
        chain.len(),
        leaf.subject,
        leaf.issuer,
        leaf.not_after.format("%Y-%m-%d %H:%M UTC"),
    );
    let days_left = (leaf.not_after - chrono::Utc::now()).num_days();
    if days_left < EXPIRY_WARN_DAYS {
        let hint = "the hub's certificate expires soon (a local hub re-issues it at each start)";
        return Check::warn(NAME, format!("{detail} ({days_left} days left)"), hint);
    }
    Check::ok(NAME, detail)
}

fn tls_failure(host: &str, port: u16, error: &std::io::Error) -> Check {
    use rustls::CertificateError as C;
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let detail = format!("handshake with {host}:{port} failed: {error}");
    let hint = match rustls_error {
        Some(rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => {
            "the hub's certificate is not signed by a trusted CA: for a local hub set \
             identity.ca_file to its ca.pem (hub.json names it); behind a TLS-inspecting proxy, \
             give the proxy's CA"
                .to_string()
        }
        Some(rustls::Error::InvalidCertificate(C::NotValidForName))
        | Some(rustls::Error::InvalidCertificate(C::NotValidForNameContext { .. })) => format!(
            "the certificate does not name {host}: dial a name it holds (a local hub: start it \
             with --hostname {host})"
        ),
        Some(rustls::Error::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        )) => "the certificate is outside its validity: check this machine's clock \
               (timedatectl) and the hub's certificate"
            .to_string(),
        Some(_) => {
            "check identity.ca_file and that the port serves the hub's MQTT over TLS".to_string()
        }
        None => "the connection broke during the handshake: check that the port serves MQTT \
                 over TLS (8883), not plain MQTT"
            .to_string(),
    };
    Check::fail("TLS", detail, hint)
}

/// Compares this machine's clock with the `Date` of an HTTPS answer from the hub: IoT Hub
/// answers on 443; a local hub on its service API port, found in its hub.json.
pub(super) async fn clock(
    config: &Config,
    peer: Option<std::net::IpAddr>,
    mqtt_port: u16,
    hub_state_dir: Option<&Path>,
    tls: Arc<rustls::ClientConfig>,
) -> Check {
    const NAME: &str = "clock";
    let (host, _) = config.identity.connect_address();
    let local_hub = peer.is_some_and(|ip| ip.is_loopback());
    let api_port = if local_hub {
        hub_state_dir
            .and_then(|dir| HubInfo::read(dir).ok())
            .filter(|info| info.mqtt_port == mqtt_port || info.ws_port == mqtt_port)
            .map(|info| info.api_port)
    } else {
        None
    };
    let authority = match (api_port, host.contains(':')) {
        (Some(port), true) => format!("[{host}]:{port}"),
        (Some(port), false) => format!("{host}:{port}"),
        (None, true) => format!("[{host}]"),
        (None, false) => host.clone(),
    };
    let url = format!("https://{authority}/");
    let port = api_port.unwrap_or(443);
    let sent = chrono::Utc::now();
    let date = match super::https_date::fetch(tls, &host, port, STEP_TIMEOUT).await {
        Ok(date) => date,
        Err(error @ super::https_date::HttpsDateError::NoDate) => {
            let hint = "SAS tokens need this machine's clock to be right: keep NTP on";
            return Check::warn(NAME, format!("{url}: {error}"), hint);
        }
        Err(error) => {
            let hint = if local_hub && api_port.is_none() {
                "for a local hub, give --state-dir (its hub.json names the HTTPS port)"
            } else {
                "HTTPS (443) may be blocked here; SAS tokens need this machine's clock to be right"
            };
            return Check::warn(
                NAME,
                format!("cannot read the hub's time from {url}: {error}"),
                hint,
            );
        }
    };
    let received = chrono::Utc::now();
    let midpoint = sent + (received - sent) / 2;
    // The Date header has whole seconds: compare with this machine's time to the second.
    let skew = (date - midpoint).num_milliseconds() as f64 / 1000.0;
    let magnitude = Duration::from_secs_f64(skew.abs());
    let direction = if skew > 0.0 { "behind" } else { "ahead of" };
    let detail = if skew.abs() < 1.0 {
        format!("this machine agrees with the hub to the second ({url})")
    } else {
        format!(
            "this machine is {:.0} s {direction} the hub ({url})",
            skew.abs()
        )
    };
    let hint = "SAS tokens are signed with this machine's time: turn NTP on (timedatectl \
                set-ntp true)";
    if magnitude <= SKEW_OK {
        Check::ok(NAME, detail)
    } else if magnitude <= SKEW_FAIL {
        Check::warn(NAME, detail, hint)
    } else {
        Check::fail(NAME, detail, hint)
    }
}

/// Connects as the device with a fresh SAS token (an X.509 device: with its certificate, no
/// password), reports the CONNACK, disconnects.
pub(super) async fn authenticate(config: &Config, tls: Arc<rustls::ClientConfig>) -> Check {
    const NAME: &str = "authentication";
    let identity = &config.identity;
    let now = chrono::Utc::now().timestamp().max(0) as u64;
    let resource = sas::device_resource(&identity.host_name, &identity.device_id, None);
    let signed = match &identity.x509 {
        Some(_) => Ok(String::new()),
        None => sas::generate_token(&resource, identity.key.expose(), None, now + 300),
    };
    let token = match signed {
        Ok(token) => token,
        Err(error) => {
            let hint = "the key must be the device's base64 SharedAccessKey";
            return Check::fail(NAME, format!("cannot sign a SAS token: {error}"), hint);
        }
    };
    let mut connect = Connect::new(identity.device_id.clone());
    connect.keep_alive = 30;
    connect.clean_session = true;
    connect.set_login(crate::agent::connection::username(identity), token);
    let dial = Dial::new(identity, &config.connection, tls);
    let outcome = tokio::time::timeout(STEP_TIMEOUT, Wire::open(&dial, &connect)).await;
    match outcome {
        Ok(Ok((mut wire, _))) => {
            let _ = tokio::time::timeout(Duration::from_secs(2), wire.disconnect()).await;
            let detail = format!(
                "CONNACK 0 (accepted): the hub accepted device {}'s key; disconnected",
                identity.device_id
            );
            Check::ok(NAME, detail)
        }
        Ok(Err(WireError::Refused(code))) => {
            let (number, meaning) = connack(code);
            let detail = format!(
                "CONNACK {number} ({meaning}) for device {}",
                identity.device_id
            );
            let hint = match code {
                ConnectReturnCode::ServiceUnavailable => {
                    "the hub is throttling or unavailable: try again later"
                }
                _ => {
                    "the hub refused the key: copy the device's connection string again \
                     (portal: IoT Hub > Devices > the device), and check that the device \
                     exists and is enabled"
                }
            };
            Check::fail(NAME, detail, hint)
        }
        Ok(Err(error)) => Check::fail(
            NAME,
            format!("the MQTT connection failed: {}", error_chain(&error)),
            "the earlier checks passed, so the hub closed the connection: check its logs",
        ),
        Err(_) => Check::fail(
            NAME,
            "no CONNACK within 10 s",
            "the hub accepted TLS but did not answer CONNECT: check that the port serves MQTT",
        ),
    }
}

fn connack(code: ConnectReturnCode) -> (u8, &'static str) {
    match code {
        ConnectReturnCode::Success => (0, "accepted"),
        ConnectReturnCode::RefusedProtocolVersion => (1, "unacceptable protocol version"),
        ConnectReturnCode::BadClientId => (2, "identifier rejected"),
        ConnectReturnCode::ServiceUnavailable => (3, "server unavailable"),
        ConnectReturnCode::BadUserNamePassword => (4, "bad user name or password"),
        ConnectReturnCode::NotAuthorized => (5, "not authorized"),
    }
}
