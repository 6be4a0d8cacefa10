//! Where twins change: reported patches from devices, tag and desired updates from services,
//! and the desired patches pushed to connected devices as a result.
//!
//! Every change goes through `Registry::update` (so it is persisted before it is visible) and
//! bumps the twin's `version`; desired and reported sets keep their own `$version`s. Limits and
//! merge rules are the shared `protocol::twin` code, the same the agent uses.
//!
//! Every accepted change is also appended to the device's partition of the event store as a
//! twin change event (`iothub-message-source` = `twinChangeEvents`), shaped as IoT Hub's
//! "non-telemetry event schemas" page shows them: application properties `hubName`,
//! `deviceId`, `operationTimestamp`, `iothub-message-schema` = `twinChangeNotification` and
//! `opType` (`updateTwin` or `replaceTwin`); system properties content type
//! `application/json`, encoding `utf-8`, a fresh correlation id and the hub's name as user id.
//! An update's body is the twin's `version` with the changed tags and properties (each section
//! with its `$metadata` for the changed keys and its `$version`); a replacement's is the whole
//! twin.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::error::IotHubError;
use super::registry::{check_etag, now_iso, StoredPropertySet};
use super::HubState;
use crate::hub::events::Source;
use crate::hub::metrics::HubCounters;
use crate::protocol::error_code::ErrorCode;
use crate::protocol::property_bag::PropertyBag;
use crate::protocol::topic::{desired_patch_topic, SubscriptionKind};
use crate::protocol::twin::{self, Section};

/// Largest tags document, in bytes of compact JSON.
const TAGS_LIMIT: usize = 8 * 1024;

/// The twin as a device sees it on `$iothub/twin/GET`: desired and reported with `$version`,
/// no metadata.
pub fn device_view(state: &HubState, device_id: &str) -> Result<Value, IotHubError> {
    state.registry.get(device_id, |device| {
        json!({
            "desired": device.twin.desired.to_property_set().to_json(false),
            "reported": device.twin.reported.to_property_set().to_json(false),
        })
    })
}

/// Applies a reported-properties patch sent by the device; returns the new reported `$version`.
/// Errors are 400s whose message names the broken rule.
pub fn patch_reported(state: &HubState, device_id: &str, body: &[u8]) -> Result<u64, IotHubError> {
    let patch = twin::parse_patch(body).map_err(|e| IotHubError::argument(e.to_string()))?;
    let (version, change) = state
        .registry
        .update(device_id, |device| {
            let mut reported = device.twin.reported.to_property_set();
            reported
                .apply_patch(&patch, Section::Reported, &now_iso())
                .map_err(|e| IotHubError::argument(e.to_string()))?;
            device.twin.reported = StoredPropertySet::from(&reported);
            device.twin.version += 1;
            let mut change = ChangeBody::new(device.twin.version);
            change.section("reported", &patch, &reported.to_json(true));
            Ok((reported.version, change))
        })
        .inspect(|_| HubCounters::bump(&state.counters.twin_updates_device))?;
    twin_changed(state, device_id, OP_UPDATE, change.into_value());
    Ok(version)
}

/// `PATCH /twins/{id}`: merges `tags` and `properties.desired`, honouring `If-Match`.
pub fn update(
    state: &HubState,
    device_id: &str,
    body: &Value,
    if_match: Option<&str>,
) -> Result<Value, IotHubError> {
    let (tags, desired) = tags_and_desired(body)?;
    let (twin_json, pushed) = state.registry.update(device_id, |device| {
        check_etag(if_match, &device.twin_etag())?;
        if let Some(tags) = tags {
            device.twin.tags = merged_tags(&device.twin.tags, tags)?;
        }
        let mut pushed = None;
        let mut desired_json = None;
        if let Some(patch) = desired {
            let mut set = device.twin.desired.to_property_set();
            set.apply_patch(patch, Section::Desired, &now_iso())
                .map_err(|e| IotHubError::argument(e.to_string()))?;
            device.twin.desired = StoredPropertySet::from(&set);
            pushed = Some(desired_patch_message(patch, set.version));
            desired_json = Some(set.to_json(true));
        }
        device.twin.version += 1;
        let mut change = ChangeBody::new(device.twin.version);
        if let Some(tags) = tags {
            change.tags(tags);
        }
        if let (Some(patch), Some(set)) = (desired, &desired_json) {
            change.section("desired", patch, set);
        }
        Ok((device.to_twin_json(), (pushed, change)))
    })?;
    let (pushed, change) = pushed;
    if let Some((version, body)) = pushed {
        push_desired(state, device_id, version, body);
    }
    twin_changed(state, device_id, OP_UPDATE, change.into_value());
    HubCounters::bump(&state.counters.twin_updates_service);
    Ok(twin_json)
}

/// `PUT /twins/{id}`: replaces tags and desired properties (reported ones are the device's).
pub fn replace(
    state: &HubState,
    device_id: &str,
    body: &Value,
    if_match: Option<&str>,
) -> Result<Value, IotHubError> {
    let (tags, desired) = tags_and_desired(body)?;
    let empty = Value::Object(Map::new());
    let new_tags = tags.unwrap_or(&empty);
    let new_desired = desired.unwrap_or(&empty);
    let (twin_json, pushed) = state.registry.update(device_id, |device| {
        check_etag(if_match, &device.twin_etag())?;
        device.twin.tags = merged_tags(&Map::new(), new_tags)?;
        let mut set = device.twin.desired.to_property_set();
        // The device learns the new document as a patch: every new key, and null for each
        // key that the replacement removed.
        let mut patch = Map::new();
        for key in set.properties.keys() {
            patch.insert(key.clone(), Value::Null);
        }
        if let Some(new) = new_desired.as_object() {
            for (key, value) in new {
                if !key.starts_with('$') {
                    patch.insert(key.clone(), value.clone());
                }
            }
        }
        set.replace(new_desired, Section::Desired, &now_iso())
            .map_err(|e| IotHubError::argument(e.to_string()))?;
        device.twin.desired = StoredPropertySet::from(&set);
        device.twin.version += 1;
        let pushed = desired_patch_message(&Value::Object(patch), set.version);
        Ok((device.to_twin_json(), pushed))
    })?;
    let (version, body) = pushed;
    push_desired(state, device_id, version, body);
    twin_changed(state, device_id, OP_REPLACE, replaced_body(&twin_json));
    HubCounters::bump(&state.counters.twin_updates_service);
    Ok(twin_json)
}

const OP_UPDATE: &str = "updateTwin";
const OP_REPLACE: &str = "replaceTwin";

/// The body of an update's twin change event (module notes), built section by section.
struct ChangeBody {
    version: u64,
    tags: Option<Value>,
    properties: Map<String, Value>,
}

impl ChangeBody {
    fn new(version: u64) -> ChangeBody {
        ChangeBody {
            version,
            tags: None,
            properties: Map::new(),
        }
    }

    fn tags(&mut self, patch: &Value) {
        self.tags = Some(patch.clone());
    }

    /// The patch of one section (nulls kept: they say what was removed), the section's
    /// `$metadata` for the patched keys (and its own top-level stamps) and its `$version`, from
    /// the section as it is after the patch (`to_json(true)`).
    fn section(&mut self, name: &str, patch: &Value, after: &Value) {
        let mut out = patch.as_object().cloned().unwrap_or_default();
        out.retain(|k, _| !k.starts_with('$'));
        let metadata = after
            .get("$metadata")
            .and_then(Value::as_object)
            .map(|all| {
                all.iter()
                    .filter(|(k, _)| k.starts_with('$') || out.contains_key(*k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<Map<_, _>>()
            })
            .unwrap_or_default();
        out.insert("$metadata".into(), Value::Object(metadata));
        if let Some(version) = after.get("$version") {
            out.insert("$version".into(), version.clone());
        }
        self.properties.insert(name.into(), Value::Object(out));
    }

    fn into_value(self) -> Value {
        let mut body = Map::new();
        body.insert("version".into(), json!(self.version));
        if let Some(tags) = self.tags {
            body.insert("tags".into(), tags);
        }
        if !self.properties.is_empty() {
            body.insert("properties".into(), Value::Object(self.properties));
        }
        Value::Object(body)
    }
}

/// A replacement's body: the twin as the service API shows it, without the fields of the
/// device identity that IoT Hub leaves out of twin change events.
fn replaced_body(twin_json: &Value) -> Value {
    let mut body = twin_json.as_object().cloned().unwrap_or_default();
    for key in [
        "deviceEtag",
        "status",
        "statusUpdateTime",
        "connectionState",
        "lastActivityTime",
        "cloudToDeviceMessageCount",
        "authenticationType",
        "x509Thumbprint",
        "capabilities",
    ] {
        body.remove(key);
    }
    Value::Object(body)
}

/// Appends a twin change event to the device's partition of the event store.
fn twin_changed(state: &HubState, device_id: &str, op_type: &str, body: Value) {
    let hub = &state.eventhub.hub_name;
    let mut properties = PropertyBag::new();
    properties.insert("$.ct", "application/json");
    properties.insert("$.ce", "utf-8");
    properties.insert("$.cid", &uuid::Uuid::new_v4().simple().to_string()[..11]);
    properties.insert("$.uid", hub);
    properties.insert("hubName", hub);
    properties.insert("deviceId", device_id);
    properties.insert("operationTimestamp", now_iso());
    properties.insert("iothub-message-schema", "twinChangeNotification");
    properties.insert("opType", op_type);
    let body = serde_json::to_vec(&body).unwrap_or_default();
    // The change itself is applied already; an event the durable store's disk refuses is
    // said, not retried.
    if let Err(error) = state.events.append_from(
        Source::TwinChange,
        Arc::from(device_id),
        Arc::from(""),
        properties,
        Bytes::from(body),
        chrono::Utc::now(),
    ) {
        tracing::warn!(device = device_id, error = %crate::common::logging::error_chain(&error),
            "twin change event not recorded in the event store");
    }
}

/// Picks `tags` and `properties.desired` out of a service twin document.
fn tags_and_desired(body: &Value) -> Result<(Option<&Value>, Option<&Value>), IotHubError> {
    if !body.is_object() {
        return Err(IotHubError::argument("the twin must be a JSON object"));
    }
    let tags = body.get("tags").filter(|t| !t.is_null());
    let desired = body
        .get("properties")
        .and_then(|p| p.get("desired"))
        .filter(|d| !d.is_null());
    if body
        .get("properties")
        .and_then(|p| p.get("reported"))
        .is_some_and(|r| {
            r.as_object()
                .is_some_and(|o| o.keys().any(|k| !k.starts_with('$')))
        })
    {
        return Err(IotHubError::argument(
            "reported properties are set by the device only",
        ));
    }
    Ok((tags, desired))
}

fn merged_tags(
    current: &Map<String, Value>,
    patch: &Value,
) -> Result<Map<String, Value>, IotHubError> {
    twin::validate_patch(Section::Tags, patch).map_err(|e| IotHubError::argument(e.to_string()))?;
    let patch = patch
        .as_object()
        .ok_or_else(|| IotHubError::argument("tags must be a JSON object"))?;
    let mut tags = current.clone();
    twin::merge_patch(&mut tags, patch);
    let size = serde_json::to_vec(&tags)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > TAGS_LIMIT {
        return Err(IotHubError::new(
            ErrorCode::ArgumentInvalid,
            format!("tags are {size} bytes, over the {TAGS_LIMIT}-byte limit"),
        ));
    }
    Ok(tags)
}

/// The body of a desired patch as devices receive it: the patch plus `"$version"`.
fn desired_patch_message(patch: &Value, version: u64) -> (u64, Bytes) {
    let mut body = patch.as_object().cloned().unwrap_or_default();
    body.retain(|k, _| !k.starts_with('$'));
    body.insert("$version".into(), json!(version));
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    (version, Bytes::from(bytes))
}

/// Sends a desired patch to the device if it is connected and subscribed. A device that is
/// offline catches up with a twin GET when it reconnects, as documented for IoT Hub.
fn push_desired(state: &HubState, device_id: &str, version: u64, body: Bytes) {
    if let Err(reason) = state.sessions.deliver(
        device_id,
        SubscriptionKind::DesiredPatches,
        rumqttc::QoS::AtLeastOnce,
        desired_patch_topic(version),
        body,
    ) {
        tracing::debug!(device = device_id, version, %reason, "desired patch not pushed");
    }
}
