//! The fault hooks over REST, a simdevice extension of the service API for scripts:
//! - `GET /simdevice/faults`: the hooks' state and what they did (`FaultStatus`).
//! - `POST /simdevice/faults`, body `{"refuseConnectsSecs": 5, "throttleReportedSecs": 5,
//!   "clockOffsetSecs": 3600}` (each optional; 0 turns a hook off): sets the hooks, answers the
//!   new state.
//!
//! Both need `RegistryWrite` (a fault changes what every device sees). See `hub/faults.rs` for
//! what each hook does.

use std::time::Duration;

use axum::Json;
use serde::Deserialize;

use super::authorized::{Authorized, RegistryWrite};
use super::{json_body, ApiError, AppState, JsonBody};
use crate::hub::faults::FaultStatus;

/// The longest a hook may be set for in one call: a day.
const MAX_SECS: f64 = 86_400.0;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultSettings {
    refuse_connects_secs: Option<f64>,
    throttle_reported_secs: Option<f64>,
    clock_offset_secs: Option<i64>,
}

fn duration(name: &str, secs: Option<f64>) -> Result<Option<Duration>, ApiError> {
    match secs {
        None => Ok(None),
        Some(s) if s.is_finite() && (0.0..=MAX_SECS).contains(&s) => {
            Ok(Some(Duration::from_secs_f64(s)))
        }
        Some(_) => Err(ApiError::bad_request(format!(
            "{name} must be a number of seconds from 0 to {MAX_SECS}"
        ))),
    }
}

pub async fn get(
    _: Authorized<RegistryWrite>,
    state: AppState,
) -> Result<Json<FaultStatus>, ApiError> {
    Ok(Json(state.faults.status()))
}

pub async fn set(
    _: Authorized<RegistryWrite>,
    state: AppState,
    body: JsonBody<FaultSettings>,
) -> Result<Json<FaultStatus>, ApiError> {
    let body = json_body(body, "fault settings")?;
    let refuse = duration("refuseConnectsSecs", body.refuse_connects_secs)?;
    let throttle = duration("throttleReportedSecs", body.throttle_reported_secs)?;
    let offset = match body.clock_offset_secs {
        Some(s) if s.unsigned_abs() > MAX_SECS as u64 * 365 => {
            return Err(ApiError::bad_request(
                "clockOffsetSecs must be within a year either way",
            ))
        }
        other => other,
    };
    if let Some(d) = refuse {
        state.faults.refuse_connects_for(d);
    }
    if let Some(d) = throttle {
        state.faults.throttle_reported_for(d);
    }
    if let Some(s) = offset {
        state.faults.set_clock_offset(s);
    }
    tracing::warn!(
        refuse_connects_s = body.refuse_connects_secs,
        throttle_reported_s = body.throttle_reported_secs,
        clock_offset_s = body.clock_offset_secs,
        "fault hooks set"
    );
    Ok(Json(state.faults.status()))
}
