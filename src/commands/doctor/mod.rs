//! `simdevice doctor`: walks the path from the configuration to an authenticated MQTT
//! connection and says where it breaks: the configuration, where the key is kept, DNS, TCP to
//! the MQTT port (to the proxy, and then its CONNECT tunnel, when one is set), the TLS
//! handshake and certificate chain, the WebSocket upgrade (with `transport = "websocket"`),
//! the clock against the hub's, and SAS authentication (a connect and disconnect). Each check prints `[ok]`, `[warn]` or `[FAIL]`
//! with a one-line hint; the exit code is 1 when any check failed.
//!
//! The network checks run in order and stop at the first failure (a host that does not
//! resolve cannot be dialled). The authentication check connects as the device with a clean
//! session, so a running agent with the same identity is disconnected for a moment (IoT Hub
//! keeps one connection per device) and reconnects by itself. Nothing here prints a key.
//!
//! With `[provisioning]` the DPS endpoint comes first (`dps`: DNS, TCP, proxy, TLS, WebSocket,
//! the registration's CONNECT, then the cached assignment or, with `--register`, a
//! registration), and the hub checks then dial the hub DPS assigned.
//!
//! Rooms: `local` (the configuration and where the key is kept), `network` (DNS, TCP, TLS,
//! clock, authentication), `certificate` (an X.509 device's certificate: expiry and key
//! match; `common::der` reads certificates), `dps` (the provisioning checks). This file
//! holds the arguments, the report and the order the checks run in.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::Config;
mod certificate;
mod dps;
mod https_date;
mod local;
mod network;

pub use crate::common::der::{certificate_summary, CertificateSummary};

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Configuration file [default: /etc/simdevice/config.toml]
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// For a local hub: its state directory, whose hub.json names the HTTPS port for the clock
    /// check [default: the per-user data directory]
    #[arg(long, env = "SIMDEVICE_HUB_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// With [provisioning]: register with DPS now (as the agent does; DPS may assign another
    /// hub) instead of checking the cached assignment; the cache is left as it is
    #[arg(long)]
    pub register: bool,
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
        Check::with_hint(name, Status::Warn, detail.into(), hint.into())
    }

    fn fail(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check::with_hint(name, Status::Fail, detail.into(), hint.into())
    }

    fn with_hint(name: &'static str, status: Status, detail: String, hint: String) -> Check {
        Check {
            name,
            status,
            detail,
            hint: Some(hint),
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
    let report = diagnose(
        args.config.as_deref(),
        Some(&state_dir),
        args.register,
        &mut out,
    )
    .await;
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
    register: bool,
    out: &mut dyn Write,
) -> Report {
    let mut report = Report::default();
    let config = match Config::load(config_path) {
        Ok(config) => {
            let source = match &config.file {
                Some(file) => file.display().to_string(),
                None => "the environment (no file)".to_string(),
            };
            let detail = match &config.provisioning {
                Some(p) => format!(
                    "{source}: registration {} with DPS at {}:{} (id scope {})",
                    p.registration_id, p.host, p.port, p.id_scope
                ),
                None => format!(
                    "{source}: device {} on {}",
                    config.identity.device_id, config.identity.host_name
                ),
            };
            record(out, &mut report, Check::ok("configuration", detail));
            config
        }
        Err(error) => {
            record(out, &mut report, local::config_failure(&error));
            finish(out, &report);
            return report;
        }
    };
    let path = config_path.unwrap_or(Path::new(crate::config::DEFAULT_CONFIG_PATH));
    // An X.509 device keeps no SAS key: its private key file is the certificate check's.
    match certificate::check(&config.identity) {
        Some(check) => record(out, &mut report, check),
        None => record(out, &mut report, local::key_storage(path, &config)),
    };
    let config = match config.provisioning.clone() {
        Some(p) => match provisioning(&config, &p, register, out, &mut report).await {
            Some(assigned) => assigned,
            None => {
                finish(out, &report);
                return report;
            }
        },
        None => config,
    };
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

/// The DPS endpoint, as `network` checks the hub's, then the registration's CONNECT and the
/// assignment; the configuration with the assigned identity, or `None` when a check failed
/// or no hub is known.
async fn provisioning(
    config: &Config,
    p: &crate::config::Provisioning,
    register: bool,
    out: &mut dyn Write,
    report: &mut Report,
) -> Option<Config> {
    let proxy = p.proxy.as_ref();
    let (first_host, first_port) = proxy.map_or((p.host.as_str(), p.port), |x| (&x.host, x.port));
    let (check, addrs) = network::dns(first_host, first_port).await;
    if !record(out, report, dps::as_dps(check)) {
        return None;
    }
    let (check, tcp) = network::tcp(first_host, first_port, &addrs).await;
    let passed = record(out, report, dps::as_dps(check));
    let mut tcp = tcp.filter(|_| passed)?;
    if let Some(proxy) = proxy {
        drop(tcp);
        let (check, tunnel) = network::proxy_connect(proxy, &p.host, p.port).await;
        let passed = record(out, report, dps::as_dps(check));
        tcp = tunnel.filter(|_| passed)?;
    }
    let tls = match crate::agent::client_tls(p.ca_file.as_deref()) {
        Ok(tls) => tls,
        Err(error) => {
            let hint = "check provisioning.ca_file (a PEM certificate)";
            record(out, report, Check::fail("DPS TLS", error.to_string(), hint));
            return None;
        }
    };
    let check = network::tls_check(&p.host, p.port, tcp, tls.clone()).await;
    if !record(out, report, dps::as_dps(check)) {
        return None;
    }
    let registration = dps::registration(config, p, tls);
    if config.connection.transport == crate::config::Transport::WebSocket {
        let check = network::websocket(&registration.dial(), "provisioning.global_endpoint").await;
        if !record(out, report, dps::as_dps(check)) {
            return None;
        }
    }
    if !record(out, report, dps::connect(&registration).await) {
        return None;
    }
    let (check, assignment) = dps::assignment(config, p, &registration, register).await;
    record(out, report, check);
    let assignment = assignment?;
    let mut assigned = config.clone();
    assigned.identity = p.assigned_identity(&assignment.assigned_hub, &assignment.device_id);
    Some(assigned)
}

/// DNS, TCP, TLS, clock and authentication; a failed DNS, TCP or TLS check stops the rest.
async fn network(
    config: &Config,
    hub_state_dir: Option<&Path>,
    out: &mut dyn Write,
    report: &mut Report,
) {
    let (host, port) = config.identity.dial_address(config.connection.transport);
    // Through a proxy, DNS and TCP are the proxy's; the proxy reaches the hub.
    let proxy = config.connection.proxy.as_ref();
    let (first_host, first_port) = proxy.map_or((host.as_str(), port), |p| (&p.host, p.port));
    let (check, addrs) = network::dns(first_host, first_port).await;
    if !record(out, report, check) {
        return;
    }
    let (check, tcp) = network::tcp(first_host, first_port, &addrs).await;
    if !record(out, report, check) {
        return;
    }
    let Some(mut tcp) = tcp else {
        return;
    };
    if let Some(proxy) = proxy {
        drop(tcp);
        let (check, tunnel) = network::proxy_connect(proxy, &host, port).await;
        if !record(out, report, check) {
            return;
        }
        let Some(tunnel) = tunnel else {
            return;
        };
        tcp = tunnel;
    }
    let tls = match crate::agent::client_tls_for(&config.identity) {
        Ok(tls) => tls,
        Err(error) => {
            let hint = "check identity.ca_file (a PEM certificate)";
            record(out, report, Check::fail("TLS", error.to_string(), hint));
            return;
        }
    };
    if !record(
        out,
        report,
        network::tls_check(&host, port, tcp, tls.clone()).await,
    ) {
        return;
    }
    if config.connection.transport == crate::config::Transport::WebSocket
        && !record(
            out,
            report,
            network::websocket(
                &crate::agent::transport::Dial::new(
                    &config.identity,
                    &config.connection,
                    tls.clone(),
                ),
                "identity.gateway_host_name",
            )
            .await,
        )
    {
        return;
    }
    // Through a proxy the hub's address is not known here, so not whether it is local.
    let peer = addrs.first().map(|a| a.ip()).filter(|_| proxy.is_none());
    // A wrong clock does not stop the last check: its CONNACK tells whether it matters yet.
    let check = network::clock(config, peer, port, hub_state_dir, tls.clone()).await;
    record(out, report, check);
    record(out, report, network::authenticate(config, tls).await);
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
    } else if report
        .checks
        .last()
        .is_some_and(|c| c.name == "DPS registration" && c.status == Status::Warn)
    {
        writeln!(
            out,
            "doctor: no failures, {warned} warning(s); the hub checks need an assignment (--register)"
        )
    } else if warned > 0 {
        writeln!(out, "doctor: no failures, {warned} warning(s)")
    } else {
        writeln!(out, "doctor: all {} checks passed", report.checks.len())
    };
}
