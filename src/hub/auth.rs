//! Who may do what: the hub's host names, its shared access policies and their rights, the
//! checks of SAS tokens presented by devices (MQTT CONNECT) and services (REST `Authorization`),
//! and of the X.509 certificates devices present in the TLS handshake (`x509.rs` holds the CAs).
//!
//! Failures are reported as an [`AuthFailure`] that names the problem for the hub's log; the
//! peer only ever learns "not authorized" (CONNACK 5, HTTP 401), as with the real IoT Hub.
//! Neither keys nor signatures appear in any message.

use serde::Serialize;

use rustls::pki_types::CertificateDer;

use super::events::AuthMethod;
use super::registry::{DeviceAuth, DeviceSpec, DeviceStatus};
use super::store::{PolicyRow, Store, StoreError};
use super::x509::ChainError;
use super::HubState;
use crate::common::der::{certificate_summary, thumbprint_sha1, thumbprint_sha256};
use crate::protocol::sas::{self, SasToken};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Permission {
    RegistryRead,
    RegistryWrite,
    ServiceConnect,
    DeviceConnect,
}

impl Permission {
    const ALL: [Permission; 4] = [
        Permission::RegistryRead,
        Permission::RegistryWrite,
        Permission::ServiceConnect,
        Permission::DeviceConnect,
    ];

    fn name(self) -> &'static str {
        match self {
            Permission::RegistryRead => "RegistryRead",
            Permission::RegistryWrite => "RegistryWrite",
            Permission::ServiceConnect => "ServiceConnect",
            Permission::DeviceConnect => "DeviceConnect",
        }
    }
}

/// The default policies of an IoT Hub, created with fresh keys on first start.
const DEFAULT_POLICIES: [(&str, &[Permission]); 5] = [
    ("iothubowner", &Permission::ALL),
    ("service", &[Permission::ServiceConnect]),
    ("device", &[Permission::DeviceConnect]),
    ("registryRead", &[Permission::RegistryRead]),
    (
        "registryReadWrite",
        &[Permission::RegistryRead, Permission::RegistryWrite],
    ),
];

#[derive(Clone, Debug)]
pub struct Policy {
    pub name: String,
    pub primary_key: String,
    pub secondary_key: String,
    pub rights: Vec<Permission>,
}

pub struct Policies(Vec<Policy>);

impl Policies {
    pub fn load_or_create(store: &Store) -> Result<Policies, StoreError> {
        let mut rows = store.load_policies()?;
        for (name, rights) in DEFAULT_POLICIES {
            if !rows.iter().any(|r| r.name == name) {
                let row = PolicyRow {
                    name: name.to_string(),
                    primary_key: sas::generate_key(),
                    secondary_key: sas::generate_key(),
                    rights: rights
                        .iter()
                        .map(|p| p.name())
                        .collect::<Vec<_>>()
                        .join(","),
                };
                store.put_policy(&row)?;
                rows.push(row);
            }
        }
        let policies = rows
            .into_iter()
            .map(|row| Policy {
                rights: Permission::ALL
                    .into_iter()
                    .filter(|p| row.rights.split(',').any(|r| r == p.name()))
                    .collect(),
                name: row.name,
                primary_key: row.primary_key,
                secondary_key: row.secondary_key,
            })
            .collect();
        Ok(Policies(policies))
    }

    pub fn get(&self, name: &str) -> Option<&Policy> {
        self.0.iter().find(|p| p.name == name)
    }
}

/// The names under which clients may address this hub, lower-cased: `localhost`,
/// `127.0.0.1`, `::1`, names given with `--hostname`, and each of those with the API port.
#[derive(Clone, Debug)]
pub struct HostNames(Vec<String>);

impl HostNames {
    pub fn new(extra: &[String], api_port: u16) -> HostNames {
        let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1", "[::1]"]
            .iter()
            .map(|s| s.to_string())
            .chain(extra.iter().map(|s| s.to_ascii_lowercase()))
            .collect();
        let with_port: Vec<String> = names.iter().map(|n| format!("{n}:{api_port}")).collect();
        names.extend(with_port);
        HostNames(names)
    }

    pub fn accepts(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.0.contains(&host)
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthFailure {
    #[error("malformed credentials: {0}")]
    Malformed(String),
    #[error("the token is for {0:?}, not for this hub")]
    WrongHost(String),
    #[error("the token's resource {0:?} is not this device")]
    WrongResource(String),
    #[error("the client id {client_id:?} does not match the device id {username_device:?} of the user name")]
    ClientIdMismatch {
        client_id: String,
        username_device: String,
    },
    #[error("no shared access policy named {0:?}")]
    UnknownPolicy(String),
    #[error("policy {policy:?} lacks the {permission:?} permission")]
    MissingPermission {
        policy: String,
        permission: Permission,
    },
    #[error("the signature does not match any key")]
    BadSignature,
    #[error("the token expired at {0} (Unix seconds)")]
    Expired(u64),
    #[error("device {0:?} is not registered")]
    UnknownDevice(String),
    #[error("device {0:?} is disabled")]
    Disabled(String),
    #[error("device {0:?} authenticates with an X.509 certificate and sent none")]
    NoCertificate(String),
    #[error("device {0:?} authenticates with an X.509 certificate; a SAS token is not accepted")]
    TokenForX509Device(String),
    #[error("the certificate's thumbprints (SHA-1 {sha1}, SHA-256 {sha256}) are not those registered for device {device:?}")]
    UnknownThumbprint {
        device: String,
        sha1: String,
        sha256: String,
    },
    #[error("the certificate is not valid now (valid from {not_before} to {not_after})")]
    OutsideValidity {
        not_before: String,
        not_after: String,
    },
    #[error("the certificate cannot be read")]
    UnreadableCertificate,
    #[error("the certificate's common name {common_name:?} is not the device id {device:?}")]
    WrongCommonName {
        device: String,
        common_name: Option<String>,
    },
    #[error("the certificate does not chain to a CA certificate of this hub")]
    Chain(#[source] ChainError),
}

/// The hub's notion of now: the system clock plus the fault hooks' offset (`faults.rs`).
fn now_unix(state: &HubState) -> u64 {
    state.faults.now_unix()
}

fn verify_with_any(token: &SasToken, keys: [&str; 2]) -> Result<(), AuthFailure> {
    if keys.iter().any(|k| token.verify_signature(k).is_ok()) {
        Ok(())
    } else {
        Err(AuthFailure::BadSignature)
    }
}

fn verify_policy(
    state: &HubState,
    token: &SasToken,
    policy_name: &str,
    needed: Permission,
) -> Result<(), AuthFailure> {
    let policy = state
        .policies
        .get(policy_name)
        .ok_or_else(|| AuthFailure::UnknownPolicy(policy_name.to_string()))?;
    verify_with_any(token, [&policy.primary_key, &policy.secondary_key])?;
    if !policy.rights.contains(&needed) {
        return Err(AuthFailure::MissingPermission {
            policy: policy_name.to_string(),
            permission: needed,
        });
    }
    Ok(())
}

/// Checks a service request's `Authorization` header for `needed`. Returns the policy name.
pub fn authorize_service(
    state: &HubState,
    header: Option<&str>,
    needed: Permission,
) -> Result<String, AuthFailure> {
    let header = header.ok_or_else(|| AuthFailure::Malformed("no Authorization header".into()))?;
    let token = SasToken::parse(header).map_err(|e| AuthFailure::Malformed(e.to_string()))?;
    let policy = token
        .key_name
        .clone()
        .ok_or_else(|| AuthFailure::Malformed("the token names no policy (skn)".into()))?;
    if !state.host_names.accepts(&token.resource) {
        return Err(AuthFailure::WrongHost(token.resource.clone()));
    }
    verify_policy(state, &token, &policy, needed)?;
    token
        .check_expiry(now_unix(state))
        .map_err(|_| AuthFailure::Expired(token.expiry))?;
    Ok(policy)
}

/// An authenticated device connection: who it is, how it proved it, and when its token
/// expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLogin {
    pub device_id: String,
    pub token_expiry: u64,
    pub auth: AuthMethod,
}

/// An X.509 device has no token to expire; its connection ends like a SAS device's in every
/// other way. This horizon (ten years) stands in for the expiry the connection task waits on.
const NO_TOKEN_HORIZON_SECS: u64 = 10 * 365 * 24 * 3600;

/// Checks an MQTT CONNECT as [`authenticate_device`] does, with the certificate chain the
/// client presented in the TLS handshake (leaf first; empty when it sent none). A device
/// registered as `selfSigned` or `certificateAuthority` is judged by its certificate (and
/// must send no SAS token); any other by its SAS token, whatever certificate it sent.
pub fn authenticate_connect(
    state: &HubState,
    client_id: &str,
    username: Option<&str>,
    password: Option<&str>,
    peer_certificates: &[CertificateDer<'_>],
) -> Result<DeviceLogin, AuthFailure> {
    let registered = username
        .and_then(|u| u.split('/').nth(1))
        .and_then(|device| {
            state
                .registry
                .get(device, |d| d.authentication.clone())
                .ok()
        });
    match registered {
        Some(auth @ (DeviceAuth::SelfSigned { .. } | DeviceAuth::CertificateAuthority)) => {
            authenticate_x509(
                state,
                client_id,
                username,
                password,
                peer_certificates,
                &auth,
            )
        }
        _ => authenticate_device(state, client_id, username, password),
    }
}

/// The user name's device id, checked against the client id, and its host against this
/// hub's names.
fn device_of_username<'u>(
    state: &HubState,
    client_id: &str,
    username: Option<&'u str>,
) -> Result<&'u str, AuthFailure> {
    let username = username.ok_or_else(|| AuthFailure::Malformed("no user name".into()))?;
    // `{host}/{deviceId}/?api-version=...`; the query part is the SDK's business.
    let mut parts = username.splitn(3, '/');
    let host = parts.next().unwrap_or_default();
    let device_id = parts
        .next()
        .ok_or_else(|| AuthFailure::Malformed("the user name has no device id".into()))?;
    if client_id.contains('/') {
        return Err(AuthFailure::Malformed(
            "module identities are not supported by this hub".into(),
        ));
    }
    if device_id != client_id {
        return Err(AuthFailure::ClientIdMismatch {
            client_id: client_id.to_string(),
            username_device: device_id.to_string(),
        });
    }
    if !state.host_names.accepts(host) {
        return Err(AuthFailure::WrongHost(host.to_string()));
    }
    Ok(device_id)
}

fn authenticate_x509(
    state: &HubState,
    client_id: &str,
    username: Option<&str>,
    password: Option<&str>,
    chain: &[CertificateDer<'_>],
    auth: &DeviceAuth,
) -> Result<DeviceLogin, AuthFailure> {
    let device_id = device_of_username(state, client_id, username)?;
    if password.is_some_and(|p| !p.is_empty()) {
        return Err(AuthFailure::TokenForX509Device(device_id.to_string()));
    }
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(AuthFailure::NoCertificate(device_id.to_string()));
    };
    let now = now_unix(state);
    match auth {
        DeviceAuth::SelfSigned { .. } => {
            let (sha1, sha256) = (thumbprint_sha1(leaf), thumbprint_sha256(leaf));
            if !auth.has_thumbprint(&sha1) && !auth.has_thumbprint(&sha256) {
                return Err(AuthFailure::UnknownThumbprint {
                    device: device_id.to_string(),
                    sha1,
                    sha256,
                });
            }
            // No chain to check, but the dates still count, as for any certificate.
            let summary = certificate_summary(leaf).ok_or(AuthFailure::UnreadableCertificate)?;
            let now = i64::try_from(now).unwrap_or(i64::MAX);
            if now < summary.not_before.timestamp() || now > summary.not_after.timestamp() {
                return Err(AuthFailure::OutsideValidity {
                    not_before: summary.not_before.to_rfc3339(),
                    not_after: summary.not_after.to_rfc3339(),
                });
            }
        }
        _ => {
            state
                .x509
                .verify_chain(leaf, intermediates, now)
                .map_err(AuthFailure::Chain)?;
            let common_name = certificate_summary(leaf).and_then(|s| s.common_name);
            if common_name.as_deref() != Some(device_id) {
                return Err(AuthFailure::WrongCommonName {
                    device: device_id.to_string(),
                    common_name,
                });
            }
        }
    }
    let status = state
        .registry
        .get(device_id, |d| d.status)
        .map_err(|_| AuthFailure::UnknownDevice(device_id.to_string()))?;
    if status == DeviceStatus::Disabled {
        return Err(AuthFailure::Disabled(device_id.to_string()));
    }
    let auth = match auth {
        DeviceAuth::SelfSigned { .. } => AuthMethod::SelfSigned,
        _ => AuthMethod::CertificateAuthority,
    };
    Ok(DeviceLogin {
        device_id: device_id.to_string(),
        token_expiry: now + NO_TOKEN_HORIZON_SECS,
        auth,
    })
}

/// Checks an MQTT CONNECT: client id, user name and SAS password. With `--auto-register`, a
/// device whose key derives from the group key is registered on its first connect.
pub fn authenticate_device(
    state: &HubState,
    client_id: &str,
    username: Option<&str>,
    password: Option<&str>,
) -> Result<DeviceLogin, AuthFailure> {
    let device_id = device_of_username(state, client_id, username)?;
    let password = password
        .filter(|p| !p.is_empty())
        .ok_or_else(|| AuthFailure::Malformed("no password (SAS token)".into()))?;
    let token = SasToken::parse(password).map_err(|e| AuthFailure::Malformed(e.to_string()))?;
    let (token_host, token_device) = token
        .resource
        .split_once("/devices/")
        .ok_or_else(|| AuthFailure::WrongResource(token.resource.clone()))?;
    if token_device != device_id {
        return Err(AuthFailure::WrongResource(token.resource.clone()));
    }
    if !state.host_names.accepts(token_host) {
        return Err(AuthFailure::WrongHost(token_host.to_string()));
    }

    match &token.key_name {
        Some(policy) => verify_policy(state, &token, policy, Permission::DeviceConnect)?,
        None => verify_device_key(state, &token, device_id)?,
    }
    token
        .check_expiry(now_unix(state))
        .map_err(|_| AuthFailure::Expired(token.expiry))?;
    let status = state
        .registry
        .get(device_id, |d| d.status)
        .map_err(|_| AuthFailure::UnknownDevice(device_id.to_string()))?;
    if status == DeviceStatus::Disabled {
        return Err(AuthFailure::Disabled(device_id.to_string()));
    }
    Ok(DeviceLogin {
        device_id: device_id.to_string(),
        token_expiry: token.expiry,
        auth: AuthMethod::Sas,
    })
}

fn verify_device_key(
    state: &HubState,
    token: &SasToken,
    device_id: &str,
) -> Result<(), AuthFailure> {
    let keys = state.registry.get(device_id, |d| {
        (
            d.primary_key.clone(),
            d.secondary_key.clone(),
            d.authentication.clone(),
        )
    });
    match (keys, &state.group_key) {
        // An X.509 device has no keys: no token may pass for it.
        (Ok((_, _, auth)), _) if auth != DeviceAuth::Sas => {
            Err(AuthFailure::TokenForX509Device(device_id.to_string()))
        }
        (Ok((primary, secondary, _)), _) => verify_with_any(token, [&primary, &secondary]),
        (Err(_), Some(group_key)) => {
            let derived = sas::derive_device_key(group_key, device_id)
                .map_err(|e| AuthFailure::Malformed(e.to_string()))?;
            verify_with_any(token, [&derived, &derived])?;
            token
                .check_expiry(now_unix(state))
                .map_err(|_| AuthFailure::Expired(token.expiry))?;
            let spec = DeviceSpec {
                id: device_id.to_string(),
                status: DeviceStatus::Enabled,
                status_reason: None,
                primary_key: Some(derived.clone()),
                secondary_key: Some(derived),
                authentication: DeviceAuth::Sas,
            };
            // A concurrent first connect of the same id may have registered it already.
            match state.registry.create(spec) {
                Ok(_) => tracing::info!(device = device_id, "device auto-registered"),
                Err(e) if state.registry.contains(device_id) => {
                    tracing::debug!(device = device_id, %e, "device registered concurrently")
                }
                Err(e) => return Err(AuthFailure::Malformed(e.to_string())),
            }
            Ok(())
        }
        (Err(_), None) => Err(AuthFailure::UnknownDevice(device_id.to_string())),
    }
}
