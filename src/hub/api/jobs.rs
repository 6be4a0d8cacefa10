//! Scheduled jobs over REST: `PUT/GET /jobs/v2/{id}`, `POST /jobs/v2/{id}/cancel` and
//! `GET /jobs/v2/query?jobType=&jobStatus=`. The rules live in `hub::jobs`.
//!
//! Permissions follow Azure's how-to for jobs, which asks for a policy with registry read and
//! registry write (`registryReadWrite`): creating and cancelling need RegistryWrite, reading
//! and listing need RegistryRead. (`iothubowner` has both; `service` alone has neither.)
//!
//! The list answers an object `{"type":"jobResponse","items":[...],"continuationToken":null}`,
//! the `QueryResult` the service SDKs deserialize, with every matching job on one page.

use axum::extract::{Path, Query};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::authorized::{Authorized, RegistryRead, RegistryWrite};
use super::{json_body, ApiError, AppState, JsonBody};
use crate::hub::jobs::JobRequest;

pub async fn create(
    _: Authorized<RegistryWrite>,
    state: AppState,
    Path(id): Path<String>,
    body: JsonBody<JobRequest>,
) -> Result<Json<Value>, ApiError> {
    let request = json_body(body, "job request")?;
    Ok(Json(state.jobs.create(&id, request)?))
}

pub async fn get_one(
    _: Authorized<RegistryRead>,
    state: AppState,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.jobs.get(&id)?))
}

pub async fn cancel(
    _: Authorized<RegistryWrite>,
    state: AppState,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.jobs.cancel(&id)?))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListParams {
    job_type: Option<String>,
    job_status: Option<String>,
}

pub async fn query(
    _: Authorized<RegistryRead>,
    state: AppState,
    Query(params): Query<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let filter = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
    let items = state.jobs.list(
        filter(&params.job_type).as_deref(),
        filter(&params.job_status).as_deref(),
    );
    Ok(Json(json!({
        "type": "jobResponse",
        "items": items,
        "continuationToken": null,
    })))
}
