//! The local Device Provisioning Service: a room of the hub that registers devices from
//! enrollments and assigns them to this hub.
//!
//! `mqtt` is the device endpoint (MQTT over TLS on its own port, the wire of
//! `protocol::dps`); `enrollments` keeps individual enrollments and enrollment groups
//! (symmetric keys or X.509). [`register`] is the assignment: the device is created in this
//! hub's registry on its first registration with the enrollment's key (individual) or the key
//! derived from the group key (group), or, registered with an X.509 certificate
//! ([`Dps::authenticate_x509`]), as a `selfSigned` or `certificateAuthority` device that
//! connects with the same certificate; the enrollment's `initialTwin` (tags and desired
//! properties) applied to its twin; a registration of an existing device gives it the
//! enrollment's keys again and keeps its twin (DPS's default reprovisioning policy). The
//! service side (enrollments over REST) is `hub::api::dps`, authorized by
//! [`Dps::authorize_service`] with the `provisioningserviceowner` policy.
//!
//! Host names: the DPS service API is served on the hub's service HTTPS port, so its host
//! name is the hub's API host (`localhost:{api_port}`), which is the audience its SAS tokens
//! name; the device endpoint is `localhost:{dps_port}`. The id scope is made once
//! (`0ne` + 8 hex digits) and kept in the store's settings, unless `--id-scope` sets it.
//!
//! This room uses the registry and twins of the hub; it knows nothing of the hub's MQTT
//! listener or of the REST routing.

pub mod enrollments;
pub mod mqtt;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::error::LoadError;
use super::registry::{now_iso, DeviceAuth, DeviceSpec, DeviceStatus};
use super::store::{Store, StoreError};
use super::HubState;
use crate::protocol::dps::{
    error_code, OperationStatus, RegistrationState, RegistrationStatus, SERVICE_OWNER_POLICY,
};
use crate::protocol::sas::{self, SasToken};

pub use enrollments::{Enrollments, Kind, Matched, X509Attestation};

/// Operations kept for their polls. A device polls within seconds of registering; when the
/// table is full the oldest operation is forgotten, and a poll for it gets 404, after which
/// the device registers again (nothing is lost: the registration itself is done).
const MAX_OPERATIONS: usize = 10_000;

/// What the register answer tells a device to wait before its first poll, in seconds.
pub const RETRY_AFTER_S: u64 = 1;

/// A DPS error: its code (whose first three digits are the HTTP status) and a message,
/// never a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("DPS error {code}: {message}")]
pub struct DpsError {
    pub code: u32,
    pub message: String,
}

impl DpsError {
    pub fn new(code: u32, message: impl Into<String>) -> Self {
        DpsError {
            code,
            message: message.into(),
        }
    }

    pub fn status(&self) -> u16 {
        error_code::http_status(self.code)
    }

    fn store(error: StoreError) -> Self {
        let mut message = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        DpsError::new(error_code::INTERNAL, message)
    }

    /// DPS's error body (`errorCode`, `trackingId`, `message`, `timestampUtc`).
    pub fn body(&self) -> Value {
        json!({
            "errorCode": self.code,
            "trackingId": uuid::Uuid::new_v4().to_string(),
            "message": self.message,
            "timestampUtc": now_iso(),
        })
    }
}

/// Why a registration's CONNECT or a service request was refused; for the log only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpsAuthFailure {
    #[error("malformed credentials: {0}")]
    Malformed(String),
    #[error("the id scope {0:?} is not this DPS's")]
    WrongScope(String),
    #[error("the token is for {0:?}, not for this registration or host")]
    WrongResource(String),
    #[error("the client id {0:?} is not the registration id of the user name")]
    ClientIdMismatch(String),
    #[error("no enrollment's key signed the token")]
    NoEnrollment,
    #[error("the token names policy {0:?}, not provisioningserviceowner")]
    UnknownPolicy(String),
    #[error("the signature does not match the policy's keys")]
    BadSignature,
    #[error("the token expired at {0} (Unix seconds)")]
    Expired(u64),
    #[error(
        "the certificate's common name {common_name:?} is not the registration id {registration:?}"
    )]
    WrongCommonName {
        registration: String,
        common_name: Option<String>,
    },
    #[error("no X.509 enrollment accepts the certificate")]
    NoCertificateEnrollment,
}

/// An operation a device may poll.
struct Operation {
    registration_id: String,
    status: OperationStatus,
}

#[derive(Default)]
struct Operations {
    by_id: HashMap<String, Operation>,
    order: VecDeque<String>,
}

/// The DPS's state: its id scope, service policy, enrollments and pending operations.
pub struct Dps {
    pub id_scope: String,
    /// The host name devices are assigned to (this hub's).
    pub assigned_hub: String,
    pub enrollments: Enrollments,
    service_keys: (String, String),
    operations: Mutex<Operations>,
    /// Test hook: register requests still to be answered 429 (see [`Dps::throttle_next`]).
    throttle: AtomicU64,
    /// Register requests answered 429, for tests and the curious.
    pub throttled: AtomicU64,
}

fn setting_or_new(
    store: &Store,
    name: &str,
    new: impl FnOnce() -> String,
) -> Result<String, StoreError> {
    if let Some(value) = store.setting(name)? {
        return Ok(value);
    }
    let value = new();
    store.put_setting(name, &value)?;
    Ok(value)
}

/// A new id scope: `0ne` and 8 upper-case hex digits, the shape of Azure's.
fn new_id_scope() -> String {
    format!("0ne{:08X}", rand::random::<u32>())
}

impl Dps {
    /// Loads (or makes, the first time) the id scope, the service policy's keys and the
    /// enrollments. `id_scope` replaces the kept scope when given.
    pub fn load(
        store: Arc<Store>,
        id_scope: Option<&str>,
        assigned_hub: &str,
    ) -> Result<Dps, LoadError> {
        let id_scope = match id_scope {
            Some(given) => {
                if store.setting("dps_id_scope")?.as_deref() != Some(given) {
                    store.put_setting("dps_id_scope", given)?;
                }
                given.to_string()
            }
            None => setting_or_new(&store, "dps_id_scope", new_id_scope)?,
        };
        let primary = setting_or_new(&store, "dps_service_primary_key", sas::generate_key)?;
        let secondary = setting_or_new(&store, "dps_service_secondary_key", sas::generate_key)?;
        Ok(Dps {
            id_scope,
            assigned_hub: assigned_hub.to_string(),
            enrollments: Enrollments::load(store)?,
            service_keys: (primary, secondary),
            operations: Mutex::default(),
            throttle: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
        })
    }

    /// Test hook: the next `count` register requests are answered 429 (retry-after
    /// [`RETRY_AFTER_S`]), as DPS answers registrations over its rate.
    pub fn throttle_next(&self, count: u64) {
        self.throttle.store(count, Ordering::Relaxed);
    }

    /// Whether this register request is to be throttled (and counts it).
    fn take_throttle(&self) -> bool {
        let taken = self
            .throttle
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if taken {
            self.throttled.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    /// The `provisioningserviceowner` policy's primary key.
    pub fn service_key(&self) -> &str {
        &self.service_keys.0
    }

    /// Checks a DPS service request's `Authorization` header: a SAS token of the
    /// `provisioningserviceowner` policy whose audience is one of the hub's API host names.
    pub fn authorize_service(
        &self,
        state: &HubState,
        header: Option<&str>,
    ) -> Result<(), DpsAuthFailure> {
        let header =
            header.ok_or_else(|| DpsAuthFailure::Malformed("no Authorization header".into()))?;
        let token =
            SasToken::parse(header).map_err(|e| DpsAuthFailure::Malformed(e.to_string()))?;
        match token.key_name.as_deref() {
            Some(SERVICE_OWNER_POLICY) => {}
            Some(other) => return Err(DpsAuthFailure::UnknownPolicy(other.to_string())),
            None => return Err(DpsAuthFailure::UnknownPolicy(String::new())),
        }
        if !state.host_names.accepts(&token.resource) {
            return Err(DpsAuthFailure::WrongResource(token.resource.clone()));
        }
        let (primary, secondary) = &self.service_keys;
        if token.verify_signature(primary).is_err() && token.verify_signature(secondary).is_err() {
            return Err(DpsAuthFailure::BadSignature);
        }
        token
            .check_expiry(state.faults.now_unix())
            .map_err(|_| DpsAuthFailure::Expired(token.expiry))
    }

    /// The registration id of a CONNECT: its user name names this id scope, and the client id
    /// is the registration id (the same for SAS and X.509 registrations).
    fn registration_of<'a>(
        &self,
        client_id: &str,
        username: Option<&'a str>,
    ) -> Result<&'a str, DpsAuthFailure> {
        let username = username.ok_or_else(|| DpsAuthFailure::Malformed("no user name".into()))?;
        let (scope, registration_id) = crate::protocol::dps::parse_username(username)
            .map_err(|e| DpsAuthFailure::Malformed(e.to_string()))?;
        if scope != self.id_scope {
            return Err(DpsAuthFailure::WrongScope(scope.to_string()));
        }
        if client_id != registration_id {
            return Err(DpsAuthFailure::ClientIdMismatch(client_id.to_string()));
        }
        Ok(registration_id)
    }

    /// Checks a registration's CONNECT; returns the registration id and the enrollment
    /// whose key signed the token.
    pub fn authenticate(
        &self,
        now_unix: u64,
        client_id: &str,
        username: Option<&str>,
        password: Option<&str>,
    ) -> Result<(String, Matched), DpsAuthFailure> {
        let registration_id = self.registration_of(client_id, username)?;
        let password =
            password.ok_or_else(|| DpsAuthFailure::Malformed("no password (SAS token)".into()))?;
        let token =
            SasToken::parse(password).map_err(|e| DpsAuthFailure::Malformed(e.to_string()))?;
        // `skn=registration` (the docs) or none at all (the Python SDK): both are a device's.
        if let Some(name) = token
            .key_name
            .as_deref()
            .filter(|n| *n != crate::protocol::dps::REGISTRATION_KEY_NAME)
        {
            return Err(DpsAuthFailure::UnknownPolicy(name.to_string()));
        }
        match crate::protocol::dps::parse_sas_resource(&token.resource) {
            Ok((s, r)) if s.eq_ignore_ascii_case(&self.id_scope) && r == registration_id => {}
            _ => return Err(DpsAuthFailure::WrongResource(token.resource.clone())),
        }
        let matched = self
            .enrollments
            .match_token(registration_id, &token)
            .ok_or(DpsAuthFailure::NoEnrollment)?;
        token
            .check_expiry(now_unix)
            .map_err(|_| DpsAuthFailure::Expired(token.expiry))?;
        Ok((registration_id.to_string(), matched))
    }

    /// Checks the CONNECT of an X.509 registration (no SAS token; the client certificate
    /// chain of the TLS handshake, leaf first): the leaf's common name must be the
    /// registration id, and an X.509 enrollment must accept it ([`Enrollments::match_certificate`]):
    /// a group's chain is verified (webpki, client-auth usage, dates) to its signing
    /// certificates or to the hub's CAs it names; an individual enrollment's certificate
    /// must be the very one, within its dates.
    pub fn authenticate_x509(
        &self,
        authorities: &crate::hub::x509::Authorities,
        now_unix: u64,
        client_id: &str,
        username: Option<&str>,
        chain: &[rustls::pki_types::CertificateDer<'_>],
    ) -> Result<(String, Matched), DpsAuthFailure> {
        use crate::common::der::certificate_summary;
        use crate::hub::x509::verify_chain_to;
        let registration_id = self.registration_of(client_id, username)?;
        let (leaf, intermediates) = chain.split_first().ok_or_else(|| {
            DpsAuthFailure::Malformed("no password (SAS token) and no client certificate".into())
        })?;
        let summary = certificate_summary(leaf);
        let common_name = summary.as_ref().and_then(|s| s.common_name.clone());
        if common_name.as_deref() != Some(registration_id) {
            return Err(DpsAuthFailure::WrongCommonName {
                registration: registration_id.to_string(),
                common_name,
            });
        }
        let now = i64::try_from(now_unix).unwrap_or(i64::MAX);
        let within_dates = summary
            .is_some_and(|s| s.not_before.timestamp() <= now && now <= s.not_after.timestamp());
        let chains = |x509: &X509Attestation| {
            let anchors: Vec<_> = match x509 {
                X509Attestation::CaReferences(names) => names
                    .iter()
                    .filter_map(|name| authorities.certificate(name))
                    .collect(),
                other => other
                    .certificates()
                    .into_iter()
                    .map(rustls::pki_types::CertificateDer::from)
                    .collect(),
            };
            verify_chain_to(&anchors, leaf, intermediates, now_unix).is_ok()
        };
        let matched = self
            .enrollments
            .match_certificate(registration_id, leaf, chains)
            .filter(|m| m.kind == Kind::Group || within_dates)
            .ok_or(DpsAuthFailure::NoCertificateEnrollment)?;
        Ok((registration_id.to_string(), matched))
    }

    fn remember(&self, registration_id: &str, status: OperationStatus) {
        let mut ops = self.operations.lock().unwrap_or_else(|p| p.into_inner());
        while ops.order.len() >= MAX_OPERATIONS {
            if let Some(oldest) = ops.order.pop_front() {
                ops.by_id.remove(&oldest);
            }
        }
        ops.order.push_back(status.operation_id.clone());
        ops.by_id.insert(
            status.operation_id.clone(),
            Operation {
                registration_id: registration_id.to_string(),
                status,
            },
        );
    }

    /// The status of an operation of this registration; 404 when unknown (or forgotten).
    pub fn operation(
        &self,
        registration_id: &str,
        operation_id: &str,
    ) -> Result<OperationStatus, DpsError> {
        let ops = self.operations.lock().unwrap_or_else(|p| p.into_inner());
        ops.by_id
            .get(operation_id)
            .filter(|op| op.registration_id == registration_id)
            .map(|op| op.status.clone())
            .ok_or_else(|| {
                DpsError::new(
                    error_code::OPERATION_NOT_FOUND,
                    format!("Operation {operation_id:?} was not found."),
                )
            })
    }
}

/// Registers `registration_id` under the enrollment that authenticated it: creates or updates
/// the device in this hub and remembers the operation. Returns what the register request is
/// answered with (status `assigning` and the operation id); the poll then gets the result.
pub fn register(
    state: &HubState,
    registration_id: &str,
    matched: &Matched,
    payload: Option<Value>,
) -> Result<OperationStatus, DpsError> {
    let dps = &state.dps;
    if dps.take_throttle() {
        return Err(DpsError::new(
            error_code::THROTTLED,
            "Too many registrations: retry after the time given.",
        ));
    }
    // The enrollment may have changed since the CONNECT: look at it again.
    let current = dps.enrollments.match_current(matched)?;
    if !current.enrollment.enabled {
        return Err(DpsError::new(
            error_code::ENROLLMENT_DISABLED,
            format!(
                "The {} {:?} is disabled.",
                match current.kind {
                    Kind::Individual => "enrollment",
                    Kind::Group => "enrollment group",
                },
                current.enrollment.id
            ),
        ));
    }
    let device_id = current
        .enrollment
        .device_id
        .clone()
        .unwrap_or_else(|| registration_id.to_string());
    // A symmetric-key registration's device gets the enrollment's (or the derived) keys; an
    // X.509 one no keys, and the authentication the match chose.
    let keys = match current.auth {
        DeviceAuth::Sas => {
            let (primary, secondary) = current.device_keys.clone();
            (Some(primary), Some(secondary))
        }
        _ => (None, None),
    };
    let substatus = if state.registry.contains(&device_id) {
        let status = state
            .registry
            .get(&device_id, |d| (d.status, d.status_reason.clone()))
            .map_err(|e| DpsError::new(error_code::INTERNAL, e.message))?;
        state
            .registry
            .update_identity(
                DeviceSpec {
                    id: device_id.clone(),
                    status: status.0,
                    status_reason: status.1,
                    primary_key: keys.0,
                    secondary_key: keys.1,
                    authentication: current.auth.clone(),
                },
                None,
            )
            .map_err(|e| DpsError::new(error_code::INTERNAL, e.message))?;
        "deviceDataMigrated"
    } else {
        state
            .registry
            .create(DeviceSpec {
                id: device_id.clone(),
                status: DeviceStatus::Enabled,
                status_reason: None,
                primary_key: keys.0,
                secondary_key: keys.1,
                authentication: current.auth.clone(),
            })
            .map_err(|e| DpsError::new(error_code::BAD_REQUEST, e.message))?;
        if let Some(initial) = &current.enrollment.initial_twin {
            let (tags, desired) = crate::protocol::dps::initial_twin_parts(initial);
            let patch = json!({"tags": tags, "properties": {"desired": desired}});
            super::twins::update(state, &device_id, &patch, None)
                .map_err(|e| DpsError::new(error_code::BAD_REQUEST, e.message))?;
        }
        "initialAssignment"
    };
    tracing::info!(registration = registration_id, device = %device_id, enrollment = %current.enrollment.id,
        substatus, "DPS registration assigned");
    let now = now_iso();
    let operation_id = format!("4.{}.{}", dps.id_scope, uuid::Uuid::new_v4().simple());
    let assigned = OperationStatus {
        operation_id: operation_id.clone(),
        status: RegistrationStatus::Assigned,
        registration_state: Some(RegistrationState {
            registration_id: registration_id.to_string(),
            created_date_time_utc: Some(now.clone()),
            assigned_hub: Some(dps.assigned_hub.clone()),
            device_id: Some(device_id),
            status: RegistrationStatus::Assigned,
            substatus: Some(substatus.into()),
            error_code: None,
            error_message: None,
            last_updated_date_time_utc: Some(now),
            etag: Some(format!("\"{}\"", uuid::Uuid::new_v4().simple())),
            payload,
        }),
    };
    dps.remember(registration_id, assigned);
    Ok(OperationStatus {
        operation_id,
        status: RegistrationStatus::Assigning,
        registration_state: None,
    })
}
