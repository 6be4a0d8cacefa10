//! Twins and direct methods over REST: `GET/PATCH/PUT /twins/{id}` and
//! `POST /twins/{id}/methods`. The rules live in `hub::twins` and `hub::methods`.

use axum::extract::Path;
use axum::http::HeaderMap;
use axum::Json;
use serde_json::Value;

use super::authorized::{Authorized, ServiceConnect};
use super::{if_match, json_body, ApiError, AppState, JsonBody};
use crate::hub::{methods, twins};
use crate::protocol::method::{MethodInvocation, MethodResult};

pub async fn get_twin(
    _: Authorized<ServiceConnect>,
    state: AppState,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.registry.get(&id, |d| d.to_twin_json())?))
}

pub async fn update(
    _: Authorized<ServiceConnect>,
    state: AppState,
    Path(id): Path<String>,
    headers: HeaderMap,
    patch: JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let patch = json_body(patch, "request body")?;
    Ok(Json(twins::update(
        &state,
        &id,
        &patch,
        if_match(&headers),
    )?))
}

pub async fn replace(
    _: Authorized<ServiceConnect>,
    state: AppState,
    Path(id): Path<String>,
    headers: HeaderMap,
    twin: JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let twin = json_body(twin, "request body")?;
    Ok(Json(twins::replace(
        &state,
        &id,
        &twin,
        if_match(&headers),
    )?))
}

pub async fn invoke_method(
    _: Authorized<ServiceConnect>,
    state: AppState,
    Path(id): Path<String>,
    invocation: JsonBody<MethodInvocation>,
) -> Result<Json<MethodResult>, ApiError> {
    let invocation = json_body(invocation, "request body")?;
    Ok(Json(methods::invoke(&state, &id, invocation).await?))
}
