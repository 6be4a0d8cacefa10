//! Hostile input, through the real network path (issue 4, "Hostile input" and "Access").
//!
//! The hub against floods of silent connections, slow clients, a device that never reads,
//! oversize and malformed packets, bad UTF-8, bad remaining lengths and deeply nested JSON;
//! a device trying every topic form to reach another device; every REST route under every
//! default policy; forged and misdirected tokens. The agent against a fake hub (TLS + the MQTT
//! codec) that accepts CONNECT and then misbehaves, and against a hub whose certificate comes
//! from another CA.
//!
//! Each group prints one line for `scripts/hostile-report`:
//! `HOSTILE: kind=K tried=N refused=M reaction=...`, where `refused` counts the bad inputs that
//! met the required reaction (refused, ignored, or survived, as `reaction` says); the test then
//! fails, naming every case that did not.

use std::collections::{BTreeSet, VecDeque};
use std::fmt::Display;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::agent::RunningAgent;
use crate::common::*;
use bytes::{Bytes, BytesMut};
use reqwest::Method;
use rumqttc::{ConnAck, ConnectReturnCode, Packet, PubAck, Publish, QoS, SubAck};
use serde_json::{json, Value};

use simdevice::config::{Config, Secret};
use simdevice::hub::mqtt::connection::{CONNECT_DEADLINE, MAX_MESSAGE_SIZE, MAX_PACKET_SIZE};
use simdevice::hub::mqtt::listener::MAX_UNAUTHENTICATED;
use simdevice::protocol::sas;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

// ---------------------------------------------------------------------------------------------
// Tally: one HOSTILE line per kind of bad input.

struct Tally {
    kind: &'static str,
    reaction: &'static str,
    tried: usize,
    failures: Vec<String>,
}

impl Tally {
    fn new(kind: &'static str, reaction: &'static str) -> Tally {
        Tally {
            kind,
            reaction,
            tried: 0,
            failures: Vec::new(),
        }
    }

    /// One bad input: `Ok` if it met the required reaction, else what happened instead.
    fn check(&mut self, case: impl Display, outcome: Result<(), String>) {
        self.tried += 1;
        if let Err(what) = outcome {
            self.failures.push(format!("{case}: {what}"));
        }
    }

    fn finish(self) {
        println!(
            "HOSTILE: kind={} tried={} refused={} reaction=\"{}\"",
            self.kind,
            self.tried,
            self.tried - self.failures.len(),
            self.reaction
        );
        assert!(self.tried > 0, "{}: nothing was tried", self.kind);
        assert!(
            self.failures.is_empty(),
            "{}: {} of {} bad inputs did not get the required reaction ({}):\n  {}",
            self.kind,
            self.failures.len(),
            self.tried,
            self.reaction,
            self.failures.join("\n  ")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Raw MQTT bytes, for what the codec would refuse to write.

fn remaining_length(mut len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            return out;
        }
    }
}

fn frame(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    out.extend(remaining_length(body.len()));
    out.extend_from_slice(body);
    out
}

/// A length-prefixed MQTT string or binary field.
fn field(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

fn raw_connect(client_id: &[u8], username: &[u8], password: &[u8]) -> Vec<u8> {
    let mut body = field(b"MQTT");
    body.push(4);
    body.push(0b1100_0000); // user name and password, persistent session
    body.extend(60u16.to_be_bytes());
    body.extend(field(client_id));
    body.extend(field(username));
    body.extend(field(password));
    frame(0x10, &body)
}

fn raw_publish_qos1(topic: &[u8], pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = field(topic);
    body.extend(pkid.to_be_bytes());
    body.extend_from_slice(payload);
    frame(0x32, &body)
}

fn raw_subscribe(filter: &[u8]) -> Vec<u8> {
    let mut body = 7u16.to_be_bytes().to_vec();
    body.extend(field(filter));
    body.push(1);
    frame(0x82, &body)
}

fn encode(packet: Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    packet.write(&mut out, 1 << 24).expect("encodable");
    out.to_vec()
}

fn user_name(id: &str) -> String {
    format!("localhost/{id}/?api-version=2021-04-12&DeviceClientType=simdevice-tests")
}

/// JSON nested `depth` levels deep: `{"a":{"a":...1...}}`, as text (a `Value` that deep
/// would overflow the stack when dropped).
fn nested_objects(depth: usize) -> String {
    format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
}

fn nested_arrays(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// Ok when the hub closes the connection before answering anything.
async fn closed_at_once(device: &mut RawDevice) -> Result<(), String> {
    match device.recv_within(Duration::from_secs(3)).await {
        Ok(None) => Ok(()),
        Ok(Some(packet)) => Err(format!("the hub answered {packet:?}")),
        Err(()) => Err("the connection is still open after 3 s".into()),
    }
}

/// A service REST client that sends any body and any Authorization header.
struct RawService {
    client: reqwest::Client,
    base: String,
    host: String,
}

impl RawService {
    fn new(hub: &TestHub) -> RawService {
        let host = format!("localhost:{}", hub.hub.api_addr().port());
        let ca = reqwest::Certificate::from_pem(hub.ca_pem().as_bytes()).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(ca)
            .resolve("localhost", hub.hub.api_addr())
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        RawService {
            client,
            base: format!("https://{host}"),
            host,
        }
    }

    fn policy_key(hub: &TestHub, policy: &str) -> String {
        hub.hub
            .state()
            .policies
            .get(policy)
            .expect("policy")
            .primary_key
            .clone()
    }

    fn token(&self, hub: &TestHub, policy: &str) -> String {
        sas::generate_token(
            &self.host,
            &Self::policy_key(hub, policy),
            Some(policy),
            now() + 3600,
        )
        .unwrap()
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        authorization: &str,
        body: Option<String>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{path}{sep}api-version=2021-04-12", self.base);
        let mut request = self
            .client
            .request(method, url)
            .header("Authorization", authorization);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request
                .header("Content-Type", "application/json")
                .body(body);
        }
        let response = request.send().await.expect("the hub answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The hub against floods and bad clients.

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
    let tcp_flood: Vec<std::net::TcpStream> = tokio::task::spawn_blocking(move || {
        (0..FLOOD - TLS_SILENT)
            .map(|_| {
                let socket = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                    .expect("the kernel completes the TCP handshake");
                socket.set_nonblocking(true).unwrap();
                socket
            })
            .collect()
    })
    .await
    .unwrap();
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
    let pkid = before
        .publish("devices/d0/messages/events/", QoS::AtLeastOnce, "{}")
        .await;
    assert_eq!(before.recv().await, Some(Packet::PubAck(PubAck::new(pkid))));
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
        state = service.get("/twins/d1").await.body["connectionState"]
            .as_str()
            .unwrap_or_default()
            .to_string();
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

#[tokio::test]
async fn oversize_and_malformed_packets_close_the_connection() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let token = device_token("d1", &key);
    let user = user_name("d1");

    // Positive control: the largest message is accepted.
    let mut device = RawDevice::connect(&hub, "d1", &key).await;
    let pkid = device
        .publish(
            "devices/d1/messages/events/",
            QoS::AtLeastOnce,
            vec![b'x'; MAX_MESSAGE_SIZE],
        )
        .await;
    assert_eq!(device.recv().await, Some(Packet::PubAck(PubAck::new(pkid))));

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

// ---------------------------------------------------------------------------------------------
// Access: one device against another's topics, policies against routes, tokens.

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
    let pkid = d1
        .publish("devices/d1/messages/events/", QoS::AtLeastOnce, "{}")
        .await;
    assert_eq!(d1.recv().await, Some(Packet::PubAck(PubAck::new(pkid))));
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
    tokio::time::sleep(Duration::from_millis(300)).await;

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
    let rid_of = |topic: &str| topic.split("$rid=").nth(1).unwrap_or_default().to_string();

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

#[tokio::test]
async fn forged_expired_and_misdirected_service_tokens_are_refused() {
    let hub = TestHub::start().await;
    let d1_key = hub.add_device("d1");
    let raw = RawService::new(&hub);
    let host = raw.host.clone();
    let owner_key = RawService::policy_key(&hub, "iothubowner");
    let reader_key = RawService::policy_key(&hub, "registryRead");
    let exp = now() + 3600;
    let sign = |sr: &str, key: &str, skn: Option<&str>, se: u64| {
        sas::generate_token(sr, key, skn, se).unwrap()
    };
    let good = sign(&host, &owner_key, Some("iothubowner"), exp);
    let call = |token: String| {
        let raw = &raw;
        async move { raw.call(Method::GET, "/twins/d1", &token, None, &[]).await }
    };

    // Accepted: the token as built, and (as IoT Hub, which sets no upper bound) far expiries.
    assert_eq!(call(good.clone()).await.0, 200);
    let century = now() + 100 * 365 * 24 * 3600;
    assert_eq!(
        call(sign(&host, &owner_key, Some("iothubowner"), century))
            .await
            .0,
        200
    );
    let secondary = hub
        .hub
        .state()
        .policies
        .get("iothubowner")
        .unwrap()
        .secondary_key
        .clone();
    assert_eq!(
        call(sign(&host, &secondary, Some("iothubowner"), exp))
            .await
            .0,
        200
    );

    let encoded_host = host.replace(':', "%3A");
    let cases: Vec<(&str, String)> = vec![
        (
            "expired 10 s ago",
            sign(&host, &owner_key, Some("iothubowner"), now() - 10),
        ),
        (
            "expired at 1",
            sign(&host, &owner_key, Some("iothubowner"), 1),
        ),
        ("expiry 0", sign(&host, &owner_key, Some("iothubowner"), 0)),
        (
            "another hub",
            sign(
                "other-hub.azure-devices.net",
                &owner_key,
                Some("iothubowner"),
                exp,
            ),
        ),
        (
            "another host on this port",
            sign(
                &host.replace("localhost", "example.com"),
                &owner_key,
                Some("iothubowner"),
                exp,
            ),
        ),
        (
            "another port",
            sign("localhost:1", &owner_key, Some("iothubowner"), exp),
        ),
        (
            "a device resource",
            sign(
                &format!("{host}/devices/d1"),
                &owner_key,
                Some("iothubowner"),
                exp,
            ),
        ),
        (
            "a trailing slash",
            sign(&format!("{host}/"), &owner_key, Some("iothubowner"), exp),
        ),
        (
            "a path",
            sign(
                &format!("{host}/twins"),
                &owner_key,
                Some("iothubowner"),
                exp,
            ),
        ),
        (
            "se moved later",
            good.replace(&format!("se={exp}"), &format!("se={}", exp + 3600)),
        ),
        (
            "se moved earlier",
            good.replace(&format!("se={exp}"), &format!("se={}", exp - 1)),
        ),
        (
            "se with a sign",
            good.replace(&format!("se={exp}"), &format!("se=+{exp}")),
        ),
        (
            "se too large for u64",
            good.replace(&format!("se={exp}"), "se=99999999999999999999999"),
        ),
        (
            "sr upper-cased",
            good.replace(
                &format!("sr={encoded_host}"),
                &format!("sr={}", encoded_host.to_uppercase()),
            ),
        ),
        (
            "sr re-encoded",
            good.replace(&format!("sr={encoded_host}"), &format!("sr={host}")),
        ),
        (
            "sr swapped for another hub",
            good.replace(
                &format!("sr={encoded_host}"),
                "sr=other-hub.azure-devices.net",
            ),
        ),
        ("se duplicated", format!("{good}&se={}", exp + 1)),
        (
            "sr duplicated",
            format!("{good}&sr=other-hub.azure-devices.net"),
        ),
        ("sig duplicated", format!("{good}&sig=AAAA")),
        ("skn duplicated", format!("{good}&skn=iothubowner")),
        (
            "skn unknown",
            sign(&host, &owner_key, Some("nosuchpolicy"), exp),
        ),
        (
            "skn in another case",
            sign(&host, &owner_key, Some("IotHubOwner"), exp),
        ),
        (
            "skn swapped to a stronger policy",
            sign(&host, &reader_key, Some("iothubowner"), exp),
        ),
        (
            "skn replaced after signing",
            sign(&host, &reader_key, Some("registryRead"), exp)
                .replace("skn=registryRead", "skn=iothubowner"),
        ),
        ("no skn", sign(&host, &owner_key, None, exp)),
        (
            "a device's own token",
            sign("localhost/devices/d1", &d1_key, None, exp),
        ),
        (
            "empty sig",
            good.split("&sig=").next().unwrap().to_string()
                + "&sig=&se="
                + &exp.to_string()
                + "&skn=iothubowner",
        ),
        ("sig not base64", good.replace("sig=", "sig=%%%")),
        (
            "sig from a random key",
            sign(&host, &sas::generate_key(), Some("iothubowner"), exp),
        ),
        (
            "no prefix",
            good.trim_start_matches("SharedAccessSignature ")
                .to_string(),
        ),
        (
            "lower-case prefix",
            good.replace("SharedAccessSignature", "sharedaccesssignature"),
        ),
        (
            "Bearer scheme",
            good.replace("SharedAccessSignature", "Bearer"),
        ),
        ("a field without '='", format!("{good}&junk")),
        ("empty header", String::new()),
    ];
    let mut tally = Tally::new("service-tokens", "401 Unauthorized");
    for (case, token) in cases {
        let (status, body) = call(token).await;
        tally.check(
            case,
            if status == 401 {
                Ok(())
            } else {
                Err(format!("answered {status} {body}"))
            },
        );
    }
    tally.finish();
    hub.stop().await;
}

#[tokio::test]
async fn forged_expired_and_misdirected_device_tokens_are_refused() {
    let hub = TestHub::start().await;
    let key1 = hub.add_device("d1");
    let key2 = hub.add_device("d2");
    let policy = |name: &str| RawService::policy_key(&hub, name);
    let exp = now() + 3600;
    let sign = |sr: &str, key: &str, skn: Option<&str>, se: u64| {
        sas::generate_token(sr, key, skn, se).unwrap()
    };
    let d1_sr = sas::device_resource("localhost", "d1", None);
    let good = sign(&d1_sr, &key1, None, exp);
    let connect = |client: &str, user: String, token: String| {
        let mut packet = connect_packet(client, &token, false, 60);
        packet.login = Some(rumqttc::Login::new(user, token));
        packet
    };
    let ack = |packet: rumqttc::Connect| {
        let hub = &hub;
        async move {
            let (mut device, ack) = RawDevice::connect_with(hub, packet).await;
            let closed = ack.code != ConnectReturnCode::Success
                && device.recv_within(Duration::from_secs(3)).await == Ok(None);
            (ack.code, closed)
        }
    };

    // Accepted: the token as built, and (as IoT Hub) any future expiry.
    let century = now() + 100 * 365 * 24 * 3600;
    for token in [good.clone(), sign(&d1_sr, &key1, None, century)] {
        assert_eq!(
            ack(connect("d1", user_name("d1"), token)).await.0,
            ConnectReturnCode::Success
        );
    }

    let encoded = |s: &str| s.replace('/', "%2F");
    let cases: Vec<(&str, rumqttc::Connect)> = vec![
        (
            "expired",
            connect("d1", user_name("d1"), sign(&d1_sr, &key1, None, now() - 10)),
        ),
        (
            "expiry 0",
            connect("d1", user_name("d1"), sign(&d1_sr, &key1, None, 0)),
        ),
        (
            "another hub",
            connect(
                "d1",
                user_name("d1"),
                sign("other.azure-devices.net/devices/d1", &key1, None, exp),
            ),
        ),
        (
            "another hub in token and user name",
            connect(
                "d1",
                user_name("d1").replace("localhost", "other.azure-devices.net"),
                sign("other.azure-devices.net/devices/d1", &key1, None, exp),
            ),
        ),
        (
            "another device's resource, own key",
            connect(
                "d1",
                user_name("d1"),
                sign("localhost/devices/d2", &key1, None, exp),
            ),
        ),
        (
            "another device's valid token",
            connect(
                "d1",
                user_name("d1"),
                sign("localhost/devices/d2", &key2, None, exp),
            ),
        ),
        (
            "resource in another case",
            connect(
                "d1",
                user_name("d1"),
                sign("localhost/devices/D1", &key1, None, exp),
            ),
        ),
        (
            "module resource",
            connect(
                "d1",
                user_name("d1"),
                sign("localhost/devices/d1/modules/m", &key1, None, exp),
            ),
        ),
        (
            "resource with a trailing slash",
            connect(
                "d1",
                user_name("d1"),
                sign("localhost/devices/d1/", &key1, None, exp),
            ),
        ),
        (
            "resource with dot segments",
            connect(
                "d1",
                user_name("d1"),
                sign("localhost/devices/d2/../d1", &key1, None, exp),
            ),
        ),
        (
            "hub-wide resource",
            connect("d1", user_name("d1"), sign("localhost", &key1, None, exp)),
        ),
        (
            "se moved later",
            connect(
                "d1",
                user_name("d1"),
                good.replace(&format!("se={exp}"), &format!("se={}", exp + 3600)),
            ),
        ),
        (
            "sr swapped to d2, as d2",
            connect(
                "d2",
                user_name("d2"),
                good.replace(&encoded(&d1_sr), &encoded("localhost/devices/d2")),
            ),
        ),
        (
            "sr re-encoded",
            connect(
                "d1",
                user_name("d1"),
                good.replace(&encoded(&d1_sr), &d1_sr),
            ),
        ),
        (
            "sr duplicated",
            connect(
                "d1",
                user_name("d1"),
                format!("{good}&sr={}", encoded("localhost/devices/d2")),
            ),
        ),
        (
            "se duplicated",
            connect("d1", user_name("d1"), format!("{good}&se={}", exp + 1)),
        ),
        (
            "skn unknown",
            connect(
                "d1",
                user_name("d1"),
                sign(&d1_sr, &key1, Some("nosuchpolicy"), exp),
            ),
        ),
        (
            "skn iothubowner over a device key",
            connect(
                "d1",
                user_name("d1"),
                sign(&d1_sr, &key1, Some("iothubowner"), exp),
            ),
        ),
        (
            "skn device over a device key",
            connect(
                "d1",
                user_name("d1"),
                sign(&d1_sr, &key1, Some("device"), exp),
            ),
        ),
        (
            "policy without DeviceConnect",
            connect(
                "d1",
                user_name("d1"),
                sign(
                    &d1_sr,
                    &policy("registryReadWrite"),
                    Some("registryReadWrite"),
                    exp,
                ),
            ),
        ),
        (
            "empty sig",
            connect(
                "d1",
                user_name("d1"),
                good.split("&sig=").next().unwrap().to_string() + "&sig=&se=" + &exp.to_string(),
            ),
        ),
        (
            "user name for d2, token for d2",
            connect(
                "d1",
                user_name("d2"),
                sign("localhost/devices/d2", &key2, None, exp),
            ),
        ),
        (
            "client id d2, user name and token for d1",
            connect("d2", user_name("d1"), good.clone()),
        ),
        (
            "user name naming another hub",
            connect(
                "d1",
                user_name("d1").replace("localhost", "evil.example"),
                good.clone(),
            ),
        ),
        (
            "module client id",
            connect(
                "d1/m",
                "localhost/d1/m/?api-version=2021-04-12".into(),
                good.clone(),
            ),
        ),
        (
            "device id in another case",
            connect(
                "D1",
                user_name("D1"),
                sign("localhost/devices/D1", &key1, None, exp),
            ),
        ),
    ];
    let mut tally = Tally::new("device-tokens", "CONNACK 5, then closed");
    for (case, packet) in cases {
        let (code, closed) = ack(packet).await;
        tally.check(
            case,
            if code == ConnectReturnCode::NotAuthorized && closed {
                Ok(())
            } else {
                Err(format!("CONNACK {code:?}, closed {closed}"))
            },
        );
    }
    tally.finish();
    hub.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The agent against a hub that misbehaves.

/// How the fake hub treats the next connection.
#[derive(Clone, Copy, Debug)]
enum Opening {
    /// Accepts TCP, never says a TLS byte.
    SilentTcp,
    /// Reads CONNECT, never answers it.
    Silent,
    /// Answers CONNECT with this refusal and closes.
    Refuse(ConnectReturnCode),
    /// Accepts, then serves like a (minimal) IoT Hub.
    Serve,
}

/// What the agent sent the fake hub, besides readings.
#[derive(Debug)]
enum Seen {
    Connect,
    Publish { topic: String, payload: Bytes },
}

/// A TLS MQTT server on 127.0.0.1 with the hub's TLS identity and rumqttc's codec: it serves
/// CONNECT, SUBSCRIBE, twin GET and reported patches, PUBACKs readings, and lets the test write
/// anything to the current connection.
struct FakeHub {
    addr: SocketAddr,
    ca_file: PathBuf,
    _dir: tempfile::TempDir,
    current: Arc<Mutex<Option<mpsc::Sender<Vec<u8>>>>>,
    seen: mpsc::Receiver<Seen>,
    seqs: Arc<Mutex<BTreeSet<u64>>>,
    connects: Arc<AtomicUsize>,
    twin_body: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct FakeShared {
    script: Arc<Mutex<VecDeque<Opening>>>,
    current: Arc<Mutex<Option<mpsc::Sender<Vec<u8>>>>>,
    seen: mpsc::Sender<Seen>,
    seqs: Arc<Mutex<BTreeSet<u64>>>,
    connects: Arc<AtomicUsize>,
    twin_body: Arc<Mutex<Vec<u8>>>,
}

const GOOD_TWIN: &str = r#"{"desired":{"$version":1},"reported":{"$version":1}}"#;

impl FakeHub {
    async fn start(script: Vec<Opening>) -> FakeHub {
        let dir = tempfile::tempdir().unwrap();
        let identity = simdevice::hub::tls::load_or_create(dir.path(), &[]).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen_tx, seen) = mpsc::channel(10_000);
        let shared = FakeShared {
            script: Arc::new(Mutex::new(script.into())),
            current: Arc::new(Mutex::new(None)),
            seen: seen_tx,
            seqs: Arc::new(Mutex::new(BTreeSet::new())),
            connects: Arc::new(AtomicUsize::new(0)),
            twin_body: Arc::new(Mutex::new(GOOD_TWIN.as_bytes().to_vec())),
        };
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((socket, _)) = listener.accept().await {
                    let opening = shared
                        .script
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or(Opening::Serve);
                    tokio::spawn(fake_connection(
                        socket,
                        acceptor.clone(),
                        opening,
                        shared.clone(),
                    ));
                }
            }
        });
        FakeHub {
            addr,
            ca_file: identity.ca_file,
            _dir: dir,
            current: shared.current,
            seen,
            seqs: shared.seqs,
            connects: shared.connects,
            twin_body: shared.twin_body,
            task,
        }
    }

    /// Writes raw bytes to the connection being served now; false if it has ended.
    async fn try_send(&self, bytes: Vec<u8>) -> bool {
        let sender = self.current.lock().unwrap().clone();
        match sender {
            Some(sender) => sender.send(bytes).await.is_ok(),
            None => false,
        }
    }

    async fn send(&self, bytes: Vec<u8>) {
        assert!(self.try_send(bytes).await, "a connection is being served");
    }

    async fn try_publish(&self, topic: &str, payload: impl Into<Vec<u8>>) -> bool {
        self.try_send(encode(Packet::Publish(Publish::new(
            topic,
            QoS::AtMostOnce,
            payload,
        ))))
        .await
    }

    async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        assert!(
            self.try_publish(topic, payload).await,
            "a connection is being served"
        );
    }

    /// Waits up to `limit` for something the agent sent that `pick` accepts.
    async fn wait_for<T>(
        &mut self,
        limit: Duration,
        mut pick: impl FnMut(&Seen) -> Option<T>,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.seen.recv()).await {
                Ok(Some(seen)) => {
                    if let Some(found) = pick(&seen) {
                        return Some(found);
                    }
                }
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The status of the agent's answer to method call `rid`.
    async fn method_answer(&mut self, rid: &str) -> Option<(u16, Value)> {
        let wanted = format!("/?$rid={rid}");
        self.wait_for(Duration::from_secs(5), |seen| match seen {
            Seen::Publish { topic, payload }
                if topic.starts_with("$iothub/methods/res/") && topic.ends_with(&wanted) =>
            {
                Some((
                    status_of(topic),
                    serde_json::from_slice(payload).unwrap_or_default(),
                ))
            }
            _ => None,
        })
        .await
    }

    async fn next_connect(&mut self, limit: Duration) -> bool {
        self.wait_for(limit, |seen| matches!(seen, Seen::Connect).then_some(()))
            .await
            .is_some()
    }

    fn readings(&self) -> usize {
        self.seqs.lock().unwrap().len()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fake_connection(
    socket: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    opening: Opening,
    shared: FakeShared,
) {
    if let Opening::SilentTcp = opening {
        tokio::time::sleep(Duration::from_secs(30)).await;
        return;
    }
    let Ok(Ok(mut stream)) =
        tokio::time::timeout(Duration::from_secs(5), acceptor.accept(socket)).await
    else {
        return;
    };
    let mut buf = BytesMut::new();
    let read = async {
        loop {
            match Packet::read(&mut buf, 1 << 20) {
                Ok(packet) => return Some(packet),
                Err(rumqttc::Error::InsufficientBytes(_)) => {}
                Err(_) => return None,
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    };
    let Ok(Some(Packet::Connect(_))) = tokio::time::timeout(Duration::from_secs(5), read).await
    else {
        return;
    };
    shared.connects.fetch_add(1, Ordering::SeqCst);
    let _ = shared.seen.try_send(Seen::Connect);
    match opening {
        Opening::SilentTcp => unreachable!(),
        Opening::Silent => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        Opening::Refuse(code) => {
            let _ = stream
                .write_all(&encode(Packet::ConnAck(ConnAck::new(code, false))))
                .await;
            let _ = stream.shutdown().await;
            return;
        }
        Opening::Serve => {}
    }
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
    *shared.current.lock().unwrap() = Some(tx);
    let mut out = encode(Packet::ConnAck(ConnAck::new(
        ConnectReturnCode::Success,
        false,
    )));
    let mut reported_version = 1;
    loop {
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        tokio::select! {
            injected = rx.recv() => match injected {
                Some(bytes) => out = bytes,
                None => return,
            },
            read = stream.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => loop {
                    let packet = match Packet::read(&mut buf, 1 << 20) {
                        Ok(packet) => packet,
                        Err(rumqttc::Error::InsufficientBytes(_)) => break,
                        Err(_) => return,
                    };
                    let mut reply = |packet: Packet| out.extend(encode(packet));
                    match packet {
                        Packet::Subscribe(subscribe) => {
                            let codes = subscribe
                                .filters
                                .iter()
                                .map(|f| rumqttc::SubscribeReasonCode::Success(f.qos))
                                .collect();
                            reply(Packet::SubAck(SubAck::new(subscribe.pkid, codes)));
                        }
                        Packet::Publish(publish) => {
                            if publish.qos == QoS::AtLeastOnce {
                                reply(Packet::PubAck(PubAck::new(publish.pkid)));
                            }
                            let topic = publish.topic.clone();
                            let rid = topic.split("$rid=").nth(1).unwrap_or_default().to_string();
                            if topic.starts_with("devices/") {
                                let body: Value = serde_json::from_slice(&publish.payload).unwrap_or_default();
                                if let Some(seq) = body["seq"].as_u64() {
                                    shared.seqs.lock().unwrap().insert(seq);
                                }
                                continue;
                            }
                            if topic.starts_with("$iothub/twin/GET/") {
                                let body = shared.twin_body.lock().unwrap().clone();
                                reply(Packet::Publish(Publish::new(format!("$iothub/twin/res/200/?$rid={rid}"), QoS::AtMostOnce, body)));
                            } else if topic.starts_with("$iothub/twin/PATCH/properties/reported/") {
                                reported_version += 1;
                                reply(Packet::Publish(Publish::new(
                                    format!("$iothub/twin/res/204/?$rid={rid}&$version={reported_version}"),
                                    QoS::AtMostOnce,
                                    Vec::new(),
                                )));
                            }
                            let _ = shared.seen.try_send(Seen::Publish { topic, payload: publish.payload });
                        }
                        Packet::PingReq => reply(Packet::PingResp),
                        Packet::Disconnect => return,
                        _ => {}
                    }
                },
            },
        }
    }
}

fn agent_config(id: &str, ca_file: PathBuf, mqtt: SocketAddr) -> Config {
    let key = sas::generate_key();
    let mut config = crate::common::agent::agent_config_with_ca(id, &key, ca_file, mqtt);
    config.telemetry.seed = Some(7);
    config.connection.connect_timeout = Duration::from_secs(1);
    // The shortest IoT Hub allows: a hub that stops making sense mid-packet (its bytes then
    // all read as the body of one long packet) is detected by the unanswered ping.
    config.connection.keep_alive = Duration::from_secs(5);
    config
}

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

#[tokio::test]
async fn an_agent_never_connects_to_a_hub_signed_by_another_ca() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let other = tempfile::tempdir().unwrap();
    let other_ca = simdevice::hub::tls::load_or_create(other.path(), &[])
        .unwrap()
        .ca_file;
    let mut config = agent_config("d1", other_ca, hub.hub.mqtt_addr());
    config.identity.key = Secret::new(key);
    let agent = RunningAgent::start(config);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut tally = Tally::new(
        "tls-verification",
        "no connection to a hub whose certificate another CA signed; readings stay queued",
    );
    let connects = agent.counter(|c| &c.connects);
    let produced = agent.counter(|c| &c.readings_produced);
    let acknowledged = agent.counter(|c| &c.readings_acknowledged);
    let reason = agent
        .handle
        .ctx
        .counters()
        .last_disconnect()
        .unwrap_or_default();
    let events = hub
        .service()
        .get("/simdevice/events?deviceId=d1")
        .await
        .body;
    eprintln!("another CA: {connects} connects, {produced} produced, last disconnect {reason:?}");
    tally.check(
        "the hub's certificate from another CA",
        if connects == 0 && acknowledged == 0 && produced > 3 && events == json!([]) && reason.contains("certificate") {
            Ok(())
        } else {
            Err(format!("{connects} connects, {acknowledged}/{produced} readings acknowledged, events {events}, reason {reason:?}"))
        },
    );
    tally.finish();
    agent.stop().await;
    hub.stop().await;
}

/// No code path turns certificate verification off: no custom verifier, no "dangerous" or
/// "insecure" option, in the agent, the service client or anywhere else in the crate.
#[test]
fn no_code_can_turn_tls_verification_off() {
    let forbidden = [
        "dangerous(",
        "danger_accept_invalid",
        "ServerCertVerifier",
        "accept_invalid_hostnames",
        "NoCertificateVerification",
        "insecure",
        "skip_verify",
        "verify_peer",
    ];
    let mut found = Vec::new();
    let mut files = 0;
    let mut stack = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files += 1;
                let text = std::fs::read_to_string(&path).unwrap();
                for word in forbidden {
                    if text.to_lowercase().contains(&word.to_lowercase()) {
                        found.push(format!("{}: {word}", path.display()));
                    }
                }
            }
        }
    }
    assert!(files > 20, "read the crate's sources ({files} files)");
    assert!(
        found.is_empty(),
        "TLS verification could be turned off: {found:?}"
    );
}
