//! Readings between the sensor and the hub. A reading enters when it is produced and leaves
//! only when the hub has acknowledged it (PUBACK), so a disconnect loses nothing: what was in
//! flight goes back to the front of the queue, in `seq` order, and is sent again with its
//! original `$.mid` (at-least-once; consumers de-duplicate by message id).
//!
//! Durable when it has a [`Store`]: [`Outbox::push`] waits until the reading is committed to
//! SQLite before the connection task can see it (together with the deletion of the readings
//! it pushes out, and of those acknowledged since the last push), and [`Outbox::acknowledge`]
//! deletes it there (without waiting: the store commits it with the next insert). After a crash the agent [`Outbox::restore`]s what the file holds,
//! so unacknowledged readings go out first, in order, with their original `seq` and `$.mid`.
//! The queue in memory mirrors the file, so `take_next` never touches the disk. When a write
//! fails the store turns itself off and the outbox carries on in memory: nothing it holds is
//! lost while the process runs.
//!
//! Bounded: when `capacity` readings are held, the oldest reading not in flight is dropped;
//! readings waiting longer than `max_age` are dropped too. Both are returned to the caller,
//! which counts and warns. The connection task only uses `take_next`, `acknowledge` and
//! `requeue_in_flight`.

use std::collections::VecDeque;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use super::reading::Reading;
use super::state::Store;

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Reading>,
    in_flight: Vec<Reading>,
}

/// Readings dropped by [`Outbox::push`] or [`Outbox::restore`].
#[derive(Debug, Default)]
pub struct Dropped {
    /// The oldest waiting readings, dropped to make room.
    pub full: Vec<Reading>,
    /// Readings older than the maximum age.
    pub expired: Vec<Reading>,
}

impl Dropped {
    pub fn is_empty(&self) -> bool {
        self.full.is_empty() && self.expired.is_empty()
    }

    pub fn len(&self) -> usize {
        self.full.len() + self.expired.len()
    }

    fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.full.iter().chain(&self.expired).map(|r| r.seq)
    }
}

pub struct Outbox {
    capacity: usize,
    max_age: Option<chrono::Duration>,
    store: Option<Store>,
    queue: Mutex<Queue>,
    /// Woken when a reading arrives.
    pub ready: Notify,
    /// Woken when a reading is acknowledged (room for a producer that waits instead of
    /// dropping: the fleet's `--interval-secs 0`).
    room: Notify,
}

impl Outbox {
    /// An outbox in memory only, with no age limit.
    pub fn new(capacity: usize) -> Outbox {
        Outbox::with_store(capacity, None, None)
    }

    /// `store`: where readings are kept until acknowledged (`None`: memory only).
    pub fn with_store(
        capacity: usize,
        max_age: Option<std::time::Duration>,
        store: Option<Store>,
    ) -> Outbox {
        Outbox {
            capacity: capacity.max(1),
            max_age: max_age.and_then(|age| chrono::Duration::from_std(age).ok()),
            store,
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            room: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether readings are being written to disk (false in memory, or after a failed write).
    pub fn is_durable(&self) -> bool {
        self.store.as_ref().is_some_and(Store::is_durable)
    }

    /// Start-up: the readings found on disk (in `seq` order) go first. Returns those dropped
    /// at once because they are too old or too many.
    pub fn restore(&self, readings: Vec<Reading>, now: DateTime<Utc>) -> Dropped {
        let dropped = {
            let mut queue = self.lock();
            for reading in readings.into_iter().rev() {
                queue.waiting.push_front(reading);
            }
            self.enforce_bounds(&mut queue, now, 0)
        };
        self.forget(&dropped);
        if !self.lock().waiting.is_empty() {
            self.ready.notify_one();
        }
        dropped
    }

    /// Drops expired waiting readings, then the oldest waiting ones until `room` more fit.
    fn enforce_bounds(&self, queue: &mut Queue, now: DateTime<Utc>, room: usize) -> Dropped {
        let mut dropped = Dropped::default();
        if let Some(max_age) = self.max_age {
            while queue
                .waiting
                .front()
                .is_some_and(|r| now.signed_duration_since(r.created) > max_age)
            {
                dropped.expired.extend(queue.waiting.pop_front());
            }
        }
        while queue.waiting.len() + queue.in_flight.len() + room > self.capacity {
            match queue.waiting.pop_front() {
                Some(reading) => dropped.full.push(reading),
                None => break,
            }
        }
        dropped
    }

    fn forget(&self, dropped: &Dropped) {
        if let Some(store) = &self.store {
            if !dropped.is_empty() {
                store.delete(dropped.seqs());
            }
        }
    }

    /// Adds a reading, on disk first when the outbox is durable (if that write fails the
    /// reading is kept in memory all the same). Returns the readings dropped to respect the
    /// bounds; their deletion is committed with the insert.
    pub async fn push(&self, reading: Reading) -> Dropped {
        let dropped = {
            let mut queue = self.lock();
            self.enforce_bounds(&mut queue, Utc::now(), 1)
        };
        self.forget(&dropped);
        if let Some(store) = &self.store {
            store.insert(&reading).await;
        }
        self.lock().waiting.push_back(reading);
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

    /// The hub accepted the reading with this `seq`: it is forgotten, on disk too.
    pub fn acknowledge(&self, seq: u64) -> bool {
        let found = {
            let mut queue = self.lock();
            let before = queue.in_flight.len();
            queue.in_flight.retain(|r| r.seq != seq);
            queue.in_flight.len() != before
        };
        if found {
            if let Some(store) = &self.store {
                store.delete([seq]);
            }
            self.room.notify_waiters();
        }
        found
    }

    /// Waits until fewer than `readings` are waiting or in flight.
    pub async fn wait_for_room(&self, readings: usize) {
        loop {
            let room = self.room.notified();
            if self.len() < readings {
                return;
            }
            room.await;
        }
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
    use bytes::Bytes;

    fn reading(seq: u64) -> Reading {
        Reading {
            seq,
            message_id: format!("m{seq}"),
            created: Utc::now(),
            body: Bytes::from("{}"),
            app_properties: Default::default(),
        }
    }

    fn seqs(outbox: &Outbox) -> Vec<u64> {
        std::iter::from_fn(|| outbox.take_next())
            .map(|r| r.seq)
            .collect()
    }

    #[tokio::test]
    async fn unacknowledged_readings_come_back_in_order() {
        let outbox = Outbox::new(10);
        for seq in 1..=4 {
            outbox.push(reading(seq)).await;
        }
        assert_eq!(outbox.take_next().unwrap().seq, 1);
        assert_eq!(outbox.take_next().unwrap().seq, 2);
        assert_eq!(outbox.take_next().unwrap().seq, 3);
        assert!(outbox.acknowledge(2));
        assert!(!outbox.acknowledge(2));
        outbox.requeue_in_flight();
        assert_eq!(seqs(&outbox), vec![1, 3, 4]);
    }

    #[tokio::test]
    async fn a_full_outbox_drops_the_oldest_waiting_reading() {
        let outbox = Outbox::new(3);
        outbox.push(reading(1)).await;
        outbox.push(reading(2)).await;
        assert_eq!(outbox.take_next().unwrap().seq, 1);
        outbox.push(reading(3)).await;
        let dropped = outbox.push(reading(4)).await;
        assert_eq!(dropped.full.len(), 1);
        assert_eq!(dropped.full[0].seq, 2, "the in-flight reading is kept");
        assert_eq!(outbox.len(), 3);
    }

    #[tokio::test]
    async fn readings_older_than_the_maximum_age_are_dropped() {
        let outbox = Outbox::with_store(10, Some(std::time::Duration::from_secs(60)), None);
        let old = Reading {
            created: Utc::now() - chrono::Duration::seconds(120),
            ..reading(1)
        };
        let dropped = outbox.restore(vec![old, reading(2)], Utc::now());
        assert_eq!(dropped.expired.len(), 1);
        assert_eq!(dropped.expired[0].seq, 1);
        assert!(dropped.full.is_empty());
        assert_eq!(seqs(&outbox), vec![2]);
    }

    #[tokio::test]
    async fn a_durable_outbox_gives_back_what_was_not_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let (store, _) = Store::open(&path, "d", Default::default()).unwrap();
        let outbox = Outbox::with_store(3, None, Some(store.clone()));
        assert!(outbox.is_durable());
        for seq in 1..=4 {
            outbox.push(reading(seq)).await;
        }
        // 1 was dropped (full); 2 goes out and is acknowledged, 3 is in flight at the "crash".
        assert_eq!(outbox.take_next().unwrap().seq, 2);
        assert!(outbox.acknowledge(2));
        assert_eq!(outbox.take_next().unwrap().seq, 3);
        store.close().await;

        let (store, persisted) = Store::open(&path, "d", Default::default()).unwrap();
        let found: Vec<(u64, String)> = persisted
            .readings
            .iter()
            .map(|r| (r.seq, r.message_id.clone()))
            .collect();
        assert_eq!(found, vec![(3, "m3".to_string()), (4, "m4".to_string())]);
        assert_eq!(persisted.next_seq, 5);
        let outbox = Outbox::with_store(3, None, Some(store));
        assert!(outbox.restore(persisted.readings, Utc::now()).is_empty());
        assert_eq!(seqs(&outbox), vec![3, 4]);
    }
}
