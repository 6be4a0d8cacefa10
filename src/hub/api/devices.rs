//! The device registry over REST: `PUT/GET/DELETE /devices/{id}`, `GET /devices`, the bulk
//! registry operation `POST /devices` (at most 100 devices a call), and the registry and
//! service statistics.

use axum::extract::{Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::authorized::{Authorized, RegistryRead, RegistryWrite, ServiceConnect};
use super::{if_match, json_body, ApiError, AppState, JsonBody};
use crate::hub::registry::{DeviceSpec, DeviceStatus};

/// The part of a Device document a client may set.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceBody {
    device_id: Option<String>,
    status: Option<DeviceStatus>,
    status_reason: Option<String>,
    authentication: Option<Authentication>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Authentication {
    #[serde(rename = "type")]
    kind: Option<String>,
    symmetric_key: Option<SymmetricKey>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKey {
    primary_key: Option<String>,
    secondary_key: Option<String>,
}

pub async fn create_or_update(
    _: Authorized<RegistryWrite>,
    state: AppState,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: JsonBody<DeviceBody>,
) -> Result<Json<Value>, ApiError> {
    let body = json_body(body, "device body")?;
    if body.device_id.as_deref().is_some_and(|b| b != id) {
        return Err(ApiError::bad_request(
            "deviceId in the body differs from the one in the path",
        ));
    }
    let authentication = body.authentication;
    if let Some(kind) = authentication.as_ref().and_then(|a| a.kind.as_deref()) {
        if !kind.eq_ignore_ascii_case("sas") {
            return Err(ApiError::bad_request(format!(
                "authentication type {kind:?} is not supported by this hub; use \"sas\""
            )));
        }
    }
    let keys = authentication.and_then(|a| a.symmetric_key);
    let status = body.status.unwrap_or(DeviceStatus::Enabled);
    let spec = DeviceSpec {
        id: id.clone(),
        status,
        status_reason: body.status_reason,
        primary_key: keys.as_ref().and_then(|k| k.primary_key.clone()),
        secondary_key: keys.and_then(|k| k.secondary_key),
    };
    let device = match if_match(&headers) {
        None => state.registry.create(spec)?,
        Some(etag) => {
            let device = state.registry.update_identity(spec, Some(etag))?;
            if status == DeviceStatus::Disabled {
                // A disabled device is disconnected at once, as on IoT Hub.
                state.sessions.remove(&id);
            }
            device
        }
    };
    Ok(Json(device))
}

pub async fn get_one(
    _: Authorized<RegistryRead>,
    state: AppState,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.registry.get(&id, |d| d.to_device_json())?))
}

pub async fn delete(
    _: Authorized<RegistryWrite>,
    state: AppState,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    state.registry.delete(&id, if_match(&headers))?;
    state.sessions.remove(&id);
    Ok(StatusCode::NO_CONTENT)
}

/// The most devices one bulk registry call may name, as on IoT Hub.
pub const BULK_MAX_DEVICES: usize = 100;

/// One entry of a bulk registry call (IoT Hub's `ExportImportDevice`, the fields this hub
/// honours).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkDevice {
    id: String,
    import_mode: String,
    e_tag: Option<String>,
    status: Option<DeviceStatus>,
    status_reason: Option<String>,
    authentication: Option<Authentication>,
}

/// `POST /devices`: creates, updates or deletes up to [`BULK_MAX_DEVICES`] identities, each on
/// its own (one failing does not stop the others). 200 with `isSuccessful: true` when all
/// succeeded, else 400 with the same body listing each failure, as IoT Hub answers.
pub async fn bulk(
    _: Authorized<RegistryWrite>,
    state: AppState,
    body: JsonBody<Vec<BulkDevice>>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    if state.faults.throttle_bulk() {
        let error: ApiError = crate::hub::error::IotHubError::new(
            crate::protocol::error_code::ErrorCode::ThrottlingException,
            "the hub is throttling registry operations; retry later",
        )
        .into();
        let mut response = error.into_response();
        response
            .headers_mut()
            .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        return Ok(response);
    }
    let devices = json_body(body, "bulk registry body (an array of devices)")?;
    if devices.is_empty() || devices.len() > BULK_MAX_DEVICES {
        return Err(ApiError::bad_request(format!(
            "a bulk registry call names 1 to {BULK_MAX_DEVICES} devices, not {}",
            devices.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = devices.iter().find(|d| !seen.insert(d.id.as_str())) {
        return Err(ApiError::bad_request(format!(
            "device {} is named more than once; a bulk call names each device once",
            twice.id
        )));
    }
    let mut errors = Vec::new();
    for device in devices {
        let operation = device.import_mode.clone();
        if let Err(error) = apply_bulk(&state, device.id.clone(), device) {
            errors.push(json!({
                "deviceId": error.0,
                "errorCode": error.1.code.name(),
                "errorStatus": error.1.message,
                "operation": operation,
            }));
        }
    }
    let status = if errors.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    let body = json!({"isSuccessful": errors.is_empty(), "errors": errors, "warnings": []});
    Ok((status, Json(body)).into_response())
}

fn apply_bulk(
    state: &AppState,
    id: String,
    device: BulkDevice,
) -> Result<(), (String, crate::hub::error::IotHubError)> {
    let fail = |error| (id.clone(), error);
    let keys = device.authentication.and_then(|a| a.symmetric_key);
    let spec = || DeviceSpec {
        id: id.clone(),
        status: device.status.unwrap_or(DeviceStatus::Enabled),
        status_reason: device.status_reason.clone(),
        primary_key: keys.as_ref().and_then(|k| k.primary_key.clone()),
        secondary_key: keys.as_ref().and_then(|k| k.secondary_key.clone()),
    };
    match device.import_mode.to_ascii_lowercase().as_str() {
        "create" => state.registry.create(spec()).map(drop).map_err(fail),
        "update" | "updateifmatchetag" => {
            let etag = (device.import_mode.eq_ignore_ascii_case("updateIfMatchETag"))
                .then(|| device.e_tag.as_deref().unwrap_or(""));
            let spec = spec();
            let disabled = spec.status == DeviceStatus::Disabled;
            state.registry.update_identity(spec, etag).map_err(fail)?;
            if disabled {
                // A disabled device is disconnected at once, as on IoT Hub.
                state.sessions.remove(&id);
            }
            Ok(())
        }
        "delete" | "deleteifmatchetag" => {
            let etag = (device.import_mode.eq_ignore_ascii_case("deleteIfMatchETag"))
                .then(|| device.e_tag.as_deref().unwrap_or(""));
            state.registry.delete(&id, etag).map_err(fail)?;
            state.sessions.remove(&id);
            Ok(())
        }
        other => Err(fail(crate::hub::error::IotHubError::argument(format!(
            "importMode {other:?} is not one this hub knows (create, update, \
             updateIfMatchETag, delete, deleteIfMatchETag)"
        )))),
    }
}

#[derive(Deserialize)]
pub struct ListParams {
    top: Option<usize>,
}

pub async fn list(
    _: Authorized<RegistryRead>,
    state: AppState,
    Query(params): Query<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let top = params.top.unwrap_or(1000).min(1000);
    Ok(Json(Value::Array(state.registry.list(top))))
}

pub async fn statistics(
    _: Authorized<RegistryRead>,
    state: AppState,
) -> Result<Json<Value>, ApiError> {
    let stats = state.registry.stats();
    Ok(Json(json!({
        "totalDeviceCount": stats.total,
        "enabledDeviceCount": stats.enabled,
        "disabledDeviceCount": stats.disabled,
    })))
}

pub async fn service_statistics(
    _: Authorized<ServiceConnect>,
    state: AppState,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({ "connectedDeviceCount": state.registry.stats().connected }),
    ))
}
