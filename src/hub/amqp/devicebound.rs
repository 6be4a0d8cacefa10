//! `/messages/devicebound`: the link on which services send cloud-to-device messages
//! (azure-iot-hub's `send_c2d_message`, Node `azure-iothub`'s `Client.send`). The client
//! attaches a sender after a `$cbs` token (or a SASL login) with ServiceConnect; each transfer
//! names its device in `to` (`/devices/{id}/messages/devicebound`) and goes into that device's
//! queue (`hub::c2d`), then is settled Accepted, or Rejected with the error the real service
//! gives (`amqp:not-found` for an unknown device, `amqp:resource-limit-exceeded` for a full
//! queue, what the .NET SDK maps to DeviceNotFound and DeviceMaximumQueueDepthExceeded).
//!
//! The message's translation is pure ([`outgoing`]); May not touch MQTT: the queue delivers.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use fe2o3_amqp::types::definitions::{self, AmqpError, ErrorCondition, LinkError};
use fe2o3_amqp::types::messaging::{Body, MessageId};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use fe2o3_amqp::Receiver;
use tokio_util::sync::CancellationToken;

use super::connection::{amqp_error, AnyMessage, Conn};
use crate::hub::auth::Permission;
use crate::hub::c2d::{self, Ack, Outgoing, SendError};
use crate::protocol::encoding::dec;

/// The node's path (after the host).
pub const NODE: &str = "messages/devicebound";

/// Whether the connection may send cloud-to-device messages now.
pub fn allowed(conn: &Conn) -> bool {
    let now = conn.state.faults.now_unix();
    conn.grants
        .allows(Permission::ServiceConnect, now)
        .is_some()
}

/// The refusal of an attach without ServiceConnect.
pub fn unauthorized() -> definitions::Error {
    amqp_error(
        AmqpError::UnauthorizedAccess.into(),
        "ErrorCode:IotHubUnauthorizedAccess;sending cloud-to-device messages needs a token with ServiceConnect",
    )
}

/// Takes transfers until the link or the connection ends.
pub async fn serve(mut receiver: Receiver, conn: Arc<Conn>, stop: CancellationToken) {
    loop {
        let delivery = tokio::select! {
            _ = stop.cancelled() => break,
            delivery = receiver.recv::<Body<Value>>() => delivery,
        };
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(error) => {
                tracing::debug!(peer = %conn.peer, %error, "AMQP devicebound link ended");
                break;
            }
        };
        let outcome = if allowed(&conn) {
            outgoing(delivery.message()).and_then(|(device_id, message)| {
                c2d::send(&conn.state, &device_id, message)
                    .map(|id| (device_id, id))
                    .map_err(|e| refusal(&e))
            })
        } else {
            Err(unauthorized())
        };
        let settled = match outcome {
            Ok((device, message_id)) => {
                tracing::debug!(peer = %conn.peer, device, message_id, "cloud-to-device message accepted");
                receiver.accept(&delivery).await
            }
            Err(error) => {
                tracing::info!(peer = %conn.peer, reason = ?error.description, "cloud-to-device message rejected");
                receiver.reject(&delivery, error).await
            }
        };
        if settled.is_err() {
            break;
        }
    }
    let _ = receiver.close().await;
}

/// The AMQP error for a refusal by the queue.
fn refusal(error: &SendError) -> definitions::Error {
    let condition: ErrorCondition = match error {
        SendError::DeviceNotFound(_) => AmqpError::NotFound.into(),
        SendError::QueueFull(_) => AmqpError::ResourceLimitExceeded.into(),
        SendError::TooLarge(_) => LinkError::MessageSizeExceeded.into(),
        SendError::Store(_) => AmqpError::InternalError.into(),
    };
    let text = crate::common::logging::error_chain(error);
    amqp_error(
        condition,
        format!("ErrorCode:{};{text}", error.code().name()),
    )
}

fn invalid(text: String) -> definitions::Error {
    amqp_error(
        AmqpError::InvalidField.into(),
        format!("ErrorCode:ArgumentInvalid;{text}"),
    )
}

fn id_text(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Uuid(u) => uuid::Uuid::from_bytes(*u.as_inner()).to_string(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Binary(b) => String::from_utf8_lossy(b).into_owned(),
    }
}

fn simple_text(value: &SimpleValue) -> Option<String> {
    Some(match value {
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.as_str().to_string(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Ubyte(n) => n.to_string(),
        SimpleValue::Ushort(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Byte(n) => n.to_string(),
        SimpleValue::Short(n) => n.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Float(n) => n.to_string(),
        SimpleValue::Double(n) => n.to_string(),
        SimpleValue::Null => return None,
        _ => return None,
    })
}

/// The device a `to` names: `/devices/{id}/messages/devicebound` (the id percent-encoded as
/// Node's SDK writes it; `deviceBound` as older services write it).
pub fn device_of(to: &str) -> Option<String> {
    let rest = to.strip_prefix("/devices/")?;
    let (id, tail) = rest.split_once('/')?;
    if !tail.eq_ignore_ascii_case(NODE) || id.is_empty() {
        return None;
    }
    dec(id).ok().filter(|id| !id.is_empty())
}

/// A transfer as a queued message: its device and what it carries.
pub fn outgoing(message: &AnyMessage) -> Result<(String, Outgoing), definitions::Error> {
    let properties = message.properties.as_ref();
    let to = properties
        .and_then(|p| p.to.clone())
        .ok_or_else(|| invalid("the message has no `to`".into()))?;
    let device_id = device_of(&to).ok_or_else(|| {
        invalid(format!(
            "`to` is {to:?}, not /devices/{{deviceId}}/messages/devicebound"
        ))
    })?;
    let mut ack = Ack::None;
    let mut application = Vec::new();
    if let Some(props) = &message.application_properties {
        for (key, value) in props.0.iter() {
            let Some(text) = simple_text(value) else {
                continue;
            };
            if key == "iothub-ack" {
                ack = Ack::parse(&text).ok_or_else(|| {
                    invalid(format!(
                        "iothub-ack is {text:?}, not none, positive, negative or full"
                    ))
                })?;
            } else {
                application.push((key.clone(), text));
            }
        }
    }
    let body = match &message.body {
        Body::Data(batch) => {
            let mut bytes = BytesMut::new();
            for data in batch.iter() {
                bytes.extend_from_slice(&data.0);
            }
            bytes.freeze()
        }
        Body::Value(value) => match &value.0 {
            Value::String(s) => Bytes::from(s.clone().into_bytes()),
            Value::Binary(b) => Bytes::from(b.to_vec()),
            Value::Null => Bytes::new(),
            _ => return Err(invalid("the body is neither data nor a string".into())),
        },
        Body::Empty => Bytes::new(),
        _ => return Err(invalid("the body is neither data nor a string".into())),
    };
    Ok((
        device_id,
        Outgoing {
            message_id: properties.and_then(|p| p.message_id.as_ref()).map(id_text),
            correlation_id: properties
                .and_then(|p| p.correlation_id.as_ref())
                .map(id_text),
            content_type: properties
                .and_then(|p| p.content_type.as_ref())
                .map(|s| s.as_str().to_string()),
            content_encoding: properties
                .and_then(|p| p.content_encoding.as_ref())
                .map(|s| s.as_str().to_string()),
            expiry_ms: properties
                .and_then(|p| p.absolute_expiry_time.as_ref())
                .map(|t| t.milliseconds()),
            ack,
            properties: application,
            body,
        },
    ))
}

#[cfg(test)]
mod tests {
    use fe2o3_amqp::types::messaging::{
        AmqpValue, ApplicationProperties, Data, Message, Properties,
    };
    use fe2o3_amqp::types::primitives::{Binary, Timestamp};

    use super::*;

    #[test]
    fn to_names_one_device() {
        assert_eq!(
            device_of("/devices/d1/messages/devicebound").as_deref(),
            Some("d1")
        );
        assert_eq!(
            device_of("/devices/a%23b/messages/deviceBound").as_deref(),
            Some("a#b")
        );
        assert_eq!(device_of("/devices//messages/devicebound"), None);
        assert_eq!(device_of("/devices/d1/messages/events"), None);
        assert_eq!(device_of("/devices/d1/x/messages/devicebound"), None);
        assert_eq!(device_of("devices/d1/messages/devicebound"), None);
    }

    fn message(to: &str, ack: Option<&str>) -> AnyMessage {
        let mut app = ApplicationProperties::builder().insert("k", "v");
        if let Some(ack) = ack {
            app = app.insert("iothub-ack", ack);
        }
        Message::builder()
            .properties(Properties {
                to: Some(to.into()),
                message_id: Some(MessageId::String("m1".into())),
                correlation_id: Some(MessageId::Ulong(7)),
                content_type: Some("application/json".into()),
                absolute_expiry_time: Some(Timestamp::from_milliseconds(1_000)),
                ..Default::default()
            })
            .application_properties(app.build())
            .body(Body::Data(
                vec![Data(Binary::from(b"{\"a\":1}".to_vec()))].into(),
            ))
            .build()
    }

    #[test]
    fn a_transfer_becomes_a_queued_message() {
        let (device, out) =
            outgoing(&message("/devices/d1/messages/devicebound", Some("full"))).unwrap();
        assert_eq!(device, "d1");
        assert_eq!(out.message_id.as_deref(), Some("m1"));
        assert_eq!(out.correlation_id.as_deref(), Some("7"));
        assert_eq!(out.content_type.as_deref(), Some("application/json"));
        assert_eq!(out.expiry_ms, Some(1_000));
        assert_eq!(out.ack, Ack::Full);
        assert_eq!(out.properties, vec![("k".to_string(), "v".to_string())]);
        assert_eq!(&out.body[..], b"{\"a\":1}");
    }

    #[test]
    fn a_bad_to_or_ack_is_an_invalid_field() {
        for bad in [
            message("/devices/d1/messages/events", None),
            message("/devices/d1/messages/devicebound", Some("sometimes")),
        ] {
            let error = outgoing(&bad).unwrap_err();
            assert_eq!(error.condition, AmqpError::InvalidField.into());
        }
        let string_body: AnyMessage = Message::builder()
            .properties(Properties {
                to: Some("/devices/d1/messages/devicebound".into()),
                ..Default::default()
            })
            .body(Body::Value(AmqpValue(Value::String("hi".into()))))
            .build();
        let (_, out) = outgoing(&string_body).unwrap();
        assert_eq!(&out.body[..], b"hi");
        assert_eq!(out.message_id, None);
    }
}
