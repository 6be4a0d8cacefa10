//! MQTT sessions: what the hub remembers per device identity between and across connections,
//! and the one path by which the rest of the hub sends something to a connected device.
//!
//! A session holds the device's subscriptions, its QoS 1 messages that the device has not
//! acknowledged yet (resent with DUP when a persistent session resumes), and a handle to the
//! connection task currently serving it. Only one connection serves an identity: attaching a
//! new one drops the old handle, whose channel then closes and ends the old connection.
//! Sessions live in memory; a hub restart starts every device with a fresh session.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use rumqttc::{Publish, QoS};
use tokio::sync::{mpsc, Notify};

use crate::protocol::topic::SubscriptionKind;

/// QoS 1 messages to one device that may wait for its PUBACK; more is refused (IoT Hub allows
/// 50 pending cloud-to-device messages per device).
pub const MAX_INFLIGHT: usize = 50;
/// Capacity of the channel from the hub to one connection task. A connection that lets it
/// fill up is not reading its socket; delivery then fails and the connection is closed.
pub const CONNECTION_CHANNEL: usize = 128;

/// What the hub asks a connection task to do. Boxed: a connection's channel allocates its
/// slots up front, and 10,000 idle connections should not each hold 32 full `Publish`es.
#[derive(Debug)]
pub enum Outbound {
    Publish(Box<Publish>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeliveryError {
    #[error("the device is not connected")]
    NotConnected,
    #[error("the device has not subscribed to these messages")]
    NotSubscribed,
    #[error("the device has {MAX_INFLIGHT} unacknowledged messages already")]
    TooManyPending,
    #[error("the device is not reading its connection")]
    Backlogged,
}

struct ConnectionHandle {
    tx: mpsc::Sender<Outbound>,
}

#[derive(Default)]
struct Session {
    subscriptions: Vec<(SubscriptionKind, QoS)>,
    inflight: BTreeMap<u16, Publish>,
    next_pkid: u16,
    connection: Option<ConnectionHandle>,
    /// The id of the connection attached last. It outlives `connection`, which a backlogged
    /// connection loses at once, so that its task's `detach` still counts as the current one.
    last_connection: u64,
    /// Set by a CONNECT with clean session = 1: the session ends with the connection.
    clean: bool,
    /// False for a session made by a queued cloud-to-device message before any connection:
    /// its messages carry over, but the device is told there was no session to resume.
    connected_before: bool,
}

impl Session {
    fn next_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            if self.next_pkid != 0 && !self.inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    fn subscription(&self, kind: SubscriptionKind) -> Option<QoS> {
        self.subscriptions
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, qos)| *qos)
    }
}

/// A connection's side of an attached session.
pub struct Attached {
    pub connection_id: u64,
    pub rx: mpsc::Receiver<Outbound>,
    pub session_present: bool,
    /// Unacknowledged QoS 1 messages of the resumed session, to send again (DUP set).
    pub resend: Vec<Publish>,
}

#[derive(Default)]
pub struct Sessions {
    sessions: Mutex<HashMap<String, Session>>,
    next_connection: AtomicU64,
    /// Woken whenever a device connects, disconnects or subscribes, for callers that wait
    /// for a device to become reachable (direct methods' `connectTimeoutInSeconds`).
    pub changed: Notify,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes a new connection the one serving `device_id`, replacing any other.
    pub fn attach(&self, device_id: &str, clean_session: bool) -> Attached {
        let connection_id = self.next_connection.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(CONNECTION_CHANNEL);
        let mut sessions = self.lock();
        let existing = sessions.remove(device_id);
        let (mut session, session_present) = match existing {
            Some(old) if !clean_session && !old.clean => {
                let present = old.connected_before;
                (old, present)
            }
            _ => (Session::default(), false),
        };
        session.clean = clean_session;
        session.connected_before = true;
        session.last_connection = connection_id;
        // Dropping the old handle closes the old connection's channel: it ends itself.
        session.connection = Some(ConnectionHandle { tx });
        let resend = session
            .inflight
            .values()
            .map(|p| {
                let mut p = p.clone();
                p.dup = true;
                p
            })
            .collect();
        sessions.insert(device_id.to_string(), session);
        drop(sessions);
        self.changed.notify_waiters();
        Attached {
            connection_id,
            rx,
            session_present,
            resend,
        }
    }

    /// Called by a connection task when it ends. Returns whether the device is now
    /// disconnected: false when a newer connection replaced this one (which leaves the session
    /// alone), true when this was the last connection or the session was removed.
    pub fn detach(&self, device_id: &str, connection_id: u64) -> bool {
        let mut sessions = self.lock();
        let current = match sessions.get_mut(device_id) {
            Some(s) if s.last_connection == connection_id => s,
            Some(_) => return false,
            // The session was removed (device deleted or disabled) while this connection was
            // its last one: the device is now disconnected.
            None => return true,
        };
        current.connection = None;
        if current.clean {
            sessions.remove(device_id);
        }
        drop(sessions);
        self.changed.notify_waiters();
        true
    }

    /// Drops a device's session entirely (the device was deleted or disabled): its
    /// connection's channel closes, which ends the connection.
    pub fn remove(&self, device_id: &str) {
        self.lock().remove(device_id);
        self.changed.notify_waiters();
    }

    /// Records a subscription; QoS 2 is granted as QoS 1. Returns the granted QoS.
    pub fn subscribe(&self, device_id: &str, kind: SubscriptionKind, requested: QoS) -> QoS {
        let granted = match requested {
            QoS::AtMostOnce => QoS::AtMostOnce,
            _ => QoS::AtLeastOnce,
        };
        if let Some(session) = self.lock().get_mut(device_id) {
            session.subscriptions.retain(|(k, _)| *k != kind);
            session.subscriptions.push((kind, granted));
        }
        self.changed.notify_waiters();
        granted
    }

    pub fn unsubscribe(&self, device_id: &str, kind: SubscriptionKind) {
        if let Some(session) = self.lock().get_mut(device_id) {
            session.subscriptions.retain(|(k, _)| *k != kind);
        }
        self.changed.notify_waiters();
    }

    /// A PUBACK from the device completes one QoS 1 message.
    pub fn acknowledge(&self, device_id: &str, pkid: u16) {
        if let Some(session) = self.lock().get_mut(device_id) {
            session.inflight.remove(&pkid);
        }
    }

    /// Whether the device is connected now and subscribed to `kind`.
    pub fn is_reachable(&self, device_id: &str, kind: SubscriptionKind) -> bool {
        self.lock()
            .get(device_id)
            .is_some_and(|s| s.connection.is_some() && s.subscription(kind).is_some())
    }

    /// Sends a QoS 1 message now to a connected device subscribed to `kind`, and returns its
    /// packet id: what the cloud-to-device queue (`c2d`) needs to tell which message a PUBACK
    /// completes. Like every QoS 1 message it stays in the session until acknowledged (so a
    /// resumed session resends it under the same id). A full channel takes it back out of the
    /// session and ends the connection: the caller keeps the message and delivers it again.
    pub fn deliver_tracked(
        &self,
        device_id: &str,
        kind: SubscriptionKind,
        topic: String,
        payload: Bytes,
    ) -> Result<u16, DeliveryError> {
        let mut sessions = self.lock();
        let session = sessions
            .get_mut(device_id)
            .ok_or(DeliveryError::NotConnected)?;
        if session.subscription(kind).is_none() {
            return Err(DeliveryError::NotSubscribed);
        }
        let Some(handle) = session.connection.as_ref() else {
            return Err(DeliveryError::NotConnected);
        };
        let tx = handle.tx.clone();
        if session.inflight.len() >= MAX_INFLIGHT {
            return Err(DeliveryError::TooManyPending);
        }
        let mut publish = Publish::from_bytes(topic, QoS::AtLeastOnce, payload);
        publish.pkid = session.next_pkid();
        let pkid = publish.pkid;
        match tx.try_send(Outbound::Publish(Box::new(publish.clone()))) {
            Ok(()) => {
                session.inflight.insert(pkid, publish);
                Ok(pkid)
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                session.connection = None;
                Err(DeliveryError::Backlogged)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(DeliveryError::NotConnected),
        }
    }

    /// Sends a message to a connected, subscribed device at the lower of `max_qos` and the
    /// QoS it subscribed with. QoS 1 messages stay in the session until acknowledged.
    pub fn deliver(
        &self,
        device_id: &str,
        kind: SubscriptionKind,
        max_qos: QoS,
        topic: String,
        payload: Bytes,
    ) -> Result<(), DeliveryError> {
        let mut sessions = self.lock();
        let session = sessions
            .get_mut(device_id)
            .ok_or(DeliveryError::NotConnected)?;
        let granted = session
            .subscription(kind)
            .ok_or(DeliveryError::NotSubscribed)?;
        let qos = if granted == QoS::AtMostOnce || max_qos == QoS::AtMostOnce {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        if session.connection.is_none() {
            return Err(DeliveryError::NotConnected);
        }
        let mut publish = Publish::from_bytes(topic, qos, payload);
        if qos == QoS::AtLeastOnce {
            if session.inflight.len() >= MAX_INFLIGHT {
                return Err(DeliveryError::TooManyPending);
            }
            publish.pkid = session.next_pkid();
            session.inflight.insert(publish.pkid, publish.clone());
        }
        let handle = session
            .connection
            .as_ref()
            .ok_or(DeliveryError::NotConnected)?;
        match handle.tx.try_send(Outbound::Publish(Box::new(publish))) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                // Closing the channel ends the connection; QoS 1 messages stay in the session.
                session.connection = None;
                Err(DeliveryError::Backlogged)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(DeliveryError::NotConnected),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn persistent_session_keeps_subscriptions_and_unacked_messages() {
        let sessions = Sessions::default();
        let mut first = sessions.attach("d1", false);
        assert!(!first.session_present);
        sessions.subscribe("d1", SubscriptionKind::CloudToDevice, QoS::ExactlyOnce);
        sessions
            .deliver(
                "d1",
                SubscriptionKind::CloudToDevice,
                QoS::AtLeastOnce,
                "t".into(),
                Bytes::from("x"),
            )
            .unwrap();
        let Some(Outbound::Publish(sent)) = first.rx.recv().await else {
            panic!("expected a publish");
        };
        assert_eq!(sent.qos, QoS::AtLeastOnce, "QoS 2 is granted as 1");

        let second = sessions.attach("d1", false);
        assert!(
            first.rx.recv().await.is_none(),
            "the old connection is told to end"
        );
        assert!(second.session_present);
        assert_eq!(second.resend.len(), 1);
        assert!(second.resend[0].dup);
        assert!(!sessions.detach("d1", first.connection_id));
        sessions.acknowledge("d1", sent.pkid);
        let third = sessions.attach("d1", false);
        assert!(third.resend.is_empty());
        assert!(sessions.is_reachable("d1", SubscriptionKind::CloudToDevice));

        let clean = sessions.attach("d1", true);
        assert!(!clean.session_present);
        assert!(!sessions.is_reachable("d1", SubscriptionKind::CloudToDevice));
    }

    #[test]
    fn delivery_needs_a_connection_and_a_subscription() {
        let sessions = Sessions::default();
        let send = |s: &Sessions| {
            s.deliver(
                "d1",
                SubscriptionKind::Methods,
                QoS::AtMostOnce,
                "t".into(),
                Bytes::new(),
            )
        };
        assert_eq!(send(&sessions), Err(DeliveryError::NotConnected));
        let attached = sessions.attach("d1", false);
        assert_eq!(send(&sessions), Err(DeliveryError::NotSubscribed));
        sessions.subscribe("d1", SubscriptionKind::Methods, QoS::AtMostOnce);
        assert_eq!(send(&sessions), Ok(()));
        assert!(sessions.detach("d1", attached.connection_id));
        assert_eq!(send(&sessions), Err(DeliveryError::NotConnected));
    }
}
