//! Access: a device against another device's topics and method calls; every REST route under
//! every default policy.

use rumqttc::{ConnectReturnCode, Packet, QoS};
use serde_json::json;

use super::*;
use crate::common::raw_mqtt::*;

/// Fresh d1 connection; `bytes` sent; Ok if the hub closes without answering.
async fn refused_on_fresh_connection(hub: &TestHub, key: &str, bytes: &[u8]) -> Result<(), String> {
    let mut device = RawDevice::connect(hub, "d1", key).await;
    device.send_bytes(bytes).await;
    closed_at_once(&mut device).await
}

#[tokio::test]
async fn a_device_cannot_reach_another_devices_topics_by_any_topic_form() {
    let hub = TestHub::start().await;
    let key1 = hub.add_device("d1");
    let key2 = hub.add_device("d2");
    let service = hub.service();

    // d2 listens to everything it may receive.
    let mut d2 = RawDevice::connect(&hub, "d2", &key2).await;
    for filter in [
        "$iothub/twin/res/#",
        "$iothub/twin/PATCH/properties/desired/#",
        "$iothub/methods/POST/#",
        "devices/d2/messages/devicebound/#",
    ] {
        d2.subscribe(filter, QoS::AtLeastOnce).await;
    }
    assert_eq!(d2.twin_patch("mine", "{\"who\":\"d2\"}").await.0, 204);
    let d2_before = service.get("/twins/d2").await.body;

    // Controls: d1 may use its own topics.
    let mut d1 = RawDevice::connect(&hub, "d1", &key1).await;
    d1.subscribe("$iothub/twin/res/#", QoS::AtLeastOnce).await;
    assert_eq!(d1.twin_patch("mine", "{\"who\":\"d1\"}").await.0, 204);
    d1.publish_acked("devices/d1/messages/events/", "{}").await;
    drop(d1);

    let publish_forms: Vec<&str> = vec![
        "devices/d2/messages/events/",
        "devices/d2/messages/events/$.mid=x",
        "devices/d%32/messages/events/",
        "devices/%64%32/messages/events/",
        "devices/D1/messages/events/",
        "devices/D2/messages/events/",
        "devices/d1/../d2/messages/events/",
        "devices/d1/./messages/events/",
        "devices//d2/messages/events/",
        "devices/d1//messages/events/",
        "devices/d1/messages//events/",
        "/devices/d2/messages/events/",
        "devices/d2",
        "devices/d2/",
        "devices/d1%2F..%2Fd2/messages/events/",
        "devices/d2 /messages/events/",
        "devices/ d2/messages/events/",
        "devices/\u{ff44}2/messages/events/",
        "devices/d2\u{200b}/messages/events/",
        "devices/+/messages/events/",
        "devices/#",
        "devices/d2/messages/events/#",
        "devices/d1/messages/events/+",
        "+/d2/messages/events/",
        "devices/d2\0/messages/events/",
        "devices/d1\0/../d2/messages/events/",
        "devices/d2/messages/devicebound/",
        "devices/d1/messages/devicebound/",
        "devices/d2/modules/m/messages/events/",
        "devices/d1/modules/d2/messages/events/",
        "devices/d1/Messages/events/",
        "$share/g/devices/d2/messages/events/",
        "",
        "$iothub/twin/GET/d2/?$rid=1",
        "$iothub/twin/GET/../d2/?$rid=1",
        "$iothub/twin/GET//?$rid=1",
        "$iothub/twin/GET?$rid=1",
        "$iothub/twin/GET/?$rid=1\0d2",
        "$iothub/twin/PATCH/properties/reported/d2/?$rid=1",
        "$iothub/twin/PATCH/properties/reported//?$rid=1",
        "$iothub/twin/PATCH/properties/desired/?$rid=1",
        "$iothub/twin/PATCH/properties/desired/?$version=99",
        "$iothub/twin/res/200/?$rid=1",
        "$iothub/methods/POST/m/?$rid=1",
        "$iothub/methods/res/200/d2/?$rid=1",
        "$iothub/methods/res/200//?$rid=1",
        "$iothub/methods/res/+/?$rid=1",
        "$iothub/methods/res/#",
        "$IOTHUB/twin/GET/?$rid=1",
        "$iothub/Twin/GET/?$rid=1",
        "$iothub/twin/get/?$rid=1",
    ];
    let mut tally = Tally::new(
        "topic-forms",
        "publish to a foreign or undocumented topic: connection closed, nothing answered",
    );
    for topic in &publish_forms {
        let bytes = raw_publish_qos1(topic.as_bytes(), 1, b"{\"who\":\"d1 was here\"}");
        tally.check(
            format!("publish {topic:?}"),
            refused_on_fresh_connection(&hub, &key1, &bytes).await,
        );
    }
    tally.finish();

    let subscription_forms: Vec<&str> = vec![
        "devices/d2/messages/devicebound/#",
        "devices/d2/messages/devicebound/+",
        "devices/+/messages/devicebound/#",
        "devices/#",
        "#",
        "+/#",
        "+/+/+/+/#",
        "devices/d%32/messages/devicebound/#",
        "devices/D2/messages/devicebound/#",
        "devices/D1/messages/devicebound/#",
        "devices/d1/../d2/messages/devicebound/#",
        "devices//d2/messages/devicebound/#",
        "devices/d1/messages/devicebound/../../../d2/messages/devicebound/#",
        "devices/d1\0/messages/devicebound/#",
        "devices/d2/messages/events/#",
        "devices/+/messages/events/#",
        "devices/d1/messages/events/#",
        "$iothub/twin/res/d2/#",
        "$iothub/twin/PATCH/properties/reported/#",
        "$iothub/twin/PATCH/properties/desired/d2/#",
        "$iothub/methods/res/#",
        "$iothub/#",
        "$iothub/+/res/#",
        "$iothub/twin/+/#",
        "$share/g/devices/d2/messages/devicebound/#",
        "$share/g/$iothub/methods/POST/#",
    ];
    let mut tally = Tally::new(
        "subscription-forms",
        "subscribe or unsubscribe to a foreign or undocumented filter: closed, no SUBACK",
    );
    for filter in &subscription_forms {
        tally.check(
            format!("subscribe {filter:?}"),
            refused_on_fresh_connection(&hub, &key1, &raw_subscribe(filter.as_bytes())).await,
        );
    }
    // A legitimate filter first, then d2's, in one SUBSCRIBE.
    let mut both = rumqttc::Subscribe::new_many([
        rumqttc::SubscribeFilter::new("$iothub/methods/POST/#".into(), QoS::AtLeastOnce),
        rumqttc::SubscribeFilter::new("devices/d2/messages/devicebound/#".into(), QoS::AtLeastOnce),
    ]);
    both.pkid = 3;
    tally.check(
        "subscribe own methods and d2's cloud-to-device at once",
        refused_on_fresh_connection(&hub, &key1, &encode(Packet::Subscribe(both))).await,
    );
    let mut unsubscribe = rumqttc::Unsubscribe::new("devices/d2/messages/devicebound/#");
    unsubscribe.pkid = 4;
    tally.check(
        "unsubscribe d2's cloud-to-device",
        refused_on_fresh_connection(&hub, &key1, &encode(Packet::Unsubscribe(unsubscribe))).await,
    );
    tally.finish();

    // Forms the hub accepts, as IoT Hub does: they must only ever concern d1.
    let mut tally = Tally::new(
        "topic-extras",
        "extra query or property text naming d2 is served as d1's own, never d2's",
    );
    let mut d1 = RawDevice::connect(&hub, "d1", &key1).await;
    d1.subscribe("$iothub/twin/res/#", QoS::AtLeastOnce).await;
    for topic in [
        "$iothub/twin/GET/?$rid=x1&deviceId=d2",
        "$iothub/twin/GET/?deviceId=d2&$rid=x2",
        "$iothub/twin/GET/?$rid=x3&$deviceId=d2&devices/d2",
    ] {
        d1.publish(topic, QoS::AtLeastOnce, " ").await;
        let answer = d1.next_publish().await;
        let twin: Value = serde_json::from_slice(&answer.payload).unwrap_or_default();
        tally.check(
            format!("twin GET {topic:?}"),
            if twin["reported"]["who"] == "d1" {
                Ok(())
            } else {
                Err(format!("answered {} {twin}", answer.topic))
            },
        );
    }
    d1.publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=x4&deviceId=d2",
        QoS::AtLeastOnce,
        "{\"probe\":1}",
    )
    .await;
    let answer = d1.next_publish().await;
    let d1_twin = service.get("/twins/d1").await.body;
    tally.check(
        "reported patch with deviceId=d2 in its query",
        if status_of(&answer.topic) == 204 && d1_twin["properties"]["reported"]["probe"] == 1 {
            Ok(())
        } else {
            Err(format!("answered {}", answer.topic))
        },
    );
    for (n, topic) in [
        "devices/d1/messages/events/iothub-connection-device-id=d2",
        "devices/d1/messages/events/../../d2/messages/events/",
        "devices/d1/messages/events/%24.to=%2Fdevices%2Fd2%2Fmessages%2Fdevicebound",
    ]
    .iter()
    .enumerate()
    {
        let pkid = d1
            .publish(topic, QoS::AtLeastOnce, format!("{{\"extra\":{n}}}"))
            .await;
        let outcome = match d1.recv().await {
            Some(Packet::PubAck(ack)) if ack.pkid == pkid => {
                let events = service
                    .get("/simdevice/events?deviceId=d1&limit=1000")
                    .await
                    .body;
                let event = events
                    .as_array()
                    .and_then(|all| all.iter().find(|e| e["body"]["extra"] == n))
                    .cloned()
                    .unwrap_or_default();
                if event["systemProperties"]["iothub-connection-device-id"] == "d1" {
                    Ok(())
                } else {
                    Err(format!("recorded as {event}"))
                }
            }
            None => Ok(()), // refusing it is fine too
            other => Err(format!("answered {other:?}")),
        };
        tally.check(format!("telemetry {topic:?}"), outcome);
        if d1.recv_within(Duration::ZERO).await == Ok(None) {
            d1 = RawDevice::connect(&hub, "d1", &key1).await;
        }
    }
    // A will on d2's topic, then an abrupt close: the hub publishes no will anywhere.
    let mut with_will = connect_packet("d1", &device_token("d1", &key1), false, 60);
    with_will.last_will = Some(rumqttc::LastWill::new(
        "devices/d2/messages/events/",
        "{\"will\":true}",
        QoS::AtLeastOnce,
        false,
    ));
    drop(d1);
    let (will_device, ack) = RawDevice::connect_with(&hub, with_will).await;
    drop(will_device);
    tally.check(
        "will message on d2's telemetry topic",
        if ack.code == ConnectReturnCode::NotAuthorized || ack.code == ConnectReturnCode::Success {
            Ok(())
        } else {
            Err(format!("CONNACK {:?}", ack.code))
        },
    );
    // The hub has handled the abrupt close (where a will would be published) once it shows d1
    // disconnected; d2's PINGRESP then comes after anything the hub sent d2 before.
    service
        .wait_connection_state("d1", "Disconnected", WAIT)
        .await;

    // d2 never saw anything from d1.
    d2.send(Packet::PingReq).await;
    let mut d2_got = Vec::new();
    loop {
        match d2.recv().await {
            Some(Packet::PingResp) => break,
            Some(other) => d2_got.push(format!("{other:?}")),
            None => panic!("d2 was disconnected"),
        }
    }
    let d2_events = service.get("/simdevice/events?deviceId=d2").await.body;
    let d2_after = service.get("/twins/d2").await.body;
    tally.check(
        "nothing reached d2",
        if d2_got.is_empty()
            && d2_events == json!([])
            && d2_after["properties"] == d2_before["properties"]
        {
            Ok(())
        } else {
            Err(format!(
                "d2 received {d2_got:?}; events {d2_events}; twin {}",
                d2_after["properties"]
            ))
        },
    );
    tally.finish();
    hub.stop().await;
}

#[tokio::test]
async fn method_answers_with_another_devices_rid_are_ignored() {
    let hub = TestHub::start().await;
    let key1 = hub.add_device("d1");
    let key2 = hub.add_device("d2");
    let mut d1 = RawDevice::connect(&hub, "d1", &key1).await;
    let mut d2 = RawDevice::connect(&hub, "d2", &key2).await;
    d1.subscribe("$iothub/methods/POST/#", QoS::AtMostOnce)
        .await;
    d2.subscribe("$iothub/methods/POST/#", QoS::AtMostOnce)
        .await;

    let call_d2 = |name: &'static str| {
        let service = Service::new(&hub, "iothubowner");
        tokio::spawn(async move {
            let body = json!({"methodName": name, "payload": {}, "responseTimeoutInSeconds": 5});
            service
                .call(Method::POST, "/twins/d2/methods", Some(body), &[])
                .await
        })
    };

    // d1 answers d2's call under every spelling of its rid, and guesses others, before d2.
    let mut tally = Tally::new(
        "method-rid",
        "an answer under another device's rid is ignored; only d2 completes d2's call",
    );
    let first = call_d2("first");
    let rid = rid_of(&d2.next_publish().await.topic);
    let percent: String = rid.bytes().map(|b| format!("%{b:02X}")).collect();
    let mut forged: Vec<String> = vec![
        rid.clone(),
        percent,
        rid.to_uppercase(),
        format!("{rid} "),
        format!("{rid}&$rid={rid}"),
        format!("0{rid}"),
    ];
    forged.extend((1..=256u32).map(|n| format!("{n:x}")));
    for (i, forged_rid) in forged.iter().enumerate() {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            let topic = format!("$iothub/methods/res/200/?$rid={forged_rid}");
            d1.publish(&topic, qos, json!({"forged": i}).to_string())
                .await;
        }
    }
    d1.send(Packet::PingReq).await;
    loop {
        match d1.recv().await {
            Some(Packet::PingResp) => break,
            Some(Packet::PubAck(_)) => continue,
            other => panic!("d1 got {other:?} (its answers are ignored, not refused)"),
        }
    }
    d2.publish(
        &format!("$iothub/methods/res/201/?$rid={rid}"),
        QoS::AtMostOnce,
        "{\"from\":\"d2\"}",
    )
    .await;
    let reply = first.await.unwrap();
    for (i, forged_rid) in forged.iter().enumerate() {
        tally.check(
            format!("answer from d1 under rid {forged_rid:?}"),
            if reply.body["payload"]["forged"] == i {
                Err(format!("completed d2's call: {:?}", reply.body))
            } else {
                Ok(())
            },
        );
    }
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(
        reply.body,
        json!({"status": 201, "payload": {"from": "d2"}})
    );

    // A call d2 never answers: d1's answer under its exact rid does not complete it.
    let second = call_d2("second");
    let rid = rid_of(&d2.next_publish().await.topic);
    d1.publish(
        &format!("$iothub/methods/res/200/?$rid={rid}"),
        QoS::AtLeastOnce,
        "{\"forged\":\"late\"}",
    )
    .await;
    let reply = second.await.unwrap();
    tally.check(
        "answer from d1 to a call d2 never answers",
        if reply.status == 504 && reply.error_code() == Some(504101) {
            Ok(())
        } else {
            Err(format!("answered {} {:?}", reply.status, reply.body))
        },
    );
    tally.finish();
    hub.stop().await;
}

/// A REST route: its name, method, path, body, the right it needs, its status when allowed.
type Route = (
    &'static str,
    Method,
    String,
    Option<Value>,
    &'static str,
    u16,
);

/// The rights of IoT Hub's default policies (protocol doc section 2).
fn policy_rights(policy: &str) -> &'static [&'static str] {
    match policy {
        "iothubowner" => &[
            "RegistryRead",
            "RegistryWrite",
            "ServiceConnect",
            "DeviceConnect",
        ],
        "service" => &["ServiceConnect"],
        "device" => &["DeviceConnect"],
        "registryRead" => &["RegistryRead"],
        "registryReadWrite" => &["RegistryRead", "RegistryWrite"],
        other => panic!("no policy {other}"),
    }
}

#[tokio::test]
async fn every_route_needs_its_permission_under_every_default_policy() {
    let hub = TestHub::start().await;
    hub.add_device("d1");
    let owner = hub.service();
    let raw = RawService::new(&hub);
    let policies = [
        "iothubowner",
        "service",
        "device",
        "registryRead",
        "registryReadWrite",
    ];
    let future = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let twin_job = |start: &str| {
        json!({
            "type": "scheduleUpdateTwin",
            "updateTwin": {"properties": {"desired": {"job": 1}}, "etag": "*"},
            "queryCondition": "deviceId = 'nobody'",
            "startTime": start,
            "maxExecutionTimeInSeconds": 60
        })
    };
    assert_eq!(
        owner
            .call(
                Method::PUT,
                "/jobs/v2/existing",
                Some(twin_job(&future)),
                &[]
            )
            .await
            .status,
        200
    );
    for p in policies {
        for prefix in ["victim", "t", "r"] {
            hub.add_device(&format!("{prefix}-{p}"));
        }
        let reply = owner
            .call(
                Method::PUT,
                &format!("/jobs/v2/cancel-{p}"),
                Some(twin_job(&future)),
                &[],
            )
            .await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }

    let mut tally = Tally::new(
        "policy-routes",
        "a route called without its right: 401 and no effect; with it: not 401",
    );
    let mut granted = 0;
    for p in policies {
        let token = raw.token(&hub, p);
        // (route, method, path, body, right needed, status when allowed)
        let routes: Vec<Route> = vec![
            (
                "list devices",
                Method::GET,
                "/devices".into(),
                None,
                "RegistryRead",
                200,
            ),
            (
                "get device",
                Method::GET,
                "/devices/d1".into(),
                None,
                "RegistryRead",
                200,
            ),
            (
                "create device",
                Method::PUT,
                format!("/devices/new-{p}"),
                Some(json!({"deviceId": format!("new-{p}")})),
                "RegistryWrite",
                200,
            ),
            (
                "delete device",
                Method::DELETE,
                format!("/devices/victim-{p}"),
                None,
                "RegistryWrite",
                204,
            ),
            (
                "device statistics",
                Method::GET,
                "/statistics/devices".into(),
                None,
                "RegistryRead",
                200,
            ),
            (
                "service statistics",
                Method::GET,
                "/statistics/service".into(),
                None,
                "ServiceConnect",
                200,
            ),
            (
                "get twin",
                Method::GET,
                "/twins/d1".into(),
                None,
                "ServiceConnect",
                200,
            ),
            (
                "update twin",
                Method::PATCH,
                format!("/twins/t-{p}"),
                Some(json!({"properties": {"desired": {"by": p}}})),
                "ServiceConnect",
                200,
            ),
            (
                "replace twin",
                Method::PUT,
                format!("/twins/r-{p}"),
                Some(json!({"tags": {"by": p}})),
                "ServiceConnect",
                200,
            ),
            (
                "invoke method",
                Method::POST,
                "/twins/d1/methods".into(),
                Some(
                    json!({"methodName": "m", "responseTimeoutInSeconds": 5, "connectTimeoutInSeconds": 0}),
                ),
                "ServiceConnect",
                404,
            ),
            (
                "query twins",
                Method::POST,
                "/devices/query".into(),
                Some(json!({"query": "SELECT * FROM devices"})),
                "ServiceConnect",
                200,
            ),
            (
                "query jobs",
                Method::GET,
                "/jobs/v2/query".into(),
                None,
                "RegistryRead",
                200,
            ),
            (
                "get job",
                Method::GET,
                "/jobs/v2/existing".into(),
                None,
                "RegistryRead",
                200,
            ),
            (
                "create job",
                Method::PUT,
                format!("/jobs/v2/job-{p}"),
                Some(twin_job(&future)),
                "RegistryWrite",
                200,
            ),
            (
                "cancel job",
                Method::POST,
                format!("/jobs/v2/cancel-{p}/cancel"),
                None,
                "RegistryWrite",
                200,
            ),
            (
                "read events",
                Method::GET,
                "/simdevice/events".into(),
                None,
                "ServiceConnect",
                200,
            ),
            (
                "read faults",
                Method::GET,
                "/simdevice/faults".into(),
                None,
                "RegistryWrite",
                200,
            ),
            (
                "set faults",
                Method::POST,
                "/simdevice/faults".into(),
                Some(json!({"throttleReportedSecs": 0})),
                "RegistryWrite",
                200,
            ),
            (
                "send cloud-to-device",
                Method::POST,
                format!("/simdevice/devices/t-{p}/messages/devicebound"),
                Some(json!({"payload": p})),
                "ServiceConnect",
                200,
            ),
        ];
        for (route, method, path, body, right, allowed_status) in routes {
            let allowed = policy_rights(p).contains(&right);
            // A PUT with If-Match updates a device; without, it creates one.
            let headers: &[(&str, &str)] = if route == "create device" {
                &[]
            } else {
                &[("If-Match", "*")]
            };
            let (status, reply) = raw
                .call(method, &path, &token, body.map(|b| b.to_string()), headers)
                .await;
            let outcome = match (allowed, status) {
                (true, s) if s == allowed_status => {
                    granted += 1;
                    Ok(())
                }
                (false, 401) if reply["errorCode"] == 401002 => Ok(()),
                _ => Err(format!("answered {status} {reply}")),
            };
            if allowed {
                // Not a bad input: a wrong answer still fails the test.
                assert!(outcome.is_ok(), "{p} {route}: {outcome:?}");
            } else {
                tally.check(format!("{p}: {route}"), outcome);
            }
        }
        // Side effects happened exactly when allowed.
        let may_write = policy_rights(p).contains(&"RegistryWrite");
        let may_serve = policy_rights(p).contains(&"ServiceConnect");
        let exists = |path: String| {
            let owner = &owner;
            async move { owner.get(&path).await.status == 200 }
        };
        let effects = [
            (
                "device created",
                exists(format!("/devices/new-{p}")).await,
                may_write,
            ),
            (
                "device deleted",
                !exists(format!("/devices/victim-{p}")).await,
                may_write,
            ),
            (
                "job created",
                exists(format!("/jobs/v2/job-{p}")).await,
                may_write,
            ),
            (
                "job cancelled",
                owner.get(&format!("/jobs/v2/cancel-{p}")).await.body["status"] == "cancelled",
                may_write,
            ),
            (
                "twin updated",
                owner.get(&format!("/twins/t-{p}")).await.body["properties"]["desired"]["by"] == p,
                may_serve,
            ),
            (
                "twin replaced",
                owner.get(&format!("/twins/r-{p}")).await.body["tags"]["by"] == p,
                may_serve,
            ),
        ];
        for (effect, happened, allowed) in effects {
            if allowed {
                assert!(happened, "{p}: {effect} should have happened");
            } else {
                tally.check(
                    format!("{p}: no effect '{effect}'"),
                    if happened {
                        Err("it happened".into())
                    } else {
                        Ok(())
                    },
                );
            }
        }
    }
    eprintln!("{granted} allowed calls answered as expected");
    tally.finish();
    hub.stop().await;
}
