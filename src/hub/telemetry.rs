//! Telemetry the hub has accepted: per-device counters and a bounded buffer of recent events.
//!
//! The buffer keeps the newest `capacity` events; when it is full the oldest event is dropped
//! and counted (`dropped`), because it exists for inspection (tests, `simdevice service events`),
//! not as a durable queue. Bodies are kept as received and rendered only when read.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::protocol::property_bag::PropertyBag;

/// One accepted device-to-cloud message, stamped by the hub.
#[derive(Clone, Debug)]
pub struct Event {
    pub sequence_number: u64,
    pub device_id: Arc<str>,
    pub enqueued_time: chrono::DateTime<chrono::Utc>,
    pub properties: PropertyBag,
    pub body: Bytes,
}

impl Event {
    /// The JSON form served by `GET /simdevice/events`: system properties (the device's `$.`
    /// properties plus the hub's stamps), application properties, and the body (JSON when it
    /// parses as JSON, otherwise a UTF-8 string, otherwise base64).
    pub fn to_json(&self) -> Value {
        let enqueued = self
            .enqueued_time
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut system = Map::new();
        for (key, value) in self.properties.system_properties() {
            system.insert(system_property_name(key), json!(value));
        }
        system.insert(
            "iothub-connection-device-id".into(),
            json!(&*self.device_id),
        );
        system.insert(
            "iothub-connection-auth-method".into(),
            json!("{\"scope\":\"device\",\"type\":\"sas\",\"issuer\":\"iothub\"}"),
        );
        system.insert("iothub-enqueuedtime".into(), json!(enqueued));
        let mut properties = Map::new();
        for (key, value) in self.properties.application_properties() {
            properties.insert(key.to_string(), json!(value));
        }
        let body = match serde_json::from_slice::<Value>(&self.body) {
            Ok(value) => value,
            Err(_) => match std::str::from_utf8(&self.body) {
                Ok(text) => json!(text),
                Err(_) => {
                    use base64::Engine;
                    json!(base64::engine::general_purpose::STANDARD.encode(&self.body))
                }
            },
        };
        json!({
            "sequenceNumber": self.sequence_number,
            "deviceId": &*self.device_id,
            "enqueuedTime": enqueued,
            "systemProperties": system,
            "properties": properties,
            "body": body,
        })
    }
}

/// Maps the short `$.` names to the names Event Hubs consumers see.
fn system_property_name(short: &str) -> String {
    match short {
        "mid" => "message-id".into(),
        "cid" => "correlation-id".into(),
        "ct" => "content-type".into(),
        "ce" => "content-encoding".into(),
        "sub" => "dt-subject".into(),
        other => other.to_string(),
    }
}

pub struct Telemetry {
    capacity: usize,
    recent: Mutex<VecDeque<Event>>,
    next_sequence: AtomicU64,
    /// Where numbering started: `total` counts from here.
    first_sequence: u64,
    dropped: AtomicU64,
}

impl Telemetry {
    pub fn new(capacity: usize) -> Self {
        let first = 1;
        Telemetry {
            capacity,
            recent: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            next_sequence: AtomicU64::new(first),
            first_sequence: first,
            dropped: AtomicU64::new(0),
        }
    }

    pub fn record(&self, device_id: Arc<str>, properties: PropertyBag, body: Bytes) {
        let event = self.stamp(device_id, properties, body);
        self.keep(event);
    }

    /// The hub's stamps on a message: its sequence number and enqueue time. A message stamped
    /// and then refused (by capture) leaves a gap in the sequence numbers.
    pub fn stamp(&self, device_id: Arc<str>, properties: PropertyBag, body: Bytes) -> Event {
        Event {
            sequence_number: self.next_sequence.fetch_add(1, Ordering::Relaxed),
            device_id,
            enqueued_time: chrono::Utc::now(),
            properties,
            body,
        }
    }

    /// Keeps an accepted, stamped message in the recent-events buffer.
    pub fn keep(&self, event: Event) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() >= self.capacity {
            recent.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        recent.push_back(event);
    }

    /// The buffered events, oldest first, optionally of one device and after a sequence number.
    pub fn recent(&self, device_id: Option<&str>, after: u64, limit: usize) -> Vec<Event> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent
            .iter()
            .filter(|e| e.sequence_number > after)
            .filter(|e| device_id.is_none_or(|id| &*e.device_id == id))
            .take(limit)
            .cloned()
            .collect()
    }

    pub fn total(&self) -> u64 {
        self.next_sequence.load(Ordering::Relaxed) - self.first_sequence
    }

    /// Events in the buffer now.
    pub fn buffered(&self) -> usize {
        self.recent.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_keeps_the_newest_and_counts_what_it_drops() {
        let telemetry = Telemetry::new(2);
        for i in 0..3 {
            telemetry.record(
                Arc::from("d1"),
                PropertyBag::default(),
                Bytes::from(format!("{{\"n\":{i}}}")),
            );
        }
        let events = telemetry.recent(None, 0, 10);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].to_json()["body"]["n"], 1);
        assert_eq!(telemetry.dropped(), 1);
        assert_eq!(telemetry.total(), 3);
        assert!(telemetry.recent(Some("d2"), 0, 10).is_empty());
        assert_eq!(telemetry.recent(None, 2, 10).len(), 1);
    }
}
