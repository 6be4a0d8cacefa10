//! `simdevice hub`: start the local IoT Hub, print how to reach it, run until SIGINT/SIGTERM.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::common::local_hub::default_state_dir;

use crate::common::exposition::MetricsError;
use crate::common::sdnotify::Daemon;
use crate::hub::capture::CaptureSettings;
use crate::hub::error::IotHubError;
use crate::hub::registry::DeviceSpec;
use crate::hub::{Hub, HubConfig, HubError};

#[derive(Debug, clap::Args)]
pub struct HubArgs {
    /// Directory for the hub's CA, keys, registry and twins [default: the per-user data directory]
    #[arg(long, env = "SIMDEVICE_HUB_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Address to listen on. Loopback by default; anything else exposes the hub to the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: IpAddr,
    /// Port for device MQTT over TLS (0 picks a free port, reported in hub.json).
    #[arg(long, default_value_t = crate::protocol::MQTT_TLS_PORT)]
    pub mqtt_port: u16,
    /// Port for the service REST API over HTTPS (0 picks a free port).
    #[arg(long, default_value_t = crate::common::local_hub::DEFAULT_API_PORT)]
    pub api_port: u16,
    /// Port for the local Device Provisioning Service's device endpoint, MQTT over TLS (0 picks
    /// a free port, reported in hub.json as dps_port) [default: 8884, or a free port when
    /// --mqtt-port is 0]
    #[arg(long)]
    pub dps_port: Option<u16>,
    /// The DPS id scope [default: one made at first start and kept in the state].
    #[arg(long)]
    pub id_scope: Option<String>,
    /// Extra host name for the server certificate (repeatable).
    #[arg(long = "hostname")]
    pub hostnames: Vec<String>,
    /// Register any device whose key derives from the hub's group key on its first connect.
    #[arg(long)]
    pub auto_register: bool,
    /// With --auto-register: the group key (base64) to use instead of the one the hub made
    /// and keeps in its state, so that devices elsewhere can derive their keys from a key
    /// you hand out (a Kubernetes Secret, for example).
    #[arg(
        long,
        requires = "auto_register",
        env = "SIMDEVICE_HUB_GROUP_KEY",
        hide_env_values = true
    )]
    pub group_key: Option<String>,
    /// Register this device at start-up if it does not exist yet (repeatable).
    #[arg(long = "device")]
    pub devices: Vec<String>,
    /// Archive every accepted telemetry message into Avro files in this directory, as Azure's
    /// Event Hubs Capture (or IoT Hub routing to storage) writes them [default: off]. Blob
    /// Storage destinations (azure://CONTAINER, https://) are not built yet.
    #[arg(long, value_name = "DIR", env = "SIMDEVICE_HUB_CAPTURE")]
    pub capture: Option<String>,
    /// With --capture: the file format, `eventhubs` (Event Hubs Capture's EventData) or
    /// `iothub` (IoT Hub routing's Message).
    #[arg(
        long,
        default_value = "eventhubs",
        requires = "capture",
        env = "SIMDEVICE_HUB_CAPTURE_FORMAT"
    )]
    pub capture_format: crate::hub::capture::Format,
    /// With --capture: the Avro codec, `deflate` or `null`.
    #[arg(
        long,
        default_value = "deflate",
        requires = "capture",
        env = "SIMDEVICE_HUB_CAPTURE_CODEC"
    )]
    pub capture_codec: crate::hub::capture::Codec,
    /// With --capture: a window closes after this many seconds (Azure allows 60..900; shorter
    /// is for tests), or at --capture-window-bytes, whichever comes first.
    #[arg(long, default_value_t = crate::hub::capture::DEFAULT_WINDOW_SECS, requires = "capture",
          value_parser = clap::value_parser!(u64).range(1..), env = "SIMDEVICE_HUB_CAPTURE_WINDOW_SECS")]
    pub capture_window_secs: u64,
    /// With --capture: a window closes when its messages reach this many bytes.
    #[arg(long, default_value_t = crate::hub::capture::DEFAULT_WINDOW_BYTES, requires = "capture",
          value_parser = clap::value_parser!(u64).range(1..), env = "SIMDEVICE_HUB_CAPTURE_WINDOW_BYTES")]
    pub capture_window_bytes: u64,
    /// With --capture: write no file for a window without messages (Azure's skipEmptyArchives).
    #[arg(long, requires = "capture", env = "SIMDEVICE_HUB_CAPTURE_SKIP_EMPTY")]
    pub capture_skip_empty: bool,
    /// Serve /healthz and /metrics (Prometheus) over plain HTTP at this address, e.g.
    /// 127.0.0.1:9101 [default: off]
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Why `simdevice hub` could not run. `main` prints it with its source chain and exits 78 when
/// [`HubCommandError::is_config`] says the configuration is at fault.
#[derive(Debug, thiserror::Error)]
pub enum HubCommandError {
    #[error("the hub cannot start")]
    Hub(#[from] HubError),
    #[error("cannot register --device {id}")]
    Device {
        id: String,
        #[source]
        source: IotHubError,
    },
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// `--capture` names a destination this build cannot write to.
    #[error("--capture {dest}: {reason}")]
    CaptureDest { dest: String, reason: &'static str },
}

impl HubCommandError {
    /// A configuration the hub cannot run with (exit 78: systemd does not restart-loop on it).
    /// A metrics address in use is not: the port may free up, so a restart can help. The same
    /// rule as the hub's own listeners ([`HubError::is_config`]).
    pub fn is_config(&self) -> bool {
        match self {
            HubCommandError::Hub(error) => error.is_config(),
            HubCommandError::Device { .. } | HubCommandError::CaptureDest { .. } => true,
            HubCommandError::Metrics(MetricsError::Bind { source, .. }) => matches!(
                source.kind(),
                std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::PermissionDenied
            ),
        }
    }
}

/// `--capture` and its options as the hub's settings; Blob Storage destinations are refused.
fn capture_settings(args: &HubArgs) -> Result<Option<CaptureSettings>, HubCommandError> {
    let Some(dest) = &args.capture else {
        return Ok(None);
    };
    let refuse = |reason| HubCommandError::CaptureDest {
        dest: dest.clone(),
        reason,
    };
    if dest.starts_with("azure://") || dest.starts_with("https://") {
        return Err(refuse(
            "capture to Azure Blob Storage is not built yet; give a directory",
        ));
    }
    if dest.contains("://") {
        return Err(refuse(
            "not a directory, and not a destination this hub knows",
        ));
    }
    if dest.is_empty() {
        return Err(refuse("an empty path"));
    }
    Ok(Some(CaptureSettings {
        dir: PathBuf::from(dest),
        format: args.capture_format,
        codec: args.capture_codec,
        window: std::time::Duration::from_secs(args.capture_window_secs),
        window_bytes: args.capture_window_bytes,
        skip_empty: args.capture_skip_empty,
    }))
}

/// `--dps-port`, or its default: 8884, except that a hub asked for a free MQTT port (tests,
/// scripts, a second hub beside the first) takes a free DPS port too, so that two such hubs
/// never contend for 8884.
fn dps_port(given: Option<u16>, mqtt_port: u16) -> u16 {
    match (given, mqtt_port) {
        (Some(port), _) => port,
        (None, 0) => 0,
        (None, _) => crate::common::local_hub::DEFAULT_DPS_PORT,
    }
}

pub async fn run(args: HubArgs) -> Result<(), HubCommandError> {
    let capture = capture_settings(&args)?;
    let state_dir = args.state_dir.unwrap_or_else(default_state_dir);
    let hub = Hub::start(HubConfig {
        state_dir: state_dir.clone(),
        bind: args.bind,
        mqtt_port: args.mqtt_port,
        api_port: args.api_port,
        hostnames: args.hostnames,
        auto_register: args.auto_register,
        group_key: args.group_key,
        capture,
        dps_port: Some(dps_port(args.dps_port, args.mqtt_port)),
        id_scope: args.id_scope,
    })
    .await?;
    for id in &args.devices {
        if !hub.state().registry.contains(id) {
            hub.state()
                .registry
                .create(DeviceSpec::enabled(id))
                .map_err(|source| HubCommandError::Device {
                    id: id.clone(),
                    source,
                })?;
        }
    }
    let metrics_stop = tokio_util::sync::CancellationToken::new();
    let metrics = serve_metrics(&hub, args.metrics_listen, &metrics_stop).await?;
    print_banner(&hub, &state_dir, metrics);
    // systemd (Type=notify): ready once both listeners are bound. The watchdog task runs on
    // the runtime that serves every connection, so its pings stop when that runtime stalls,
    // and when an accept loop or the job scheduler has died (`Hub::health`).
    let systemd = Daemon::from_env();
    let stop_watchdog = tokio_util::sync::CancellationToken::new();
    let health = hub.health_probe();
    let healthy = move || {
        health()
            .inspect_err(|reason| tracing::error!(%reason, "the hub is unhealthy"))
            .is_ok()
    };
    systemd.ready("hub running", healthy, &stop_watchdog);
    wait_for_signal().await;
    tracing::info!("stopping the hub");
    metrics_stop.cancel();
    systemd.stopping();
    stop_watchdog.cancel();
    hub.shutdown().await;
    Ok(())
}

/// Starts `/healthz` and `/metrics` when `--metrics-listen` asks for them; returns where.
async fn serve_metrics(
    hub: &Hub,
    listen: Option<std::net::SocketAddr>,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<Option<std::net::SocketAddr>, MetricsError> {
    let Some(addr) = listen else {
        return Ok(None);
    };
    let source = std::sync::Arc::new(crate::hub::metrics::HubMetrics {
        state: hub.state().clone(),
        stopping: stop.clone(),
    });
    let server = crate::common::exposition::serve(addr, source, stop.clone()).await?;
    Ok(Some(server.local_addr))
}

/// What a user needs to reach the hub; connection strings carry keys, so they go to stdout
/// (the user's terminal), never to the log.
fn print_banner(hub: &Hub, state_dir: &std::path::Path, metrics: Option<std::net::SocketAddr>) {
    let info = hub.info();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "simdevice hub is running");
    let _ = writeln!(out, "  host name:        {}", info.hostname);
    let _ = writeln!(out, "  device MQTT/TLS:  {}", hub.mqtt_addr());
    let _ = writeln!(out, "  service HTTPS:    {}", hub.api_addr());
    let _ = writeln!(out, "  trust this CA:    {}", info.ca_file.display());
    if let (Some(addr), Some(scope)) = (hub.dps_addr(), &info.id_scope) {
        let _ = writeln!(out, "  DPS MQTT/TLS:     {addr} (id scope {scope})");
    }
    if let Some(addr) = metrics {
        let _ = writeln!(
            out,
            "  metrics:          http://{addr}/metrics and /healthz"
        );
    }
    let _ = writeln!(
        out,
        "  state directory:  {} (hub.json has all of this)",
        state_dir.display()
    );
    let _ = writeln!(out, "  service connection string (iothubowner):");
    let _ = writeln!(out, "    {}", info.service_connection_string);
    if let Some(dps) = &info.dps_service_connection_string {
        let _ = writeln!(
            out,
            "  DPS service connection string (provisioningserviceowner):"
        );
        let _ = writeln!(out, "    {dps}");
    }
    if let Some(capture) = &info.capture {
        let _ = writeln!(
            out,
            "  capture:          {} ({}, {}, {} s or {} bytes)",
            capture.dest, capture.format, capture.codec, capture.window_secs, capture.window_bytes
        );
    }
    if info.group_key.is_some() {
        let _ = writeln!(out, "  auto-register: on (group key in hub.json)");
    }
    let ids = hub.state().registry.ids();
    if ids.is_empty() {
        let _ = writeln!(
            out,
            "  no devices yet: `simdevice service --local device create ID`"
        );
    } else {
        let _ = writeln!(out, "  devices:");
        for id in ids {
            if let Some(cs) = hub.device_connection_string(&id) {
                let _ = writeln!(out, "    {id}: {cs}");
            }
        }
    }
    let _ = writeln!(out, "Press Ctrl-C to stop.");
    let _ = out.flush();
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the hub");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::dps_port;

    #[test]
    fn the_dps_port_defaults_to_8884_unless_the_mqtt_port_is_free() {
        assert_eq!(dps_port(None, 8883), 8884);
        assert_eq!(dps_port(None, 0), 0);
        assert_eq!(dps_port(Some(9000), 0), 9000);
        assert_eq!(dps_port(Some(0), 8883), 0);
    }
}
