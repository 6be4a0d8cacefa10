//! The simulated door lock behind `lockDoor` / `unlockDoor`: its state, the `lockTime`
//! parser, the reported-properties shape, and the task that unlocks the door when its lock
//! time has passed.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::context::HandlerContext;
use super::state::Store;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DoorState {
    pub locked: bool,
    pub locked_at: Option<DateTime<Utc>>,
    /// None while locked means "until unlockDoor".
    pub unlock_at: Option<DateTime<Utc>>,
}

fn iso(time: Option<DateTime<Utc>>) -> Value {
    time.map(|t| json!(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)))
        .unwrap_or(Value::Null)
}

impl DoorState {
    pub fn lock(&mut self, now: DateTime<Utc>, lock_time: Option<Duration>) {
        self.locked = true;
        self.locked_at = Some(now);
        self.unlock_at =
            lock_time.and_then(|d| chrono::Duration::from_std(d).ok().map(|d| now + d));
    }

    pub fn unlock(&mut self) {
        *self = DoorState::default();
    }

    /// `{"door": {"locked", "lockedAt", "unlockAt"}}` for reported properties.
    pub fn reported(&self) -> Value {
        json!({"door": {
            "locked": self.locked,
            "lockedAt": iso(self.locked_at),
            "unlockAt": iso(self.unlock_at),
        }})
    }
}

/// Parses a lock time such as `"10m"`, `"30s"`, `"2h"`, `"1d"` or `"90"` (seconds); at most 7 days.
pub fn parse_lock_time(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: u64 = number
        .parse()
        .map_err(|_| format!("lockTime {text:?} is not a number followed by s, m, h or d"))?;
    let seconds = match unit {
        "s" => value,
        "m" => value.saturating_mul(60),
        "h" => value.saturating_mul(3600),
        "d" => value.saturating_mul(86_400),
        _ => {
            return Err(format!(
                "lockTime {text:?} has unit {unit:?}; use s, m, h or d"
            ))
        }
    };
    if seconds == 0 || seconds > 7 * 86_400 {
        return Err(format!("lockTime {text:?} must be between 1 s and 7 days"));
    }
    Ok(Duration::from_secs(seconds))
}

/// Unlocks the door when its lock time has passed, and reports it.
pub async fn auto_unlock(ctx: HandlerContext, shutdown: CancellationToken) {
    loop {
        let changed = ctx.shared().door_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let unlock_at = ctx.door().unlock_at;
        let wait = match unlock_at {
            Some(at) => (at - Utc::now()).to_std().unwrap_or(Duration::ZERO),
            None => Duration::from_secs(86_400),
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = &mut changed => continue,
            _ = tokio::time::sleep(wait) => {}
        }
        let report = {
            let mut door = ctx.door();
            match door.unlock_at {
                Some(at) if at <= Utc::now() => {
                    door.unlock();
                    Some(door.reported())
                }
                _ => None,
            }
        };
        if let Some(report) = report {
            ctx.shared().door_changed.notify_waiters();
            tracing::info!(device = ctx.device_id(), "door unlocked: lock time passed");
            if let Err(error) = ctx.report(report) {
                tracing::warn!(%error, "door state not reported");
            }
        }
    }
}

/// Saves the door to the agent's state whenever it changes (lockDoor, unlockDoor, the
/// auto-unlock), so a restart resumes it and its unlock timer; a last save at shutdown.
pub async fn persist(ctx: HandlerContext, store: Store, shutdown: CancellationToken) {
    let mut saved: Option<DoorState> = None;
    loop {
        let changed = ctx.shared().door_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let door = ctx.door().clone();
        if saved.as_ref() != Some(&door) {
            if !store.save_door(&door).await {
                tracing::debug!("door state not saved: the outbox is not durable");
            }
            saved = Some(door);
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = &mut changed => {}
        }
    }
    let door = ctx.door().clone();
    if saved.as_ref() != Some(&door) {
        store.save_door(&door).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_times_parse_with_units() {
        assert_eq!(parse_lock_time("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_lock_time("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_lock_time("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_lock_time("90"), Ok(Duration::from_secs(90)));
        assert!(parse_lock_time("").is_err());
        assert!(parse_lock_time("10 minutes").is_err());
        assert!(parse_lock_time("0s").is_err());
        assert!(parse_lock_time("8d").is_err());
        assert!(parse_lock_time("m").is_err());
        assert!(parse_lock_time("99999999999999999999999d").is_err());
    }

    #[test]
    fn reported_shape() {
        let mut door = DoorState::default();
        let now = Utc::now();
        door.lock(now, Some(Duration::from_secs(600)));
        let reported = door.reported();
        assert_eq!(reported["door"]["locked"], true);
        assert!(reported["door"]["unlockAt"].is_string());
        door.unlock();
        assert_eq!(door.reported()["door"]["unlockAt"], Value::Null);
    }

    #[tokio::test]
    async fn the_door_unlocks_itself() {
        let (ctx, mut reports) = HandlerContext::for_tests();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(auto_unlock(ctx.clone(), shutdown.clone()));
        {
            let mut door = ctx.door();
            door.locked = true;
            door.locked_at = Some(Utc::now());
            door.unlock_at = Some(Utc::now() + chrono::Duration::milliseconds(200));
        }
        ctx.shared().door_changed.notify_waiters();
        let report = tokio::time::timeout(Duration::from_secs(5), reports.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(report["door"]["locked"], false);
        shutdown.cancel();
        task.await.unwrap();
    }
}
