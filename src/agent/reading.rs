//! One telemetry reading as it travels from the producer through the outbox (and its file) to
//! the hub: plain data and the message properties it is published with. Knows nothing of
//! where it is kept or how it is sent.

use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::protocol::property_bag::PropertyBag;

#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    pub seq: u64,
    pub message_id: String,
    pub created: DateTime<Utc>,
    pub body: Bytes,
}

impl Reading {
    /// The telemetry property bag: JSON content type and encoding (so hub routing can read
    /// the body), the message id, and the creation time.
    pub fn properties(&self) -> PropertyBag {
        let mut bag = PropertyBag::new();
        bag.insert("$.mid", self.message_id.clone());
        bag.insert("$.ct", "application/json");
        bag.insert("$.ce", "utf-8");
        bag.insert(
            "iothub-creation-time-utc",
            self.created
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        );
        bag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_mark_json_and_carry_the_message_id() {
        let reading = Reading {
            seq: 7,
            message_id: "m7".into(),
            created: Utc::now(),
            body: Bytes::from("{}"),
        };
        let bag = reading.properties();
        assert_eq!(bag.get("$.mid"), Some("m7"));
        assert_eq!(bag.get("$.ct"), Some("application/json"));
        assert!(bag.format().contains("%24.ct=application%2Fjson"));
    }
}
