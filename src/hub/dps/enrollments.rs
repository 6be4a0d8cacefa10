//! DPS enrollments: individual enrollments (one registration id, its own symmetric keys) and
//! enrollment groups (a group key from which each device's key derives), in memory and in the
//! hub's store, in the JSON shape of the DPS service REST API (api-version 2021-10-01).
//!
//! A document is checked and completed here (keys generated when absent, as DPS does;
//! timestamps; etag); fields this DPS does not act on (capabilities, allocationPolicy,
//! reprovisionPolicy, ...) are kept and returned as given.
//!
//! X.509 attestation (`attestation.type` `x509`): an individual enrollment names the device's
//! own certificates (`x509.clientCertificates`, matched by thumbprint, and its registration id
//! must be their common name); a group names CA certificates a device's chain must reach,
//! given in the enrollment (`x509.signingCertificates`) or by the name of a CA added to the
//! hub (`x509.caReferences`, `simdevice service certificate add`). A certificate is given as
//! PEM or as base64 DER, and returned as PEM with DPS's `info` (subject, issuer, dates,
//! thumbprints). The chain itself is checked by the caller (`dps::Dps`), which has the hub's
//! CAs. Knows nothing of MQTT or HTTP.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::DpsError;
use crate::common::der::{certificate_summary, thumbprint_sha1, thumbprint_sha256};
use crate::hub::error::LoadError;
use crate::hub::registry::{now_iso, DeviceAuth};
use crate::hub::store::Store;
use crate::protocol::dps::error_code;
use crate::protocol::sas::{self, SasToken};

/// Which of the two collections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Individual,
    Group,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Individual => "individual",
            Kind::Group => "group",
        }
    }

    /// The document's id field.
    fn id_field(self) -> &'static str {
        match self {
            Kind::Individual => "registrationId",
            Kind::Group => "enrollmentGroupId",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Individual => "enrollment",
            Kind::Group => "enrollment group",
        }
    }
}

/// An enrollment's X.509 attestation: certificates as DER in base64 (primary first, then the
/// secondary if given), or CA names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum X509Attestation {
    /// Individual enrollments: the device's own certificates.
    ClientCertificates(Vec<String>),
    /// Enrollment groups: root or intermediate CA certificates a device's chain must reach.
    SigningCertificates(Vec<String>),
    /// Enrollment groups: names of CA certificates added to the hub.
    CaReferences(Vec<String>),
}

impl X509Attestation {
    /// The DER of the certificates it holds (none for CA references).
    pub fn certificates(&self) -> Vec<Vec<u8>> {
        use base64::Engine;
        match self {
            X509Attestation::ClientCertificates(list)
            | X509Attestation::SigningCertificates(list) => list
                .iter()
                .filter_map(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .collect(),
            X509Attestation::CaReferences(_) => Vec::new(),
        }
    }

    fn to_json(&self) -> Value {
        let side = |index: usize| if index == 0 { "primary" } else { "secondary" };
        let (field, pairs): (&str, Map<String, Value>) = match self {
            X509Attestation::CaReferences(names) => (
                "caReferences",
                names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (side(i).to_string(), json!(n)))
                    .collect(),
            ),
            X509Attestation::ClientCertificates(_) | X509Attestation::SigningCertificates(_) => (
                if matches!(self, X509Attestation::ClientCertificates(_)) {
                    "clientCertificates"
                } else {
                    "signingCertificates"
                },
                self.certificates()
                    .iter()
                    .enumerate()
                    .map(|(i, der)| {
                        (
                            side(i).to_string(),
                            json!({"certificate": der_to_pem(der), "info": certificate_info(der)}),
                        )
                    })
                    .collect(),
            ),
        };
        json!({ field: pairs })
    }
}

fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// DPS's X509CertificateInfo of a certificate (serialNumber left out: not read here).
fn certificate_info(der: &[u8]) -> Value {
    let summary = certificate_summary(der);
    json!({
        "subjectName": summary.as_ref().map(|s| s.subject.clone()),
        "issuerName": summary.as_ref().map(|s| s.issuer.clone()),
        "notBeforeUtc": summary.as_ref().map(|s| s.not_before.to_rfc3339()),
        "notAfterUtc": summary.as_ref().map(|s| s.not_after.to_rfc3339()),
        "sha1Thumbprint": thumbprint_sha1(der),
        "sha256Thumbprint": thumbprint_sha256(der),
        "version": 3,
    })
}

/// One enrollment as kept. `extra` holds the fields of the request this DPS does not act on.
/// `Debug` leaves the keys out.
#[derive(Clone, Serialize, Deserialize)]
pub struct Enrollment {
    pub id: String,
    /// Individual enrollments only: the device id to create (default: the registration id).
    pub device_id: Option<String>,
    /// The symmetric keys; empty for an X.509 enrollment.
    pub primary_key: String,
    pub secondary_key: String,
    /// X.509 attestation instead of symmetric keys (absent in documents stored before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509Attestation>,
    pub enabled: bool,
    pub initial_twin: Option<Value>,
    pub etag_counter: u64,
    pub created: String,
    pub updated: String,
    pub extra: Map<String, Value>,
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollment")
            .field("id", &self.id)
            .field("device_id", &self.device_id)
            .field("keys", &"***")
            .field("enabled", &self.enabled)
            .field("etag_counter", &self.etag_counter)
            .finish_non_exhaustive()
    }
}

impl Enrollment {
    pub fn etag(&self) -> String {
        format!("\"{}\"", self.etag_counter)
    }

    /// The document the REST API returns.
    pub fn to_json(&self, kind: Kind) -> Value {
        let mut doc = self.extra.clone();
        doc.insert(kind.id_field().into(), json!(self.id));
        if let Some(device_id) = &self.device_id {
            doc.insert("deviceId".into(), json!(device_id));
        }
        let attestation = match &self.x509 {
            Some(x509) => json!({"type": "x509", "x509": x509.to_json()}),
            None => json!({"type": "symmetricKey", "symmetricKey": {
                "primaryKey": self.primary_key, "secondaryKey": self.secondary_key}}),
        };
        doc.insert("attestation".into(), attestation);
        if let Some(twin) = &self.initial_twin {
            doc.insert("initialTwin".into(), twin.clone());
        }
        doc.insert(
            "provisioningStatus".into(),
            json!(if self.enabled { "enabled" } else { "disabled" }),
        );
        doc.insert("createdDateTimeUtc".into(), json!(self.created));
        doc.insert("lastUpdatedDateTimeUtc".into(), json!(self.updated));
        doc.insert("etag".into(), json!(self.etag()));
        Value::Object(doc)
    }

    /// The device keys a registration under this enrollment gets: the enrollment's own
    /// (individual) or derived from the group's keys with the registration id.
    pub fn device_keys(&self, kind: Kind, registration_id: &str) -> Option<(String, String)> {
        if self.x509.is_some() {
            return None;
        }
        match kind {
            Kind::Individual => Some((self.primary_key.clone(), self.secondary_key.clone())),
            Kind::Group => Some((
                sas::derive_device_key(&self.primary_key, registration_id).ok()?,
                sas::derive_device_key(&self.secondary_key, registration_id).ok()?,
            )),
        }
    }
}

/// Fields whose values this DPS computes; a request may send them, they are not kept.
const COMPUTED: [&str; 8] = [
    "registrationId",
    "enrollmentGroupId",
    "deviceId",
    "attestation",
    "initialTwin",
    "provisioningStatus",
    "createdDateTimeUtc",
    "lastUpdatedDateTimeUtc",
];

fn bad(message: impl Into<String>) -> DpsError {
    DpsError::new(error_code::BAD_REQUEST, message)
}

fn check_id(kind: Kind, id: &str) -> Result<(), DpsError> {
    // DPS: up to 128 characters, lower-case alphanumerics and `-._:` (registration ids are
    // case-insensitive; we keep them as given and refuse what would not be a device id).
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "the {} id {id:?} is not 1-128 characters of letters, digits and -._:",
            kind.noun()
        )))
    }
}

fn key_field(symmetric: Option<&Value>, name: &str) -> Result<String, DpsError> {
    match symmetric.and_then(|s| s.get(name)) {
        None | Some(Value::Null) => Ok(sas::generate_key()),
        Some(Value::String(key)) if key.is_empty() => Ok(sas::generate_key()),
        Some(Value::String(key)) => {
            sas::check_key(key)
                .map_err(|_| bad(format!("attestation.symmetricKey.{name} is not base64")))?;
            Ok(key.clone())
        }
        Some(_) => Err(bad(format!(
            "attestation.symmetricKey.{name} must be a string"
        ))),
    }
}

/// One certificate of an X.509 attestation, `{"certificate": PEM or base64 DER}`, as base64 DER.
fn certificate_field(value: &Value, at: &str) -> Result<String, DpsError> {
    use base64::Engine;
    let text = value
        .get("certificate")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("{at}.certificate is required (PEM or base64 DER)")))?;
    let der = if text.contains("-----BEGIN") {
        crate::common::pem::parse_pem_certificates(text)
            .ok()
            .and_then(|certs| certs.into_iter().next())
            .map(|c| c.to_vec())
    } else {
        let compact: String = text.split_whitespace().collect();
        base64::engine::general_purpose::STANDARD
            .decode(compact)
            .ok()
    };
    match der {
        Some(der) if certificate_summary(&der).is_some() => {
            Ok(base64::engine::general_purpose::STANDARD.encode(der))
        }
        _ => Err(bad(format!("{at}.certificate is not an X.509 certificate"))),
    }
}

/// `attestation.x509` of a PUT body: exactly one of clientCertificates (individual), or
/// signingCertificates or caReferences (group), each with a primary and maybe a secondary.
fn x509_attestation(kind: Kind, x509: Option<&Value>) -> Result<X509Attestation, DpsError> {
    let x509 = x509
        .and_then(Value::as_object)
        .ok_or_else(|| bad("attestation.x509 is required for the x509 type"))?;
    let present: Vec<(&str, &Value)> =
        ["clientCertificates", "signingCertificates", "caReferences"]
            .into_iter()
            .filter_map(|f| x509.get(f).filter(|v| !v.is_null()).map(|v| (f, v)))
            .collect();
    let [(field, pair)] = present.as_slice() else {
        return Err(bad(
            "attestation.x509 needs exactly one of clientCertificates, signingCertificates or caReferences",
        ));
    };
    let allowed = match kind {
        Kind::Individual => *field == "clientCertificates",
        Kind::Group => *field != "clientCertificates",
    };
    if !allowed {
        return Err(bad(format!(
            "attestation.x509.{field} is not for an {}",
            kind.noun()
        )));
    }
    let mut values = Vec::new();
    for side in ["primary", "secondary"] {
        let at = format!("attestation.x509.{field}.{side}");
        match pair.get(side) {
            None | Some(Value::Null) if side == "secondary" => {}
            None | Some(Value::Null) => return Err(bad(format!("{at} is required"))),
            Some(value) if *field == "caReferences" => {
                let name = value
                    .as_str()
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| bad(format!("{at} must be a CA certificate's name")))?;
                values.push(name.to_string());
            }
            Some(value) => values.push(certificate_field(value, &at)?),
        }
    }
    Ok(match *field {
        "clientCertificates" => X509Attestation::ClientCertificates(values),
        "signingCertificates" => X509Attestation::SigningCertificates(values),
        _ => X509Attestation::CaReferences(values),
    })
}

/// Checks a PUT body into an enrollment; `existing` gives the creation time and etag.
fn from_request(
    kind: Kind,
    id: &str,
    body: &Value,
    existing: Option<&Enrollment>,
) -> Result<Enrollment, DpsError> {
    check_id(kind, id)?;
    let doc = body
        .as_object()
        .ok_or_else(|| bad("the body must be a JSON object"))?;
    if let Some(given) = doc.get(kind.id_field()).and_then(Value::as_str) {
        if given != id {
            return Err(bad(format!(
                "{} {given:?} in the body is not {id:?} of the path",
                kind.id_field()
            )));
        }
    }
    let attestation = doc
        .get("attestation")
        .ok_or_else(|| bad("attestation is required"))?;
    let x509 = match attestation.get("type").and_then(Value::as_str) {
        Some("symmetricKey") => None,
        Some("x509") => Some(x509_attestation(kind, attestation.get("x509"))?),
        Some(other) => {
            return Err(bad(format!(
                "attestation type {other:?} is not supported by this DPS (symmetricKey or x509)"
            )))
        }
        None => return Err(bad("attestation.type is required")),
    };
    if let (Kind::Individual, Some(x509)) = (kind, &x509) {
        // DPS: an X.509 device's registration id is its certificate's common name.
        for der in x509.certificates() {
            let common_name = certificate_summary(&der).and_then(|s| s.common_name);
            if common_name.as_deref() != Some(id) {
                return Err(bad(format!(
                    "the client certificate's common name {common_name:?} is not the registration id {id:?}"
                )));
            }
        }
    }
    let symmetric = attestation.get("symmetricKey");
    let enabled = match doc.get("provisioningStatus").and_then(Value::as_str) {
        None | Some("enabled") => true,
        Some("disabled") => false,
        Some(other) => {
            return Err(bad(format!(
                "provisioningStatus {other:?} is not enabled or disabled"
            )))
        }
    };
    let initial_twin = match doc.get("initialTwin") {
        None | Some(Value::Null) => None,
        Some(twin @ Value::Object(_)) => Some(twin.clone()),
        Some(_) => return Err(bad("initialTwin must be an object")),
    };
    let device_id = match (kind, doc.get("deviceId")) {
        (Kind::Individual, Some(Value::String(d))) if !d.is_empty() => {
            crate::hub::registry::check_device_id(d).map_err(|e| bad(e.message))?;
            Some(d.clone())
        }
        _ => None,
    };
    let extra = doc
        .iter()
        .filter(|(k, _)| !COMPUTED.contains(&k.as_str()) && k.as_str() != "etag")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (primary_key, secondary_key) = match x509 {
        Some(_) => (String::new(), String::new()),
        None => (
            key_field(symmetric, "primaryKey")?,
            key_field(symmetric, "secondaryKey")?,
        ),
    };
    let now = now_iso();
    Ok(Enrollment {
        id: id.to_string(),
        device_id,
        primary_key,
        secondary_key,
        x509,
        enabled,
        initial_twin,
        etag_counter: existing.map_or(1, |e| e.etag_counter + 1),
        created: existing.map_or_else(|| now.clone(), |e| e.created.clone()),
        updated: now,
        extra,
    })
}

/// `If-Match`: absent, `*` or the current etag (quoted or not); else 412.
fn check_if_match(if_match: Option<&str>, current: &Enrollment) -> Result<(), DpsError> {
    let Some(given) = if_match.map(str::trim) else {
        return Ok(());
    };
    let given = given.trim_start_matches("W/").trim_matches('"');
    if given == "*" || given == current.etag().trim_matches('"') {
        Ok(())
    } else {
        Err(DpsError::new(
            error_code::PRECONDITION_FAILED,
            "Precondition failed: the etag does not match the current version.",
        ))
    }
}

/// An enrollment that accepted a registration's token or certificate. `Debug` leaves the
/// keys out.
#[derive(Clone)]
pub struct Matched {
    pub kind: Kind,
    pub enrollment: Enrollment,
    /// The device's keys (empty for an X.509 registration).
    pub device_keys: (String, String),
    /// How the device the registration creates authenticates with the hub.
    pub auth: DeviceAuth,
}

impl std::fmt::Debug for Matched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matched")
            .field("kind", &self.kind)
            .field("enrollment", &self.enrollment)
            .finish_non_exhaustive()
    }
}

pub struct Enrollments {
    entries: RwLock<BTreeMap<(Kind, String), Enrollment>>,
    store: Arc<Store>,
}

impl Enrollments {
    pub fn load(store: Arc<Store>) -> Result<Enrollments, LoadError> {
        let mut entries = BTreeMap::new();
        for (kind, id, doc) in store.load_dps_enrollments()? {
            let kind = match kind.as_str() {
                "individual" => Kind::Individual,
                _ => Kind::Group,
            };
            let enrollment: Enrollment =
                serde_json::from_str(&doc).map_err(|source| LoadError::Decode {
                    what: format!("{} {id}", kind.noun()),
                    source,
                })?;
            entries.insert((kind, id), enrollment);
        }
        Ok(Enrollments {
            entries: RwLock::new(entries),
            store,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<(Kind, String), Enrollment>> {
        self.entries.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<(Kind, String), Enrollment>> {
        self.entries.write().unwrap_or_else(|p| p.into_inner())
    }

    fn not_found(kind: Kind, id: &str) -> DpsError {
        DpsError::new(
            error_code::NOT_FOUND,
            format!("The {} {id:?} was not found.", kind.noun()),
        )
    }

    pub fn get(&self, kind: Kind, id: &str) -> Result<Value, DpsError> {
        self.read()
            .get(&(kind, id.to_string()))
            .map(|e| e.to_json(kind))
            .ok_or_else(|| Self::not_found(kind, id))
    }

    /// Creates or replaces; returns the document and whether it was created.
    pub fn put(
        &self,
        kind: Kind,
        id: &str,
        body: &Value,
        if_match: Option<&str>,
    ) -> Result<(Value, bool), DpsError> {
        let mut entries = self.write();
        let key = (kind, id.to_string());
        let existing = entries.get(&key);
        if let Some(current) = existing {
            check_if_match(if_match, current)?;
        } else if if_match.is_some_and(|m| m.trim().trim_matches('"') != "*") {
            return Err(Self::not_found(kind, id));
        }
        let enrollment = from_request(kind, id, body, existing)?;
        let doc = serde_json::to_string(&enrollment)
            .map_err(|e| DpsError::new(error_code::INTERNAL, e.to_string()))?;
        self.store
            .put_dps_enrollment(kind.as_str(), id, &doc)
            .map_err(DpsError::store)?;
        let json = enrollment.to_json(kind);
        let created = entries.insert(key, enrollment).is_none();
        Ok((json, created))
    }

    pub fn delete(&self, kind: Kind, id: &str, if_match: Option<&str>) -> Result<(), DpsError> {
        let mut entries = self.write();
        let key = (kind, id.to_string());
        let current = entries.get(&key).ok_or_else(|| Self::not_found(kind, id))?;
        check_if_match(if_match, current)?;
        self.store
            .delete_dps_enrollment(kind.as_str(), id)
            .map_err(DpsError::store)?;
        entries.remove(&key);
        Ok(())
    }

    pub fn list(&self, kind: Kind) -> Vec<Value> {
        self.read()
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, e)| e.to_json(kind))
            .collect()
    }

    /// `matched` as it is now: the enrollment may have been changed or deleted since the
    /// registration's CONNECT. A deleted one is 401, as a token no enrollment signs.
    pub fn match_current(&self, matched: &Matched) -> Result<Matched, DpsError> {
        let entries = self.read();
        let enrollment = entries
            .get(&(matched.kind, matched.enrollment.id.clone()))
            .ok_or_else(|| {
                DpsError::new(
                    error_code::UNAUTHORIZED,
                    format!(
                        "The {} {:?} no longer exists.",
                        matched.kind.noun(),
                        matched.enrollment.id
                    ),
                )
            })?;
        Ok(Matched {
            kind: matched.kind,
            enrollment: enrollment.clone(),
            device_keys: matched.device_keys.clone(),
            auth: matched.auth.clone(),
        })
    }

    /// The X.509 enrollment that accepts the certificate `leaf` (DER) of `registration_id`
    /// (its common name, checked by the caller): the individual enrollment of that id whose
    /// client certificate it is (by thumbprint; the device is then `selfSigned` with the
    /// enrollment's thumbprints); else, when there is no individual enrollment of that id,
    /// the first group whose CA `chains` says the presented chain reaches (`caReferences`:
    /// a `certificateAuthority` device, since the hub trusts that CA too; `signingCertificates`:
    /// a `selfSigned` device with this certificate's thumbprint, since the hub does not know
    /// that CA). Disabled enrollments match too (the registration then says so).
    pub fn match_certificate(
        &self,
        registration_id: &str,
        leaf: &[u8],
        chains: impl Fn(&X509Attestation) -> bool,
    ) -> Option<Matched> {
        let entries = self.read();
        let matched = |kind, enrollment: &Enrollment, auth| Matched {
            kind,
            enrollment: enrollment.clone(),
            device_keys: (String::new(), String::new()),
            auth,
        };
        if let Some(individual) = entries.get(&(Kind::Individual, registration_id.to_string())) {
            let Some(x509 @ X509Attestation::ClientCertificates(_)) = &individual.x509 else {
                return None;
            };
            let certificates = x509.certificates();
            if !certificates.iter().any(|der| der.as_slice() == leaf) {
                return None;
            }
            let mut thumbprints = certificates.iter().map(|der| thumbprint_sha256(der));
            let auth = DeviceAuth::SelfSigned {
                primary_thumbprint: thumbprints.next().unwrap_or_default(),
                secondary_thumbprint: thumbprints.next(),
            };
            return Some(matched(Kind::Individual, individual, auth));
        }
        entries
            .iter()
            .filter(|((k, _), _)| *k == Kind::Group)
            .find_map(|(_, group)| {
                let x509 = group.x509.as_ref()?;
                if !chains(x509) {
                    return None;
                }
                let auth = match x509 {
                    X509Attestation::CaReferences(_) => DeviceAuth::CertificateAuthority,
                    _ => DeviceAuth::SelfSigned {
                        primary_thumbprint: thumbprint_sha256(leaf),
                        secondary_thumbprint: None,
                    },
                };
                Some(matched(Kind::Group, group, auth))
            })
    }

    /// The enrollment whose key signed `token` for `registration_id`: the individual
    /// enrollment of that id when there is one (DPS gives it precedence: the groups are then
    /// not tried), else any enrollment group whose derived key verifies. Disabled enrollments
    /// match too (the registration then says so).
    pub fn match_token(&self, registration_id: &str, token: &SasToken) -> Option<Matched> {
        let entries = self.read();
        let verifies = |(primary, secondary): &(String, String)| {
            token.verify_signature(primary).is_ok() || token.verify_signature(secondary).is_ok()
        };
        let individual = entries.get(&(Kind::Individual, registration_id.to_string()));
        let groups = entries
            .iter()
            .filter(|((k, _), _)| *k == Kind::Group && individual.is_none())
            .map(|(_, e)| (Kind::Group, e));
        let candidates = individual
            .map(|e| (Kind::Individual, e))
            .into_iter()
            .chain(groups);
        for (kind, enrollment) in candidates {
            if let Some(keys) = enrollment.device_keys(kind, registration_id) {
                if verifies(&keys) {
                    return Some(Matched {
                        kind,
                        enrollment: enrollment.clone(),
                        device_keys: keys,
                        auth: DeviceAuth::Sas,
                    });
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enrollments(dir: &std::path::Path) -> Enrollments {
        let store = Arc::new(Store::open(&dir.join("hub.db")).unwrap());
        Enrollments::load(store).unwrap()
    }

    #[test]
    fn keys_are_generated_when_absent_and_documents_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let body = json!({"attestation": {"type": "symmetricKey"},
            "initialTwin": {"tags": {"site": "a"}}, "capabilities": {"iotEdge": false}});
        let (doc, created) = {
            let e = enrollments(dir.path());
            e.put(Kind::Group, "g1", &body, None).unwrap()
        };
        assert!(created);
        let key = doc["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap();
        sas::check_key(key).unwrap();
        assert_eq!(doc["enrollmentGroupId"], "g1");
        assert_eq!(doc["provisioningStatus"], "enabled");
        assert_eq!(doc["capabilities"]["iotEdge"], false);
        let e = enrollments(dir.path());
        assert_eq!(e.get(Kind::Group, "g1").unwrap(), doc);
        assert_eq!(
            e.get(Kind::Individual, "g1").unwrap_err().code,
            error_code::NOT_FOUND
        );
    }

    #[test]
    fn if_match_guards_replace_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let e = enrollments(dir.path());
        let body = json!({"attestation": {"type": "symmetricKey"}});
        let (doc, _) = e.put(Kind::Individual, "d1", &body, None).unwrap();
        let etag = doc["etag"].as_str().unwrap().to_string();
        let (doc2, created) = e.put(Kind::Individual, "d1", &body, Some(&etag)).unwrap();
        assert!(!created);
        assert_ne!(doc2["etag"], doc["etag"]);
        assert_eq!(doc2["createdDateTimeUtc"], doc["createdDateTimeUtc"]);
        let stale = e
            .put(Kind::Individual, "d1", &body, Some(&etag))
            .unwrap_err();
        assert_eq!(stale.code, error_code::PRECONDITION_FAILED);
        assert_eq!(
            e.delete(Kind::Individual, "d1", Some(&etag))
                .unwrap_err()
                .code,
            error_code::PRECONDITION_FAILED
        );
        e.delete(Kind::Individual, "d1", Some("\"*\"")).unwrap();
        assert!(e.list(Kind::Individual).is_empty());
    }

    #[test]
    fn bad_documents_are_refused_with_400() {
        let dir = tempfile::tempdir().unwrap();
        let e = enrollments(dir.path());
        for body in [
            json!({}),
            json!({"attestation": {"type": "x509"}}),
            json!({"attestation": {"type": "x509", "x509": {"caReferences": {"primary": "ca"}}}}),
            json!({"attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": "junk"}}}}}),
            json!({"attestation": {"type": "tpm"}}),
            json!({"attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "not base64!"}}}),
            json!({"attestation": {"type": "symmetricKey"}, "provisioningStatus": "maybe"}),
            json!({"attestation": {"type": "symmetricKey"}, "registrationId": "other"}),
        ] {
            let err = e.put(Kind::Individual, "d1", &body, None).unwrap_err();
            assert_eq!(err.code, error_code::BAD_REQUEST, "{body}");
        }
        let err = e
            .put(
                Kind::Individual,
                "bad/id",
                &json!({"attestation": {"type": "symmetricKey"}}),
                None,
            )
            .unwrap_err();
        assert_eq!(err.code, error_code::BAD_REQUEST);
    }

    #[test]
    fn tokens_match_the_individual_enrollment_or_a_group_by_derived_key() {
        let dir = tempfile::tempdir().unwrap();
        let e = enrollments(dir.path());
        let (group, _) = e
            .put(
                Kind::Group,
                "g1",
                &json!({"attestation": {"type": "symmetricKey"}}),
                None,
            )
            .unwrap();
        let (single, _) = e
            .put(
                Kind::Individual,
                "solo",
                &json!({"attestation": {"type": "symmetricKey"}}),
                None,
            )
            .unwrap();
        let token = |key: &str, reg: &str| {
            let raw =
                sas::generate_token(&format!("0ne/registrations/{reg}"), key, None, 10).unwrap();
            SasToken::parse(&raw).unwrap()
        };
        let group_key = group["attestation"]["symmetricKey"]["secondaryKey"]
            .as_str()
            .unwrap();
        let derived = sas::derive_device_key(group_key, "dev-7").unwrap();
        let matched = e.match_token("dev-7", &token(&derived, "dev-7")).unwrap();
        assert_eq!(
            (matched.kind, matched.enrollment.id.as_str()),
            (Kind::Group, "g1")
        );
        let solo_key = single["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap();
        let matched = e.match_token("solo", &token(solo_key, "solo")).unwrap();
        assert_eq!(matched.kind, Kind::Individual);
        assert_eq!(matched.device_keys.0, solo_key);
        assert!(e.match_token("dev-7", &token(solo_key, "dev-7")).is_none());
        // An individual enrollment of the id shadows the groups.
        let solo_derived = sas::derive_device_key(group_key, "solo").unwrap();
        assert!(e
            .match_token("solo", &token(&solo_derived, "solo"))
            .is_none());
        assert!(e.match_token("dev-8", &token(&derived, "dev-8")).is_none());
    }
}
