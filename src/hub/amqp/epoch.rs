//! Exclusive (epoch) receivers, per consumer group and partition, as Event Hubs has them: a
//! receiver with `com.microsoft:epoch` E disconnects every receiver there with a lower epoch
//! and every receiver without one; one with a lower epoch than the holder's, or one without an
//! epoch while an epoch receiver holds the partition, is refused. An equal epoch takes over
//! (a restarted consumer reclaims its partition). Receivers without an epoch are at most
//! [`MAX_RECEIVERS`] per consumer group and partition, Event Hubs' quota: the next one is
//! refused (`QuotaExceeded`). Epoch receivers are not counted against it: one with an epoch
//! disconnects the others, so the partition never holds more than it. Pure bookkeeping: no I/O.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

type Key = (String, u32);

/// Receivers per consumer group and partition, as on Event Hubs.
pub const MAX_RECEIVERS: usize = 5;

struct Holder {
    id: u64,
    epoch: Option<i64>,
    kick: CancellationToken,
    kicked_by: Arc<Mutex<Option<i64>>>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    slots: HashMap<Key, Vec<Holder>>,
}

/// Every receiver of every (consumer group, partition).
#[derive(Clone, Default)]
pub struct Epochs(Arc<Mutex<Inner>>);

/// A receiver's place; dropping it leaves. `kicked` fires when a higher epoch takes over.
pub struct Lease {
    epochs: Epochs,
    key: Key,
    id: u64,
    pub kicked: CancellationToken,
    /// The epoch whose arrival fired `kicked`.
    pub kicked_by: Arc<Mutex<Option<i64>>>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(
        "a receiver with the higher epoch {holder} holds the partition; epoch {asked} is refused"
    )]
    LowerEpoch { asked: i64, holder: i64 },
    #[error("a receiver with epoch {holder} holds the partition; a receiver without an epoch is refused")]
    NoEpoch { holder: i64 },
    /// Event Hubs' message (its receivers have no identifier here: `nil`, as it writes them).
    #[error(
        "Exceeded the maximum number of allowed receivers per partition in a consumer group which is {max}. List of connected receivers - {}.",
        vec!["nil"; *.max].join(", ")
    )]
    QuotaExceeded { max: usize },
}

impl Epochs {
    /// Joins a partition's receivers (consumer group compared case-insensitively).
    pub fn join(
        &self,
        consumer_group: &str,
        partition: u32,
        epoch: Option<i64>,
    ) -> Result<Lease, Refused> {
        let key = (consumer_group.to_ascii_lowercase(), partition);
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let holder_epoch = inner
            .slots
            .get(&key)
            .and_then(|holders| holders.iter().filter_map(|h| h.epoch).max());
        match (epoch, holder_epoch) {
            (Some(asked), Some(holder)) if asked < holder => {
                return Err(Refused::LowerEpoch { asked, holder })
            }
            (None, Some(holder)) => return Err(Refused::NoEpoch { holder }),
            (None, None) if inner.slots.get(&key).map_or(0, Vec::len) >= MAX_RECEIVERS => {
                return Err(Refused::QuotaExceeded { max: MAX_RECEIVERS })
            }
            _ => {}
        }
        if let Some(asked) = epoch {
            if let Some(holders) = inner.slots.get_mut(&key) {
                holders.retain(|h| {
                    let stays = h.epoch.is_some_and(|e| e > asked);
                    if !stays {
                        // The kicked receiver reads who kicked it when it detaches.
                        *h.kicked_by.lock().unwrap_or_else(|p| p.into_inner()) = Some(asked);
                        h.kick.cancel();
                    }
                    stays
                });
            }
        }
        let kicked_by = Arc::new(Mutex::new(None));
        inner.next_id += 1;
        let id = inner.next_id;
        let kick = CancellationToken::new();
        inner.slots.entry(key.clone()).or_default().push(Holder {
            id,
            epoch,
            kick: kick.clone(),
            kicked_by: kicked_by.clone(),
        });
        Ok(Lease {
            epochs: self.clone(),
            key,
            id,
            kicked: kick,
            kicked_by,
        })
    }

    /// Receivers on a (consumer group, partition) now.
    pub fn count(&self, consumer_group: &str, partition: u32) -> usize {
        let inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .slots
            .get(&(consumer_group.to_ascii_lowercase(), partition))
            .map_or(0, Vec::len)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut inner = self.epochs.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(holders) = inner.slots.get_mut(&self.key) {
            holders.retain(|h| h.id != self.id);
            if holders.is_empty() {
                inner.slots.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_receivers_per_group_and_partition_and_an_epoch_takes_over_from_them() {
        let epochs = Epochs::default();
        let five: Vec<Lease> = (0..MAX_RECEIVERS)
            .map(|_| epochs.join("$Default", 0, None).unwrap())
            .collect();
        let refused = epochs.join("$default", 0, None).err();
        assert_eq!(refused, Some(Refused::QuotaExceeded { max: 5 }));
        assert!(refused
            .unwrap()
            .to_string()
            .contains("which is 5. List of connected receivers - nil, nil, nil, nil, nil."));
        assert!(
            epochs.join("$Default", 1, None).is_ok(),
            "another partition"
        );
        assert!(epochs.join("other", 0, None).is_ok(), "another group");
        let epoch = epochs.join("$Default", 0, Some(1)).unwrap();
        assert!(
            five.iter().all(|l| l.kicked.is_cancelled()),
            "the epoch receiver takes over"
        );
        drop(five);
        drop(epoch);
        assert!(
            epochs.join("$Default", 0, None).is_ok(),
            "a place is free again"
        );
    }

    #[test]
    fn a_higher_epoch_kicks_and_a_lower_one_is_refused() {
        let epochs = Epochs::default();
        let plain = epochs.join("$Default", 0, None).unwrap();
        let other_partition = epochs.join("$Default", 1, None).unwrap();
        let first = epochs.join("$default", 0, Some(1)).unwrap();
        assert!(
            plain.kicked.is_cancelled(),
            "a receiver without epoch is kicked"
        );
        assert!(!other_partition.kicked.is_cancelled());
        assert_eq!(
            epochs.join("$Default", 0, None).err(),
            Some(Refused::NoEpoch { holder: 1 })
        );
        let second = epochs.join("$Default", 0, Some(2)).unwrap();
        assert!(first.kicked.is_cancelled());
        assert_eq!(*first.kicked_by.lock().unwrap(), Some(2));
        assert_eq!(
            epochs.join("$Default", 0, Some(1)).err(),
            Some(Refused::LowerEpoch {
                asked: 1,
                holder: 2
            })
        );
        assert!(!second.kicked.is_cancelled());
        let other_group = epochs.join("cg2", 0, None).unwrap();
        assert!(!other_group.kicked.is_cancelled(), "groups are apart");
        drop(plain);
        drop(first);
        assert_eq!(epochs.count("$Default", 0), 1);
        drop(second);
        assert_eq!(epochs.count("$Default", 0), 0);
        assert!(epochs.join("$Default", 0, None).is_ok(), "free again");
    }
}
