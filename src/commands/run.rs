//! `simdevice run`: the device agent as a daemon. With `--local`, an IoT Hub emulator runs in
//! the same process, the device is registered there and the agent trusts its CA, so the whole
//! thing works with no Azure account and no set-up.
//!
//! Signals: SIGTERM or SIGINT stop the agent gracefully (exit 0); SIGHUP reloads the
//! configuration file and applies the telemetry and handler settings without reconnecting.

use std::path::PathBuf;
use std::process::ExitCode;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::common::local_hub::default_state_dir;
use crate::common::sdnotify::Daemon;
use crate::config::{Config, Identity, OutboxSettings, Secret};
use crate::hub::registry::{DeviceSpec, DeviceStatus};
use crate::hub::{Hub, HubConfig};

/// Exit code for a configuration the agent cannot run with (sysexits EX_CONFIG); the systemd
/// unit lists it in RestartPreventExitStatus so a broken configuration does not restart-loop.
pub const EX_CONFIG: u8 = 78;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The configuration file [default: /etc/simdevice/config.toml]
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Run against a local IoT Hub started in this process (no Azure account needed).
    #[arg(long)]
    pub local: bool,
    /// With --local: the hub's state directory [default: the per-user data directory, the
    /// same `simdevice hub` and `simdevice service --local` use]
    #[arg(long, requires = "local", env = "SIMDEVICE_HUB_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// With --local: the device id to register and run as.
    #[arg(long, requires = "local", default_value = "door-01")]
    pub device_id: String,
}

pub async fn run(args: RunArgs) -> ExitCode {
    let (mut config, hub) = if args.local {
        match start_local(&args).await {
            Ok(pair) => pair,
            Err(message) => {
                eprintln!("error: {message}");
                return ExitCode::from(EX_CONFIG);
            }
        }
    } else {
        match Config::load(args.config.as_deref()) {
            Ok(config) => (config, None),
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::from(EX_CONFIG);
            }
        }
    };
    // The daemon keeps its outbox on disk: the configured file, else the default one.
    if config.outbox.path.is_none() {
        config.outbox.path = Some(OutboxSettings::default_path());
    }
    let metrics = config
        .metrics
        .listen
        .map(|addr| (addr, config.outbox.max_readings));
    let agent = match Agent::new(config) {
        Ok(agent) => agent,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let handle = agent.handle();
    let shutdown = CancellationToken::new();
    if let Err(error) = serve_metrics(metrics, &handle, &shutdown).await {
        eprintln!("error: {error}");
        return ExitCode::FAILURE;
    }
    let agent_task = tokio::spawn(agent.run(shutdown.clone()));
    // systemd (Type=notify): READY once the configuration is checked and the tasks run, not
    // after the first connection: the agent works offline (readings queue up, reconnects back
    // off), so a hub that is unreachable at boot must not fail the unit's start. The watchdog
    // is fed only while the connection and telemetry loops keep beating.
    let systemd = Daemon::from_env();
    let ctx = handle.ctx.clone();
    systemd.ready(
        &format!("running device {}", ctx.device_id()),
        move || ctx.heartbeat().healthy(),
        &shutdown,
    );

    // SIGHUP reloads from the same sources as at start (None: the default file, if present,
    // and the environment); --local has no file to reload.
    let reload = (!args.local).then_some(args.config.as_deref());
    wait_for_stop(&shutdown, reload, &handle).await;
    tracing::info!("stopping: finishing in-flight work");
    systemd.stopping();
    shutdown.cancel();
    if let Err(error) = agent_task.await {
        tracing::error!(%error, "the agent task failed");
    }
    if let Some(hub) = hub {
        hub.shutdown().await;
    }
    ExitCode::SUCCESS
}

/// Starts `/healthz` and `/metrics` when `[metrics] listen` asks for them (until `stop`).
async fn serve_metrics(
    metrics: Option<(std::net::SocketAddr, usize)>,
    handle: &crate::agent::AgentHandle,
    stop: &CancellationToken,
) -> Result<(), crate::common::exposition::MetricsError> {
    if let Some((addr, queue_capacity)) = metrics {
        let source = std::sync::Arc::new(crate::agent::metrics::AgentMetrics {
            ctx: handle.ctx.clone(),
            queue_capacity,
        });
        crate::common::exposition::serve(addr, source, stop.clone()).await?;
    }
    Ok(())
}

/// Waits for SIGTERM or SIGINT; on SIGHUP reloads the configuration file.
async fn wait_for_stop(
    shutdown: &CancellationToken,
    reload: Option<Option<&std::path::Path>>,
    handle: &crate::agent::AgentHandle,
) {
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::warn!("cannot listen for SIGTERM/SIGHUP; only Ctrl-C stops the agent");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = term.recv() => return,
            _ = tokio::signal::ctrl_c() => return,
            _ = hup.recv() => match reload {
                None => tracing::info!("SIGHUP: nothing to reload with --local"),
                Some(path) => match Config::load(path) {
                    Ok(config) => {
                        if let Err(error) = handle.reload(&config) {
                            tracing::error!(%error, "SIGHUP: the new configuration was not applied");
                        }
                    }
                    Err(error) => tracing::error!(%error, "SIGHUP: the configuration has an error; keeping the running one"),
                },
            },
        }
    }
}

/// Starts the embedded hub, registers the device, and returns the agent's configuration.
async fn start_local(args: &RunArgs) -> Result<(Config, Option<Hub>), String> {
    let state_dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
    let mut hub_config = HubConfig::ephemeral(&state_dir);
    hub_config.auto_register = false;
    let hub = Hub::start(hub_config)
        .await
        .map_err(|e| format!("cannot start the local hub: {e}"))?;
    let registry = &hub.state().registry;
    if !registry.contains(&args.device_id) {
        registry
            .create(DeviceSpec {
                id: args.device_id.clone(),
                status: DeviceStatus::Enabled,
                status_reason: None,
                primary_key: None,
                secondary_key: None,
            })
            .map_err(|e| format!("cannot register {}: {e}", args.device_id))?;
    }
    let key = registry
        .get(&args.device_id, |d| d.primary_key.clone())
        .map_err(|e| e.to_string())?;
    let info = hub.info().clone();
    let identity = Identity {
        host_name: info.hostname.clone(),
        device_id: args.device_id.clone(),
        key: Secret::new(key),
        gateway_host_name: Some(format!("localhost:{}", info.mqtt_port)),
        ca_file: Some(info.ca_file.clone()),
    };
    println!(
        "simdevice: running device {} against a local IoT Hub",
        args.device_id
    );
    println!("  hub state: {} (hub.json)", state_dir.display());
    println!(
        "  device MQTT/TLS: localhost:{}   service HTTPS: localhost:{}",
        info.mqtt_port, info.api_port
    );
    println!("From another terminal:");
    println!(
        "  simdevice service --local invoke {} lockDoor '{{\"lockTime\":\"10m\"}}'",
        args.device_id
    );
    println!("  simdevice service --local twin show {}", args.device_id);
    println!(
        "  simdevice service --local twin update {} --desired '{{\"telemetryInterval\":5}}'",
        args.device_id
    );
    println!("  simdevice service --local events {}", args.device_id);
    println!("Ctrl-C stops both.");
    let mut config = Config::for_identity(identity);
    // Each device's outbox and state live with the hub's state, so `--local` needs no set-up.
    config.outbox.path = Some(
        state_dir
            .join("agents")
            .join(&args.device_id)
            .join("outbox.db"),
    );
    Ok((config, Some(hub)))
}
