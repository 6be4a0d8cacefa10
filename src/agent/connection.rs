//! The device's MQTT session with IoT Hub: the only code in the agent that speaks MQTT, over
//! the wire of `mqtt` (TLS, packets, buffers).
//!
//! Each connection attempt opens a fresh connection with a fresh SAS token. One task (this one)
//! owns it, with no helper task or channel of its own: it publishes readings from the outbox
//! (at most [`WINDOW`] in flight, each under a packet id given here, until its PUBACK), serves
//! twin requests and method answers from the rest of the agent, acknowledges the hub's QoS 1
//! messages, hands what the hub sends to the agent as [`Incoming`], and keeps the connection
//! alive: a PINGREQ when nothing was written for the keep-alive, and the connection counts as
//! lost when nothing comes back within half of it (so 1.5 x the keep-alive of silence at most,
//! the allowance the hub gives the device).
//!
//! A session ends when the connection fails (then: back off with full jitter, longer after
//! an authorization refusal), when the token is due for renewal (then: wait for in-flight
//! readings to be acknowledged, disconnect, reconnect at once with a new token), or at
//! shutdown (the same draining within a grace period). Whatever was in flight and not
//! acknowledged goes back to the outbox, so nothing accepted is sent twice and nothing
//! produced is lost.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use rumqttc::mqttbytes::v4::{
    ConnectReturnCode, Packet, PubAck, Publish, Subscribe, SubscribeFilter, SubscribeReasonCode,
};
use rumqttc::mqttbytes::QoS;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::context::{Beat, Counters, HandlerContext};
use super::mqtt::{packet_name, Wire, WireError};
use super::outbox::Outbox;
use super::transport::Dial;
use crate::common::logging::error_chain;
use crate::config::{ConnectionSettings, Identity};
use crate::protocol::encoding::enc;
use crate::protocol::property_bag::PropertyBag;
use crate::protocol::sas;
use crate::protocol::topic::{
    self, parse_cloud_publish, CloudPublish, DESIRED_PATCHES_FILTER, METHODS_FILTER,
    TWIN_RESPONSES_FILTER,
};
use crate::protocol::API_VERSION;

/// Readings published and not yet acknowledged, at most.
pub const WINDOW: usize = 10;
/// Time to wait for in-flight readings before a renewal or shutdown disconnects anyway.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// The renewal timer of an X.509 device (which has no token): far enough never to matter.
const NO_RENEWAL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Time DISCONNECT and the TLS close may take before the connection is simply dropped.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);

/// What the rest of the agent asks of the connection.
#[derive(Debug)]
pub enum Request {
    TwinGet {
        reply: oneshot::Sender<TwinResponse>,
    },
    TwinPatchReported {
        body: Vec<u8>,
        reply: oneshot::Sender<TwinResponse>,
    },
    MethodResponse {
        rid: String,
        status: i32,
        payload: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct TwinResponse {
    pub status: u16,
    pub version: Option<u64>,
    pub body: Bytes,
}

/// What the hub said, for the agent.
#[derive(Debug)]
pub enum Incoming {
    Connected {
        session_present: bool,
    },
    Disconnected {
        reason: String,
    },
    DesiredPatch {
        version: Option<u64>,
        body: Bytes,
    },
    MethodCall {
        name: String,
        rid: String,
        payload: Bytes,
    },
    CloudToDevice {
        properties: PropertyBag,
        body: Bytes,
    },
}

/// The DeviceClientType this agent announces in its user name.
pub fn client_type() -> String {
    format!("simdevice/{}", env!("CARGO_PKG_VERSION"))
}

pub fn username(identity: &Identity) -> String {
    format!(
        "{}/{}/?api-version={API_VERSION}&DeviceClientType={}",
        identity.host_name,
        identity.device_id,
        enc(&client_type())
    )
}

enum SessionEnd {
    Shutdown,
    Renew,
    Failed {
        reason: String,
        refused: bool,
        was_connected: bool,
    },
}

pub struct Connection {
    pub identity: Identity,
    pub settings: ConnectionSettings,
    pub tls: Arc<rustls::ClientConfig>,
    pub outbox: Arc<Outbox>,
    pub ctx: HandlerContext,
    pub requests: mpsc::Receiver<Box<Request>>,
    pub incoming: mpsc::Sender<Box<Incoming>>,
    /// Connects in progress at once, shared by a fleet's agents (`None`: no limit). A turn is
    /// held from the TCP connect to the CONNACK.
    pub connect_gate: Option<Arc<tokio::sync::Semaphore>>,
    pub shutdown: CancellationToken,
}

impl Connection {
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(self.settings.backoff_min, self.settings.backoff_max);
        loop {
            self.ctx.heartbeat().beat(Beat::Connection);
            let end = self.session().await;
            self.ctx.heartbeat().beat(Beat::Connection);
            self.ctx.counters().set_connected(false);
            self.outbox.requeue_in_flight();
            match end {
                SessionEnd::Shutdown => return,
                SessionEnd::Renew => {
                    Counters::bump(&self.ctx.counters().token_renewals);
                    self.ctx.counters().reconnect("renewal", "token renewal");
                    backoff.reset();
                    self.notify(Incoming::Disconnected {
                        reason: "token renewal".into(),
                    })
                    .await;
                }
                SessionEnd::Failed {
                    reason,
                    refused,
                    was_connected,
                } => {
                    let label = match (refused, was_connected) {
                        (true, _) => "refused",
                        (_, true) => "lost",
                        _ => "failed",
                    };
                    self.ctx.counters().reconnect(label, &reason);
                    if was_connected {
                        backoff.reset();
                        self.notify(Incoming::Disconnected {
                            reason: reason.clone(),
                        })
                        .await;
                    }
                    let delay = if refused {
                        backoff.refused()
                    } else {
                        backoff.next_delay()
                    };
                    if refused {
                        tracing::error!(device = %self.identity.device_id, %reason, retry_in_s = delay.as_secs_f32(),
                            "the hub refused the device");
                    } else {
                        tracing::warn!(device = %self.identity.device_id, %reason, retry_in_s = delay.as_secs_f32(),
                            "connection failed");
                    }
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = self.ctx.heartbeat().sleep(Beat::Connection, delay) => {}
                    }
                }
            }
        }
    }

    async fn notify(&self, event: Incoming) {
        // The receiver only goes away at shutdown.
        let _ = self.incoming.send(Box::new(event)).await;
    }

    /// The four subscriptions of a device, with the QoS each is asked at.
    fn filters(&self) -> [(String, QoS); 4] {
        [
            (METHODS_FILTER.to_string(), QoS::AtMostOnce),
            (DESIRED_PATCHES_FILTER.to_string(), QoS::AtLeastOnce),
            (TWIN_RESPONSES_FILTER.to_string(), QoS::AtMostOnce),
            (
                topic::c2d_filter(&self.identity.device_id),
                QoS::AtLeastOnce,
            ),
        ]
    }

    /// Dials, shakes hands and sends CONNECT with a fresh token (an X.509 device: its
    /// certificate in the handshake, no password), within the connect timeout.
    async fn open(&self) -> Result<(Wire, bool), SessionEnd> {
        let token = if self.identity.x509.is_some() {
            String::new()
        } else {
            self.token()?
        };
        self.open_with(token).await
    }

    /// A SAS token for this device, valid for the configured lifetime.
    fn token(&self) -> Result<String, SessionEnd> {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let resource =
            sas::device_resource(&self.identity.host_name, &self.identity.device_id, None);
        let expiry = now + self.settings.sas_lifetime.as_secs().max(1);
        sas::generate_token(&resource, self.identity.key.expose(), None, expiry).map_err(|error| {
            SessionEnd::Failed {
                reason: format!("cannot sign a token: {error}"),
                refused: true,
                was_connected: false,
            }
        })
    }

    async fn open_with(&self, token: String) -> Result<(Wire, bool), SessionEnd> {
        let mut connect = rumqttc::mqttbytes::v4::Connect::new(self.identity.device_id.clone());
        connect.keep_alive = u16::try_from(self.settings.keep_alive.as_secs()).unwrap_or(u16::MAX);
        connect.clean_session = false;
        connect.set_login(username(&self.identity), token);
        let dial = Dial::new(&self.identity, &self.settings, self.tls.clone());
        // Waiting for a turn is waiting on the other devices, not on the hub: before the
        // connect timeout starts, and no heartbeat promise broken.
        let _turn = match &self.connect_gate {
            Some(gate) => {
                self.ctx.heartbeat().wait_for_events(Beat::Connection);
                tokio::select! {
                    _ = self.shutdown.cancelled() => return Err(SessionEnd::Shutdown),
                    turn = gate.clone().acquire_owned() => turn.ok(),
                }
            }
            None => None,
        };
        let deadline = Instant::now() + self.settings.connect_timeout;
        self.ctx.heartbeat().wait_until(Beat::Connection, deadline);
        let opened = tokio::select! {
            _ = self.shutdown.cancelled() => return Err(SessionEnd::Shutdown),
            opened = tokio::time::timeout_at(deadline, Wire::open(&dial, &connect)) => opened,
        };
        match opened {
            Ok(Ok(open)) => Ok(open),
            Ok(Err(error)) => {
                let refused = matches!(
                    error,
                    WireError::Refused(
                        ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized
                    )
                );
                Err(SessionEnd::Failed {
                    reason: error_chain(&error),
                    refused,
                    was_connected: false,
                })
            }
            Err(_) => Err(failed(
                format!(
                    "no CONNACK in time: {} ({}{}) did not connect, shake hands and answer \
                     CONNECT within {} s",
                    dial.authority(),
                    dial.transport,
                    dial.proxy
                        .map(|p| format!(" through {p}"))
                        .unwrap_or_default(),
                    self.settings.connect_timeout.as_secs_f32()
                ),
                false,
            )),
        }
    }

    async fn session(&mut self) -> SessionEnd {
        if self.shutdown.is_cancelled() {
            return SessionEnd::Shutdown;
        }
        // Boxed: the handshake's state is large and needed only until CONNACK, so it is not
        // kept in the task's own allocation for the whole life of the connection.
        let (mut wire, session_present) = match Box::pin(self.open()).await {
            Ok(open) => open,
            Err(end) => return end,
        };
        Counters::bump(&self.ctx.counters().connects);
        self.ctx.counters().set_connected(true);
        tracing::info!(device = %self.identity.device_id, session_present, "connected to IoT Hub");
        let mut session = Session::default();
        if !session_present {
            let pkid = session.next_pkid();
            let filters = self.filters().into_iter();
            let subscribe = Subscribe {
                pkid,
                filters: filters
                    .map(|(path, qos)| SubscribeFilter::new(path, qos))
                    .collect(),
            };
            if let Err(error) = wire.send(&Packet::Subscribe(subscribe)) {
                return failed(format!("cannot subscribe: {}", error_chain(&error)), true);
            }
            session.subscribing = Some(pkid);
        }
        self.notify(Incoming::Connected { session_present }).await;

        // Renew at the configured fraction of the lifetime, minus up to 5 % jitter so that a
        // fleet started together does not reconnect together. An X.509 device has no token:
        // its timer is set a year out and re-armed, so it never renews.
        let fraction = self.settings.renew_at * rand::thread_rng().gen_range(0.95..=1.0);
        let renew_after = if self.identity.x509.is_some() {
            NO_RENEWAL
        } else {
            self.settings.sas_lifetime.mul_f64(fraction)
        };
        let renew = tokio::time::sleep(renew_after);
        let keep_alive = self.settings.keep_alive;
        let mut last_write = Instant::now();
        // When the PINGREQ that is still unanswered was sent.
        let mut ping_sent: Option<Instant> = None;
        // Both timers live for the whole session and are moved, not re-created.
        let keepalive = tokio::time::sleep(keep_alive);
        tokio::pin!(renew, keepalive);
        let mut draining: Option<(Instant, SessionEnd)> = None;
        loop {
            self.ctx.heartbeat().beat(Beat::Connection);
            if draining.is_none() {
                if let Err(reason) = self.feed(&mut wire, &mut session) {
                    return failed(reason, true);
                }
            } else if self.outbox.in_flight() == 0 {
                let (_, end) = draining.take().expect("checked above");
                self.disconnect(&mut wire).await;
                return end;
            }
            if wire.has_output() {
                // As long as a connect may take: a hub that stops reading is a lost connection.
                let deadline = Instant::now() + self.settings.connect_timeout;
                self.ctx.heartbeat().wait_until(Beat::Connection, deadline);
                match tokio::time::timeout_at(deadline, wire.flush()).await {
                    Ok(Ok(())) => last_write = Instant::now(),
                    Ok(Err(error)) => return failed(error_chain(&error), true),
                    Err(_) => {
                        return failed("the hub stopped reading (write timed out)".into(), true)
                    }
                }
            }
            let keepalive_at = match ping_sent {
                Some(sent) => sent + keep_alive / 2,
                None => last_write + keep_alive,
            };
            if keepalive.deadline() != keepalive_at {
                keepalive.as_mut().reset(keepalive_at);
            }
            let drain_deadline = draining.as_ref().map(|(at, _)| *at);
            // Waiting for the hub, the agent or a timer: the loop is back by the earliest timer.
            let wake = match drain_deadline {
                Some(at) => at,
                None => renew.deadline(),
            };
            let wake = if keep_alive.is_zero() {
                wake
            } else {
                wake.min(keepalive_at)
            };
            self.ctx.heartbeat().wait_until(Beat::Connection, wake);
            tokio::select! {
                _ = self.shutdown.cancelled(), if draining.is_none() => {
                    draining = Some((Instant::now() + DRAIN_GRACE, SessionEnd::Shutdown));
                }
                _ = &mut renew, if draining.is_none() => {
                    if self.identity.x509.is_some() {
                        renew.as_mut().reset(Instant::now() + NO_RENEWAL);
                    } else {
                        tracing::info!(device = %self.identity.device_id, "renewing the SAS token");
                        draining = Some((Instant::now() + DRAIN_GRACE, SessionEnd::Renew));
                    }
                }
                _ = sleep_until_opt(drain_deadline) => {
                    let (_, end) = draining.take().expect("deadline implies draining");
                    tracing::warn!(device = %self.identity.device_id, in_flight = self.outbox.in_flight(),
                        "readings still unacknowledged at disconnect; they will be sent again");
                    self.disconnect(&mut wire).await;
                    return end;
                }
                _ = &mut keepalive, if !keep_alive.is_zero() => {
                    if ping_sent.is_some() {
                        return failed(format!(
                            "no answer to PINGREQ within {} s: the connection is dead",
                            (keep_alive / 2).as_secs_f32()
                        ), true);
                    }
                    if let Err(error) = wire.send(&Packet::PingReq) {
                        return failed(error_chain(&error), true);
                    }
                    ping_sent = Some(Instant::now());
                }
                packet = wire.next_packet() => match packet {
                    Err(error) => return failed(error_chain(&error), true),
                    Ok(packet) => {
                        // Any packet shows the connection alive, as a PINGRESP does.
                        ping_sent = None;
                        // Handing a packet to the agent may wait (a full channel): that is work.
                        self.ctx.heartbeat().beat(Beat::Connection);
                        if let Err(end) = self.on_packet(packet, &mut wire, &mut session).await {
                            return end;
                        }
                    }
                },
                request = self.requests.recv(), if draining.is_none() => match request {
                    None => return SessionEnd::Shutdown,
                    Some(request) => {
                        if let Err(reason) = on_request(&mut wire, *request, &mut session) {
                            return failed(reason, true);
                        }
                    }
                },
                _ = self.outbox.ready.notified(), if draining.is_none() && self.outbox.in_flight() < WINDOW => {}
            }
        }
    }

    /// Publishes waiting readings while the window has room, each under a fresh packet id.
    fn feed(&self, wire: &mut Wire, session: &mut Session) -> Result<(), String> {
        while self.outbox.in_flight() < WINDOW {
            let Some(reading) = self.outbox.take_next() else {
                break;
            };
            let pkid = session.next_pkid();
            let publish = Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: topic::telemetry_topic(&self.identity.device_id, &reading.properties()),
                pkid,
                payload: reading.body.clone(),
            };
            wire.send(&Packet::Publish(publish))
                .map_err(|e| format!("cannot send a reading: {}", error_chain(&e)))?;
            // Written to the hub in this turn of the loop, before it waits again.
            session.in_flight.push(InFlight {
                pkid,
                seq: reading.seq,
                sent: Instant::now(),
            });
            Counters::bump(&self.ctx.counters().readings_published);
        }
        Ok(())
    }

    /// Acts on one packet from the hub; an error ends the session.
    async fn on_packet(
        &self,
        packet: Packet,
        wire: &mut Wire,
        session: &mut Session,
    ) -> Result<(), SessionEnd> {
        match packet {
            Packet::PubAck(ack) => match session.acknowledged(ack.pkid) {
                Some(reading) => {
                    if self.outbox.acknowledge(reading.seq) {
                        Counters::bump(&self.ctx.counters().readings_acknowledged);
                        self.ctx.counters().set_queue_length(self.outbox.len());
                        self.ctx.acknowledged(reading.sent.elapsed());
                        tracing::info!(device = %self.identity.device_id, seq = reading.seq,
                            "reading acknowledged by the hub");
                    }
                }
                None => tracing::debug!(pkid = ack.pkid, "PUBACK for no reading in flight"),
            },
            Packet::Publish(publish) => {
                match publish.qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => {
                        if let Err(error) = wire.send(&Packet::PubAck(PubAck::new(publish.pkid))) {
                            return Err(failed(error_chain(&error), true));
                        }
                    }
                    QoS::ExactlyOnce => {
                        return Err(failed(
                            "the hub sent a QoS 2 message, which IoT Hub never does".into(),
                            true,
                        ))
                    }
                }
                self.on_publish(publish, session).await;
            }
            Packet::SubAck(ack) if session.subscribing == Some(ack.pkid) => {
                session.subscribing = None;
                let filters = self.filters();
                if ack.return_codes.len() != filters.len() {
                    return Err(failed(
                        format!(
                            "the SUBACK has {} return codes for {} filters",
                            ack.return_codes.len(),
                            filters.len()
                        ),
                        true,
                    ));
                }
                let refused = filters
                    .iter()
                    .zip(&ack.return_codes)
                    .find(|(_, code)| matches!(code, SubscribeReasonCode::Failure));
                if let Some(((filter, _), _)) = refused {
                    return Err(SessionEnd::Failed {
                        reason: format!("the hub refused the subscription to {filter}"),
                        refused: true,
                        was_connected: true,
                    });
                }
            }
            Packet::SubAck(ack) => {
                tracing::debug!(pkid = ack.pkid, "SUBACK for no SUBSCRIBE of ours");
            }
            Packet::PingResp => {}
            Packet::ConnAck(_) => {
                return Err(failed("a second CONNACK on one connection".into(), true))
            }
            // A server never sends these (MQTT 3.1.1, 3.1 to 3.14).
            packet @ (Packet::Connect(_)
            | Packet::Subscribe(_)
            | Packet::Unsubscribe(_)
            | Packet::PingReq
            | Packet::Disconnect) => {
                return Err(failed(
                    format!(
                        "the hub sent {}, which a server never sends",
                        packet_name(&packet)
                    ),
                    true,
                ))
            }
            // Answers to what this agent never sends (QoS 2, UNSUBSCRIBE): nothing to do.
            packet @ (Packet::PubRec(_)
            | Packet::PubRel(_)
            | Packet::PubComp(_)
            | Packet::UnsubAck(_)) => {
                tracing::debug!(
                    packet = packet_name(&packet),
                    "ignored a packet the agent never asked for"
                );
            }
        }
        Ok(())
    }

    async fn on_publish(&self, publish: Publish, session: &mut Session) {
        match parse_cloud_publish(&publish.topic, &self.identity.device_id) {
            Ok(CloudPublish::TwinResponse {
                status,
                rid,
                version,
            }) => match session.twin_reply(&rid) {
                Some(reply) => {
                    let _ = reply.send(TwinResponse {
                        status,
                        version,
                        body: publish.payload,
                    });
                }
                None => tracing::debug!(rid, status, "twin response for no waiting request"),
            },
            Ok(CloudPublish::DesiredPatch { version }) => {
                self.notify(Incoming::DesiredPatch {
                    version,
                    body: publish.payload,
                })
                .await
            }
            Ok(CloudPublish::MethodRequest { name, rid }) => {
                self.notify(Incoming::MethodCall {
                    name,
                    rid,
                    payload: publish.payload,
                })
                .await
            }
            Ok(CloudPublish::CloudToDevice { properties }) => {
                self.notify(Incoming::CloudToDevice {
                    properties,
                    body: publish.payload,
                })
                .await
            }
            Err(error) => {
                tracing::warn!(topic = %publish.topic, %error, "ignored a message on an unexpected topic");
            }
        }
    }

    /// Sends DISCONNECT and closes, within [`DISCONNECT_GRACE`]: the session ends either way.
    async fn disconnect(&self, wire: &mut Wire) {
        match tokio::time::timeout(DISCONNECT_GRACE, wire.disconnect()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::debug!(device = %self.identity.device_id, error = %error_chain(&error), "DISCONNECT not sent")
            }
            Err(_) => {
                tracing::debug!(device = %self.identity.device_id, "DISCONNECT not written in time")
            }
        }
    }
}

/// A reading published and not yet acknowledged.
struct InFlight {
    pkid: u16,
    seq: u64,
    /// When its PUBLISH was written.
    sent: Instant,
}

/// What one connection remembers; a new connection starts afresh (what was in flight is back
/// in the outbox).
#[derive(Default)]
struct Session {
    /// At most [`WINDOW`] (and a few more, should the outbox drop a reading in flight).
    in_flight: Vec<InFlight>,
    /// The packet id of the SUBSCRIBE waiting for its SUBACK.
    subscribing: Option<u16>,
    /// Twin requests waiting for their response, by request id: a few at most.
    twin_waiting: Vec<(String, oneshot::Sender<TwinResponse>)>,
    next_rid: u64,
    last_pkid: u16,
}

impl Session {
    /// The next packet id not in use (1..=65535; 0 is not a packet id).
    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.checked_add(1).unwrap_or(1);
            let id = self.last_pkid;
            if self.subscribing != Some(id) && !self.in_flight.iter().any(|r| r.pkid == id) {
                return id;
            }
        }
    }

    /// Where the twin response for `rid` goes, no longer waiting.
    fn twin_reply(&mut self, rid: &str) -> Option<oneshot::Sender<TwinResponse>> {
        let index = self.twin_waiting.iter().position(|(r, _)| r == rid)?;
        Some(self.twin_waiting.swap_remove(index).1)
    }

    /// The reading the PUBACK with `pkid` acknowledges, no longer in flight.
    fn acknowledged(&mut self, pkid: u16) -> Option<InFlight> {
        let index = self.in_flight.iter().position(|r| r.pkid == pkid)?;
        Some(self.in_flight.swap_remove(index))
    }
}

fn on_request(wire: &mut Wire, request: Request, session: &mut Session) -> Result<(), String> {
    let (topic, body, reply) = match request {
        Request::TwinGet { reply } => {
            session.next_rid += 1;
            let rid = session.next_rid.to_string();
            (topic::twin_get_topic(&rid), Vec::new(), Some((rid, reply)))
        }
        Request::TwinPatchReported { body, reply } => {
            session.next_rid += 1;
            let rid = session.next_rid.to_string();
            (
                topic::twin_reported_patch_topic(&rid),
                body,
                Some((rid, reply)),
            )
        }
        Request::MethodResponse {
            rid,
            status,
            payload,
        } => (topic::method_response_topic(status, &rid), payload, None),
    };
    let publish = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic,
        pkid: 0,
        payload: Bytes::from(body),
    };
    wire.send(&Packet::Publish(publish))
        .map_err(|e| format!("cannot send a request: {}", error_chain(&e)))?;
    if let Some((rid, reply)) = reply {
        // A requester that gave up (its own timeout) waits no more.
        session
            .twin_waiting
            .retain(|(_, waiting)| !waiting.is_closed());
        session.twin_waiting.push((rid, reply));
    }
    Ok(())
}

fn failed(reason: String, was_connected: bool) -> SessionEnd {
    SessionEnd::Failed {
        reason,
        refused: false,
        was_connected,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_flight(pkid: u16) -> InFlight {
        InFlight {
            pkid,
            seq: u64::from(pkid),
            sent: Instant::now(),
        }
    }

    #[test]
    fn packet_ids_skip_zero_and_those_in_use() {
        let mut session = Session {
            last_pkid: u16::MAX - 1,
            ..Session::default()
        };
        session.in_flight.push(in_flight(u16::MAX));
        session.in_flight.push(in_flight(1));
        session.subscribing = Some(2);
        assert_eq!(session.next_pkid(), 3);
        assert_eq!(session.next_pkid(), 4);
        assert_eq!(session.acknowledged(1).map(|r| r.seq), Some(1));
        assert!(session.acknowledged(1).is_none());
    }
}
