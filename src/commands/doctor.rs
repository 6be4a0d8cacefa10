//! `simdevice doctor`: walks the path from the configuration to an authenticated MQTT
//! connection and says where it breaks: the configuration, where the key is kept, DNS, TCP to
//! the MQTT port, the TLS handshake and certificate chain, the clock against the hub's, and SAS
//! authentication (a connect and disconnect). Each check prints `[ok]`, `[warn]` or `[FAIL]`
//! with a one-line hint; the exit code is 1 when any check failed.
//!
//! The network checks run in order and stop at the first failure (a host that does not
//! resolve cannot be dialled). The authentication check connects as the device with a clean
//! session, so a running agent with the same identity is disconnected for a moment (IoT Hub
//! keeps one connection per device) and reconnects by itself. Nothing here prints a key.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, TlsConfiguration, Transport,
};
use tokio::net::TcpStream;

use crate::common::local_hub::HubInfo;
use crate::config::{Config, ConfigError, ENV_PREFIX, ENV_SEPARATOR};
use crate::protocol::sas;

/// Longest wait for any one network step.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Clock skew within this is fine; up to [`SKEW_FAIL`] is a warning.
const SKEW_OK: Duration = Duration::from_secs(30);
const SKEW_FAIL: Duration = Duration::from_secs(300);
/// A server certificate expiring sooner than this is a warning.
const EXPIRY_WARN_DAYS: i64 = 14;

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Configuration file [default: /etc/simdevice/config.toml]
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// For a local hub: its state directory, whose hub.json names the HTTPS port for the clock
    /// check [default: the per-user data directory]
    #[arg(long, env = "SIMDEVICE_HUB_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// How to fix it; shown for warnings and failures.
    pub hint: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Ok,
            detail: detail.into(),
            hint: None,
        }
    }

    fn warn(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Warn,
            detail: detail.into(),
            hint: Some(hint.into()),
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Fail,
            detail: detail.into(),
            hint: Some(hint.into()),
        }
    }
}

/// Every check that ran, in order.
#[derive(Debug, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.status == Status::Fail)
    }

    fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }
}

pub async fn run(args: DoctorArgs) -> ExitCode {
    let state_dir = args
        .state_dir
        .unwrap_or_else(crate::common::local_hub::default_state_dir);
    let mut out = std::io::stdout().lock();
    let report = diagnose(args.config.as_deref(), Some(&state_dir), &mut out).await;
    if report.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs the checks, printing each as it completes.
pub async fn diagnose(
    config_path: Option<&Path>,
    hub_state_dir: Option<&Path>,
    out: &mut dyn Write,
) -> Report {
    let mut report = Report::default();
    let config = match Config::load(config_path) {
        Ok(config) => {
            let source = match &config.file {
                Some(file) => file.display().to_string(),
                None => "the environment (no file)".to_string(),
            };
            let detail = format!(
                "{source}: device {} on {}",
                config.identity.device_id, config.identity.host_name
            );
            record(out, &mut report, Check::ok("configuration", detail));
            config
        }
        Err(error) => {
            record(out, &mut report, config_failure(&error));
            finish(out, &report);
            return report;
        }
    };
    let path = config_path.unwrap_or(Path::new(crate::config::DEFAULT_CONFIG_PATH));
    record(out, &mut report, key_storage(path, &config));
    network(&config, hub_state_dir, out, &mut report).await;
    finish(out, &report);
    report
}

/// Prints a check and keeps it; false when it failed.
fn record(out: &mut dyn Write, report: &mut Report, check: Check) -> bool {
    print_check(out, &check);
    let passed = check.status != Status::Fail;
    report.checks.push(check);
    passed
}

/// DNS, TCP, TLS, clock and authentication; a failed DNS, TCP or TLS check stops the rest.
async fn network(
    config: &Config,
    hub_state_dir: Option<&Path>,
    out: &mut dyn Write,
    report: &mut Report,
) {
    let (host, port) = config.identity.connect_address();
    let (check, addrs) = dns(&host, port).await;
    if !record(out, report, check) {
        return;
    }
    let (check, tcp) = tcp(&host, port, &addrs).await;
    if !record(out, report, check) {
        return;
    }
    let Some(tcp) = tcp else {
        return;
    };
    let tls = match crate::agent::client_tls(config.identity.ca_file.as_deref()) {
        Ok(tls) => tls,
        Err(error) => {
            let hint = "check identity.ca_file (a PEM certificate)";
            record(out, report, Check::fail("TLS", error.to_string(), hint));
            return;
        }
    };
    if !record(out, report, tls_check(&host, port, tcp, tls.clone()).await) {
        return;
    }
    let peer = addrs.first().map(|a| a.ip());
    // A wrong clock does not stop the last check: its CONNACK tells whether it matters yet.
    let check = clock(config, peer, port, hub_state_dir, tls.clone()).await;
    record(out, report, check);
    record(out, report, authenticate(config, tls).await);
}

fn print_check(out: &mut dyn Write, check: &Check) {
    let tag = match check.status {
        Status::Ok => "[ok]  ",
        Status::Warn => "[warn]",
        Status::Fail => "[FAIL]",
    };
    let _ = writeln!(out, "{tag} {}: {}", check.name, check.detail);
    if let Some(hint) = &check.hint {
        let _ = writeln!(out, "       hint: {hint}");
    }
    let _ = out.flush();
}

fn finish(out: &mut dyn Write, report: &Report) {
    let (failed, warned) = (report.count(Status::Fail), report.count(Status::Warn));
    let _ = if failed > 0 {
        writeln!(
            out,
            "doctor: {failed} check(s) failed, {warned} warning(s); checks after a failure were not run"
        )
    } else if warned > 0 {
        writeln!(out, "doctor: no failures, {warned} warning(s)")
    } else {
        writeln!(out, "doctor: all {} checks passed", report.checks.len())
    };
}

fn config_failure(error: &ConfigError) -> Check {
    let detail = error.to_string();
    match error {
        ConfigError::FileMissing { .. } => Check::fail(
            "configuration",
            detail,
            "write one with: simdevice config init --connection-string '...' --output FILE",
        ),
        ConfigError::KeyFile { path, .. } => Check::fail(
            "key file",
            detail,
            format!(
                "the file must hold the base64 device key and be readable by its owner only: \
                 chmod 600 {}",
                path.display()
            ),
        ),
        ConfigError::CaFile { .. } => Check::fail(
            "configuration",
            detail,
            "identity.ca_file must be a PEM certificate, e.g. the local hub's ca.pem (hub.json)",
        ),
        _ => Check::fail(
            "configuration",
            detail,
            "fix the named key; `simdevice config check` prints the effective configuration",
        ),
    }
}

/// Where the key comes from, and whether that place is private.
fn key_storage(path: &Path, config: &Config) -> Check {
    const NAME: &str = "key storage";
    let env_var = |key: &str| {
        let name = format!("{ENV_PREFIX}{ENV_SEPARATOR}IDENTITY{ENV_SEPARATOR}{key}");
        std::env::var(name).ok().filter(|v| !v.is_empty())
    };
    let file_identity = config
        .file
        .as_ref()
        .and_then(|file| std::fs::read_to_string(file).ok())
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|table| table.get("identity").and_then(|v| v.as_table()).cloned())
        .unwrap_or_default();
    let in_file = |key: &str| {
        file_identity
            .get(key)
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    if let Some(key_file) = env_var("KEY_FILE").or_else(|| in_file("key_file")) {
        // Config::load refused the file unless it is private; say what it is.
        let mode = file_mode(Path::new(&key_file))
            .map(|m| format!("mode {m:04o}"))
            .unwrap_or_else(|| "mode unknown".into());
        return Check::ok(NAME, format!("key file {key_file} ({mode})"));
    }
    if let Some(var) = env_var("KEY_ENV").or_else(|| in_file("key_env")) {
        return Check::ok(
            NAME,
            format!("the key comes from environment variable {var}"),
        );
    }
    let key_in_file = env_var("KEY").is_none()
        && env_var("CONNECTION_STRING").is_none()
        && (in_file("key").is_some() || in_file("connection_string").is_some());
    if !key_in_file {
        return Check::ok(NAME, "the key comes from the environment");
    }
    match file_mode(path) {
        Some(mode) if mode & 0o077 != 0 => Check::warn(
            NAME,
            format!(
                "{} holds the device key and group or others may read it (mode {mode:04o})",
                path.display()
            ),
            format!(
                "chmod 600 {}, or keep the key in identity.key_file or identity.key_env",
                path.display()
            ),
        ),
        Some(mode) => Check::ok(
            NAME,
            format!("the key is in {} (mode {mode:04o})", path.display()),
        ),
        None => Check::ok(NAME, format!("the key is in {}", path.display())),
    }
}

fn file_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o777)
}

async fn dns(host: &str, port: u16) -> (Check, Vec<SocketAddr>) {
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

async fn tcp(host: &str, port: u16, addrs: &[SocketAddr]) -> (Check, Option<TcpStream>) {
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

async fn tls_check(host: &str, port: u16, tcp: TcpStream, tls: Arc<rustls::ClientConfig>) -> Check {
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
async fn clock(
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
            .filter(|info| info.mqtt_port == mqtt_port)
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

/// Connects as the device with a fresh SAS token, reports the CONNACK, disconnects.
async fn authenticate(config: &Config, tls: Arc<rustls::ClientConfig>) -> Check {
    const NAME: &str = "authentication";
    let identity = &config.identity;
    let now = chrono::Utc::now().timestamp().max(0) as u64;
    let resource = sas::device_resource(&identity.host_name, &identity.device_id, None);
    let token = match sas::generate_token(&resource, identity.key.expose(), None, now + 300) {
        Ok(token) => token,
        Err(error) => {
            let hint = "the key must be the device's base64 SharedAccessKey";
            return Check::fail(NAME, format!("cannot sign a SAS token: {error}"), hint);
        }
    };
    let (host, port) = identity.connect_address();
    let mut options = MqttOptions::new(identity.device_id.clone(), host, port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_credentials(crate::agent::connection::username(identity), token)
        .set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 4);
    let outcome = tokio::time::timeout(STEP_TIMEOUT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(error) => return Err(error),
            }
        }
    })
    .await;
    match outcome {
        Ok(Ok(())) => {
            let _ = client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while eventloop.poll().await.is_ok() {}
            })
            .await;
            let detail = format!(
                "CONNACK 0 (accepted): the hub accepted device {}'s key; disconnected",
                identity.device_id
            );
            Check::ok(NAME, detail)
        }
        Ok(Err(ConnectionError::ConnectionRefused(code))) => {
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
            format!("the MQTT connection failed: {error}"),
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

/// What the check shows of a certificate.
#[derive(Debug, PartialEq)]
pub struct CertificateSummary {
    pub subject: String,
    pub issuer: String,
    pub not_after: chrono::DateTime<chrono::Utc>,
}

/// Reads subject, issuer and notAfter from an X.509 certificate (DER); rustls has verified
/// it already, this only describes it. `None` if it does not parse.
pub fn certificate_summary(der: &[u8]) -> Option<CertificateSummary> {
    let (_, certificate, _) = der_read(der)?;
    let (_, mut tbs, _) = der_read(certificate)?;
    let mut next = || {
        let (tag, content, rest) = der_read(tbs)?;
        tbs = rest;
        Some((tag, content))
    };
    let (mut tag, _) = next()?;
    if tag == 0xa0 {
        // [0] version, then the serial number.
        (tag, _) = next()?;
    }
    if tag != 0x02 {
        return None;
    }
    let _signature = next()?;
    let (_, issuer) = next()?;
    let (_, validity) = next()?;
    let (_, subject) = next()?;
    let (_, _, after_not_before) = der_read(validity)?;
    let (time_tag, not_after, _) = der_read(after_not_before)?;
    Some(CertificateSummary {
        subject: der_name(subject)?,
        issuer: der_name(issuer)?,
        not_after: der_time(time_tag, not_after)?,
    })
}

/// One DER element: (tag, content, what follows).
fn der_read(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let length = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let mut length = 0usize;
        for &byte in &rest[..count] {
            length = (length << 8) | usize::from(byte);
        }
        rest = &rest[count..];
        length
    };
    if rest.len() < length {
        return None;
    }
    Some((tag, &rest[..length], &rest[length..]))
}

/// A Name as `CN=..., O=...` (the usual attributes; others are skipped).
fn der_name(mut name: &[u8]) -> Option<String> {
    let mut parts = Vec::new();
    while !name.is_empty() {
        let (_, set, rest) = der_read(name)?;
        name = rest;
        let (_, attribute, _) = der_read(set)?;
        let (_, oid, value) = der_read(attribute)?;
        let (_, text, _) = der_read(value)?;
        let label = match oid {
            [0x55, 0x04, 0x03] => "CN",
            [0x55, 0x04, 0x06] => "C",
            [0x55, 0x04, 0x07] => "L",
            [0x55, 0x04, 0x08] => "ST",
            [0x55, 0x04, 0x0a] => "O",
            [0x55, 0x04, 0x0b] => "OU",
            _ => continue,
        };
        parts.push(format!("{label}={}", String::from_utf8_lossy(text)));
    }
    if parts.is_empty() {
        Some("(no name)".to_string())
    } else {
        Some(parts.join(", "))
    }
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn der_time(tag: u8, content: &[u8]) -> Option<chrono::DateTime<chrono::Utc>> {
    let text = std::str::from_utf8(content).ok()?;
    let full = match tag {
        0x17 => {
            let year: u32 = text.get(..2)?.parse().ok()?;
            let century = if year >= 50 { "19" } else { "20" };
            format!("{century}{text}")
        }
        0x18 => text.to_string(),
        _ => return None,
    };
    let naive = chrono::NaiveDateTime::parse_from_str(&full, "%Y%m%d%H%M%SZ").ok()?;
    Some(naive.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_a_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "doctor test");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "simdevice");
        params.not_after = rcgen::date_time_ymd(2049, 12, 31);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.clone().self_signed(&key).unwrap();
        let summary = certificate_summary(cert.der()).unwrap();
        assert_eq!(summary.subject, "CN=doctor test, O=simdevice");
        assert_eq!(summary.issuer, summary.subject);
        assert_eq!(
            summary.not_after.format("%Y-%m-%d").to_string(),
            "2049-12-31"
        );
        params.not_after = rcgen::date_time_ymd(2051, 1, 2);
        let cert = params.self_signed(&key).unwrap();
        let summary = certificate_summary(cert.der()).unwrap();
        assert_eq!(
            summary.not_after.format("%Y-%m-%d").to_string(),
            "2051-01-02"
        );
        assert_eq!(certificate_summary(&cert.der()[..40]), None);
    }
}
