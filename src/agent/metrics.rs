//! What a running agent shows on `/metrics` and `/healthz`: its counters and heartbeats, read
//! through its handler context. Served by the generic `common::exposition` server.

use std::sync::atomic::Ordering;

use super::context::{Counters, HandlerContext};
use crate::common::exposition::{load, Exposition, Kind, MetricsSource};

/// What a running agent exposes: its counters, read through its handler context.
pub struct AgentMetrics {
    pub ctx: HandlerContext,
    /// `outbox.max_readings` (the daemon always has an outbox file).
    pub queue_capacity: usize,
}

impl MetricsSource for AgentMetrics {
    fn health(&self) -> Result<(), String> {
        if let Some((which, late)) = self.ctx.heartbeat().overdue() {
            return Err(format!(
                "the agent's {} loop is stuck ({} s past its heartbeat)",
                which.name(),
                late.as_secs()
            ));
        }
        let counters = self.ctx.counters();
        if counters.connected.load(Ordering::Relaxed) {
            return Ok(());
        }
        match counters.last_disconnect() {
            Some(reason) => Err(format!("not connected to IoT Hub: {reason}")),
            None => Err("not connected to IoT Hub yet".into()),
        }
    }

    fn render(&self, out: &mut Exposition) {
        use Kind::{Counter, Gauge};
        let c: &Counters = self.ctx.counters();
        let connected = if c.connected.load(Ordering::Relaxed) {
            1.0
        } else {
            0.0
        };
        out.single(
            "simdevice_agent_connected",
            Gauge,
            "1 while the device is connected to IoT Hub, else 0.",
            connected,
        );
        out.single(
            "simdevice_agent_connects_total",
            Counter,
            "Successful connections (CONNACK accepted).",
            load(&c.connects),
        );
        out.family(
            "simdevice_agent_reconnects_total",
            Counter,
            "Connections ended or attempts failed, by reason: renewal (new SAS token), \
             lost (an open connection ended), failed (no connection), refused (credentials).",
        );
        c.reconnects
            .render(out, "simdevice_agent_reconnects_total", &["reason"]);
        out.single(
            "simdevice_agent_token_renewals_total",
            Counter,
            "Reconnections made to renew the SAS token.",
            load(&c.token_renewals),
        );
        out.single(
            "simdevice_agent_readings_queued_total",
            Counter,
            "Readings produced into the outbox.",
            load(&c.readings_produced),
        );
        out.single(
            "simdevice_agent_readings_published_total",
            Counter,
            "Readings published (resends after a disconnect count again).",
            load(&c.readings_published),
        );
        out.single(
            "simdevice_agent_readings_acknowledged_total",
            Counter,
            "Readings acknowledged by the hub (PUBACK).",
            load(&c.readings_acknowledged),
        );
        out.single(
            "simdevice_agent_readings_dropped_total",
            Counter,
            "Readings dropped because the outbox was full.",
            load(&c.readings_dropped),
        );
        out.single(
            "simdevice_agent_queue_length",
            Gauge,
            "Readings in the outbox, waiting or in flight.",
            load(&c.queue_length),
        );
        out.single(
            "simdevice_agent_queue_capacity",
            Gauge,
            "Readings the outbox holds at most (outbox.max_readings).",
            self.queue_capacity as f64,
        );
        out.family(
            "simdevice_agent_method_calls_total",
            Counter,
            "Direct method calls answered, by method name and status.",
        );
        c.methods.render(
            out,
            "simdevice_agent_method_calls_total",
            &["method", "status"],
        );
        out.single(
            "simdevice_agent_desired_applied_total",
            Counter,
            "Desired properties applied.",
            load(&c.desired_applied),
        );
        out.single(
            "simdevice_agent_reported_patches_total",
            Counter,
            "Reported-property patches accepted by the hub.",
            load(&c.reported_patches),
        );
        out.single(
            "simdevice_agent_cloud_to_device_messages_total",
            Counter,
            "Cloud-to-device messages received.",
            load(&c.cloud_to_device),
        );
        out.single(
            "simdevice_agent_uptime_seconds",
            Gauge,
            "Seconds since the agent started.",
            self.ctx.uptime().as_secs_f64().floor(),
        );
    }
}
