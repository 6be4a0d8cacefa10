//! Twins and direct methods over REST: `GET/PATCH/PUT /twins/{id}` and
//! `POST /twins/{id}/methods`. The rules live in `hub::twins` and `hub::methods`.

use axum::extract::{Path, Query};
use axum::http::HeaderMap;
use axum::Json;
use serde_json::Value;

use super::{authorize, if_match, ApiError, ApiVersion, AppState};
use crate::hub::auth::Permission;
use crate::hub::{methods, twins};
use crate::protocol::method::{MethodInvocation, MethodResult};

type JsonBody<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

fn body<T>(body: JsonBody<T>) -> Result<T, ApiError> {
    body.map(|Json(b)| b)
        .map_err(|e| ApiError::bad_request(format!("request body: {}", e.body_text())))
}

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
    let patch = body(patch)?;
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
    let twin = body(twin)?;
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
    let invocation = body(invocation)?;
    Ok(Json(methods::invoke(&state, &id, invocation).await?))
}
