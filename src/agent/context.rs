//! What a handler may use: the device's identity, its counters and heartbeat, the door (read
//! and set), the telemetry cadence (read and set), the desired settings, and a way to report
//! properties. This is the whole surface between handlers and the rest of the agent: handlers
//! never see MQTT, the outbox or the storage. The agent's own loops use the same counters and
//! heartbeat, and `metrics` reads them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::door::DoorState;
use super::door_cell::DoorCell;
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
    /// Full twins received (one per connect, when the twin GET succeeds).
    pub twins_fetched: AtomicU64,
    pub cloud_to_device: AtomicU64,
    /// True from an accepted CONNACK until that connection ends.
    pub connected: AtomicBool,
    /// True while readings and agent state are written to disk: the flag `agent::state` keeps.
    pub outbox_durable: Arc<AtomicBool>,
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

/// How long a loop may take to come back to its wait once it has work, or past the deadline it
/// waits for, before it counts as stuck.
pub const HEARTBEAT_GRACE: Duration = Duration::from_secs(15);

/// The loops that beat: each must keep its promise for the agent to count as healthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Beat {
    /// The connection task: its session loop, its wait for CONNACK, its backoff sleeps.
    Connection,
    /// The telemetry producer.
    Telemetry,
}

impl Beat {
    const ALL: [Beat; 2] = [Beat::Connection, Beat::Telemetry];

    pub fn name(self) -> &'static str {
        match self {
            Beat::Connection => "connection",
            Beat::Telemetry => "telemetry",
        }
    }
}

/// Whether the agent's long-running loops are moving, for the systemd watchdog and `/healthz`.
///
/// Each loop says, whenever it goes round, by when it will go round again: a loop that starts
/// some work promises to be back within [`HEARTBEAT_GRACE`] ([`Heartbeat::beat`]); a loop about
/// to sleep until a deadline (its next reading, a backoff, a CONNACK timeout) promises that
/// deadline plus the grace ([`Heartbeat::wait_until`]; the session loop promises its next
/// keep-alive, renewal or drain deadline); a loop about to wait for events that only others
/// produce promises nothing ([`Heartbeat::wait_for_events`]). A loop stuck in its work (a disk
/// that never answers, a full channel) breaks its promise and the agent turns unhealthy; a loop
/// that waits never needs to wake up just to say it is alive.
#[derive(Debug)]
pub struct Heartbeat {
    origin: Instant,
    /// Milliseconds since `origin` by which each loop (indexed by [`Beat`]) must beat again;
    /// `u64::MAX` while it waits for events.
    due_ms: [AtomicU64; 2],
}

impl Default for Heartbeat {
    fn default() -> Heartbeat {
        let grace = u64::try_from(HEARTBEAT_GRACE.as_millis()).unwrap_or(u64::MAX);
        Heartbeat {
            origin: Instant::now(),
            due_ms: [AtomicU64::new(grace), AtomicU64::new(grace)],
        }
    }
}

impl Heartbeat {
    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX)
    }

    fn promise(&self, which: Beat, due: Instant) {
        self.due_ms[which as usize].store(self.ms(due), Ordering::Relaxed);
    }

    /// The loop has work to do: it will be back within [`HEARTBEAT_GRACE`].
    pub fn beat(&self, which: Beat) {
        self.promise(which, Instant::now() + HEARTBEAT_GRACE);
    }

    /// The loop sleeps until `deadline` (or is woken earlier): it will beat by then, plus the
    /// grace.
    pub fn wait_until(&self, which: Beat, deadline: Instant) {
        self.promise(which, deadline + HEARTBEAT_GRACE);
    }

    /// The loop waits for events it does not produce itself: nothing to promise meanwhile.
    pub fn wait_for_events(&self, which: Beat) {
        self.due_ms[which as usize].store(u64::MAX, Ordering::Relaxed);
    }

    /// Sleeps for `duration` with the promise to be back then: a loop waiting out a long
    /// backoff is alive, and is not woken before its end.
    pub async fn sleep(&self, which: Beat, duration: Duration) {
        let until = Instant::now() + duration;
        self.wait_until(which, until);
        tokio::time::sleep_until(until).await;
        self.beat(which);
    }

    /// The loop that broke its promise by the most, and by how much; `None` while every loop
    /// keeps its promise.
    pub fn overdue(&self) -> Option<(Beat, Duration)> {
        self.overdue_at(Instant::now())
    }

    fn overdue_at(&self, now: Instant) -> Option<(Beat, Duration)> {
        let now = self.ms(now);
        Beat::ALL
            .into_iter()
            .filter_map(|which| {
                let due = self.due_ms[which as usize].load(Ordering::Relaxed);
                (now > due).then(|| (which, Duration::from_millis(now - due)))
            })
            .max_by_key(|(_, late)| *late)
    }

    /// Whether every loop keeps its promise.
    pub fn healthy(&self) -> bool {
        self.overdue().is_none()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the reported-properties queue is full ({REPORT_QUEUE} patches waiting)")]
pub struct ReportQueueFull;

struct AgentShared {
    device_id: String,
    started: std::time::Instant,
    counters: Counters,
    door: Arc<DoorCell>,
    telemetry_interval: watch::Sender<Duration>,
    /// Desired properties no specific handler claims, as last applied.
    settings: Mutex<serde_json::Map<String, Value>>,
    /// Liveness of the long-running loops, read by the systemd watchdog.
    heartbeat: Heartbeat,
    reports: mpsc::Sender<Box<Value>>,
    /// Who wants each reading's acknowledgement latency (the fleet's report); set once.
    ack_observer: std::sync::OnceLock<AckObserver>,
}

/// Told the time from a reading's PUBLISH to its PUBACK, once per acknowledged reading.
pub type AckObserver = Arc<dyn Fn(Duration) + Send + Sync>;

/// What a handler may touch; cheap to clone. See the module's note.
#[derive(Clone)]
pub struct HandlerContext(Arc<AgentShared>);

impl HandlerContext {
    /// A context for `device_id` whose reported patches go to `reports` and whose door is
    /// `door` (the agent keeps the same cell to run its timer and saving).
    pub fn new(
        device_id: &str,
        telemetry_interval: Duration,
        reports: mpsc::Sender<Box<Value>>,
        door: Arc<DoorCell>,
    ) -> HandlerContext {
        let (interval_tx, _) = watch::channel(telemetry_interval);
        HandlerContext(Arc::new(AgentShared {
            device_id: device_id.to_string(),
            started: std::time::Instant::now(),
            counters: Counters::default(),
            door,
            telemetry_interval: interval_tx,
            settings: Mutex::new(serde_json::Map::new()),
            heartbeat: Heartbeat::default(),
            reports,
            ack_observer: std::sync::OnceLock::new(),
        }))
    }

    /// Hands each reading's acknowledgement latency to `observer` (set once; a second call
    /// is ignored). Many agents may share one observer.
    pub fn observe_acks(&self, observer: AckObserver) {
        let _ = self.0.ack_observer.set(observer);
    }

    /// A reading was acknowledged `latency` after it was published: the connection says so.
    pub fn acknowledged(&self, latency: Duration) {
        if let Some(observer) = self.0.ack_observer.get() {
            observer(latency);
        }
    }

    /// A context whose reported patches arrive on the returned receiver.
    pub fn for_tests() -> (HandlerContext, mpsc::Receiver<Box<Value>>) {
        let (tx, rx) = mpsc::channel(REPORT_QUEUE);
        (
            HandlerContext::new("test-device", Duration::from_secs(10), tx, Arc::default()),
            rx,
        )
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

    /// Whether readings and agent state are being written to disk.
    pub fn is_durable(&self) -> bool {
        self.0.counters.outbox_durable.load(Ordering::Relaxed)
    }

    /// Queues a reported-properties patch; the twin task sends it (merged with others) as soon
    /// as the device is connected, and retries it until the hub accepts it.
    pub fn report(&self, patch: Value) -> Result<(), ReportQueueFull> {
        self.0
            .reports
            .try_send(Box::new(patch))
            .map_err(|_| ReportQueueFull)
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

    /// The door now.
    pub fn door(&self) -> DoorState {
        self.0.door.get()
    }

    /// Locks the door (until `unlockDoor` when `lock_time` is `None`); the agent saves it and
    /// runs its unlock timer. Returns the new state.
    pub fn lock_door(&self, lock_time: Option<Duration>) -> DoorState {
        self.0.door.lock(lock_time)
    }

    /// Unlocks the door; returns the new state.
    pub fn unlock_door(&self) -> DoorState {
        self.0.door.unlock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_fresh_heartbeat_is_healthy() {
        let heartbeat = Heartbeat::default();
        assert_eq!(heartbeat.overdue(), None);
        assert!(heartbeat.healthy());
    }

    #[test]
    fn a_loop_that_does_not_come_back_from_its_work_breaks_its_promise() {
        let heartbeat = Heartbeat::default();
        let start = Instant::now();
        heartbeat.beat(Beat::Connection);
        heartbeat.beat(Beat::Telemetry);
        assert_eq!(heartbeat.overdue_at(start + HEARTBEAT_GRACE - S), None);
        heartbeat.promise(Beat::Connection, start + HEARTBEAT_GRACE * 2);
        let (which, late) = heartbeat
            .overdue_at(start + HEARTBEAT_GRACE + 5 * S)
            .expect("the telemetry loop is late");
        assert_eq!(which, Beat::Telemetry);
        assert!(late >= 4 * S && late <= 5 * S, "{late:?}");
        heartbeat.beat(Beat::Telemetry);
        assert!(heartbeat.healthy());
    }

    #[test]
    fn a_loop_waiting_on_a_timer_or_for_events_needs_no_beat_meanwhile() {
        let heartbeat = Heartbeat::default();
        let hour = Duration::from_secs(3600);
        let start = Instant::now();
        heartbeat.wait_until(Beat::Telemetry, start + hour);
        heartbeat.wait_for_events(Beat::Connection);
        assert_eq!(
            heartbeat.overdue_at(start + hour + HEARTBEAT_GRACE),
            None,
            "asleep as promised"
        );
        let (which, _) = heartbeat
            .overdue_at(start + hour + HEARTBEAT_GRACE + 2 * S)
            .expect("the timer has long passed and the loop is not back");
        assert_eq!(which, Beat::Telemetry);
        assert_eq!(
            heartbeat
                .overdue_at(start + 1000 * hour)
                .map(|(which, _)| which),
            Some(Beat::Telemetry),
            "waiting for events is never late"
        );
    }

    #[tokio::test]
    async fn sleeping_promises_its_end_and_beats_after_it() {
        let heartbeat = Heartbeat::default();
        let start = Instant::now();
        heartbeat.beat(Beat::Telemetry);
        let nap = Duration::from_millis(50);
        let sleeping = heartbeat.sleep(Beat::Connection, nap);
        tokio::pin!(sleeping);
        // First poll: the promise is made, the sleep begins.
        assert!(futures_poll_once(sleeping.as_mut()).await.is_none());
        assert_eq!(
            heartbeat.overdue_at(start + nap + HEARTBEAT_GRACE - S),
            None,
            "the sleeper is not expected before its end"
        );
        sleeping.await;
        assert!(heartbeat.healthy());
    }

    /// Polls `future` once: `Some` if it finished.
    async fn futures_poll_once<F: std::future::Future + Unpin>(mut future: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut future).poll(cx) {
                std::task::Poll::Ready(output) => Some(output),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    #[test]
    fn handlers_see_the_door_and_the_agent_heartbeat() {
        let (ctx, _reports) = HandlerContext::for_tests();
        ctx.heartbeat().beat(Beat::Connection);
        assert!(ctx.heartbeat().healthy());
        assert!(ctx.lock_door(None).locked);
        assert!(ctx.door().locked);
        assert!(!ctx.unlock_door().locked);
    }
}
