//! The device registry: every device's identity, keys, status and twin, in memory and in the
//! store.
//!
//! All changes go through [`Registry::update`], which applies a closure to one device and
//! writes the result to SQLite before anyone else can see it (the write happens under the
//! registry lock, so memory and disk never disagree). Live figures that change on every message
//! (connection state, last activity, counters) are atomics in [`LiveStats`] and are not
//! persisted. Twin-specific operations are in `twins.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::error::{IotHubError, LoadError};
use super::store::Store;
use crate::protocol::error_code::ErrorCode;
use crate::protocol::sas;
use crate::protocol::twin::PropertySet;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    Enabled,
    Disabled,
}

/// Figures that change with traffic, shared with the device's connection task.
#[derive(Debug, Default)]
pub struct LiveStats {
    pub connected: AtomicBool,
    /// Unix milliseconds of the last packet from the device; 0 = never.
    pub last_activity_ms: AtomicI64,
    pub telemetry_received: AtomicU64,
    pub cloud_to_device_sent: AtomicU64,
}

impl LiveStats {
    pub fn touch(&self) {
        self.last_activity_ms
            .store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
    }
}

/// A twin as the hub keeps it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Twin {
    pub tags: Map<String, Value>,
    pub desired: StoredPropertySet,
    pub reported: StoredPropertySet,
    /// Grows on every change of tags, desired or reported properties.
    pub version: u64,
}

/// The persisted form of a [`PropertySet`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StoredPropertySet {
    pub properties: Map<String, Value>,
    pub version: u64,
    pub metadata: Map<String, Value>,
}

impl From<&PropertySet> for StoredPropertySet {
    fn from(set: &PropertySet) -> Self {
        StoredPropertySet {
            properties: set.properties.clone(),
            version: set.version,
            metadata: set.metadata.clone(),
        }
    }
}

impl StoredPropertySet {
    pub fn to_property_set(&self) -> PropertySet {
        PropertySet {
            properties: self.properties.clone(),
            version: self.version,
            metadata: self.metadata.clone(),
        }
    }

    pub fn fresh() -> Self {
        StoredPropertySet::from(&PropertySet::default())
    }
}

/// How a device authenticates (`authentication.type` of the service API).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum DeviceAuth {
    /// SAS tokens signed with the device's keys.
    #[default]
    Sas,
    /// An X.509 certificate whose SHA-1 or SHA-256 thumbprint (hex, stored as given) is one
    /// of these.
    #[serde(rename_all = "camelCase")]
    SelfSigned {
        primary_thumbprint: String,
        secondary_thumbprint: Option<String>,
    },
    /// An X.509 certificate that chains to a CA the hub trusts, with the device id as its CN.
    CertificateAuthority,
}

impl DeviceAuth {
    /// The name the service API uses.
    pub fn type_name(&self) -> &'static str {
        match self {
            DeviceAuth::Sas => "sas",
            DeviceAuth::SelfSigned { .. } => "selfSigned",
            DeviceAuth::CertificateAuthority => "certificateAuthority",
        }
    }

    fn thumbprints_json(&self) -> Value {
        match self {
            DeviceAuth::SelfSigned {
                primary_thumbprint,
                secondary_thumbprint,
            } => json!({
                "primaryThumbprint": primary_thumbprint,
                "secondaryThumbprint": secondary_thumbprint,
            }),
            _ => json!({"primaryThumbprint": null, "secondaryThumbprint": null}),
        }
    }

    /// Whether `thumbprint` (hex, any case) is one of a selfSigned device's.
    pub fn has_thumbprint(&self, thumbprint: &str) -> bool {
        match self {
            DeviceAuth::SelfSigned {
                primary_thumbprint,
                secondary_thumbprint,
            } => std::iter::once(primary_thumbprint)
                .chain(secondary_thumbprint)
                .any(|t| t.eq_ignore_ascii_case(thumbprint)),
            _ => false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    pub generation_id: String,
    /// Grows on every change of the identity (keys, status); the device etag derives from it.
    pub etag_counter: u64,
    pub status: DeviceStatus,
    pub status_reason: Option<String>,
    pub status_updated: String,
    /// The symmetric keys of a SAS device; empty for an X.509 device.
    pub primary_key: String,
    pub secondary_key: String,
    /// Absent in documents stored before X.509 devices existed: those are SAS devices.
    #[serde(default)]
    pub authentication: DeviceAuth,
    pub twin: Twin,
    #[serde(skip)]
    pub live: Arc<LiveStats>,
}

impl Device {
    pub fn new(id: &str, primary_key: String, secondary_key: String, status: DeviceStatus) -> Self {
        Device {
            id: id.to_string(),
            generation_id: format!("{}", rand::random::<u64>() % 1_000_000_000_000_000_000),
            etag_counter: 1,
            status,
            status_reason: None,
            status_updated: now_iso(),
            primary_key,
            secondary_key,
            authentication: DeviceAuth::Sas,
            twin: Twin {
                tags: Map::new(),
                desired: StoredPropertySet::fresh(),
                reported: StoredPropertySet::fresh(),
                version: 1,
            },
            live: Arc::default(),
        }
    }

    pub fn etag(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(self.etag_counter.to_string())
    }

    pub fn twin_etag(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(self.twin.version.to_be_bytes())
    }

    pub fn key_matches(&self, check: impl Fn(&str) -> bool) -> bool {
        check(&self.primary_key) || check(&self.secondary_key)
    }

    fn connection_state(&self) -> &'static str {
        if self.live.connected.load(Ordering::Relaxed) {
            "Connected"
        } else {
            "Disconnected"
        }
    }

    fn last_activity(&self) -> String {
        let ms = self.live.last_activity_ms.load(Ordering::Relaxed);
        match chrono::DateTime::from_timestamp_millis(ms) {
            Some(time) if ms > 0 => time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            _ => "0001-01-01T00:00:00Z".to_string(),
        }
    }

    /// The Device JSON of the service API.
    pub fn to_device_json(&self) -> Value {
        json!({
            "deviceId": self.id,
            "moduleId": null,
            "generationId": self.generation_id,
            "etag": self.etag(),
            "connectionState": self.connection_state(),
            "status": self.status,
            "statusReason": self.status_reason,
            "connectionStateUpdatedTime": self.last_activity(),
            "statusUpdatedTime": self.status_updated,
            "lastActivityTime": self.last_activity(),
            "cloudToDeviceMessageCount": self.live.cloud_to_device_sent.load(Ordering::Relaxed),
            "authentication": {
                "type": self.authentication.type_name(),
                "symmetricKey": self.symmetric_key_json(),
                "x509Thumbprint": self.authentication.thumbprints_json(),
            },
            "capabilities": {"iotEdge": false},
        })
    }

    /// Keys for a SAS device; nulls for an X.509 device, as IoT Hub answers.
    fn symmetric_key_json(&self) -> Value {
        match self.authentication {
            DeviceAuth::Sas => json!({
                "primaryKey": self.primary_key,
                "secondaryKey": self.secondary_key,
            }),
            _ => json!({"primaryKey": null, "secondaryKey": null}),
        }
    }

    /// The Twin JSON of the service API (and of queries).
    pub fn to_twin_json(&self) -> Value {
        json!({
            "deviceId": self.id,
            "etag": self.twin_etag(),
            "deviceEtag": self.etag(),
            "status": self.status,
            "statusUpdateTime": self.status_updated,
            "connectionState": self.connection_state(),
            "lastActivityTime": self.last_activity(),
            "cloudToDeviceMessageCount": self.live.cloud_to_device_sent.load(Ordering::Relaxed),
            "authenticationType": self.authentication.type_name(),
            "x509Thumbprint": self.authentication.thumbprints_json(),
            "version": self.twin.version,
            "tags": self.twin.tags,
            "properties": {
                "desired": self.twin.desired.to_property_set().to_json(true),
                "reported": self.twin.reported.to_property_set().to_json(true),
            },
            "capabilities": {"iotEdge": false},
        })
    }
}

pub fn now_iso() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// IoT Hub's device id rule ([`crate::protocol::identity`]), as a 400 ArgumentInvalid.
pub fn check_device_id(id: &str) -> Result<(), IotHubError> {
    crate::protocol::identity::validate_device_id(id)
        .map_err(|error| IotHubError::argument(format!("device id {error}")))
}

/// What a create or update request asks for; `None` keys mean "generate" (SAS devices; an
/// X.509 device has no keys).
pub struct DeviceSpec {
    pub id: String,
    pub status: DeviceStatus,
    pub status_reason: Option<String>,
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
    pub authentication: DeviceAuth,
}

impl DeviceSpec {
    /// An enabled device with keys the registry generates: what `--device`, `run --local` and
    /// most tests register.
    pub fn enabled(id: impl Into<String>) -> DeviceSpec {
        DeviceSpec {
            id: id.into(),
            status: DeviceStatus::Enabled,
            status_reason: None,
            primary_key: None,
            secondary_key: None,
            authentication: DeviceAuth::Sas,
        }
    }
}

pub struct Registry {
    devices: RwLock<HashMap<String, Device>>,
    store: Arc<Store>,
}

pub struct RegistryStats {
    pub total: usize,
    pub enabled: usize,
    pub disabled: usize,
    pub connected: usize,
}

impl Registry {
    pub fn load(store: Arc<Store>) -> Result<Registry, LoadError> {
        let mut devices = HashMap::new();
        for (id, doc) in store.load_devices()? {
            let device: Device =
                serde_json::from_str(&doc).map_err(|source| LoadError::Decode {
                    what: format!("device {id}"),
                    source,
                })?;
            devices.insert(id, device);
        }
        Ok(Registry {
            devices: RwLock::new(devices),
            store,
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, Device>> {
        self.devices.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, Device>> {
        self.devices.write().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, device: &Device) -> Result<(), IotHubError> {
        let doc = serde_json::to_string(device)
            .map_err(|e| IotHubError::internal(format!("cannot encode device: {e}")))?;
        self.store.put_device(&device.id, &doc)?;
        Ok(())
    }

    /// Reads one device.
    pub fn get<R>(&self, id: &str, read: impl FnOnce(&Device) -> R) -> Result<R, IotHubError> {
        self.read()
            .get(id)
            .map(read)
            .ok_or_else(|| IotHubError::device_not_found(id))
    }

    pub fn contains(&self, id: &str) -> bool {
        self.read().contains_key(id)
    }

    /// Changes one device: `change` works on a copy, which replaces the stored device only
    /// when it returns `Ok` and the store has written it.
    pub fn update<R>(
        &self,
        id: &str,
        change: impl FnOnce(&mut Device) -> Result<R, IotHubError>,
    ) -> Result<R, IotHubError> {
        let mut devices = self.write();
        let current = devices
            .get(id)
            .ok_or_else(|| IotHubError::device_not_found(id))?;
        let mut copy = current.clone();
        let result = change(&mut copy)?;
        self.persist(&copy)?;
        devices.insert(id.to_string(), copy);
        Ok(result)
    }

    /// Creates a device; 409 DeviceAlreadyExists when the id is taken.
    pub fn create(&self, spec: DeviceSpec) -> Result<Value, IotHubError> {
        check_device_id(&spec.id)?;
        let (primary, secondary) =
            checked_keys(&spec.authentication, spec.primary_key, spec.secondary_key)?;
        let mut devices = self.write();
        if devices.contains_key(&spec.id) {
            return Err(IotHubError::new(
                ErrorCode::DeviceAlreadyExists,
                format!("A device with ID '{}' is already registered.", spec.id),
            ));
        }
        let mut device = Device::new(&spec.id, primary, secondary, spec.status);
        device.status_reason = spec.status_reason;
        device.authentication = spec.authentication;
        self.persist(&device)?;
        let json = device.to_device_json();
        devices.insert(spec.id, device);
        Ok(json)
    }

    /// Updates identity fields of an existing device (status, keys), honouring `If-Match`.
    pub fn update_identity(
        &self,
        spec: DeviceSpec,
        if_match: Option<&str>,
    ) -> Result<Value, IotHubError> {
        self.update(&spec.id.clone(), |device| {
            check_etag(if_match, &device.etag())?;
            if device.status != spec.status {
                device.status = spec.status;
                device.status_updated = now_iso();
            }
            device.status_reason = spec.status_reason;
            (device.primary_key, device.secondary_key) =
                checked_keys(&spec.authentication, spec.primary_key, spec.secondary_key)?;
            device.authentication = spec.authentication;
            device.etag_counter += 1;
            Ok(device.to_device_json())
        })
    }

    pub fn delete(&self, id: &str, if_match: Option<&str>) -> Result<(), IotHubError> {
        let mut devices = self.write();
        let device = devices
            .get(id)
            .ok_or_else(|| IotHubError::device_not_found(id))?;
        check_etag(if_match, &device.etag())?;
        self.store.delete_device(id)?;
        devices.remove(id);
        Ok(())
    }

    /// Device JSON of up to `top` devices, ordered by id.
    pub fn list(&self, top: usize) -> Vec<Value> {
        let devices = self.read();
        let mut ids: Vec<&String> = devices.keys().collect();
        ids.sort();
        ids.into_iter()
            .take(top)
            .map(|id| devices[id].to_device_json())
            .collect()
    }

    /// Twin JSON of every device, ordered by id, for queries.
    pub fn twin_documents(&self) -> Vec<Value> {
        let devices = self.read();
        let mut twins: Vec<(&String, Value)> = devices
            .iter()
            .map(|(id, device)| (id, device.to_twin_json()))
            .collect();
        twins.sort_by(|a, b| a.0.cmp(b.0));
        twins.into_iter().map(|(_, twin)| twin).collect()
    }

    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.read().keys().cloned().collect();
        ids.sort();
        ids
    }

    pub fn stats(&self) -> RegistryStats {
        let devices = self.read();
        let enabled = devices
            .values()
            .filter(|d| d.status == DeviceStatus::Enabled)
            .count();
        let connected = devices
            .values()
            .filter(|d| d.live.connected.load(Ordering::Relaxed))
            .count();
        RegistryStats {
            total: devices.len(),
            enabled,
            disabled: devices.len() - enabled,
            connected,
        }
    }
}

/// The keys of a device: checked or generated for a SAS device, none for an X.509 device
/// (so no SAS token can ever match one).
fn checked_keys(
    authentication: &DeviceAuth,
    primary: Option<String>,
    secondary: Option<String>,
) -> Result<(String, String), IotHubError> {
    match authentication {
        DeviceAuth::Sas => Ok((
            checked_key(primary, "primaryKey")?,
            checked_key(secondary, "secondaryKey")?,
        )),
        _ => Ok((String::new(), String::new())),
    }
}

/// A key given by a client must be base64 of 16 to 64 bytes; none (or empty) means generate.
fn checked_key(key: Option<String>, field: &str) -> Result<String, IotHubError> {
    use base64::Engine;
    match key.filter(|k| !k.is_empty()) {
        None => Ok(sas::generate_key()),
        Some(key) => match base64::engine::general_purpose::STANDARD.decode(&key) {
            Ok(bytes) if (16..=64).contains(&bytes.len()) => Ok(key),
            _ => Err(IotHubError::argument(format!(
                "authentication.symmetricKey.{field} must be base64 of 16 to 64 bytes"
            ))),
        },
    }
}

/// `If-Match` as clients send it: absent, `*`, or a quoted etag; 412 when it does not match.
pub fn check_etag(if_match: Option<&str>, current: &str) -> Result<(), IotHubError> {
    let Some(given) = if_match.map(str::trim) else {
        return Ok(());
    };
    let given = given.trim_start_matches("W/").trim_matches('"');
    if given == "*" || given == current {
        Ok(())
    } else {
        Err(IotHubError::new(
            ErrorCode::PreconditionFailed,
            "Precondition failed: the etag does not match the current version.",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_follow_iot_hub_rules() {
        assert!(check_device_id("door-01.a_b:c@d$").is_ok());
        assert!(check_device_id("").is_err());
        assert!(check_device_id(&"a".repeat(129)).is_err());
        assert!(check_device_id("a/b").is_err());
        assert!(check_device_id("a b").is_err());
        assert!(check_device_id("é").is_err());
    }

    #[test]
    fn etags_match_quoted_or_star() {
        assert!(check_etag(None, "abc").is_ok());
        assert!(check_etag(Some("\"*\""), "abc").is_ok());
        assert!(check_etag(Some("*"), "abc").is_ok());
        assert!(check_etag(Some("\"abc\""), "abc").is_ok());
        let err = check_etag(Some("\"abd\""), "abc").unwrap_err();
        assert_eq!(err.code, ErrorCode::PreconditionFailed);
    }

    #[test]
    fn registry_persists_and_refuses_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("hub.db")).unwrap());
        let registry = Registry::load(store.clone()).unwrap();
        let spec = DeviceSpec::enabled;
        registry.create(spec("d1")).unwrap();
        let err = registry.create(spec("d1")).unwrap_err();
        assert_eq!(err.code, ErrorCode::DeviceAlreadyExists);
        let reloaded = Registry::load(store).unwrap();
        assert_eq!(reloaded.ids(), vec!["d1".to_string()]);
        let bad_key = DeviceSpec {
            primary_key: Some("not base64!".into()),
            ..spec("d2")
        };
        assert_eq!(
            registry.create(bad_key).unwrap_err().code,
            ErrorCode::ArgumentInvalid
        );
    }
}
