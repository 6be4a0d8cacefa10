//! Registration with the Device Provisioning Service over MQTT: which hub this device is
//! assigned to, and under which device id.
//!
//! [`register`] opens one connection to the DPS device endpoint with the agent's wire
//! (`mqtt::Wire`: TLS, CONNECT with the registration's user name and a SAS token signed with
//! the device key, `skn=registration`), subscribes to the answers, sends the register request
//! and polls the operation status, waiting what each answer's `retry-after` says (2 s when
//! it says nothing, the Python SDK's default), until the registration is assigned or refused.
//! A refusal carries DPS's error code and message. The whole exchange has one deadline. The
//! wire format is `protocol::dps`; this module keeps no state and touches nothing but its
//! connection (the caller caches the assignment).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::v4::{
    ConnectReturnCode, Packet, PubAck, Publish, Subscribe, SubscribeFilter,
};
use rumqttc::mqttbytes::QoS;
use serde_json::Value;
use tokio::time::Instant;

use super::mqtt::{Wire, WireError};
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
    pub tls: Arc<rustls::ClientConfig>,
    pub id_scope: String,
    pub registration_id: String,
    /// The device key: the individual enrollment's, or derived from the group key.
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
    #[error("DPS at {endpoint} refused the connection: no enrollment accepts this registration id and key")]
    Unauthorized { endpoint: String },
    #[error("cannot reach DPS at {endpoint}")]
    Wire {
        endpoint: String,
        #[source]
        source: WireError,
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

async fn exchange(r: &Registration, now_unix: u64) -> Result<Assignment, ProvisionError> {
    let endpoint = format!("{}:{}", r.host, r.port);
    let wire_error = |source| ProvisionError::Wire {
        endpoint: endpoint.clone(),
        source,
    };
    let token = sas::generate_token(
        &dps::sas_resource(&r.id_scope, &r.registration_id),
        &r.device_key,
        Some(dps::REGISTRATION_KEY_NAME),
        now_unix + TOKEN_LIFETIME_S,
    )
    .map_err(ProvisionError::Token)?;
    let mut connect = rumqttc::mqttbytes::v4::Connect::new(r.registration_id.clone());
    connect.keep_alive = 60;
    connect.clean_session = true;
    connect.set_login(dps::username(&r.id_scope, &r.registration_id), token);
    let (mut wire, _) = match Wire::open(&r.host, r.port, r.tls.clone(), &connect).await {
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
