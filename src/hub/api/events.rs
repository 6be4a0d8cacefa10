//! Two simdevice extensions of the service API, simpler than what IoT Hub serves over AMQP
//! (the hub serves that too, `hub::amqp`):
//! - `GET /simdevice/events`: the hub's recent telemetry, the newest entries of the event
//!   store numbered across partitions (`telemetry`). Query parameters: `deviceId`, `after` (a
//!   number from an earlier answer's `sequenceNumber`), `limit` (default 1000).
//! - `POST /simdevice/devices/{id}/messages/devicebound`: a cloud-to-device message, body
//!   `{"payload": <JSON, or a string sent as is>, "properties": {"k": "v"}, "messageId": "..."}`;
//!   into the device's cloud-to-device queue (`hub::c2d`: at most 50, kept until the device
//!   completes it), as a message sent to `/messages/devicebound` over AMQP.

use axum::extract::{Path, Query};
use axum::Json;
use serde::Deserialize;
use serde_json::Value;

use super::authorized::{Authorized, ServiceConnect};
use super::{json_body, ApiError, AppState, JsonBody};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventParams {
    device_id: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
}

pub async fn list(
    _: Authorized<ServiceConnect>,
    state: AppState,
    Query(params): Query<EventParams>,
) -> Result<Json<Value>, ApiError> {
    let events = state.telemetry.recent(
        params.device_id.as_deref(),
        params.after.unwrap_or(0),
        params.limit.unwrap_or(1000).min(10_000),
    );
    Ok(Json(Value::Array(
        events.iter().map(|e| e.to_json()).collect(),
    )))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloudToDeviceBody {
    #[serde(default)]
    payload: Value,
    #[serde(default)]
    properties: std::collections::BTreeMap<String, String>,
    message_id: Option<String>,
}

/// Queues the message in the device's cloud-to-device queue (`hub::c2d`): the same queue, and
/// the same path to the device, as a message sent over AMQP.
pub async fn send_cloud_to_device(
    _: Authorized<ServiceConnect>,
    state: AppState,
    Path(id): Path<String>,
    body: JsonBody<CloudToDeviceBody>,
) -> Result<Json<Value>, ApiError> {
    use crate::hub::c2d::{self, SendError};
    use crate::hub::error::IotHubError;
    let body = json_body(body, "message body")?;
    let bytes = match body.payload {
        Value::String(text) => text.into_bytes(),
        other => serde_json::to_vec(&other).unwrap_or_default(),
    };
    let message = c2d::Outgoing {
        message_id: body.message_id,
        properties: body.properties.into_iter().collect(),
        body: bytes::Bytes::from(bytes),
        ..Default::default()
    };
    match c2d::send(&state, &id, message) {
        Ok(message_id) => Ok(Json(serde_json::json!({"messageId": message_id}))),
        Err(SendError::DeviceNotFound(_)) => Err(IotHubError::device_not_found(&id).into()),
        Err(error) => {
            let message = crate::common::logging::error_chain(&error);
            Err(IotHubError::new(error.code(), message).into())
        }
    }
}
