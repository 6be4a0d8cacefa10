//! The door's live value, owned in one place: the current [`DoorState`] behind a mutex, a
//! notification when it changes, and the task that unlocks the door when its lock time has
//! passed and writes every change through storage (`state`), so that a restart resumes the
//! door and its unlock timer. Handlers reach it through the handler context; it knows nothing
//! of handlers, MQTT or the outbox.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::door::DoorState;
use super::state::Store;

#[derive(Debug, Default)]
pub struct DoorCell {
    door: Mutex<DoorState>,
    /// Woken when the door changes, so the task re-reads it (its timer, its saving).
    changed: Notify,
}

impl DoorCell {
    fn door(&self) -> MutexGuard<'_, DoorState> {
        self.door.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The door now.
    pub fn get(&self) -> DoorState {
        self.door().clone()
    }

    /// Locks the door (until `unlockDoor` when `lock_time` is `None`); returns the new state.
    pub fn lock(&self, lock_time: Option<Duration>) -> DoorState {
        self.change(|door| door.lock(Utc::now(), lock_time))
    }

    /// Unlocks the door; returns the new state.
    pub fn unlock(&self) -> DoorState {
        self.change(DoorState::unlock)
    }

    /// Puts back the door found in storage at start-up.
    pub fn restore(&self, door: DoorState) {
        self.change(|current| *current = door);
    }

    fn change(&self, f: impl FnOnce(&mut DoorState)) -> DoorState {
        let door = {
            let mut door = self.door();
            f(&mut door);
            door.clone()
        };
        self.changed.notify_waiters();
        door
    }

    /// Until `shutdown`: unlocks the door when its lock time has passed (and hands the new
    /// reported state to `report`), and saves each change to `store`, once more at the end.
    /// Sleeps while nothing changes and no unlock is due.
    pub async fn run(
        &self,
        store: Option<Store>,
        report: impl Fn(Value),
        shutdown: CancellationToken,
    ) {
        let mut saved: Option<DoorState> = None;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let unlocked = {
                let mut door = self.door();
                door.unlock_due(Utc::now()).then(|| {
                    door.unlock();
                    door.reported()
                })
            };
            if let Some(patch) = unlocked {
                tracing::info!("door unlocked: lock time passed");
                report(patch);
            }
            let door = self.get();
            save(store.as_ref(), &mut saved, &door).await;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = &mut changed => {}
                _ = sleep_opt(door.time_to_unlock(Utc::now())) => {}
            }
        }
        save(store.as_ref(), &mut saved, &self.get()).await;
    }
}

/// Writes `door` unless it is what was saved last.
async fn save(store: Option<&Store>, saved: &mut Option<DoorState>, door: &DoorState) {
    if saved.as_ref() == Some(door) {
        return;
    }
    if let Some(store) = store {
        if !store.save_door(door).await {
            tracing::debug!("door state not saved: the outbox is not durable");
        }
    }
    *saved = Some(door.clone());
}

async fn sleep_opt(duration: Option<Duration>) {
    match duration {
        Some(duration) => tokio::time::sleep(duration).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn the_door_unlocks_itself_and_reports_it() {
        let cell = Arc::new(DoorCell::default());
        let (reports_tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (cell, shutdown) = (cell.clone(), shutdown.clone());
            async move {
                cell.run(None, move |patch| drop(reports_tx.send(patch)), shutdown)
                    .await
            }
        });
        let locked = cell.lock(Some(Duration::from_secs(1)));
        assert!(locked.locked);
        let report = tokio::time::timeout(Duration::from_secs(5), reports.recv())
            .await
            .expect("unlocked within the lock time and a margin")
            .expect("a report");
        assert_eq!(report["door"]["locked"], false);
        assert!(!cell.get().locked);
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn every_change_is_saved_and_the_last_one_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let (store, _) = Store::open(&path, "d", Default::default()).unwrap();
        let cell = Arc::new(DoorCell::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (cell, store, shutdown) = (cell.clone(), store.clone(), shutdown.clone());
            async move { cell.run(Some(store), |_| {}, shutdown).await }
        });
        cell.lock(None);
        shutdown.cancel();
        task.await.unwrap();
        store.close().await;
        let (_store, persisted) = Store::open(&path, "d", Default::default()).unwrap();
        let door = persisted.door.expect("saved");
        assert!(door.locked);
        assert_eq!(door.unlock_at, None);
    }
}
