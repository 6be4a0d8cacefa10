//! Fault hooks: ways to make the hub misbehave on purpose, so that tests (`tests/it/faults.rs`)
//! and scripts can check how devices cope. A hub starts with every hook off; nothing is
//! persisted, so a restart turns them all off again.
//!
//! - **Refuse connects** (`refuse_connects_for`): until the deadline, every MQTT CONNECT is
//!   answered with CONNACK 3 (server unavailable) before authentication, and the connection is
//!   closed. Connections already open stay open, as when IoT Hub throttles connects.
//! - **Throttle reported properties** (`throttle_reported_for`): until the deadline, a
//!   reported-properties PATCH is not applied and is answered with status 429 and the body
//!   `{"errorCode":429001,"message":...}` (ThrottlingException), as IoT Hub does over its quota.
//! - **Clock offset** (`set_clock_offset`): seconds added to the hub's notion of now wherever it
//!   judges a SAS token's expiry (device CONNECT, service requests) and for the timer that
//!   closes a device connection when its token expires. Changing it re-arms the timers of open
//!   connections at once, so a jump forward closes every connection whose token the hub now
//!   considers expired. The offset is also applied to service tokens: a jump beyond the
//!   lifetime of the caller's own token locks that caller out until the offset is set back by
//!   someone else, or the hub restarts.
//!
//! - **Throttle bulk registry calls** (`throttle_bulk_registry`, Rust only): the next N
//!   `POST /devices` are answered 429 ThrottlingException with `Retry-After: 1`, as IoT Hub
//!   answers over its registry-operations quota, without being applied.
//!
//! - **Kill an accept loop** (`kill_accept_loop`, Rust only): the MQTT or the API accept loop
//!   ends as if it had died; its port closes and the hub's health turns bad (`Hub::health`,
//!   `/healthz`, the systemd watchdog). It cannot be undone short of a restart, so it is not
//!   offered over REST; it exists so that tests can prove the health check sees a dead loop.
//!
//! Scripts reach the hooks through `POST /simdevice/faults` (see `api/faults.rs`). This module
//! only keeps the hooks' state and counts what they did; `mqtt/connection.rs` and `auth.rs`
//! consult it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::protocol::error_code::ErrorCode;

/// The hub's fault hooks and what they did; shared through `HubState::faults`.
pub struct Faults {
    refuse_connects_until: Mutex<Option<Instant>>,
    throttle_reported_until: Mutex<Option<Instant>>,
    clock_offset: watch::Sender<i64>,
    connects_refused: AtomicU64,
    reported_throttled: AtomicU64,
    bulk_throttles_left: AtomicU64,
    kill_mqtt_accept: CancellationToken,
    kill_api_accept: CancellationToken,
}

/// The hub's listeners, for the accept-loop hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    Mqtt,
    Api,
}

/// What `GET`/`POST /simdevice/faults` answer.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FaultStatus {
    /// Seconds left of refusing connects (0: not refusing).
    pub refuse_connects_secs: f64,
    /// Seconds left of answering reported patches with 429 (0: not throttling).
    pub throttle_reported_secs: f64,
    pub clock_offset_secs: i64,
    /// Connects refused with CONNACK 3 since the hub started.
    pub connects_refused: u64,
    /// Reported patches answered with 429 since the hub started.
    pub reported_throttled: u64,
}

impl Default for Faults {
    fn default() -> Self {
        let (clock_offset, _) = watch::channel(0);
        Faults {
            refuse_connects_until: Mutex::new(None),
            throttle_reported_until: Mutex::new(None),
            clock_offset,
            connects_refused: AtomicU64::new(0),
            reported_throttled: AtomicU64::new(0),
            bulk_throttles_left: AtomicU64::new(0),
            kill_mqtt_accept: CancellationToken::new(),
            kill_api_accept: CancellationToken::new(),
        }
    }
}

fn set_deadline(slot: &Mutex<Option<Instant>>, duration: Duration) {
    let deadline = (!duration.is_zero()).then(|| Instant::now() + duration);
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = deadline;
}

fn remaining(slot: &Mutex<Option<Instant>>) -> Duration {
    slot.lock()
        .unwrap_or_else(|p| p.into_inner())
        .map(|at| at.saturating_duration_since(Instant::now()))
        .unwrap_or_default()
}

impl Faults {
    /// Answers the next `calls` bulk registry calls with 429.
    pub fn throttle_bulk_registry(&self, calls: u64) {
        self.bulk_throttles_left.store(calls, Ordering::Relaxed);
    }

    /// Whether this bulk registry call is to be throttled (uses up one).
    pub fn throttle_bulk(&self) -> bool {
        self.bulk_throttles_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Refuses every CONNECT for `duration` from now; zero stops refusing.
    pub fn refuse_connects_for(&self, duration: Duration) {
        set_deadline(&self.refuse_connects_until, duration);
    }

    /// Whether this CONNECT is to be refused; counts the refusal.
    pub fn refuse_connect(&self) -> bool {
        let refuse = !remaining(&self.refuse_connects_until).is_zero();
        if refuse {
            self.connects_refused.fetch_add(1, Ordering::Relaxed);
        }
        refuse
    }

    /// Answers every reported patch with 429 for `duration` from now; zero stops it.
    pub fn throttle_reported_for(&self, duration: Duration) {
        set_deadline(&self.throttle_reported_until, duration);
    }

    /// Whether this reported patch is to be throttled; counts it.
    pub fn throttle_reported(&self) -> bool {
        let throttle = !remaining(&self.throttle_reported_until).is_zero();
        if throttle {
            self.reported_throttled.fetch_add(1, Ordering::Relaxed);
        }
        throttle
    }

    /// The body of a throttled twin response.
    pub fn throttled_body() -> Vec<u8> {
        let code = ErrorCode::ThrottlingException;
        serde_json::to_vec(&serde_json::json!({
            "errorCode": code.code(),
            "message": format!("{}: the hub is throttling reported-property updates; retry later", code.name()),
        }))
        .unwrap_or_default()
    }

    /// Moves the hub's clock `seconds` away from the system clock (forward when positive).
    pub fn set_clock_offset(&self, seconds: i64) {
        self.clock_offset.send_replace(seconds);
    }

    pub fn clock_offset(&self) -> i64 {
        *self.clock_offset.borrow()
    }

    /// Wakes when the clock offset changes (the expiry timers of connections re-arm).
    pub fn watch_clock(&self) -> watch::Receiver<i64> {
        self.clock_offset.subscribe()
    }

    /// The hub's notion of now, in Unix seconds: the system clock plus the offset.
    pub fn now_unix(&self) -> u64 {
        chrono::Utc::now()
            .timestamp()
            .saturating_add(self.clock_offset())
            .max(0) as u64
    }

    /// When, on the monotonic clock, the hub's clock reaches `unix` (now if it has already).
    pub fn instant_of(&self, unix: u64) -> Instant {
        Instant::now() + Duration::from_secs(unix.saturating_sub(self.now_unix()))
    }

    /// Ends that listener's accept loop as if it had died (see the module notes).
    pub fn kill_accept_loop(&self, listener: Listener) {
        tracing::warn!(?listener, "fault hook: killing an accept loop");
        self.accept_loop_kill(listener).cancel();
    }

    /// Cancelled when the hook kills that listener's accept loop; the loop watches it.
    pub fn accept_loop_kill(&self, listener: Listener) -> CancellationToken {
        match listener {
            Listener::Mqtt => self.kill_mqtt_accept.clone(),
            Listener::Api => self.kill_api_accept.clone(),
        }
    }

    pub fn status(&self) -> FaultStatus {
        FaultStatus {
            refuse_connects_secs: remaining(&self.refuse_connects_until).as_secs_f64(),
            throttle_reported_secs: remaining(&self.throttle_reported_until).as_secs_f64(),
            clock_offset_secs: self.clock_offset(),
            connects_refused: self.connects_refused.load(Ordering::Relaxed),
            reported_throttled: self.reported_throttled.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hooks_are_off_until_set_and_count_what_they_refuse() {
        let faults = Faults::default();
        assert!(!faults.refuse_connect());
        assert!(!faults.throttle_reported());
        faults.refuse_connects_for(Duration::from_secs(60));
        faults.throttle_reported_for(Duration::from_secs(60));
        assert!(faults.refuse_connect());
        assert!(faults.refuse_connect());
        assert!(faults.throttle_reported());
        faults.refuse_connects_for(Duration::ZERO);
        assert!(!faults.refuse_connect());
        let status = faults.status();
        assert_eq!(status.connects_refused, 2);
        assert_eq!(status.reported_throttled, 1);
        assert_eq!(status.refuse_connects_secs, 0.0);
        assert!(status.throttle_reported_secs > 59.0);
    }

    #[tokio::test]
    async fn a_clock_jump_moves_now_and_brings_expiry_forward() {
        let faults = Faults::default();
        let clock = faults.watch_clock();
        let expiry = faults.now_unix() + 100;
        assert!(faults.instant_of(expiry) > Instant::now() + Duration::from_secs(90));
        faults.set_clock_offset(3600);
        assert!(clock.has_changed().unwrap());
        assert!(faults.now_unix() >= expiry + 3500);
        assert!(faults.instant_of(expiry) <= Instant::now());
        let body: serde_json::Value = serde_json::from_slice(&Faults::throttled_body()).unwrap();
        assert_eq!(body["errorCode"], 429001);
        assert!(body["message"].as_str().unwrap().contains("Throttling"));
    }
}
