//! The hub's handling of what a device sends over MQTT, packet by packet.
//!
//! Bytes are decoded exactly as `hub::mqtt::connection` does (`rumqttc::Packet::read` in a loop
//! with the hub's `MAX_PACKET_SIZE`, stopping at an incomplete or malformed packet), and every
//! packet that decodes is driven through the same pure protocol code the connection task calls:
//! CONNECT credentials (user name split, `SasToken::parse` + verify, host names), PUBLISH topics
//! (`parse_device_publish`, property-bag size limit), reported-patch bodies (`twin::parse_patch`
//! + `PropertySet::apply_patch`, as `twins::patch_reported`), method answers (parsed as
//! `methods::complete` does), SUBSCRIBE / UNSUBSCRIBE filters (`parse_subscription`), and the
//! answers the hub writes back (PUBACK, SUBACK, UNSUBACK, PINGRESP, twin responses). A leading
//! CONNECT is checked and then taken as accepted; input without one is handled as if the device
//! had connected already, so the fuzzer need not forge a SAS signature to reach the packet loop.
//!
//! Why the pure pieces and not `Connection::handle` itself: `handle` needs a live `HubState`
//! (SQLite store, sessions, registry, tokio), which costs milliseconds to build, keeps state from
//! one input to the next (non-reproducible crashes), and would make the target fuzz SQLite
//! rather than our parsing; the remaining logic in `handle` is a thin dispatch onto exactly the
//! functions called here. The target also asserts the hub's isolation rules: what the hub
//! accepts from device `door-01` only ever names `door-01`'s own topics.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rumqttc::{Packet, PingResp, PubAck, Publish, QoS, SubAck, SubscribeReasonCode, UnsubAck};
use serde_json::Value;
use simdevice::hub::auth::HostNames;
use simdevice::hub::mqtt::connection::{MAX_MESSAGE_SIZE, MAX_PACKET_SIZE};
use simdevice::protocol::sas::{self, SasToken};
use simdevice::protocol::topic::{
    c2d_filter, parse_cloud_publish, parse_device_publish, parse_subscription, twin_response_topic,
    CloudPublish, DevicePublish, SubscriptionKind,
};
use simdevice::protocol::twin::{self, PropertySet, Section};

const DEVICE: &str = "door-01";
const NOW: &str = "2026-01-01T00:00:00Z";
/// A fixed device key (base64), as a registered device would have.
const DEVICE_KEY: &str = "c2ltZGV2aWNlLWZ1enotZGV2aWNlLWtleS0wMDAwMDA=";
const GROUP_KEY: &str = "c2ltZGV2aWNlLWZ1enotZ3JvdXAta2V5LTAwMDAwMDA=";

struct Hub {
    /// Whether a packet was handled already: only the first may be CONNECT.
    started: bool,
    out: BytesMut,
    reported: PropertySet,
    hosts: HostNames,
}

fuzz_target!(|data: &[u8]| {
    let mut inbuf = BytesMut::from(data);
    let mut hub = Hub {
        started: false,
        out: BytesMut::new(),
        reported: PropertySet::new(NOW),
        hosts: HostNames::new(&["hub.example.net".to_string()], 8443),
    };
    // As `Connection::handle_buffered`: every complete packet, until one is incomplete or
    // malformed, or the hub closes the connection.
    while let Ok(packet) = Packet::read(&mut inbuf, MAX_PACKET_SIZE) {
        if hub.handle(packet).is_err() {
            break;
        }
    }
});

impl Hub {
    fn handle(&mut self, packet: Packet) -> Result<(), String> {
        let first = !std::mem::replace(&mut self.started, true);
        match packet {
            Packet::Connect(connect) => {
                let login = connect.login.as_ref();
                check_credentials(
                    &self.hosts,
                    &connect.client_id,
                    login.map(|l| l.username.as_str()),
                    login.map(|l| l.password.as_str()),
                );
                // The first CONNECT is taken as accepted, so that what follows it is fuzzed
                // too; a later one is a violation.
                if first {
                    Ok(())
                } else {
                    Err("a second CONNECT".into())
                }
            }
            Packet::Publish(publish) => self.on_publish(publish),
            Packet::PubAck(_) => Ok(()),
            Packet::Subscribe(subscribe) => {
                let mut codes = Vec::with_capacity(subscribe.filters.len());
                for filter in &subscribe.filters {
                    let kind = parse_subscription(&filter.path, DEVICE)
                        .map_err(|e| format!("subscription refused: {e}"))?;
                    if kind == SubscriptionKind::CloudToDevice {
                        assert_eq!(
                            filter.path,
                            c2d_filter(DEVICE),
                            "foreign C2D filter accepted"
                        );
                    }
                    let granted = match filter.qos {
                        QoS::AtMostOnce => QoS::AtMostOnce,
                        _ => QoS::AtLeastOnce,
                    };
                    codes.push(SubscribeReasonCode::Success(granted));
                }
                let _ = SubAck::new(subscribe.pkid, codes).write(&mut self.out);
                Ok(())
            }
            Packet::Unsubscribe(unsubscribe) => {
                for topic in &unsubscribe.topics {
                    parse_subscription(topic, DEVICE)
                        .map_err(|e| format!("unsubscribe refused: {e}"))?;
                }
                let _ = UnsubAck::new(unsubscribe.pkid).write(&mut self.out);
                Ok(())
            }
            Packet::PingReq => {
                let _ = PingResp.write(&mut self.out);
                Ok(())
            }
            Packet::Disconnect => Err("disconnect".into()),
            _ => Err("unexpected packet".into()),
        }
    }

    fn on_publish(&mut self, publish: Publish) -> Result<(), String> {
        if publish.qos == QoS::ExactlyOnce {
            return Err("QoS 2".into());
        }
        let message =
            parse_device_publish(&publish.topic, DEVICE).map_err(|e| format!("refused: {e}"))?;
        match message {
            DevicePublish::Telemetry { properties } => {
                assert!(
                    publish
                        .topic
                        .starts_with(&format!("devices/{DEVICE}/messages/events")),
                    "telemetry accepted on a foreign topic: {:?}",
                    publish.topic
                );
                let size = publish.payload.len() + properties.size_for_limit();
                if size > MAX_MESSAGE_SIZE {
                    return Err("too large".into());
                }
                self.puback(&publish);
            }
            DevicePublish::TwinGet { rid } => {
                assert!(publish.topic.starts_with("$iothub/twin/GET/"));
                self.puback(&publish);
                let body = serde_json::to_vec(&self.reported.to_json(true)).unwrap_or_default();
                self.twin_response(200, &rid, None, body);
            }
            DevicePublish::TwinReportedPatch { rid } => {
                assert!(publish
                    .topic
                    .starts_with("$iothub/twin/PATCH/properties/reported/"));
                self.puback(&publish);
                let before = self.reported.clone();
                let applied = twin::parse_patch(&publish.payload)
                    .and_then(|patch| self.reported.apply_patch(&patch, Section::Reported, NOW));
                match applied {
                    Ok(()) => {
                        assert_eq!(self.reported.version, before.version + 1);
                        assert!(
                            twin::section_size(&self.reported.properties)
                                <= Section::Reported.size_limit()
                        );
                        let version = self.reported.version;
                        self.twin_response(204, &rid, Some(version), Vec::new());
                    }
                    Err(e) => {
                        assert_eq!(self.reported, before, "a refused patch changed the twin");
                        let body = serde_json::to_vec(
                            &serde_json::json!({ "errorCode": 400, "message": e.to_string() }),
                        )
                        .unwrap_or_default();
                        self.twin_response(400, &rid, None, body);
                    }
                }
            }
            DevicePublish::MethodResponse { status: _, rid } => {
                assert!(publish.topic.starts_with("$iothub/methods/res/"));
                assert!(!rid.is_empty());
                self.puback(&publish);
                // As `methods::parse_payload`: JSON if it parses, else the text.
                let text = String::from_utf8_lossy(&publish.payload);
                if !text.trim().is_empty() {
                    let _: Value = serde_json::from_str(&text)
                        .unwrap_or_else(|_| Value::String(text.into_owned()));
                }
            }
        }
        Ok(())
    }

    fn puback(&mut self, publish: &Publish) {
        if publish.qos == QoS::AtLeastOnce {
            let _ = PubAck::new(publish.pkid).write(&mut self.out);
        }
    }

    /// Builds the twin response as the hub does, and checks the agent reads back the same `$rid`.
    fn twin_response(&mut self, status: u16, rid: &str, version: Option<u64>, body: Vec<u8>) {
        let topic = twin_response_topic(status, rid, version);
        match parse_cloud_publish(&topic, DEVICE) {
            Ok(CloudPublish::TwinResponse {
                status: s,
                rid: r,
                version: v,
            }) => {
                assert_eq!((s, r.as_str(), v), (status, rid, version), "{topic:?}");
            }
            other => panic!("the agent cannot read the hub's twin response {topic:?}: {other:?}"),
        }
        let _ = Publish::new(topic, QoS::AtLeastOnce, body).write(&mut self.out);
    }
}

/// The pure part of `auth::authenticate_device`: user name shape, client id, host names, SAS
/// token parsing and signature checks with fixed keys (no registry).
fn check_credentials(
    hosts: &HostNames,
    client_id: &str,
    username: Option<&str>,
    password: Option<&str>,
) {
    let Some(username) = username else { return };
    let mut parts = username.splitn(3, '/');
    let host = parts.next().unwrap_or_default();
    let Some(device_id) = parts.next() else {
        return;
    };
    if client_id.contains('/') || device_id != client_id {
        return;
    }
    let _ = hosts.accepts(host);
    let Some(password) = password else { return };
    let Ok(token) = SasToken::parse(password) else {
        return;
    };
    if let Some((token_host, token_device)) = token.resource.split_once("/devices/") {
        let _ = hosts.accepts(token_host);
        let _ = token_device == device_id;
    }
    let _ = token.verify_signature(DEVICE_KEY);
    if let Ok(derived) = sas::derive_device_key(GROUP_KEY, device_id) {
        let _ = token.verify_signature(&derived);
    }
    let _ = token.check_expiry(1_767_225_600);
}
