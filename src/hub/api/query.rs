//! `POST /devices/query`: runs an IoT Hub query over the twins (`FROM devices`) or the
//! per-device job rows (`FROM devices.jobs`, item type `DeviceJob`), one page at a time.
//!
//! The page size comes from `x-ms-max-item-count` (default 100, at most 1000). The
//! continuation token is the offset of the next row; the header is left out on the last page,
//! because clients loop while it is present.

use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Deserialize;
use serde_json::Value;

use super::authorized::{Authorized, ServiceConnect};
use super::{json_body, ApiError, AppState, JsonBody};
use crate::hub::query::{self, Source};

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

#[derive(Deserialize)]
pub struct QueryBody {
    query: String,
}

pub async fn run(
    _: Authorized<ServiceConnect>,
    state: AppState,
    headers: HeaderMap,
    body: JsonBody<QueryBody>,
) -> Result<Response, ApiError> {
    crate::hub::metrics::HubCounters::bump(&state.counters.queries);
    let body = json_body(body, "query body")?;
    let parsed = query::parse(&body.query).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let documents = match parsed.source() {
        Source::Devices => state.registry.twin_documents(),
        Source::DevicesJobs => state.jobs.device_rows(),
        // This hub has no module identities.
        Source::DevicesModules => Vec::new(),
    };
    let result = parsed
        .execute(&documents)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;

    let page_size = header_usize(&headers, "x-ms-max-item-count")?
        .unwrap_or(DEFAULT_PAGE)
        .clamp(1, MAX_PAGE);
    let start = match headers
        .get("x-ms-continuation")
        .and_then(|v| v.to_str().ok())
    {
        None | Some("") => 0,
        Some(token) => decode_token(token)?,
    };
    let total = result.items.len();
    let page: Vec<Value> = result
        .items
        .into_iter()
        .skip(start)
        .take(page_size)
        .collect();
    let next = start + page.len();
    let mut response = Json(Value::Array(page)).into_response();
    let response_headers = response.headers_mut();
    response_headers.insert(
        "x-ms-item-type",
        HeaderValue::from_static(result.item_type.as_str()),
    );
    if next < total {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("offset:{next}"));
        if let Ok(value) = HeaderValue::from_str(&token) {
            response_headers.insert("x-ms-continuation", value);
        }
    }
    Ok(response)
}

fn header_usize(headers: &HeaderMap, name: &str) -> Result<Option<usize>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("{name} must be a whole number"))),
    }
}

fn decode_token(token: &str) -> Result<usize, ApiError> {
    base64::engine::general_purpose::STANDARD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| text.strip_prefix("offset:").and_then(|n| n.parse().ok()))
        .ok_or_else(|| ApiError::bad_request("x-ms-continuation is not a token this hub issued"))
}
