//! The device agent: one simulated device, from its configuration to a live connection.
//!
//! [`Agent::run`] starts a small set of tasks on the current runtime and waits for shutdown:
//! - `connection` owns the MQTT session (the only code that speaks MQTT, over `mqtt`'s wire),
//!   its keep-alive and the token renewals;
//! - `telemetry` produces a reading per interval into the `outbox`;
//! - `twin` catches up after each connect, applies desired properties, sends reported ones;
//! - `door_cell` unlocks the door when its lock time has passed and saves each change;
//! - the dispatcher (here) hands method calls to their handlers, each in its own task.
//!
//! Channels between them are bounded; see each module for what happens when one is full.
//! Handlers reach the rest of the agent only through [`context::HandlerContext`]. Many agents
//! can run on one runtime: nothing here is global.
//!
//! The rooms, lowest first (each uses only those before it): `door`, `reading`,
//! `environment`, `connectivity`, `backoff` (plain data and pure rules); `state` (the SQLite
//! file: rows of plain data); `outbox` (readings until acknowledged, over `state`);
//! `door_cell` (the door's live value, saved through `state`); `context` (what a handler may
//! touch); `transport` (the dial: TCP or a proxy's tunnel, TLS, the WebSocket upgrade);
//! `mqtt` (the wire over it: MQTT packets with rumqttc's codec, buffers); `handlers`,
//! `telemetry`, `connection`, `metrics`; `twin`; this module wires them.
//! One outbox file has one owner: [`Agent::new`] takes its lock ([`AgentError::OutboxLocked`]).

pub mod backoff;
pub mod connection;
pub mod connectivity;
pub mod context;
pub mod door;
pub mod door_cell;
pub mod environment;
pub mod handlers;
pub mod metrics;
pub mod mqtt;
pub mod outbox;
pub mod provision;
pub mod reading;
pub mod state;
pub mod telemetry;
pub mod transport;
pub mod twin;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::common::lock::{LockError, StateLock};
use crate::common::template::TemplateState;
use crate::config::Config;
use connection::{Connection, Incoming, Request};
use context::{Counters, HandlerContext, REPORT_QUEUE};
use door_cell::DoorCell;
use handlers::Registry;
use twin::{TwinEvent, TwinTask};

/// Method calls handled at the same time; more are answered 503 at once.
const CONCURRENT_METHODS: usize = 32;
/// Largest method payload accepted (IoT Hub's limit).
const MAX_METHOD_PAYLOAD: usize = 128 * 1024;
/// Time the agent gives in-flight work at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why an agent cannot start. [`AgentError::is_config`] tells a configuration the agent
/// refuses (restarting it would not help) from a failure of the machine.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot read the CA file {}", path.display())]
    CaFileRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA file {} is not PEM", path.display())]
    CaFilePem {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a certificate in the CA file {} cannot be trusted", path.display())]
    CaFileCertificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS set-up failed")]
    Tls(#[source] rustls::Error),
    /// The X.509 certificate or key file cannot be read now (they were checked at load).
    #[error("cannot read {}", path.display())]
    X509Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The key file holds no private key, or rustls refuses the pair (the key does not match
    /// the certificate, an unsupported key type).
    #[error(transparent)]
    X509Pair(Box<X509PairError>),
    #[error(transparent)]
    Handlers(#[from] handlers::builtin::BuildError),
    /// Another process (or agent) holds the outbox file's lock: two agents must not share
    /// one outbox. The message names the holder's pid.
    #[error(transparent)]
    OutboxLocked(LockError),
}

impl AgentError {
    /// Whether the configuration is at fault (exit code 78, EX_CONFIG, for a daemon): a CA
    /// file, the handlers, an outbox file that another agent owns.
    pub fn is_config(&self) -> bool {
        match self {
            AgentError::CaFileRead { .. }
            | AgentError::CaFilePem { .. }
            | AgentError::CaFileCertificate { .. }
            | AgentError::Handlers(_)
            | AgentError::OutboxLocked(_)
            | AgentError::X509Read { .. }
            | AgentError::X509Pair(_) => true,
            AgentError::Tls(_) => false,
        }
    }
}

/// An X.509 device's certificate and key that rustls refuses together.
#[derive(Debug, thiserror::Error)]
#[error("the X.509 certificate {} and key {} cannot be used together", certificate.display(), key.display())]
pub struct X509PairError {
    pub certificate: PathBuf,
    pub key: PathBuf,
    #[source]
    pub source: rustls::Error,
}

/// Days before its certificate expires from which an X.509 device warns at start.
pub const CERTIFICATE_WARNING_DAYS: i64 = 30;

/// The TLS client configuration of `identity`: [`client_tls`], with the device's certificate
/// and key as its client certificate when it is an X.509 device. Warns when that certificate
/// expires within [`CERTIFICATE_WARNING_DAYS`] (an expired one was refused at load).
pub fn client_tls_for(
    identity: &crate::config::Identity,
) -> Result<Arc<rustls::ClientConfig>, AgentError> {
    let Some(x509) = &identity.x509 else {
        return client_tls(identity.ca_file.as_deref());
    };
    let left = x509.not_after - chrono::Utc::now();
    if left < chrono::Duration::days(CERTIFICATE_WARNING_DAYS) {
        tracing::warn!(device = %identity.device_id, certificate = %x509.certificate_file.display(),
            not_after = %x509.not_after.to_rfc3339(), days_left = left.num_days(),
            "the device certificate expires soon; renew it");
    }
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| AgentError::X509Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let pair_error = |source| {
        AgentError::X509Pair(Box::new(X509PairError {
            certificate: x509.certificate_file.clone(),
            key: x509.private_key_file.clone(),
            source,
        }))
    };
    let cert_pem = read(&x509.certificate_file)?;
    let chain: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| AgentError::X509Read {
            path: x509.certificate_file.clone(),
            source,
        })?;
    let key_pem = read(&x509.private_key_file)?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|source| AgentError::X509Read {
            path: x509.private_key_file.clone(),
            source,
        })?
        .ok_or_else(|| pair_error(rustls::Error::General("no private key in the file".into())))?;
    let config = tls_builder(identity.ca_file.as_deref())?
        .with_client_auth_cert(chain, key)
        .map_err(pair_error)?;
    Ok(Arc::new(config))
}

/// The TLS client configuration: the public roots plus the configured CA (a local hub's).
pub fn client_tls(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, AgentError> {
    Ok(Arc::new(tls_builder(ca_file)?.with_no_client_auth()))
}

/// The builder of both: trusted roots set, client authentication still to choose.
fn tls_builder(
    ca_file: Option<&Path>,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, AgentError>
{
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let pem = std::fs::read_to_string(path).map_err(|source| AgentError::CaFileRead {
            path: path.to_path_buf(),
            source,
        })?;
        let certs = crate::common::pem::parse_pem_certificates(&pem).map_err(|source| {
            AgentError::CaFilePem {
                path: path.to_path_buf(),
                source,
            }
        })?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|source| AgentError::CaFileCertificate {
                    path: path.to_path_buf(),
                    source,
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
    .map_err(AgentError::Tls)?
    .with_root_certificates(roots);
    Ok(config)
}

/// Why the configured outbox file is not used (the agent then keeps readings in memory).
#[derive(Debug, thiserror::Error)]
enum OutboxUnusable {
    #[error("cannot create the directory {} of the outbox", dir.display())]
    Directory {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Lock(LockError),
}

/// The configured outbox file, as far as start-up got with it.
enum OutboxFile {
    /// No `outbox.path`: memory only.
    Memory,
    /// Ours: its lock is held for the agent's life.
    Owned { path: PathBuf, lock: StateLock },
    /// The disk refused (a directory, the lock file): memory only, said so at run.
    Unusable {
        path: PathBuf,
        error: OutboxUnusable,
    },
}

/// The lock file guarding an outbox file: the same path with `.lock` appended.
pub fn outbox_lock_path(outbox: &Path) -> PathBuf {
    let mut path = outbox.as_os_str().to_owned();
    path.push(".lock");
    PathBuf::from(path)
}

/// Takes the outbox file's lock before anything opens the file: one outbox, one owner. Held
/// by another process (or another agent here): refused. A disk that fails leaves the agent
/// on memory, as when the file itself cannot be opened.
fn claim_outbox(path: Option<&Path>) -> Result<OutboxFile, AgentError> {
    let Some(path) = path else {
        return Ok(OutboxFile::Memory);
    };
    let unusable = |error| OutboxFile::Unusable {
        path: path.to_path_buf(),
        error,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Err(source) = std::fs::create_dir_all(dir) {
            return Ok(unusable(OutboxUnusable::Directory {
                dir: dir.to_path_buf(),
                source,
            }));
        }
    }
    let what = format!("the outbox file {}", path.display());
    match StateLock::acquire(&outbox_lock_path(path), &what) {
        Ok(lock) => Ok(OutboxFile::Owned {
            path: path.to_path_buf(),
            lock,
        }),
        Err(error @ LockError::Held { .. }) => Err(AgentError::OutboxLocked(error)),
        Err(error @ LockError::Io { .. }) => Ok(unusable(OutboxUnusable::Lock(error))),
    }
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
    reports: mpsc::Receiver<Box<Value>>,
    door: Arc<DoorCell>,
    outbox: OutboxFile,
    connect_gate: Option<Arc<Semaphore>>,
}

impl Agent {
    /// Checks what can fail before connecting: the CA file, the handlers, the outbox's lock.
    pub fn new(config: Config) -> Result<Agent, AgentError> {
        let tls = client_tls_for(&config.identity)?;
        Self::with_tls(config, tls)
    }

    /// The same with a TLS configuration shared by many agents. Takes the outbox file's lock
    /// (`<outbox.path>.lock`), held until the agent is dropped or its [`Agent::run`] returns:
    /// [`AgentError::OutboxLocked`] when another agent holds it.
    pub fn with_tls(config: Config, tls: Arc<rustls::ClientConfig>) -> Result<Agent, AgentError> {
        let registry = Arc::new(handlers::builtin::register_all(&config.methods)?);
        Self::with_shared(config, tls, registry)
    }

    /// The same with a handler registry shared by many agents too (a fleet's devices have the
    /// same methods: one registry, not one per device). `registry` must have been built from
    /// `config.methods`.
    pub fn with_shared(
        config: Config,
        tls: Arc<rustls::ClientConfig>,
        registry: Arc<Registry>,
    ) -> Result<Agent, AgentError> {
        let outbox = claim_outbox(config.outbox.path.as_deref())?;
        let (reports_tx, reports) = mpsc::channel(REPORT_QUEUE);
        let door = Arc::new(DoorCell::default());
        let ctx = HandlerContext::new(
            &config.identity.device_id,
            config.telemetry.interval,
            reports_tx,
            door.clone(),
        );
        let handle = AgentHandle {
            ctx,
            registry: Arc::new(RwLock::new(registry)),
            device_id: config.identity.device_id.clone(),
        };
        Ok(Agent {
            config,
            tls,
            handle,
            reports,
            door,
            outbox,
            connect_gate: None,
        })
    }

    /// Connects only with a turn of `gate` (held from the TCP connect to the CONNACK): a
    /// fleet bounds its connects in progress so that its ramp does not overrun the hub.
    pub fn limit_connects(&mut self, gate: Arc<Semaphore>) {
        self.connect_gate = Some(gate);
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
            door,
            outbox,
            connect_gate,
        } = self;
        let ctx = handle.ctx.clone();
        let tasks = TaskTracker::new();
        let (outbox, store, persisted, _outbox_lock) =
            open_outbox(&config, outbox, &ctx, &door).await;
        // Boxed messages: a tokio channel allocates its slots 32 at a time up front, so an
        // idle agent of a fleet holds 32 pointers per channel instead of 32 messages.
        let (requests_tx, requests_rx) = mpsc::channel::<Box<Request>>(64);
        let (incoming_tx, mut incoming) = mpsc::channel::<Box<Incoming>>(64);
        let (twin_tx, twin_rx) = mpsc::channel::<Box<TwinEvent>>(64);

        let telemetry = &config.telemetry;
        let source = match &telemetry.template {
            Some(template) => telemetry::Source::Template(TemplateState::new(
                template.clone(),
                telemetry.seed.unwrap_or_else(rand::random),
            )),
            None => telemetry::Source::Environment(Box::new(environment::Environment::new(
                telemetry.seed,
                telemetry.temperature,
                telemetry.humidity,
                telemetry.uv,
            ))),
        };
        tasks.spawn(telemetry::produce(
            ctx.clone(),
            source,
            outbox.clone(),
            telemetry::Plan {
                first_seq: persisted.next_seq,
                messages: telemetry.messages,
                start_phase: telemetry.start_phase,
            },
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
                connect_gate,
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
        tasks.spawn({
            let (ctx, store, shutdown) = (ctx.clone(), store.clone(), shutdown.clone());
            async move {
                let report = |patch| {
                    if let Err(error) = ctx.report(patch) {
                        tracing::warn!(%error, "door state not reported");
                    }
                };
                door.run(store, report, shutdown).await;
            }
        });

        let methods = Arc::new(Semaphore::new(CONCURRENT_METHODS));
        while let Some(event) = incoming.recv().await {
            match *event {
                Incoming::Connected { .. } => {
                    let _ = twin_tx.send(Box::new(TwinEvent::Connected)).await;
                }
                Incoming::Disconnected { reason } => {
                    tracing::info!(device = %config.identity.device_id, %reason, "disconnected from IoT Hub");
                    let _ = twin_tx.send(Box::new(TwinEvent::Disconnected)).await;
                }
                Incoming::DesiredPatch { version, body } => {
                    let _ = twin_tx
                        .send(Box::new(TwinEvent::DesiredPatch { version, body }))
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
                            .send(Box::new(Request::MethodResponse {
                                rid,
                                status: response.status,
                                payload,
                            }))
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
        // `_outbox_lock` goes here, after the file is closed.
    }
}

/// Opens the agent's state (`[outbox] path`) and restores what it holds: readings not yet
/// acknowledged, the next `seq`, the door, the applied desired properties. Without a path, or
/// when the file cannot be used (said so in the log), readings are kept in memory. Returns the
/// outbox file's lock too, for the caller to hold until the file is closed.
async fn open_outbox(
    config: &Config,
    file: OutboxFile,
    ctx: &HandlerContext,
    door_cell: &DoorCell,
) -> (
    Arc<outbox::Outbox>,
    Option<state::Store>,
    state::Persisted,
    Option<StateLock>,
) {
    let settings = &config.outbox;
    let memory = || outbox::Outbox::with_store(settings.max_readings, Some(settings.max_age), None);
    let memory_only_warning = |path: &Path| {
        tracing::warn!(path = %path.display(),
            "readings are kept in memory only: those not yet acknowledged are lost if the agent stops");
    };
    let (path, lock) = match file {
        OutboxFile::Memory => {
            tracing::info!("no outbox.path: readings are kept in memory only");
            let outbox = outbox::Outbox::with_store(
                config.telemetry.queue_size,
                Some(settings.max_age),
                None,
            );
            return (Arc::new(outbox), None, state::Persisted::default(), None);
        }
        OutboxFile::Unusable { path, error } => {
            tracing::error!(error = %crate::common::logging::error_chain(&error), "cannot use the outbox");
            memory_only_warning(&path);
            return (Arc::new(memory()), None, state::Persisted::default(), None);
        }
        OutboxFile::Owned { path, lock } => (path, lock),
    };
    let device_id = config.identity.device_id.clone();
    let opening = {
        let (path, durable) = (path.clone(), ctx.counters().outbox_durable.clone());
        tokio::task::spawn_blocking(move || state::Store::open(&path, &device_id, durable)).await
    };
    let (store, mut persisted) = match opening {
        Ok(Ok((store, persisted))) => (Some(store), persisted),
        Ok(Err(error)) => {
            tracing::error!(error = %crate::common::logging::error_chain(&error), "cannot open the outbox");
            memory_only_warning(&path);
            (None, state::Persisted::default())
        }
        Err(error) => {
            tracing::error!(%error, path = %path.display(), "opening the outbox failed");
            memory_only_warning(&path);
            (None, state::Persisted::default())
        }
    };
    let outbox =
        outbox::Outbox::with_store(settings.max_readings, Some(settings.max_age), store.clone());
    if let Some(door) = persisted.door.clone() {
        door_cell.restore(door);
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
    (Arc::new(outbox), store, persisted, Some(lock))
}

/// Checks a method payload (its size, that it is JSON; no bytes at all is no payload), then
/// calls the handler. Built-in handlers also take a string holding an object, or an empty
/// string (`handlers::builtin::builtin_payload`).
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
