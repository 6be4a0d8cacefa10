//! `/messages/servicebound/feedback`: the feedback on cloud-to-device messages sent with
//! `iothub-ack` (`hub::c2d` keeps the records), to a service that attaches a receiver here
//! (Node `azure-iothub`'s `getFeedbackReceiver`; azure-iot-hub for Python has none).
//!
//! As IoT Hub sends it: one message per batch of at most [`BATCH`] records, its body the JSON
//! array of records, content type `application/vnd.microsoft.iothub.feedback.json`, user id
//! the hub's name. IoT Hub batches for up to 15 s; this hub sends what is waiting at once (a
//! local hub's user wants to see it now). A batch the service does not accept (released,
//! rejected, modified, or the link gone before the outcome) goes back to the front of the
//! queue for the next receiver. May not touch MQTT.

use std::sync::Arc;

use fe2o3_amqp::types::messaging::{Body, Data, Message, MessageId, Outcome, Properties};
use fe2o3_amqp::types::primitives::{Binary, Timestamp, Value};
use fe2o3_amqp::Sender;
use tokio_util::sync::CancellationToken;

use super::connection::Conn;
use crate::hub::c2d::FeedbackRecord;

/// The node's path (after the host).
pub const NODE: &str = "messages/servicebound/feedback";
/// Records per feedback message, as IoT Hub batches them.
pub const BATCH: usize = 64;
/// The content type of a feedback message.
pub const CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.feedback.json";

/// A batch as one message.
pub fn batch_message(hub_name: &str, records: &[FeedbackRecord]) -> Message<Body<Value>> {
    let body: Vec<serde_json::Value> = records.iter().map(FeedbackRecord::to_json).collect();
    let bytes = serde_json::to_vec(&body).expect("feedback records always serialize");
    Message::builder()
        .properties(Properties {
            message_id: Some(MessageId::String(uuid::Uuid::new_v4().to_string())),
            user_id: Some(Binary::from(hub_name.as_bytes().to_vec())),
            content_type: Some(CONTENT_TYPE.into()),
            creation_time: Some(Timestamp::from_milliseconds(
                chrono::Utc::now().timestamp_millis(),
            )),
            ..Default::default()
        })
        .body(Body::Data(vec![Data(Binary::from(bytes))].into()))
        .build()
}

/// Sends feedback as it comes until the link or the connection ends.
pub async fn serve(mut sender: Sender, conn: Arc<Conn>, stop: CancellationToken) {
    let c2d = &conn.state.c2d;
    loop {
        // Registered before looking, so a record added in between still wakes this loop.
        let added = c2d.feedback_added.notified();
        tokio::pin!(added);
        added.as_mut().enable();
        let records = c2d.take_feedback(BATCH);
        if records.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = &mut added => continue,
            }
        }
        let message = batch_message(&conn.state.eventhub.hub_name, &records);
        // `batchable`: the last field of the transfer is written (module notes of `amqp`).
        let outcome = tokio::select! {
            _ = stop.cancelled() => {
                c2d.return_feedback(records);
                break;
            }
            outcome = async {
                match sender.send_batchable(message).await {
                    Ok(fut) => fut.await,
                    Err(error) => Err(error),
                }
            } => outcome,
        };
        match outcome {
            Ok(Outcome::Accepted(_)) => {
                tracing::debug!(peer = %conn.peer, records = records.len(), "feedback delivered");
            }
            Ok(other) => {
                tracing::info!(peer = %conn.peer, outcome = ?other, "feedback not accepted; kept for the next receiver");
                c2d.return_feedback(records);
                break;
            }
            Err(error) => {
                tracing::debug!(peer = %conn.peer, %error, "feedback link ended; its batch is kept");
                c2d.return_feedback(records);
                break;
            }
        }
    }
    let _ = sender.close().await;
}
