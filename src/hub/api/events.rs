//! Two simdevice extensions of the service API, simpler than what IoT Hub serves over AMQP
//! (the hub serves that too, `hub::amqp`):
//! - `GET /simdevice/events`: the hub's recent telemetry, the newest entries of the event
//!   store numbered across partitions (`telemetry`). Query parameters: `deviceId`, `after` (a
//!   number from an earlier answer's `sequenceNumber`), `limit` (default 1000).
//! - `POST /simdevice/devices/{id}/messages/devicebound`: a cloud-to-device message, body
//!   `{"payload": <JSON, or a string sent as is>, "properties": {"k": "v"}, "messageId": "..."}`;
//!   queued at QoS 1 (at most 50 per device) until the device takes it.

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

/// Largest cloud-to-device message, as on IoT Hub.
const MAX_C2D_BYTES: usize = 64 * 1024;

pub async fn send_cloud_to_device(
    _: Authorized<ServiceConnect>,
    state: AppState,
    Path(id): Path<String>,
    body: JsonBody<CloudToDeviceBody>,
) -> Result<Json<Value>, ApiError> {
    use crate::hub::error::IotHubError;
    use crate::protocol::error_code::ErrorCode;
    use crate::protocol::property_bag::PropertyBag;
    let body = json_body(body, "message body")?;
    if !state.registry.contains(&id) {
        return Err(IotHubError::device_not_found(&id).into());
    }
    let bytes = match body.payload {
        Value::String(text) => text.into_bytes(),
        other => serde_json::to_vec(&other).unwrap_or_default(),
    };
    if bytes.len() > MAX_C2D_BYTES {
        return Err(IotHubError::new(
            ErrorCode::MessageTooLarge,
            format!(
                "the message is {} bytes, over the {MAX_C2D_BYTES}-byte limit",
                bytes.len()
            ),
        )
        .into());
    }
    let message_id = body
        .message_id
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut properties = PropertyBag::new();
    properties.insert("$.mid", message_id.clone());
    for (key, value) in body.properties {
        properties.insert(key, value);
    }
    let topic = crate::protocol::topic::c2d_topic(&id, &properties);
    state
        .sessions
        .enqueue_cloud_to_device(&id, topic, bytes::Bytes::from(bytes))
        .map_err(|e| IotHubError::new(ErrorCode::DeviceMaximumQueueDepthExceeded, e.to_string()))?;
    if let Ok(live) = state.registry.get(&id, |d| d.live.clone()) {
        live.cloud_to_device_sent
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(Json(serde_json::json!({"messageId": message_id})))
}
