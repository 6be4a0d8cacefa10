//! The agent against a fake hub (`common::fake_hub`) that accepts CONNECT and then
//! misbehaves: bad openings, bad method calls and desired patches, stray topics, garbage.

use std::sync::atomic::Ordering;
use std::time::Instant;

use rumqttc::{ConnAck, ConnectReturnCode, Packet, PubAck, Publish, QoS, SubAck};
use serde_json::json;

use super::*;
use crate::common::agent::RunningAgent;
use crate::common::fake_hub::{FakeHub, Opening, Seen, GOOD_TWIN};
use crate::common::raw_mqtt::*;

#[tokio::test]
async fn the_agent_survives_a_hub_that_misbehaves() {
    let mut fake = FakeHub::start(vec![
        Opening::SilentTcp,
        Opening::Silent,
        Opening::Refuse(ConnectReturnCode::NotAuthorized),
        Opening::Refuse(ConnectReturnCode::ServiceUnavailable),
        Opening::Refuse(ConnectReturnCode::BadUserNamePassword),
    ])
    .await;
    let agent = RunningAgent::start(agent_config("d1", fake.ca_file.clone(), fake.addr));

    // Openings that fail: the agent times out or is refused, backs off, and tries again.
    let mut tally = Tally::new(
        "agent-bad-openings",
        "connect timeout or refusal logged, backed off, retried; the agent keeps producing",
    );
    let started = Instant::now();
    let served = fake
        .wait_for(Duration::from_secs(15), |seen| match seen {
            Seen::Publish { topic, .. } if topic.starts_with("$iothub/twin/GET/") => Some(()),
            _ => None,
        })
        .await
        .is_some();
    for opening in [
        "no TLS",
        "no CONNACK",
        "CONNACK 5",
        "CONNACK 3",
        "CONNACK 4",
    ] {
        tally.check(
            opening,
            if served {
                Ok(())
            } else {
                Err(format!("not served after {:?}", started.elapsed()))
            },
        );
    }
    eprintln!(
        "served after {:?}; {} CONNECTs; last disconnect: {:?}",
        started.elapsed(),
        fake.connects.load(Ordering::SeqCst),
        agent.handle.ctx.counters().last_disconnect()
    );
    tally.finish();
    assert!(agent.counter(|c| &c.readings_produced) > 0);

    // Bad method calls: answered with an error status, the agent keeps serving.
    let mut tally = Tally::new(
        "agent-methods",
        "answered 400/404/413; later calls still answered 200",
    );
    let cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        ("not JSON", "getDeviceInfo", b"not json {".to_vec(), 400),
        ("not UTF-8", "getDeviceInfo", b"\"\xff\xfe\"".to_vec(), 400),
        (
            "10,000 nested objects",
            "getDeviceInfo",
            nested_objects(10_000).into_bytes(),
            400,
        ),
        (
            "100,000 unclosed arrays",
            "getDeviceInfo",
            "[".repeat(100_000).into_bytes(),
            400,
        ),
        (
            "200 KB, over the 128 KB limit",
            "getDeviceInfo",
            format!("\"{}\"", "x".repeat(200 * 1024)).into_bytes(),
            413,
        ),
        (
            "lockTime nested 100 levels",
            "lockDoor",
            format!("{{\"lockTime\":{}}}", nested_objects(100)).into_bytes(),
            400,
        ),
        ("unknown method", "openPodBayDoors", b"{}".to_vec(), 404),
    ];
    for (i, (case, name, payload, expected)) in cases.into_iter().enumerate() {
        let rid = format!("bad{i}");
        fake.publish(&format!("$iothub/methods/POST/{name}/?$rid={rid}"), payload)
            .await;
        let answer = fake.method_answer(&rid).await;
        tally.check(
            case,
            match answer {
                Some((status, _)) if status == expected => Ok(()),
                other => Err(format!("expected {expected}, got {other:?}")),
            },
        );
    }
    fake.publish("$iothub/methods/POST/getDeviceInfo/?$rid=good1", "{}")
        .await;
    let answer = fake.method_answer("good1").await;
    assert_eq!(answer.as_ref().map(|a| a.0), Some(200), "{answer:?}");
    tally.finish();

    // Bad desired patches: ignored or rejected per property; a good one is still applied.
    let mut tally = Tally::new(
        "agent-desired",
        "ignored with a warning, or acknowledged with ac 400; a later patch is still applied",
    );
    let cases: Vec<(&str, u64, Vec<u8>)> = vec![
        ("not JSON", 2, b"{\"telemetryInterval\": ".to_vec()),
        ("a JSON array", 3, b"[1,2,3]".to_vec()),
        ("a JSON string", 4, b"\"telemetryInterval\"".to_vec()),
        ("not UTF-8", 5, b"{\"telemetryInterval\":\"\xff\"}".to_vec()),
        (
            "10,000 nested objects",
            6,
            nested_objects(10_000).into_bytes(),
        ),
        (
            "100,000 unclosed arrays",
            7,
            "[".repeat(100_000).into_bytes(),
        ),
        (
            "200 KB",
            8,
            format!("{{\"blob\":\"{}\",\"$version\":8}}", "x".repeat(200 * 1024)).into_bytes(),
        ),
    ];
    for (case, version, body) in cases {
        fake.publish(
            &format!("$iothub/twin/PATCH/properties/desired/?$version={version}"),
            body,
        )
        .await;
        tally.check(case, Ok(()));
    }
    fake.publish(
        "$iothub/twin/PATCH/properties/desired/?$version=abc",
        "{\"telemetryInterval\":1}",
    )
    .await;
    tally.check("a version that is not a number", Ok(()));
    fake.publish(
        "$iothub/twin/PATCH/properties/desired/?$version=9",
        "{\"telemetryInterval\":\"fast\",\"$version\":9}",
    )
    .await;
    let rejected = fake
        .wait_for(Duration::from_secs(5), |seen| match seen {
            Seen::Publish { topic, payload }
                if topic.starts_with("$iothub/twin/PATCH/properties/reported/") =>
            {
                let patch: Value = serde_json::from_slice(payload).unwrap_or_default();
                (patch["telemetryInterval"]["av"] == 9)
                    .then(|| patch["telemetryInterval"]["ac"].clone())
            }
            _ => None,
        })
        .await;
    tally.check(
        "telemetryInterval of the wrong type",
        if rejected == Some(json!(400)) {
            Ok(())
        } else {
            Err(format!("acknowledged {rejected:?}"))
        },
    );
    fake.publish(
        "$iothub/twin/PATCH/properties/desired/?$version=10",
        "{\"telemetryInterval\":0.3,\"$version\":10}",
    )
    .await;
    let applied = fake
        .wait_for(Duration::from_secs(5), |seen| match seen {
            Seen::Publish { topic, payload }
                if topic.starts_with("$iothub/twin/PATCH/properties/reported/") =>
            {
                let patch: Value = serde_json::from_slice(payload).unwrap_or_default();
                (patch["telemetryInterval"]["av"] == 10)
                    .then(|| patch["telemetryInterval"]["ac"].clone())
            }
            _ => None,
        })
        .await;
    assert_eq!(
        applied,
        Some(json!(200)),
        "a good patch after the bad ones is applied"
    );
    tally.finish();

    // Publishes on topics the agent never subscribed to, or malformed ones: ignored.
    let mut tally = Tally::new(
        "agent-topics",
        "ignored with a warning; the agent keeps serving",
    );
    let topics = [
        "devices/other/messages/devicebound/",
        "devices/d1/messages/events/",
        "$iothub/twin/res/200/?$rid=999999",
        "$iothub/twin/res/abc/?$rid=1",
        "$iothub/methods/POST/getDeviceInfo/",
        "$iothub/methods/POST/getDeviceInfo/?$rid=",
        "$iothub/methods/POST/../twin/?$rid=x",
        "$iothub/unknown",
        "random/topic",
        "",
    ];
    let before = agent.counter(|c| &c.method_calls);
    for topic in topics {
        fake.publish(topic, "{}").await;
    }
    fake.publish("$iothub/methods/POST/getDeviceInfo/?$rid=good2", "{}")
        .await;
    let answer = fake.method_answer("good2").await;
    for topic in topics {
        tally.check(
            format!("{topic:?}"),
            if answer.as_ref().map(|a| a.0) == Some(200) {
                Ok(())
            } else {
                Err(format!("the agent stopped answering: {answer:?}"))
            },
        );
    }
    assert_eq!(
        agent.counter(|c| &c.method_calls),
        before + 1,
        "none of them was taken for a method call"
    );
    tally.finish();

    // Garbage from the hub: the agent drops the connection (or ignores it) and carries on.
    let mut tally = Tally::new(
        "agent-garbage",
        "connection dropped and re-established (or the packet ignored); readings keep flowing",
    );
    let mut oversize = vec![0x30];
    oversize.extend(remaining_length(300 * 1024));
    let mut hostile_twin = false;
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        (
            "a five-byte remaining length",
            vec![0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
        ),
        (
            "an HTTP error page",
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ),
        ("reserved packet type 0", vec![0x00, 0x00]),
        (
            "a second CONNACK",
            encode(Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::Success,
                false,
            ))),
        ),
        (
            "PUBACK for an unknown packet id",
            encode(Packet::PubAck(PubAck::new(65_000))),
        ),
        (
            "SUBACK for an unknown packet id",
            encode(Packet::SubAck(SubAck::new(
                65_001,
                vec![rumqttc::SubscribeReasonCode::Failure],
            ))),
        ),
        ("PINGRESP unasked", vec![0xd0, 0x00]),
        ("a 300 KB packet header", oversize),
        (
            "a 300 KB publish",
            encode(Packet::Publish(Publish::new(
                "$iothub/twin/PATCH/properties/desired/?$version=11",
                QoS::AtMostOnce,
                vec![b' '; 300 * 1024],
            ))),
        ),
        (
            "pseudo-random bytes",
            (0u32..512)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ),
        ("twin GET answered with 10,000 nested objects", Vec::new()),
    ];
    for (case, bytes) in garbage {
        let readings = fake.readings();
        let connects = fake.connects.load(Ordering::SeqCst);
        if bytes.is_empty() {
            // The next catch-up GET gets a hostile twin; the one after, a good one.
            *fake.twin_body.lock().unwrap() = nested_objects(10_000).into_bytes();
            hostile_twin = true;
            fake.send(vec![0xff, 0xff, 0xff, 0xff, 0xff, 0x01]).await;
        } else {
            fake.send(bytes).await;
        }
        // Either a new connection (dropped and reconnected) or the same one still serving.
        let reconnected = fake.next_connect(Duration::from_secs(3)).await;
        if hostile_twin {
            fake.wait_for(Duration::from_secs(5), |seen| match seen {
                Seen::Publish { topic, .. } if topic.starts_with("$iothub/twin/GET/") => Some(()),
                _ => None,
            })
            .await;
            *fake.twin_body.lock().unwrap() = GOOD_TWIN.as_bytes().to_vec();
        }
        let rid = format!("after-{}", case.len());
        // Up to two keep-alive periods and a backoff.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut answered = None;
        while answered.is_none() && Instant::now() < deadline {
            let topic = format!("$iothub/methods/POST/getDeviceInfo/?$rid={rid}");
            if fake.try_publish(&topic, "{}").await {
                answered = fake.method_answer(&rid).await;
            } else {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let flowing = {
            let limit = Instant::now() + Duration::from_secs(5);
            while fake.readings() <= readings && Instant::now() < limit {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            fake.readings() > readings
        };
        eprintln!(
            "garbage {case:?}: {} (connects {connects} -> {})",
            if reconnected {
                "reconnected"
            } else {
                "ignored"
            },
            fake.connects.load(Ordering::SeqCst)
        );
        tally.check(
            case,
            if answered.as_ref().map(|a| a.0) == Some(200) && flowing {
                Ok(())
            } else {
                Err(format!("answer {answered:?}, readings flowing {flowing}"))
            },
        );
        if hostile_twin {
            hostile_twin = false;
            let reported = fake
                .wait_for(Duration::from_secs(10), |seen| match seen {
                    Seen::Publish { topic, .. }
                        if topic.starts_with("$iothub/twin/PATCH/properties/reported/") =>
                    {
                        Some(())
                    }
                    _ => None,
                })
                .await;
            tally.check(
                "catch-up retried after the hostile twin",
                reported.ok_or_else(|| "no reported patch".to_string()),
            );
        }
    }
    tally.finish();

    // No reading was lost along the way: every seq up to the highest arrived.
    let seqs = fake.seqs.lock().unwrap().clone();
    let max = *seqs.iter().max().expect("readings arrived");
    let missing: Vec<u64> = (1..=max).filter(|s| !seqs.contains(s)).collect();
    assert!(missing.is_empty(), "readings lost: {missing:?}");
    assert!(agent.is_running(), "the agent is still running");
    eprintln!(
        "agent: {} readings, {} connects, reconnects {:?}",
        max,
        agent.counter(|c| &c.connects),
        agent.handle.ctx.counters().last_disconnect()
    );
    agent.stop().await;
}
