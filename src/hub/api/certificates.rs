//! A simdevice extension of the service API: the CA certificates the hub trusts for X.509
//! devices, and device certificates issued for tests and demos. Azure manages CA
//! certificates through its management plane (ARM), which this hub does not serve:
//!
//! - `GET /simdevice/certificates` (RegistryRead): `{"value": [description, ...]}`;
//! - `GET /simdevice/certificates/{name}` (RegistryRead): one description;
//! - `PUT /simdevice/certificates/{name}` `{"certificate": PEM}` (RegistryWrite): adds a CA;
//! - `POST /simdevice/certificates/{name}/generate` (RegistryWrite): the hub creates a CA and
//!   keeps its key in its state, to issue with;
//! - `DELETE /simdevice/certificates/{name}` (RegistryWrite);
//! - `POST /simdevice/device-certificates` `{"deviceId", "ca": NAME or absent for
//!   self-signed, "days"}` (RegistryWrite): a device certificate and its private key.
//!
//! A description has the management API's `properties` (subject, expiry, thumbprint, ...),
//! plus `origin` and `canIssue`; never a private key.

use axum::extract::Path;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::authorized::{Authorized, RegistryRead, RegistryWrite};
use super::{json_body, ApiError, AppState, JsonBody};
use crate::hub::error::IotHubError;
use crate::hub::registry::check_device_id;
use crate::hub::x509::X509Error;
use crate::protocol::error_code::ErrorCode;

/// Validity of an issued device certificate when the request names none.
const DEFAULT_DAYS: i64 = 365;

fn api_error(error: X509Error) -> ApiError {
    let message = crate::common::logging::error_chain(&error);
    match error {
        X509Error::NotFound(_) => ApiError::bad_request(message).with_status(StatusCode::NOT_FOUND),
        X509Error::Exists(_) => {
            ApiError::from(IotHubError::new(ErrorCode::ArgumentInvalid, message))
                .with_status(StatusCode::CONFLICT)
        }
        X509Error::Store(_)
        | X509Error::Generate(_)
        | X509Error::Decode { .. }
        | X509Error::Read { .. } => IotHubError::internal(message).into(),
        _ => ApiError::bad_request(message),
    }
}

pub async fn list(_: Authorized<RegistryRead>, state: AppState) -> Json<Value> {
    Json(json!({ "value": state.x509.list() }))
}

pub async fn get_one(
    _: Authorized<RegistryRead>,
    state: AppState,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.x509.describe(&name).map(Json).map_err(api_error)
}

#[derive(Deserialize)]
pub struct AddBody {
    certificate: String,
}

pub async fn add(
    _: Authorized<RegistryWrite>,
    state: AppState,
    Path(name): Path<String>,
    body: JsonBody<AddBody>,
) -> Result<Json<Value>, ApiError> {
    let body = json_body(body, "certificate body ({\"certificate\": PEM})")?;
    state
        .x509
        .add(&name, body.certificate)
        .map(Json)
        .map_err(api_error)
}

pub async fn generate(
    _: Authorized<RegistryWrite>,
    state: AppState,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.x509.generate(&name).map(Json).map_err(api_error)
}

pub async fn delete(
    _: Authorized<RegistryWrite>,
    state: AppState,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.x509.delete(&name).map_err(api_error)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssueBody {
    device_id: String,
    ca: Option<String>,
    days: Option<i64>,
}

pub async fn issue(
    _: Authorized<RegistryWrite>,
    state: AppState,
    body: JsonBody<IssueBody>,
) -> Result<Json<Value>, ApiError> {
    let body = json_body(body, "issue body ({\"deviceId\", \"ca\", \"days\"})")?;
    check_device_id(&body.device_id)?;
    let days = body.days.unwrap_or(DEFAULT_DAYS);
    if days == 0 || days.abs() > 36_500 {
        return Err(ApiError::bad_request(format!(
            "days must be 1 to 36500 (or negative, for an already expired certificate), not {days}"
        )));
    }
    let issued = state
        .x509
        .issue(&body.device_id, body.ca.as_deref(), days)
        .map_err(api_error)?;
    tracing::info!(device = %body.device_id, ca = ?body.ca, days, "device certificate issued");
    Ok(Json(json!({
        "deviceId": body.device_id,
        "certificate": issued.certificate_pem,
        "privateKey": issued.key_pem,
        "thumbprintSha1": issued.sha1,
        "thumbprintSha256": issued.sha256,
        "notAfter": issued.not_after,
    })))
}
