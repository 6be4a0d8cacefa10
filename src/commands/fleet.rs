//! `simdevice fleet`: many full devices in one process, one shard of a device range, and
//! `simdevice fleet merge-reports` to sum the shards' reports into one.
//!
//! Where the devices are comes from one of `--local` (the local hub's `hub.json`, its CA and
//! group key), `--host` with `--group-key` (a real hub; keys derived per device), or
//! `--devices FILE` (one connection string per line). Which slice is ours comes from
//! `--shard-index`/`--shard-count`, or `JOB_COMPLETION_INDEX` (a Kubernetes Indexed Job).
//! Everything is checked before the first device connects: a bad shard, count, file or key is
//! a [`FleetCommandError`] with `is_config` (exit 78). SIGTERM/SIGINT stop the run, which
//! drains and writes the report all the same.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::common::exposition::MetricsError;
use crate::common::local_hub::{default_state_dir, HubInfo, HubInfoError};
use crate::common::template::{Template, TemplateError};
use crate::config::{ConfigError, Proxy, ProxyUrlError, Transport};
use crate::fleet::devices::{self, DevicesError, FleetDevice};
use crate::fleet::metrics::FleetMetrics;
use crate::fleet::progress::Progress;
use crate::fleet::report::{Devices, Report, Shards};
use crate::fleet::run::{Fleet, FleetError, FleetSettings};
use crate::fleet::shard::{IdRange, Shard, ShardError, SHARD_INDEX_ENV};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct FleetArgs {
    #[command(subcommand)]
    pub command: Option<FleetCommand>,
    #[command(flatten)]
    pub run: FleetRunArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum FleetCommand {
    /// Merge the reports of a fleet's shards into one (counts summed, latency histograms
    /// merged, so the percentiles are those of the whole run).
    MergeReports {
        /// The shards' report files.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
        /// Where to write the merged report [default: stdout].
        #[arg(long)]
        output: Option<PathBuf>,
        /// Merge even when some shards' reports are missing (the result says which).
        #[arg(long)]
        partial: bool,
    },
}

#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("hub").required(true).args(["local", "host", "devices", "dps"]))]
#[command(group = clap::ArgGroup::new("credential").args(["group_key", "x509_ca"]))]
pub struct FleetRunArgs {
    /// Run against the local hub (`simdevice hub --auto-register`): its hub.json gives the
    /// address, the CA and the group key.
    #[arg(long)]
    pub local: bool,
    /// With --local: the hub's state directory [default: the per-user data directory].
    #[arg(long, requires = "local", env = "SIMDEVICE_HUB_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// The IoT Hub host name (a real hub, or a local one by name).
    #[arg(long, requires = "credential")]
    pub host: Option<String>,
    /// The group key (base64): each device's key is derived from it and the device id with
    /// the DPS group-enrollment derivation.
    #[arg(long, env = "SIMDEVICE_GROUP_KEY", hide_env_values = true)]
    pub group_key: Option<String>,
    /// Where to connect instead of --host (or the hub DPS assigns), keeping that name in the
    /// tokens (`host:port`).
    #[arg(long)]
    pub gateway: Option<String>,
    /// Provision every device of the slice through the Device Provisioning Service of this id
    /// scope before it connects (registration id = device id, key derived from --group-key,
    /// the enrollment group's key; or with --x509-ca, the device's certificate).
    #[arg(long, value_name = "ID_SCOPE", requires = "credential", conflicts_with_all = ["local", "host", "devices"])]
    pub dps: Option<String>,
    /// With --dps: the DPS device endpoint (`host[:port]`; the port of --transport by default:
    /// 8883 for mqtt, 443 for websocket). Dialled with --transport and --proxy, as the hub.
    #[arg(long, requires = "dps", default_value = crate::protocol::dps::GLOBAL_ENDPOINT)]
    pub dps_endpoint: String,
    /// With --dps: registrations started per second (0: as fast as IN_FLIGHT allows).
    #[arg(long, requires = "dps", default_value_t = 10.0)]
    pub dps_rate: f64,
    /// A CA certificate (PEM) to trust besides the public roots.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// X.509 devices instead of a group key: each device's certificate (CN = its id) is
    /// issued in memory at start by this CA certificate (PEM, with --x509-ca-key). The hub
    /// must trust the CA and have the devices as `certificateAuthority` (`service certificate
    /// add`), or, with --dps, an X.509 enrollment group must name it (`service dps
    /// enrollment-group create --x509-ca NAME | --certificate FILE`).
    #[arg(long, value_name = "FILE", requires = "x509_ca_key", conflicts_with_all = ["devices", "group_key"])]
    pub x509_ca: Option<PathBuf>,
    /// The private key of --x509-ca (PKCS#8 PEM).
    #[arg(long, value_name = "FILE", requires = "x509_ca")]
    pub x509_ca_key: Option<PathBuf>,
    /// One device connection string per line (blank lines and `#` comments skipped), instead
    /// of a prefix and a range; the shards split the lines.
    #[arg(long, conflicts_with_all = ["prefix", "first", "count"])]
    pub devices: Option<PathBuf>,
    /// Device ids: PREFIX + the number, zero-padded to the width of the last id.
    #[arg(long, default_value = "door-")]
    pub prefix: String,
    /// Devices in the whole range (all shards together).
    #[arg(long, default_value_t = 100)]
    pub count: u64,
    /// The first device number.
    #[arg(long, default_value_t = 1)]
    pub first: u64,
    /// This shard's index, 0-based [default: $JOB_COMPLETION_INDEX, else 0].
    #[arg(long)]
    pub shard_index: Option<u64>,
    /// The number of shards the range is split into [default: 1].
    #[arg(long)]
    pub shard_count: Option<u64>,
    /// Seconds between two readings of a device; 0: as fast as the hub acknowledges.
    #[arg(long, default_value_t = 10.0)]
    pub interval_secs: f64,
    /// Readings per device; the run ends once each is acknowledged (or dropped).
    #[arg(long)]
    pub messages: Option<u64>,
    /// Run this many seconds, then stop.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Devices started per second (jittered); 0: all at once.
    #[arg(long, default_value_t = 100.0)]
    pub connect_rate: f64,
    /// The seed of every device's simulation [default: drawn, and logged at start].
    #[arg(long)]
    pub seed: Option<u64>,
    /// A telemetry template (JSON) every device renders instead of the environment reading.
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// Where to write the run report (JSON) [default: stdout].
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Serve the fleet's /metrics and /healthz on this address.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// How the devices reach the hub: `mqtt` (MQTT over TLS, port 8883) or `websocket` (MQTT
    /// over WebSocket, port 443 unless the gateway names one; with --local, the hub's ws_port).
    #[arg(long, default_value = "mqtt", value_parser = parse_transport)]
    pub transport: Transport,
    /// An HTTP proxy to tunnel every connection through with CONNECT, http://[user:password@]host:port
    /// [default: $HTTPS_PROXY (or $https_proxy) unless $NO_PROXY lists the hub's host]
    #[arg(long)]
    pub proxy: Option<String>,
}

fn parse_transport(text: &str) -> Result<Transport, String> {
    Transport::parse(text).ok_or_else(|| format!("{text:?} is not mqtt or websocket"))
}

#[derive(Debug, thiserror::Error)]
pub enum FleetCommandError {
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error(transparent)]
    Devices(#[from] DevicesError),
    #[error("--local: cannot use the local hub in {}", state_dir.display())]
    LocalHub {
        state_dir: PathBuf,
        #[source]
        source: HubInfoError,
    },
    #[error("--local: the hub in {} has no group key: start it with --auto-register, or use --devices", state_dir.display())]
    NoGroupKey { state_dir: PathBuf },
    #[error("--{flag} must be {what}, not {value}")]
    BadNumber {
        flag: &'static str,
        what: &'static str,
        value: f64,
    },
    #[error("--messages must be at least 1")]
    ZeroMessages,
    #[error("--proxy is not a usable proxy URL")]
    Proxy(#[source] ProxyUrlError),
    /// HTTPS_PROXY (or https_proxy) holds no usable proxy URL.
    #[error(transparent)]
    ProxyEnv(ConfigError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error("--dps-endpoint {0:?} is not host[:port]")]
    DpsEndpoint(String),
    #[error("cannot set up TLS for DPS")]
    DpsTls(#[source] crate::agent::AgentError),
    /// A device of the slice could not be provisioned (its reason is the source).
    #[error(transparent)]
    Provision(#[from] crate::fleet::provision::FleetProvisionError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Report(#[from] crate::fleet::report::ReadError),
    #[error(transparent)]
    Merge(#[from] crate::fleet::report::MergeError),
    /// The report is written all the same; a shard that reached nothing must not look done
    /// to the engine that ran it.
    #[error("none of the {devices} devices connected (see the report's errors)")]
    NothingConnected { devices: u64 },
    /// Checked before the run: a report that could not be written at its end would lose it.
    #[error("--report {}: cannot write there", path.display())]
    ReportPath {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the report to {}", path.display())]
    WriteReport {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FleetCommandError {
    /// Bad input (exit 78): everything but a metrics port that cannot be bound, a report
    /// that cannot be written, or a machine that fails.
    pub fn is_config(&self) -> bool {
        match self {
            FleetCommandError::Fleet(error) => error.is_config(),
            FleetCommandError::Provision(_) => false,
            FleetCommandError::Metrics(_)
            | FleetCommandError::WriteReport { .. }
            | FleetCommandError::NothingConnected { .. } => false,
            _ => true,
        }
    }
}

pub async fn run(args: FleetArgs) -> Result<(), FleetCommandError> {
    match args.command {
        Some(FleetCommand::MergeReports {
            reports,
            output,
            partial,
        }) => merge_reports(&reports, output.as_deref(), partial),
        None => run_fleet(args.run).await,
    }
}

fn merge_reports(
    paths: &[PathBuf],
    output: Option<&Path>,
    partial: bool,
) -> Result<(), FleetCommandError> {
    let reports = paths
        .iter()
        .map(|path| Ok((path.clone(), Report::read(path)?)))
        .collect::<Result<Vec<_>, FleetCommandError>>()?;
    let merged = crate::fleet::report::merge(&reports, partial)?;
    write_report(&merged.to_json_pretty(), output)
}

fn write_report(json: &str, path: Option<&Path>) -> Result<(), FleetCommandError> {
    match path {
        Some(path) => std::fs::write(path, json).map_err(|source| FleetCommandError::WriteReport {
            path: path.to_path_buf(),
            source,
        }),
        None => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            out.write_all(json.as_bytes())
                .map_err(|source| FleetCommandError::WriteReport {
                    path: PathBuf::from("stdout"),
                    source,
                })
        }
    }
}

/// Checks every argument, builds every device, then runs and writes the report.
async fn run_fleet(args: FleetRunArgs) -> Result<(), FleetCommandError> {
    let positive = |flag, value: f64| {
        if value.is_finite() && value >= 0.0 {
            Ok(value)
        } else {
            Err(FleetCommandError::BadNumber {
                flag,
                what: "a number of seconds, 0 or more",
                value,
            })
        }
    };
    let interval = Duration::from_secs_f64(positive("interval-secs", args.interval_secs)?);
    let duration = args
        .duration
        .map(|d| positive("duration", d).map(Duration::from_secs_f64))
        .transpose()?;
    if !(args.connect_rate.is_finite() && args.connect_rate >= 0.0) {
        return Err(FleetCommandError::BadNumber {
            flag: "connect-rate",
            what: "devices per second, 0 (unlimited) or more",
            value: args.connect_rate,
        });
    }
    if args.messages == Some(0) {
        return Err(FleetCommandError::ZeroMessages);
    }
    let shard = Shard::resolve(
        args.shard_index,
        args.shard_count,
        std::env::var(SHARD_INDEX_ENV).ok(),
    )?;
    if let Some(path) = &args.report {
        // Opened (not truncated) now, written at the end: a run is not lost to a bad path.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| FleetCommandError::ReportPath {
                path: path.clone(),
                source,
            })?;
    }
    let (devices, ca_file, range) = select_devices(&args, shard)?;
    let devices = match &args.dps {
        Some(id_scope) => provision_slice(&args, id_scope, devices, ca_file.as_deref()).await?,
        None => devices,
    };
    let proxy = match &args.proxy {
        Some(url) => Some(Proxy::parse(url).map_err(FleetCommandError::Proxy)?),
        // The environment's, as `simdevice run` takes it; NO_PROXY checked against the
        // first device's host (a fleet's devices share one hub).
        None => match devices.first() {
            Some(device) => {
                let (host, _) = device.identity(None).dial_address(args.transport);
                Proxy::from_env(&process_env(), &host).map_err(FleetCommandError::ProxyEnv)?
            }
            None => None,
        },
    };
    let template = args
        .template
        .as_deref()
        .map(Template::load)
        .transpose()?
        .map(std::sync::Arc::new);
    let seed = args.seed.unwrap_or_else(rand::random);
    let fleet = Fleet::new(FleetSettings {
        devices,
        ca_file,
        interval,
        messages: args.messages,
        duration,
        connect_rate: (args.connect_rate > 0.0).then_some(args.connect_rate),
        seed,
        template,
        transport: args.transport,
        proxy,
    })?;
    tracing::info!(
        shard = %format!("{}/{}", shard.index(), shard.count()),
        first = %range.first, last = %range.last, devices = range.count, seed,
        "fleet starting"
    );
    let stop = CancellationToken::new();
    let metrics_stop = CancellationToken::new();
    if let Some(addr) = args.metrics_listen {
        let source = std::sync::Arc::new(FleetMetrics { view: fleet.view() });
        crate::common::exposition::serve(addr, source, metrics_stop.clone()).await?;
    }
    let signals = tokio::spawn(wait_for_signal(stop.clone()));
    let started_at = chrono::Utc::now();
    let mut progress = Progress::new(std::io::stderr().is_terminal());
    let (ending, view) = fleet.run(stop, |view| progress.tick(view)).await;
    signals.abort();
    metrics_stop.cancel();
    progress.finish();
    let ended_at = chrono::Utc::now();
    tracing::info!(ending = ?ending, "fleet stopped");
    let s = view.snapshot();
    let report = Report {
        shard: Shards::One(shard),
        devices: range,
        connected: s.connected,
        twins_fetched: s.twins_fetched,
        connectivity_reported: s.connectivity_reported,
        readings_sent: s.readings_sent,
        readings_acknowledged: s.readings_acknowledged,
        methods_answered: s.methods_answered,
        desired_applied: s.desired_applied,
        cloud_to_device: s.cloud_to_device,
        reconnects: s.reconnects,
        errors: s.errors,
        ack_latency: view.latency(),
        started_at,
        ended_at,
    };
    write_report(&report.to_json_pretty(), args.report.as_deref())?;
    if report.connected == 0 {
        return Err(FleetCommandError::NothingConnected {
            devices: report.devices.count,
        });
    }
    Ok(())
}

/// The first and last device ids of this shard and their count, for the report.
fn span(devices: &[FleetDevice]) -> Devices {
    Devices {
        first: devices
            .first()
            .map(|d| d.device_id.clone())
            .unwrap_or_default(),
        last: devices
            .last()
            .map(|d| d.device_id.clone())
            .unwrap_or_default(),
        count: devices.len() as u64,
    }
}

/// This shard's devices, the CA to trust, and their span.
fn select_devices(
    args: &FleetRunArgs,
    shard: Shard,
) -> Result<(Vec<FleetDevice>, Option<PathBuf>, Devices), FleetCommandError> {
    if let Some(path) = &args.devices {
        let all = devices::from_file(path)?;
        // The lines are split as a range 0.. is: the same contiguous, balanced slices.
        let lines = IdRange {
            prefix: String::new(),
            first: 0,
            count: all.len() as u64,
        };
        let slice = lines.slice(shard)?;
        let mine: Vec<FleetDevice> = all
            .into_iter()
            .skip(slice.first() as usize)
            .take(slice.count() as usize)
            .collect();
        let span = span(&mine);
        return Ok((mine, args.ca_file.clone(), span));
    }
    let range = IdRange {
        prefix: args.prefix.clone(),
        first: args.first,
        count: args.count,
    };
    let slice = range.slice(shard)?;
    let ids = slice.ids();
    let (host, gateway, group_key, ca_file) = if args.local {
        let state_dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
        let info = HubInfo::read(&state_dir).map_err(|source| FleetCommandError::LocalHub {
            state_dir: state_dir.clone(),
            source,
        })?;
        // X.509 devices need no group key.
        let group_key = match (info.group_key.clone(), &args.x509_ca) {
            (Some(group_key), _) => group_key,
            (None, Some(_)) => String::new(),
            (None, None) => return Err(FleetCommandError::NoGroupKey { state_dir }),
        };
        let port = match args.transport {
            Transport::WebSocket if info.ws_port != 0 => info.ws_port,
            _ => info.mqtt_port,
        };
        let gateway = format!("{}:{}", info.hostname, port);
        (
            info.hostname,
            Some(gateway),
            group_key,
            Some(args.ca_file.clone().unwrap_or(info.ca_file)),
        )
    } else {
        (
            args.host.clone().unwrap_or_default(),
            args.gateway.clone(),
            args.group_key.clone().unwrap_or_default(),
            args.ca_file.clone(),
        )
    };
    let devices = match (&args.x509_ca, &args.x509_ca_key) {
        (Some(certificate), Some(key)) => {
            let ca =
                crate::fleet::x509::FleetCa::load(certificate, key).map_err(DevicesError::from)?;
            devices::from_ca(ids, &host, gateway.as_deref(), &ca)?
        }
        _ => devices::from_group_key(ids, &host, gateway.as_deref(), &group_key)?,
    };
    let span = span(&devices);
    Ok((devices, ca_file, span))
}

/// `--dps`: the slice registered with DPS, as assigned (stopped by SIGTERM or SIGINT).
async fn provision_slice(
    args: &FleetRunArgs,
    id_scope: &str,
    devices: Vec<FleetDevice>,
    ca_file: Option<&Path>,
) -> Result<Vec<FleetDevice>, FleetCommandError> {
    if !(args.dps_rate.is_finite() && args.dps_rate >= 0.0) {
        return Err(FleetCommandError::BadNumber {
            flag: "dps-rate",
            what: "registrations per second, 0 (unlimited) or more",
            value: args.dps_rate,
        });
    }
    let (host, port) = match args.dps_endpoint.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => (
            host.to_string(),
            port.parse::<u16>()
                .map_err(|_| FleetCommandError::DpsEndpoint(args.dps_endpoint.clone()))?,
        ),
        // DPS listens where the hub does: 8883 for MQTT, 443 for WebSocket.
        None if !args.dps_endpoint.is_empty() => {
            (args.dps_endpoint.clone(), args.transport.default_port())
        }
        _ => return Err(FleetCommandError::DpsEndpoint(args.dps_endpoint.clone())),
    };
    // `--proxy`, else the environment's unless NO_PROXY lists DPS's host.
    let proxy = match &args.proxy {
        Some(url) => Some(Proxy::parse(url).map_err(FleetCommandError::Proxy)?),
        None => Proxy::from_env(&process_env(), &host).map_err(FleetCommandError::ProxyEnv)?,
    };
    let settings = crate::fleet::provision::DpsSettings {
        host,
        port,
        transport: args.transport,
        proxy,
        id_scope: id_scope.to_string(),
        tls: crate::agent::client_tls(ca_file).map_err(FleetCommandError::DpsTls)?,
        rate: args.dps_rate,
        gateway_host_name: args.gateway.clone(),
        deadline: Duration::from_secs(30),
    };
    tracing::info!(
        devices = devices.len(),
        rate = args.dps_rate,
        "provisioning the slice through DPS"
    );
    let stop = CancellationToken::new();
    let signals = tokio::spawn(wait_for_signal(stop.clone()));
    let provisioned = crate::fleet::provision::provision_all(devices, &settings, &stop).await;
    signals.abort();
    Ok(provisioned?)
}

/// The process's environment (names and values that are text), for HTTPS_PROXY and NO_PROXY.
fn process_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// Cancels `stop` on SIGTERM or SIGINT.
async fn wait_for_signal(stop: CancellationToken) {
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping the fleet: draining, then writing the report");
    stop.cancel();
}
