//! The device's connection to IoT Hub: the only code in the agent that touches MQTT.
//!
//! Each connection attempt is a fresh rumqttc event loop with a fresh SAS token, polled by its
//! own task (so no poll is ever cancelled half-way) that forwards events to the session loop
//! here. The session loop publishes readings from the outbox (at most [`WINDOW`] in flight,
//! each tracked from its packet id to its PUBACK), serves twin requests and method answers
//! from the rest of the agent, and hands what the hub sends to the agent as [`Incoming`].
//!
//! A session ends when the connection fails (then: back off with full jitter, longer after
//! an authorization refusal), when the token is due for renewal (then: wait for in-flight
//! readings to be acknowledged, disconnect, reconnect at once with a new token), or at
//! shutdown (the same draining within a grace period). Whatever was in flight and not
//! acknowledged goes back to the outbox, so nothing accepted is sent twice and nothing
//! produced is lost.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, NetworkOptions,
    Outgoing, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::context::{Beat, Counters, HandlerContext};
use super::outbox::Outbox;
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
/// The api-version this agent speaks.
/// Largest packet either way: a 256 KB message plus room for topic and headers.
const MAX_PACKET: usize = 256 * 1024 + 8 * 1024;

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
    pub requests: mpsc::Receiver<Request>,
    pub incoming: mpsc::Sender<Incoming>,
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
                            "the hub refused the device's credentials");
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
        let _ = self.incoming.send(event).await;
    }

    fn options(&self, token: String) -> (AsyncClient, EventLoop) {
        let (host, port) = self.identity.connect_address();
        let mut options = MqttOptions::new(self.identity.device_id.clone(), host, port);
        options
            .set_keep_alive(self.settings.keep_alive)
            .set_clean_session(false)
            .set_credentials(username(&self.identity), token)
            .set_transport(Transport::Tls(TlsConfiguration::Rustls(self.tls.clone())))
            .set_max_packet_size(MAX_PACKET, MAX_PACKET)
            .set_inflight(100);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        network.set_connection_timeout(self.settings.connect_timeout.as_secs().max(1));
        eventloop.set_network_options(network);
        (client, eventloop)
    }

    async fn session(&mut self) -> SessionEnd {
        if self.shutdown.is_cancelled() {
            return SessionEnd::Shutdown;
        }
        let lifetime = self.settings.sas_lifetime;
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let resource =
            sas::device_resource(&self.identity.host_name, &self.identity.device_id, None);
        let token = match sas::generate_token(
            &resource,
            self.identity.key.expose(),
            None,
            now + lifetime.as_secs().max(1),
        ) {
            Ok(token) => token,
            Err(error) => {
                return SessionEnd::Failed {
                    reason: format!("cannot sign a token: {error}"),
                    refused: true,
                    was_connected: false,
                }
            }
        };
        let (client, mut eventloop) = self.options(token);
        let (events_tx, mut events) = mpsc::channel(64);
        let poller = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let failed = event.is_err();
                if events_tx.send(event).await.is_err() || failed {
                    return;
                }
            }
        });
        let _poller = AbortOnDrop(poller);

        let session_present = match self.wait_for_connack(&mut events).await {
            Ok(present) => present,
            Err(end) => return end,
        };
        Counters::bump(&self.ctx.counters().connects);
        self.ctx.counters().set_connected(true);
        tracing::info!(device = %self.identity.device_id, session_present, "connected to IoT Hub");
        if !session_present {
            let filters = [
                (METHODS_FILTER.to_string(), QoS::AtMostOnce),
                (DESIRED_PATCHES_FILTER.to_string(), QoS::AtLeastOnce),
                (TWIN_RESPONSES_FILTER.to_string(), QoS::AtMostOnce),
                (
                    topic::c2d_filter(&self.identity.device_id),
                    QoS::AtLeastOnce,
                ),
            ];
            let filters = filters
                .into_iter()
                .map(|(path, qos)| rumqttc::SubscribeFilter::new(path, qos));
            if let Err(error) = client.try_subscribe_many(filters) {
                return failed(format!("cannot subscribe: {error}"), true);
            }
        }
        self.notify(Incoming::Connected { session_present }).await;

        let mut state = SessionState::default();
        // Renew at the configured fraction of the lifetime, minus up to 5 % jitter so that a
        // fleet started together does not reconnect together.
        let fraction = self.settings.renew_at * rand::thread_rng().gen_range(0.95..=1.0);
        let renew_at = Instant::now() + lifetime.mul_f64(fraction);
        let mut draining: Option<(Instant, SessionEnd)> = None;
        loop {
            self.ctx.heartbeat().beat(Beat::Connection);
            if draining.is_none() {
                if let Err(reason) = self.feed(&client, &mut state) {
                    return failed(reason, true);
                }
            } else if self.outbox.in_flight() == 0 {
                let (_, end) = draining.take().expect("checked above");
                disconnect(&client, &mut events).await;
                return end;
            }
            let drain_deadline = draining.as_ref().map(|(at, _)| *at);
            // Waiting for the hub, the agent or a timer: an idle session loop needs no wake-up
            // of its own (a dead connection ends it through the MQTT keep-alive).
            match drain_deadline {
                Some(at) => self.ctx.heartbeat().wait_until(Beat::Connection, at),
                None => self.ctx.heartbeat().wait_for_events(Beat::Connection),
            }
            tokio::select! {
                _ = self.shutdown.cancelled(), if draining.is_none() => {
                    draining = Some((Instant::now() + DRAIN_GRACE, SessionEnd::Shutdown));
                }
                _ = tokio::time::sleep_until(renew_at), if draining.is_none() => {
                    tracing::info!(device = %self.identity.device_id, "renewing the SAS token");
                    draining = Some((Instant::now() + DRAIN_GRACE, SessionEnd::Renew));
                }
                _ = sleep_until_opt(drain_deadline) => {
                    let (_, end) = draining.take().expect("deadline implies draining");
                    tracing::warn!(device = %self.identity.device_id, in_flight = self.outbox.in_flight(),
                        "readings still unacknowledged at disconnect; they will be sent again");
                    disconnect(&client, &mut events).await;
                    return end;
                }
                event = events.recv() => match event {
                    None => return failed("the event loop ended".into(), true),
                    Some(Err(error)) => return failed(describe(&error), true),
                    Some(Ok(event)) => {
                        // Handing an event to the agent may wait (a full channel): that is work.
                        self.ctx.heartbeat().beat(Beat::Connection);
                        self.on_event(event, &mut state).await
                    }
                },
                request = self.requests.recv(), if draining.is_none() => match request {
                    None => return SessionEnd::Shutdown,
                    Some(request) => {
                        if let Err(reason) = on_request(&client, request, &mut state) {
                            return failed(reason, true);
                        }
                    }
                },
                _ = self.outbox.ready.notified(), if draining.is_none() && self.outbox.in_flight() < WINDOW => {}
            }
        }
    }

    async fn wait_for_connack(
        &self,
        events: &mut mpsc::Receiver<Result<Event, ConnectionError>>,
    ) -> Result<bool, SessionEnd> {
        let deadline = Instant::now() + self.settings.connect_timeout;
        loop {
            self.ctx.heartbeat().wait_until(Beat::Connection, deadline);
            let event = tokio::select! {
                _ = self.shutdown.cancelled() => return Err(SessionEnd::Shutdown),
                event = tokio::time::timeout_at(deadline, events.recv()) => event,
            };
            match event {
                Err(_) => return Err(failed("no CONNACK in time".into(), false)),
                Ok(None) => return Err(failed("the event loop ended".into(), false)),
                Ok(Some(Ok(Event::Incoming(Packet::ConnAck(ack))))) => {
                    return Ok(ack.session_present)
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(error))) => {
                    let refused = matches!(
                        error,
                        ConnectionError::ConnectionRefused(
                            ConnectReturnCode::BadUserNamePassword
                                | ConnectReturnCode::NotAuthorized
                        )
                    );
                    return Err(SessionEnd::Failed {
                        reason: describe(&error),
                        refused,
                        was_connected: false,
                    });
                }
            }
        }
    }

    /// Publishes waiting readings while the window has room.
    fn feed(&self, client: &AsyncClient, state: &mut SessionState) -> Result<(), String> {
        while self.outbox.in_flight() < WINDOW {
            let Some(reading) = self.outbox.take_next() else {
                break;
            };
            let topic = topic::telemetry_topic(&self.identity.device_id, &reading.properties());
            client
                .try_publish(topic, QoS::AtLeastOnce, false, reading.body.clone())
                .map_err(|e| format!("cannot queue a reading: {e}"))?;
            state.awaiting_pkid.push_back(reading.seq);
            Counters::bump(&self.ctx.counters().readings_published);
        }
        Ok(())
    }

    async fn on_event(&self, event: Event, state: &mut SessionState) {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) if pkid != 0 => {
                // rumqttc numbers QoS 1 publishes in the order they were queued, and only
                // readings are sent at QoS 1.
                if let Some(seq) = state.awaiting_pkid.pop_front() {
                    state.in_flight.insert(pkid, seq);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(seq) = state.in_flight.remove(&ack.pkid) {
                    if self.outbox.acknowledge(seq) {
                        Counters::bump(&self.ctx.counters().readings_acknowledged);
                        self.ctx.counters().set_queue_length(self.outbox.len());
                        tracing::info!(device = %self.identity.device_id, seq, "reading acknowledged by the hub");
                    }
                }
            }
            Event::Incoming(Packet::Publish(publish)) => {
                self.on_publish(publish, state).await;
            }
            _ => {}
        }
    }

    async fn on_publish(&self, publish: rumqttc::Publish, state: &mut SessionState) {
        match parse_cloud_publish(&publish.topic, &self.identity.device_id) {
            Ok(CloudPublish::TwinResponse {
                status,
                rid,
                version,
            }) => match state.twin_waiting.remove(&rid) {
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
}

#[derive(Default)]
struct SessionState {
    /// Readings queued to rumqttc, waiting to learn their packet id.
    awaiting_pkid: VecDeque<u64>,
    /// Packet id -> reading seq, until the PUBACK.
    in_flight: HashMap<u16, u64>,
    twin_waiting: HashMap<String, oneshot::Sender<TwinResponse>>,
    next_rid: u64,
}

fn on_request(
    client: &AsyncClient,
    request: Request,
    state: &mut SessionState,
) -> Result<(), String> {
    let (topic, body, reply) = match request {
        Request::TwinGet { reply } => {
            state.next_rid += 1;
            let rid = state.next_rid.to_string();
            (topic::twin_get_topic(&rid), Vec::new(), Some((rid, reply)))
        }
        Request::TwinPatchReported { body, reply } => {
            state.next_rid += 1;
            let rid = state.next_rid.to_string();
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
    client
        .try_publish(topic, QoS::AtMostOnce, false, body)
        .map_err(|e| format!("cannot queue a request: {e}"))?;
    if let Some((rid, reply)) = reply {
        state.twin_waiting.insert(rid, reply);
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

fn describe(error: &ConnectionError) -> String {
    match error {
        ConnectionError::ConnectionRefused(code) => {
            format!("CONNACK refused the connection ({code:?})")
        }
        other => other.to_string(),
    }
}

/// Sends DISCONNECT and gives the event loop a moment to write it.
async fn disconnect(
    client: &AsyncClient,
    events: &mut mpsc::Receiver<Result<Event, ConnectionError>>,
) {
    if client.try_disconnect().is_err() {
        return;
    }
    // rumqttc reports the DISCONNECT when it queues it; it is written by the polls that
    // follow, which end when the hub closes the connection.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = events.recv().await {}
    })
    .await;
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
