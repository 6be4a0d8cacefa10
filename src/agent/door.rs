//! The simulated door lock behind `lockDoor` / `unlockDoor`, as data: its state, the
//! `lockTime` parser, the reported-properties shape and the pure unlock-time rule. No I/O, no
//! tasks: the live value (and its saving) is `door_cell`'s, the storage format is `state`'s.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

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

    /// Whether the lock time has passed at `now`: the door must unlock itself.
    pub fn unlock_due(&self, now: DateTime<Utc>) -> bool {
        self.unlock_at.is_some_and(|at| at <= now)
    }

    /// How long from `now` until the door unlocks itself (zero when due); `None` when it never
    /// does (unlocked, or locked until `unlockDoor`).
    pub fn time_to_unlock(&self, now: DateTime<Utc>) -> Option<Duration> {
        self.unlock_at
            .map(|at| (at - now).to_std().unwrap_or(Duration::ZERO))
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

/// The longest lock time accepted.
const MAX_LOCK_TIME_SECS: u64 = 7 * 86_400;

/// Why a `lockTime` was refused; the message names the value and what would do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LockTimeError {
    #[error("lockTime {0:?} is not a number followed by s, m, h or d")]
    NotANumber(String),
    #[error("lockTime {text:?} has unit {unit:?}; use s, m, h or d")]
    Unit { text: String, unit: String },
    #[error("lockTime {0:?} must be between 1 s and 7 days")]
    OutOfRange(String),
}

/// Parses a lock time such as `"10m"`, `"30s"`, `"2h"`, `"1d"` or `"90"` (seconds); at most 7 days.
pub fn parse_lock_time(text: &str) -> Result<Duration, LockTimeError> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: u64 = number
        .parse()
        .map_err(|_| LockTimeError::NotANumber(text.to_string()))?;
    let seconds = match unit {
        "s" => value,
        "m" => value.saturating_mul(60),
        "h" => value.saturating_mul(3600),
        "d" => value.saturating_mul(86_400),
        _ => {
            return Err(LockTimeError::Unit {
                text: text.to_string(),
                unit: unit.to_string(),
            })
        }
    };
    if seconds == 0 || seconds > MAX_LOCK_TIME_SECS {
        return Err(LockTimeError::OutOfRange(text.to_string()));
    }
    Ok(Duration::from_secs(seconds))
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
        assert!(matches!(
            parse_lock_time(""),
            Err(LockTimeError::NotANumber(_))
        ));
        assert!(matches!(
            parse_lock_time("10 minutes"),
            Err(LockTimeError::Unit { .. })
        ));
        assert!(matches!(
            parse_lock_time("0s"),
            Err(LockTimeError::OutOfRange(_))
        ));
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

    #[test]
    fn the_unlock_time_rule() {
        let now = Utc::now();
        let mut door = DoorState::default();
        assert_eq!(
            door.time_to_unlock(now),
            None,
            "unlocked: nothing to wait for"
        );
        door.lock(now, None);
        assert_eq!(door.time_to_unlock(now), None, "until unlockDoor");
        assert!(!door.unlock_due(now + chrono::Duration::days(30)));
        door.lock(now, Some(Duration::from_secs(60)));
        assert_eq!(door.time_to_unlock(now), Some(Duration::from_secs(60)));
        assert!(!door.unlock_due(now + chrono::Duration::seconds(59)));
        assert!(door.unlock_due(now + chrono::Duration::seconds(60)));
        assert_eq!(
            door.time_to_unlock(now + chrono::Duration::seconds(90)),
            Some(Duration::ZERO),
            "overdue: at once"
        );
    }
}
