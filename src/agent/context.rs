//! What a handler may use: the device's identity and counters, the door, the telemetry
//! cadence, and a way to report properties. This is the whole surface between handlers and
//! the rest of the agent; handlers never see MQTT.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Notify};

use super::door::DoorState;

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
}

impl Counters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
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
