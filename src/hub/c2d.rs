//! THE CLOUD-TO-DEVICE QUEUE: messages a service sends to a device (over AMQP at
//! `/messages/devicebound`, or through the REST extension), kept per device until the device
//! completes them, as IoT Hub keeps them.
//!
//! - At most [`MAX_QUEUE`] (50) wait per device; one more is refused with
//!   `DeviceMaximumQueueDepthExceeded`. An unknown device is refused with `DeviceNotFound`.
//! - Every message is a row in the hub's store (`c2d_messages`) before it is accepted, and is
//!   deleted when its device completes it: the queue survives reconnects and hub restarts.
//! - Each message expires at its `absolute-expiry-time`, or [`DEFAULT_TTL`] (IoT Hub's default
//!   of one hour) after it was sent. An expired message is dropped, delivered or not.
//! - Delivery is over MQTT at QoS 1, only while the device is connected and subscribed to
//!   `devices/{id}/messages/devicebound/#` (as IoT Hub: nothing before the subscription; a
//!   persistent session keeps it). The PUBACK completes the message (MQTT cannot reject or
//!   abandon). A message delivered but not acknowledged goes out again on the device's next
//!   connection: under the same packet id when its persistent session resumes (the session
//!   resends it), else once the device subscribes again.
//! - Messages queued for an earlier device of the same id (deleted and created again: another
//!   generation id) are purged, not delivered.
//! - Feedback (`iothub-ack` = `positive`, `negative` or `full`): a record per outcome
//!   (Success on completion, Expired, Purged), kept in memory (at most [`MAX_FEEDBACK`], the
//!   oldest dropped) until a service takes it from `/messages/servicebound/feedback`
//!   (`amqp::feedback`). Feedback does not survive a restart.
//!
//! May not touch sockets: it reaches a device only through `Sessions::deliver_tracked`, and is
//! told of connections, subscriptions and PUBACKs by `mqtt::connection`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::Publish;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::hub::store::{Store, StoreError};
use crate::hub::HubState;
use crate::protocol::error_code::ErrorCode;
use crate::protocol::property_bag::PropertyBag;
use crate::protocol::topic::{c2d_topic, SubscriptionKind};

/// Messages that may wait for one device, as on IoT Hub.
pub const MAX_QUEUE: usize = 50;
/// Largest message body, as on IoT Hub.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Lifetime of a message sent without an expiry time: IoT Hub's default TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// How often expired messages are looked for (a device that connects never gets one anyway).
pub const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);
/// Feedback records kept for services; beyond, the oldest is dropped (IoT Hub's feedback queue
/// has a TTL of one hour by default; this bounds memory instead).
pub const MAX_FEEDBACK: usize = 10_000;

/// What feedback the sender asked for (`iothub-ack`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ack {
    #[default]
    None,
    Positive,
    Negative,
    Full,
}

impl Ack {
    /// `none`, `positive`, `negative` or `full`, in any case (the C SDK sends `Full`).
    pub fn parse(text: &str) -> Option<Ack> {
        match text.to_ascii_lowercase().as_str() {
            "none" => Some(Ack::None),
            "positive" => Some(Ack::Positive),
            "negative" => Some(Ack::Negative),
            "full" => Some(Ack::Full),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Ack::None => "none",
            Ack::Positive => "positive",
            Ack::Negative => "negative",
            Ack::Full => "full",
        }
    }

    fn wants(self, status: FeedbackStatus) -> bool {
        match status {
            FeedbackStatus::Success => matches!(self, Ack::Positive | Ack::Full),
            _ => matches!(self, Ack::Negative | Ack::Full),
        }
    }
}

/// A message as a service sends it.
#[derive(Clone, Debug, Default)]
pub struct Outgoing {
    /// `None`: the hub gives it a UUID.
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// Unix milliseconds; `None`: [`DEFAULT_TTL`] from now.
    pub expiry_ms: Option<i64>,
    pub ack: Ack,
    /// Application properties, in the order sent.
    pub properties: Vec<(String, String)>,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("device {0} is not registered")]
    DeviceNotFound(String),
    #[error("the queue of device {0} holds {MAX_QUEUE} messages already")]
    QueueFull(String),
    #[error("the message is {0} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("the message cannot be stored")]
    Store(#[source] StoreError),
}

impl SendError {
    /// The IoT Hub error code of the refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            SendError::DeviceNotFound(_) => ErrorCode::DeviceNotFound,
            SendError::QueueFull(_) => ErrorCode::DeviceMaximumQueueDepthExceeded,
            SendError::TooLarge(_) => ErrorCode::MessageTooLarge,
            SendError::Store(_) => ErrorCode::ServerError,
        }
    }
}

/// A message's properties as stored (the row's `doc`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    message_id: String,
    correlation_id: Option<String>,
    content_type: Option<String>,
    content_encoding: Option<String>,
    ack: Ack,
    properties: Vec<(String, String)>,
    enqueued_ms: i64,
    expiry_ms: i64,
    /// The device's generation when it was sent: a device created again under the same id is
    /// another device, and does not get these messages.
    generation_id: String,
}

struct Queued {
    seq: i64,
    meta: Meta,
    body: Bytes,
    /// The packet id it went out under on the device's current session, until the PUBACK.
    pkid: Option<u16>,
}

/// The outcome of a message, for feedback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeedbackStatus {
    Success,
    Expired,
    Purged,
}

impl FeedbackStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            FeedbackStatus::Success => "Success",
            FeedbackStatus::Expired => "Expired",
            FeedbackStatus::Purged => "Purged",
        }
    }
}

/// One record of a feedback batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedbackRecord {
    pub original_message_id: String,
    pub device_id: String,
    pub device_generation_id: String,
    pub status: FeedbackStatus,
    /// When the outcome happened, unix milliseconds.
    pub enqueued_ms: i64,
}

impl FeedbackRecord {
    /// The record as IoT Hub writes it in a feedback message's JSON array.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "originalMessageId": self.original_message_id,
            "enqueuedTimeUtc": utc_text(self.enqueued_ms),
            "statusCode": self.status.as_str(),
            "description": self.status.as_str(),
            "deviceId": self.device_id,
            "deviceGenerationId": self.device_generation_id,
        })
    }
}

fn utc_text(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The per-device queues and the feedback waiting for services.
pub struct CloudToDevice {
    store: Arc<Store>,
    queues: Mutex<HashMap<String, VecDeque<Queued>>>,
    feedback: Mutex<VecDeque<FeedbackRecord>>,
    /// Woken when feedback is added.
    pub feedback_added: Notify,
}

impl CloudToDevice {
    /// The queues as the store has them.
    pub fn load(store: Arc<Store>) -> Result<CloudToDevice, StoreError> {
        let mut queues: HashMap<String, VecDeque<Queued>> = HashMap::new();
        let mut unreadable = Vec::new();
        for (seq, device_id, doc, body) in store.load_c2d()? {
            match serde_json::from_str::<Meta>(&doc) {
                Ok(meta) => queues.entry(device_id).or_default().push_back(Queued {
                    seq,
                    meta,
                    body: Bytes::from(body),
                    pkid: None,
                }),
                Err(error) => {
                    tracing::warn!(seq, device = device_id, %error, "unreadable cloud-to-device message dropped");
                    unreadable.push(seq);
                }
            }
        }
        if !unreadable.is_empty() {
            store.delete_c2d(&unreadable)?;
        }
        Ok(CloudToDevice {
            store,
            queues: Mutex::new(queues),
            feedback: Mutex::new(VecDeque::new()),
            feedback_added: Notify::new(),
        })
    }

    fn queues(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<Queued>>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Messages waiting for `device_id` (delivered or not, not yet completed).
    pub fn pending(&self, device_id: &str) -> usize {
        self.queues().get(device_id).map_or(0, VecDeque::len)
    }

    /// Takes up to `max` feedback records, oldest first.
    pub fn take_feedback(&self, max: usize) -> Vec<FeedbackRecord> {
        let mut feedback = self.feedback.lock().unwrap_or_else(|p| p.into_inner());
        let n = max.min(feedback.len());
        feedback.drain(..n).collect()
    }

    /// Puts records a service did not take back at the front, in their order.
    pub fn return_feedback(&self, records: Vec<FeedbackRecord>) {
        let mut feedback = self.feedback.lock().unwrap_or_else(|p| p.into_inner());
        for record in records.into_iter().rev() {
            feedback.push_front(record);
        }
        feedback.truncate(MAX_FEEDBACK);
        drop(feedback);
        self.feedback_added.notify_waiters();
    }

    fn add_feedback(&self, records: Vec<FeedbackRecord>) {
        if records.is_empty() {
            return;
        }
        let mut feedback = self.feedback.lock().unwrap_or_else(|p| p.into_inner());
        for record in records {
            if feedback.len() >= MAX_FEEDBACK {
                feedback.pop_front();
            }
            feedback.push_back(record);
        }
        drop(feedback);
        self.feedback_added.notify_waiters();
    }

    /// Deletes finished messages' rows; a failure is logged (the message would come back at
    /// the next start: at least once, as IoT Hub promises).
    fn forget(&self, seqs: &[i64]) {
        if seqs.is_empty() {
            return;
        }
        if let Err(error) = self.store.delete_c2d(seqs) {
            let reason = crate::common::logging::error_chain(&error);
            tracing::warn!(
                reason,
                "finished cloud-to-device messages not deleted from the store"
            );
        }
    }
}

/// Drops from `queue` what expired by `now` or belongs to another generation of the device;
/// returns the feedback and the rows to delete.
fn prune(
    device_id: &str,
    queue: &mut VecDeque<Queued>,
    generation: Option<&str>,
    now: i64,
) -> (Vec<FeedbackRecord>, Vec<i64>) {
    let mut feedback = Vec::new();
    let mut gone = Vec::new();
    queue.retain(|q| {
        let status = if generation != Some(q.meta.generation_id.as_str()) {
            FeedbackStatus::Purged
        } else if q.meta.expiry_ms <= now {
            FeedbackStatus::Expired
        } else {
            return true;
        };
        tracing::info!(
            device = device_id,
            message_id = q.meta.message_id,
            status = status.as_str(),
            "cloud-to-device message dropped"
        );
        if q.meta.ack.wants(status) {
            feedback.push(FeedbackRecord {
                original_message_id: q.meta.message_id.clone(),
                device_id: device_id.to_string(),
                device_generation_id: q.meta.generation_id.clone(),
                status,
                enqueued_ms: now,
            });
        }
        gone.push(q.seq);
        false
    });
    (feedback, gone)
}

/// Queues a message for `device_id` and delivers it at once if the device can take it.
/// Returns the message id.
pub fn send(state: &HubState, device_id: &str, message: Outgoing) -> Result<String, SendError> {
    let c2d = &state.c2d;
    let (generation_id, live) = state
        .registry
        .get(device_id, |d| (d.generation_id.clone(), d.live.clone()))
        .map_err(|_| SendError::DeviceNotFound(device_id.to_string()))?;
    if message.body.len() > MAX_MESSAGE_BYTES {
        return Err(SendError::TooLarge(message.body.len()));
    }
    let now = now_ms();
    let meta = Meta {
        message_id: message
            .message_id
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        correlation_id: message.correlation_id,
        content_type: message.content_type,
        content_encoding: message.content_encoding,
        ack: message.ack,
        properties: message.properties,
        enqueued_ms: now,
        expiry_ms: message
            .expiry_ms
            .unwrap_or(now + DEFAULT_TTL.as_millis() as i64),
        generation_id: generation_id.clone(),
    };
    let message_id = meta.message_id.clone();
    let doc = serde_json::to_string(&meta).expect("a message's properties always serialize");
    {
        let mut queues = c2d.queues();
        let queue = queues.entry(device_id.to_string()).or_default();
        let (feedback, gone) = prune(device_id, queue, Some(&generation_id), now);
        if queue.len() >= MAX_QUEUE {
            drop(queues);
            c2d.forget(&gone);
            c2d.add_feedback(feedback);
            return Err(SendError::QueueFull(device_id.to_string()));
        }
        // Under the lock: rows and memory in the same order.
        let seq = c2d
            .store
            .put_c2d(device_id, &doc, &message.body)
            .map_err(SendError::Store)?;
        queue.push_back(Queued {
            seq,
            meta,
            body: message.body,
            pkid: None,
        });
        drop(queues);
        c2d.forget(&gone);
        c2d.add_feedback(feedback);
    }
    live.cloud_to_device_sent
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::debug!(
        device = device_id,
        message_id,
        "cloud-to-device message queued"
    );
    pump(state, device_id);
    Ok(message_id)
}

/// The topic a queued message goes out on: its property bag as IoT Hub builds it.
fn topic_of(device_id: &str, meta: &Meta) -> String {
    let mut bag = PropertyBag::new();
    bag.insert("$.mid", meta.message_id.clone());
    bag.insert("$.to", format!("/devices/{device_id}/messages/devicebound"));
    if let Some(cid) = &meta.correlation_id {
        bag.insert("$.cid", cid.clone());
    }
    if let Some(ct) = &meta.content_type {
        bag.insert("$.ct", ct.clone());
    }
    if let Some(ce) = &meta.content_encoding {
        bag.insert("$.ce", ce.clone());
    }
    bag.insert("iothub-ack", meta.ack.as_str());
    for (key, value) in &meta.properties {
        bag.insert(key.clone(), value.clone());
    }
    c2d_topic(device_id, &bag)
}

/// Sends what waits for `device_id` and has not gone out on its current session, in order,
/// if the device is connected and subscribed; stops at the first that cannot go.
pub fn pump(state: &HubState, device_id: &str) {
    if !state
        .sessions
        .is_reachable(device_id, SubscriptionKind::CloudToDevice)
    {
        return;
    }
    let now = now_ms();
    let mut queues = state.c2d.queues();
    let Some(queue) = queues.get_mut(device_id) else {
        return;
    };
    for queued in queue.iter_mut().filter(|q| q.pkid.is_none()) {
        if queued.meta.expiry_ms <= now {
            continue; // the expiry task drops it, with its feedback
        }
        match state.sessions.deliver_tracked(
            device_id,
            SubscriptionKind::CloudToDevice,
            topic_of(device_id, &queued.meta),
            queued.body.clone(),
        ) {
            Ok(pkid) => queued.pkid = Some(pkid),
            Err(reason) => {
                tracing::debug!(device = device_id, %reason, "cloud-to-device delivery deferred");
                break;
            }
        }
    }
}

/// A connection took over `device_id`'s session: what went out under a packet id the session
/// resends (`resend`) is still out; the rest goes out again. Then sends what waits.
pub fn on_attach(state: &HubState, device_id: &str, resend: &[Publish]) {
    {
        let mut queues = state.c2d.queues();
        if let Some(queue) = queues.get_mut(device_id) {
            for queued in queue.iter_mut() {
                if let Some(pkid) = queued.pkid {
                    if !resend.iter().any(|p| p.pkid == pkid) {
                        queued.pkid = None;
                    }
                }
            }
        }
    }
    pump(state, device_id);
}

/// A PUBACK from `device_id`: the message that went out under `pkid`, if one did, is complete.
pub fn on_puback(state: &HubState, device_id: &str, pkid: u16) {
    let c2d = &state.c2d;
    let done = {
        let mut queues = c2d.queues();
        let Some(queue) = queues.get_mut(device_id) else {
            return;
        };
        let Some(index) = queue.iter().position(|q| q.pkid == Some(pkid)) else {
            return;
        };
        let done = queue.remove(index);
        if queue.is_empty() {
            queues.remove(device_id);
        }
        done
    };
    let Some(done) = done else { return };
    tracing::debug!(
        device = device_id,
        message_id = done.meta.message_id,
        "cloud-to-device message completed"
    );
    c2d.forget(&[done.seq]);
    if done.meta.ack.wants(FeedbackStatus::Success) {
        c2d.add_feedback(vec![FeedbackRecord {
            original_message_id: done.meta.message_id,
            device_id: device_id.to_string(),
            device_generation_id: done.meta.generation_id,
            status: FeedbackStatus::Success,
            enqueued_ms: now_ms(),
        }]);
    }
}

/// Drops expired messages, and those of devices deleted or created again, everywhere.
pub fn expire(state: &HubState) {
    let c2d = &state.c2d;
    let now = now_ms();
    let mut feedback = Vec::new();
    let mut gone = Vec::new();
    {
        let mut queues = c2d.queues();
        for (device_id, queue) in queues.iter_mut() {
            let generation = state
                .registry
                .get(device_id, |d| d.generation_id.clone())
                .ok();
            let (f, g) = prune(device_id, queue, generation.as_deref(), now);
            feedback.extend(f);
            gone.extend(g);
        }
        queues.retain(|_, q| !q.is_empty());
    }
    c2d.forget(&gone);
    c2d.add_feedback(feedback);
}

/// Runs [`expire`] every [`EXPIRY_INTERVAL`] until shutdown.
pub async fn run_expiry(state: Arc<HubState>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(EXPIRY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => expire(&state),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(ack: Ack, expiry_ms: i64) -> Meta {
        Meta {
            message_id: "m1".into(),
            correlation_id: Some("c1".into()),
            content_type: Some("application/json".into()),
            content_encoding: None,
            ack,
            properties: vec![("k".into(), "a b".into())],
            enqueued_ms: 0,
            expiry_ms,
            generation_id: "g1".into(),
        }
    }

    #[test]
    fn the_topic_carries_the_property_bag_as_iot_hub_builds_it() {
        assert_eq!(
            topic_of("d1", &meta(Ack::Full, 10)),
            "devices/d1/messages/devicebound/%24.mid=m1&%24.to=%2Fdevices%2Fd1%2Fmessages%2Fdevicebound\
             &%24.cid=c1&%24.ct=application%2Fjson&iothub-ack=full&k=a%20b"
        );
    }

    #[test]
    fn ack_values_parse_in_any_case_and_ask_for_their_outcomes() {
        assert_eq!(Ack::parse("Full"), Some(Ack::Full));
        assert_eq!(Ack::parse("none"), Some(Ack::None));
        assert_eq!(Ack::parse("always"), None);
        assert!(Ack::Positive.wants(FeedbackStatus::Success));
        assert!(!Ack::Positive.wants(FeedbackStatus::Expired));
        assert!(Ack::Negative.wants(FeedbackStatus::Expired));
        assert!(!Ack::None.wants(FeedbackStatus::Success));
    }

    #[test]
    fn pruning_drops_expired_and_foreign_generations_with_their_feedback() {
        let queued = |seq, ack, expiry, generation: &str| {
            let mut meta = meta(ack, expiry);
            meta.generation_id = generation.into();
            Queued {
                seq,
                meta,
                body: Bytes::new(),
                pkid: None,
            }
        };
        let mut queue = VecDeque::from(vec![
            queued(1, Ack::Full, 100, "g1"),
            queued(2, Ack::Negative, 1_000, "g1"),
            queued(3, Ack::Full, 1_000, "g0"),
            queued(4, Ack::Positive, 50, "g1"),
        ]);
        let (feedback, gone) = prune("d1", &mut queue, Some("g1"), 500);
        assert_eq!(gone, vec![1, 3, 4]);
        assert_eq!(queue.len(), 1);
        let statuses: Vec<_> = feedback.iter().map(|f| f.status).collect();
        assert_eq!(
            statuses,
            vec![FeedbackStatus::Expired, FeedbackStatus::Purged],
            "positive-only asks nothing of an expiry"
        );
        let json = feedback[0].to_json();
        assert_eq!(json["statusCode"], "Expired");
        assert_eq!(json["enqueuedTimeUtc"], "1970-01-01T00:00:00.500Z");
    }
}
