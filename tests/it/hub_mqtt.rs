//! The hub's device side, driven over real TLS sockets: authentication, telemetry, twins,
//! methods, sessions, and every refusal.

use std::time::Duration;

use crate::common::*;
use rumqttc::{ConnectReturnCode, Packet, QoS, SubscribeReasonCode};
use serde_json::json;
use simdevice::protocol::sas;

#[tokio::test]
async fn connect_is_refused_with_connack_5_for_every_bad_credential() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let other_key = hub.add_device("d2");
    let resource = sas::device_resource("localhost", "d1", None);
    let policy_key = |name: &str| {
        hub.hub
            .state()
            .policies
            .get(name)
            .unwrap()
            .primary_key
            .clone()
    };
    let wrong_key = sas::generate_key();
    let cases = vec![
        (
            "wrong key",
            connect_packet("d1", &device_token("d1", &wrong_key), false, 60),
        ),
        (
            "another device's key",
            connect_packet("d1", &device_token("d1", &other_key), false, 60),
        ),
        (
            "a token for another device",
            connect_packet("d1", &device_token("d2", &other_key), false, 60),
        ),
        (
            "an expired token",
            connect_packet(
                "d1",
                &sas::generate_token(&resource, &key, None, now() - 10).unwrap(),
                false,
                60,
            ),
        ),
        (
            "an unknown device",
            connect_packet("nobody", &device_token("nobody", &key), false, 60),
        ),
        (
            "a policy without DeviceConnect",
            connect_packet(
                "d1",
                &sas::generate_token(
                    &resource,
                    &policy_key("service"),
                    Some("service"),
                    now() + 60,
                )
                .unwrap(),
                false,
                60,
            ),
        ),
        (
            "garbage password",
            connect_packet("d1", "not a token", false, 60),
        ),
        (
            "a token for another hub",
            connect_packet(
                "d1",
                &sas::generate_token(
                    "elsewhere.azure-devices.net/devices/d1",
                    &key,
                    None,
                    now() + 60,
                )
                .unwrap(),
                false,
                60,
            ),
        ),
    ];
    for (what, connect) in cases {
        let (mut device, ack) = RawDevice::connect_with(&hub, connect).await;
        assert_eq!(ack.code, ConnectReturnCode::NotAuthorized, "{what}");
        assert!(
            device.recv().await.is_none(),
            "{what}: the hub closes after CONNACK 5"
        );
    }
    // Client id and user name must name the same device.
    let mut mismatch = connect_packet("d1", &device_token("d1", &key), false, 60);
    mismatch.client_id = "d2".into();
    let (_, ack) = RawDevice::connect_with(&hub, mismatch).await;
    assert_eq!(ack.code, ConnectReturnCode::NotAuthorized);
    // No credentials at all.
    let mut bare = connect_packet("d1", "", false, 60);
    bare.login = None;
    let (_, ack) = RawDevice::connect_with(&hub, bare).await;
    assert_eq!(ack.code, ConnectReturnCode::NotAuthorized);

    // A policy with DeviceConnect may connect any device; the secondary key works too.
    let token =
        sas::generate_token(&resource, &policy_key("device"), Some("device"), now() + 60).unwrap();
    let (_, ack) = RawDevice::connect_with(&hub, connect_packet("d1", &token, false, 60)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let secondary = hub
        .hub
        .state()
        .registry
        .get("d1", |d| d.secondary_key.clone())
        .unwrap();
    let (_, ack) = RawDevice::connect_with(
        &hub,
        connect_packet("d1", &device_token("d1", &secondary), false, 60),
    )
    .await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    hub.stop().await;
}

#[tokio::test]
async fn disabled_devices_are_refused_and_disconnected() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let mut device = RawDevice::connect(&hub, "d1", &key).await;
    let service = hub.service();
    let current = service.get("/devices/d1").await.body;
    let mut disabled = current.clone();
    disabled["status"] = json!("disabled");
    let reply = service
        .call(
            reqwest::Method::PUT,
            "/devices/d1",
            Some(disabled),
            &[("If-Match", "\"*\"")],
        )
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert!(
        device.recv().await.is_none(),
        "the connected device is dropped"
    );
    // A disabled device is shown disconnected.
    service
        .wait_connection_state("d1", "Disconnected", WAIT)
        .await;
    let (_, ack) = RawDevice::connect_with(
        &hub,
        connect_packet("d1", &device_token("d1", &key), false, 60),
    )
    .await;
    assert_eq!(ack.code, ConnectReturnCode::NotAuthorized);
    hub.stop().await;
}

#[tokio::test]
async fn telemetry_is_acknowledged_stamped_and_readable_through_the_service_api() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let mut device = RawDevice::connect(&hub, "d1", &key).await;
    device.publish_acked("devices/d1/messages/events/%24.mid=m-1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=yes&temp%20unit=C%2FF", r#"{"temperature":71}"#).await;
    // The `$.` spelling is accepted too, and QoS 0 gets no PUBACK.
    device
        .publish(
            "devices/d1/messages/events/$.mid=m-2",
            QoS::AtMostOnce,
            "plain text",
        )
        .await;
    // A ping proves the QoS 0 publish was handled before we look.
    device.send(Packet::PingReq).await;
    assert_eq!(device.recv().await, Some(Packet::PingResp));

    let events = hub.service().get("/simdevice/events?deviceId=d1").await;
    assert_eq!(events.status, 200);
    let events = events.body.as_array().unwrap().clone();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["body"], json!({"temperature": 71}));
    assert_eq!(events[0]["systemProperties"]["message-id"], "m-1");
    assert_eq!(
        events[0]["systemProperties"]["content-type"],
        "application/json"
    );
    assert_eq!(
        events[0]["systemProperties"]["iothub-connection-device-id"],
        "d1"
    );
    assert!(events[0]["systemProperties"]["iothub-enqueuedtime"].is_string());
    assert_eq!(
        events[0]["properties"],
        json!({"alert": "yes", "temp unit": "C/F"})
    );
    assert_eq!(events[1]["body"], "plain text");
    assert_eq!(events[1]["systemProperties"]["message-id"], "m-2");
    hub.stop().await;
}

#[tokio::test]
async fn twin_get_reported_patch_and_desired_push() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let mut device = RawDevice::connect(&hub, "d1", &key).await;
    let ack = device
        .subscribe("$iothub/twin/res/#", QoS::AtMostOnce)
        .await;
    assert_eq!(
        ack.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    device
        .subscribe("$iothub/twin/PATCH/properties/desired/#", QoS::AtLeastOnce)
        .await;

    let (status, twin) = device.twin_get("1").await;
    assert_eq!(status, 200);
    assert_eq!(twin["desired"]["$version"], 1);
    assert_eq!(twin["reported"]["$version"], 1);

    let (status, topic, _) = device
        .twin_patch("2", r#"{"connectivity":{"type":"cellular"}}"#)
        .await;
    assert_eq!(status, 204);
    assert!(topic.ends_with("$rid=2&$version=2"), "{topic}");
    let (_, twin) = device.twin_get("3").await;
    assert_eq!(twin["reported"]["connectivity"]["type"], "cellular");

    // Refusals carry a reason in a JSON body with errorCode.
    for (rid, body, reason) in [
        ("4", "{not json", "JSON"),
        ("5", r#"{"a.b":1}"#, "a.b"),
        ("6", r#"{"n":4503599627370496}"#, "n"),
    ] {
        let (status, _, body) = device.twin_patch(rid, body).await;
        assert_eq!(status, 400, "rid {rid}");
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["errorCode"], 400);
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(reason), "rid {rid}: {message}");
    }
    let deep = (0..12).fold("1".to_string(), |inner, _| format!("{{\"a\":{inner}}}"));
    let (status, _, _) = device.twin_patch("7", &deep).await;
    assert_eq!(status, 400, "nesting beyond depth 10 is refused");
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(4000));
    let mut last = 0;
    for i in 0..9 {
        last = device
            .twin_patch(
                &format!("big{i}"),
                &big.replace("blob", &format!("blob{i}")),
            )
            .await
            .0;
    }
    assert_eq!(
        last, 400,
        "more than 32 KB of reported properties is refused"
    );

    // The service changes desired properties: the device receives the patch with $version.
    let service = hub.service();
    let reply = service
        .call(
            reqwest::Method::PATCH,
            "/twins/d1",
            Some(json!({"properties": {"desired": {"telemetryInterval": 5}}})),
            &[("If-Match", "\"*\"")],
        )
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let patch = device.next_publish().await;
    assert_eq!(
        patch.topic,
        "$iothub/twin/PATCH/properties/desired/?$version=2"
    );
    let body: serde_json::Value = serde_json::from_slice(&patch.payload).unwrap();
    assert_eq!(body, json!({"telemetryInterval": 5, "$version": 2}));
    hub.stop().await;
}

#[tokio::test]
async fn direct_method_round_trip_offline_and_timeout() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let service = hub.service();
    let invoke = |body: serde_json::Value| {
        let service = &service;
        async move {
            service
                .call(reqwest::Method::POST, "/twins/d1/methods", Some(body), &[])
                .await
        }
    };

    // Offline: 404 with 404103.
    let reply = invoke(json!({"methodName": "lockDoor", "payload": {}})).await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.error_code(), Some(404103));
    assert_eq!(reply.headers["iothub-errorcode"], "DeviceNotOnline");

    // Connected but not subscribed to methods: also 404103.
    let mut device = RawDevice::connect(&hub, "d1", &key).await;
    assert_eq!(
        invoke(json!({"methodName": "lockDoor"})).await.error_code(),
        Some(404103)
    );

    device
        .subscribe("$iothub/methods/POST/#", QoS::AtLeastOnce)
        .await;
    let call = tokio::spawn({
        let body = json!({"methodName": "lockDoor", "payload": {"lockTime": "10m"}, "responseTimeoutInSeconds": 10});
        let service = hub.service();
        async move {
            service
                .call(reqwest::Method::POST, "/twins/d1/methods", Some(body), &[])
                .await
        }
    });
    let request = device.next_publish().await;
    assert_eq!(request.qos, QoS::AtMostOnce);
    let rid = request
        .topic
        .strip_prefix("$iothub/methods/POST/lockDoor/?$rid=")
        .unwrap()
        .to_string();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&request.payload).unwrap(),
        json!({"lockTime": "10m"})
    );
    device
        .answer_method(&rid, 200, r#"{"Response":"lockDoor called successfully"}"#)
        .await;
    let reply = call.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.body,
        json!({"status": 200, "payload": {"Response": "lockDoor called successfully"}})
    );

    // No answer within responseTimeoutInSeconds: 504 with 504101.
    let reply = invoke(json!({"methodName": "slow", "responseTimeoutInSeconds": 5})).await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.error_code(), Some(504101));

    // Out-of-range timeouts are refused.
    let reply = invoke(json!({"methodName": "x", "responseTimeoutInSeconds": 1})).await;
    assert_eq!(reply.status, 400);
    hub.stop().await;
}

#[tokio::test]
async fn method_call_waits_for_connect_timeout() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let call = tokio::spawn({
        let service = hub.service();
        async move {
            let body = json!({"methodName": "ping", "connectTimeoutInSeconds": 20, "responseTimeoutInSeconds": 10});
            service
                .call(reqwest::Method::POST, "/twins/d1/methods", Some(body), &[])
                .await
        }
    });
    // The call is really waiting for the device before the device appears.
    let methods = &hub.hub.state().methods;
    crate::common::agent::eventually(Duration::from_secs(5), || async {
        (methods.waiting_for_device() == 1).then_some(())
    })
    .await;
    let mut device = RawDevice::connect(&hub, "d1", &key).await;
    device
        .subscribe("$iothub/methods/POST/#", QoS::AtMostOnce)
        .await;
    let request = device.next_publish().await;
    let rid = rid_of(&request.topic);
    device
        .publish(
            &format!("$iothub/methods/res/201/?$rid={rid}"),
            QoS::AtMostOnce,
            "",
        )
        .await;
    let reply = call.await.unwrap();
    assert_eq!(reply.body, json!({"status": 201, "payload": null}));
    assert_eq!(hub.hub.state().methods.waiting_for_device(), 0);
    hub.stop().await;
}

#[tokio::test]
async fn protocol_violations_close_the_connection() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    hub.add_device("d2");
    let big = vec![b'x'; 256 * 1024 + 1];
    let cases: Vec<(&str, &str, QoS, Vec<u8>)> = vec![
        (
            "QoS 2 publish",
            "devices/d1/messages/events/",
            QoS::ExactlyOnce,
            b"{}".to_vec(),
        ),
        (
            "another device's telemetry",
            "devices/d2/messages/events/",
            QoS::AtLeastOnce,
            b"{}".to_vec(),
        ),
        (
            "an encoded device id",
            "devices/d%32/messages/events/",
            QoS::AtLeastOnce,
            b"{}".to_vec(),
        ),
        (
            "an undocumented topic",
            "devices/d1/messages/other",
            QoS::AtLeastOnce,
            b"{}".to_vec(),
        ),
        (
            "a wildcard topic",
            "$iothub/#",
            QoS::AtMostOnce,
            b"{}".to_vec(),
        ),
        (
            "an oversize message",
            "devices/d1/messages/events/",
            QoS::AtLeastOnce,
            big,
        ),
    ];
    for (what, topic, qos, payload) in cases {
        let mut device = RawDevice::connect(&hub, "d1", &key).await;
        eprintln!("case: {what}");
        device.publish(topic, qos, payload).await;
        device.expect_closed().await;
    }
    for filter in ["devices/d2/messages/devicebound/#", "#", "$iothub/twin/#"] {
        let mut device = RawDevice::connect(&hub, "d1", &key).await;
        let mut subscribe = rumqttc::Subscribe::new(filter, QoS::AtMostOnce);
        subscribe.pkid = 1;
        device.send(Packet::Subscribe(subscribe)).await;
        assert!(
            device.recv().await.is_none(),
            "subscribing to {filter} closes"
        );
    }
    // QoS 2 subscriptions are granted QoS 1.
    let mut device = RawDevice::connect(&hub, "d1", &key).await;
    let ack = device
        .subscribe("$iothub/methods/POST/#", QoS::ExactlyOnce)
        .await;
    assert_eq!(
        ack.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    // Garbage bytes after CONNECT.
    device
        .send_bytes(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01])
        .await;
    assert!(device.recv().await.is_none());
    // Garbage instead of CONNECT: a SUBSCRIBE first, then a malformed length.
    let mut raw = RawDevice::open(&hub).await;
    let mut subscribe = rumqttc::Subscribe::new("$iothub/methods/POST/#", QoS::AtMostOnce);
    subscribe.pkid = 1;
    raw.send(Packet::Subscribe(subscribe)).await;
    assert!(raw.recv().await.is_none());
    let mut raw = RawDevice::open(&hub).await;
    raw.send_bytes(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x7f]).await;
    assert!(raw.recv().await.is_none());
    // A second CONNECT on one connection.
    let mut device = RawDevice::connect(&hub, "d1", &key).await;
    device
        .send(Packet::Connect(connect_packet(
            "d1",
            &device_token("d1", &key),
            false,
            60,
        )))
        .await;
    assert!(device.recv().await.is_none());
    hub.stop().await;
}

#[tokio::test]
async fn a_client_that_says_nothing_is_closed_after_the_connect_deadline() {
    let hub = TestHub::start().await;
    let mut silent = RawDevice::open(&hub).await;
    let started = std::time::Instant::now();
    assert_eq!(silent.recv_within(Duration::from_secs(15)).await, Ok(None));
    assert!(started.elapsed() >= Duration::from_secs(9));
    hub.stop().await;
}

#[tokio::test]
async fn keep_alive_and_token_expiry_close_the_connection() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    // Keep-alive 1 s: closed after 1.5 s of silence, not before 1 s.
    let (mut device, _) = RawDevice::connect_with(
        &hub,
        connect_packet("d1", &device_token("d1", &key), false, 1),
    )
    .await;
    let started = std::time::Instant::now();
    assert_eq!(device.recv_within(Duration::from_secs(5)).await, Ok(None));
    let idle = started.elapsed();
    assert!(
        idle >= Duration::from_millis(1400) && idle < Duration::from_secs(4),
        "{idle:?}"
    );

    // A token valid for 2 s: closed when it expires although the device keeps pinging.
    let resource = sas::device_resource("localhost", "d1", None);
    let token = sas::generate_token(&resource, &key, None, now() + 2).unwrap();
    let (mut device, ack) =
        RawDevice::connect_with(&hub, connect_packet("d1", &token, false, 60)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let mut closed = false;
    for _ in 0..8 {
        device.send(Packet::PingReq).await;
        match device.recv_within(Duration::from_millis(500)).await {
            Ok(None) => {
                closed = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    assert!(closed, "the connection outlived its token");
    hub.stop().await;
}

#[tokio::test]
async fn newer_connection_wins_and_persistent_session_resumes() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let mut first = RawDevice::connect(&hub, "d1", &key).await;
    first
        .subscribe("$iothub/twin/PATCH/properties/desired/#", QoS::AtLeastOnce)
        .await;
    first
        .subscribe("$iothub/methods/POST/#", QoS::AtMostOnce)
        .await;

    // A desired patch the device receives but does not acknowledge.
    let service = hub.service();
    let patch = json!({"properties": {"desired": {"floor": 3}}});
    service
        .call(reqwest::Method::PATCH, "/twins/d1", Some(patch), &[])
        .await;
    match first.recv().await {
        Some(Packet::Publish(p)) => assert!(!p.dup),
        other => panic!("expected the desired patch, got {other:?}"),
    }

    // A second connection with the same identity: the first is dropped, the session resumes.
    let (mut second, ack) = RawDevice::connect_with(
        &hub,
        connect_packet("d1", &device_token("d1", &key), false, 60),
    )
    .await;
    assert!(ack.session_present);
    assert!(
        first.recv().await.is_none(),
        "the older connection is closed"
    );
    let resent = second.next_publish().await;
    assert!(resent.dup, "the unacknowledged message is sent again");
    assert!(resent
        .topic
        .starts_with("$iothub/twin/PATCH/properties/desired/"));

    // Subscriptions survived: a method call reaches the device without a new SUBSCRIBE.
    let call = tokio::spawn({
        let service = hub.service();
        async move {
            service
                .call(
                    reqwest::Method::POST,
                    "/twins/d1/methods",
                    Some(json!({"methodName": "m"})),
                    &[],
                )
                .await
        }
    });
    let request = second.next_publish().await;
    second
        .answer_method(&rid_of(&request.topic), 200, "{}")
        .await;
    assert_eq!(call.await.unwrap().status, 200);

    // A clean session starts from nothing.
    let (_third, ack) = RawDevice::connect_with(
        &hub,
        connect_packet("d1", &device_token("d1", &key), true, 60),
    )
    .await;
    assert!(!ack.session_present);
    let reply = service
        .call(
            reqwest::Method::POST,
            "/twins/d1/methods",
            Some(json!({"methodName": "m"})),
            &[],
        )
        .await;
    assert_eq!(reply.error_code(), Some(404103));
    hub.stop().await;
}

#[tokio::test]
async fn connection_state_is_live() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let service = hub.service();
    assert_eq!(
        service.get("/twins/d1").await.body["connectionState"],
        "Disconnected"
    );
    let mut device = RawDevice::connect(&hub, "d1", &key).await;
    let twin = service.get("/twins/d1").await.body;
    assert_eq!(twin["connectionState"], "Connected");
    assert_ne!(twin["lastActivityTime"], "0001-01-01T00:00:00Z");
    device.send(Packet::Disconnect).await;
    assert!(device.recv().await.is_none());
    service
        .wait_connection_state("d1", "Disconnected", WAIT)
        .await;
    assert_eq!(
        service.get("/devices/d1").await.body["connectionState"],
        "Disconnected",
        "the registry agrees with the twin"
    );
    hub.stop().await;
}

#[tokio::test]
async fn auto_register_accepts_keys_derived_from_the_group_key() {
    let hub = TestHub::start_with(|c| c.auto_register = true).await;
    let group_key = hub
        .hub
        .info()
        .group_key
        .clone()
        .expect("group key in hub.json");
    let derived = sas::derive_device_key(&group_key, "fleet-0001").unwrap();
    let device = RawDevice::connect(&hub, "fleet-0001", &derived).await;
    drop(device);
    assert!(hub.hub.state().registry.contains("fleet-0001"));
    // A key that does not derive from the group key registers nothing.
    let (_, ack) = RawDevice::connect_with(
        &hub,
        connect_packet(
            "fleet-0002",
            &device_token("fleet-0002", &sas::generate_key()),
            false,
            60,
        ),
    )
    .await;
    assert_eq!(ack.code, ConnectReturnCode::NotAuthorized);
    assert!(!hub.hub.state().registry.contains("fleet-0002"));
    hub.stop().await;
}

#[tokio::test]
async fn cloud_to_device_messages_are_delivered_and_queued_for_offline_devices() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let service = hub.service();
    let send = |payload: serde_json::Value| {
        let service = &service;
        async move {
            let body =
                json!({"payload": payload, "properties": {"kind": "note"}, "messageId": "c2d-1"});
            service
                .call(
                    reqwest::Method::POST,
                    "/simdevice/devices/d1/messages/devicebound",
                    Some(body),
                    &[],
                )
                .await
        }
    };
    // Queued before the device ever connected; delivered once it subscribes (as IoT Hub:
    // nothing before the subscription).
    assert_eq!(send(json!({"n": 1})).await.status, 200);
    let (mut device, ack) = RawDevice::connect_with(
        &hub,
        connect_packet("d1", &device_token("d1", &key), false, 60),
    )
    .await;
    assert!(!ack.session_present, "a queue is not a session to resume");
    device
        .subscribe("devices/d1/messages/devicebound/#", QoS::AtLeastOnce)
        .await;
    let message = device.next_publish().await;
    assert_eq!(message.qos, QoS::AtLeastOnce);
    assert!(
        message
            .topic
            .starts_with("devices/d1/messages/devicebound/"),
        "{}",
        message.topic
    );
    assert!(message.topic.contains("%24.mid=c2d-1") && message.topic.contains("kind=note"));
    assert_eq!(&message.payload[..], br#"{"n":1}"#);

    // Connected and subscribed: delivered at once.
    assert_eq!(send(json!("text")).await.status, 200);
    assert_eq!(&device.next_publish().await.payload[..], b"text");

    // At most 50 wait; the 51st is refused with an error that says so.
    drop(device);
    for _ in 0..50 {
        send(json!(1)).await;
    }
    let refused = send(json!(1)).await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.error_code(), Some(403004));
    let unknown = service
        .call(
            reqwest::Method::POST,
            "/simdevice/devices/nobody/messages/devicebound",
            Some(json!({})),
            &[],
        )
        .await;
    assert_eq!(unknown.error_code(), Some(404001));
    hub.stop().await;
}
