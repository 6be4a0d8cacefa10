//! What a running hub shows on `/metrics` and `/healthz`, and the few counters that nothing else
//! in the hub keeps. Served by the generic `common::exposition` server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::HubState;
use crate::common::exposition::{load, Exposition, Kind, LabelledCounter, MetricsSource};

/// The hub's counters that nothing else keeps. Bumped where the event happens.
#[derive(Debug, Default)]
pub struct HubCounters {
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub twin_updates_device: AtomicU64,
    pub twin_updates_service: AtomicU64,
    pub queries: AtomicU64,
    /// Direct method calls by status: the device's, or the HTTP status of the hub's error.
    pub method_calls: LabelledCounter,
}

impl HubCounters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn method_call(&self, status: i32) {
        self.method_calls.bump(&[&status.to_string()]);
    }
}

/// What a running hub exposes.
pub struct HubMetrics {
    pub state: Arc<HubState>,
    /// Cancelled when the hub stops: `/healthz` then answers 503 (as it does when an accept
    /// loop or the job scheduler has died, see `HubState::health`).
    pub stopping: CancellationToken,
}

impl MetricsSource for HubMetrics {
    /// What [`Hub::health`](super::Hub::health) says, through the shared state.
    fn health(&self) -> Result<(), String> {
        if self.stopping.is_cancelled() {
            return Err("the hub is stopping".into());
        }
        self.state.health()
    }

    fn render(&self, out: &mut Exposition) {
        use Kind::{Counter, Gauge};
        let state = &self.state;
        let c = &state.counters;
        let stats = state.registry.stats();
        out.single(
            "simdevice_hub_devices",
            Gauge,
            "Devices in the registry.",
            stats.total as f64,
        );
        out.single(
            "simdevice_hub_connected_devices",
            Gauge,
            "Devices connected now.",
            stats.connected as f64,
        );
        out.family(
            "simdevice_hub_connections_total",
            Counter,
            "Device connections that sent CONNECT, by result (accepted, refused).",
        );
        let connections = "simdevice_hub_connections_total";
        out.sample(
            connections,
            &[("result", "accepted")],
            load(&c.connections_accepted),
        );
        out.sample(
            connections,
            &[("result", "refused")],
            load(&c.connections_refused),
        );
        out.single(
            "simdevice_hub_telemetry_messages_total",
            Counter,
            "Device-to-cloud messages accepted.",
            state.telemetry.total() as f64,
        );
        out.family(
            "simdevice_hub_twin_updates_total",
            Counter,
            "Twin changes applied, by source: device (reported patches) or service \
             (tags and desired properties).",
        );
        let twins = "simdevice_hub_twin_updates_total";
        out.sample(twins, &[("source", "device")], load(&c.twin_updates_device));
        out.sample(
            twins,
            &[("source", "service")],
            load(&c.twin_updates_service),
        );
        out.family(
            "simdevice_hub_method_calls_total",
            Counter,
            "Direct method calls, by status: the device's answer, or the HTTP status of the \
             hub's error (404 not online, 504 timeout).",
        );
        c.method_calls
            .render(out, "simdevice_hub_method_calls_total", &["status"]);
        out.single(
            "simdevice_hub_queries_total",
            Counter,
            "Queries run (POST /devices/query).",
            load(&c.queries),
        );
        out.single(
            "simdevice_hub_recent_events",
            Gauge,
            "Messages in the recent-events buffer (GET /simdevice/events).",
            state.telemetry.buffered() as f64,
        );
        out.single(
            "simdevice_hub_recent_events_dropped_total",
            Counter,
            "Messages dropped from the full recent-events buffer.",
            state.telemetry.dropped() as f64,
        );
        if let Some(capture) = &state.capture {
            let c = &capture.counters;
            out.single(
                "simdevice_hub_capture_files_total",
                Counter,
                "Capture files written (--capture).",
                load(&c.files),
            );
            out.single(
                "simdevice_hub_capture_errors_total",
                Counter,
                "Capture failures: a file not written (retried), the event store not read \
                 (retried), a capture cursor not recorded.",
                load(&c.errors),
            );
            out.single(
                "simdevice_hub_capture_refused_total",
                Counter,
                "Telemetry messages refused (not acknowledged) because the capture buffer was \
                 full.",
                load(&c.refused),
            );
            out.single(
                "simdevice_hub_capture_pending_events",
                Gauge,
                "Accepted messages not yet in a published capture file.",
                capture.pending() as f64,
            );
        }
    }
}
