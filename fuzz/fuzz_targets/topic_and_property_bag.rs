//! Topic names, subscription filters, topic queries and property bags, on both sides.
//!
//! No input may panic, and these must hold:
//! - percent-encoding round-trips (`dec(enc(s)) == s`, and `enc(dec(s))` decodes back to `dec(s)`);
//! - a parsed property bag formats and parses back to itself;
//! - the hub never accepts, for device `door-01`, a publish or subscription naming another
//!   device or an undocumented topic (device ids compared raw, never decoded);
//! - every topic a builder writes parses back to what was put in (rid, status, version, name,
//!   properties), so hub and agent cannot drift apart.

#![no_main]

use libfuzzer_sys::fuzz_target;
use simdevice::protocol::encoding::{dec, enc};
use simdevice::protocol::method::validate_method_name;
use simdevice::protocol::property_bag::PropertyBag;
use simdevice::protocol::topic::{
    c2d_filter, c2d_topic, method_request_topic, method_response_topic, parse_cloud_publish,
    parse_device_publish, parse_subscription, telemetry_topic, twin_get_topic,
    twin_reported_patch_topic, twin_response_topic, CloudPublish, DevicePublish, SubscriptionKind,
};

const DEVICE: &str = "door-01";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let s = text.as_ref();
    // A few numbers for the builders, taken from the input so they vary.
    let n = data
        .iter()
        .take(8)
        .fold(0u64, |acc, b| acc.rotate_left(8) ^ u64::from(*b));

    encoding(s);
    property_bag(s);
    hub_side(s);
    let _ = parse_cloud_publish(s, DEVICE);
    builders(s, n);
});

fn encoding(s: &str) {
    assert_eq!(dec(&enc(s)).as_deref(), Ok(s));
    if let Ok(decoded) = dec(s) {
        assert_eq!(dec(&enc(&decoded)), Ok(decoded));
    }
}

fn property_bag(s: &str) {
    let Ok(bag) = PropertyBag::parse(s) else {
        return;
    };
    let formatted = bag.format();
    assert_eq!(
        PropertyBag::parse(&formatted).as_ref(),
        Ok(&bag),
        "{formatted:?}"
    );
    let _ = bag.size_for_limit();
    assert_eq!(
        bag.system_properties().count() + bag.application_properties().count(),
        bag.len()
    );
}

fn hub_side(s: &str) {
    match parse_device_publish(s, DEVICE) {
        Ok(DevicePublish::Telemetry { .. }) => {
            assert!(
                s.starts_with(&format!("devices/{DEVICE}/messages/events")),
                "telemetry accepted on {s:?}"
            );
        }
        Ok(DevicePublish::TwinGet { rid }) => {
            assert!(s.starts_with("$iothub/twin/GET/?"), "{s:?}");
            assert!(!rid.is_empty());
        }
        Ok(DevicePublish::TwinReportedPatch { rid }) => {
            assert!(
                s.starts_with("$iothub/twin/PATCH/properties/reported/?"),
                "{s:?}"
            );
            assert!(!rid.is_empty());
        }
        Ok(DevicePublish::MethodResponse { rid, .. }) => {
            assert!(s.starts_with("$iothub/methods/res/"), "{s:?}");
            assert!(!rid.is_empty());
        }
        Err(_) => {}
    }
    if let Ok(accepted) = parse_device_publish(s, DEVICE) {
        assert!(
            !s.contains(['#', '+', '\0']),
            "wildcard topic accepted: {s:?}"
        );
        let _ = accepted;
    }
    if let Ok(kind) = parse_subscription(s, DEVICE) {
        let expected = match kind {
            SubscriptionKind::TwinResponses => "$iothub/twin/res/#".to_string(),
            SubscriptionKind::DesiredPatches => {
                "$iothub/twin/PATCH/properties/desired/#".to_string()
            }
            SubscriptionKind::Methods => "$iothub/methods/POST/#".to_string(),
            SubscriptionKind::CloudToDevice => c2d_filter(DEVICE),
        };
        assert_eq!(s, expected);
    }
    // The input as another device's id (ids have no `/`): its topics are never this device's.
    if s != DEVICE && !s.contains('/') {
        let foreign = telemetry_topic(s, &PropertyBag::new());
        assert!(
            parse_device_publish(&foreign, DEVICE).is_err(),
            "{foreign:?}"
        );
        assert!(parse_subscription(&c2d_filter(s), DEVICE).is_err(), "{s:?}");
    }
}

fn builders(s: &str, n: u64) {
    let status = (n & 0xffff) as u16;
    let method_status = n as i32;
    let version = (n % 3 != 0).then_some(n >> 2);
    if !s.is_empty() {
        assert_eq!(
            parse_device_publish(&twin_get_topic(s), DEVICE),
            Ok(DevicePublish::TwinGet { rid: s.to_string() })
        );
        assert_eq!(
            parse_device_publish(&twin_reported_patch_topic(s), DEVICE),
            Ok(DevicePublish::TwinReportedPatch { rid: s.to_string() })
        );
        assert_eq!(
            parse_device_publish(&method_response_topic(method_status, s), DEVICE),
            Ok(DevicePublish::MethodResponse {
                status: method_status,
                rid: s.to_string()
            })
        );
        assert_eq!(
            parse_cloud_publish(&twin_response_topic(status, s, version), DEVICE),
            Ok(CloudPublish::TwinResponse {
                status,
                rid: s.to_string(),
                version
            })
        );
    }
    if validate_method_name(s).is_ok() {
        assert_eq!(
            parse_cloud_publish(&method_request_topic(s, "7"), DEVICE),
            Ok(CloudPublish::MethodRequest {
                name: s.to_string(),
                rid: "7".to_string()
            })
        );
    }
    if let Ok(bag) = PropertyBag::parse(s) {
        assert_eq!(
            parse_device_publish(&telemetry_topic(DEVICE, &bag), DEVICE),
            Ok(DevicePublish::Telemetry {
                properties: bag.clone()
            })
        );
        assert_eq!(
            parse_cloud_publish(&c2d_topic(DEVICE, &bag), DEVICE),
            Ok(CloudPublish::CloudToDevice { properties: bag })
        );
    }
}
