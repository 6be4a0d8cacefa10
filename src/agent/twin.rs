//! The device's side of its twin: catching up after every connect, applying desired
//! properties through their handlers, and sending reported properties reliably.
//!
//! On each connect: GET the twin, apply the desired properties if their `$version` is newer
//! than the last one applied (or older: the twin was recreated), then report the connectivity
//! and the door. A desired patch is
//! applied only if its `$version` is newer than the last applied (patches that arrive during
//! the GET are therefore not applied twice). Every desired property is acknowledged in the
//! Plug and Play shape `{"value","ac","av","ad"}`. The last applied version, the stored
//! settings and a desired `telemetryInterval` are saved in the agent's state (`state.rs`)
//! before the acknowledgements go out, so after a restart an applied patch is not applied again
//! and its effect is restored without calling its handler.
//!
//! Reported patches from handlers and from here are merged into one pending patch, sent with
//! a `$rid`, and cleared only on 204. On 429, 5xx or no answer the patch is kept and sent again
//! after a backoff; a 400 means the patch itself is wrong and retrying cannot help, so it is
//! logged as an error with the hub's reason and dropped.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::connection::{Request, TwinResponse};
use super::connectivity::Cellular;
use super::context::{Counters, HandlerContext};
use super::handlers::{apply_desired, Registry};
use super::state::{AppliedDesired, Store};

/// The desired property whose effect (the cadence) is restored from the agent's state.
const TELEMETRY_INTERVAL: &str = "telemetryInterval";
/// How long a twin request may wait for its response.
const TWIN_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the simulated cellular signal drifts.
const CONNECTIVITY_TICK: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub enum TwinEvent {
    Connected,
    Disconnected,
    DesiredPatch {
        version: Option<u64>,
        body: bytes::Bytes,
    },
}

pub struct TwinTask {
    pub ctx: HandlerContext,
    pub registry: Arc<RwLock<Arc<Registry>>>,
    pub requests: mpsc::Sender<Box<Request>>,
    pub reports: mpsc::Receiver<Box<Value>>,
    pub events: mpsc::Receiver<Box<TwinEvent>>,
    pub cellular: Cellular,
    pub backoff: Backoff,
    pub shutdown: CancellationToken,
    /// The last applied desired version and what it set, as restored from the agent's state.
    pub applied: AppliedDesired,
    /// Where `applied` is saved after each update (`None`: not durable).
    pub store: Option<Store>,
}

/// Adds `patch` to `pending`, newer values winning; unlike a merge into a document, `null`
/// is kept, because it tells the hub to delete.
pub fn combine(pending: &mut Map<String, Value>, patch: Map<String, Value>) {
    for (key, value) in patch {
        match (pending.get_mut(&key), value) {
            (Some(Value::Object(existing)), Value::Object(newer)) => combine(existing, newer),
            (_, value) => {
                pending.insert(key, value);
            }
        }
    }
}

impl TwinTask {
    pub async fn run(mut self) {
        let mut connected = false;
        let mut resync = false;
        let mut last_desired: u64 = self.applied.version;
        let mut pending: Map<String, Value> = Map::new();
        let mut retry_at: Option<Instant> = None;
        let mut tick = tokio::time::interval(CONNECTIVITY_TICK);
        tick.reset();
        loop {
            let due = retry_at.is_none_or(|at| at <= Instant::now());
            if connected && resync && due {
                match self.catch_up(&mut last_desired, &mut pending).await {
                    Ok(()) => resync = false,
                    Err(reason) => {
                        tracing::warn!(%reason, "twin catch-up failed; will retry");
                        retry_at = Some(Instant::now() + self.backoff.next_delay());
                    }
                }
            }
            let due = retry_at.is_none_or(|at| at <= Instant::now());
            if connected && !resync && !pending.is_empty() && due {
                retry_at = self.send_pending(&mut pending).await;
            }
            let wake = retry_at.filter(|_| connected);
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                event = self.events.recv() => match event.map(|event| *event) {
                    None => return,
                    Some(TwinEvent::Connected) => {
                        connected = true;
                        resync = true;
                        retry_at = None;
                        self.backoff.reset();
                    }
                    Some(TwinEvent::Disconnected) => connected = false,
                    Some(TwinEvent::DesiredPatch { version, body }) => {
                        self.on_desired_patch(version, &body, &mut last_desired, &mut pending).await;
                    }
                },
                report = self.reports.recv() => match report.map(|report| *report) {
                    None => return,
                    Some(Value::Object(patch)) => combine(&mut pending, patch),
                    Some(other) => tracing::error!(patch = %other, "a handler reported a patch that is not an object; dropped"),
                },
                _ = tick.tick() => {
                    self.cellular.drift();
                    if let Some(Value::Object(patch)) = self.cellular.report_if_changed() {
                        combine(&mut pending, patch);
                    }
                }
                _ = sleep_until_opt(wake) => {}
            }
        }
    }

    async fn request(
        &self,
        make: impl FnOnce(oneshot::Sender<TwinResponse>) -> Request,
    ) -> Result<TwinResponse, String> {
        let (reply, response) = oneshot::channel();
        self.requests
            .send(Box::new(make(reply)))
            .await
            .map_err(|_| "the connection is gone".to_string())?;
        match tokio::time::timeout(TWIN_TIMEOUT, response).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) => Err("the connection dropped before the hub answered".into()),
            Err(_) => Err(format!(
                "no answer from the hub within {} s",
                TWIN_TIMEOUT.as_secs()
            )),
        }
    }

    /// After a connect: the full twin, desired properties newer than the last applied, and a
    /// fresh report of what the device itself knows.
    async fn catch_up(
        &mut self,
        last_desired: &mut u64,
        pending: &mut Map<String, Value>,
    ) -> Result<(), String> {
        let response = self.request(|reply| Request::TwinGet { reply }).await?;
        if response.status != 200 {
            return Err(format!("twin GET answered {}", response.status));
        }
        let twin: Value = serde_json::from_slice(&response.body)
            .map_err(|e| format!("twin GET body is not JSON: {e}"))?;
        Counters::bump(&self.ctx.counters().twins_fetched);
        tracing::info!(twin = %twin, "twin received");
        let desired = twin.get("desired").cloned().unwrap_or(Value::Null);
        let version = desired.get("$version").and_then(Value::as_u64).unwrap_or(0);
        if version < *last_desired {
            // Desired versions only grow for one device identity: the twin was recreated (the
            // device deleted and added again, or another hub), so what was applied says
            // nothing about this twin.
            tracing::warn!(
                version,
                last_applied = *last_desired,
                "the hub's desired version is older than the last one applied: the twin was \
                 recreated; applying its desired properties"
            );
        }
        if version != *last_desired {
            tracing::info!(
                version,
                last_applied = *last_desired,
                "applying desired properties from the twin"
            );
            self.apply_all(&desired, version, pending).await;
            *last_desired = version;
            self.save_applied(version).await;
        }
        if let Value::Object(patch) = self.cellular.report() {
            combine(pending, patch);
        }
        if let Value::Object(patch) = self.ctx.door().reported() {
            combine(pending, patch);
        }
        Ok(())
    }

    async fn on_desired_patch(
        &mut self,
        version: Option<u64>,
        body: &[u8],
        last_desired: &mut u64,
        pending: &mut Map<String, Value>,
    ) {
        let patch: Value = match serde_json::from_slice(body) {
            Ok(Value::Object(patch)) => Value::Object(patch),
            Ok(_) | Err(_) => {
                tracing::warn!(
                    bytes = body.len(),
                    "ignored a desired patch that is not a JSON object"
                );
                return;
            }
        };
        let version = version
            .or_else(|| patch.get("$version").and_then(Value::as_u64))
            .unwrap_or(0);
        if version <= *last_desired {
            tracing::debug!(
                version,
                last_applied = *last_desired,
                "desired patch already applied"
            );
            return;
        }
        self.apply_all(&patch, version, pending).await;
        *last_desired = version;
        self.save_applied(version).await;
    }

    /// Saves the applied version with what it set, before its acknowledgements are sent: a
    /// restart then neither applies it again nor loses its effect.
    async fn save_applied(&mut self, version: u64) {
        self.applied.version = version;
        self.applied.settings = self.ctx.settings().clone();
        if let Some(store) = &self.store {
            if !store.save_desired(&self.applied).await {
                tracing::debug!(
                    version,
                    "desired version not saved: the outbox is not durable"
                );
            }
        }
    }

    /// Runs each desired property through its handler and queues its acknowledgement.
    async fn apply_all(&mut self, desired: &Value, version: u64, pending: &mut Map<String, Value>) {
        let Some(properties) = desired.as_object() else {
            return;
        };
        let registry = self
            .registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (name, value) in properties {
            if name.starts_with('$') {
                continue;
            }
            let Some(ack) = apply_desired(&registry, self.ctx.clone(), name, value.clone()).await
            else {
                continue;
            };
            Counters::bump(&self.ctx.counters().desired_applied);
            if name == TELEMETRY_INTERVAL && ack.status == 200 {
                self.applied.telemetry_interval = Some(self.ctx.telemetry_interval().as_secs_f64());
            }
            tracing::info!(property = %name, version, ac = ack.status, "desired property handled");
            let mut ack_patch = Map::new();
            ack_patch.insert(
                name.clone(),
                json!({"value": value, "ac": ack.status, "av": version, "ad": ack.description}),
            );
            combine(pending, ack_patch);
        }
    }

    /// Sends the pending patch; returns when to try again if it must be retried.
    async fn send_pending(&mut self, pending: &mut Map<String, Value>) -> Option<Instant> {
        let patch = std::mem::take(pending);
        let body = serde_json::to_vec(&patch).unwrap_or_default();
        let outcome = self
            .request(|reply| Request::TwinPatchReported { body, reply })
            .await;
        match outcome {
            Ok(response) if response.status == 204 => {
                Counters::bump(&self.ctx.counters().reported_patches);
                tracing::info!(version = response.version, keys = ?patch.keys().collect::<Vec<_>>(), "reported properties updated");
                self.backoff.reset();
                None
            }
            Ok(response) if response.status == 429 || response.status >= 500 => {
                let delay = self.backoff.next_delay();
                tracing::warn!(
                    status = response.status,
                    retry_in_s = delay.as_secs_f32(),
                    "reported patch refused for now; will retry"
                );
                restore(pending, patch);
                Some(Instant::now() + delay)
            }
            Ok(response) => {
                let reason = String::from_utf8_lossy(&response.body).into_owned();
                tracing::error!(status = response.status, %reason, keys = ?patch.keys().collect::<Vec<_>>(),
                    "the hub rejected a reported patch; it is dropped");
                None
            }
            Err(reason) => {
                let delay = self.backoff.next_delay();
                tracing::warn!(%reason, retry_in_s = delay.as_secs_f32(), "reported patch not confirmed; will retry");
                restore(pending, patch);
                Some(Instant::now() + delay)
            }
        }
    }
}

/// Puts an unsent patch back under whatever was reported since (the newer values win).
fn restore(pending: &mut Map<String, Value>, unsent: Map<String, Value>) {
    let newer = std::mem::replace(pending, unsent);
    combine(pending, newer);
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_keeps_nulls_and_lets_newer_values_win() {
        let mut pending = json!({"a": {"x": 1, "y": 2}, "b": 1})
            .as_object()
            .unwrap()
            .clone();
        combine(
            &mut pending,
            json!({"a": {"y": null, "z": 3}, "b": {"c": 1}})
                .as_object()
                .unwrap()
                .clone(),
        );
        assert_eq!(
            Value::Object(pending.clone()),
            json!({"a": {"x": 1, "y": null, "z": 3}, "b": {"c": 1}})
        );
        let unsent = json!({"a": {"x": 0, "w": 9}}).as_object().unwrap().clone();
        restore(&mut pending, unsent);
        assert_eq!(
            pending["a"]["x"], 1,
            "the newer value wins over the unsent one"
        );
        assert_eq!(pending["a"]["w"], 9);
    }
}
