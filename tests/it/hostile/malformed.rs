//! Malformed input to the hub: oversize packets, bad UTF-8, bad remaining lengths and other
//! broken MQTT; JSON nested far too deep, over MQTT and over REST.

use std::time::Instant;

use rumqttc::QoS;
use serde_json::json;
use simdevice::hub::mqtt::connection::{MAX_MESSAGE_SIZE, MAX_PACKET_SIZE};

use super::*;
use crate::common::raw_mqtt::*;

#[tokio::test]
async fn oversize_and_malformed_packets_close_the_connection() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let token = device_token("d1", &key);
    let user = user_name("d1");

    // Positive control: the largest message is accepted.
    let mut device = RawDevice::connect(&hub, "d1", &key).await;
    device
        .publish_acked("devices/d1/messages/events/", vec![b'x'; MAX_MESSAGE_SIZE])
        .await;

    // (kind, case, bytes, sent before CONNECT?)
    let over = MAX_PACKET_SIZE + 1;
    let mut header_only = vec![0x30];
    header_only.extend(remaining_length(over));
    let whole = raw_publish_qos1(b"devices/d1/messages/events/", 1, &vec![b'x'; over]);
    let mut connect_header = vec![0x10];
    connect_header.extend(remaining_length(over));
    let mut subscribe_header = vec![0x82];
    subscribe_header.extend(remaining_length(1 << 20));
    let huge_password = raw_connect(b"d1", user.as_bytes(), &vec![b'p'; over]);
    let oversize: Vec<(&str, Vec<u8>, bool)> = vec![
        ("PUBLISH header over the limit, no body", header_only, false),
        ("PUBLISH over the limit, whole body sent", whole, false),
        (
            "PUBLISH claiming 268,435,455 bytes",
            vec![0x30, 0xff, 0xff, 0xff, 0x7f],
            false,
        ),
        ("SUBSCRIBE header of 1 MB", subscribe_header, false),
        (
            "CONNECT header over the limit, before CONNECT",
            connect_header,
            true,
        ),
        ("CONNECT with a 264 KB password", huge_password, true),
    ];

    let bad = |s: &[u8]| s.to_vec();
    let utf8: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "client id with 0xff",
            raw_connect(b"d1\xff", user.as_bytes(), token.as_bytes()),
            true,
        ),
        (
            "client id with a surrogate",
            raw_connect(b"d1\xed\xa0\x80", user.as_bytes(), token.as_bytes()),
            true,
        ),
        (
            "client id with an overlong '/'",
            raw_connect(b"d1\xc0\xaf", user.as_bytes(), token.as_bytes()),
            true,
        ),
        (
            "user name with 0xfe",
            raw_connect(
                b"d1",
                &[user.as_bytes(), b"\xfe"].concat(),
                token.as_bytes(),
            ),
            true,
        ),
        (
            "user name with a truncated sequence",
            raw_connect(
                b"d1",
                b"localhost/d1\xe2\x82/?api-version=2021-04-12",
                token.as_bytes(),
            ),
            true,
        ),
        (
            "password with 0x80",
            raw_connect(
                b"d1",
                user.as_bytes(),
                &[token.as_bytes(), b"\x80"].concat(),
            ),
            true,
        ),
        (
            "topic with 0xff",
            raw_publish_qos1(b"devices/d1/messages/events/\xff", 1, b"{}"),
            false,
        ),
        (
            "topic with an overlong '/'",
            raw_publish_qos1(b"devices/d1\xc0\xafmessages/events/", 1, b"{}"),
            false,
        ),
        (
            "topic with a truncated sequence",
            raw_publish_qos1(b"devices/d1/messages/events/\xe2\x82", 1, b"{}"),
            false,
        ),
        (
            "topic with a surrogate",
            raw_publish_qos1(b"$iothub/twin/GET/?$rid=\xed\xa0\x80", 1, b""),
            false,
        ),
        (
            "topic with U+0000",
            raw_publish_qos1(b"devices/d1/messages/events/\0", 1, b"{}"),
            false,
        ),
        (
            "property bag decoding to bad UTF-8",
            raw_publish_qos1(b"devices/d1/messages/events/a=%ff%fe", 1, b"{}"),
            false,
        ),
        (
            "rid decoding to bad UTF-8",
            raw_publish_qos1(b"$iothub/twin/GET/?$rid=%c0%af", 1, b""),
            false,
        ),
        (
            "subscription filter with 0xff",
            raw_subscribe(b"$iothub/methods/POST/\xff#"),
            false,
        ),
        (
            "subscription filter with U+0000",
            raw_subscribe(b"$iothub/methods/POST/\0#"),
            false,
        ),
    ];

    let mut short_topic = vec![0x32, 4];
    short_topic.extend(100u16.to_be_bytes());
    short_topic.extend([0, 1]);
    let lengths: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "five-byte remaining length",
            bad(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]),
            false,
        ),
        (
            "five-byte remaining length, before CONNECT",
            bad(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]),
            true,
        ),
        ("topic length past the remaining length", short_topic, false),
        ("PUBLISH with remaining length 0", bad(&[0x30, 0x00]), false),
        ("CONNECT with remaining length 0", bad(&[0x10, 0x00]), true),
        (
            "SUBSCRIBE without a filter",
            bad(&[0x82, 0x02, 0x00, 0x01]),
            false,
        ),
        (
            "QoS 1 PUBLISH with packet id 0",
            raw_publish_qos1(b"devices/d1/messages/events/", 0, b"{}"),
            false,
        ),
        ("reserved packet type 0", bad(&[0x00, 0x00]), false),
        ("reserved packet type 15", bad(&[0xf0, 0x00]), false),
        (
            "PUBLISH with QoS 3",
            frame(
                0x36,
                &[field(b"devices/d1/messages/events/"), vec![0, 1]].concat(),
            ),
            false,
        ),
        (
            "CONNECT naming protocol MQTX",
            {
                let mut c = raw_connect(b"d1", user.as_bytes(), token.as_bytes());
                c[6] = b'X';
                c
            },
            true,
        ),
        (
            "CONNECT with protocol level 3",
            {
                let mut c = raw_connect(b"d1", user.as_bytes(), token.as_bytes());
                c[8] = 3;
                c
            },
            true,
        ),
        (
            "CONNECT with will QoS but no will flag",
            {
                let mut c = raw_connect(b"d1", user.as_bytes(), token.as_bytes());
                c[9] |= 0b0001_1000;
                c
            },
            true,
        ),
    ];

    for (kind, reaction, cases) in [
        (
            "oversize-packets",
            "connection closed, nothing answered",
            oversize,
        ),
        (
            "malformed-utf8",
            "connection closed, nothing answered",
            utf8,
        ),
        (
            "malformed-packets",
            "connection closed, nothing answered",
            lengths,
        ),
    ] {
        let mut tally = Tally::new(kind, reaction);
        for (case, bytes, before_connect) in cases {
            let mut device = if before_connect {
                RawDevice::open(&hub).await
            } else {
                RawDevice::connect(&hub, "d1", &key).await
            };
            device.send_bytes(&bytes).await;
            tally.check(case, closed_at_once(&mut device).await);
        }
        tally.finish();
    }

    // The hub still serves: a fresh device session and the API.
    let mut device = RawDevice::connect(&hub, "d1", &key).await;
    device
        .subscribe("$iothub/twin/res/#", QoS::AtLeastOnce)
        .await;
    assert_eq!(device.twin_get("after").await.0, 200);
    assert_eq!(hub.service().get("/twins/d1").await.status, 200);
    hub.stop().await;
}

#[tokio::test]
async fn deeply_nested_json_is_answered_400_and_the_hub_keeps_serving() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let raw = RawService::new(&hub);
    let owner = raw.token(&hub, "iothubowner");

    let mut device = RawDevice::connect(&hub, "d1", &key).await;
    device
        .subscribe("$iothub/twin/res/#", QoS::AtLeastOnce)
        .await;
    let mut tally = Tally::new(
        "nested-json-mqtt",
        "reported patch answered 400 on the same connection",
    );
    let cases = [
        ("10,000 nested objects", nested_objects(10_000)),
        (
            "10,000 nested arrays",
            format!("{{\"a\":{}}}", nested_arrays(10_000)),
        ),
        (
            "100,000 unclosed brackets",
            format!("{{\"a\":{}", "[".repeat(100_000)),
        ),
        ("depth 11, over the twin limit of 10", nested_objects(12)),
        (
            "a raw control character in a string",
            "{\"a\":\"\u{1}\"}".to_string(),
        ),
    ];
    for (rid, (case, body)) in cases.into_iter().enumerate() {
        let (status, topic, _) = device.twin_patch(&format!("n{rid}"), &body).await;
        tally.check(
            case,
            if status == 400 {
                Ok(())
            } else {
                Err(format!("answered {topic}"))
            },
        );
    }
    // Raw bytes that are not UTF-8 at all.
    let pkid = device.pkid();
    device
        .send_bytes(&raw_publish_qos1(
            b"$iothub/twin/PATCH/properties/reported/?$rid=bytes",
            pkid,
            b"{\"a\":\"\xff\xfe\"}",
        ))
        .await;
    let answer = device.next_publish().await;
    tally.check(
        "reported patch that is not UTF-8",
        if status_of(&answer.topic) == 400 {
            Ok(())
        } else {
            Err(format!("answered {}", answer.topic))
        },
    );
    let (status, _, _) = device.twin_patch("ok", "{\"fine\":true}").await;
    assert_eq!(
        status, 204,
        "a valid patch still works on the same connection"
    );
    tally.finish();

    let mut tally = Tally::new("nested-json-rest", "answered 400; nothing changed");
    let deep = nested_objects(10_000);
    let parens = |n: usize| {
        format!(
            "SELECT * FROM devices WHERE {}1 = 1{}",
            "(".repeat(n),
            ")".repeat(n)
        )
    };
    let query = |q: String| Some(json!({ "query": q }).to_string());
    let cases: Vec<(&str, Method, &str, Option<String>)> = vec![
        ("twin PATCH, 10,000 levels", Method::PATCH, "/twins/d1", Some(format!("{{\"properties\":{{\"desired\":{deep}}}}}"))),
        ("twin PUT, 10,000 levels", Method::PUT, "/twins/d1", Some(format!("{{\"tags\":{deep}}}"))),
        ("twin PATCH, desired depth 11", Method::PATCH, "/twins/d1", Some(format!("{{\"properties\":{{\"desired\":{}}}}}", nested_objects(12)))),
        ("method payload, 10,000 levels", Method::POST, "/twins/d1/methods", Some(format!("{{\"methodName\":\"m\",\"payload\":{deep}}}"))),
        ("method payload, 100,000 unclosed arrays", Method::POST, "/twins/d1/methods", Some(format!("{{\"methodName\":\"m\",\"payload\":{}", "[".repeat(100_000)))),
        ("query body, 10,000 levels", Method::POST, "/devices/query", Some(format!("{{\"query\":{deep}}}"))),
        ("query with 10,000 parentheses", Method::POST, "/devices/query", query(parens(10_000))),
        ("query with 4,000 parentheses (under the length limit)", Method::POST, "/devices/query", query(parens(4_000))),
        ("query with 2,000 NOTs", Method::POST, "/devices/query", query(format!("SELECT * FROM devices WHERE {}deviceId = 'd1'", "NOT ".repeat(2_000)))),
        ("query with 1,000 nested IS_DEFINED", Method::POST, "/devices/query", query(format!("SELECT * FROM devices WHERE {}tags.a{}", "IS_DEFINED(".repeat(1_000), ")".repeat(1_000)))),
        ("query with 4,000 nested lists", Method::POST, "/devices/query", query(format!("SELECT * FROM devices WHERE deviceId IN {}'d1'{}", "[".repeat(4_000), "]".repeat(4_000)))),
        ("query with 2,000 unary minus", Method::POST, "/devices/query", query(format!("SELECT * FROM devices WHERE tags.a = {}1", "-".repeat(2_000)))),
        ("device PUT, 10,000 levels in its status", Method::PUT, "/devices/d9", Some(format!("{{\"deviceId\":\"d9\",\"status\":{deep}}}"))),
        ("twin job, 10,000 levels", Method::PUT, "/jobs/v2/j1", Some(format!("{{\"type\":\"scheduleUpdateTwin\",\"queryCondition\":\"deviceId = 'd1'\",\"updateTwin\":{{\"properties\":{{\"desired\":{deep}}}}}}}"))),
        ("cloud-to-device payload, 10,000 levels", Method::POST, "/simdevice/devices/d1/messages/devicebound", Some(format!("{{\"payload\":{deep}}}"))),
    ];
    for (case, method, path, body) in cases {
        let asked = Instant::now();
        // If-Match on twins (an update); none on devices (a create).
        let headers: &[(&str, &str)] = if path.starts_with("/twins/") {
            &[("If-Match", "*")]
        } else {
            &[]
        };
        let (status, reply) = raw.call(method, path, &owner, body, headers).await;
        tally.check(
            case,
            if status == 400 && asked.elapsed() < Duration::from_secs(5) {
                Ok(())
            } else {
                Err(format!(
                    "answered {status} in {:?}: {reply}",
                    asked.elapsed()
                ))
            },
        );
    }
    let service = hub.service();
    let twin = service.get("/twins/d1").await;
    assert_eq!(twin.status, 200);
    assert_eq!(twin.body["tags"], json!({}), "nothing was written");
    assert_eq!(twin.body["properties"]["desired"]["$version"], 1);
    assert_eq!(service.get("/devices/d9").await.status, 404);
    assert_eq!(service.get("/jobs/v2/j1").await.status, 404);
    tally.finish();
    hub.stop().await;
}
