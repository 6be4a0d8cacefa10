//! What a handler may use: the device's identity and counters, the door, the telemetry
//! cadence, and a way to report properties. This is the whole surface between handlers and
//! the rest of the agent; handlers never see MQTT.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Notify};

use super::door::DoorState;
use crate::common::exposition::LabelledCounter;

/// Reported patches waiting for the twin task; a full queue refuses more (the handler learns
/// it and answers with an error) rather than growing without bound.
pub const REPORT_QUEUE: usize = 256;

/// Running totals, shown by `getDeviceInfo` and in logs.
#[derive(Debug, Default)]
pub struct Counters {
    pub readings_produced: AtomicU64,
    pub readings_published: AtomicU64,
    pub readings_acknowledged: AtomicU64,
    pub readings_dropped: AtomicU64,
    pub connects: AtomicU64,
    pub token_renewals: AtomicU64,
    pub method_calls: AtomicU64,
    pub desired_applied: AtomicU64,
    pub reported_patches: AtomicU64,
    pub cloud_to_device: AtomicU64,
    /// True from an accepted CONNACK until that connection ends.
    pub connected: AtomicBool,
    /// True while readings and agent state are written to disk (`agent::state`).
    pub outbox_durable: AtomicBool,
    /// Readings in the outbox, waiting or in flight (a gauge).
    pub queue_length: AtomicU64,
    /// Connections ended or attempts failed, by reason: renewal, lost, failed, refused.
    pub reconnects: LabelledCounter,
    /// Method calls answered, by method name and status.
    pub methods: LabelledCounter,
    last_disconnect: Mutex<Option<String>>,
}

impl Counters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    pub fn set_queue_length(&self, readings: usize) {
        self.queue_length.store(readings as u64, Ordering::Relaxed);
    }

    /// A connection ended or an attempt failed: `reason` is the metric label, `detail` the
    /// human-readable cause (never a secret), kept for the health check.
    pub fn reconnect(&self, reason: &'static str, detail: &str) {
        self.reconnects.bump(&[reason]);
        *self
            .last_disconnect
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(format!("{reason}: {detail}"));
    }

    pub fn last_disconnect(&self) -> Option<String> {
        self.last_disconnect
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn method_answered(&self, name: &str, status: i32) {
        self.methods.bump(&[name, &status.to_string()]);
    }

    pub fn to_json(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "readingsProduced": get(&self.readings_produced),
            "readingsPublished": get(&self.readings_published),
            "readingsAcknowledged": get(&self.readings_acknowledged),
            "readingsDropped": get(&self.readings_dropped),
            "connects": get(&self.connects),
            "tokenRenewals": get(&self.token_renewals),
            "methodCalls": get(&self.method_calls),
            "desiredApplied": get(&self.desired_applied),
            "reportedPatches": get(&self.reported_patches),
            "cloudToDeviceMessages": get(&self.cloud_to_device),
        })
    }
}

/// The agent's long-running loops beat at least this often, even when idle or backing off.
pub const HEARTBEAT_PERIOD: Duration = Duration::from_secs(5);
/// A loop whose last beat is older than this is taken as stuck (three missed periods).
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(15);

/// The loops that beat: each must keep beating for the agent to count as healthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Beat {
    /// The connection task: its session loop, its wait for CONNACK, its backoff sleeps.
    Connection,
    /// The telemetry producer.
    Telemetry,
}

/// When each long-running loop last went round, for the systemd watchdog: the agent pings
/// only while every loop has beaten within [`HEARTBEAT_STALE`]. A loop that waits (for an
/// event, a reading's time, a backoff) wakes every [`HEARTBEAT_PERIOD`] to beat, so a
/// disconnected agent that keeps retrying is healthy and a stuck one is not.
#[derive(Debug)]
pub struct Heartbeat {
    origin: tokio::time::Instant,
    /// Milliseconds since `origin` of the last beat, indexed by [`Beat`].
    last_ms: [AtomicU64; 2],
}

impl Default for Heartbeat {
    fn default() -> Heartbeat {
        Heartbeat {
            origin: tokio::time::Instant::now(),
            last_ms: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }
}

impl Heartbeat {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn beat(&self, which: Beat) {
        self.last_ms[which as usize].fetch_max(self.now_ms(), Ordering::Relaxed);
    }

    /// How long ago the loop that beat least recently did.
    pub fn oldest(&self) -> Duration {
        let now = self.now_ms();
        let oldest = self
            .last_ms
            .iter()
            .map(|last| last.load(Ordering::Relaxed))
            .min()
            .unwrap_or(now);
        Duration::from_millis(now.saturating_sub(oldest))
    }

    /// Whether every loop has beaten within [`HEARTBEAT_STALE`].
    pub fn healthy(&self) -> bool {
        self.oldest() <= HEARTBEAT_STALE
    }

    /// Resolves after one [`HEARTBEAT_PERIOD`]: a `select!` arm that wakes an idle loop so that
    /// it goes round and beats.
    pub async fn tick() {
        tokio::time::sleep(HEARTBEAT_PERIOD).await;
    }

    /// Sleeps for `duration`, beating for `which` every [`HEARTBEAT_PERIOD`] meanwhile: a loop
    /// waiting out a long backoff is alive.
    pub async fn sleep(&self, which: Beat, duration: Duration) {
        let until = tokio::time::Instant::now() + duration;
        loop {
            self.beat(which);
            let now = tokio::time::Instant::now();
            if now >= until {
                return;
            }
            tokio::time::sleep_until(until.min(now + HEARTBEAT_PERIOD)).await;
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the reported-properties queue is full ({REPORT_QUEUE} patches waiting)")]
pub struct ReportQueueFull;

pub struct AgentShared {
    pub device_id: String,
    pub started: Instant,
    pub counters: Counters,
    pub door: Mutex<DoorState>,
    /// Woken when the door changes, so its auto-unlock timer re-reads the state.
    pub door_changed: Notify,
    pub telemetry_interval: watch::Sender<Duration>,
    /// Desired properties no specific handler claims, as last applied.
    pub settings: Mutex<serde_json::Map<String, Value>>,
    /// Liveness of the long-running loops, read by the systemd watchdog.
    pub heartbeat: Heartbeat,
    reports: mpsc::Sender<Value>,
}

#[derive(Clone)]
pub struct HandlerContext(Arc<AgentShared>);

impl HandlerContext {
    pub fn new(
        device_id: &str,
        telemetry_interval: Duration,
        reports: mpsc::Sender<Value>,
    ) -> HandlerContext {
        let (interval_tx, _) = watch::channel(telemetry_interval);
        HandlerContext(Arc::new(AgentShared {
            device_id: device_id.to_string(),
            started: Instant::now(),
            counters: Counters::default(),
            door: Mutex::new(DoorState::default()),
            door_changed: Notify::new(),
            telemetry_interval: interval_tx,
            settings: Mutex::new(serde_json::Map::new()),
            heartbeat: Heartbeat::default(),
            reports,
        }))
    }

    /// A context whose reported patches arrive on the returned receiver.
    pub fn for_tests() -> (HandlerContext, mpsc::Receiver<Value>) {
        let (tx, rx) = mpsc::channel(REPORT_QUEUE);
        (
            HandlerContext::new("test-device", Duration::from_secs(10), tx),
            rx,
        )
    }

    pub fn shared(&self) -> &AgentShared {
        &self.0
    }

    pub fn device_id(&self) -> &str {
        &self.0.device_id
    }

    pub fn counters(&self) -> &Counters {
        &self.0.counters
    }

    pub fn heartbeat(&self) -> &Heartbeat {
        &self.0.heartbeat
    }

    pub fn uptime(&self) -> Duration {
        self.0.started.elapsed()
    }

    /// Queues a reported-properties patch; the twin task sends it (merged with others) as soon
    /// as the device is connected, and retries it until the hub accepts it.
    pub fn report(&self, patch: Value) -> Result<(), ReportQueueFull> {
        self.0.reports.try_send(patch).map_err(|_| ReportQueueFull)
    }

    pub fn telemetry_interval(&self) -> Duration {
        *self.0.telemetry_interval.borrow()
    }

    /// Changes the telemetry cadence; the telemetry task picks it up at once.
    pub fn set_telemetry_interval(&self, interval: Duration) {
        self.0.telemetry_interval.send_replace(interval);
    }

    pub fn watch_telemetry_interval(&self) -> watch::Receiver<Duration> {
        self.0.telemetry_interval.subscribe()
    }

    pub fn settings(&self) -> std::sync::MutexGuard<'_, serde_json::Map<String, Value>> {
        self.0.settings.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn door(&self) -> std::sync::MutexGuard<'_, DoorState> {
        self.0.door.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A heartbeat whose loops last beat `ago` (at its start).
    fn started_ago(ago: Duration) -> Heartbeat {
        let origin = tokio::time::Instant::now()
            .checked_sub(ago)
            .expect("the clock is past `ago`");
        Heartbeat {
            origin,
            last_ms: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    #[test]
    fn a_fresh_heartbeat_is_healthy() {
        let heartbeat = Heartbeat::default();
        assert!(heartbeat.oldest() < Duration::from_secs(1));
        assert!(heartbeat.healthy());
    }

    #[test]
    fn every_loop_must_beat_for_the_agent_to_be_healthy() {
        let heartbeat = started_ago(HEARTBEAT_STALE + Duration::from_secs(5));
        assert!(heartbeat.oldest() >= HEARTBEAT_STALE + Duration::from_secs(5));
        assert!(!heartbeat.healthy());
        heartbeat.beat(Beat::Connection);
        assert!(!heartbeat.healthy(), "the telemetry loop has not beaten");
        heartbeat.beat(Beat::Telemetry);
        assert!(heartbeat.healthy());
        assert!(heartbeat.oldest() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn sleeping_beats() {
        let heartbeat = started_ago(Duration::from_secs(60));
        heartbeat.beat(Beat::Telemetry);
        assert!(!heartbeat.healthy());
        heartbeat
            .sleep(Beat::Connection, Duration::from_millis(20))
            .await;
        assert!(heartbeat.healthy());
    }

    #[test]
    fn handlers_see_the_agent_heartbeat() {
        let (ctx, _reports) = HandlerContext::for_tests();
        ctx.heartbeat().beat(Beat::Connection);
        assert!(ctx.heartbeat().healthy());
    }
}
