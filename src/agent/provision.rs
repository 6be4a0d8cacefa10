//! Registration with the Device Provisioning Service over MQTT: which hub this device is
//! assigned to, and under which device id.
//!
//! [`register`] opens one connection to the DPS device endpoint with the agent's wire
//! (`mqtt::Wire` over the agent's one dial, `transport::Dial`: TCP or an HTTP proxy's CONNECT
//! tunnel, TLS, and for `transport = "websocket"` the upgrade at `/$iothub/websocket`, as
//! real DPS serves it on its host's port 443; then CONNECT with the registration's user name and a SAS token signed with
//! the device key, `skn=registration`), subscribes to the answers, sends the register request
//! and polls the operation status, waiting what each answer's `retry-after` says (2 s when
//! it says nothing, the Python SDK's default), until the registration is assigned or refused.
//! A refusal carries DPS's error code and message. The whole exchange has one deadline. The
//! wire format is `protocol::dps`.
//!
//! [`run_provisioned`] is the life of an agent configured with `[provisioning]`: the cached
//! assignment (a small JSON file beside the outbox, `{outbox}.provisioning.json`: it must be
//! read before the outbox opens, because the outbox belongs to the device id the assignment
//! names), else a registration, retried with backoff while it fails (each failure logged
//! with DPS's code and message); then the agent on the assigned hub, until shutdown or until
//! the hub refuses the device (CONNACK 4/5: moved or deleted), when the cache is forgotten
//! and the device registers again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use bytes::Bytes;
use rumqttc::mqttbytes::v4::{
    Connect, ConnectReturnCode, Packet, PubAck, Publish, Subscribe, SubscribeFilter,
};
use rumqttc::mqttbytes::QoS;
use serde_json::Value;
use tokio::time::Instant;

use super::backoff::Backoff;
use super::mqtt::{Wire, WireError};
use super::transport::Dial;
use super::{Agent, AgentError, AgentHandle};
use crate::common::logging::error_chain;
use crate::config::{Config, OutboxSettings, Provisioning, Proxy, Transport};
use crate::protocol::dps::{
    self, parse_response_topic, DpsErrorBody, OperationStatus, RegisterRequest, RegistrationStatus,
    RESPONSE_FILTER,
};
use crate::protocol::sas;

/// The poll interval when an answer gives no `retry-after`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(2);
/// The longest `retry-after` honoured: a larger one is taken as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Lifetime of the registration's SAS token.
const TOKEN_LIFETIME_S: u64 = 3600;

/// What to register, and where.
#[derive(Clone)]
pub struct Registration {
    /// The DPS device endpoint's host (the TLS name) and port.
    pub host: String,
    pub port: u16,
    /// MQTT over TLS, or over WebSocket (the hub's `[connection] transport`).
    pub transport: Transport,
    /// The HTTP proxy to tunnel through, if any.
    pub proxy: Option<Proxy>,
    pub tls: Arc<rustls::ClientConfig>,
    pub id_scope: String,
    pub registration_id: String,
    /// The device key: the individual enrollment's, or derived from the group key. Empty for
    /// an X.509 registration: `tls` then carries the device's certificate, and no token is sent.
    pub device_key: String,
    /// Custom data for the allocation (`payload`), if any.
    pub payload: Option<Value>,
    /// The whole exchange, connect included, must end within this.
    pub deadline: Duration,
}

/// Where DPS assigned the device.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    pub assigned_hub: String,
    pub device_id: String,
    pub substatus: Option<String>,
    /// The enrollment's custom data returned to the device, if any.
    pub payload: Option<Value>,
}

/// Why a registration failed. Never carries the key or the token.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("cannot sign the registration token")]
    Token(#[source] sas::SasError),
    #[error("DPS at {endpoint} refused the connection: no enrollment accepts this registration id and key (or certificate)")]
    Unauthorized { endpoint: String },
    #[error("cannot reach DPS at {endpoint}")]
    Wire {
        endpoint: String,
        /// Boxed: the wire's error is large, and every `Result` of this module carries it.
        #[source]
        source: Box<WireError>,
    },
    /// DPS answered with an error (status and body) or a failed registration state.
    #[error("DPS refused the registration: {message} (error {code}, status {status})")]
    Refused {
        status: u16,
        code: u32,
        message: String,
    },
    #[error("DPS sent an answer this client does not understand: {0}")]
    Protocol(String),
    #[error("the registration did not complete within {0:?}")]
    Timeout(Duration),
}

impl ProvisionError {
    /// Whether trying again later may help: throttling, server errors, the network; not a
    /// refusal of the credentials or of the enrollment.
    pub fn is_transient(&self) -> bool {
        match self {
            ProvisionError::Wire { .. } | ProvisionError::Timeout(_) => true,
            ProvisionError::Refused { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// Registers and waits for the assignment (see the module notes). `now_unix` signs the token.
pub async fn register(
    registration: &Registration,
    now_unix: u64,
) -> Result<Assignment, ProvisionError> {
    let deadline = registration.deadline;
    tokio::time::timeout(deadline, exchange(registration, now_unix))
        .await
        .unwrap_or(Err(ProvisionError::Timeout(deadline)))
}

impl Registration {
    /// The dial to DPS: the agent's, with this registration's endpoint, transport and proxy.
    pub fn dial(&self) -> Dial<'_> {
        Dial {
            host: self.host.clone(),
            port: self.port,
            transport: self.transport,
            proxy: self.proxy.as_ref(),
            tls: self.tls.clone(),
        }
    }

    /// The registration's CONNECT: client id the registration id, DPS's user name, a SAS
    /// token signed with the device key (`skn=registration`). `simdevice doctor` sends it too.
    pub fn connect_packet(&self, now_unix: u64) -> Result<Connect, ProvisionError> {
        // An X.509 registration sends its user name and no password (the certificate is in
        // `tls`).
        let token = if self.device_key.is_empty() {
            String::new()
        } else {
            sas::generate_token(
                &dps::sas_resource(&self.id_scope, &self.registration_id),
                &self.device_key,
                Some(dps::REGISTRATION_KEY_NAME),
                now_unix + TOKEN_LIFETIME_S,
            )
            .map_err(ProvisionError::Token)?
        };
        let mut connect = Connect::new(self.registration_id.clone());
        connect.keep_alive = 60;
        connect.clean_session = true;
        connect.set_login(dps::username(&self.id_scope, &self.registration_id), token);
        Ok(connect)
    }

    /// The endpoint as errors name it: `host:port`, or the `wss://` URL, and the proxy.
    pub fn endpoint(&self) -> String {
        let dial = self.dial();
        let target = match self.transport {
            Transport::Mqtt => dial.authority(),
            Transport::WebSocket => dial.websocket_url(),
        };
        match &self.proxy {
            Some(proxy) => format!("{target} (through the proxy {proxy})"),
            None => target,
        }
    }
}

async fn exchange(r: &Registration, now_unix: u64) -> Result<Assignment, ProvisionError> {
    let endpoint = r.endpoint();
    let wire_error = |source| ProvisionError::Wire {
        endpoint: endpoint.clone(),
        source: Box::new(source),
    };
    let connect = r.connect_packet(now_unix)?;
    let (mut wire, _) = match Wire::open(&r.dial(), &connect).await {
        Ok(open) => open,
        Err(WireError::Refused(
            ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword,
        )) => return Err(ProvisionError::Unauthorized { endpoint }),
        Err(source) => return Err(wire_error(source)),
    };
    wire.send(&Packet::Subscribe(Subscribe {
        pkid: 1,
        filters: vec![SubscribeFilter::new(
            RESPONSE_FILTER.to_string(),
            QoS::AtLeastOnce,
        )],
    }))
    .map_err(wire_error)?;
    let register_body = serde_json::to_vec(&RegisterRequest {
        registration_id: r.registration_id.clone(),
        payload: r.payload.clone(),
    })
    .map_err(|e| ProvisionError::Protocol(e.to_string()))?;
    // Each request has its own rid; an answer for another one (a late duplicate) is ignored.
    let mut rid: u64 = 1;
    let mut request = (dps::register_topic("1"), Bytes::from(register_body));
    let mut pkid: u16 = 2;
    send_request(&mut wire, &request, &mut pkid).map_err(wire_error)?;
    wire.flush().await.map_err(wire_error)?;
    let mut next_send: Option<Instant> = None;
    let mut operation_id: Option<String> = None;
    loop {
        let packet = match next_send {
            Some(at) => tokio::select! {
                packet = wire.next_packet() => Some(packet.map_err(wire_error)?),
                _ = tokio::time::sleep_until(at) => None,
            },
            None => Some(wire.next_packet().await.map_err(wire_error)?),
        };
        let Some(packet) = packet else {
            // Time for the next request: a poll, or the throttled request again.
            next_send = None;
            rid += 1;
            request.0 = match &operation_id {
                Some(op) => dps::status_topic(&rid.to_string(), op),
                None => dps::register_topic(&rid.to_string()),
            };
            if operation_id.is_some() {
                request.1 = Bytes::from_static(b" ");
            }
            send_request(&mut wire, &request, &mut pkid).map_err(wire_error)?;
            wire.flush().await.map_err(wire_error)?;
            continue;
        };
        let Packet::Publish(publish) = packet else {
            continue; // SUBACK, PUBACK, PINGRESP
        };
        if publish.qos == QoS::AtLeastOnce {
            wire.send(&Packet::PubAck(PubAck::new(publish.pkid)))
                .map_err(wire_error)?;
            wire.flush().await.map_err(wire_error)?;
        }
        let answer = parse_response_topic(&publish.topic)
            .map_err(|e| ProvisionError::Protocol(e.to_string()))?;
        if answer.rid != rid.to_string() {
            continue;
        }
        let wait = answer
            .retry_after_s
            .map_or(DEFAULT_RETRY_AFTER, Duration::from_secs)
            .min(MAX_RETRY_AFTER);
        match answer.status {
            200..=299 => {
                let status: OperationStatus = serde_json::from_slice(&publish.payload)
                    .map_err(|e| ProvisionError::Protocol(format!("operation status: {e}")))?;
                match status.status {
                    RegistrationStatus::Assigned => {
                        let _ = wire.disconnect().await;
                        return assignment(status);
                    }
                    RegistrationStatus::Assigning | RegistrationStatus::Unassigned => {
                        operation_id = Some(status.operation_id);
                        next_send = Some(Instant::now() + wait);
                    }
                    RegistrationStatus::Failed | RegistrationStatus::Disabled => {
                        let state = status.registration_state;
                        return Err(ProvisionError::Refused {
                            status: answer.status,
                            code: state.as_ref().and_then(|s| s.error_code).unwrap_or(0),
                            message: state
                                .and_then(|s| s.error_message)
                                .unwrap_or_else(|| format!("registration {:?}", status.status)),
                        });
                    }
                }
            }
            429 | 500..=599 => {
                tracing::info!(
                    status = answer.status,
                    wait_ms = wait.as_millis() as u64,
                    "DPS asks to retry later"
                );
                next_send = Some(Instant::now() + wait);
            }
            status => {
                let body: Option<DpsErrorBody> = serde_json::from_slice(&publish.payload).ok();
                let _ = wire.disconnect().await;
                return Err(ProvisionError::Refused {
                    status,
                    code: body.as_ref().map_or(0, |b| b.error_code),
                    message: body.map_or_else(|| "no error body".into(), |b| b.message),
                });
            }
        }
    }
}

fn send_request(
    wire: &mut Wire,
    (topic, body): &(String, Bytes),
    pkid: &mut u16,
) -> Result<(), WireError> {
    *pkid = pkid.checked_add(1).unwrap_or(1);
    wire.send(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: topic.clone(),
        pkid: *pkid,
        payload: body.clone(),
    }))
}

fn assignment(status: OperationStatus) -> Result<Assignment, ProvisionError> {
    let state = status
        .registration_state
        .ok_or_else(|| ProvisionError::Protocol("assigned without a registrationState".into()))?;
    match (state.assigned_hub, state.device_id) {
        (Some(assigned_hub), Some(device_id)) => Ok(Assignment {
            assigned_hub,
            device_id,
            substatus: state.substatus,
            payload: state.payload,
        }),
        _ => Err(ProvisionError::Protocol(
            "assigned without assignedHub and deviceId".into(),
        )),
    }
}

/// How often a provisioned agent is checked for a refusal by its hub.
const REFUSAL_CHECK: Duration = Duration::from_millis(250);

/// Why a provisioned agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionRunError {
    #[error("the configuration has no [provisioning] section")]
    NotConfigured,
    #[error("the agent cannot start")]
    Agent(#[from] AgentError),
    #[error("cannot write the provisioning cache {}", path.display())]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ProvisionRunError {
    pub fn is_config(&self) -> bool {
        match self {
            ProvisionRunError::NotConfigured => true,
            ProvisionRunError::Agent(error) => error.is_config(),
            ProvisionRunError::Cache { .. } => false,
        }
    }
}

/// The assignment as cached: for this scope and registration only.
#[derive(Serialize, Deserialize)]
struct Cached {
    id_scope: String,
    registration_id: String,
    assigned_hub: String,
    device_id: String,
}

/// Where the assignment of an agent with this configuration is cached: beside its outbox
/// (the configured one, else the daemon's default).
pub fn cache_path(config: &Config) -> PathBuf {
    let outbox = config
        .outbox
        .path
        .clone()
        .unwrap_or_else(OutboxSettings::default_path);
    let mut name = outbox.into_os_string();
    name.push(".provisioning.json");
    PathBuf::from(name)
}

/// The cached assignment, if there is one for this scope and registration id.
pub fn load_cached(path: &Path, p: &Provisioning) -> Option<Assignment> {
    let text = std::fs::read_to_string(path).ok()?;
    let cached: Cached = serde_json::from_str(&text)
        .inspect_err(|error| tracing::warn!(path = %path.display(), %error, "ignoring an unreadable provisioning cache"))
        .ok()?;
    (cached.id_scope == p.id_scope && cached.registration_id == p.registration_id).then_some(
        Assignment {
            assigned_hub: cached.assigned_hub,
            device_id: cached.device_id,
            substatus: None,
            payload: None,
        },
    )
}

/// Writes the assignment (a temporary file renamed over the old one).
pub fn save_cached(path: &Path, p: &Provisioning, a: &Assignment) -> Result<(), ProvisionRunError> {
    let cache_error = |source| ProvisionRunError::Cache {
        path: path.to_path_buf(),
        source,
    };
    let text = serde_json::to_string_pretty(&Cached {
        id_scope: p.id_scope.clone(),
        registration_id: p.registration_id.clone(),
        assigned_hub: a.assigned_hub.clone(),
        device_id: a.device_id.clone(),
    })
    .map_err(|e| cache_error(std::io::Error::other(e)))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(cache_error)?;
    }
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    std::fs::write(&temporary, text).map_err(cache_error)?;
    std::fs::rename(&temporary, path).map_err(cache_error)
}

/// The registration a `[provisioning]` section describes, dialled with `transport` (the
/// configuration's `[connection] transport`) and the section's proxy.
pub fn registration_for(
    p: &Provisioning,
    transport: Transport,
    tls: Arc<rustls::ClientConfig>,
    deadline: Duration,
) -> Registration {
    Registration {
        host: p.host.clone(),
        port: p.port,
        transport,
        proxy: p.proxy.clone(),
        tls,
        id_scope: p.id_scope.clone(),
        registration_id: p.registration_id.clone(),
        device_key: p.device_key.expose().to_string(),
        payload: None,
        deadline,
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Registers until assigned, backing off after each failure (longer after a refusal, which
/// only a change of the enrollment can cure); `None` when shutdown comes first.
pub async fn register_until_assigned(
    registration: &Registration,
    mut backoff: Backoff,
    shutdown: &CancellationToken,
) -> Option<Assignment> {
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return None,
            attempt = register(registration, now_unix()) => attempt,
        };
        match attempt {
            Ok(assignment) => {
                tracing::info!(registration = %registration.registration_id, hub = %assignment.assigned_hub,
                    device = %assignment.device_id, "provisioned by DPS");
                return Some(assignment);
            }
            Err(error) => {
                let delay = if error.is_transient() {
                    backoff.next_delay()
                } else {
                    backoff.refused()
                };
                tracing::error!(registration = %registration.registration_id, error = %error_chain(&error),
                    retry_in_ms = delay.as_millis() as u64, "DPS registration failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Runs an agent configured with `[provisioning]` until `shutdown` (see the module notes).
/// `force` registers even when an assignment is cached.
pub async fn run_provisioned(
    config: Config,
    force: bool,
    shutdown: CancellationToken,
) -> Result<(), ProvisionRunError> {
    let (current, _) = watch::channel(None);
    run_provisioned_with(config, force, shutdown, current).await
}

/// [`run_provisioned`], telling `current` the handle of the agent running now (`None` while
/// registering): a new agent is made after each registration, so the daemon's `/metrics`,
/// watchdog and SIGHUP reloads follow it through this (`commands::run`).
pub async fn run_provisioned_with(
    mut config: Config,
    mut force: bool,
    shutdown: CancellationToken,
    current: watch::Sender<Option<AgentHandle>>,
) -> Result<(), ProvisionRunError> {
    let p = config
        .provisioning
        .clone()
        .ok_or(ProvisionRunError::NotConfigured)?;
    // With an X.509 identity the registration presents its certificate.
    let tls = super::client_tls_for(&p.unassigned_identity())?;
    let registration = registration_for(
        &p,
        config.connection.transport,
        tls,
        config.connection.connect_timeout,
    );
    let cache = cache_path(&config);
    loop {
        let cached = if force { None } else { load_cached(&cache, &p) };
        let assignment = match cached {
            Some(assignment) => {
                tracing::info!(hub = %assignment.assigned_hub, device = %assignment.device_id,
                    "using the cached DPS assignment");
                assignment
            }
            None => {
                let backoff =
                    Backoff::new(config.connection.backoff_min, config.connection.backoff_max);
                let Some(assignment) =
                    register_until_assigned(&registration, backoff, &shutdown).await
                else {
                    return Ok(());
                };
                save_cached(&cache, &p, &assignment)?;
                assignment
            }
        };
        config.identity = p.assigned_identity(&assignment.assigned_hub, &assignment.device_id);
        let agent = Agent::new(config.clone())?;
        let counters = agent.handle().ctx.clone();
        current.send_replace(Some(agent.handle()));
        let stop = shutdown.child_token();
        let task = tokio::spawn(agent.run(stop.clone()));
        let refused = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break false,
                _ = tokio::time::sleep(REFUSAL_CHECK) => {
                    if counters.counters().reconnects.get(&["refused"]) > 0 {
                        break true;
                    }
                }
            }
        };
        stop.cancel();
        if let Err(error) = task.await {
            tracing::error!(%error, "the agent task failed");
        }
        current.send_replace(None);
        if !refused {
            return Ok(());
        }
        tracing::warn!(hub = %assignment.assigned_hub, device = %assignment.device_id,
            "the assigned hub refused the device: registering with DPS again");
        let _ = std::fs::remove_file(&cache);
        force = true;
    }
}
