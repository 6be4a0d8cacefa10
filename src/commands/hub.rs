//! `simdevice hub`: start the local IoT Hub, print how to reach it, run until SIGINT/SIGTERM.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::common::local_hub::default_state_dir;

use crate::common::blob::{self, Location};
use crate::common::exposition::MetricsError;
use crate::common::sdnotify::Daemon;
use crate::hub::capture::{CaptureSettings, Destination, Encoding, Format};
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
    /// a free port; reported in hub.json as dps_port) [default: 8884, or a free port when 8884
    /// cannot be had]
    #[arg(long, env = "SIMDEVICE_HUB_DPS_PORT")]
    pub dps_port: Option<u16>,
    /// Port for the local DPS's device endpoint over WebSocket (TLS, path /$iothub/websocket,
    /// subprotocol mqtt; real DPS serves it on its own host's 443; 0 picks a free port;
    /// reported in hub.json as dps_ws_port) [default: 8444, or a free port when 8444 cannot
    /// be had]
    #[arg(long, env = "SIMDEVICE_HUB_DPS_WS_PORT")]
    pub dps_ws_port: Option<u16>,
    /// The DPS id scope [default: one made at first start and kept in the state].
    #[arg(long)]
    pub id_scope: Option<String>,
    /// Port for device MQTT over WebSocket (TLS, path /$iothub/websocket; 0 picks a free port)
    /// [default: 443; when 443 cannot be bound, a free port, with a warning]
    #[arg(long, env = "SIMDEVICE_HUB_WS_PORT")]
    pub ws_port: Option<u16>,
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
    /// Archive every accepted telemetry message into Avro files, as Azure's Event Hubs Capture
    /// (or IoT Hub routing to storage) writes them [default: off]. DEST is a directory;
    /// `azure://CONTAINER[/PREFIX]` with the storage account's connection string in
    /// AZURE_STORAGE_CONNECTION_STRING (`UseDevelopmentStorage=true` for Azurite); or
    /// `https://ACCOUNT.blob.core.windows.net/CONTAINER[/PREFIX]?SAS` (a SAS that may create
    /// blobs; `http://` only for a loopback emulator).
    #[arg(long, value_name = "DEST", env = "SIMDEVICE_HUB_CAPTURE")]
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
    /// With --capture-format iothub: routing's encoding, `avro` or `json` (one JSON object a
    /// line; --capture-codec does not apply). Event Hubs Capture writes Avro only.
    #[arg(
        long,
        default_value = "avro",
        requires = "capture",
        env = "SIMDEVICE_HUB_CAPTURE_ENCODING"
    )]
    pub capture_encoding: crate::hub::capture::Encoding,
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
    /// Port of the Event Hubs-compatible endpoint, AMQP over TLS [default: 5671, or a free port
    /// when 5671 cannot be had] (0 picks a free port).
    #[arg(long, value_name = "PORT", env = "SIMDEVICE_HUB_AMQP_PORT")]
    pub amqp_port: Option<u16>,
    /// Port of plain AMQP for clients in emulator mode (`UseDevelopmentEmulator=true`)
    /// [default: 5672, or a free port when 5672 cannot be had] (0 picks a free port). Keys and
    /// tokens cross it in clear, so it listens on loopback.
    #[arg(
        long,
        value_name = "PORT",
        conflicts_with = "no_amqp_plain",
        env = "SIMDEVICE_HUB_AMQP_PLAIN_PORT"
    )]
    pub amqp_plain_port: Option<u16>,
    /// Address of the plain AMQP port, to widen it past loopback deliberately.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    pub amqp_plain_bind: IpAddr,
    /// No plain AMQP port at all.
    #[arg(long)]
    pub no_amqp_plain: bool,
    /// A consumer group of the event hub besides $Default (repeatable).
    #[arg(long = "consumer-group", value_name = "NAME")]
    pub consumer_groups: Vec<String>,
    /// Partitions of the event hub; fixed once the state has events.
    #[arg(long, default_value_t = crate::hub::events::DEFAULT_PARTITIONS)]
    pub partitions: u32,
    /// Events are kept this many seconds (default one day).
    #[arg(long, default_value_t = crate::hub::events::DEFAULT_RETENTION.as_secs())]
    pub retention_secs: u64,
    /// At most this many events are kept per partition (the store's memory bound).
    #[arg(long, default_value_t = crate::hub::events::DEFAULT_MAX_COUNT)]
    pub retention_count: usize,
    /// Trust this CA certificate (PEM) for X.509 devices registered as `certificateAuthority`,
    /// for this run (repeatable). CAs added with `simdevice service certificate add` or
    /// `create-ca` are kept in the state instead.
    #[arg(long = "x509-ca", value_name = "FILE")]
    pub x509_cas: Vec<std::path::PathBuf>,
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
    /// `--capture` names a container that cannot be used as given.
    #[error("--capture")]
    CaptureContainer(#[source] blob::BlobError),
}

impl HubCommandError {
    /// A configuration the hub cannot run with (exit 78: systemd does not restart-loop on it).
    /// A metrics address in use is not: the port may free up, so a restart can help. The same
    /// rule as the hub's own listeners ([`HubError::is_config`]).
    pub fn is_config(&self) -> bool {
        match self {
            HubCommandError::Hub(error) => error.is_config(),
            HubCommandError::Device { .. }
            | HubCommandError::CaptureDest { .. }
            | HubCommandError::CaptureContainer(_) => true,
            HubCommandError::Metrics(MetricsError::Bind { source, .. }) => matches!(
                source.kind(),
                std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::PermissionDenied
            ),
        }
    }
}

/// `--capture` and its options as the hub's settings: a directory, or a Blob Storage container
/// (`azure://` with `AZURE_STORAGE_CONNECTION_STRING`, or an `https://` URL with a SAS).
fn capture_settings(args: &HubArgs) -> Result<Option<CaptureSettings>, HubCommandError> {
    let Some(dest) = &args.capture else {
        return Ok(None);
    };
    let refuse = |reason| HubCommandError::CaptureDest {
        dest: blob::redacted(dest),
        reason,
    };
    if dest.is_empty() {
        return Err(refuse("an empty path"));
    }
    if dest.contains("://") && !blob::is_container(dest) {
        return Err(refuse(
            "not a directory, and not a destination this hub knows (azure://, https://)",
        ));
    }
    let env = std::env::var(blob::CONNECTION_STRING_ENV).ok();
    let destination = match blob::parse(dest, env.as_deref()) {
        Ok(Location::Directory(dir)) => Destination::Directory(dir),
        Ok(Location::Container(container)) => Destination::Container(container),
        Err(error) => return Err(HubCommandError::CaptureContainer(error)),
    };
    if args.capture_encoding == Encoding::Json && args.capture_format != Format::IotHub {
        return Err(refuse(
            "--capture-encoding json is IoT Hub routing's; Event Hubs Capture (eventhubs) writes Avro only: add --capture-format iothub",
        ));
    }
    Ok(Some(CaptureSettings {
        destination,
        format: args.capture_format,
        codec: args.capture_codec,
        encoding: args.capture_encoding,
        window: std::time::Duration::from_secs(args.capture_window_secs),
        window_bytes: args.capture_window_bytes,
        skip_empty: args.capture_skip_empty,
    }))
}

/// A port flag: the operator's choice, or the listener's default (`hub::Port`).
fn port(given: Option<u16>, default: u16) -> crate::hub::Port {
    given.map_or(crate::hub::Port::Default(default), crate::hub::Port::Chosen)
}

pub async fn run(args: HubArgs) -> Result<(), HubCommandError> {
    let capture = capture_settings(&args)?;
    let state_dir = args.state_dir.unwrap_or_else(default_state_dir);
    let hub = Hub::start(HubConfig {
        state_dir: state_dir.clone(),
        bind: args.bind,
        mqtt_port: args.mqtt_port,
        api_port: args.api_port,
        ws_port: port(args.ws_port, crate::protocol::WEBSOCKET_PORT),
        hostnames: args.hostnames,
        auto_register: args.auto_register,
        group_key: args.group_key,
        capture,
        dps_port: Some(port(
            args.dps_port,
            crate::common::local_hub::DEFAULT_DPS_PORT,
        )),
        dps_ws_port: Some(port(
            args.dps_ws_port,
            crate::common::local_hub::DEFAULT_DPS_WS_PORT,
        )),
        id_scope: args.id_scope,
        amqp: crate::hub::amqp::AmqpSettings {
            port: port(args.amqp_port, crate::hub::amqp::AMQPS_PORT),
            plain_port: (!args.no_amqp_plain)
                .then(|| port(args.amqp_plain_port, crate::hub::amqp::AMQP_PLAIN_PORT)),
            plain_bind: args.amqp_plain_bind,
            consumer_groups: args.consumer_groups,
        },
        events: crate::hub::events::StoreSettings {
            partitions: args.partitions,
            max_age: std::time::Duration::from_secs(args.retention_secs),
            max_count: args.retention_count,
            // The hub makes it durable when capture is on.
            durable: false,
        },
        x509_cas: args.x509_cas,
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
    let _ = writeln!(
        out,
        "  device MQTT/WS:   wss://{}{}",
        hub.ws_addr(),
        crate::common::ws_stream::PATH
    );
    let _ = writeln!(out, "  service HTTPS:    {}", hub.api_addr());
    let _ = writeln!(out, "  trust this CA:    {}", info.ca_file.display());
    if let (Some(addr), Some(scope)) = (hub.dps_addr(), &info.id_scope) {
        let _ = writeln!(out, "  DPS MQTT/TLS:     {addr} (id scope {scope})");
    }
    if let Some(addr) = hub.dps_ws_addr() {
        let _ = writeln!(
            out,
            "  DPS MQTT/WS:      wss://{addr}{}",
            crate::common::ws_stream::PATH
        );
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
    let _ = writeln!(out, "  Event Hubs AMQP/TLS: {}", hub.amqp_addr());
    if let Some(cs) = &info.eventhub_connection_string {
        let _ = writeln!(out, "  Event Hubs-compatible connection string (service):");
        let _ = writeln!(out, "    {cs}");
    }
    if let Some(cs) = &info.eventhub_emulator_connection_string {
        let _ = writeln!(
            out,
            "  Event Hubs emulator-mode connection string (plain AMQP):"
        );
        let _ = writeln!(out, "    {cs}");
    }
    if let Some(capture) = &info.capture {
        let encoding = match capture.encoding.as_str() {
            "json" => "json".to_string(),
            _ => format!("avro {}", capture.codec),
        };
        let _ = writeln!(
            out,
            "  capture:          {} ({}, {encoding}, {} s or {} bytes)",
            capture.dest, capture.format, capture.window_secs, capture.window_bytes
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
    use super::port;
    use crate::hub::Port;

    #[test]
    fn a_port_flag_is_a_choice_and_its_absence_the_default() {
        assert_eq!(port(None, 8884), Port::Default(8884));
        assert_eq!(port(Some(9000), 8884), Port::Chosen(9000));
        assert_eq!(port(Some(0), 8884), Port::Chosen(0));
    }
}
