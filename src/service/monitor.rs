//! `simdevice service monitor`: the events of a hub's built-in endpoint as they arrive, one JSON
//! line each, like `az iot hub monitor-events`, read over AMQP 1.0 with fe2o3-amqp's client.
//!
//! From a service connection string it does what IoT Hub asks of a back end: it logs in to the
//! hub itself (SASL PLAIN as `{policy}@sas.root.{hub}` with a SAS token for the host), attaches
//! a receiver at `messages/events/ConsumerGroups/{cg}/Partitions/0` and follows the
//! `amqp:link:redirect` that answers it to the Event Hubs-compatible endpoint (`hostname`,
//! `network-host`, `port`, and the event hub's name in `address`, between the port and
//! `/ConsumerGroups`, as Microsoft's samples parse it). There, or directly from an Event Hubs
//! connection string, it logs in with SASL PLAIN as the policy and its key (a login that lasts
//! as long as the connection: nothing to renew), reads the partition ids from `$management` and
//! attaches one receiver per partition. The same code runs against Azure and the local hub.
//!
//! One task per partition receives; all of them feed one bounded channel (`QUEUE`) that the
//! caller's loop drains to its writer. When the writer is slow, the channel fills and the
//! partition tasks wait, so their link credit is not renewed and the hub holds the rest: nothing
//! is dropped. The key and the tokens never appear in an error or a log line.
//!
//! Talks to a hub only over the network; never reaches into `crate::hub`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::{LinkStateError, RecvError};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{self, LinkError};
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Message, MessageId, Properties, Source,
};
use fe2o3_amqp::types::primitives::{SimpleValue, Symbol, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;
use serde_json::{json, Map};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::protocol::connection_string::ServiceConnectionString;
use crate::protocol::sas;

/// The AMQPS port IoT Hub and Event Hubs listen on.
pub const AMQPS_PORT: u16 = 5671;
/// The plain port of an emulator-mode Event Hubs connection string without one.
const EMULATOR_PORT: u16 = 5672;
/// Time for each step of a connection: TCP, TLS, the AMQP open, an attach, a `$management` answer.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// Events between the partition tasks and the writer (module notes).
pub const QUEUE: usize = 1024;
/// How long the SAS token of the login to IoT Hub lives: it is used once, for the redirect.
const LOGIN_TOKEN_SECS: u64 = 300;
/// Event Hubs' selector filter.
const SELECTOR_FILTER: &str = "apache.org:selector-filter:string";

/// Where `monitor` reads from.
#[derive(Clone, PartialEq, Eq)]
pub enum Target {
    /// An IoT Hub's service connection string: the hub redirects to its event hub.
    IotHub {
        connection_string: ServiceConnectionString,
        /// The hub's AMQPS port (5671 on Azure; the local hub's `amqp_port`).
        port: u16,
    },
    /// An Event Hubs(-compatible) endpoint.
    EventHub(EventHubEndpoint),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::IotHub {
                connection_string,
                port,
            } => f
                .debug_struct("IotHub")
                .field("host", &connection_string.host_name)
                .field("port", port)
                .finish(),
            Target::EventHub(endpoint) => endpoint.fmt(f),
        }
    }
}

/// An Event Hubs endpoint: where to dial, the name to present, the event hub, the policy.
#[derive(Clone, PartialEq, Eq)]
pub struct EventHubEndpoint {
    /// The name for TLS and the open frame.
    pub hostname: String,
    /// Where to dial (the redirect's `network-host`; else the hostname).
    pub network_host: String,
    pub port: u16,
    /// TLS (`amqps`), or plain AMQP (an emulator, a redirect to `amqp://`).
    pub tls: bool,
    pub event_hub: String,
    pub policy: String,
    /// Secret: never printed.
    key: String,
}

impl std::fmt::Debug for EventHubEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventHubEndpoint")
            .field("hostname", &self.hostname)
            .field("network_host", &self.network_host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("event_hub", &self.event_hub)
            .field("policy", &self.policy)
            .field("key", &"***")
            .finish()
    }
}

/// Where each partition's receiver starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartFrom {
    /// The oldest retained event.
    Start,
    /// Only events enqueued from now on.
    Now,
    /// Events enqueued at or after this time.
    Time(DateTime<Utc>),
}

impl StartFrom {
    /// `start`, `now`, an RFC 3339 time or milliseconds since the Unix epoch.
    pub fn parse(text: &str) -> Result<StartFrom, MonitorError> {
        match text {
            "start" => Ok(StartFrom::Start),
            "now" => Ok(StartFrom::Now),
            _ => {
                if let Ok(time) = DateTime::parse_from_rfc3339(text) {
                    return Ok(StartFrom::Time(time.with_timezone(&Utc)));
                }
                text.parse::<i64>()
                    .ok()
                    .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
                    .map(StartFrom::Time)
                    .ok_or_else(|| MonitorError::BadFrom(text.to_string()))
            }
        }
    }

    /// The selector expression Event Hubs' receivers take.
    fn selector(&self) -> String {
        match self {
            StartFrom::Start => "amqp.annotation.x-opt-offset > '-1'".into(),
            StartFrom::Now => "amqp.annotation.x-opt-offset > '@latest'".into(),
            StartFrom::Time(time) => format!(
                "amqp.annotation.x-opt-enqueued-time >= '{}'",
                time.timestamp_millis()
            ),
        }
    }
}

/// What to read and how to show it.
#[derive(Clone, Debug)]
pub struct Options {
    /// Only this device's events.
    pub device: Option<String>,
    pub consumer_group: String,
    pub from: StartFrom,
    /// Show system and application properties and annotations.
    pub properties: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("--from {0:?} is not start, now, an RFC 3339 time or milliseconds since the epoch")]
    BadFrom(String),
    /// The Event Hubs connection string does not parse. Its text (with the key) is not shown.
    #[error("the Event Hubs connection string is not usable: {0}")]
    EventHubConnectionString(&'static str),
    #[error("cannot make a SAS token from the policy's key")]
    Token(#[source] sas::SasError),
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from {addr} within {secs} s", secs = STEP_TIMEOUT.as_secs())]
    Timeout { addr: String },
    #[error("the TLS handshake with {host} failed")]
    Tls {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{host} is not a usable TLS server name")]
    ServerName { host: String },
    #[error("the extra CA is not usable")]
    Ca(#[source] std::io::Error),
    #[error("cannot set up TLS")]
    TlsConfig(#[source] rustls::Error),
    /// The AMQP open failed; a refused login is a SASL error in the source.
    #[error(
        "{host} did not open an AMQP connection as {user} (a wrong key or policy is refused here)"
    )]
    Open {
        host: String,
        user: String,
        #[source]
        source: fe2o3_amqp::connection::OpenError,
    },
    #[error("cannot begin an AMQP session with {host}")]
    Session {
        host: String,
        #[source]
        source: fe2o3_amqp::session::BeginError,
    },
    #[error("cannot attach to {address}")]
    Attach {
        address: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The hub detached a link with an AMQP error (unauthorized, not found, ...).
    #[error("{address} was refused: {condition}: {description}")]
    Refused {
        address: String,
        condition: String,
        description: String,
    },
    #[error("the hub did not redirect {address} to its Event Hubs-compatible endpoint")]
    NoRedirect { address: String },
    #[error("the redirect names no usable endpoint ({0})")]
    BadRedirect(&'static str),
    #[error("the $management answer is not usable: {0}")]
    Management(String),
    #[error("receiving from partition {partition} failed")]
    Receive {
        partition: String,
        #[source]
        source: RecvError,
    },
    #[error("cannot write the events")]
    Output(#[source] std::io::Error),
}

impl MonitorError {
    /// True for a mistake in the command line or the connection string (exit 2).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            MonitorError::BadFrom(_)
                | MonitorError::EventHubConnectionString(_)
                | MonitorError::Token(_)
                | MonitorError::Ca(_)
        )
    }
}

/// Parses an Event Hubs connection string
/// (`Endpoint=sb://host[:port]/;SharedAccessKeyName=..;SharedAccessKey=..;EntityPath=..[;UseDevelopmentEmulator=true]`).
/// Without a port: 5671 over TLS, or 5672 plain in emulator mode.
pub fn parse_event_hub_connection_string(text: &str) -> Result<EventHubEndpoint, MonitorError> {
    let bad = MonitorError::EventHubConnectionString;
    let (mut endpoint, mut policy, mut key, mut entity, mut emulator) =
        (None, None, None, None, false);
    for segment in text.trim().split(';').filter(|s| !s.is_empty()) {
        let (name, value) = segment.split_once('=').ok_or(bad("a segment has no '='"))?;
        match name.trim().to_ascii_lowercase().as_str() {
            "endpoint" => endpoint = Some(value.trim().to_string()),
            "sharedaccesskeyname" => policy = Some(value.trim().to_string()),
            "sharedaccesskey" => key = Some(value.trim().to_string()),
            "entitypath" => entity = Some(value.trim().to_string()),
            "usedevelopmentemulator" => emulator = value.trim().eq_ignore_ascii_case("true"),
            _ => {}
        }
    }
    let endpoint = endpoint.ok_or(bad("no Endpoint"))?;
    let authority = endpoint
        .split_once("://")
        .map_or(endpoint.as_str(), |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => (
            host.to_string(),
            Some(
                port.parse::<u16>()
                    .map_err(|_| bad("the port is not a number"))?,
            ),
        ),
        _ => (authority.to_string(), None),
    };
    if host.is_empty() {
        return Err(bad("the Endpoint has no host"));
    }
    let port = port.unwrap_or(if emulator { EMULATOR_PORT } else { AMQPS_PORT });
    Ok(EventHubEndpoint {
        network_host: host.clone(),
        hostname: host,
        port,
        tls: !emulator,
        event_hub: entity.ok_or(bad("no EntityPath"))?,
        policy: policy.ok_or(bad("no SharedAccessKeyName"))?,
        key: key.ok_or(bad("no SharedAccessKey"))?,
    })
}

/// One event as `monitor` prints it (a JSON object, one line).
pub type Line = serde_json::Value;

/// Streams the events of every partition to `lines` until `stop` is cancelled or a receiver
/// fails. `ca_pem`: certificates trusted besides the public roots.
pub async fn monitor(
    target: Target,
    options: Options,
    ca_pem: Option<&str>,
    lines: mpsc::Sender<Line>,
    stop: CancellationToken,
) -> Result<(), MonitorError> {
    let tls = tls_connector(ca_pem)?;
    let endpoint = match target {
        Target::EventHub(endpoint) => endpoint,
        Target::IotHub {
            connection_string,
            port,
        } => follow_redirect(&connection_string, port, &options.consumer_group, &tls).await?,
    };
    tracing::info!(
        host = endpoint.hostname,
        port = endpoint.port,
        event_hub = endpoint.event_hub,
        "reading the Event Hubs-compatible endpoint"
    );
    let user = endpoint.policy.clone();
    let mut connection = open(
        &endpoint.network_host,
        &endpoint.hostname,
        endpoint.port,
        endpoint.tls.then_some(&tls),
        SaslProfile::Plain {
            username: user,
            password: endpoint.key.clone(),
        },
    )
    .await?;
    let result = read_partitions(&mut connection, &endpoint, &options, lines, stop).await;
    let _ = connection.close().await;
    result
}

async fn read_partitions(
    connection: &mut ConnectionHandle<()>,
    endpoint: &EventHubEndpoint,
    options: &Options,
    lines: mpsc::Sender<Line>,
    stop: CancellationToken,
) -> Result<(), MonitorError> {
    let mut session = Session::begin(connection)
        .await
        .map_err(|source| MonitorError::Session {
            host: endpoint.hostname.clone(),
            source,
        })?;
    let partitions = partition_ids(&mut session, &endpoint.event_hub).await?;
    let (failed_tx, mut failed) = mpsc::channel::<MonitorError>(partitions.len().max(1));
    let tasks = tokio_util::task::TaskTracker::new();
    for partition in &partitions {
        let address = format!(
            "{}/ConsumerGroups/{}/Partitions/{partition}",
            endpoint.event_hub, options.consumer_group
        );
        let receiver = attach_receiver(&mut session, &address, &options.from).await?;
        tasks.spawn(receive(
            receiver,
            address,
            partition.clone(),
            options.clone(),
            lines.clone(),
            failed_tx.clone(),
            stop.clone(),
        ));
    }
    drop(failed_tx);
    tasks.close();
    tracing::info!(
        partitions = partitions.len(),
        consumer_group = options.consumer_group,
        "monitoring: a receiver on every partition"
    );
    let outcome = tokio::select! {
        _ = stop.cancelled() => Ok(()),
        error = failed.recv() => match error {
            Some(error) => Err(error),
            None => Ok(()),
        },
    };
    stop.cancel();
    tasks.wait().await;
    let _ = session.end().await;
    outcome
}

/// Logs in to the hub itself and asks for its events, which the hub answers with a redirect.
async fn follow_redirect(
    connection_string: &ServiceConnectionString,
    port: u16,
    consumer_group: &str,
    tls: &tokio_rustls::TlsConnector,
) -> Result<EventHubEndpoint, MonitorError> {
    // `HostName` may carry the REST port (the local hub's `localhost:8443`): AMQP has its own.
    let host = host_without_port(&connection_string.host_name).to_string();
    let hub_name = host.split('.').next().unwrap_or(&host).to_string();
    let policy = &connection_string.shared_access_key_name;
    let expiry = u64::try_from(Utc::now().timestamp()).unwrap_or(0) + LOGIN_TOKEN_SECS;
    let token = sas::generate_token(
        &host,
        &connection_string.shared_access_key,
        Some(policy),
        expiry,
    )
    .map_err(MonitorError::Token)?;
    let mut connection = open(
        &host,
        &host,
        port,
        Some(tls),
        SaslProfile::Plain {
            username: format!("{policy}@sas.root.{hub_name}"),
            password: token,
        },
    )
    .await?;
    let result = async {
        let mut session =
            Session::begin(&mut connection)
                .await
                .map_err(|source| MonitorError::Session {
                    host: host.clone(),
                    source,
                })?;
        let address =
            format!("amqps://{host}/messages/events/ConsumerGroups/{consumer_group}/Partitions/0");
        let mut receiver = attach_receiver(&mut session, &address, &StartFrom::Now).await?;
        let error = match tokio::time::timeout(STEP_TIMEOUT, receiver.recv::<Body<Value>>()).await {
            Err(_) => return Err(MonitorError::NoRedirect { address }),
            Ok(Ok(_)) => return Err(MonitorError::NoRedirect { address }),
            Ok(Err(error)) => match detach_error(error) {
                Ok(error) => error,
                Err(_) => return Err(MonitorError::NoRedirect { address }),
            },
        };
        let _ = session.end().await;
        if error.condition != LinkError::Redirect.into() {
            return Err(refused(&address, &error));
        }
        redirected_endpoint(&error, connection_string)
    }
    .await;
    let _ = connection.close().await;
    result
}

/// The Event Hubs endpoint a redirect's info names (module notes).
fn redirected_endpoint(
    error: &definitions::Error,
    connection_string: &ServiceConnectionString,
) -> Result<EventHubEndpoint, MonitorError> {
    let info = error
        .info
        .as_ref()
        .ok_or(MonitorError::BadRedirect("no info"))?;
    let text = |key: &str| match info.get(&Symbol::from(key)) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Symbol(s)) => Some(s.as_str().to_string()),
        _ => None,
    };
    let address = text("address").ok_or(MonitorError::BadRedirect("no address"))?;
    let (scheme, rest) = address
        .split_once("://")
        .ok_or(MonitorError::BadRedirect("the address has no scheme"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let event_hub = path
        .split('/')
        .next()
        .filter(|n| !n.is_empty())
        .ok_or(MonitorError::BadRedirect("the address names no event hub"))?;
    let hostname = text("hostname").unwrap_or_else(|| host_without_port(authority).to_string());
    let port = match info.get(&Symbol::from("port")) {
        Some(Value::Int(p)) => u16::try_from(*p).ok(),
        Some(Value::Uint(p)) => u16::try_from(*p).ok(),
        Some(Value::Long(p)) => u16::try_from(*p).ok(),
        Some(Value::Ulong(p)) => u16::try_from(*p).ok(),
        Some(Value::Ushort(p)) => Some(*p),
        Some(Value::String(p)) => p.parse().ok(),
        _ => authority.rsplit_once(':').and_then(|(_, p)| p.parse().ok()),
    }
    .unwrap_or(AMQPS_PORT);
    Ok(EventHubEndpoint {
        network_host: text("network-host").unwrap_or_else(|| hostname.clone()),
        hostname,
        port,
        tls: !scheme.eq_ignore_ascii_case("amqp"),
        event_hub: event_hub.to_string(),
        policy: connection_string.shared_access_key_name.clone(),
        key: connection_string.shared_access_key.clone(),
    })
}

fn host_without_port(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((host, port))
            if port.bytes().all(|b| b.is_ascii_digit())
                && (!host.contains(':') || host.ends_with(']')) =>
        {
            host
        }
        _ => authority,
    }
}

fn refused(address: &str, error: &definitions::Error) -> MonitorError {
    MonitorError::Refused {
        address: address.to_string(),
        condition: condition_name(&error.condition),
        description: error.description.clone().unwrap_or_default(),
    }
}

fn condition_name(condition: &definitions::ErrorCondition) -> String {
    use definitions::ErrorCondition as C;
    let symbol = match condition {
        C::AmqpError(e) => Symbol::from(e),
        C::ConnectionError(e) => Symbol::from(e),
        C::SessionError(e) => Symbol::from(e),
        C::LinkError(e) => Symbol::from(e),
        C::Custom(s) => s.clone(),
        #[allow(unreachable_patterns)]
        _ => Symbol::from("amqp:internal-error"),
    };
    symbol.as_str().to_string()
}

/// The AMQP error a receive ended with, when the peer detached or closed the link with one.
fn detach_error(error: RecvError) -> Result<definitions::Error, RecvError> {
    match error {
        RecvError::LinkStateError(
            LinkStateError::RemoteClosedWithError(error)
            | LinkStateError::RemoteDetachedWithError(error),
        ) => Ok(error),
        other => Err(other),
    }
}

fn tls_connector(ca_pem: Option<&str>) -> Result<tokio_rustls::TlsConnector, MonitorError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = ca_pem {
        for cert in crate::common::pem::parse_pem_certificates(pem).map_err(MonitorError::Ca)? {
            roots
                .add(cert)
                .map_err(|e| MonitorError::Ca(std::io::Error::other(e)))?;
        }
    }
    // ring, as every client side of the crate.
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(MonitorError::TlsConfig)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Dials `network_host:port`, TLS for `hostname` when `tls` is given, then the AMQP open with
/// `sasl`.
async fn open(
    network_host: &str,
    hostname: &str,
    port: u16,
    tls: Option<&tokio_rustls::TlsConnector>,
    sasl: SaslProfile,
) -> Result<ConnectionHandle<()>, MonitorError> {
    let addr = if network_host.contains(':') && !network_host.starts_with('[') {
        format!("[{network_host}]:{port}")
    } else {
        format!("{network_host}:{port}")
    };
    let timeout = || MonitorError::Timeout { addr: addr.clone() };
    let tcp = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(&addr))
        .await
        .map_err(|_| timeout())?
        .map_err(|source| MonitorError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let user = match &sasl {
        SaslProfile::Plain { username, .. } => username.clone(),
        _ => "anonymous".into(),
    };
    match tls {
        Some(tls) => {
            let name =
                rustls::pki_types::ServerName::try_from(hostname.to_string()).map_err(|_| {
                    MonitorError::ServerName {
                        host: hostname.to_string(),
                    }
                })?;
            let stream = tokio::time::timeout(STEP_TIMEOUT, tls.connect(name, tcp))
                .await
                .map_err(|_| timeout())?
                .map_err(|source| MonitorError::Tls {
                    host: hostname.to_string(),
                    source,
                })?;
            open_amqp(stream, hostname, user, sasl, &addr).await
        }
        None => open_amqp(tcp, hostname, user, sasl, &addr).await,
    }
}

async fn open_amqp<S>(
    stream: S,
    hostname: &str,
    user: String,
    sasl: SaslProfile,
    addr: &str,
) -> Result<ConnectionHandle<()>, MonitorError>
where
    S: AsyncRead + AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
{
    let opened = Connection::builder()
        .container_id(format!(
            "simdevice-monitor-{}",
            uuid::Uuid::new_v4().simple()
        ))
        .hostname(hostname)
        .sasl_profile(sasl)
        .open_with_stream(stream);
    tokio::time::timeout(STEP_TIMEOUT, opened)
        .await
        .map_err(|_| MonitorError::Timeout {
            addr: addr.to_string(),
        })?
        .map_err(|source| MonitorError::Open {
            host: hostname.to_string(),
            user,
            source,
        })
}

async fn attach_receiver(
    session: &mut SessionHandle<()>,
    address: &str,
    from: &StartFrom,
) -> Result<Receiver, MonitorError> {
    let filter = Value::Described(Box::new(Described {
        descriptor: Descriptor::Name(Symbol::from(SELECTOR_FILTER)),
        value: Value::String(from.selector()),
    }));
    let source = Source::builder()
        .address(address.to_string())
        .add_to_filter_using_legacy_format(SELECTOR_FILTER, filter)
        .build();
    let attach = Receiver::builder()
        .name(format!("monitor-{}", uuid::Uuid::new_v4().simple()))
        .source(source)
        .attach(session);
    tokio::time::timeout(STEP_TIMEOUT, attach)
        .await
        .map_err(|_| MonitorError::Timeout {
            addr: address.to_string(),
        })?
        .map_err(|source| MonitorError::Attach {
            address: address.to_string(),
            source: Box::new(source),
        })
}

/// The event hub's partition ids, from a `$management` READ (as the Event Hubs SDKs ask).
async fn partition_ids(
    session: &mut SessionHandle<()>,
    event_hub: &str,
) -> Result<Vec<String>, MonitorError> {
    let node = "$management";
    let reply_to = format!("monitor-reply-{}", uuid::Uuid::new_v4().simple());
    let attach_error = |source: Box<dyn std::error::Error + Send + Sync>| MonitorError::Attach {
        address: node.to_string(),
        source,
    };
    let mut sender = Sender::attach(session, format!("{reply_to}-tx"), node)
        .await
        .map_err(|e| attach_error(Box::new(e)))?;
    let mut responses = Receiver::builder()
        .name(format!("{reply_to}-rx"))
        .source(node)
        .target(reply_to.clone())
        .attach(session)
        .await
        .map_err(|e| attach_error(Box::new(e)))?;
    let properties = Properties {
        message_id: Some(MessageId::String(reply_to.clone())),
        reply_to: Some(reply_to.clone()),
        ..Default::default()
    };
    let application = ApplicationProperties::builder()
        .insert("operation", SimpleValue::String("READ".into()))
        .insert("name", SimpleValue::String(event_hub.to_string()))
        .insert("type", SimpleValue::String("com.microsoft:eventhub".into()))
        .build();
    let request = Message::builder()
        .properties(properties)
        .application_properties(application)
        .body(Body::Value(AmqpValue(Value::Null)))
        .build();
    let answer = async {
        sender
            .send(request)
            .await
            .map_err(|e| MonitorError::Management(e.to_string()))?;
        let delivery = responses
            .recv::<Body<Value>>()
            .await
            .map_err(|e| MonitorError::Management(e.to_string()))?;
        let _ = responses.accept(&delivery).await;
        Ok::<_, MonitorError>(delivery.into_message())
    };
    let answer = tokio::time::timeout(STEP_TIMEOUT, answer)
        .await
        .map_err(|_| MonitorError::Timeout {
            addr: node.to_string(),
        })??;
    let _ = sender.close().await;
    let _ = responses.close().await;
    let status = answer
        .application_properties
        .as_ref()
        .and_then(|p| p.0.get("status-code"))
        .and_then(|v| match v {
            SimpleValue::Int(s) => Some(i64::from(*s)),
            SimpleValue::Long(s) => Some(*s),
            SimpleValue::Uint(s) => Some(i64::from(*s)),
            _ => None,
        });
    if status != Some(200) {
        return Err(MonitorError::Management(format!(
            "status {}",
            status.map_or_else(|| "missing".to_string(), |s| s.to_string())
        )));
    }
    let Body::Value(AmqpValue(Value::Map(body))) = &answer.body else {
        return Err(MonitorError::Management("the body is not a map".into()));
    };
    let ids = body
        .get(&Value::String("partition_ids".into()))
        .or_else(|| body.get(&Value::Symbol(Symbol::from("partition_ids"))));
    let ids: Vec<String> = match ids {
        Some(Value::Array(ids)) => ids
            .iter()
            .filter_map(|v| match v {
                Value::String(s) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        Some(Value::List(ids)) => ids
            .iter()
            .filter_map(|v| match v {
                Value::String(s) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if ids.is_empty() {
        return Err(MonitorError::Management("no partition ids".into()));
    }
    Ok(ids)
}

/// One partition's receiver: every event (of the device, with a filter) becomes a line.
async fn receive(
    mut receiver: Receiver,
    address: String,
    partition: String,
    options: Options,
    lines: mpsc::Sender<Line>,
    failed: mpsc::Sender<MonitorError>,
    stop: CancellationToken,
) {
    loop {
        let delivery = tokio::select! {
            _ = stop.cancelled() => break,
            delivery = receiver.recv::<Body<Value>>() => delivery,
        };
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(error) => {
                let error = match detach_error(error) {
                    Ok(error) => refused(&address, &error),
                    Err(source) => MonitorError::Receive {
                        partition: partition.clone(),
                        source,
                    },
                };
                let _ = failed.send(error).await;
                break;
            }
        };
        if receiver.accept(&delivery).await.is_err() {
            break;
        }
        let message = delivery.into_message();
        let Some(line) = event_line(&message, &partition, &options) else {
            continue;
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            // A full queue waits here: the link's credit is not renewed meanwhile (module notes).
            sent = lines.send(line) => if sent.is_err() { break },
        }
    }
    let _ = receiver.close().await;
}

fn value_json(value: &Value) -> serde_json::Value {
    match value {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => json!(b),
        Value::Ubyte(n) => json!(n),
        Value::Ushort(n) => json!(n),
        Value::Uint(n) => json!(n),
        Value::Ulong(n) => json!(n),
        Value::Byte(n) => json!(n),
        Value::Short(n) => json!(n),
        Value::Int(n) => json!(n),
        Value::Long(n) => json!(n),
        Value::Float(n) => json!(n.into_inner()),
        Value::Double(n) => json!(n.into_inner()),
        Value::Timestamp(t) => json!(t.milliseconds()),
        Value::String(s) => json!(s),
        Value::Symbol(s) => json!(s.as_str()),
        Value::Binary(b) => json!(String::from_utf8_lossy(b)),
        other => json!(format!("{other:?}")),
    }
}

fn simple_json(value: &SimpleValue) -> serde_json::Value {
    match value {
        SimpleValue::String(s) => json!(s),
        SimpleValue::Symbol(s) => json!(s.as_str()),
        SimpleValue::Bool(b) => json!(b),
        SimpleValue::Int(n) => json!(n),
        SimpleValue::Long(n) => json!(n),
        SimpleValue::Uint(n) => json!(n),
        SimpleValue::Ulong(n) => json!(n),
        SimpleValue::Double(n) => json!(n.into_inner()),
        SimpleValue::Timestamp(t) => json!(t.milliseconds()),
        SimpleValue::Null => serde_json::Value::Null,
        other => json!(format!("{other:?}")),
    }
}

fn id_json(id: &MessageId) -> serde_json::Value {
    match id {
        MessageId::String(s) => json!(s),
        MessageId::Ulong(n) => json!(n),
        MessageId::Uuid(u) => json!(format!("{u:?}")),
        MessageId::Binary(b) => json!(String::from_utf8_lossy(b)),
    }
}

/// An event as a line: `{"event": {"origin", "module", "partition", "enqueuedTime",
/// "payload"[, "properties": {"system", "application"}, "annotations"]}}`, the payload parsed
/// as JSON when it is JSON, else the text (or, when not UTF-8, base64). `None` for another
/// device's event when a device is asked for.
pub fn event_line(
    message: &Message<Body<Value>>,
    partition: &str,
    options: &Options,
) -> Option<Line> {
    let annotations: Map<String, serde_json::Value> = message
        .message_annotations
        .as_ref()
        .map(|a| {
            a.0.iter()
                .map(|(k, v)| {
                    let key = match k {
                        OwnedKey::Symbol(s) => s.as_str().to_string(),
                        OwnedKey::Ulong(n) => n.to_string(),
                    };
                    (key, value_json(v))
                })
                .collect()
        })
        .unwrap_or_default();
    let origin = annotations
        .get("iothub-connection-device-id")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    if options.device.as_deref().is_some_and(|d| d != origin) {
        return None;
    }
    let bytes: Vec<u8> = match &message.body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.to_vec()).collect(),
        Body::Value(AmqpValue(Value::String(s))) => s.as_bytes().to_vec(),
        Body::Value(AmqpValue(Value::Binary(b))) => b.to_vec(),
        _ => Vec::new(),
    };
    let payload = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(value) => value,
        Err(_) => match std::str::from_utf8(&bytes) {
            Ok(text) => json!(text),
            Err(_) => {
                use base64::Engine;
                json!(base64::engine::general_purpose::STANDARD.encode(&bytes))
            }
        },
    };
    let enqueued = annotations
        .get("x-opt-enqueued-time")
        .and_then(|v| v.as_i64())
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    let mut event = Map::new();
    event.insert("origin".into(), json!(origin));
    event.insert(
        "module".into(),
        annotations
            .get("iothub-connection-module-id")
            .cloned()
            .unwrap_or(json!("")),
    );
    event.insert("partition".into(), json!(partition));
    event.insert("enqueuedTime".into(), json!(enqueued));
    event.insert("payload".into(), payload);
    if options.properties {
        let mut system = Map::new();
        if let Some(p) = &message.properties {
            if let Some(id) = &p.message_id {
                system.insert("message_id".into(), id_json(id));
            }
            if let Some(id) = &p.correlation_id {
                system.insert("correlation_id".into(), id_json(id));
            }
            if let Some(ct) = &p.content_type {
                system.insert("content_type".into(), json!(ct.as_str()));
            }
            if let Some(ce) = &p.content_encoding {
                system.insert("content_encoding".into(), json!(ce.as_str()));
            }
            if let Some(uid) = &p.user_id {
                system.insert("user_id".into(), json!(String::from_utf8_lossy(uid)));
            }
        }
        let application: Map<String, serde_json::Value> = message
            .application_properties
            .as_ref()
            .map(|a| {
                a.0.iter()
                    .map(|(k, v)| (k.clone(), simple_json(v)))
                    .collect()
            })
            .unwrap_or_default();
        event.insert(
            "properties".into(),
            json!({"system": system, "application": application}),
        );
        event.insert("annotations".into(), serde_json::Value::Object(annotations));
    }
    Some(json!({ "event": event }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_hub_connection_strings_as_the_portal_and_the_emulator_write_them() {
        let portal = parse_event_hub_connection_string(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=service;SharedAccessKey=a2V5;EntityPath=hub-1",
        )
        .unwrap();
        assert_eq!(
            (portal.hostname.as_str(), portal.port, portal.tls),
            ("ns.servicebus.windows.net", 5671, true)
        );
        assert_eq!(portal.event_hub, "hub-1");
        assert!(!format!("{portal:?}").contains("a2V5"), "the key is masked");
        let emulator = parse_event_hub_connection_string(
            "Endpoint=sb://localhost:5673;SharedAccessKeyName=service;SharedAccessKey=a2V5;EntityPath=localhost;UseDevelopmentEmulator=true",
        )
        .unwrap();
        assert_eq!((emulator.port, emulator.tls), (5673, false));
        for bad in [
            "SharedAccessKeyName=s;SharedAccessKey=k;EntityPath=e",
            "Endpoint=sb://h/;SharedAccessKey=k;EntityPath=e",
            "Endpoint=sb://h/;SharedAccessKeyName=s;EntityPath=e",
            "Endpoint=sb://h/;SharedAccessKeyName=s;SharedAccessKey=k",
            "Endpoint=sb://h:x/;SharedAccessKeyName=s;SharedAccessKey=k;EntityPath=e",
        ] {
            let error = parse_event_hub_connection_string(bad).unwrap_err();
            assert!(error.is_usage(), "{bad}");
        }
    }

    #[test]
    fn start_positions_and_their_selectors() {
        assert_eq!(
            StartFrom::parse("start").unwrap().selector(),
            "amqp.annotation.x-opt-offset > '-1'"
        );
        assert_eq!(
            StartFrom::parse("now").unwrap().selector(),
            "amqp.annotation.x-opt-offset > '@latest'"
        );
        assert_eq!(
            StartFrom::parse("2023-11-14T22:13:20Z").unwrap().selector(),
            "amqp.annotation.x-opt-enqueued-time >= '1700000000000'"
        );
        assert_eq!(
            StartFrom::parse("1700000000000").unwrap(),
            StartFrom::parse("2023-11-14T22:13:20Z").unwrap()
        );
        assert!(StartFrom::parse("yesterday").unwrap_err().is_usage());
    }

    #[test]
    fn a_redirect_names_the_endpoint_as_iot_hub_writes_it() {
        let connection_string: ServiceConnectionString =
            "HostName=myhub.azure-devices.net;SharedAccessKeyName=service;SharedAccessKey=a2V5"
                .parse()
                .unwrap();
        let mut info = fe2o3_amqp::types::primitives::OrderedMap::new();
        info.insert(
            Symbol::from("hostname"),
            Value::String("ihsuprodxx.servicebus.windows.net".into()),
        );
        info.insert(
            Symbol::from("network-host"),
            Value::String("10.0.0.7".into()),
        );
        info.insert(Symbol::from("port"), Value::Int(5671));
        info.insert(
            Symbol::from("address"),
            Value::String("amqps://ihsuprodxx.servicebus.windows.net:5671/iothub-ehub-myhub-1-abc/ConsumerGroups/$Default/Partitions/0".into()),
        );
        let error = definitions::Error::new(LinkError::Redirect, None, Some(info));
        let endpoint = redirected_endpoint(&error, &connection_string).unwrap();
        assert_eq!(endpoint.hostname, "ihsuprodxx.servicebus.windows.net");
        assert_eq!(endpoint.network_host, "10.0.0.7");
        assert_eq!((endpoint.port, endpoint.tls), (5671, true));
        assert_eq!(endpoint.event_hub, "iothub-ehub-myhub-1-abc");
        assert_eq!(endpoint.policy, "service");
        let without = definitions::Error::new(LinkError::Redirect, None, None);
        assert!(redirected_endpoint(&without, &connection_string).is_err());
    }
}
