//! The hub against floods and bad clients: a flood of silent connections, clients that send
//! one byte at a time, and a device that never reads what the hub sends it.

use std::io::Read;
use std::time::Instant;

use bytes::BytesMut;
use rumqttc::{ConnectReturnCode, Packet, Publish, QoS};
use serde_json::json;
use simdevice::hub::mqtt::connection::CONNECT_DEADLINE;
use simdevice::hub::mqtt::listener::MAX_UNAUTHENTICATED;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::common::raw_mqtt::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_is_capped_and_the_hub_keeps_serving() {
    const FLOOD: usize = 1200;
    const TLS_SILENT: usize = 48;
    let hub = TestHub::start().await;
    let key0 = hub.add_device("d0");
    let key1 = hub.add_device("d1");
    let service = hub.service();
    let mut before = RawDevice::connect(&hub, "d0", &key0).await;
    before
        .subscribe("$iothub/twin/res/#", QoS::AtLeastOnce)
        .await;

    // Some finish TLS and never send CONNECT; the rest never send a TLS byte.
    let opened = Instant::now();
    let mut tls_flood = Vec::new();
    for _ in 0..TLS_SILENT {
        tls_flood.push(RawDevice::open(&hub).await);
    }
    let addr = hub.hub.mqtt_addr();
    let tcp_flood: Vec<std::net::TcpStream> =
        crate::common::open_tcp(addr, FLOOD - TLS_SILENT).await;
    let flood_took = opened.elapsed();
    // The kernel queues the burst for the hub (a short listen backlog drops SYNs, which the
    // clients retry a second later).
    assert!(
        flood_took < Duration::from_secs(3),
        "opening the flood took {flood_took:?}"
    );

    // Beyond the cap, the hub closes new sockets at once.
    let is_closed = |socket: &std::net::TcpStream| {
        let mut byte = [0u8; 1];
        match (&*socket).read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        }
    };
    let over_cap = FLOOD - MAX_UNAUTHENTICATED;
    let mut closed_early = 0;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        closed_early = tcp_flood.iter().filter(|s| is_closed(s)).count();
        if closed_early >= over_cap {
            break;
        }
    }
    assert_eq!(
        closed_early, over_cap,
        "the sockets over the cap of {MAX_UNAUTHENTICATED} are closed at once, the others held"
    );

    // While the flood is held open: REST answers, a connected device is served.
    let started = Instant::now();
    let stats = service.get("/statistics/devices").await;
    assert_eq!(stats.status, 200);
    let (status, _) = before.twin_get("during-flood").await;
    assert_eq!(status, 200);
    before
        .publish_acked("devices/d0/messages/events/", "{}")
        .await;
    let served_in = started.elapsed();
    assert!(
        served_in < Duration::from_secs(2),
        "served in {served_in:?}"
    );
    // A newcomer is turned away at once rather than left hanging.
    let started = Instant::now();
    let newcomer = tokio::time::timeout(Duration::from_secs(3), async {
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        hub.tls_connector().connect(name, tcp).await
    })
    .await
    .expect("the newcomer is answered in time");
    assert!(newcomer.is_err(), "no handshake while the pool is full");
    assert!(started.elapsed() < Duration::from_secs(2));

    // At the CONNECT deadline the hub closes the held sockets; the flood still holds its end.
    let deadline = Instant::now() + CONNECT_DEADLINE + Duration::from_secs(4);
    let mut tally = Tally::new(
        "connection-flood",
        "held sockets closed by the hub (at once over the cap, else at the CONNECT deadline)",
    );
    let mut tls_open: Vec<usize> = (0..tls_flood.len()).collect();
    let mut tcp_open: Vec<usize> = (0..tcp_flood.len()).collect();
    while Instant::now() < deadline && !(tls_open.is_empty() && tcp_open.is_empty()) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        tcp_open.retain(|&i| !is_closed(&tcp_flood[i]));
        let mut still = Vec::new();
        for i in tls_open {
            if tls_flood[i].recv_within(Duration::ZERO).await != Ok(None) {
                still.push(i);
            }
        }
        tls_open = still;
    }
    let all_closed_after = opened.elapsed();
    for i in 0..tcp_flood.len() {
        let open = tcp_open.contains(&i);
        tally.check(
            format!("silent TCP socket {i}"),
            if open {
                Err("still open".into())
            } else {
                Ok(())
            },
        );
    }
    for i in 0..tls_flood.len() {
        let open = tls_open.contains(&i);
        tally.check(
            format!("silent TLS socket {i}"),
            if open {
                Err("still open".into())
            } else {
                Ok(())
            },
        );
    }
    eprintln!(
        "flood of {FLOOD}: opened in {flood_took:?}, {closed_early} closed at once, all closed after {all_closed_after:?}"
    );
    // A legitimate device connects while the flood still holds its sockets.
    let mut device = RawDevice::connect(&hub, "d1", &key1).await;
    device.send(Packet::PingReq).await;
    assert_eq!(device.recv().await, Some(Packet::PingResp));
    tally.finish();
    drop((tcp_flood, tls_flood));
    hub.stop().await;
}

#[tokio::test]
async fn slow_clients_are_served_or_cut_at_the_connect_deadline() {
    let hub = TestHub::start().await;
    let key1 = hub.add_device("d1");
    let key2 = hub.add_device("d2");
    let mut tally = Tally::new(
        "slow-clients",
        "one byte per 100 ms: a short packet is served, a CONNECT too slow for the deadline is cut",
    );

    // A CONNECT that would take ~25 s at one byte per 100 ms: cut at the deadline.
    let slow_connect = async {
        let mut device = RawDevice::open(&hub).await;
        let opened = Instant::now();
        let bytes = encode(Packet::Connect(connect_packet(
            "d1",
            &device_token("d1", &key1),
            false,
            60,
        )));
        let mut sent = 0;
        for byte in &bytes {
            device.send_bytes(&[*byte]).await;
            sent += 1;
            match device.recv_within(Duration::from_millis(100)).await {
                Ok(None) => {
                    let after = opened.elapsed();
                    let in_time = after >= CONNECT_DEADLINE - Duration::from_secs(1)
                        && after <= CONNECT_DEADLINE + Duration::from_secs(2);
                    return if in_time && sent < bytes.len() {
                        Ok(())
                    } else {
                        Err(format!(
                            "closed after {after:?} and {sent} of {} bytes",
                            bytes.len()
                        ))
                    };
                }
                Ok(Some(packet)) => return Err(format!("answered {packet:?}")),
                Err(()) => {}
            }
        }
        Err(format!(
            "all {} bytes sent over {:?} and still connected",
            bytes.len(),
            opened.elapsed()
        ))
    };
    // A 40-byte publish at the same pace, on an authenticated connection: served.
    let slow_publish = async {
        let mut device = RawDevice::connect(&hub, "d2", &key2).await;
        let mut publish = Publish::new(
            "devices/d2/messages/events/",
            QoS::AtLeastOnce,
            "{\"slow\":1}",
        );
        publish.pkid = 9;
        let bytes = encode(Packet::Publish(publish));
        for byte in &bytes {
            device.send_bytes(&[*byte]).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match device.recv().await {
            Some(Packet::PubAck(ack)) if ack.pkid == 9 => Ok(()),
            other => Err(format!("expected PUBACK 9, got {other:?}")),
        }
    };
    let (connect_outcome, publish_outcome) = tokio::join!(slow_connect, slow_publish);
    tally.check("CONNECT at one byte per 100 ms", connect_outcome);
    tally.check("PUBLISH at one byte per 100 ms", publish_outcome);
    let events = hub.service().get("/simdevice/events?deviceId=d2").await;
    assert_eq!(events.body[0]["body"], json!({"slow": 1}));
    tally.finish();
    hub.stop().await;
}

/// Opens a device connection with a tiny receive buffer that the test then never reads.
async fn deaf_device(
    hub: &TestHub,
    id: &str,
    key: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(hub.hub.mqtt_addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = hub.tls_connector().connect(name, tcp).await.unwrap();
    let mut subscribe = rumqttc::Subscribe::new_many([
        rumqttc::SubscribeFilter::new(
            "$iothub/twin/PATCH/properties/desired/#".into(),
            QoS::AtMostOnce,
        ),
        rumqttc::SubscribeFilter::new("$iothub/methods/POST/#".into(), QoS::AtMostOnce),
    ]);
    subscribe.pkid = 1;
    let mut out = encode(Packet::Connect(connect_packet(
        id,
        &device_token(id, key),
        false,
        60,
    )));
    out.extend(encode(Packet::Subscribe(subscribe)));
    stream.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let mut seen = 0;
    while seen < 2 {
        match Packet::read(&mut buf, 1 << 20) {
            Ok(Packet::ConnAck(ack)) => {
                assert_eq!(ack.code, ConnectReturnCode::Success);
                seen += 1;
            }
            Ok(Packet::SubAck(_)) => seen += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(rumqttc::Error::InsufficientBytes(_)) => {
                let n = tokio::time::timeout(WAIT, stream.read_buf(&mut buf))
                    .await
                    .expect("CONNACK and SUBACK in time")
                    .unwrap();
                assert!(n > 0, "closed before SUBACK");
            }
            Err(e) => panic!("{e}"),
        }
    }
    stream
}

#[tokio::test]
async fn a_device_that_never_reads_is_disconnected_and_the_hub_keeps_serving() {
    let hub = TestHub::start().await;
    let key1 = hub.add_device("d1");
    let key2 = hub.add_device("d2");
    let service = hub.service();
    let deaf = deaf_device(&hub, "d1", &key1).await;
    let mut other = RawDevice::connect(&hub, "d2", &key2).await;
    other
        .subscribe("$iothub/twin/res/#", QoS::AtLeastOnce)
        .await;

    // Desired patches of ~24 KB each, pushed to a device that reads none of them, until the
    // hub gives up on the connection (its socket and then its 128-message channel are full).
    let started = Instant::now();
    let mut patches = 0;
    let mut slowest = Duration::ZERO;
    let filler = "x".repeat(3990);
    while patches < 1500
        && started.elapsed() < Duration::from_secs(30)
        && hub
            .hub
            .state()
            .sessions
            .is_reachable("d1", simdevice::protocol::topic::SubscriptionKind::Methods)
    {
        patches += 1;
        let desired: serde_json::Map<String, Value> = (0..6)
            .map(|i| (format!("b{i}"), json!(format!("{patches:06}{filler}"))))
            .collect();
        let asked = Instant::now();
        let reply = service
            .call(
                Method::PATCH,
                "/twins/d1",
                Some(json!({"properties": {"desired": desired}})),
                &[("If-Match", "*")],
            )
            .await;
        slowest = slowest.max(asked.elapsed());
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }
    eprintln!(
        "{patches} patches in {:?}, slowest {slowest:?}",
        started.elapsed()
    );
    assert!(
        slowest < Duration::from_secs(2),
        "the API stayed responsive"
    );

    let mut tally = Tally::new(
        "backlogged-device",
        "a device that never reads is disconnected; the hub keeps serving others",
    );
    // The hub no longer sends to it: a method call fails at once as not online.
    let reply = service
        .call(
            Method::POST,
            "/twins/d1/methods",
            Some(json!({"methodName": "m", "responseTimeoutInSeconds": 5, "connectTimeoutInSeconds": 0})),
            &[],
        )
        .await;
    tally.check(
        "method call to the backlogged device",
        if reply.status == 404 && reply.error_code() == Some(404103) {
            Ok(())
        } else {
            Err(format!("answered {} {:?}", reply.status, reply.body))
        },
    );
    // Another device is served meanwhile.
    let (status, _) = other.twin_get("meanwhile").await;
    assert_eq!(status, 200);
    // Within the write deadline (30 s) the connection is closed and the twin says so.
    let mut state = String::new();
    let limit = Instant::now() + Duration::from_secs(40);
    while Instant::now() < limit {
        state = service.connection_state("d1").await;
        if state == "Disconnected" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("d1 {state} after {:?}", started.elapsed());
    tally.check(
        "connectionState of the backlogged device",
        if state == "Disconnected" {
            Ok(())
        } else {
            Err(format!(
                "still {state:?} 40 s after it stopped being served"
            ))
        },
    );
    drop(deaf);
    // It can come back and catch up.
    let mut again = RawDevice::connect(&hub, "d1", &key1).await;
    again
        .subscribe("$iothub/twin/res/#", QoS::AtLeastOnce)
        .await;
    let (status, twin) = again.twin_get("back").await;
    assert_eq!(status, 200);
    assert!(twin["desired"]["b0"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{patches:06}")));
    tally.finish();
    hub.stop().await;
}
