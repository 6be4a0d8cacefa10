//! One AMQP connection, from TLS and SASL to close: its sessions, and on them the links a
//! client attaches: `$cbs` (put-token) and `$management` (READ of the event hub and its
//! partitions), each a request link and a response link, partition receivers, and the
//! cloud-to-device links (`devicebound`, `feedback`).
//!
//! A request/response pair is matched by the response link's target address (what a request's
//! `reply-to` names) or by the node's name; both live on one session. A link the hub does not
//! serve, or a receiver that may not attach, is accepted and at once detached with an AMQP
//! error (`amqp:not-found`, `amqp:unauthorized-access`, ...): how Event Hubs refuses links.
//! Every task of a connection ends when the connection does, or when the hub stops.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerSessionHandle, SessionAcceptor,
};
use fe2o3_amqp::types::definitions::{self, AmqpError, ErrorCondition, Fields};
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Message, Properties, Source, Target, TargetArchetype,
};
use fe2o3_amqp::types::performatives::Attach;
use fe2o3_amqp::types::primitives::{Array, OrderedMap, SimpleValue, Symbol, Timestamp, Value};
use fe2o3_amqp::{Receiver, Sender};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::address::{self, PartitionAddress};
use super::authz::{self, Grants};
use super::receiver;
use super::sasl::Sasl;
use super::{coalesce, devicebound, feedback, header};
use crate::hub::auth::Permission;
use crate::hub::HubState;

/// Time a new connection has for TLS, SASL and the open frames.
pub const OPEN_DEADLINE: Duration = Duration::from_secs(10);
/// The largest frame the hub accepts (and announces: not the default, see the module notes
/// of `amqp`). A 256 KB message spans several frames.
const MAX_FRAME_SIZE: u32 = 64 * 1024;
/// Sessions per connection (announced; not the default, see `amqp`).
const CHANNEL_MAX: u16 = 4999;
/// Links per session (announced in `begin`; not the default, see `amqp`).
const HANDLE_MAX: u32 = 255;
/// Responses queued for one response link; a client that does not read them stalls its own
/// requests, not the hub (the request task waits).
const RESPONSES: usize = 16;

pub type AnyMessage = Message<Body<Value>>;

/// What the tasks of one connection share.
pub struct Conn {
    pub state: Arc<HubState>,
    pub grants: Arc<Grants>,
    pub peer: SocketAddr,
    /// The hub's end of the connection: where a redirect sends the client (`receiver`).
    pub local: SocketAddr,
    /// Whether the connection came in over TLS.
    pub tls: bool,
}

/// A session's response links (`$cbs`, `$management`), by reply-to address and by node.
/// A client may send its first request before the hub has taken its response link's attach
/// (uamqp does, on a busy machine): a request then waits for it, up to [`RESPONDER_WAIT`].
#[derive(Default)]
struct ResponseLinks {
    by_address: Mutex<HashMap<String, mpsc::Sender<AnyMessage>>>,
    added: tokio::sync::Notify,
}

type Responders = Arc<ResponseLinks>;

/// How long a request waits for its response link to be attached.
const RESPONDER_WAIT: Duration = Duration::from_secs(5);

impl ResponseLinks {
    fn add(&self, node: String, reply_to: Option<String>, tx: mpsc::Sender<AnyMessage>) {
        {
            let mut map = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(reply_to) = reply_to {
                map.insert(reply_to, tx.clone());
            }
            map.insert(node, tx);
        }
        self.added.notify_waiters();
    }

    fn find(&self, reply_to: Option<&String>, node: &str) -> Option<mpsc::Sender<AnyMessage>> {
        let map = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        reply_to
            .and_then(|r| map.get(r))
            .or_else(|| map.get(node))
            .cloned()
    }

    /// The response link for a request, waiting for its attach if it has not come yet.
    async fn wait_for(
        &self,
        reply_to: Option<&String>,
        node: &str,
    ) -> Option<mpsc::Sender<AnyMessage>> {
        let deadline = tokio::time::Instant::now() + RESPONDER_WAIT;
        loop {
            // Registered before the lookup, so that an attach in between is not missed.
            let added = self.added.notified();
            if let Some(tx) = self.find(reply_to, node) {
                return Some(tx);
            }
            if tokio::time::timeout_at(deadline, added).await.is_err() {
                return None;
            }
        }
    }
}

fn fields(entries: &[(&str, Value)]) -> Fields {
    let mut map = OrderedMap::new();
    for (k, v) in entries {
        map.insert(Symbol::from(*k), v.clone());
    }
    map
}

/// Always some properties: the last field of `open`, `begin` and `attach` is then written.
fn product_properties() -> Fields {
    fields(&[("product", Value::String("simdevice".into()))])
}

pub async fn serve(
    socket: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    state: Arc<HubState>,
    shutdown: CancellationToken,
    handshake_permit: OwnedSemaphorePermit,
) {
    let grants = Arc::new(Grants::default());
    let (local, over_tls) = (socket.local_addr().unwrap_or(peer), tls.is_some());
    let acceptor = ConnectionAcceptor::builder()
        .container_id(format!("simdevice-{}", state.eventhub.hub_name))
        .max_frame_size(MAX_FRAME_SIZE)
        .channel_max(CHANNEL_MAX)
        .properties(product_properties())
        .sasl_acceptor(Sasl {
            state: state.clone(),
            grants: grants.clone(),
        })
        .build();
    let opened = tokio::time::timeout(OPEN_DEADLINE, async {
        match tls {
            Some(tls) => {
                let stream = tls.accept(socket).await.map_err(|e| e.to_string())?;
                header::open(coalesce::writes(stream), &acceptor)
                    .await
                    .map_err(|e| e.to_string())
            }
            None => header::open(coalesce::writes(socket), &acceptor)
                .await
                .map_err(|e| e.to_string()),
        }
    })
    .await;
    drop(handshake_permit);
    let mut connection = match opened {
        Ok(Ok(connection)) => connection,
        Ok(Err(reason)) => {
            tracing::info!(%peer, reason, "AMQP connection not opened");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "AMQP connection not opened within the deadline");
            return;
        }
    };
    tracing::debug!(%peer, "AMQP connection opened");
    let conn = Arc::new(Conn {
        state,
        grants,
        peer,
        local,
        tls: over_tls,
    });
    let stop = shutdown.child_token();
    let tasks = TaskTracker::new();
    let session_acceptor = SessionAcceptor::builder()
        .handle_max(HANDLE_MAX)
        .properties(product_properties())
        .build();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            incoming = connection.next_incoming_session() => {
                let Some(incoming) = incoming else { break };
                match session_acceptor.accept_incoming_session(incoming, &mut connection).await {
                    Ok(session) => {
                        tasks.spawn(serve_session(session, conn.clone(), stop.clone(), tasks.clone()));
                    }
                    Err(error) => {
                        tracing::info!(%peer, %error, "AMQP session refused");
                        break;
                    }
                }
            }
        }
    }
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    if let Err(error) = connection.close().await {
        tracing::debug!(%peer, %error, "AMQP connection closed with an error");
    }
    tracing::debug!(%peer, "AMQP connection closed");
}

type Acceptor = LinkAcceptor<fn(Source) -> Option<Source>, fn(Target) -> Option<Target>>;

fn link_acceptor() -> Acceptor {
    LinkAcceptor::builder()
        .properties(product_properties())
        .build()
}

/// For `/messages/devicebound`: uamqp (azure-iot-hub) asks for rcv-settle-mode `second` on its
/// sender but completes a send only on a settled disposition; the receiver's mode is the one
/// that holds (AMQP 1.0, 2.7.3), and the hub answers `first`, settling as it accepts.
fn settle_first_link_acceptor() -> Acceptor {
    LinkAcceptor::builder()
        .properties(product_properties())
        .supported_receiver_settle_modes(fe2o3_amqp::acceptor::SupportedReceiverSettleModes::First)
        .fallback_receiver_settle_mode(definitions::ReceiverSettleMode::First)
        .build()
}

async fn serve_session(
    mut session: ListenerSessionHandle,
    conn: Arc<Conn>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let responders: Responders = Arc::default();
    loop {
        let attach = tokio::select! {
            _ = stop.cancelled() => break,
            attach = session.next_incoming_attach() => match attach {
                Some(attach) => attach,
                None => break,
            },
        };
        on_attach(attach, &mut session, &conn, &responders, &stop, &tasks).await;
    }
    let _ = session.end().await;
}

fn source_address(attach: &Attach) -> Option<String> {
    attach.source.as_ref()?.address.clone()
}

fn target_address(attach: &Attach) -> Option<String> {
    match attach.target.as_deref()? {
        TargetArchetype::Target(target) => target.address.clone(),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// An AMQP error for a detach.
pub fn amqp_error(condition: ErrorCondition, description: impl Into<String>) -> definitions::Error {
    definitions::Error::new(condition, Some(description.into()), None)
}

pub fn custom_condition(symbol: &str) -> ErrorCondition {
    ErrorCondition::Custom(Symbol::from(symbol))
}

async fn refuse(link: LinkEndpoint, error: definitions::Error) {
    match link {
        LinkEndpoint::Sender(sender) => {
            let _ = sender.close_with_error(error).await;
        }
        LinkEndpoint::Receiver(receiver) => {
            let _ = receiver.close_with_error(error).await;
        }
    }
}

async fn on_attach(
    attach: Attach,
    session: &mut ListenerSessionHandle,
    conn: &Arc<Conn>,
    responders: &Responders,
    stop: &CancellationToken,
    tasks: &TaskTracker,
) {
    let peer = conn.peer;
    let name = attach.name.clone();
    let (source, target) = (source_address(&attach), target_address(&attach));
    // What the link is for, decided before accepting it.
    let plan = match attach.role {
        // The client sends: requests to `$cbs` or `$management`.
        fe2o3_amqp::types::definitions::Role::Sender => {
            match target.as_deref().map(address::path_of) {
                Some(node @ ("$cbs" | "$management")) => Plan::Requests(node.to_string()),
                // Case-insensitive: Node's azure-iothub writes `/messages/serviceBound/...`.
                Some(path) if path.eq_ignore_ascii_case(devicebound::NODE) => {
                    if devicebound::allowed(conn) {
                        Plan::DeviceBound
                    } else {
                        Plan::Refuse(devicebound::unauthorized())
                    }
                }
                _ => Plan::Refuse(amqp_error(
                    AmqpError::NotFound.into(),
                    format!("the hub accepts no messages at {target:?}"),
                )),
            }
        }
        fe2o3_amqp::types::definitions::Role::Receiver => {
            match source.as_deref().map(address::path_of) {
                Some(node @ ("$cbs" | "$management")) => Plan::Responses {
                    node: node.to_string(),
                    reply_to: target.clone(),
                },
                Some(path) if path.eq_ignore_ascii_case(feedback::NODE) => {
                    if devicebound::allowed(conn) {
                        Plan::Feedback
                    } else {
                        Plan::Refuse(devicebound::unauthorized())
                    }
                }
                Some(_)
                    if source
                        .as_deref()
                        .and_then(address::iothub_events_rest)
                        .is_some() =>
                {
                    let rest = source.as_deref().and_then(address::iothub_events_rest);
                    Plan::Refuse(receiver::redirect(conn, rest.unwrap_or_default()))
                }
                Some(_) => match source.as_deref().and_then(address::parse_partition_address) {
                    Some(partition) => match receiver::admit(conn, &partition, &attach) {
                        Ok(admitted) => Plan::Receive(Box::new(admitted)),
                        Err(error) => Plan::Refuse(error),
                    },
                    None => Plan::Refuse(amqp_error(
                        AmqpError::NotFound.into(),
                        format!("no such entity: {source:?}"),
                    )),
                },
                None => Plan::Refuse(amqp_error(
                    AmqpError::InvalidField.into(),
                    "no source address",
                )),
            }
        }
    };
    let acceptor = match plan {
        Plan::DeviceBound => settle_first_link_acceptor(),
        _ => link_acceptor(),
    };
    let link = match acceptor.accept_incoming_attach(attach, session).await {
        Ok(link) => link,
        Err(error) => {
            tracing::info!(%peer, link = name, %error, "AMQP link not attached");
            return;
        }
    };
    match (plan, link) {
        (Plan::Refuse(error), link) => {
            tracing::info!(%peer, link = name, source, target, reason = ?error.description, "AMQP link refused");
            refuse(link, error).await;
        }
        (Plan::Requests(node), LinkEndpoint::Receiver(receiver)) => {
            tasks.spawn(serve_requests(
                receiver,
                node,
                conn.clone(),
                responders.clone(),
                stop.clone(),
            ));
        }
        (Plan::Responses { node, reply_to }, LinkEndpoint::Sender(sender)) => {
            let (tx, rx) = mpsc::channel(RESPONSES);
            responders.add(node, reply_to, tx);
            tasks.spawn(serve_responses(sender, rx, stop.clone()));
        }
        (Plan::Receive(admitted), LinkEndpoint::Sender(sender)) => {
            tasks.spawn(receiver::serve(
                sender,
                *admitted,
                conn.clone(),
                stop.clone(),
            ));
        }
        (Plan::DeviceBound, LinkEndpoint::Receiver(receiver)) => {
            tasks.spawn(devicebound::serve(receiver, conn.clone(), stop.clone()));
        }
        (Plan::Feedback, LinkEndpoint::Sender(sender)) => {
            tasks.spawn(feedback::serve(sender, conn.clone(), stop.clone()));
        }
        (_, link) => {
            refuse(
                link,
                amqp_error(AmqpError::NotAllowed.into(), "unexpected link role"),
            )
            .await;
        }
    }
}

enum Plan {
    Refuse(definitions::Error),
    Requests(String),
    Responses {
        node: String,
        reply_to: Option<String>,
    },
    Receive(Box<receiver::Admitted>),
    /// Cloud-to-device messages from the service (`devicebound`).
    DeviceBound,
    /// Feedback on them to the service (`feedback`).
    Feedback,
}

async fn serve_requests(
    mut receiver: Receiver,
    node: String,
    conn: Arc<Conn>,
    responders: Responders,
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
                tracing::debug!(peer = %conn.peer, node, %error, "AMQP request link ended");
                break;
            }
        };
        if receiver.accept(&delivery).await.is_err() {
            break;
        }
        let request = delivery.into_message();
        let response = if node == "$cbs" {
            put_token(&conn, &request)
        } else {
            management(&conn, &request)
        };
        let reply_to = request.properties.as_ref().and_then(|p| p.reply_to.clone());
        let responder = tokio::select! {
            _ = stop.cancelled() => break,
            responder = responders.wait_for(reply_to.as_ref(), &node) => responder,
        };
        match responder {
            Some(tx) => {
                if tx.send(response).await.is_err() {
                    tracing::debug!(peer = %conn.peer, node, "AMQP response link gone; response dropped");
                }
            }
            None => {
                tracing::info!(peer = %conn.peer, node, wait = ?RESPONDER_WAIT, "AMQP request whose response link was not attached in time; response dropped")
            }
        }
    }
    let _ = receiver.close().await;
}

async fn serve_responses(
    mut sender: Sender,
    mut responses: mpsc::Receiver<AnyMessage>,
    stop: CancellationToken,
) {
    loop {
        let response = tokio::select! {
            _ = stop.cancelled() => break,
            response = responses.recv() => match response {
                Some(response) => response,
                None => break,
            },
        };
        // `batchable`: the last field of the transfer is written (module notes of `amqp`).
        if sender.send_batchable(response).await.is_err() {
            break;
        }
    }
    let _ = sender.close().await;
}

fn app_property<'a>(message: &'a AnyMessage, key: &str) -> Option<&'a SimpleValue> {
    message.application_properties.as_ref()?.0.get(key)
}

fn app_string(message: &AnyMessage, key: &str) -> Option<String> {
    match app_property(message, key)? {
        SimpleValue::String(s) => Some(s.clone()),
        SimpleValue::Symbol(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

fn response(request: &AnyMessage, status: i32, description: &str, body: Value) -> AnyMessage {
    let correlation_id = request
        .properties
        .as_ref()
        .and_then(|p| p.message_id.clone());
    let properties = Properties {
        correlation_id,
        ..Default::default()
    };
    let application_properties = ApplicationProperties::builder()
        .insert("status-code", SimpleValue::Int(status))
        .insert(
            "status-description",
            SimpleValue::String(description.to_string()),
        )
        .build();
    Message::builder()
        .properties(properties)
        .application_properties(application_properties)
        .body(Body::Value(AmqpValue(body)))
        .build()
}

/// `$cbs` put-token: the token's grant joins the connection's (renewing its audience's).
fn put_token(conn: &Conn, request: &AnyMessage) -> AnyMessage {
    if app_string(request, "operation").as_deref() != Some("put-token") {
        return response(request, 400, "Bad Request: unknown operation", Value::Null);
    }
    let audience = app_string(request, "name").unwrap_or_default();
    let token = match &request.body {
        Body::Value(AmqpValue(Value::String(token))) => token.clone(),
        _ => {
            return response(
                request,
                400,
                "Bad Request: the token is not a string",
                Value::Null,
            )
        }
    };
    let now = conn.state.faults.now_unix();
    match authz::check_token(&conn.state, &token, now) {
        Ok(grant) => {
            tracing::debug!(peer = %conn.peer, audience, policy = grant.policy, "AMQP token accepted");
            conn.grants.put_token(audience, grant);
            // 200, as IoT Hub answers: Node's azure-iothub takes nothing else (uamqp takes 200
            // or 202, azure-eventhub any 2xx).
            response(request, 200, "OK", Value::Null)
        }
        Err(failure) => {
            tracing::info!(peer = %conn.peer, audience, reason = %failure, "AMQP token refused");
            response(request, 401, "Unauthorized", Value::Null)
        }
    }
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    let mut map = OrderedMap::new();
    for (k, v) in entries {
        map.insert(Value::String(k.to_string()), v);
    }
    Value::Map(map)
}

/// `$management` READ of `com.microsoft:eventhub` and `com.microsoft:partition`. Allowed by
/// the connection's grants or by the request's own `security_token`.
fn management(conn: &Conn, request: &AnyMessage) -> AnyMessage {
    let state = &conn.state;
    let now = state.faults.now_unix();
    let allowed = conn
        .grants
        .allows(Permission::ServiceConnect, now)
        .is_some()
        || app_string(request, "security_token").is_some_and(|token| {
            authz::check_token(state, &token, now)
                .is_ok_and(|g| g.rights.contains(&Permission::ServiceConnect))
        });
    if !allowed {
        tracing::info!(peer = %conn.peer, "AMQP management request refused: no ServiceConnect");
        return response(request, 401, "Unauthorized", Value::Null);
    }
    if app_string(request, "operation").as_deref() != Some("READ") {
        return response(
            request,
            400,
            "Bad Request: only READ is served",
            Value::Null,
        );
    }
    let hub = &state.eventhub.hub_name;
    if !app_string(request, "name").is_some_and(|n| n.eq_ignore_ascii_case(hub)) {
        return response(request, 404, "Not Found: no such event hub", Value::Null);
    }
    let store = &state.events;
    match app_string(request, "type").as_deref() {
        Some("com.microsoft:eventhub") => {
            let ids: Vec<Value> = (0..store.partition_count())
                .map(|p| Value::String(p.to_string()))
                .collect();
            let body = map(vec![
                ("name", Value::String(hub.clone())),
                ("type", Value::String("com.microsoft:eventhub".into())),
                (
                    "created_at",
                    Value::Timestamp(Timestamp::from_milliseconds(store.created_ms())),
                ),
                (
                    "partition_count",
                    Value::Int(store.partition_count() as i32),
                ),
                ("partition_ids", Value::Array(Array::from(ids))),
            ]);
            response(request, 200, "OK", body)
        }
        Some("com.microsoft:partition") => {
            let id = app_string(request, "partition").unwrap_or_default();
            let Some(partition) = id.parse::<u32>().ok().and_then(|p| store.partition(p)) else {
                return response(request, 404, "Not Found: no such partition", Value::Null);
            };
            let info = partition.info();
            let body = map(vec![
                ("name", Value::String(hub.clone())),
                ("type", Value::String("com.microsoft:partition".into())),
                ("partition", Value::String(id)),
                (
                    "begin_sequence_number",
                    Value::Long(info.begin_sequence_number),
                ),
                (
                    "last_enqueued_sequence_number",
                    Value::Long(info.last_sequence_number),
                ),
                ("last_enqueued_offset", Value::String(info.last_offset)),
                (
                    "last_enqueued_time_utc",
                    Value::Timestamp(Timestamp::from_milliseconds(info.last_enqueued_ms)),
                ),
                ("is_partition_empty", Value::Bool(info.is_empty)),
            ]);
            response(request, 200, "OK", body)
        }
        _ => response(request, 400, "Bad Request: unknown type", Value::Null),
    }
}

/// For `receiver::admit`: the consumer group and partition an address names, or the error
/// to detach with.
pub fn resolve_address(
    conn: &Conn,
    address: &PartitionAddress,
) -> Result<(String, u32), definitions::Error> {
    let endpoint = &conn.state.eventhub;
    if !address.hub.eq_ignore_ascii_case(&endpoint.hub_name) {
        return Err(amqp_error(
            AmqpError::NotFound.into(),
            format!("no event hub named {:?}", address.hub),
        ));
    }
    let Some(group) = endpoint.consumer_group(&address.consumer_group) else {
        return Err(amqp_error(
            AmqpError::NotFound.into(),
            format!("no consumer group named {:?}", address.consumer_group),
        ));
    };
    let partition = address
        .partition
        .parse::<u32>()
        .ok()
        .filter(|p| *p < conn.state.events.partition_count())
        .ok_or_else(|| {
            amqp_error(
                AmqpError::NotFound.into(),
                format!("no partition {:?}", address.partition),
            )
        })?;
    Ok((group.to_string(), partition))
}
