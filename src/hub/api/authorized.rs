//! The prologue of every service API handler as an axum extractor: [`Authorized<P>`] checks
//! the `api-version` query parameter and the caller's SAS token for the permission `P` before
//! the handler runs, so each handler states the permission it needs in its signature.
//!
//! Refusals are the documented IoT Hub errors: no (or an empty) `api-version` is 400 400004
//! ArgumentInvalid; a missing, malformed, forged, expired or misdirected token, or a policy
//! without the right, is 401 401002 IotHubUnauthorizedAccess. Why a token was refused goes to
//! the log (never the token), not to the caller. This module checks; `hub::auth` decides.

use std::marker::PhantomData;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use serde::Deserialize;

use super::ApiError;
use crate::hub::auth::{self, Permission};
use crate::hub::HubState;

/// A permission as a type, for [`Authorized`].
pub trait PermissionMarker: Send + Sync + 'static {
    const PERMISSION: Permission;
}

/// Reading the registry, jobs included.
pub struct RegistryRead;
/// Changing the registry, jobs and the fault hooks.
pub struct RegistryWrite;
/// Twins, direct methods, queries, messages and service statistics.
pub struct ServiceConnect;

impl PermissionMarker for RegistryRead {
    const PERMISSION: Permission = Permission::RegistryRead;
}
impl PermissionMarker for RegistryWrite {
    const PERMISSION: Permission = Permission::RegistryWrite;
}
impl PermissionMarker for ServiceConnect {
    const PERMISSION: Permission = Permission::ServiceConnect;
}

/// Proof that the request carries an `api-version` and a valid token with permission `P`.
pub struct Authorized<P: PermissionMarker>(PhantomData<P>);

/// The `api-version` every request carries; any version is accepted, none is an error.
#[derive(Deserialize)]
struct ApiVersion {
    #[serde(rename = "api-version")]
    api_version: Option<String>,
}

impl<P: PermissionMarker> FromRequestParts<Arc<HubState>> for Authorized<P> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<HubState>,
    ) -> Result<Self, Self::Rejection> {
        let Query(version) = Query::<ApiVersion>::try_from_uri(&parts.uri)
            .map_err(|e| ApiError::bad_request(format!("query string: {}", e.body_text())))?;
        if version.api_version.as_deref().is_none_or(str::is_empty) {
            return Err(ApiError::bad_request(
                "the api-version query parameter is required",
            ));
        }
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        auth::authorize_service(state, header, P::PERMISSION).map_err(|failure| {
            tracing::info!(reason = %failure, "service request refused");
            ApiError::unauthorized()
        })?;
        Ok(Authorized(PhantomData))
    }
}
