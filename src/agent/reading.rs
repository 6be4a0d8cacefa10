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
    /// Application properties a telemetry template gave this reading (empty otherwise), sent
    /// after the agent's own; their names never start with `$` or `iothub-`.
    pub app_properties: PropertyBag,
}

impl Reading {
    /// The telemetry property bag: JSON content type and encoding (so hub routing can read
    /// the body), the message id, the creation time, then the template's properties.
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
        for (key, value) in self.app_properties.iter() {
            bag.insert(key, value.unwrap_or_default());
        }
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
            app_properties: PropertyBag::new(),
        };
        let bag = reading.properties();
        assert_eq!(bag.get("$.mid"), Some("m7"));
        assert_eq!(bag.get("$.ct"), Some("application/json"));
        assert!(bag.format().contains("%24.ct=application%2Fjson"));
        assert_eq!(
            bag.application_properties().count(),
            1,
            "the creation time only"
        );
    }

    #[test]
    fn a_templates_properties_follow_the_agents_own() {
        let mut app_properties = PropertyBag::new();
        app_properties.insert("alert", "high");
        let reading = Reading {
            seq: 1,
            message_id: "m1".into(),
            created: Utc::now(),
            body: Bytes::from("{}"),
            app_properties,
        };
        let bag = reading.properties();
        assert_eq!(bag.get("alert"), Some("high"));
        assert_eq!(bag.get("$.ct"), Some("application/json"));
        assert_eq!(bag.get("$.ce"), Some("utf-8"));
        assert_eq!(bag.iter().last(), Some(("alert", Some("high"))));
    }
}
