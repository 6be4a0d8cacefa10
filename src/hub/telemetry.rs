//! Telemetry the hub has accepted, as `GET /simdevice/events` shows it: a hub-wide count and
//! a bounded ring of the newest events. The ring holds the event store's own records
//! (`hub::events`), shared, not copies: there is one record of what was accepted, and this is a
//! hub-wide index of its newest entries, numbered across partitions for the extension's
//! `after` cursor.
//!
//! The ring keeps the newest `capacity` events; when it is full the oldest is dropped and
//! counted (`dropped`), because it exists for inspection (tests, `simdevice service events`).
//! Bodies are kept as received and rendered only when read.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

use crate::hub::events::StoredEvent;

/// One accepted device-to-cloud message in the ring: the store's event, its partition, and
/// its hub-wide number.
#[derive(Clone, Debug)]
pub struct Event {
    pub sequence_number: u64,
    pub partition: u32,
    pub stored: Arc<StoredEvent>,
}

impl Event {
    /// The JSON form served by `GET /simdevice/events`: system properties (the device's `$.`
    /// properties plus the hub's stamps), application properties, and the body (JSON when it
    /// parses as JSON, otherwise a UTF-8 string, otherwise base64); with the event's partition,
    /// its sequence number and offset there.
    pub fn to_json(&self) -> Value {
        let record = &self.stored.record;
        let enqueued = self
            .stored
            .enqueued_time()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut system = Map::new();
        for (key, value) in record.properties.system_properties() {
            system.insert(system_property_name(key), json!(value));
        }
        system.insert(
            "iothub-connection-device-id".into(),
            json!(&*record.device_id),
        );
        system.insert(
            "iothub-connection-auth-method".into(),
            json!(record.auth.as_json()),
        );
        system.insert("iothub-enqueuedtime".into(), json!(enqueued));
        system.insert(
            "x-opt-sequence-number".into(),
            json!(record.sequence_number),
        );
        system.insert("x-opt-offset".into(), json!(self.stored.offset.to_string()));
        let mut properties = Map::new();
        for (key, value) in record.properties.application_properties() {
            properties.insert(key.to_string(), json!(value));
        }
        let body = match serde_json::from_slice::<Value>(&record.body) {
            Ok(value) => value,
            Err(_) => match std::str::from_utf8(&record.body) {
                Ok(text) => json!(text),
                Err(_) => {
                    use base64::Engine;
                    json!(base64::engine::general_purpose::STANDARD.encode(&record.body))
                }
            },
        };
        json!({
            "sequenceNumber": self.sequence_number,
            "partitionId": self.partition.to_string(),
            "deviceId": &*record.device_id,
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
    /// The next hub-wide number; numbering starts at 1.
    next_sequence: AtomicU64,
    dropped: AtomicU64,
}

impl Telemetry {
    pub fn new(capacity: usize) -> Self {
        Telemetry {
            capacity,
            recent: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            next_sequence: AtomicU64::new(1),
            dropped: AtomicU64::new(0),
        }
    }

    /// Keeps events the store has accepted (in `partition`, in its order) in the ring,
    /// numbered: one lock for the run of messages a connection stored at once.
    pub fn keep(&self, partition: u32, stored: impl IntoIterator<Item = Arc<StoredEvent>>) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        for stored in stored {
            if recent.len() >= self.capacity {
                recent.pop_front();
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            // Numbered under the lock, so the ring is in number order.
            let sequence_number = self.next_sequence.fetch_add(1, Ordering::Relaxed);
            recent.push_back(Event {
                sequence_number,
                partition,
                stored,
            });
        }
    }

    /// The ring's events, oldest first, optionally of one device and after a number.
    pub fn recent(&self, device_id: Option<&str>, after: u64, limit: usize) -> Vec<Event> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent
            .iter()
            .filter(|e| e.sequence_number > after)
            .filter(|e| device_id.is_none_or(|id| &*e.stored.record.device_id == id))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Accepted messages since the hub started.
    pub fn total(&self) -> u64 {
        self.next_sequence.load(Ordering::Relaxed) - 1
    }

    /// Events in the ring now.
    pub fn buffered(&self) -> usize {
        self.recent.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::hub::events::segment::Record;
    use crate::protocol::property_bag::PropertyBag;

    fn stored(device: &str, n: u32) -> Arc<StoredEvent> {
        Arc::new(StoredEvent {
            offset: u64::from(n) * 100,
            record: Record {
                source: crate::hub::events::Source::Telemetry,
                auth: crate::hub::events::AuthMethod::Sas,
                sequence_number: i64::from(n),
                enqueued_ms: 1_700_000_000_000,
                device_id: Arc::from(device),
                generation_id: Arc::from("g"),
                properties: PropertyBag::default(),
                body: Bytes::from(format!("{{\"n\":{n}}}")),
            },
        })
    }

    #[test]
    fn buffer_keeps_the_newest_and_counts_what_it_drops() {
        let telemetry = Telemetry::new(2);
        for i in 0..3 {
            telemetry.keep(0, [stored("d1", i)]);
        }
        let events = telemetry.recent(None, 0, 10);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].to_json()["body"]["n"], 1);
        assert_eq!(
            events[0].to_json()["systemProperties"]["x-opt-offset"],
            "100"
        );
        assert_eq!(telemetry.dropped(), 1);
        assert_eq!(telemetry.total(), 3);
        assert!(telemetry.recent(Some("d2"), 0, 10).is_empty());
        assert_eq!(telemetry.recent(None, 2, 10).len(), 1);
    }
}
