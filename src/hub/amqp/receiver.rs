//! One partition receiver: admitted (address, rights, filter, epoch), then fed the partition's
//! events from its start position on, as IoT Hub's built-in endpoint shapes them.
//!
//! Link credit is the client's: a send waits for credit, so a slow reader holds only its own
//! position. While caught up the task waits on the partition's `watch` (no polling), on the
//! client's detach, on a higher epoch taking over (`amqp:link:stolen`), on the expiry of the
//! token that let it in (a token renewed on `$cbs` in time keeps it going; otherwise
//! `amqp:unauthorized-access`) and on the hub's shutdown.

use std::sync::Arc;

use fe2o3_amqp::types::definitions::{self, AmqpError};
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Data, Message, MessageAnnotations, MessageId, Properties,
};
use fe2o3_amqp::types::performatives::Attach;
use fe2o3_amqp::types::primitives::{Binary, OrderedMap, SimpleValue, Symbol, Timestamp, Value};
use fe2o3_amqp::Sender;
use serde_amqp::descriptor::Descriptor;
use tokio_util::sync::CancellationToken;

use super::address::{self, PartitionAddress, SELECTOR_FILTER, SELECTOR_FILTER_CODE};
use super::connection::{amqp_error, custom_condition, resolve_address, Conn};
use super::epoch::{Lease, Refused};
use crate::hub::auth::Permission;
use crate::hub::events::{Source, StartAt, StoredEvent};

/// Events read from the store at a time (each then waits for credit).
const BATCH: usize = 256;
/// The link property that makes a receiver exclusive.
pub const EPOCH: &str = "com.microsoft:epoch";

/// A receiver allowed to attach.
pub struct Admitted {
    pub consumer_group: String,
    pub partition: u32,
    pub start: StartAt,
    pub epoch: Option<i64>,
    pub lease: Lease,
    /// When the grant that let it in ends (Unix seconds); `None`: with the connection.
    pub expires: Option<u64>,
}

/// Decides whether a receiver may attach: the address names this hub, a configured consumer
/// group and a partition; the connection holds ServiceConnect; the filter is one the hub
/// understands; the epoch rules allow it.
pub fn admit(
    conn: &Conn,
    address: &PartitionAddress,
    attach: &Attach,
) -> Result<Admitted, definitions::Error> {
    let (consumer_group, partition) = resolve_address(conn, address)?;
    let now = conn.state.faults.now_unix();
    let Some(expires) = conn.grants.allows(Permission::ServiceConnect, now) else {
        return Err(amqp_error(
            AmqpError::UnauthorizedAccess.into(),
            "Unauthorized: ServiceConnect is needed to receive (put a token on $cbs or log in with SASL PLAIN)",
        ));
    };
    let start = match selector(attach) {
        Some(expression) => address::parse_selector(&expression)
            .map_err(|e| amqp_error(AmqpError::NotImplemented.into(), e.to_string()))?,
        None => StartAt::Beginning,
    };
    let epoch = attach
        .properties
        .as_ref()
        .and_then(|p| p.get(&Symbol::from(EPOCH)))
        .and_then(|v| match v {
            Value::Long(e) => Some(*e),
            Value::Int(e) => Some(i64::from(*e)),
            Value::Uint(e) => Some(i64::from(*e)),
            Value::Ulong(e) => i64::try_from(*e).ok(),
            _ => None,
        });
    let lease = conn
        .state
        .eventhub
        .epochs
        .join(&consumer_group, partition, epoch)
        .map_err(|refused| {
            let condition = match refused {
                // What Event Hubs sends for its QuotaExceeded.
                Refused::QuotaExceeded { .. } => AmqpError::ResourceLimitExceeded.into(),
                _ => custom_condition("amqp:link:stolen"),
            };
            amqp_error(condition, refused.to_string())
        })?;
    Ok(Admitted {
        consumer_group,
        partition,
        start,
        epoch,
        lease,
        expires,
    })
}

/// The redirect a receiver at IoT Hub's own address (`messages/events/REST`) gets, as a real
/// IoT Hub answers it: a detach with `amqp:link:redirect` whose info names the Event
/// Hubs-compatible endpoint: `hostname` (for TLS and the open frame), `network-host` and
/// `port` (where to dial: the listener this connection came in on) and `address` (the same
/// REST under the event hub's name). Only for a connection that may receive: others learn
/// nothing of the endpoint.
pub fn redirect(conn: &Conn, rest: &str) -> definitions::Error {
    let now = conn.state.faults.now_unix();
    if conn
        .grants
        .allows(Permission::ServiceConnect, now)
        .is_none()
    {
        return amqp_error(
            AmqpError::UnauthorizedAccess.into(),
            "Unauthorized: ServiceConnect is needed to receive (put a token on $cbs or log in with SASL PLAIN)",
        );
    }
    let scheme = if conn.tls { "amqps" } else { "amqp" };
    let address = address::redirect_address(
        scheme,
        REDIRECT_HOST,
        conn.local.port(),
        &conn.state.eventhub.hub_name,
        rest,
    );
    let mut info = OrderedMap::new();
    info.insert(
        Symbol::from("hostname"),
        Value::String(REDIRECT_HOST.into()),
    );
    info.insert(
        Symbol::from("network-host"),
        Value::String(conn.local.ip().to_string()),
    );
    info.insert(
        Symbol::from("port"),
        Value::Int(i32::from(conn.local.port())),
    );
    info.insert(Symbol::from("address"), Value::String(address));
    definitions::Error::new(
        definitions::LinkError::Redirect,
        Some("The link is redirected to the Event Hubs-compatible endpoint".to_string()),
        Some(info),
    )
}

/// The Event Hubs-compatible endpoint's host name: the one hub.json's
/// `eventhub_connection_string` names and the hub's certificate is for.
const REDIRECT_HOST: &str = "localhost";

/// The selector expression of a receiver's source filter, keyed or described by Event Hubs'
/// selector filter.
fn selector(attach: &Attach) -> Option<String> {
    let filter = attach.source.as_ref()?.filter.as_ref()?;
    filter.iter().find_map(|(key, value)| {
        let described = match value {
            Value::Described(described) => described,
            _ => return None,
        };
        let by_descriptor = match &described.descriptor {
            Descriptor::Name(name) => name.as_str() == SELECTOR_FILTER,
            Descriptor::Code(code) => *code == SELECTOR_FILTER_CODE,
        };
        if !(by_descriptor || key.as_str() == SELECTOR_FILTER) {
            return None;
        }
        match &described.value {
            Value::String(expression) => Some(expression.clone()),
            _ => None,
        }
    })
}

/// Feeds the partition's events to the receiver until it leaves, is kicked, loses its grant,
/// or the hub stops.
pub async fn serve(
    mut sender: Sender,
    admitted: Admitted,
    conn: Arc<Conn>,
    stop: CancellationToken,
) {
    let state = &conn.state;
    let Some(partition) = state.events.partition(admitted.partition) else {
        return;
    };
    let mut next = partition.resolve(&admitted.start);
    let mut changes = partition.subscribe();
    tracing::info!(
        peer = %conn.peer,
        consumer_group = admitted.consumer_group,
        partition = admitted.partition,
        epoch = admitted.epoch,
        from = next,
        "event hub receiver attached"
    );
    // Made once and polled again each time round: a wake-up re-registers nothing.
    let kicked = admitted.lease.kicked.cancelled();
    let stopped = stop.cancelled();
    tokio::pin!(kicked, stopped);
    let timer = |t: u64| Box::pin(tokio::time::sleep_until(state.faults.instant_of(t)));
    let mut expiry = admitted.expires.map(timer);
    // At the token's expiry: `Some(new expiry)` when it was renewed on `$cbs` in time.
    let renewed = || {
        conn.grants
            .allows(Permission::ServiceConnect, state.faults.now_unix())
    };
    let end = loop {
        let batch = partition.read(next, BATCH);
        if batch.is_empty() {
            let expired = async {
                match expiry.as_mut() {
                    Some(sleep) => sleep.as_mut().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut stopped => break End::Close,
                _ = &mut kicked => break End::Kicked,
                _ = expired => match renewed() {
                    Some(grant) => expiry = grant.map(timer),
                    None => break End::Expired,
                },
                changed = changes.changed() => {
                    if changed.is_err() {
                        break End::Close;
                    }
                    // Let the connections that are appending run first: on a busy hub the
                    // next read then takes many events, not the one that woke this task.
                    tokio::task::yield_now().await;
                }
                _ = sender.on_detach() => break End::Detached,
            }
            continue;
        }
        // One select per batch, not per event. The token's expiry is checked before each
        // event too: a receiver that never catches up must still lose its grant on time.
        let sending = async {
            for event in &batch {
                // The deadline, not `is_elapsed`: a sleep never polled is never marked elapsed.
                if expiry
                    .as_ref()
                    .is_some_and(|sleep| sleep.deadline() <= tokio::time::Instant::now())
                {
                    match renewed() {
                        Some(grant) => expiry = grant.map(timer),
                        None => return Ok(Some(End::Expired)),
                    }
                }
                let message = event_message(event, &conn);
                sender.send_batchable(message).await?;
                next = event.sequence_number() + 1;
            }
            Ok::<_, fe2o3_amqp::link::SendError>(None)
        };
        let gone = tokio::select! {
            sent = sending => sent.unwrap_or(Some(End::Detached)),
            _ = &mut kicked => Some(End::Kicked),
            _ = &mut stopped => Some(End::Close),
        };
        if let Some(end) = gone {
            break end;
        }
    };
    let close = match end {
        End::Detached => None,
        End::Close => Some(amqp_error(
            fe2o3_amqp::types::definitions::ConnectionError::ConnectionForced.into(),
            "the hub is stopping",
        )),
        End::Kicked => {
            let by = *admitted
                .lease
                .kicked_by
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            Some(amqp_error(
                custom_condition("amqp:link:stolen"),
                format!(
                    "New receiver with higher epoch of '{}' is created hence current receiver with epoch '{}' is getting disconnected.",
                    by.unwrap_or_default(),
                    admitted.epoch.map_or_else(|| "none".to_string(), |e| e.to_string())
                ),
            ))
        }
        End::Expired => Some(amqp_error(
            AmqpError::UnauthorizedAccess.into(),
            "Unauthorized: the token expired",
        )),
    };
    tracing::info!(
        peer = %conn.peer,
        consumer_group = admitted.consumer_group,
        partition = admitted.partition,
        reason = ?end,
        "event hub receiver detached"
    );
    match close {
        // An error on every detach the hub starts: azure-eventhub reads the error field by
        // position.
        Some(error) => {
            let _ = sender.close_with_error(error).await;
        }
        None => {
            let _ = sender.close().await;
        }
    }
}

#[derive(Debug)]
enum End {
    Detached,
    Close,
    Kicked,
    Expired,
}

fn symbol_key(name: &str) -> OwnedKey {
    OwnedKey::Symbol(Symbol::from(name))
}

/// An event as IoT Hub's built-in endpoint delivers it: the body as sent (one data section),
/// the device's application properties, its system properties where AMQP has them, and the
/// annotations Event Hubs and IoT Hub add.
pub fn event_message(event: &StoredEvent, _conn: &Conn) -> Message<Data> {
    let record = &event.record;
    let enqueued = Value::Timestamp(Timestamp::from_milliseconds(record.enqueued_ms));
    // Room for every annotation below (dt-subject included): no regrowth per event.
    let mut annotations = OrderedMap::with_capacity(9);
    annotations.insert(
        symbol_key("x-opt-sequence-number"),
        Value::Long(record.sequence_number),
    );
    annotations.insert(
        symbol_key("x-opt-offset"),
        Value::String(event.offset.to_string()),
    );
    annotations.insert(symbol_key("x-opt-enqueued-time"), enqueued.clone());
    annotations.insert(
        symbol_key("iothub-connection-device-id"),
        Value::String(record.device_id.to_string()),
    );
    // Events the hub makes itself (twin changes) carry no connection's authentication.
    if record.source == Source::Telemetry {
        annotations.insert(
            symbol_key("iothub-connection-auth-method"),
            Value::String(record.auth.as_json().into()),
        );
        annotations.insert(
            symbol_key("iothub-connection-auth-generation-id"),
            Value::String(record.generation_id.to_string()),
        );
    }
    annotations.insert(symbol_key("iothub-enqueuedtime"), enqueued);
    annotations.insert(
        symbol_key("iothub-message-source"),
        Value::String(record.source.as_str().into()),
    );

    let mut properties = Properties::default();
    for (key, value) in record.properties.system_properties() {
        let value = value.unwrap_or_default();
        match key {
            "mid" => properties.message_id = Some(MessageId::String(value.to_string())),
            "cid" => properties.correlation_id = Some(MessageId::String(value.to_string())),
            "ct" => properties.content_type = Some(Symbol::from(value)),
            "ce" => properties.content_encoding = Some(Symbol::from(value)),
            "uid" => properties.user_id = Some(Binary::from(value.as_bytes().to_vec())),
            "sub" => {
                annotations.insert(symbol_key("dt-subject"), Value::String(value.to_string()));
            }
            _ => {}
        }
    }
    let application: OrderedMap<String, SimpleValue> = record
        .properties
        .application_properties()
        .map(|(key, value)| {
            let value = SimpleValue::String(value.unwrap_or_default().to_string());
            (key.to_string(), value)
        })
        .collect();
    // No properties section when the device set none of its fields: Microsoft's own e2e
    // helpers (azure-iot-sdk-python's dev_utils) read `properties.content_type` whenever the
    // section is there, and pass against IoT Hub for a message with no content type.
    let properties = (properties != Properties::default()).then_some(properties);
    let mut message = Message::builder()
        .message_annotations(MessageAnnotations(annotations))
        .application_properties(ApplicationProperties(application))
        .data(Binary::from(record.body.to_vec()))
        .build();
    message.properties = properties;
    message
}
