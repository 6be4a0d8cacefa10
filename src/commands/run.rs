//! `simdevice run`: the device agent as a daemon. With `--local`, an IoT Hub emulator runs in
//! the same process, the device is registered there and the agent trusts its CA, so the whole
//! thing works with no Azure account and no set-up.
//!
//! Signals: SIGTERM or SIGINT stop the agent gracefully (exit 0); SIGHUP reloads the
//! configuration file and applies the telemetry and handler settings without reconnecting.
//! With `[provisioning]` the same, for the agent on the hub DPS assigned: `/metrics`, the
//! watchdog and SIGHUP follow the agent running now through a watch channel, since a new one
//! is made after each registration.

use std::path::PathBuf;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::agent::metrics::AgentMetrics;
use crate::agent::{Agent, AgentError, AgentHandle};
use crate::common::exposition::{Exposition, Kind, MetricsError, MetricsSource};
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
    // The agent running now: one for the life of the process, or with `[provisioning]` the
    // one on the hub DPS assigned, made again after each registration (`None` meanwhile).
    // `/metrics`, the watchdog and SIGHUP reloads all follow it through this.
    let (current, handles) = watch::channel(None);
    let metrics = config
        .metrics
        .listen
        .map(|addr| (addr, config.outbox.max_readings));
    let shutdown = CancellationToken::new();
    let registration = config
        .provisioning
        .as_ref()
        .map(|p| (p.id_scope.clone(), p.registration_id.clone()));
    // The agent is made (its checks: exit 78) before `/metrics` is bound, and runs after.
    let agent = match &registration {
        Some(_) => None,
        None => {
            let agent = Agent::new(config.clone())?;
            current.send_replace(Some(agent.handle()));
            Some(agent)
        }
    };
    serve_metrics(metrics, &handles, &shutdown).await?;
    let (status, agent_task) = match agent {
        Some(agent) => (
            format!("running device {}", agent.handle().ctx.device_id()),
            AgentTask::Plain(tokio::spawn(agent.run(shutdown.clone()))),
        ),
        None => {
            // Ends the wait below when the provisioned agent stops by itself (an error).
            let ended = shutdown.clone();
            let provisioned = crate::agent::provision::run_provisioned_with(
                config,
                false,
                shutdown.clone(),
                current,
            );
            let task = tokio::spawn(async move {
                let result = provisioned.await;
                ended.cancel();
                result
            });
            (
                "running a provisioned device".to_string(),
                AgentTask::Provisioned(task),
            )
        }
    };
    // systemd (Type=notify): READY once the configuration is checked and the tasks run, not
    // after the first connection: the agent works offline (readings queue up, reconnects back
    // off), so a hub that is unreachable at boot must not fail the unit's start. The watchdog
    // is fed only while the connection and telemetry loops keep beating (while a provisioned
    // agent registers there are no loops yet: the registration has its own deadline).
    let systemd = Daemon::from_env();
    let watched = handles.clone();
    systemd.ready(
        &status,
        move || {
            watched
                .borrow()
                .as_ref()
                .is_none_or(|handle| handle.ctx.heartbeat().healthy())
        },
        &shutdown,
    );

    // SIGHUP reloads from the same sources as at start (None: the default file, if present,
    // and the environment); --local has no file to reload.
    #[cfg(feature = "hub")]
    let reload = (!args.local).then_some(args.config.as_deref());
    #[cfg(not(feature = "hub"))]
    let reload = Some(args.config.as_deref());
    wait_for_stop(&shutdown, reload, &handles, registration.as_ref()).await;
    tracing::info!("stopping: finishing in-flight work");
    systemd.stopping();
    shutdown.cancel();
    let result = match agent_task {
        AgentTask::Plain(task) => {
            if let Err(error) = task.await {
                tracing::error!(%error, "the agent task failed");
            }
            Ok(())
        }
        AgentTask::Provisioned(task) => finish(task.await),
    };
    #[cfg(feature = "hub")]
    if let Some(hub) = hub {
        hub.shutdown().await;
    }
    result
}

/// The task of the agent: one agent, or a provisioned one (`agent::provision`).
enum AgentTask {
    Plain(tokio::task::JoinHandle<()>),
    Provisioned(tokio::task::JoinHandle<Result<(), crate::agent::provision::ProvisionRunError>>),
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

/// `/metrics` and `/healthz` of whichever agent runs now ([`AgentMetrics`] of its context);
/// while a provisioned agent registers with DPS there is none: unhealthy, and not connected.
struct CurrentAgentMetrics {
    handles: watch::Receiver<Option<AgentHandle>>,
    queue_capacity: usize,
}

impl CurrentAgentMetrics {
    fn current(&self) -> Option<AgentMetrics> {
        self.handles.borrow().as_ref().map(|handle| AgentMetrics {
            ctx: handle.ctx.clone(),
            queue_capacity: self.queue_capacity,
        })
    }
}

impl MetricsSource for CurrentAgentMetrics {
    fn health(&self) -> Result<(), String> {
        match self.current() {
            Some(agent) => agent.health(),
            None => Err("registering with the Device Provisioning Service".into()),
        }
    }

    fn render(&self, out: &mut Exposition) {
        match self.current() {
            Some(agent) => agent.render(out),
            None => out.single(
                "simdevice_agent_connected",
                Kind::Gauge,
                "1 while the device is connected to IoT Hub, else 0.",
                0.0,
            ),
        }
    }
}

/// Starts `/healthz` and `/metrics` when `[metrics] listen` asks for them (until `stop`).
async fn serve_metrics(
    metrics: Option<(std::net::SocketAddr, usize)>,
    handles: &watch::Receiver<Option<AgentHandle>>,
    stop: &CancellationToken,
) -> Result<(), MetricsError> {
    if let Some((addr, queue_capacity)) = metrics {
        let source = std::sync::Arc::new(CurrentAgentMetrics {
            handles: handles.clone(),
            queue_capacity,
        });
        crate::common::exposition::serve(addr, source, stop.clone()).await?;
    }
    Ok(())
}

/// Waits for SIGTERM or SIGINT (or `shutdown`); on SIGHUP reloads the configuration file into
/// the agent running now. `registration` (id scope, registration id): the running
/// `[provisioning]`, whose agent is the device DPS assigned.
async fn wait_for_stop(
    shutdown: &CancellationToken,
    reload: Option<Option<&std::path::Path>>,
    handles: &watch::Receiver<Option<AgentHandle>>,
    registration: Option<&(String, String)>,
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
                        let Some(handle) = handles.borrow().clone() else {
                            tracing::info!("SIGHUP: registering with DPS; the new configuration applies once assigned (restart to use it now)");
                            continue;
                        };
                        let config = as_assigned(config, registration, &handle);
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

/// A reloaded `[provisioning]` configuration names the registration, while the running agent
/// is the device DPS assigned (its id may differ): the same registration reloads into that
/// device; another one keeps the reloaded identity, which `AgentHandle::reload` then refuses
/// as a change that needs a restart.
fn as_assigned(
    mut config: Config,
    registration: Option<&(String, String)>,
    handle: &AgentHandle,
) -> Config {
    let same = match (&config.provisioning, registration) {
        (Some(p), Some((scope, id))) => p.id_scope == *scope && p.registration_id == *id,
        _ => false,
    };
    if same {
        config.identity.device_id = handle.ctx.device_id().to_string();
    }
    config
}
