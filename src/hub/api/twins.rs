//! Twins and direct methods over REST: `GET/PATCH/PUT /twins/{id}` and
//! `POST /twins/{id}/methods`. The rules live in `hub::twins` and `hub::methods`.

use axum::extract::{Path, Query};
use axum::http::HeaderMap;
use axum::Json;
use serde_json::Value;

use super::{authorize, if_match, json_body, ApiError, ApiVersion, AppState, JsonBody};
use crate::hub::auth::Permission;
use crate::hub::{methods, twins};
use crate::protocol::method::{MethodInvocation, MethodResult};

pub async fn get_twin(
    state: AppState,
    Path(id): Path<String>,
    version: Query<ApiVersion>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers, &version, Permission::ServiceConnect)?;
    Ok(Json(state.registry.get(&id, |d| d.to_twin_json())?))
}

pub async fn update(
    state: AppState,
    Path(id): Path<String>,
    version: Query<ApiVersion>,
    headers: HeaderMap,
    patch: JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers, &version, Permission::ServiceConnect)?;
    let patch = json_body(patch, "request body")?;
    Ok(Json(twins::update(
        &state,
        &id,
        &patch,
        if_match(&headers),
    )?))
}

pub async fn replace(
    state: AppState,
    Path(id): Path<String>,
    version: Query<ApiVersion>,
    headers: HeaderMap,
    twin: JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers, &version, Permission::ServiceConnect)?;
    let twin = json_body(twin, "request body")?;
    Ok(Json(twins::replace(
        &state,
        &id,
        &twin,
        if_match(&headers),
    )?))
}

pub async fn invoke_method(
    state: AppState,
    Path(id): Path<String>,
    version: Query<ApiVersion>,
    headers: HeaderMap,
    invocation: JsonBody<MethodInvocation>,
) -> Result<Json<MethodResult>, ApiError> {
    authorize(&state, &headers, &version, Permission::ServiceConnect)?;
    let invocation = json_body(invocation, "request body")?;
    Ok(Json(methods::invoke(&state, &id, invocation).await?))
}
