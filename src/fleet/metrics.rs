//! What a running fleet shows on `/metrics` and `/healthz` (`--metrics-listen`): the fleet's
//! totals, served by the same `common::exposition` server as the agent's.

use super::run::FleetView;
use crate::common::exposition::{Exposition, Kind, MetricsSource};

pub struct FleetMetrics {
    pub view: FleetView,
}

impl MetricsSource for FleetMetrics {
    /// Healthy once every device has been started and at least one is connected; before
    /// that, while the ramp runs, healthy too (starting is progress).
    fn health(&self) -> Result<(), String> {
        let s = self.view.snapshot();
        if s.started < s.target || s.connected_now > 0 {
            return Ok(());
        }
        Err(format!("no device of {} is connected", s.target))
    }

    fn render(&self, out: &mut Exposition) {
        use Kind::{Counter, Gauge};
        let s = self.view.snapshot();
        let gauges = [
            (
                "simdevice_fleet_devices",
                "Devices in this shard.",
                s.target,
            ),
            (
                "simdevice_fleet_started",
                "Devices started so far (the connect ramp).",
                s.started,
            ),
            (
                "simdevice_fleet_connected",
                "Devices connected now.",
                s.connected_now,
            ),
        ];
        for (name, help, value) in gauges {
            out.single(name, Gauge, help, value as f64);
        }
        let counters = [
            (
                "simdevice_fleet_readings_sent_total",
                "Readings published.",
                s.readings_sent,
            ),
            (
                "simdevice_fleet_readings_acknowledged_total",
                "Readings acknowledged by the hub (PUBACK).",
                s.readings_acknowledged,
            ),
            (
                "simdevice_fleet_methods_answered_total",
                "Direct method calls answered.",
                s.methods_answered,
            ),
            (
                "simdevice_fleet_desired_applied_total",
                "Desired-property patches applied.",
                s.desired_applied,
            ),
            (
                "simdevice_fleet_reconnects_total",
                "Sessions ended or connection attempts failed.",
                s.reconnects,
            ),
        ];
        for (name, help, value) in counters {
            out.single(name, Counter, help, value as f64);
        }
        out.family(
            "simdevice_fleet_errors_total",
            Counter,
            "Errors by kind: connect_refused, connect_failed, connection_lost, readings_dropped, method_errors.",
        );
        for (kind, n) in &s.errors {
            out.sample("simdevice_fleet_errors_total", &[("kind", kind)], *n as f64);
        }
        out.family(
            "simdevice_fleet_ack_latency_seconds",
            Kind::Gauge,
            "Acknowledgement latency of readings (PUBLISH to PUBACK), by quantile.",
        );
        for (label, q) in [("0.5", 50.0), ("0.99", 99.0), ("1", 100.0)] {
            if let Some(ms) = self.view.latency_percentile_ms(q) {
                out.sample(
                    "simdevice_fleet_ack_latency_seconds",
                    &[("quantile", label)],
                    ms / 1000.0,
                );
            }
        }
    }
}
