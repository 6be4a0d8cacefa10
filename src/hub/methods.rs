//! Direct methods: a service call travels to the device as a QoS 0 publish on
//! `$iothub/methods/POST/{name}/?$rid=`, and the device's answer on `$iothub/methods/res/`
//! completes the waiting call.
//!
//! Pending calls are keyed by the request id the hub chose, together with the device id, so a
//! device can only answer calls made to itself. A call ends in the device's answer, 404103 when
//! the device is not reachable within `connectTimeoutInSeconds`, or 504101 after
//! `responseTimeoutInSeconds`; whichever way, its pending entry is removed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::error::IotHubError;
use super::HubState;
use crate::protocol::error_code::ErrorCode;
use crate::protocol::method::{MethodInvocation, MethodResult};
use crate::protocol::topic::{method_request_topic, SubscriptionKind};

#[derive(Default)]
pub struct MethodCalls {
    pending: Mutex<HashMap<String, (String, oneshot::Sender<MethodResult>)>>,
    next_rid: AtomicU64,
    /// Calls waiting (up to `connectTimeoutInSeconds`) for their device to connect and
    /// subscribe; what tests and operators can see of a call that is not sent yet.
    waiting: AtomicUsize,
}

impl MethodCalls {
    /// Calls now waiting for their device to become reachable.
    pub fn waiting_for_device(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (String, oneshot::Sender<MethodResult>)>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands a device's answer to the waiting call. Returns false when no call of this device
    /// waits under that id (it timed out, or the id is not this device's).
    pub fn complete(&self, device_id: &str, rid: &str, status: i32, body: &[u8]) -> bool {
        let mut pending = self.lock();
        match pending.get(rid) {
            Some((owner, _)) if owner == device_id => {}
            _ => return false,
        }
        let Some((_, reply)) = pending.remove(rid) else {
            return false;
        };
        drop(pending);
        let payload = parse_payload(body);
        reply.send(MethodResult { status, payload }).is_ok()
    }
}

/// A device's method answer body: JSON when it parses, else the text as a JSON string,
/// empty as null.
fn parse_payload(body: &[u8]) -> Value {
    let text = String::from_utf8_lossy(body);
    if text.trim().is_empty() {
        return Value::Null;
    }
    serde_json::from_str(&text).unwrap_or(Value::String(text.into_owned()))
}

/// Removes a pending call when the invoking future ends, however it ends.
struct PendingGuard<'a> {
    calls: &'a MethodCalls,
    rid: String,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.calls.lock().remove(&self.rid);
    }
}

/// Calls a method on a device and waits for its answer; counted by status for the metrics.
pub async fn invoke(
    state: &HubState,
    device_id: &str,
    invocation: MethodInvocation,
) -> Result<MethodResult, IotHubError> {
    let result = call(state, device_id, invocation).await;
    state.counters.method_call(match &result {
        Ok(answer) => answer.status,
        Err(error) => i32::from(error.code.http_status()),
    });
    result
}

async fn call(
    state: &HubState,
    device_id: &str,
    invocation: MethodInvocation,
) -> Result<MethodResult, IotHubError> {
    invocation
        .validate()
        .map_err(|e| IotHubError::argument(e.to_string()))?;
    if !state.registry.contains(device_id) {
        return Err(IotHubError::device_not_found(device_id));
    }
    wait_until_reachable(state, device_id, invocation.connect_timeout()).await?;

    let calls = &state.methods;
    let rid = format!("{:x}", calls.next_rid.fetch_add(1, Ordering::Relaxed) + 1);
    let (reply_tx, reply_rx) = oneshot::channel();
    calls
        .lock()
        .insert(rid.clone(), (device_id.to_string(), reply_tx));
    let _guard = PendingGuard {
        calls,
        rid: rid.clone(),
    };
    let payload = serde_json::to_vec(&invocation.payload).unwrap_or_default();
    state
        .sessions
        .deliver(
            device_id,
            SubscriptionKind::Methods,
            // Method calls travel at QoS 0, as on IoT Hub: a lost call times out.
            rumqttc::QoS::AtMostOnce,
            method_request_topic(&invocation.method_name, &rid),
            Bytes::from(payload),
        )
        .map_err(|_| not_online(device_id))?;
    match tokio::time::timeout(invocation.response_timeout(), reply_rx).await {
        Ok(Ok(result)) => Ok(result),
        // The sender is dropped only with the pending entry, i.e. never while we wait.
        Ok(Err(_)) | Err(_) => Err(IotHubError::new(
            ErrorCode::GatewayTimeout,
            format!(
                "Timed out waiting for the response from device {device_id} to method '{}'.",
                invocation.method_name
            ),
        )),
    }
}

fn not_online(device_id: &str) -> IotHubError {
    IotHubError::new(
        ErrorCode::DeviceNotOnline,
        format!("Device {device_id} is not online or has not subscribed to direct methods."),
    )
}

async fn wait_until_reachable(
    state: &HubState,
    device_id: &str,
    connect_timeout: Duration,
) -> Result<(), IotHubError> {
    let deadline = Instant::now() + connect_timeout;
    let mut counted = None;
    loop {
        // Registered before the check, so a change between the check and the wait wakes us.
        let changed = state.sessions.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if state
            .sessions
            .is_reachable(device_id, SubscriptionKind::Methods)
        {
            return Ok(());
        }
        if counted.is_none() {
            counted = Some(WaitingGuard::new(&state.methods.waiting));
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            return Err(not_online(device_id));
        }
    }
}

/// Counts a call in [`MethodCalls::waiting_for_device`] for as long as it lives.
struct WaitingGuard<'a>(&'a AtomicUsize);

impl<'a> WaitingGuard<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        WaitingGuard(count)
    }
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
