//! The Event Hubs-compatible endpoint through real sockets: a fe2o3-amqp client on the hub's
//! plain AMQP port (and one TLS handshake), SASL PLAIN as a policy, partition receivers with
//! selector filters and epochs, refusals, and garbage on the wire.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::types::definitions::Fields;
use fe2o3_amqp::types::messaging::{Body, Source};
use fe2o3_amqp::types::primitives::{OrderedMap, Symbol, Value};
use fe2o3_amqp::{Connection, Receiver, Session};
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;
use simdevice::hub::events::partition_of;
use simdevice::protocol::property_bag::PropertyBag;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::amqp_cbs::{self, Cbs};
use crate::common::TestHub;

const DEADLINE: Duration = Duration::from_secs(10);

fn key_of(hub: &TestHub, policy: &str) -> String {
    hub.hub
        .state()
        .policies
        .get(policy)
        .unwrap()
        .primary_key
        .clone()
}

async fn connect(hub: &TestHub, policy: &str, key: &str) -> Result<ConnectionHandle<()>, String> {
    let addr = hub.hub.amqp_plain_addr().expect("a plain listener");
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    Connection::builder()
        .container_id("it-client")
        .hostname("localhost")
        .sasl_profile(SaslProfile::Plain {
            username: policy.into(),
            password: key.into(),
        })
        .open_with_stream(stream)
        .await
        .map_err(|e| e.to_string())
}

fn append(hub: &TestHub, device: &str, n: u32) {
    let mut properties = PropertyBag::new();
    properties.insert("$.mid", format!("m{n}"));
    properties.insert("unit", "celsius");
    hub.hub
        .state()
        .events
        .append(
            Arc::from(device),
            Arc::from("gen-1"),
            simdevice::hub::events::AuthMethod::Sas,
            properties,
            Bytes::from(format!("{{\"n\":{n}}}")),
            chrono::Utc::now(),
        )
        .expect("a store without capture takes every event");
}

fn address(partition: u32) -> String {
    format!("localhost/ConsumerGroups/$Default/Partitions/{partition}")
}

fn selector(expression: &str) -> Value {
    Value::Described(Box::new(Described {
        descriptor: Descriptor::Name(Symbol::from("apache.org:selector-filter:string")),
        value: Value::String(expression.into()),
    }))
}

async fn receiver(
    session: &mut fe2o3_amqp::session::SessionHandle<()>,
    name: &str,
    partition: u32,
    filter: Option<&str>,
    epoch: Option<i64>,
) -> Receiver {
    let mut source = Source::builder().address(address(partition));
    if let Some(expression) = filter {
        source = source.add_to_filter_using_legacy_format(
            "apache.org:selector-filter:string",
            selector(expression),
        );
    }
    let mut builder = Receiver::builder().name(name).source(source.build());
    if let Some(epoch) = epoch {
        let mut properties: Fields = OrderedMap::new();
        properties.insert(Symbol::from("com.microsoft:epoch"), Value::Long(epoch));
        builder = builder.properties(properties);
    }
    builder
        .attach(session)
        .await
        .expect("the attach is answered")
}

async fn next_body(
    receiver: &mut Receiver,
) -> (String, fe2o3_amqp::types::messaging::Message<Body<Value>>) {
    let delivery = tokio::time::timeout(DEADLINE, receiver.recv::<Body<Value>>())
        .await
        .expect("an event within the deadline")
        .expect("an event, not an error");
    receiver.accept(&delivery).await.unwrap();
    let message = delivery.into_message();
    let body = match &message.body {
        Body::Data(batch) => String::from_utf8(batch.iter().next().unwrap().0.to_vec()).unwrap(),
        other => panic!("a data body, not {other:?}"),
    };
    (body, message)
}

/// The receiver was detached by the hub (with an error) within the deadline.
async fn detached(receiver: &mut Receiver) -> String {
    let result = tokio::time::timeout(DEADLINE, receiver.recv::<Body<Value>>())
        .await
        .expect("the hub detaches within the deadline");
    match result {
        Ok(_) => panic!("an event instead of a detach"),
        Err(error) => format!("{error:?}"),
    }
}

fn annotation<'a>(
    message: &'a fe2o3_amqp::types::messaging::Message<Body<Value>>,
    key: &str,
) -> &'a Value {
    use fe2o3_amqp::types::messaging::annotations::OwnedKey;
    message
        .message_annotations
        .as_ref()
        .unwrap()
        .0
        .get(&OwnedKey::Symbol(Symbol::from(key)))
        .unwrap_or_else(|| panic!("annotation {key}"))
}

#[tokio::test]
async fn a_service_receives_retained_and_new_events_with_their_annotations() {
    let hub = TestHub::start().await;
    let device = "amqp-dev-1";
    let partition = partition_of(device, 4);
    append(&hub, device, 0);
    append(&hub, device, 1);
    let mut connection = connect(&hub, "service", &key_of(&hub, "service"))
        .await
        .unwrap();
    let mut session = Session::begin(&mut connection).await.unwrap();
    let mut from_start = receiver(
        &mut session,
        "r1",
        partition,
        Some("amqp.annotation.x-opt-offset > '-1'"),
        None,
    )
    .await;
    let (body, message) = next_body(&mut from_start).await;
    assert_eq!(body, "{\"n\":0}");
    assert_eq!(
        annotation(&message, "iothub-connection-device-id"),
        &Value::String(device.into())
    );
    assert_eq!(
        annotation(&message, "x-opt-sequence-number"),
        &Value::Long(0)
    );
    assert_eq!(
        annotation(&message, "iothub-message-source"),
        &Value::String("Telemetry".into())
    );
    let Value::String(first_offset) = annotation(&message, "x-opt-offset").clone() else {
        panic!("the offset is a string")
    };
    assert_eq!(
        message
            .application_properties
            .as_ref()
            .unwrap()
            .0
            .get("unit"),
        Some(&fe2o3_amqp::types::primitives::SimpleValue::String(
            "celsius".into()
        ))
    );
    assert_eq!(
        message.properties.as_ref().unwrap().message_id,
        Some(fe2o3_amqp::types::messaging::MessageId::String("m0".into()))
    );
    assert_eq!(next_body(&mut from_start).await.0, "{\"n\":1}");
    // Caught up: a new event wakes the receiver.
    append(&hub, device, 2);
    assert_eq!(next_body(&mut from_start).await.0, "{\"n\":2}");

    // From an offset (exclusive) and from a sequence number (inclusive).
    let mut after_first = receiver(
        &mut session,
        "r2",
        partition,
        Some(&format!("amqp.annotation.x-opt-offset > '{first_offset}'")),
        None,
    )
    .await;
    assert_eq!(next_body(&mut after_first).await.0, "{\"n\":1}");
    let mut from_two = receiver(
        &mut session,
        "r3",
        partition,
        Some("amqp.annotation.x-opt-sequence-number >= '2'"),
        None,
    )
    .await;
    assert_eq!(next_body(&mut from_two).await.0, "{\"n\":2}");
    let mut latest = receiver(
        &mut session,
        "r4",
        partition,
        Some("amqp.annotation.x-opt-offset > '@latest'"),
        None,
    )
    .await;
    append(&hub, device, 3);
    assert_eq!(
        next_body(&mut latest).await.0,
        "{\"n\":3}",
        "only what came after the attach"
    );
    let _ = connection.close().await;
    hub.hub.shutdown().await;
}

#[tokio::test]
async fn refusals_wrong_key_missing_right_unknown_entity() {
    let hub = TestHub::start().await;
    assert!(
        connect(&hub, "service", "d3Jvbmcta2V5LXdyb25nLWtleQ==")
            .await
            .is_err(),
        "a wrong key fails SASL"
    );
    assert!(connect(&hub, "nosuchpolicy", "eA==").await.is_err());

    // registryRead may log in but not receive.
    let mut connection = connect(&hub, "registryRead", &key_of(&hub, "registryRead"))
        .await
        .unwrap();
    let mut session = Session::begin(&mut connection).await.unwrap();
    let mut refused = receiver(&mut session, "r", 0, None, None).await;
    assert!(
        detached(&mut refused).await.contains("Unauthorized"),
        "needs ServiceConnect"
    );
    let _ = connection.close().await;

    let mut connection = connect(&hub, "service", &key_of(&hub, "service"))
        .await
        .unwrap();
    let mut session = Session::begin(&mut connection).await.unwrap();
    let no_group = Receiver::builder()
        .name("g")
        .source(
            Source::builder()
                .address("localhost/ConsumerGroups/nope/Partitions/0")
                .build(),
        )
        .attach(&mut session)
        .await;
    let mut no_group = no_group.expect("accepted, then detached with the reason");
    assert!(detached(&mut no_group).await.contains("consumer group"));
    let mut no_partition = receiver(&mut session, "p", 9, None, None).await;
    assert!(detached(&mut no_partition).await.contains("partition"));
    let mut bad_filter = receiver(
        &mut session,
        "f",
        0,
        Some("amqp.annotation.x-opt-offset = '1'"),
        None,
    )
    .await;
    assert!(detached(&mut bad_filter).await.contains("selector"));
    let _ = connection.close().await;
    hub.hub.shutdown().await;
}

#[tokio::test]
async fn a_higher_epoch_takes_the_partition_and_a_lower_one_is_refused() {
    let hub = TestHub::start().await;
    let key = key_of(&hub, "service");
    let mut connection = connect(&hub, "service", &key).await.unwrap();
    let mut session = Session::begin(&mut connection).await.unwrap();
    let mut two = receiver(&mut session, "e2", 1, None, Some(2)).await;
    let mut one = receiver(&mut session, "e1", 1, None, Some(1)).await;
    assert!(detached(&mut one).await.contains("higher epoch"));
    let mut plain = receiver(&mut session, "e0", 1, None, None).await;
    assert!(detached(&mut plain).await.contains("without an epoch"));
    let mut three = receiver(&mut session, "e3", 1, None, Some(3)).await;
    assert!(
        detached(&mut two).await.contains("higher epoch of '3'"),
        "kicked by epoch 3"
    );
    let device = (0..100)
        .map(|i| format!("ep-{i}"))
        .find(|d| partition_of(d, 4) == 1)
        .unwrap();
    append(&hub, &device, 7);
    assert_eq!(
        next_body(&mut three).await.0,
        "{\"n\":7}",
        "the new holder reads"
    );
    let _ = connection.close().await;
    hub.hub.shutdown().await;
}

#[tokio::test]
async fn garbage_and_silence_are_closed_and_the_listener_goes_on() {
    let hub = TestHub::start().await;
    let addr = hub.hub.amqp_plain_addr().unwrap();
    let mut junk = TcpStream::connect(addr).await.unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01\x02\xff")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(DEADLINE, async {
        loop {
            match junk.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the hub closes a connection that does not speak AMQP"
    );

    // A TLS client that speaks plain AMQP to the TLS port fails its handshake, not the hub.
    let mut wrong = TcpStream::connect(hub.hub.amqp_addr()).await.unwrap();
    wrong.write_all(b"AMQP\x03\x01\x00\x00").await.unwrap();
    let closed = tokio::time::timeout(DEADLINE, wrong.read(&mut buf)).await;
    assert!(closed.is_ok());

    let connection = connect(&hub, "service", &key_of(&hub, "service")).await;
    assert!(
        connection.is_ok(),
        "the listener still serves: {:?}",
        connection.err()
    );
    hub.hub.shutdown().await;
}

#[tokio::test]
async fn the_tls_port_speaks_amqp_with_the_hubs_certificate() {
    let hub = TestHub::start().await;
    let tcp = TcpStream::connect(hub.hub.amqp_addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = hub
        .tls_connector()
        .connect(name, tcp)
        .await
        .expect("the hub's CA verifies it");
    let connection = Connection::builder()
        .container_id("it-tls")
        .hostname("localhost")
        .sasl_profile(SaslProfile::Plain {
            username: "service".into(),
            password: key_of(&hub, "service"),
        })
        .open_with_stream(tls)
        .await;
    let mut connection = connection.expect("AMQP over TLS opens");
    let _ = connection.close().await;
    hub.hub.shutdown().await;
}

fn app_property(message: &fe2o3_amqp::types::messaging::Message<Body<Value>>, key: &str) -> String {
    match message.application_properties.as_ref().unwrap().0.get(key) {
        Some(fe2o3_amqp::types::primitives::SimpleValue::String(s)) => s.clone(),
        other => panic!("application property {key}: {other:?}"),
    }
}

#[tokio::test]
async fn twin_changes_reach_the_partition_as_twin_change_events() {
    use crate::common::{RawDevice, Service};
    let hub = TestHub::start().await;
    let device = "twin-events-1";
    let key = hub.add_device(device);
    let mut raw = RawDevice::connect(&hub, device, &key).await;
    raw.subscribe("$iothub/twin/res/#", rumqttc::QoS::AtLeastOnce)
        .await;
    let (status, _, _) = raw.twin_patch("1", r#"{"temp":21.5,"gone":null}"#).await;
    assert_eq!(status, 204);
    let service = Service::new(&hub, "iothubowner");
    let patched = service
        .call(
            reqwest::Method::PATCH,
            &format!("/twins/{device}"),
            Some(
                serde_json::json!({"tags": {"site": "b1"}, "properties": {"desired": {"rate": 5}}}),
            ),
            &[],
        )
        .await;
    assert_eq!(patched.status, 200, "{:?}", patched.body);
    let replaced = service
        .call(
            reqwest::Method::PUT,
            &format!("/twins/{device}"),
            Some(serde_json::json!({"properties": {"desired": {"mode": "eco"}}})),
            &[],
        )
        .await;
    assert_eq!(replaced.status, 200, "{:?}", replaced.body);

    let mut connection = connect(&hub, "service", &key_of(&hub, "service"))
        .await
        .unwrap();
    let mut session = Session::begin(&mut connection).await.unwrap();
    let mut events = receiver(&mut session, "tw", partition_of(device, 4), None, None).await;

    let (body, reported) = next_body(&mut events).await;
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        annotation(&reported, "iothub-message-source"),
        &Value::String("twinChangeEvents".into())
    );
    assert_eq!(
        annotation(&reported, "iothub-connection-device-id"),
        &Value::String(device.into())
    );
    assert_eq!(app_property(&reported, "hubName"), "localhost");
    assert_eq!(app_property(&reported, "deviceId"), device);
    assert_eq!(app_property(&reported, "opType"), "updateTwin");
    assert_eq!(
        app_property(&reported, "iothub-message-schema"),
        "twinChangeNotification"
    );
    let properties = reported.properties.as_ref().unwrap();
    assert_eq!(
        properties.content_type.as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(
        properties.user_id.as_ref().map(|b| b.to_vec()),
        Some(b"localhost".to_vec())
    );
    let section = &body["properties"]["reported"];
    assert_eq!(section["temp"], 21.5);
    assert!(section["gone"].is_null() && section.as_object().unwrap().contains_key("gone"));
    assert_eq!(section["$version"], 2, "{body}");
    assert!(
        section["$metadata"]["temp"]["$lastUpdated"].is_string(),
        "{body}"
    );
    assert!(body["version"].is_u64());

    let (body, desired) = next_body(&mut events).await;
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(app_property(&desired, "opType"), "updateTwin");
    assert_eq!(body["tags"], serde_json::json!({"site": "b1"}));
    assert_eq!(body["properties"]["desired"]["rate"], 5);
    assert_eq!(
        body["properties"]["desired"]["$metadata"]["rate"]["$lastUpdatedVersion"], 2,
        "{body}"
    );

    let (body, replace) = next_body(&mut events).await;
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(app_property(&replace, "opType"), "replaceTwin");
    assert_eq!(body["deviceId"], device);
    assert!(body["etag"].is_string());
    assert_eq!(body["properties"]["desired"]["mode"], "eco");
    assert!(body["properties"]["desired"].get("rate").is_none());
    assert_eq!(body["properties"]["reported"]["temp"], 21.5);
    let _ = connection.close().await;
    hub.hub.shutdown().await;
}

/// The error a receive ended with, when the hub detached or closed the link with one.
async fn detach_error(receiver: &mut Receiver) -> fe2o3_amqp::types::definitions::Error {
    let result = tokio::time::timeout(DEADLINE, receiver.recv::<Body<Value>>())
        .await
        .expect("the hub detaches within the deadline");
    match result {
        Ok(_) => panic!("an event instead of a detach"),
        Err(error) => detach_cause(error),
    }
}

/// The error the hub detached a receiver with.
fn detach_cause(error: fe2o3_amqp::link::RecvError) -> fe2o3_amqp::types::definitions::Error {
    use fe2o3_amqp::link::{LinkStateError, RecvError};
    match error {
        RecvError::LinkStateError(
            LinkStateError::RemoteClosedWithError(error)
            | LinkStateError::RemoteDetachedWithError(error),
        ) => error,
        other => panic!("a detach without an error: {other:?}"),
    }
}

/// The hub detached a receiver because the token that let it in expired.
fn assert_token_expired(error: fe2o3_amqp::types::definitions::Error) {
    assert_eq!(
        error.condition,
        fe2o3_amqp::types::definitions::AmqpError::UnauthorizedAccess.into()
    );
    assert!(
        error.description.unwrap_or_default().contains("expired"),
        "the detach says why"
    );
}

#[tokio::test]
async fn iothubs_own_address_is_redirected_to_the_event_hub_as_a_real_hub_does() {
    let hub = TestHub::start().await;
    let policy = "iothubowner";
    let token = simdevice::protocol::sas::generate_token(
        "localhost",
        &key_of(&hub, policy),
        Some(policy),
        crate::common::now() + 300,
    )
    .unwrap();
    // What the SDK samples send: SASL PLAIN as `{policy}@sas.root.{hub}` with a SAS token.
    let mut connection = connect(&hub, &format!("{policy}@sas.root.localhost"), &token)
        .await
        .expect("IoT Hub's SASL PLAIN login");
    let mut session = Session::begin(&mut connection).await.unwrap();
    let plain_port = hub.hub.amqp_plain_addr().unwrap().port();
    for (source, rest) in [
        (
            "amqps://localhost/messages/events/ConsumerGroups/$Default/Partitions/2".to_string(),
            "/ConsumerGroups/$Default/Partitions/2",
        ),
        ("/messages/events/$management".to_string(), "/$management"),
    ] {
        let mut link = Receiver::builder()
            .name(format!("redirect-{rest}"))
            .source(Source::builder().address(source.clone()).build())
            .attach(&mut session)
            .await
            .expect("accepted, then detached");
        let error = detach_error(&mut link).await;
        assert_eq!(
            error.condition,
            fe2o3_amqp::types::definitions::LinkError::Redirect.into(),
            "{source}"
        );
        let info = error.info.expect("the redirect's info");
        let get = |key: &str| info.get(&Symbol::from(key)).cloned();
        assert_eq!(get("hostname"), Some(Value::String("localhost".into())));
        assert_eq!(get("network-host"), Some(Value::String("127.0.0.1".into())));
        assert_eq!(get("port"), Some(Value::Int(i32::from(plain_port))));
        assert_eq!(
            get("address"),
            Some(Value::String(format!(
                "amqp://localhost:{plain_port}/localhost{rest}"
            ))),
            "the event hub's name between the port and the rest, as the SDKs parse it"
        );
    }
    // The redirected address is served: events of partition 2 come through.
    let device = (0..100)
        .map(|i| format!("rd-{i}"))
        .find(|d| partition_of(d, 4) == 2)
        .unwrap();
    append(&hub, &device, 5);
    let mut followed = Receiver::builder()
        .name("followed")
        .source(
            Source::builder()
                .address(format!(
                    "amqp://localhost:{plain_port}/localhost/ConsumerGroups/$Default/Partitions/2"
                ))
                .build(),
        )
        .attach(&mut session)
        .await
        .unwrap();
    assert_eq!(next_body(&mut followed).await.0, "{\"n\":5}");
    let _ = connection.close().await;

    // Without ServiceConnect, no redirect: nothing is said of the endpoint.
    let mut connection = connect(&hub, "registryRead", &key_of(&hub, "registryRead"))
        .await
        .unwrap();
    let mut session = Session::begin(&mut connection).await.unwrap();
    let mut refused = Receiver::builder()
        .name("no-right")
        .source(
            Source::builder()
                .address("messages/events/$management")
                .build(),
        )
        .attach(&mut session)
        .await
        .unwrap();
    let error = detach_error(&mut refused).await;
    assert_eq!(
        error.condition,
        fe2o3_amqp::types::definitions::AmqpError::UnauthorizedAccess.into()
    );
    assert!(error.info.is_none());
    let _ = connection.close().await;

    // A token of another policy than the user name's is refused at login.
    assert!(connect(&hub, "service@sas.root.localhost", &token)
        .await
        .is_err());
    hub.hub.shutdown().await;
}

#[tokio::test]
async fn five_receivers_per_consumer_group_and_partition_the_sixth_is_refused() {
    let hub = TestHub::start().await;
    let mut connection = connect(&hub, "service", &key_of(&hub, "service"))
        .await
        .unwrap();
    let mut session = Session::begin(&mut connection).await.unwrap();
    let mut five = Vec::new();
    for n in 0..5 {
        five.push(receiver(&mut session, &format!("q{n}"), 3, None, None).await);
    }
    let mut sixth = receiver(&mut session, "q5", 3, None, None).await;
    let error = detach_error(&mut sixth).await;
    assert_eq!(
        error.condition,
        fe2o3_amqp::types::definitions::AmqpError::ResourceLimitExceeded.into(),
        "what Event Hubs' SDKs read as QuotaExceeded"
    );
    assert!(error.description.unwrap().contains(
        "maximum number of allowed receivers per partition in a consumer group which is 5"
    ));
    // Another partition is not counted; an epoch receiver is let in and takes over.
    let _elsewhere = receiver(&mut session, "other-partition", 2, None, None).await;
    let mut exclusive = receiver(&mut session, "epoch", 3, None, Some(1)).await;
    for mut kicked in five {
        let error = detach_error(&mut kicked).await;
        assert_eq!(
            error.condition,
            fe2o3_amqp::types::definitions::LinkError::Stolen.into()
        );
    }
    let device = (0..100)
        .map(|i| format!("q-{i}"))
        .find(|d| partition_of(d, 4) == 3)
        .unwrap();
    append(&hub, &device, 1);
    assert_eq!(next_body(&mut exclusive).await.0, "{\"n\":1}");
    let _ = connection.close().await;
    hub.hub.shutdown().await;
}

/// Waits (with the deadline) until the hub's clock is past `unix`.
async fn hub_clock_passes(hub: &TestHub, unix: u64) {
    tokio::time::timeout(DEADLINE, async {
        while hub.hub.state().faults.now_unix() <= unix {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the hub's clock moves on");
}

#[tokio::test]
async fn a_receiver_let_in_by_a_token_is_detached_when_it_expires_and_stays_when_renewed() {
    let hub = TestHub::start().await;
    let key = key_of(&hub, "service");
    let device = "token-dev";
    let partition = partition_of(device, 4);

    // Renewed in time: a token for two seconds, replaced at once by one for an hour.
    let (mut renewing, mut session) = amqp_cbs::anonymous_tls(&hub).await;
    let mut cbs = Cbs::open(&mut session).await;
    let short = hub.hub.state().faults.now_unix() + 2;
    assert_eq!(cbs.put_token("service", &key, short).await, 200);
    let mut kept = receiver(&mut session, "kept", partition, None, None).await;
    assert_eq!(cbs.put_token("service", &key, short + 3600).await, 200);

    // Not renewed: the same token, on a connection of its own.
    let (mut lapsing, mut lapsing_session) = amqp_cbs::anonymous_tls(&hub).await;
    let mut lapsing_cbs = Cbs::open(&mut lapsing_session).await;
    assert_eq!(lapsing_cbs.put_token("service", &key, short).await, 200);
    let mut dropped = receiver(&mut lapsing_session, "dropped", partition, None, None).await;

    assert_token_expired(detach_error(&mut dropped).await);
    hub_clock_passes(&hub, short).await;
    append(&hub, device, 1);
    let (body, _) = next_body(&mut kept).await;
    assert_eq!(body, r#"{"n":1}"#, "the renewed receiver still reads");

    let _ = renewing.close().await;
    let _ = lapsing.close().await;
    hub.hub.shutdown().await;
}

#[tokio::test]
async fn a_put_token_sent_before_its_reply_link_is_attached_is_answered_on_it() {
    // uamqp (azure-iot-hub's send_c2d_message) may send its put-token before the hub has
    // taken the attach of its reply link; the answer must wait for the link, not be dropped.
    let hub = TestHub::start().await;
    let key = key_of(&hub, "service");
    let (mut connection, mut session) = amqp_cbs::anonymous_tls(&hub).await;
    let mut requests = fe2o3_amqp::Sender::attach(&mut session, "cbs-requests", "$cbs")
        .await
        .unwrap();
    let expiry = hub.hub.state().faults.now_unix() + 300;
    requests
        .send(amqp_cbs::put_token_request("service", &key, expiry, 1))
        .await
        .expect("the hub takes the request");
    let mut responses = amqp_cbs::reply_link(&mut session).await;
    assert_eq!(amqp_cbs::answer(&mut responses).await, 200);

    let _ = connection.close().await;
    hub.hub.shutdown().await;
}

#[tokio::test]
async fn a_receiver_still_reading_a_backlog_is_detached_when_its_token_expires() {
    let hub = TestHub::start().await;
    let key = key_of(&hub, "service");
    let device = "backlog-dev";
    let partition = partition_of(device, 4);
    // More than the reader below can take before its token lapses: it reads one event a
    // millisecond at most, so it is never caught up when the token expires.
    const BACKLOG: u32 = 20_000;
    for n in 0..BACKLOG {
        append(&hub, device, n);
    }
    let (mut connection, mut session) = amqp_cbs::anonymous_tls(&hub).await;
    let mut cbs = Cbs::open(&mut session).await;
    let expires = hub.hub.state().faults.now_unix() + 2;
    assert_eq!(cbs.put_token("service", &key, expires).await, 200);
    let mut reader = receiver(&mut session, "backlog", partition, None, None).await;

    let mut read = 0u32;
    let error = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match reader.recv::<Body<Value>>().await {
                Ok(delivery) => {
                    reader.accept(&delivery).await.unwrap();
                    read += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(error) => break detach_cause(error),
            }
        }
    })
    .await
    .expect("the hub detaches the receiver");
    assert_token_expired(error);
    assert!(
        read < BACKLOG / 2,
        "detached while behind, not once caught up: {read} of {BACKLOG} read"
    );

    let _ = connection.close().await;
    hub.hub.shutdown().await;
}
