//! The telemetry producer: one reading per interval into the outbox.
//!
//! The first reading is produced at start, then one every `telemetry.interval`; a change of
//! the interval (desired property `telemetryInterval`, or SIGHUP) takes effect at once. A
//! reading has a per-device sequence number and a unique message id; its body is the
//! environment reading `{"id","timestamp","temperature","humidity","uv","seq"}`, or, when
//! `telemetry.template` is set, the template's body with its application properties.
//!
//! A [`Plan`] may delay the first reading (the fleet spreads its devices over the interval)
//! and end production after a number of readings. With a zero interval readings are produced
//! as fast as the hub acknowledges them (at most [`BURST`] waiting): waiting, not dropping.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::context::{Beat, Counters, HandlerContext};
use super::environment::Environment;
use super::outbox::{Dropped, Outbox};
use super::reading::Reading;
use crate::common::template::TemplateState;
use crate::protocol::property_bag::PropertyBag;

/// Where a device's readings come from. The environment (its generator is some 300 bytes) is
/// boxed so that a device with a template does not carry its room.
pub enum Source {
    Environment(Box<Environment>),
    Template(TemplateState),
}

impl Source {
    /// The reading `seq` of `device_id`, made now.
    pub fn reading(&mut self, device_id: &str, seq: u64) -> Reading {
        match self {
            Source::Environment(env) => make_reading(device_id, seq, env),
            Source::Template(state) => {
                let now = chrono::Utc::now();
                let rendered = state.render(device_id, seq, now);
                Reading {
                    seq,
                    message_id: uuid::Uuid::new_v4().to_string(),
                    created: now,
                    body: rendered.body,
                    app_properties: rendered.properties,
                }
            }
        }
    }
}

pub fn make_reading(device_id: &str, seq: u64, env: &mut Environment) -> Reading {
    let now = chrono::Utc::now();
    let values = env.read(now);
    let body = json!({
        "id": device_id,
        "timestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "temperature": values.temperature,
        "humidity": values.humidity,
        "uv": values.uv,
        "seq": seq,
    });
    Reading {
        seq,
        message_id: uuid::Uuid::new_v4().to_string(),
        created: now,
        body: Bytes::from(body.to_string()),
        app_properties: PropertyBag::new(),
    }
}

/// Counts readings the outbox dropped (`readings_dropped`) and warns, once per kind.
pub fn count_dropped(ctx: &HandlerContext, dropped: &Dropped, queued: usize) {
    let counter = &ctx.counters().readings_dropped;
    counter.fetch_add(dropped.len() as u64, std::sync::atomic::Ordering::Relaxed);
    if let (Some(first), Some(last)) = (dropped.full.first(), dropped.full.last()) {
        tracing::warn!(
            first_seq = first.seq,
            last_seq = last.seq,
            count = dropped.full.len(),
            queued,
            "telemetry queue full while disconnected: dropped the oldest readings"
        );
    }
    if let (Some(first), Some(last)) = (dropped.expired.first(), dropped.expired.last()) {
        tracing::warn!(
            first_seq = first.seq,
            last_seq = last.seq,
            count = dropped.expired.len(),
            queued,
            "readings older than outbox.max_age_secs dropped"
        );
    }
}

/// Readings waiting or in flight at most when the interval is zero.
pub const BURST: usize = 2 * super::connection::WINDOW;

/// When and how many readings to produce.
#[derive(Clone, Copy, Debug, Default)]
pub struct Plan {
    /// The first reading's `seq` (the outbox's next one).
    pub first_seq: u64,
    /// Readings to produce in all (`None`: until shutdown).
    pub messages: Option<u64>,
    /// Delay before the first reading.
    pub start_phase: std::time::Duration,
}

pub async fn produce(
    ctx: HandlerContext,
    mut source: Source,
    outbox: Arc<Outbox>,
    plan: Plan,
    shutdown: CancellationToken,
) {
    let mut interval = ctx.watch_telemetry_interval();
    let mut seq = plan.first_seq;
    let mut produced = 0u64;
    let mut last = Instant::now();
    let mut next = last + plan.start_phase;
    loop {
        if plan.messages.is_some_and(|m| produced >= m) {
            // Done: the loop no longer has anything to do, so the watchdog must not wait on it.
            ctx.heartbeat().wait_for_events(Beat::Telemetry);
            return;
        }
        // Asleep until the next reading: no wake-up before it just to say so.
        ctx.heartbeat().wait_until(Beat::Telemetry, next);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = interval.changed() => {
                if changed.is_err() {
                    return;
                }
                next = last + *interval.borrow_and_update();
                continue;
            }
            _ = tokio::time::sleep_until(next) => {}
        }
        ctx.heartbeat().beat(Beat::Telemetry);
        if interval.borrow().is_zero() {
            ctx.heartbeat().wait_for_events(Beat::Telemetry);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = outbox.wait_for_room(BURST) => {}
            }
            ctx.heartbeat().beat(Beat::Telemetry);
        }
        let reading = source.reading(ctx.device_id(), seq);
        seq += 1;
        produced += 1;
        Counters::bump(&ctx.counters().readings_produced);
        let dropped = outbox.push(reading).await;
        count_dropped(&ctx, &dropped, outbox.len());
        ctx.counters().set_queue_length(outbox.len());
        last = Instant::now();
        let period = *interval.borrow();
        // A late wake-up does not produce a burst of readings to catch up.
        next += period;
        if next < last {
            next = last + period;
        }
    }
}
