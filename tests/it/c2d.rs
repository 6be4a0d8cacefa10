//! Cloud-to-device messages through real sockets: a fe2o3-amqp client sends on the hub's
//! `/messages/devicebound` (after a `$cbs` put-token over TLS, as azure-iot-hub does, or a
//! SASL login on the plain port), a device takes them over MQTT; the queue's bound, its
//! persistence across reconnects and hub restarts, expiry, refusals, and the feedback link.

use std::time::Duration;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::AmqpError;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Data, Message, MessageId, Outcome, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, Timestamp, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use rumqttc::{Packet, QoS};
use simdevice::hub::{Hub, HubConfig};
use simdevice::protocol::property_bag::PropertyBag;
use tokio::net::TcpStream;

use crate::common::agent::eventually;
use crate::common::amqp_cbs::{self, Cbs};
use crate::common::{connect_packet, device_token, RawDevice, TestHub};

const DEADLINE: Duration = Duration::from_secs(10);
const C2D_FILTER: &str = "devices/d1/messages/devicebound/#";

fn key_of(hub: &TestHub, policy: &str) -> String {
    hub.hub
        .state()
        .policies
        .get(policy)
        .unwrap()
        .primary_key
        .clone()
}

/// SASL PLAIN as `policy` on the plain port, and a session.
async fn login(hub: &TestHub, policy: &str) -> (ConnectionHandle<()>, SessionHandle<()>) {
    let stream = TcpStream::connect(hub.hub.amqp_plain_addr().unwrap())
        .await
        .unwrap();
    let mut connection = Connection::builder()
        .container_id("it-c2d")
        .hostname("localhost")
        .sasl_profile(SaslProfile::Plain {
            username: policy.into(),
            password: key_of(hub, policy),
        })
        .open_with_stream(stream)
        .await
        .expect("SASL PLAIN opens");
    let session = Session::begin(&mut connection).await.unwrap();
    (connection, session)
}

/// What azure-iot-hub does: TLS, SASL ANONYMOUS, then a `$cbs` put-token with an IoT Hub
/// style token for `policy` signed with `key`. Returns the put-token's status code.
async fn cbs_login(
    hub: &TestHub,
    policy: &str,
    key: &str,
) -> (ConnectionHandle<()>, SessionHandle<()>, i32) {
    let (connection, mut session) = amqp_cbs::anonymous_tls(hub).await;
    let expiry = chrono::Utc::now().timestamp() as u64 + 3600;
    let status = Cbs::open(&mut session)
        .await
        .put_token(policy, key, expiry)
        .await;
    (connection, session, status)
}

async fn devicebound(session: &mut SessionHandle<()>) -> Sender {
    Sender::builder()
        .name("c2d-sender")
        .target("amqps://localhost/messages/devicebound")
        .attach(session)
        .await
        .expect("the attach is answered")
}

struct C2d<'a> {
    to: String,
    id: &'a str,
    ack: Option<&'a str>,
    expiry_ms: Option<i64>,
    body: &'a str,
}

impl<'a> C2d<'a> {
    fn to(device: &str, id: &'a str) -> C2d<'a> {
        C2d {
            to: format!("/devices/{device}/messages/devicebound"),
            id,
            ack: None,
            expiry_ms: None,
            body: "hello",
        }
    }

    fn message(&self) -> Message<Data> {
        let mut app = ApplicationProperties::builder().insert("kind", "note");
        if let Some(ack) = self.ack {
            app = app.insert("iothub-ack", ack);
        }
        Message::builder()
            .properties(Properties {
                to: Some(self.to.clone()),
                message_id: Some(MessageId::String(self.id.into())),
                correlation_id: Some(MessageId::String(format!("corr-{}", self.id))),
                content_type: Some("text/plain".into()),
                absolute_expiry_time: self.expiry_ms.map(Timestamp::from_milliseconds),
                ..Default::default()
            })
            .application_properties(app.build())
            .data(Binary::from(self.body.as_bytes().to_vec()))
            .build()
    }
}

async fn send(sender: &mut Sender, message: C2d<'_>) -> Outcome {
    tokio::time::timeout(DEADLINE, sender.send(message.message()))
        .await
        .expect("settled within the deadline")
        .expect("an outcome")
}

fn rejected_with(outcome: &Outcome) -> AmqpError {
    match outcome {
        Outcome::Rejected(rejected) => match &rejected.error.as_ref().unwrap().condition {
            fe2o3_amqp::types::definitions::ErrorCondition::AmqpError(e) => e.clone(),
            other => panic!("condition {other:?}"),
        },
        other => panic!("expected a rejection, got {other:?}"),
    }
}

async fn device(hub: &TestHub, clean: bool) -> RawDevice {
    let key = hub.device_key("d1");
    let (device, ack) = RawDevice::connect_with(
        hub,
        connect_packet("d1", &device_token("d1", &key), clean, 60),
    )
    .await;
    assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
    device
}

/// The next PUBLISH, not acknowledged.
async fn next_unacked(device: &mut RawDevice) -> rumqttc::Publish {
    loop {
        match device.recv().await {
            Some(Packet::Publish(publish)) => return publish,
            Some(_) => continue,
            None => panic!("closed while waiting for a publish"),
        }
    }
}

fn bag(publish: &rumqttc::Publish) -> PropertyBag {
    let tail = publish
        .topic
        .strip_prefix("devices/d1/messages/devicebound/")
        .unwrap_or_else(|| panic!("a C2D topic: {}", publish.topic));
    PropertyBag::parse(tail).unwrap()
}

async fn feedback(session: &mut SessionHandle<()>) -> Vec<serde_json::Value> {
    let mut receiver = Receiver::attach(
        session,
        "feedback",
        "amqps://localhost/messages/serviceBound/feedback", // as Node writes it
    )
    .await
    .unwrap();
    let delivery = tokio::time::timeout(DEADLINE, receiver.recv::<Body<Value>>())
        .await
        .expect("feedback within the deadline")
        .unwrap();
    receiver.accept(&delivery).await.unwrap();
    let message = delivery.into_message();
    let properties = message.properties.as_ref().unwrap();
    assert_eq!(
        properties.content_type.as_ref().map(|s| s.as_str()),
        Some("application/vnd.microsoft.iothub.feedback.json")
    );
    assert_eq!(
        properties.user_id.as_ref().map(|b| b.to_vec()),
        Some(b"localhost".to_vec())
    );
    let Body::Data(batch) = &message.body else {
        panic!("a data body")
    };
    let _ = receiver.close().await;
    serde_json::from_slice(&batch.iter().next().unwrap().0).unwrap()
}

#[tokio::test]
async fn a_message_sent_after_put_token_reaches_the_device_with_its_properties_and_feedback() {
    let hub = TestHub::start().await;
    hub.add_device("d1");
    let mut device = device(&hub, true).await;
    device.subscribe(C2D_FILTER, QoS::AtLeastOnce).await;

    let (mut connection, mut session, status) =
        cbs_login(&hub, "service", &key_of(&hub, "service")).await;
    assert_eq!(
        status, 200,
        "the service policy's token is accepted (200: Node's SDK takes nothing else)"
    );
    let mut sender = devicebound(&mut session).await;
    let mut message = C2d::to("d1", "msg-1");
    message.ack = Some("full");
    message.body = r#"{"cmd":"reboot"}"#;
    assert!(matches!(
        send(&mut sender, message).await,
        Outcome::Accepted(_)
    ));

    let publish = device.next_publish().await;
    assert_eq!(publish.qos, QoS::AtLeastOnce);
    assert_eq!(&publish.payload[..], br#"{"cmd":"reboot"}"#);
    let bag = bag(&publish);
    let entries: Vec<(&str, Option<&str>)> = bag.iter().collect();
    assert_eq!(
        entries,
        vec![
            ("$.mid", Some("msg-1")),
            ("$.to", Some("/devices/d1/messages/devicebound")),
            ("$.cid", Some("corr-msg-1")),
            ("$.ct", Some("text/plain")),
            ("iothub-ack", Some("full")),
            ("kind", Some("note")),
        ],
        "{}",
        publish.topic
    );

    // The PUBACK (sent by next_publish) completes it: Success feedback, nothing pending.
    let records = feedback(&mut session).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["originalMessageId"], "msg-1");
    assert_eq!(records[0]["deviceId"], "d1");
    assert_eq!(records[0]["statusCode"], "Success");
    assert!(records[0]["enqueuedTimeUtc"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert_eq!(hub.hub.state().c2d.pending("d1"), 0);
    let _ = connection.close().await;
    hub.stop().await;
}

#[tokio::test]
async fn refusals_unknown_device_bad_to_full_queue_and_no_service_connect() {
    let hub = TestHub::start().await;
    hub.add_device("d1");

    // A wrong key: put-token refused, and the attach with it.
    let (mut connection, mut session, status) =
        cbs_login(&hub, "service", "d3Jvbmcta2V5LXdyb25nLWtleQ==").await;
    assert_eq!(status, 401);
    let mut sender = devicebound(&mut session).await;
    let refused = tokio::time::timeout(DEADLINE, sender.send(C2d::to("d1", "x").message()))
        .await
        .expect("the detach comes within the deadline");
    assert!(
        format!("{refused:?}").contains("UnauthorizedAccess"),
        "{refused:?}"
    );
    let _ = connection.close().await;

    // registryRead may log in but not send.
    let (mut connection, mut session) = login(&hub, "registryRead").await;
    let mut sender = devicebound(&mut session).await;
    let refused = tokio::time::timeout(DEADLINE, sender.send(C2d::to("d1", "x").message()))
        .await
        .unwrap();
    assert!(
        format!("{refused:?}").contains("UnauthorizedAccess"),
        "{refused:?}"
    );
    let _ = connection.close().await;

    let (mut connection, mut session) = login(&hub, "service").await;
    let mut sender = devicebound(&mut session).await;
    let unknown = send(&mut sender, C2d::to("nobody", "u1")).await;
    assert_eq!(rejected_with(&unknown), AmqpError::NotFound);
    let mut bad_to = C2d::to("d1", "bad");
    bad_to.to = "/devices/d1/messages/events".into();
    assert_eq!(
        rejected_with(&send(&mut sender, bad_to).await),
        AmqpError::InvalidField
    );
    let mut bad_ack = C2d::to("d1", "bad-ack");
    bad_ack.ack = Some("sometimes");
    assert_eq!(
        rejected_with(&send(&mut sender, bad_ack).await),
        AmqpError::InvalidField
    );
    // The link stays usable after rejections: 50 fit, the 51st is refused as IoT Hub does.
    for n in 0..50 {
        let id = format!("m{n}");
        let outcome = send(&mut sender, C2d::to("d1", &id)).await;
        assert!(matches!(outcome, Outcome::Accepted(_)), "{n}: {outcome:?}");
    }
    let full = send(&mut sender, C2d::to("d1", "m50")).await;
    assert_eq!(rejected_with(&full), AmqpError::ResourceLimitExceeded);
    let Outcome::Rejected(rejected) = &full else {
        unreachable!()
    };
    let description = rejected.error.as_ref().unwrap().description.clone();
    assert!(
        description
            .unwrap_or_default()
            .contains("DeviceMaximumQueueDepthExceeded"),
        "the description names IoT Hub's error"
    );
    assert_eq!(hub.hub.state().c2d.pending("d1"), 50);

    // The REST extension goes through the same queue: refused too.
    let reply = hub
        .service()
        .call(
            reqwest::Method::POST,
            "/simdevice/devices/d1/messages/devicebound",
            Some(serde_json::json!({"payload": 1})),
            &[],
        )
        .await;
    assert_eq!(reply.error_code(), Some(403004));
    let _ = connection.close().await;
    hub.stop().await;
}

async fn restart(hub: TestHub) -> TestHub {
    let TestHub { hub, dir } = hub;
    hub.shutdown().await;
    let hub = Hub::start(HubConfig::ephemeral(dir.path()))
        .await
        .expect("the hub starts again");
    TestHub { hub, dir }
}

#[tokio::test]
async fn the_queue_survives_hub_restarts_and_unacknowledged_messages_come_again() {
    let hub = TestHub::start().await;
    hub.add_device("d1");
    {
        let (mut connection, mut session) = login(&hub, "service").await;
        let mut sender = devicebound(&mut session).await;
        for id in ["a", "b", "c"] {
            assert!(matches!(
                send(&mut sender, C2d::to("d1", id)).await,
                Outcome::Accepted(_)
            ));
        }
        let _ = connection.close().await;
    }
    let hub = restart(hub).await;
    assert_eq!(hub.hub.state().c2d.pending("d1"), 3, "kept in hub.db");

    // A persistent session: "a" is taken but not acknowledged, then the device goes away.
    let mut first = device(&hub, false).await;
    first.subscribe(C2D_FILTER, QoS::AtLeastOnce).await;
    let a = next_unacked(&mut first).await;
    assert_eq!(bag(&a).get("$.mid"), Some("a"));
    drop(first);

    // The session resumes: "a" comes again under its packet id (DUP), then the rest, once.
    let mut again = device(&hub, false).await;
    let resent = again.next_publish().await;
    assert_eq!(bag(&resent).get("$.mid"), Some("a"));
    assert!(resent.dup);
    assert_eq!(resent.pkid, a.pkid);
    let mids: Vec<String> = [again.next_publish().await, again.next_publish().await]
        .iter()
        .map(|p| bag(p).get("$.mid").unwrap().to_string())
        .collect();
    assert_eq!(mids, ["b", "c"], "the rest, in order, once");
    eventually(DEADLINE, || async {
        (hub.hub.state().c2d.pending("d1") == 0).then_some(())
    })
    .await;
    drop(again);

    // A clean session: an unacknowledged message comes again after the next SUBSCRIBE.
    {
        let (mut connection, mut session) = login(&hub, "service").await;
        let mut sender = devicebound(&mut session).await;
        assert!(matches!(
            send(&mut sender, C2d::to("d1", "d")).await,
            Outcome::Accepted(_)
        ));
        let _ = connection.close().await;
    }
    let mut clean = device(&hub, true).await;
    clean.subscribe(C2D_FILTER, QoS::AtLeastOnce).await;
    assert_eq!(bag(&next_unacked(&mut clean).await).get("$.mid"), Some("d"));
    drop(clean);
    let hub = restart(hub).await;
    let mut clean = device(&hub, true).await;
    clean.subscribe(C2D_FILTER, QoS::AtLeastOnce).await;
    let d = clean.next_publish().await;
    assert_eq!(bag(&d).get("$.mid"), Some("d"));
    assert!(!d.dup, "a new delivery, not a resent packet");
    eventually(DEADLINE, || async {
        (hub.hub.state().c2d.pending("d1") == 0).then_some(())
    })
    .await;
    let hub = restart(hub).await;
    assert_eq!(
        hub.hub.state().c2d.pending("d1"),
        0,
        "completed is gone for good"
    );
    hub.stop().await;
}

#[tokio::test]
async fn an_expired_message_is_dropped_with_negative_feedback() {
    let hub = TestHub::start().await;
    hub.add_device("d1");
    let (mut connection, mut session) = login(&hub, "service").await;
    let mut sender = devicebound(&mut session).await;
    let mut short = C2d::to("d1", "short-lived");
    short.ack = Some("negative");
    short.expiry_ms = Some(chrono::Utc::now().timestamp_millis() + 200);
    assert!(matches!(
        send(&mut sender, short).await,
        Outcome::Accepted(_)
    ));
    let mut long = C2d::to("d1", "long-lived");
    long.ack = Some("negative");
    assert!(matches!(
        send(&mut sender, long).await,
        Outcome::Accepted(_)
    ));

    let records = feedback(&mut session).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["originalMessageId"], "short-lived");
    assert_eq!(records[0]["statusCode"], "Expired");
    assert_eq!(hub.hub.state().c2d.pending("d1"), 1);

    let mut device = device(&hub, true).await;
    device.subscribe(C2D_FILTER, QoS::AtLeastOnce).await;
    let first = device.next_publish().await;
    assert_eq!(
        bag(&first).get("$.mid"),
        Some("long-lived"),
        "the expired one never reaches the device"
    );
    // Negative-only: its completion gives no feedback, and the queue is empty.
    eventually(DEADLINE, || async {
        (hub.hub.state().c2d.pending("d1") == 0).then_some(())
    })
    .await;
    assert!(hub.hub.state().c2d.take_feedback(10).is_empty());
    let _ = connection.close().await;
    hub.stop().await;
}

#[tokio::test]
async fn a_device_created_again_does_not_get_the_old_devices_messages() {
    let hub = TestHub::start().await;
    hub.add_device("d1");
    let (mut connection, mut session) = login(&hub, "service").await;
    let mut sender = devicebound(&mut session).await;
    let mut old = C2d::to("d1", "for-the-old-d1");
    old.ack = Some("full");
    assert!(matches!(send(&mut sender, old).await, Outcome::Accepted(_)));
    hub.hub.state().registry.delete("d1", None).unwrap();
    hub.add_device("d1");
    assert!(matches!(
        send(&mut sender, C2d::to("d1", "for-the-new-d1")).await,
        Outcome::Accepted(_)
    ));
    let records = feedback(&mut session).await;
    assert_eq!(records[0]["originalMessageId"], "for-the-old-d1");
    assert_eq!(records[0]["statusCode"], "Purged");
    let mut device = device(&hub, true).await;
    device.subscribe(C2D_FILTER, QoS::AtLeastOnce).await;
    assert_eq!(
        bag(&device.next_publish().await).get("$.mid"),
        Some("for-the-new-d1")
    );
    let _ = connection.close().await;
    hub.stop().await;
}

#[tokio::test]
async fn a_connection_without_sasl_opens_but_may_send_nothing_before_a_token() {
    // What Node's azure-iothub does: the plain AMQP header, no SASL layer, then `$cbs`.
    let hub = TestHub::start().await;
    hub.add_device("d1");
    let stream = TcpStream::connect(hub.hub.amqp_plain_addr().unwrap())
        .await
        .unwrap();
    let mut connection = Connection::builder()
        .container_id("it-no-sasl")
        .hostname("localhost")
        .open_with_stream(stream)
        .await
        .expect("the hub opens without SASL");
    let mut session = Session::begin(&mut connection).await.unwrap();
    let mut sender = devicebound(&mut session).await;
    let refused = tokio::time::timeout(DEADLINE, sender.send(C2d::to("d1", "x").message()))
        .await
        .expect("the detach comes within the deadline");
    assert!(
        format!("{refused:?}").contains("UnauthorizedAccess"),
        "no grant without a token: {refused:?}"
    );
    assert_eq!(hub.hub.state().c2d.pending("d1"), 0);
    let _ = connection.close().await;
    hub.stop().await;
}
