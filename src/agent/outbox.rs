//! Readings between the sensor and the hub. A reading enters when it is produced and leaves
//! only when the hub has acknowledged it (PUBACK), so a disconnect loses nothing: what was in
//! flight goes back to the front of the queue, in `seq` order, and is sent again with its
//! original `$.mid` (at-least-once; consumers de-duplicate by message id).
//!
//! Bounded: when `capacity` readings are held, the oldest reading not in flight is dropped,
//! counted and warned about. This in-memory queue is the seam for the durable on-disk outbox
//! of a later issue: the connection task only uses `take_next`, `acknowledge` and
//! `requeue_in_flight`.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;

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

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Reading>,
    in_flight: Vec<Reading>,
}

pub struct Outbox {
    capacity: usize,
    queue: Mutex<Queue>,
    /// Woken when a reading arrives.
    pub ready: Notify,
}

impl Outbox {
    pub fn new(capacity: usize) -> Outbox {
        Outbox {
            capacity: capacity.max(1),
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a reading; returns the reading dropped to make room, if any.
    pub fn push(&self, reading: Reading) -> Option<Reading> {
        let dropped = {
            let mut queue = self.lock();
            let dropped = if queue.waiting.len() + queue.in_flight.len() >= self.capacity {
                queue.waiting.pop_front()
            } else {
                None
            };
            queue.waiting.push_back(reading);
            dropped
        };
        self.ready.notify_one();
        dropped
    }

    /// The next reading to publish; it counts as in flight until acknowledged or requeued.
    pub fn take_next(&self) -> Option<Reading> {
        let mut queue = self.lock();
        let reading = queue.waiting.pop_front()?;
        queue.in_flight.push(reading.clone());
        Some(reading)
    }

    /// The hub accepted the reading with this `seq`.
    pub fn acknowledge(&self, seq: u64) -> bool {
        let mut queue = self.lock();
        let before = queue.in_flight.len();
        queue.in_flight.retain(|r| r.seq != seq);
        queue.in_flight.len() != before
    }

    /// The connection ended: everything in flight goes back to the front, in `seq` order.
    pub fn requeue_in_flight(&self) {
        let mut queue = self.lock();
        let mut in_flight = std::mem::take(&mut queue.in_flight);
        in_flight.sort_by_key(|r| r.seq);
        for reading in in_flight.into_iter().rev() {
            queue.waiting.push_front(reading);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.lock().in_flight.len()
    }

    pub fn len(&self) -> usize {
        let queue = self.lock();
        queue.waiting.len() + queue.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(seq: u64) -> Reading {
        Reading {
            seq,
            message_id: format!("m{seq}"),
            created: Utc::now(),
            body: Bytes::from("{}"),
        }
    }

    #[test]
    fn unacknowledged_readings_come_back_in_order() {
        let outbox = Outbox::new(10);
        for seq in 1..=4 {
            outbox.push(reading(seq));
        }
        assert_eq!(outbox.take_next().unwrap().seq, 1);
        assert_eq!(outbox.take_next().unwrap().seq, 2);
        assert_eq!(outbox.take_next().unwrap().seq, 3);
        assert!(outbox.acknowledge(2));
        assert!(!outbox.acknowledge(2));
        outbox.requeue_in_flight();
        let order: Vec<u64> = std::iter::from_fn(|| outbox.take_next())
            .map(|r| r.seq)
            .collect();
        assert_eq!(order, vec![1, 3, 4]);
    }

    #[test]
    fn a_full_outbox_drops_the_oldest_waiting_reading() {
        let outbox = Outbox::new(3);
        outbox.push(reading(1));
        outbox.push(reading(2));
        assert_eq!(outbox.take_next().unwrap().seq, 1);
        outbox.push(reading(3));
        let dropped = outbox.push(reading(4)).expect("one dropped");
        assert_eq!(dropped.seq, 2, "the in-flight reading is kept");
        assert_eq!(outbox.len(), 3);
    }

    #[test]
    fn properties_mark_json_and_carry_the_message_id() {
        let bag = reading(7).properties();
        assert_eq!(bag.get("$.mid"), Some("m7"));
        assert_eq!(bag.get("$.ct"), Some("application/json"));
        assert!(bag.format().contains("%24.ct=application%2Fjson"));
    }
}
