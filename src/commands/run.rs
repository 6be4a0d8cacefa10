//! `simdevice run`: the device agent as a daemon. With `--local`, an IoT Hub emulator runs in
//! the same process, the device is registered there and the agent trusts its CA, so the whole
//! thing works with no Azure account and no set-up.
//!
//! Signals: SIGTERM or SIGINT stop the agent gracefully (exit 0); SIGHUP reloads the
//! configuration file and applies the telemetry and handler settings without reconnecting.

use std::path::PathBuf;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, AgentError};
use crate::common::exposition::MetricsError;
use crate::common::logging::error_chain;
use crate::common::sdnotify::Daemon;
use crate::config::{Config, ConfigError, OutboxSettings};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The configuration file [default: /etc/simdevice/config.toml]
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Run against a local IoT Hub started in this process (no Azure account needed).
    #[cfg(feature = "hub")]
    #[arg(long)]
    pub local: bool,
    #[cfg(feature = "hub")]
    #[command(flatten)]
    pub local_args: super::local::LocalArgs,
}

/// Why `simdevice run` could not run or stopped with an error. `main` prints it with its
/// source chain and exits 78 when [`RunError::is_config`] says the configuration is at fault.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the agent cannot start")]
    Agent(#[from] AgentError),
    #[cfg(feature = "hub")]
    #[error(transparent)]
    Local(#[from] super::local::LocalError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// `[provisioning]`: the provisioned agent could not run.
    #[error("the provisioned agent cannot run")]
    Provision(#[from] crate::agent::provision::ProvisionRunError),
}

impl RunError {
    /// A configuration the agent cannot run with (exit 78, so systemd does not restart-loop):
    /// a refused configuration, a CA file or handler that cannot be used, an outbox owned by
    /// another agent, a local hub state that cannot be used. Not: a metrics port that cannot
    /// be bound (it may free up), a TLS set-up or local hub that failed at run time.
    pub fn is_config(&self) -> bool {
        match self {
            RunError::Config(_) => true,
            RunError::Agent(error) => error.is_config(),
            #[cfg(feature = "hub")]
            RunError::Local(error) => error.is_config(),
            RunError::Metrics(_) => false,
            RunError::Provision(error) => error.is_config(),
        }
    }
}

pub async fn run(args: RunArgs) -> Result<(), RunError> {
    #[cfg(feature = "hub")]
    let (mut config, hub) = if args.local {
        let (config, hub) = super::local::start(&args.local_args).await?;
        (config, Some(hub))
    } else {
        (Config::load(args.config.as_deref())?, None)
    };
    #[cfg(not(feature = "hub"))]
    let mut config = Config::load(args.config.as_deref())?;
    // The daemon keeps its outbox on disk: the configured file, else the default one.
    if config.outbox.path.is_none() {
        config.outbox.path = Some(OutboxSettings::default_path());
    }
    if config.provisioning.is_some() {
        return run_provisioned(config).await;
    }
    let metrics = config
        .metrics
        .listen
        .map(|addr| (addr, config.outbox.max_readings));
    let agent = Agent::new(config)?;
    let handle = agent.handle();
    let shutdown = CancellationToken::new();
    serve_metrics(metrics, &handle, &shutdown).await?;
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
    #[cfg(feature = "hub")]
    let reload = (!args.local).then_some(args.config.as_deref());
    #[cfg(not(feature = "hub"))]
    let reload = Some(args.config.as_deref());
    wait_for_stop(&shutdown, reload, &handle).await;
    tracing::info!("stopping: finishing in-flight work");
    systemd.stopping();
    shutdown.cancel();
    if let Err(error) = agent_task.await {
        tracing::error!(%error, "the agent task failed");
    }
    #[cfg(feature = "hub")]
    if let Some(hub) = hub {
        hub.shutdown().await;
    }
    Ok(())
}

/// `[provisioning]`: the agent on the hub DPS assigns (`agent::provision::run_provisioned`),
/// until SIGTERM or SIGINT. Not yet here: `/metrics` and SIGHUP reloads (the agent is made
/// again after each registration, so they would need to follow it).
async fn run_provisioned(config: Config) -> Result<(), RunError> {
    if config.metrics.listen.is_some() {
        tracing::warn!("[metrics] listen is not served yet for a provisioned agent");
    }
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(crate::agent::provision::run_provisioned(
        config,
        false,
        shutdown.clone(),
    ));
    let systemd = Daemon::from_env();
    systemd.ready("running a provisioned device", || true, &shutdown);
    tokio::pin!(task);
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::warn!("cannot listen for SIGTERM/SIGHUP; only Ctrl-C stops the agent");
        let _ = tokio::signal::ctrl_c().await;
        shutdown.cancel();
        return finish(task.await);
    };
    loop {
        tokio::select! {
            ended = &mut task => return finish(ended),
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = hup.recv() => tracing::info!("SIGHUP: reloads are not supported with [provisioning]"),
        }
    }
    tracing::info!("stopping: finishing in-flight work");
    systemd.stopping();
    shutdown.cancel();
    finish(task.await)
}

fn finish(
    ended: Result<Result<(), crate::agent::provision::ProvisionRunError>, tokio::task::JoinError>,
) -> Result<(), RunError> {
    match ended {
        Ok(result) => Ok(result?),
        Err(error) => {
            tracing::error!(%error, "the provisioned agent task failed");
            Ok(())
        }
    }
}

/// Starts `/healthz` and `/metrics` when `[metrics] listen` asks for them (until `stop`).
async fn serve_metrics(
    metrics: Option<(std::net::SocketAddr, usize)>,
    handle: &crate::agent::AgentHandle,
    stop: &CancellationToken,
) -> Result<(), MetricsError> {
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
                            let error = error_chain(&error);
                            tracing::error!(%error, "SIGHUP: the new configuration was not applied");
                        }
                    }
                    Err(error) => {
                        let error = error_chain(&error);
                        tracing::error!(%error, "SIGHUP: the configuration has an error; keeping the running one");
                    }
                },
            },
        }
    }
}
