//! The device agent: one simulated device, from its configuration to a live connection.
//!
//! [`Agent::run`] starts a small set of tasks on the current runtime and waits for shutdown:
//! - `connection` owns MQTT (the only code that does) and the token renewals;
//! - `telemetry` produces a reading per interval into the `outbox`;
//! - `twin` catches up after each connect, applies desired properties, sends reported ones;
//! - `door::auto_unlock` unlocks the door when its lock time has passed;
//! - the dispatcher (here) hands method calls to their handlers, each in its own task.
//!
//! Channels between them are bounded; see each module for what happens when one is full.
//! Handlers reach the rest of the agent only through [`context::HandlerContext`]. Many agents
//! can run on one runtime: nothing here is global.

pub mod backoff;
pub mod connection;
pub mod connectivity;
pub mod context;
pub mod door;
pub mod environment;
pub mod handlers;
pub mod metrics;
pub mod outbox;
pub mod state;
pub mod telemetry;
pub mod twin;

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use connection::{Connection, Incoming, Request};
use context::{Counters, HandlerContext, REPORT_QUEUE};
use handlers::Registry;
use twin::{TwinEvent, TwinTask};

/// Method calls handled at the same time; more are answered 503 at once.
const CONCURRENT_METHODS: usize = 32;
/// Largest method payload accepted (IoT Hub's limit).
const MAX_METHOD_PAYLOAD: usize = 128 * 1024;
/// Time the agent gives in-flight work at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("TLS set-up failed: {0}")]
    Tls(String),
    #[error("handlers: {0}")]
    Handlers(#[from] handlers::builtin::BuildError),
}

/// The TLS client configuration: the public roots plus the configured CA (a local hub's).
pub fn client_tls(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, AgentError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let pem = std::fs::read_to_string(path).map_err(|e| AgentError::CaFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let certs =
            crate::common::pem::parse_pem_certificates(&pem).map_err(|e| AgentError::CaFile {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        for cert in certs {
            roots.add(cert).map_err(|e| AgentError::CaFile {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        // ring, not aws-lc: aws-lc seeds its own entropy source on first use, which costs a
        // device 40-70 ms of CPU at every start (measured in docs/benchmarks-agent.md); ring
        // uses the OS's random source directly. The hub keeps aws-lc for its handshake speed.
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| AgentError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A running agent's handles that outlive start-up: for SIGHUP reloads and for tests.
#[derive(Clone)]
pub struct AgentHandle {
    pub ctx: HandlerContext,
    registry: Arc<RwLock<Arc<Registry>>>,
    device_id: String,
}

impl AgentHandle {
    /// Applies the reloadable parts of a new configuration: telemetry cadence and handlers.
    /// A changed identity needs a restart; this says so and changes nothing.
    pub fn reload(&self, config: &Config) -> Result<(), AgentError> {
        if config.identity.device_id != self.device_id {
            tracing::error!(old = %self.device_id, new = %config.identity.device_id,
                "the identity changed: restart the agent to use it; keeping the old one");
            return Ok(());
        }
        let registry = handlers::builtin::register_all(&config.methods)?;
        *self.registry.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(registry);
        self.ctx.set_telemetry_interval(config.telemetry.interval);
        tracing::info!(
            interval_s = config.telemetry.interval.as_secs_f64(),
            "configuration reloaded"
        );
        Ok(())
    }
}

pub struct Agent {
    config: Config,
    tls: Arc<rustls::ClientConfig>,
    handle: AgentHandle,
    reports: mpsc::Receiver<Value>,
}

impl Agent {
    /// Checks what can fail before connecting: the CA file and the handlers.
    pub fn new(config: Config) -> Result<Agent, AgentError> {
        let tls = client_tls(config.identity.ca_file.as_deref())?;
        Self::with_tls(config, tls)
    }

    /// The same with a TLS configuration shared by many agents.
    pub fn with_tls(config: Config, tls: Arc<rustls::ClientConfig>) -> Result<Agent, AgentError> {
        let registry = handlers::builtin::register_all(&config.methods)?;
        let (reports_tx, reports) = mpsc::channel(REPORT_QUEUE);
        let ctx = HandlerContext::new(
            &config.identity.device_id,
            config.telemetry.interval,
            reports_tx,
        );
        let handle = AgentHandle {
            ctx,
            registry: Arc::new(RwLock::new(Arc::new(registry))),
            device_id: config.identity.device_id.clone(),
        };
        Ok(Agent {
            config,
            tls,
            handle,
            reports,
        })
    }

    pub fn handle(&self) -> AgentHandle {
        self.handle.clone()
    }

    /// Runs until `shutdown` is cancelled, then finishes in-flight work within
    /// [`SHUTDOWN_GRACE`] and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let Agent {
            config,
            tls,
            handle,
            reports,
        } = self;
        let ctx = handle.ctx.clone();
        let tasks = TaskTracker::new();
        let (outbox, store, persisted) = open_outbox(&config, &ctx).await;
        let (requests_tx, requests_rx) = mpsc::channel::<Request>(64);
        let (incoming_tx, mut incoming) = mpsc::channel::<Incoming>(64);
        let (twin_tx, twin_rx) = mpsc::channel::<TwinEvent>(64);

        let telemetry = &config.telemetry;
        let environment = environment::Environment::new(
            telemetry.seed,
            telemetry.temperature,
            telemetry.humidity,
            telemetry.uv,
        );
        tasks.spawn(telemetry::produce(
            ctx.clone(),
            environment,
            outbox.clone(),
            persisted.next_seq,
            shutdown.clone(),
        ));
        tasks.spawn(
            Connection {
                identity: config.identity.clone(),
                settings: config.connection.clone(),
                tls,
                outbox,
                ctx: ctx.clone(),
                requests: requests_rx,
                incoming: incoming_tx,
                shutdown: shutdown.clone(),
            }
            .run(),
        );
        tasks.spawn(
            TwinTask {
                ctx: ctx.clone(),
                registry: handle.registry.clone(),
                requests: requests_tx.clone(),
                reports,
                events: twin_rx,
                cellular: connectivity::Cellular::new(
                    config.telemetry.seed,
                    &config.connectivity.operator,
                    &config.connectivity.technology,
                ),
                backoff: backoff::Backoff::new(
                    config.connection.backoff_min,
                    config.connection.backoff_max,
                ),
                shutdown: shutdown.clone(),
                applied: persisted.desired,
                store: store.clone(),
            }
            .run(),
        );
        tasks.spawn(door::auto_unlock(ctx.clone(), shutdown.clone()));
        if let Some(store) = &store {
            tasks.spawn(door::persist(ctx.clone(), store.clone(), shutdown.clone()));
        }

        let methods = Arc::new(Semaphore::new(CONCURRENT_METHODS));
        while let Some(event) = incoming.recv().await {
            match event {
                Incoming::Connected { .. } => {
                    let _ = twin_tx.send(TwinEvent::Connected).await;
                }
                Incoming::Disconnected { reason } => {
                    tracing::info!(device = %config.identity.device_id, %reason, "disconnected from IoT Hub");
                    let _ = twin_tx.send(TwinEvent::Disconnected).await;
                }
                Incoming::DesiredPatch { version, body } => {
                    let _ = twin_tx
                        .send(TwinEvent::DesiredPatch { version, body })
                        .await;
                }
                Incoming::MethodCall { name, rid, payload } => {
                    Counters::bump(&ctx.counters().method_calls);
                    let registry = handle
                        .registry
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    let requests = requests_tx.clone();
                    let permit = methods.clone().try_acquire_owned();
                    let ctx = ctx.clone();
                    tasks.spawn(async move {
                        let response = match permit {
                            Ok(_permit) => {
                                answer_method(&registry, ctx.clone(), &name, &payload).await
                            }
                            Err(_) => handlers::MethodResponse::error(
                                503,
                                format!("{CONCURRENT_METHODS} method calls are running; try again"),
                            ),
                        };
                        tracing::info!(method = %name, status = response.status, "method answered");
                        ctx.counters().method_answered(&name, response.status);
                        let payload = serde_json::to_vec(&response.payload).unwrap_or_default();
                        let _ = requests
                            .send(Request::MethodResponse {
                                rid,
                                status: response.status,
                                payload,
                            })
                            .await;
                    });
                }
                Incoming::CloudToDevice { properties, body } => {
                    handlers::builtin::on_cloud_to_device(&ctx, &properties, &body);
                }
            }
        }
        // The connection task ended (shutdown): let the rest finish within the grace period.
        drop(requests_tx);
        tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some agent tasks did not finish within the shutdown grace period");
        }
        if let Some(store) = store {
            store.close().await;
        }
    }
}

/// Opens the agent's state (`[outbox] path`) and restores what it holds: readings not yet
/// acknowledged, the next `seq`, the door, the applied desired properties. Without a path, or
/// when the file cannot be used (said so in the log), readings are kept in memory.
async fn open_outbox(
    config: &Config,
    ctx: &HandlerContext,
) -> (Arc<outbox::Outbox>, Option<state::Store>, state::Persisted) {
    let settings = &config.outbox;
    let Some(path) = settings.path.clone() else {
        tracing::info!("no outbox.path: readings are kept in memory only");
        let outbox =
            outbox::Outbox::with_store(config.telemetry.queue_size, Some(settings.max_age), None);
        return (Arc::new(outbox), None, state::Persisted::default());
    };
    let device_id = config.identity.device_id.clone();
    let opening = {
        let (path, ctx) = (path.clone(), ctx.clone());
        tokio::task::spawn_blocking(move || state::Store::open(&path, &device_id, ctx)).await
    };
    let (store, mut persisted) = match opening {
        Ok(Ok((store, persisted))) => (Some(store), persisted),
        Ok(Err(error)) => {
            tracing::error!(%error, "cannot open the outbox");
            tracing::warn!(path = %path.display(),
                "readings are kept in memory only: those not yet acknowledged are lost if the agent stops");
            (None, state::Persisted::default())
        }
        Err(error) => {
            tracing::error!(%error, path = %path.display(), "opening the outbox failed");
            (None, state::Persisted::default())
        }
    };
    let outbox =
        outbox::Outbox::with_store(settings.max_readings, Some(settings.max_age), store.clone());
    if let Some(door) = persisted.door.clone() {
        *ctx.door() = door;
    }
    *ctx.settings() = persisted.desired.settings.clone();
    if let Some(interval) = persisted
        .desired
        .telemetry_interval
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
    {
        ctx.set_telemetry_interval(interval);
    }
    let readings = std::mem::take(&mut persisted.readings);
    let waiting = readings.len();
    let dropped = outbox.restore(readings, chrono::Utc::now());
    telemetry::count_dropped(ctx, &dropped, outbox.len());
    if store.is_some() {
        tracing::info!(path = %path.display(), waiting, next_seq = persisted.next_seq,
            desired_version = persisted.desired.version, "outbox opened");
    }
    (Arc::new(outbox), store, persisted)
}

/// Checks a method payload, then calls the handler.
async fn answer_method(
    registry: &Registry,
    ctx: HandlerContext,
    name: &str,
    payload: &[u8],
) -> handlers::MethodResponse {
    if payload.len() > MAX_METHOD_PAYLOAD {
        return handlers::MethodResponse::error(
            413,
            format!(
                "the payload is {} bytes, over the {MAX_METHOD_PAYLOAD}-byte limit",
                payload.len()
            ),
        );
    }
    let payload = if payload.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        match serde_json::from_slice(payload) {
            Ok(value) => value,
            Err(error) => {
                return handlers::MethodResponse::error(
                    400,
                    format!("the payload is not JSON: {error}"),
                )
            }
        }
    };
    handlers::call_method(registry, ctx, name, payload).await
}
