//! `GET /simdevice/events`: the hub's recent telemetry, a simdevice extension (IoT Hub itself
//! serves telemetry through its Event Hubs endpoint, which this hub does not emulate).
//! Query parameters: `deviceId`, `after` (a sequence number), `limit` (default 1000).

use axum::extract::Query;
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::Value;

use super::{authorize, ApiError, ApiVersion, AppState};
use crate::hub::auth::Permission;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventParams {
    device_id: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
}

pub async fn list(
    state: AppState,
    version: Query<ApiVersion>,
    Query(params): Query<EventParams>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers, &version, Permission::ServiceConnect)?;
    let events = state.telemetry.recent(
        params.device_id.as_deref(),
        params.after.unwrap_or(0),
        params.limit.unwrap_or(1000).min(10_000),
    );
    Ok(Json(Value::Array(
        events.iter().map(|e| e.to_json()).collect(),
    )))
}
