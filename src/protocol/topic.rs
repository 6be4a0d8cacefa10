//! MQTT topic names and subscription filters of a device identity (protocol doc sections 3-6):
//! builders for both directions and strict parsers for both sides.
//!
//! The hub parses what an authenticated device publishes or subscribes to, and refuses anything
//! else: only the documented topics, and only the device's own `devices/{id}/...` topics. The device
//! id segment is compared byte for byte and never percent-decoded, so `devices/%64...` cannot alias
//! another device. The agent parses what the hub publishes. Query parts (`?$rid=..&$version=..`) are
//! read with the property-bag parser; builders write `$rid`/`$version` literally and percent-encode
//! their values. Method names are written and read raw (they may not contain `/`, see `method`).
//! Module identities (`devices/{d}/modules/{m}/...`) are not covered.

use crate::protocol::encoding::enc;
use crate::protocol::property_bag::{PropertyBag, PropertyBagError};

pub const TWIN_RESPONSES_FILTER: &str = "$iothub/twin/res/#";
pub const DESIRED_PATCHES_FILTER: &str = "$iothub/twin/PATCH/properties/desired/#";
pub const METHODS_FILTER: &str = "$iothub/methods/POST/#";

const TWIN_GET: &str = "$iothub/twin/GET/";
const TWIN_REPORTED_PATCH: &str = "$iothub/twin/PATCH/properties/reported/";
const TWIN_DESIRED_PATCH: &str = "$iothub/twin/PATCH/properties/desired/";
const TWIN_RESPONSE: &str = "$iothub/twin/res/";
const METHOD_REQUEST: &str = "$iothub/methods/POST/";
const METHOD_RESPONSE: &str = "$iothub/methods/res/";
const DEVICES: &str = "devices/";
const EVENTS: &str = "messages/events";
const DEVICEBOUND: &str = "messages/devicebound";
const RID: &str = "$rid";
const VERSION: &str = "$version";

/// Why a topic or filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic '{0}' is not allowed")]
    NotAllowed(String),
    #[error("topic names device '{0}', not the connected device")]
    OtherDevice(String),
    #[error("topic '{0}' has no $rid")]
    MissingRid(String),
    #[error("topic '{0}' has an invalid status code")]
    InvalidStatus(String),
    #[error("topic '{0}' has an invalid $version")]
    InvalidVersion(String),
    #[error("topic '{topic}' has invalid properties: {source}")]
    BadProperties {
        topic: String,
        #[source]
        source: PropertyBagError,
    },
}

/// What a device published, as the hub sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevicePublish {
    Telemetry { properties: PropertyBag },
    TwinGet { rid: String },
    TwinReportedPatch { rid: String },
    MethodResponse { status: i32, rid: String },
}

/// What a device subscribed to, as the hub sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionKind {
    TwinResponses,
    DesiredPatches,
    Methods,
    CloudToDevice,
}

/// What the hub published, as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloudPublish {
    TwinResponse {
        status: u16,
        rid: String,
        version: Option<u64>,
    },
    DesiredPatch {
        version: Option<u64>,
    },
    MethodRequest {
        name: String,
        rid: String,
    },
    CloudToDevice {
        properties: PropertyBag,
    },
}

// ---- builders, hub -> device ----

/// `$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]`
pub fn twin_response_topic(status: u16, rid: &str, version: Option<u64>) -> String {
    let mut query = PropertyBag::new();
    query.insert(RID, rid);
    if let Some(v) = version {
        query.insert(VERSION, v.to_string());
    }
    format!("{TWIN_RESPONSE}{status}/?{}", format_query(&query))
}

/// `$iothub/twin/PATCH/properties/desired/?$version={v}`
pub fn desired_patch_topic(version: u64) -> String {
    format!("{TWIN_DESIRED_PATCH}?{VERSION}={version}")
}

/// `$iothub/methods/POST/{name}/?$rid={rid}`; `name` is written raw.
pub fn method_request_topic(name: &str, rid: &str) -> String {
    format!("{METHOD_REQUEST}{name}/?{}", rid_query(rid))
}

/// `devices/{id}/messages/devicebound/{bag}`
pub fn c2d_topic(device_id: &str, properties: &PropertyBag) -> String {
    format!("{DEVICES}{device_id}/{DEVICEBOUND}/{}", properties.format())
}

// ---- builders, device -> hub ----

/// `devices/{id}/messages/events/{bag}`
pub fn telemetry_topic(device_id: &str, properties: &PropertyBag) -> String {
    format!("{DEVICES}{device_id}/{EVENTS}/{}", properties.format())
}

/// `$iothub/twin/GET/?$rid={rid}`
pub fn twin_get_topic(rid: &str) -> String {
    format!("{TWIN_GET}?{}", rid_query(rid))
}

/// `$iothub/twin/PATCH/properties/reported/?$rid={rid}`
pub fn twin_reported_patch_topic(rid: &str) -> String {
    format!("{TWIN_REPORTED_PATCH}?{}", rid_query(rid))
}

/// `$iothub/methods/res/{status}/?$rid={rid}`
pub fn method_response_topic(status: i32, rid: &str) -> String {
    format!("{METHOD_RESPONSE}{status}/?{}", rid_query(rid))
}

/// `devices/{id}/messages/devicebound/#`
pub fn c2d_filter(device_id: &str) -> String {
    format!("{DEVICES}{device_id}/{DEVICEBOUND}/#")
}

// ---- the query part ----

fn rid_query(rid: &str) -> String {
    let mut query = PropertyBag::new();
    query.insert(RID, rid);
    format_query(&query)
}

/// Formats a topic query; unlike `PropertyBag::format`, a leading `$` in a key stays literal
/// (`$rid`, not `%24rid`), as IoT Hub writes it.
pub fn format_query(query: &PropertyBag) -> String {
    let mut out = String::new();
    for (key, value) in query.iter() {
        if !out.is_empty() {
            out.push('&');
        }
        match key.strip_prefix('$') {
            Some(rest) => {
                out.push('$');
                out.push_str(&enc(rest));
            }
            None => out.push_str(&enc(key)),
        }
        if let Some(v) = value {
            out.push('=');
            out.push_str(&enc(v));
        }
    }
    out
}

/// Parses the part after `?` of a twin or method topic (`$rid=1&$version=4`); keys and values are
/// percent-decoded, so `%24rid` is `$rid`.
pub fn parse_query(topic: &str, query: &str) -> Result<PropertyBag, TopicError> {
    PropertyBag::parse(query).map_err(|source| TopicError::BadProperties {
        topic: topic.to_string(),
        source,
    })
}

fn required_rid(topic: &str, query: &PropertyBag) -> Result<String, TopicError> {
    match query.get_entry(RID) {
        Some(Some(rid)) if !rid.is_empty() => Ok(rid.to_string()),
        _ => Err(TopicError::MissingRid(topic.to_string())),
    }
}

fn optional_version(topic: &str, query: &PropertyBag) -> Result<Option<u64>, TopicError> {
    match query.get_entry(VERSION) {
        None => Ok(None),
        Some(v) => v
            .and_then(parse_decimal)
            .map(Some)
            .ok_or_else(|| TopicError::InvalidVersion(topic.to_string())),
    }
}

/// Digits only (no sign, no spaces), fitting the target type.
fn parse_decimal<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Splits `path?query`; no `?` gives an empty query.
fn split_query(topic: &str) -> (&str, &str) {
    topic.split_once('?').unwrap_or((topic, ""))
}

/// For `devices/{id}/rest`: checks `id` against the identity and returns `rest`.
fn own_device_topic<'a>(topic: &'a str, device_id: &str) -> Option<Result<&'a str, TopicError>> {
    let rest = topic.strip_prefix(DEVICES)?;
    let (id, after) = rest.split_once('/').unwrap_or((rest, ""));
    if id != device_id {
        return Some(Err(TopicError::OtherDevice(id.to_string())));
    }
    Some(Ok(after))
}

/// `messages/events` or `messages/events/{bag}` (same for devicebound) -> the bag text.
fn bag_after<'a>(rest: &'a str, prefix: &str) -> Option<&'a str> {
    if rest == prefix {
        return Some("");
    }
    rest.strip_prefix(prefix)?.strip_prefix('/')
}

fn parse_bag(topic: &str, bag: &str) -> Result<PropertyBag, TopicError> {
    PropertyBag::parse(bag).map_err(|source| TopicError::BadProperties {
        topic: topic.to_string(),
        source,
    })
}

/// `{prefix}{segment}/` -> `segment`, if it is one non-empty segment.
fn segment_between<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let segment = path.strip_prefix(prefix)?.strip_suffix('/')?;
    (!segment.is_empty() && !segment.contains('/')).then_some(segment)
}

// ---- parsers ----

/// Hub side: what may the device authenticated as `device_id` publish to `topic`?
pub fn parse_device_publish(topic: &str, device_id: &str) -> Result<DevicePublish, TopicError> {
    let not_allowed = || TopicError::NotAllowed(topic.to_string());
    // Wildcards are never valid in a PUBLISH topic name (MQTT 3.1.1, 4.7.1).
    if topic.contains(['#', '+', '\0']) {
        return Err(not_allowed());
    }
    if let Some(own) = own_device_topic(topic, device_id) {
        let bag = bag_after(own?, EVENTS).ok_or_else(not_allowed)?;
        return Ok(DevicePublish::Telemetry {
            properties: parse_bag(topic, bag)?,
        });
    }
    let (path, query) = split_query(topic);
    if path == TWIN_GET {
        let query = parse_query(topic, query)?;
        return Ok(DevicePublish::TwinGet {
            rid: required_rid(topic, &query)?,
        });
    }
    if path == TWIN_REPORTED_PATCH {
        let query = parse_query(topic, query)?;
        return Ok(DevicePublish::TwinReportedPatch {
            rid: required_rid(topic, &query)?,
        });
    }
    if let Some(status) = segment_between(path, METHOD_RESPONSE) {
        let status =
            parse_signed(status).ok_or_else(|| TopicError::InvalidStatus(topic.to_string()))?;
        let query = parse_query(topic, query)?;
        return Ok(DevicePublish::MethodResponse {
            status,
            rid: required_rid(topic, &query)?,
        });
    }
    Err(not_allowed())
}

/// An optional `-` then digits.
fn parse_signed(s: &str) -> Option<i32> {
    match s.strip_prefix('-') {
        Some(digits) => parse_decimal::<i64>(digits).and_then(|n| i32::try_from(-n).ok()),
        None => parse_decimal(s),
    }
}

/// Hub side: may the device authenticated as `device_id` subscribe to `filter`?
pub fn parse_subscription(filter: &str, device_id: &str) -> Result<SubscriptionKind, TopicError> {
    match filter {
        TWIN_RESPONSES_FILTER => return Ok(SubscriptionKind::TwinResponses),
        DESIRED_PATCHES_FILTER => return Ok(SubscriptionKind::DesiredPatches),
        METHODS_FILTER => return Ok(SubscriptionKind::Methods),
        _ => {}
    }
    match own_device_topic(filter, device_id) {
        Some(Ok("messages/devicebound/#")) => Ok(SubscriptionKind::CloudToDevice),
        Some(Err(other)) => Err(other),
        _ => Err(TopicError::NotAllowed(filter.to_string())),
    }
}

/// Agent side: what did the hub send to `device_id` on `topic`?
pub fn parse_cloud_publish(topic: &str, device_id: &str) -> Result<CloudPublish, TopicError> {
    let not_allowed = || TopicError::NotAllowed(topic.to_string());
    if let Some(own) = own_device_topic(topic, device_id) {
        let bag = bag_after(own?, DEVICEBOUND).ok_or_else(not_allowed)?;
        return Ok(CloudPublish::CloudToDevice {
            properties: parse_bag(topic, bag)?,
        });
    }
    let (path, query) = split_query(topic);
    if path == TWIN_DESIRED_PATCH {
        let query = parse_query(topic, query)?;
        return Ok(CloudPublish::DesiredPatch {
            version: optional_version(topic, &query)?,
        });
    }
    if let Some(status) = segment_between(path, TWIN_RESPONSE) {
        let status =
            parse_decimal(status).ok_or_else(|| TopicError::InvalidStatus(topic.to_string()))?;
        let query = parse_query(topic, query)?;
        return Ok(CloudPublish::TwinResponse {
            status,
            rid: required_rid(topic, &query)?,
            version: optional_version(topic, &query)?,
        });
    }
    if let Some(name) = segment_between(path, METHOD_REQUEST) {
        let query = parse_query(topic, query)?;
        return Ok(CloudPublish::MethodRequest {
            name: name.to_string(),
            rid: required_rid(topic, &query)?,
        });
    }
    Err(not_allowed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bag(s: &str) -> PropertyBag {
        PropertyBag::parse(s).unwrap()
    }

    #[test]
    fn builders_write_the_documented_topics() {
        assert_eq!(
            twin_response_topic(200, "7", None),
            "$iothub/twin/res/200/?$rid=7"
        );
        assert_eq!(
            twin_response_topic(204, "7", Some(3)),
            "$iothub/twin/res/204/?$rid=7&$version=3"
        );
        assert_eq!(
            desired_patch_topic(5),
            "$iothub/twin/PATCH/properties/desired/?$version=5"
        );
        assert_eq!(
            method_request_topic("reboot", "1"),
            "$iothub/methods/POST/reboot/?$rid=1"
        );
        assert_eq!(
            c2d_topic("d1", &bag("a=1")),
            "devices/d1/messages/devicebound/a=1"
        );
        assert_eq!(
            telemetry_topic("d1", &bag("$.mid=mid-1&$.ct=application/json")),
            "devices/d1/messages/events/%24.mid=mid-1&%24.ct=application%2Fjson"
        );
        assert_eq!(
            telemetry_topic("d1", &PropertyBag::new()),
            "devices/d1/messages/events/"
        );
        assert_eq!(twin_get_topic("a b"), "$iothub/twin/GET/?$rid=a%20b");
        assert_eq!(
            twin_reported_patch_topic("2"),
            "$iothub/twin/PATCH/properties/reported/?$rid=2"
        );
        assert_eq!(
            method_response_topic(-1, "9"),
            "$iothub/methods/res/-1/?$rid=9"
        );
        assert_eq!(c2d_filter("d1"), "devices/d1/messages/devicebound/#");
    }

    #[test]
    fn hub_parses_device_publishes() {
        let t = parse_device_publish(
            "devices/d1/messages/events/%24.mid=mid-1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=no",
            "d1",
        )
        .unwrap();
        let DevicePublish::Telemetry { properties } = t else {
            panic!("{t:?}")
        };
        assert_eq!(properties.get("$.ct"), Some("application/json"));
        assert_eq!(
            parse_device_publish("devices/d1/messages/events", "d1").unwrap(),
            DevicePublish::Telemetry {
                properties: PropertyBag::new()
            }
        );
        assert_eq!(
            parse_device_publish("$iothub/twin/GET/?$rid=1", "d1").unwrap(),
            DevicePublish::TwinGet { rid: "1".into() }
        );
        assert_eq!(
            parse_device_publish(
                "$iothub/twin/PATCH/properties/reported/?$rid=abc&$version=4",
                "d1"
            )
            .unwrap(),
            DevicePublish::TwinReportedPatch { rid: "abc".into() }
        );
        assert_eq!(
            parse_device_publish("$iothub/methods/res/200/?$rid=5", "d1").unwrap(),
            DevicePublish::MethodResponse {
                status: 200,
                rid: "5".into()
            }
        );
        assert_eq!(
            parse_device_publish("$iothub/methods/res/-7/?%24rid=5", "d1").unwrap(),
            DevicePublish::MethodResponse {
                status: -7,
                rid: "5".into()
            }
        );
    }

    #[test]
    fn hub_refuses_other_devices_and_undocumented_topics() {
        assert_eq!(
            parse_device_publish("devices/d2/messages/events/", "d1"),
            Err(TopicError::OtherDevice("d2".into()))
        );
        assert_eq!(
            parse_device_publish("devices/D1/messages/events/", "d1"),
            Err(TopicError::OtherDevice("D1".into()))
        );
        assert_eq!(
            parse_device_publish("devices/%64%31/messages/events/", "d1"),
            Err(TopicError::OtherDevice("%64%31".into()))
        );
        for topic in [
            "devices/d1/messages/devicebound/",
            "devices/d1/messages/eventsX",
            "devices/d1",
            "$iothub/twin/res/200/?$rid=1",
            "$iothub/twin/PATCH/properties/desired/?$rid=1",
            "$iothub/methods/POST/x/?$rid=1",
            "$iothub/twin/GETX/?$rid=1",
            "devices/d1/messages/events/#",
            "devices/d1/messages/events/a=+",
            "other",
            "",
        ] {
            assert_eq!(
                parse_device_publish(topic, "d1"),
                Err(TopicError::NotAllowed(topic.into())),
                "{topic}"
            );
        }
    }

    #[test]
    fn hub_parse_errors() {
        for topic in [
            "$iothub/twin/GET/",
            "$iothub/twin/GET/?$rid=",
            "$iothub/twin/GET/?$rid",
            "$iothub/twin/GET/?rid=1",
        ] {
            assert_eq!(
                parse_device_publish(topic, "d1"),
                Err(TopicError::MissingRid(topic.into())),
                "{topic}"
            );
        }
        for topic in [
            "$iothub/methods/res/abc/?$rid=1",
            "$iothub/methods/res/99999999999/?$rid=1",
            "$iothub/methods/res/+1/?$rid=1",
        ] {
            let err = parse_device_publish(topic, "d1").unwrap_err();
            assert!(
                matches!(
                    err,
                    TopicError::InvalidStatus(_) | TopicError::NotAllowed(_)
                ),
                "{topic}: {err}"
            );
        }
        assert_eq!(
            parse_device_publish("$iothub/methods/res/x/?$rid=1", "d1"),
            Err(TopicError::InvalidStatus(
                "$iothub/methods/res/x/?$rid=1".into()
            ))
        );
        assert!(matches!(
            parse_device_publish("devices/d1/messages/events/a=%zz", "d1"),
            Err(TopicError::BadProperties { .. })
        ));
        assert!(matches!(
            parse_device_publish("$iothub/twin/GET/?$rid=%zz", "d1"),
            Err(TopicError::BadProperties { .. })
        ));
    }

    #[test]
    fn hub_parses_subscriptions() {
        assert_eq!(
            parse_subscription("$iothub/twin/res/#", "d1"),
            Ok(SubscriptionKind::TwinResponses)
        );
        assert_eq!(
            parse_subscription("$iothub/twin/PATCH/properties/desired/#", "d1"),
            Ok(SubscriptionKind::DesiredPatches)
        );
        assert_eq!(
            parse_subscription("$iothub/methods/POST/#", "d1"),
            Ok(SubscriptionKind::Methods)
        );
        assert_eq!(
            parse_subscription("devices/d1/messages/devicebound/#", "d1"),
            Ok(SubscriptionKind::CloudToDevice)
        );
        assert_eq!(
            parse_subscription("devices/d2/messages/devicebound/#", "d1"),
            Err(TopicError::OtherDevice("d2".into()))
        );
        for filter in [
            "#",
            "$iothub/#",
            "devices/d1/#",
            "devices/+/messages/devicebound/#",
            "$iothub/twin/res/+",
        ] {
            let err = parse_subscription(filter, "d1").unwrap_err();
            assert!(
                matches!(err, TopicError::NotAllowed(_) | TopicError::OtherDevice(_)),
                "{filter}"
            );
        }
        assert_eq!(
            parse_subscription("devices/d1/#", "d1"),
            Err(TopicError::NotAllowed("devices/d1/#".into()))
        );
    }

    #[test]
    fn agent_parses_cloud_publishes() {
        assert_eq!(
            parse_cloud_publish("$iothub/twin/res/204/?$rid=3&$version=12", "d1").unwrap(),
            CloudPublish::TwinResponse {
                status: 204,
                rid: "3".into(),
                version: Some(12)
            }
        );
        assert_eq!(
            parse_cloud_publish("$iothub/twin/PATCH/properties/desired/?$version=8", "d1").unwrap(),
            CloudPublish::DesiredPatch { version: Some(8) }
        );
        assert_eq!(
            parse_cloud_publish("$iothub/twin/PATCH/properties/desired/", "d1").unwrap(),
            CloudPublish::DesiredPatch { version: None }
        );
        assert_eq!(
            parse_cloud_publish("$iothub/methods/POST/comp*reboot/?$rid=1", "d1").unwrap(),
            CloudPublish::MethodRequest {
                name: "comp*reboot".into(),
                rid: "1".into()
            }
        );
        let c2d = parse_cloud_publish(
            "devices/d1/messages/devicebound/%24.to=%2Fdevices%2Fd1%2Fmessages%2FdeviceBound&flag&e=",
            "d1",
        )
        .unwrap();
        let CloudPublish::CloudToDevice { properties } = c2d else {
            panic!("{c2d:?}")
        };
        assert_eq!(
            properties.get("$.to"),
            Some("/devices/d1/messages/deviceBound")
        );
        assert_eq!(properties.get_entry("flag"), Some(None));
        assert_eq!(properties.get_entry("e"), Some(Some("")));
        assert_eq!(
            parse_cloud_publish("devices/d2/messages/devicebound/", "d1"),
            Err(TopicError::OtherDevice("d2".into()))
        );
        let bad_version = "$iothub/twin/PATCH/properties/desired/?$version=x";
        assert_eq!(
            parse_cloud_publish(bad_version, "d1"),
            Err(TopicError::InvalidVersion(bad_version.into()))
        );
        let bad_status = "$iothub/twin/res/-1/?$rid=1";
        assert_eq!(
            parse_cloud_publish(bad_status, "d1"),
            Err(TopicError::InvalidStatus(bad_status.into()))
        );
        for topic in [
            "$iothub/methods/POST//?$rid=1",
            "$iothub/methods/res/200/?$rid=1",
            "devices/d1/messages/events/",
        ] {
            assert_eq!(
                parse_cloud_publish(topic, "d1"),
                Err(TopicError::NotAllowed(topic.into())),
                "{topic}"
            );
        }
    }

    fn device_id() -> impl Strategy<Value = String> {
        "[A-Za-z0-9:._%*=!'-]{1,20}"
    }

    fn bag_strategy() -> impl Strategy<Value = PropertyBag> {
        proptest::collection::vec((".+", proptest::option::of(".*")), 0..5)
            .prop_map(|entries| entries.into_iter().collect())
    }

    proptest! {
        #[test]
        fn device_topics_round_trip(
            id in device_id(),
            properties in bag_strategy(),
            rid in ".+",
            status in any::<i32>(),
        ) {
            prop_assert_eq!(
                parse_device_publish(&telemetry_topic(&id, &properties), &id).unwrap(),
                DevicePublish::Telemetry { properties: properties.clone() }
            );
            prop_assert_eq!(
                parse_device_publish(&twin_get_topic(&rid), &id).unwrap(),
                DevicePublish::TwinGet { rid: rid.clone() }
            );
            prop_assert_eq!(
                parse_device_publish(&twin_reported_patch_topic(&rid), &id).unwrap(),
                DevicePublish::TwinReportedPatch { rid: rid.clone() }
            );
            prop_assert_eq!(
                parse_device_publish(&method_response_topic(status, &rid), &id).unwrap(),
                DevicePublish::MethodResponse { status, rid: rid.clone() }
            );
            prop_assert_eq!(parse_subscription(&c2d_filter(&id), &id).unwrap(), SubscriptionKind::CloudToDevice);
        }

        #[test]
        fn cloud_topics_round_trip(
            id in device_id(),
            properties in bag_strategy(),
            rid in ".+",
            status in any::<u16>(),
            version in proptest::option::of(any::<u64>()),
            name in "[A-Za-z0-9_*.-]{1,30}",
        ) {
            prop_assert_eq!(
                parse_cloud_publish(&twin_response_topic(status, &rid, version), &id).unwrap(),
                CloudPublish::TwinResponse { status, rid: rid.clone(), version }
            );
            let v = version.unwrap_or(1);
            prop_assert_eq!(
                parse_cloud_publish(&desired_patch_topic(v), &id).unwrap(),
                CloudPublish::DesiredPatch { version: Some(v) }
            );
            prop_assert_eq!(
                parse_cloud_publish(&method_request_topic(&name, &rid), &id).unwrap(),
                CloudPublish::MethodRequest { name, rid: rid.clone() }
            );
            prop_assert_eq!(
                parse_cloud_publish(&c2d_topic(&id, &properties), &id).unwrap(),
                CloudPublish::CloudToDevice { properties }
            );
        }

        #[test]
        fn another_device_never_parses_as_own(id in device_id(), other in device_id(), properties in bag_strategy()) {
            prop_assume!(id != other);
            prop_assert_eq!(
                parse_device_publish(&telemetry_topic(&other, &properties), &id),
                Err(TopicError::OtherDevice(other.clone()))
            );
            prop_assert_eq!(
                parse_subscription(&c2d_filter(&other), &id),
                Err(TopicError::OtherDevice(other))
            );
        }
    }
}
