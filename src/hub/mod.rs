//! The local IoT Hub: an emulator of Azure IoT Hub for devices (MQTT over TLS) and services
//! (the REST API over HTTPS), with its state in a directory.
//!
//! [`Hub::start`] takes the state directory's lock (`hub.lock`: one hub per state; a second
//! one, or `run --local` on the same state, gets [`HubError::Locked`] naming the holder's pid),
//! makes the state private (`private`: the directory 0700, the files with keys 0600, wider
//! modes left by older versions tightened with a warning), loads or creates the CA, policies
//! and registry, binds its listeners (MQTT, MQTT over WebSocket, HTTPS) and returns a handle; [`Hub::health`] says whether its
//! accept loops and job scheduler still run; [`Hub::shutdown`] stops the listeners and every
//! connection, then releases the lock. The pieces: `tls` (certificates), `store` (SQLite),
//! `auth` (policies and SAS checks), `registry` (devices), `twins` (where twin changes are
//! applied), `methods` (direct method calls), `jobs` (scheduled jobs and their scheduler task),
//! `sessions` (MQTT sessions and the route to a connected device), `c2d` (the cloud-to-device
//! queues and their feedback), `telemetry` (accepted
//! messages), `accept` (the accept loop both listeners share, and the liveness flags), `mqtt`
//! (the device listeners: MQTT over TLS and over WebSocket), `api` (the service REST API) and
//! `x509` (CA certificates and device certificate checks).

pub mod accept;
pub mod amqp;
pub mod api;
pub mod auth;
pub mod c2d;
pub mod capture;
pub mod dps;
pub mod error;
pub mod events;
pub mod faults;
pub mod jobs;
pub mod methods;
pub mod metrics;
pub mod mqtt;
pub mod private;
pub mod query;
pub mod registry;
pub mod sessions;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod twins;
pub mod x509;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::common::local_hub::HubInfo;
use crate::common::lock::{LockError, StateLock};
use crate::protocol::connection_string::{DeviceConnectionString, ServiceConnectionString};
use crate::protocol::sas;

/// Events kept for `GET /simdevice/events`.
const RECENT_EVENTS: usize = 10_000;

#[derive(Clone, Debug)]
pub struct HubConfig {
    pub state_dir: PathBuf,
    pub bind: IpAddr,
    pub mqtt_port: u16,
    pub api_port: u16,
    /// MQTT over WebSocket (TLS); `Chosen(0)` picks a free port.
    pub ws_port: Port,
    /// Names besides `localhost` and the loopback addresses to put in the server certificate.
    pub hostnames: Vec<String>,
    pub auto_register: bool,
    /// With `auto_register`: the group key to use (kept in the state, replacing the one
    /// there); `None` keeps the stored one, or makes one the first time.
    pub group_key: Option<String>,
    /// `--capture`: archive accepted telemetry into Avro files (`capture`); `None` is off.
    pub capture: Option<capture::CaptureSettings>,
    /// `--dps-port`: the local DPS's device endpoint (`dps`); `None` serves no DPS.
    pub dps_port: Option<Port>,
    /// `--dps-ws-port`: the local DPS's device endpoint over WebSocket (`dps::mqtt`, its own
    /// port as real DPS has its own host's 443); `None` serves none.
    pub dps_ws_port: Option<Port>,
    /// `--id-scope`: the DPS id scope to use (kept in the state); `None` keeps the stored one.
    pub id_scope: Option<String>,
    /// The Event Hubs-compatible endpoint's listeners and consumer groups (`amqp`).
    pub amqp: amqp::AmqpSettings,
    /// Partitions and retention of the event store (`events`).
    pub events: events::StoreSettings,
    /// `--x509-ca FILE`: CA certificates (PEM) trusted for this run, besides the stored ones.
    pub x509_cas: Vec<PathBuf>,
}

impl HubConfig {
    /// A hub on loopback with OS-chosen ports: what tests use.
    pub fn ephemeral(state_dir: &Path) -> HubConfig {
        HubConfig {
            state_dir: state_dir.to_owned(),
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            mqtt_port: 0,
            api_port: 0,
            ws_port: Port::Chosen(0),
            hostnames: Vec::new(),
            auto_register: false,
            group_key: None,
            capture: None,
            dps_port: Some(Port::Chosen(0)),
            dps_ws_port: Some(Port::Chosen(0)),
            id_scope: None,
            amqp: amqp::AmqpSettings::ephemeral(),
            events: events::StoreSettings::default(),
            x509_cas: Vec::new(),
        }
    }
}

/// Why a hub did not start (or, from `commands::hub`, stopped). [`HubError::is_config`] tells
/// a problem the operator must fix (exit 78, no restart) from a runtime failure.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Another hub, or `run --local`, has the state directory; the message names its pid.
    #[error(transparent)]
    Locked(#[from] LockError),
    /// The state directory or a file in it cannot be created, read, written or made private.
    #[error("the hub state {path} is unusable")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The thread the AMQP endpoint runs on (`amqp::thread`) cannot be started.
    #[error("cannot start the Event Hubs-compatible endpoint's thread")]
    EndpointThread(#[source] std::io::Error),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the hub's TLS identity")]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot load the hub's state")]
    Load(#[from] error::LoadError),
    /// `--group-key` is not a key (base64).
    #[error("--group-key is not a usable key (it must be base64)")]
    GroupKey(#[source] sas::SasError),
    /// A change the hub's own start-up asked for (`--device ID`) was refused.
    #[error("the device registry refused a change")]
    Registry(#[from] error::IotHubError),
    #[error("capture cannot start")]
    Capture(#[from] capture::CaptureError),
    #[error("the event store cannot open")]
    Events(#[from] events::EventStoreError),
    /// A CA certificate (`--x509-ca`, or one in the store) cannot be used.
    #[error("the hub's X.509 CA certificates cannot be loaded")]
    X509(#[from] x509::X509Error),
}

impl HubError {
    /// True when the cause is the configuration or the state the operator gave the hub, so
    /// that restarting cannot help: the state directory in use by another process, a state
    /// directory or file that cannot be used (permissions, not a directory, a CA key or a
    /// database that does not load), an address that is not this host's or a port it may not
    /// bind, a `--device` id the registry refuses. False for runtime failures that a restart
    /// may cure (a port in use, a query that failed).
    pub fn is_config(&self) -> bool {
        use std::io::ErrorKind;
        match self {
            HubError::Locked(_)
            | HubError::State { .. }
            | HubError::Load(_)
            | HubError::GroupKey(_)
            | HubError::Capture(_)
            | HubError::Events(_)
            | HubError::X509(_) => true,
            HubError::Tls(error) => matches!(
                error,
                tls::TlsError::Io { .. } | tls::TlsError::BadCaKey { .. }
            ),
            HubError::Store(error) => matches!(error, store::StoreError::Open { .. }),
            HubError::EndpointThread(_) => false,
            HubError::Bind { source, .. } => matches!(
                source.kind(),
                ErrorKind::AddrNotAvailable | ErrorKind::PermissionDenied
            ),
            HubError::Registry(error) => {
                error.code == crate::protocol::error_code::ErrorCode::ArgumentInvalid
            }
        }
    }
}

/// Everything the listeners and the API share.
pub struct HubState {
    pub host_names: auth::HostNames,
    pub policies: auth::Policies,
    pub registry: registry::Registry,
    pub sessions: sessions::Sessions,
    /// Cloud-to-device messages waiting for their devices, and their feedback (`c2d`).
    pub c2d: c2d::CloudToDevice,
    pub methods: methods::MethodCalls,
    pub jobs: jobs::Jobs,
    pub telemetry: telemetry::Telemetry,
    /// With `--capture`: where accepted telemetry goes before it is acknowledged.
    pub capture: Option<Arc<capture::Intake>>,
    /// The retained event store: accepted telemetry by partition (`events`).
    pub events: Arc<events::EventStore>,
    /// The Event Hubs-compatible endpoint's shared state (`amqp`).
    pub eventhub: amqp::Endpoint,
    /// Set with `--auto-register`: devices whose key derives from it register themselves.
    pub group_key: Option<String>,
    /// Fault hooks (refuse connects, throttle reported patches, clock offset); all off.
    pub faults: faults::Faults,
    /// Counters only the metrics endpoint reads (`metrics`).
    pub counters: metrics::HubCounters,
    /// The local DPS: id scope, enrollments, pending registrations (`dps`).
    pub dps: dps::Dps,
    /// The CA certificates `certificateAuthority` devices chain to.
    pub x509: x509::Authorities,
    /// Whether the accept loops and the job scheduler still run (see [`HubState::health`]).
    pub liveness: accept::Liveness,
}

impl HubState {
    /// `Ok` while the accept loops and the job scheduler run; else which ones do not. A hub
    /// whose loop died still answers the connections it has, but takes no new ones: it is
    /// unhealthy, and says so on `/healthz` and to the systemd watchdog.
    pub fn health(&self) -> Result<(), String> {
        self.liveness.check()
    }
}

/// A running hub.
pub struct Hub {
    state: Arc<HubState>,
    info: HubInfo,
    mqtt_addr: SocketAddr,
    api_addr: SocketAddr,
    /// The DPS device endpoint, when it is served.
    dps_addr: Option<SocketAddr>,
    dps_ws_addr: Option<SocketAddr>,
    amqp_addr: SocketAddr,
    amqp_plain_addr: Option<SocketAddr>,
    ws_addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// With `--capture`: its task, finished after every connection has ended.
    capture: Option<capture::Capture>,
    /// Where the AMQP endpoint runs; dropped after its tasks have ended (`shutdown`).
    _amqp_thread: amqp::thread::EndpointThread,
    /// The state directory is this hub's until it is dropped (after `shutdown`).
    _lock: StateLock,
}

/// In the state directory: the lock that makes one hub its only owner.
pub const LOCK_FILE: &str = "hub.lock";
/// In the state directory: the SQLite database, with every policy and device key.
pub const DB_FILE: &str = "hub.db";
/// The files of the state directory that hold secrets, made [`private::FILE_MODE`] at start.
const SECRET_FILES: [&str; 6] = [
    DB_FILE,
    "hub.db-wal",
    "hub.db-shm",
    HubInfo::FILE_NAME,
    "ca.key",
    LOCK_FILE,
];

/// Connections the kernel queues for `accept`. `TcpListener::bind` gives 128: a burst of more
/// connects than that (a fleet reconnecting) had SYNs dropped and retried a second later.
const LISTEN_BACKLOG: u32 = 1024;

async fn bind(ip: IpAddr, port: u16) -> Result<TcpListener, HubError> {
    let addr = SocketAddr::new(ip, port);
    let listen = || {
        let socket = match ip {
            IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| HubError::Bind { addr, source })
}

/// A listener's port: one the operator chose, or a default. The MQTT and API ports are the
/// hub's address and always chosen (their defaults fail like any port). The others have
/// defaults that clients of the real service dial (443 for WebSocket, 5671 and 5672 for AMQP):
/// when such a default cannot be had (in use, or under 1024 without the privilege), the hub
/// warns and listens on a free port instead, which the banner and `hub.json` report, so that a
/// second hub, or one run unprivileged, still starts. A chosen port that cannot be bound fails
/// the start. `Chosen(0)` is any free port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    Chosen(u16),
    Default(u16),
}

impl Port {
    pub fn number(self) -> u16 {
        match self {
            Port::Chosen(n) | Port::Default(n) => n,
        }
    }
}

/// Binds `port` on `ip`, falling back to a free port for a default one (see [`Port`]).
async fn bind_port(ip: IpAddr, port: Port, what: &str) -> Result<TcpListener, HubError> {
    use std::io::ErrorKind;
    match bind(ip, port.number()).await {
        Err(HubError::Bind { addr, source })
            if matches!(port, Port::Default(_))
                && matches!(
                    source.kind(),
                    ErrorKind::PermissionDenied | ErrorKind::AddrInUse
                ) =>
        {
            tracing::warn!(%addr, error = %source, listener = what,
                "cannot listen on the default port; listening on a free port instead (hub.json and the banner say which; its flag chooses one)");
            bind(ip, 0).await
        }
        other => other,
    }
}

impl Hub {
    pub async fn start(config: HubConfig) -> Result<Hub, HubError> {
        let dir = &config.state_dir;
        private::create_dir(dir).map_err(unusable(dir))?;
        // One state, one owner: nothing in the directory is read or changed before the lock
        // is ours (a second hub, or `run --local`, on the same state is refused here).
        let lock = StateLock::acquire(
            &dir.join(LOCK_FILE),
            &format!("the hub state directory {}", dir.display()),
        )?;
        secure_state(dir)?;
        let identity = tls::load_or_create(dir, &config.hostnames)?;
        let db_path = dir.join(DB_FILE);
        // Created 0600 before SQLite opens it: its -wal and -shm files take the same mode.
        private::create_file(&db_path).map_err(unusable(&db_path))?;
        let store = Arc::new(store::Store::open(&db_path)?);
        let policies = auth::Policies::load_or_create(&store)?;
        let group_key = if config.auto_register {
            Some(match (&config.group_key, store.setting("group_key")?) {
                (Some(given), stored) => {
                    sas::check_key(given).map_err(HubError::GroupKey)?;
                    if stored.as_ref() != Some(given) {
                        store.put_setting("group_key", given)?;
                    }
                    given.clone()
                }
                (None, Some(key)) => key,
                (None, None) => {
                    let key = sas::generate_key();
                    store.put_setting("group_key", &key)?;
                    key
                }
            })
        } else {
            None
        };
        let jobs = jobs::Jobs::load(store.clone())?;
        let dps = dps::Dps::load(store.clone(), config.id_scope.as_deref(), "localhost")?;
        let x509 = x509::Authorities::load(store.clone(), &config.x509_cas)?;
        let c2d = c2d::CloudToDevice::load(store.clone())?;
        let registry = registry::Registry::load(store)?;

        let mqtt_listener = bind(config.bind, config.mqtt_port).await?;
        let api_listener = bind(config.bind, config.api_port).await?;
        let amqp_listener = bind_port(config.bind, config.amqp.port, "AMQPS").await?;
        let amqp_plain_listener = match config.amqp.plain_port {
            Some(port) => Some(bind_port(config.amqp.plain_bind, port, "AMQP").await?),
            None => None,
        };
        let local_addr = |listener: &TcpListener, ip, port| {
            listener.local_addr().map_err(|source| HubError::Bind {
                addr: SocketAddr::new(ip, port),
                source,
            })
        };
        let amqp_addr = local_addr(&amqp_listener, config.bind, config.amqp.port.number())?;
        // The endpoint's listeners, and so its connections, are driven by its own thread.
        let amqp_thread =
            amqp::thread::EndpointThread::start().map_err(HubError::EndpointThread)?;
        let adopt = |listener, addr| {
            amqp_thread
                .adopt(listener)
                .map_err(|source| HubError::Bind { addr, source })
        };
        let amqp_listener = adopt(amqp_listener, amqp_addr)?;
        let amqp_plain_addr = match &amqp_plain_listener {
            Some(listener) => Some(local_addr(
                listener,
                config.amqp.plain_bind,
                config.amqp.plain_port.map_or(0, Port::number),
            )?),
            None => None,
        };
        let amqp_plain_listener = match (amqp_plain_listener, amqp_plain_addr) {
            (Some(listener), Some(addr)) => Some(adopt(listener, addr)?),
            _ => None,
        };
        // With capture the store is durable: it is what makes acknowledged messages survive a
        // kill until capture has published them.
        let store_settings = events::StoreSettings {
            durable: config.capture.is_some(),
            ..config.events.clone()
        };
        let events = Arc::new(events::EventStore::open(
            dir,
            store_settings,
            events::Clock::System,
        )?);
        let ws_listener = bind_port(config.bind, config.ws_port, "WebSocket").await?;
        let mqtt_addr = mqtt_listener
            .local_addr()
            .map_err(|source| HubError::Bind {
                addr: SocketAddr::new(config.bind, config.mqtt_port),
                source,
            })?;
        let api_addr = api_listener.local_addr().map_err(|source| HubError::Bind {
            addr: SocketAddr::new(config.bind, config.api_port),
            source,
        })?;
        // A listener the hub may go without (`None`: not served), with its address.
        let bind_optional = |port: Option<Port>, what: &'static str| async move {
            let Some(port) = port else {
                return Ok::<_, HubError>(None);
            };
            let listener = bind_port(config.bind, port, what).await?;
            let addr = listener.local_addr().map_err(|source| HubError::Bind {
                addr: SocketAddr::new(config.bind, port.number()),
                source,
            })?;
            Ok(Some((listener, addr)))
        };
        let dps_listener = bind_optional(config.dps_port, "DPS").await?;
        let dps_addr = dps_listener.as_ref().map(|(_, addr)| *addr);
        let dps_ws_listener = bind_optional(config.dps_ws_port, "DPS WebSocket").await?;
        let dps_ws_addr = dps_ws_listener.as_ref().map(|(_, addr)| *addr);
        let ws_addr = ws_listener.local_addr().map_err(|source| HubError::Bind {
            addr: SocketAddr::new(config.bind, config.ws_port.number()),
            source,
        })?;

        let owner = policies
            .get("iothubowner")
            .expect("the default policies always include iothubowner");
        let info = HubInfo {
            hostname: "localhost".into(),
            mqtt_port: mqtt_addr.port(),
            api_port: api_addr.port(),
            ws_port: ws_addr.port(),
            ca_file: std::path::absolute(&identity.ca_file).unwrap_or(identity.ca_file.clone()),
            service_connection_string: ServiceConnectionString {
                host_name: format!("localhost:{}", api_addr.port()),
                shared_access_key_name: owner.name.clone(),
                shared_access_key: owner.primary_key.clone(),
            }
            .to_string(),
            group_key: group_key.clone(),
            capture: config.capture.as_ref().map(capture_info),
            dps_port: dps_addr.map(|a| a.port()),
            dps_ws_port: dps_ws_addr.map(|a| a.port()),
            id_scope: dps_addr.or(dps_ws_addr).map(|_| dps.id_scope.clone()),
            dps_service_connection_string: dps_addr.or(dps_ws_addr).map(|_| {
                ServiceConnectionString {
                    host_name: format!("localhost:{}", api_addr.port()),
                    shared_access_key_name: crate::protocol::dps::SERVICE_OWNER_POLICY.into(),
                    shared_access_key: dps.service_key().to_string(),
                }
                .to_string()
            }),
            amqp_port: Some(amqp_addr.port()),
            amqp_plain_port: amqp_plain_addr.map(|a| a.port()),
            eventhub_connection_string: None,
            eventhub_emulator_connection_string: None,
        };
        // The event hub's name is the hub's: the first label of its host name.
        let hub_name = info
            .hostname
            .split('.')
            .next()
            .unwrap_or("localhost")
            .to_string();
        let mut info = info;
        if let Some(service) = policies.get("service") {
            info.eventhub_connection_string = Some(amqp::connection_string(
                &info.hostname,
                &service.name,
                &service.primary_key,
                &hub_name,
            ));
            info.eventhub_emulator_connection_string = amqp_plain_addr.map(|addr| {
                amqp::emulator_connection_string(
                    &info.hostname,
                    addr.port(),
                    &service.name,
                    &service.primary_key,
                    &hub_name,
                )
            });
        }

        // Started before the listeners, so that what a killed hub left unpublished in the
        // store goes into the first windows.
        let capture = match &config.capture {
            Some(settings) => Some(capture::Capture::start(
                settings.clone(),
                events.clone(),
                capture::Naming {
                    namespace: capture::NAMESPACE.into(),
                    hub: info.hostname.clone(),
                    partition: String::new(),
                },
            )?),
            None => None,
        };

        let mut liveness = accept::Liveness::default();
        let mqtt_alive = liveness.watch("MQTT accept loop");
        let api_alive = liveness.watch("API accept loop");
        let ws_alive = liveness.watch("WebSocket accept loop");
        let scheduler_alive = liveness.watch("job scheduler");
        let dps_alive = dps_addr.map(|_| liveness.watch("DPS accept loop"));
        let dps_ws_alive = dps_ws_addr.map(|_| liveness.watch("DPS WebSocket accept loop"));
        let amqp_alive = liveness.watch("AMQPS accept loop");
        let amqp_plain_alive = amqp_plain_listener
            .as_ref()
            .map(|_| liveness.watch("AMQP accept loop"));
        let state = Arc::new(HubState {
            host_names: auth::HostNames::new(&config.hostnames, api_addr.port()),
            policies,
            registry,
            sessions: sessions::Sessions::default(),
            c2d,
            methods: methods::MethodCalls::default(),
            jobs,
            telemetry: telemetry::Telemetry::new(RECENT_EVENTS),
            capture: capture.as_ref().map(|c| c.intake.clone()),
            events,
            eventhub: amqp::Endpoint::new(hub_name, &config.amqp.consumer_groups),
            group_key,
            faults: faults::Faults::default(),
            counters: Default::default(),
            dps,
            x509,
            liveness,
        });

        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config.clone());
        let devices_pool = mqtt::listener::unauthenticated_pool();
        tasks.spawn(mqtt::listener::serve(
            mqtt_listener,
            acceptor.clone(),
            state.clone(),
            devices_pool.clone(),
            shutdown.clone(),
            tasks.clone(),
            mqtt_alive,
        ));
        tasks.spawn(mqtt::listener::serve_websocket(
            ws_listener,
            acceptor.clone(),
            state.clone(),
            devices_pool,
            shutdown.clone(),
            tasks.clone(),
            ws_alive,
        ));
        tasks.spawn(jobs::run_scheduler(
            state.clone(),
            shutdown.clone(),
            tasks.clone(),
            scheduler_alive,
        ));
        if let (Some((listener, _)), Some(alive)) = (dps_listener, dps_alive) {
            tasks.spawn(dps::mqtt::serve(
                listener,
                acceptor.clone(),
                state.clone(),
                shutdown.clone(),
                tasks.clone(),
                alive,
                dps::mqtt::Transport::Mqtt,
            ));
        }
        if let (Some((listener, _)), Some(alive)) = (dps_ws_listener, dps_ws_alive) {
            tasks.spawn(dps::mqtt::serve(
                listener,
                acceptor.clone(),
                state.clone(),
                shutdown.clone(),
                tasks.clone(),
                alive,
                dps::mqtt::Transport::WebSocket,
            ));
        }
        tasks.spawn_on(
            amqp::serve(
                amqp_listener,
                Some(acceptor.clone()),
                state.clone(),
                shutdown.clone(),
                tasks.clone(),
                amqp_alive,
            ),
            amqp_thread.handle(),
        );
        if let (Some(listener), Some(alive)) = (amqp_plain_listener, amqp_plain_alive) {
            tasks.spawn_on(
                amqp::serve(
                    listener,
                    None,
                    state.clone(),
                    shutdown.clone(),
                    tasks.clone(),
                    alive,
                ),
                amqp_thread.handle(),
            );
        }
        tasks.spawn(expire_events(state.clone(), shutdown.clone()));
        tasks.spawn(c2d::run_expiry(state.clone(), shutdown.clone()));
        tasks.spawn(api::serve(
            api_listener,
            acceptor,
            state.clone(),
            shutdown.clone(),
            tasks.clone(),
            api_alive,
        ));

        let info_path = dir.join(HubInfo::FILE_NAME);
        let text = serde_json::to_string_pretty(&info).expect("HubInfo always serializes");
        private::write_file(&info_path, text.as_bytes()).map_err(unusable(&info_path))?;
        Ok(Hub {
            state,
            info,
            mqtt_addr,
            api_addr,
            dps_addr,
            dps_ws_addr,
            amqp_addr,
            amqp_plain_addr,
            ws_addr,
            shutdown,
            tasks,
            capture,
            _amqp_thread: amqp_thread,
            _lock: lock,
        })
    }

    pub fn info(&self) -> &HubInfo {
        &self.info
    }

    pub fn state(&self) -> &Arc<HubState> {
        &self.state
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The DPS device endpoint, when the hub serves one.
    pub fn dps_addr(&self) -> Option<SocketAddr> {
        self.dps_addr
    }

    /// The DPS device endpoint over WebSocket, when the hub serves one.
    pub fn dps_ws_addr(&self) -> Option<SocketAddr> {
        self.dps_ws_addr
    }

    /// The Event Hubs-compatible endpoint over TLS.
    pub fn amqp_addr(&self) -> SocketAddr {
        self.amqp_addr
    }

    /// The plain AMQP listener, when there is one.
    pub fn amqp_plain_addr(&self) -> Option<SocketAddr> {
        self.amqp_plain_addr
    }

    /// Where MQTT over WebSocket is served (path `/$iothub/websocket`, subprotocol `mqtt`).
    pub fn ws_addr(&self) -> SocketAddr {
        self.ws_addr
    }

    /// The connection string a device uses to reach this hub. `GatewayHostName` carries the
    /// MQTT port when it is not the standard 8883 (the agent honours it; SDKs that dial 8883
    /// need the standard port).
    pub fn device_connection_string(&self, device_id: &str) -> Option<String> {
        let key = self
            .state
            .registry
            .get(device_id, |d| d.primary_key.clone())
            .ok()?;
        let gateway = (self.mqtt_addr.port() != crate::protocol::MQTT_TLS_PORT)
            .then(|| format!("localhost:{}", self.mqtt_addr.port()));
        Some(
            DeviceConnectionString {
                host_name: self.info.hostname.clone(),
                device_id: device_id.to_string(),
                module_id: None,
                shared_access_key: Some(key),
                shared_access_signature: None,
                gateway_host_name: gateway,
                x509: false,
            }
            .to_string(),
        )
    }

    /// `Ok` while the hub serves: not stopping, and the accept loops and the job scheduler
    /// running. Else why not, in one line (no secrets): what `/healthz` and the systemd
    /// watchdog go by.
    pub fn health(&self) -> Result<(), String> {
        health_of(&self.state, &self.shutdown)
    }

    /// [`Hub::health`] as a value that outlives the borrow of the hub, for tasks such as the
    /// systemd watchdog.
    pub fn health_probe(&self) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
        let state = self.state.clone();
        let shutdown = self.shutdown.clone();
        move || health_of(&state, &shutdown)
    }

    /// Stops accepting, closes every connection and waits for the tasks to end; then closes
    /// the open capture window and writes it; then the state directory's lock is released.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        if let Some(capture) = &self.capture {
            capture.finish().await;
        }
    }
}

/// Drops expired events every [`events::EXPIRY_INTERVAL`] (appends drop them too; this is
/// for a quiet hub), until shutdown.
async fn expire_events(state: Arc<HubState>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(events::EXPIRY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => state.events.expire(),
        }
    }
}

/// `hub.json`'s `capture`: what the hub archives, and where.
fn capture_info(settings: &capture::CaptureSettings) -> crate::common::local_hub::CaptureInfo {
    crate::common::local_hub::CaptureInfo {
        dest: settings.destination.describe(),
        format: settings.format.as_str().into(),
        codec: settings.codec.as_str().into(),
        encoding: settings.encoding.as_str().into(),
        window_secs: settings.window.as_secs(),
        window_bytes: settings.window_bytes,
        skip_empty: settings.skip_empty,
    }
}

fn health_of(state: &HubState, shutdown: &CancellationToken) -> Result<(), String> {
    if shutdown.is_cancelled() {
        return Err("the hub is stopping".into());
    }
    state.health()
}

/// Makes the state directory and its secret files private, tightening what an older version
/// left wider (each change is logged by `private::tighten`).
fn secure_state(dir: &Path) -> Result<(), HubError> {
    private::tighten(dir, private::DIR_MODE).map_err(unusable(dir))?;
    for name in SECRET_FILES {
        let path = dir.join(name);
        private::tighten(&path, private::FILE_MODE).map_err(unusable(&path))?;
    }
    Ok(())
}

fn unusable(path: &Path) -> impl FnOnce(std::io::Error) -> HubError {
    let path = path.to_owned();
    move |source| HubError::State { path, source }
}

#[cfg(test)]
mod tests {
    use std::io::{Error, ErrorKind};

    use super::*;

    #[test]
    fn configuration_problems_are_told_from_runtime_failures() {
        let addr: SocketAddr = "127.0.0.1:8883".parse().unwrap();
        let bind = |kind| HubError::Bind {
            addr,
            source: Error::from(kind),
        };
        assert!(bind(ErrorKind::AddrNotAvailable).is_config());
        assert!(bind(ErrorKind::PermissionDenied).is_config());
        assert!(
            !bind(ErrorKind::AddrInUse).is_config(),
            "the port may free up"
        );
        let state = HubError::State {
            path: "/var/lib/simdevice-hub".into(),
            source: Error::from(ErrorKind::PermissionDenied),
        };
        assert!(state.is_config());
        let sql = HubError::Store(store::StoreError::Sql(rusqlite::Error::QueryReturnedNoRows));
        assert!(!sql.is_config());
        let refused = HubError::Registry(error::IotHubError::argument("bad id"));
        assert!(refused.is_config());
        assert!(!HubError::Registry(error::IotHubError::internal("disk")).is_config());
    }
}
