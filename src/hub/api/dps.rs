//! The DPS service REST API (api-version 2021-10-01) on the hub's service HTTPS port:
//! `PUT/GET/DELETE /enrollmentGroups/{id}` and `/enrollments/{id}`, and
//! `POST /enrollmentGroups/query` and `/enrollments/query` (every enrollment on one page: the
//! answer is a JSON array and carries no `x-ms-continuation`).
//!
//! Every request needs an `api-version` and a SAS token of the `provisioningserviceowner`
//! policy ([`DpsAuthorized`]); errors are DPS's body (`errorCode`, `trackingId`, `message`,
//! `timestampUtc`) with the status of the code. The rules live in `hub::dps::enrollments`;
//! this side checks only that an enrollment group's `caReferences` name CAs the hub has.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::Value;

use super::{if_match, AppState};
use crate::hub::dps::{DpsError, Kind};
use crate::hub::HubState;
use crate::protocol::dps::error_code;

/// A DPS error as the REST API answers it.
pub struct DpsApiError(DpsError);

impl From<DpsError> for DpsApiError {
    fn from(error: DpsError) -> Self {
        DpsApiError(error)
    }
}

impl IntoResponse for DpsApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0.body())).into_response()
    }
}

fn bad_request(message: impl Into<String>) -> DpsApiError {
    DpsApiError(DpsError::new(error_code::BAD_REQUEST, message))
}

/// Proof that the request carries an `api-version` and a valid `provisioningserviceowner` token.
pub struct DpsAuthorized;

#[derive(Deserialize)]
struct ApiVersion {
    #[serde(rename = "api-version")]
    api_version: Option<String>,
}

impl FromRequestParts<Arc<HubState>> for DpsAuthorized {
    type Rejection = DpsApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<HubState>,
    ) -> Result<Self, Self::Rejection> {
        let Query(version) = Query::<ApiVersion>::try_from_uri(&parts.uri)
            .map_err(|e| bad_request(format!("query string: {}", e.body_text())))?;
        if version.api_version.as_deref().is_none_or(str::is_empty) {
            return Err(bad_request("the api-version query parameter is required"));
        }
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        state
            .dps
            .authorize_service(state, header)
            .map_err(|failure| {
                tracing::info!(reason = %failure, "DPS service request refused");
                DpsApiError(DpsError::new(error_code::UNAUTHORIZED, "Unauthorized"))
            })?;
        Ok(DpsAuthorized)
    }
}

type Body = Result<Json<Value>, axum::extract::rejection::JsonRejection>;

fn body(body: Body) -> Result<Value, DpsApiError> {
    body.map(|Json(v)| v)
        .map_err(|e| bad_request(format!("the enrollment: {}", e.body_text())))
}

fn put(
    state: &HubState,
    kind: Kind,
    id: &str,
    headers: &HeaderMap,
    b: Body,
) -> Result<Json<Value>, DpsApiError> {
    let body = body(b)?;
    check_ca_references(state, &body)?;
    let (doc, created) = state
        .dps
        .enrollments
        .put(kind, id, &body, if_match(headers))?;
    tracing::info!(enrollment = id, ?kind, created, "DPS enrollment written");
    Ok(Json(doc))
}

/// An enrollment group's `x509.caReferences` must name CA certificates the hub has (added
/// with `simdevice service certificate add|create-ca` or `hub --x509-ca`), as DPS's must
/// name certificates of the DPS.
fn check_ca_references(state: &HubState, body: &Value) -> Result<(), DpsApiError> {
    let references = body
        .pointer("/attestation/x509/caReferences")
        .and_then(Value::as_object);
    for (side, name) in references.into_iter().flatten() {
        if let Some(name) = name.as_str() {
            if state.x509.certificate(name).is_none() {
                return Err(bad_request(format!(
                    "attestation.x509.caReferences.{side}: no CA certificate named {name:?} \
                     (add it with `simdevice service certificate add`)"
                )));
            }
        }
    }
    Ok(())
}

pub async fn put_group(
    _: DpsAuthorized,
    state: AppState,
    Path(id): Path<String>,
    headers: HeaderMap,
    b: Body,
) -> Result<Json<Value>, DpsApiError> {
    put(&state, Kind::Group, &id, &headers, b)
}

pub async fn put_individual(
    _: DpsAuthorized,
    state: AppState,
    Path(id): Path<String>,
    headers: HeaderMap,
    b: Body,
) -> Result<Json<Value>, DpsApiError> {
    put(&state, Kind::Individual, &id, &headers, b)
}

pub async fn get_group(
    _: DpsAuthorized,
    state: AppState,
    Path(id): Path<String>,
) -> Result<Json<Value>, DpsApiError> {
    Ok(Json(state.dps.enrollments.get(Kind::Group, &id)?))
}

pub async fn get_individual(
    _: DpsAuthorized,
    state: AppState,
    Path(id): Path<String>,
) -> Result<Json<Value>, DpsApiError> {
    Ok(Json(state.dps.enrollments.get(Kind::Individual, &id)?))
}

pub async fn delete_group(
    _: DpsAuthorized,
    state: AppState,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, DpsApiError> {
    state
        .dps
        .enrollments
        .delete(Kind::Group, &id, if_match(&headers))?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn delete_individual(
    _: DpsAuthorized,
    state: AppState,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, DpsApiError> {
    state
        .dps
        .enrollments
        .delete(Kind::Individual, &id, if_match(&headers))?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST .../query`: the query specification (`{"query": "*"}`) is accepted and every
/// enrollment returned: this DPS does not evaluate queries.
pub async fn query_groups(_: DpsAuthorized, state: AppState) -> Json<Vec<Value>> {
    Json(state.dps.enrollments.list(Kind::Group))
}

pub async fn query_individuals(_: DpsAuthorized, state: AppState) -> Json<Vec<Value>> {
    Json(state.dps.enrollments.list(Kind::Individual))
}
