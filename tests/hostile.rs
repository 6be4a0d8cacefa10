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

mod common;

use std::collections::{BTreeSet, VecDeque};
use std::fmt::Display;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::*;
use reqwest::Method;
use rumqttc::{ConnAck, ConnectReturnCode, Packet, PubAck, Publish, QoS, SubAck};
use serde_json::{json, Value};
use simdevice::agent::{Agent, AgentHandle};
use simdevice::config::{Config, Identity, Secret};
use simdevice::hub::mqtt::connection::{CONNECT_DEADLINE, MAX_MESSAGE_SIZE, MAX_PACKET_SIZE};
use simdevice::hub::mqtt::listener::MAX_UNAUTHENTICATED;
use simdevice::protocol::sas;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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
            request = request.header("Content-Type", "application/json").body(body);
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

#[tokio::test]
async fn a_flood_of_silent_connections_is_capped_and_the_hub_keeps_serving() {
    const FLOOD: usize = 1200;
    const TLS_SILENT: usize = 48;
    let hub = TestHub::start().await;
    let key0 = hub.add_device("d0");
    let key1 = hub.add_device("d1");
    let service = hub.service();
    let mut before = RawDevice::connect(&hub, "d0", &key0).await;
    before.subscribe("$iothub/twin/res/#", QoS::AtLeastOnce).await;

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
    assert_eq!(
        before.recv().await,
        Some(Packet::PubAck(PubAck::new(pkid)))
    );
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
    let deadline = opened + CONNECT_DEADLINE + Duration::from_secs(4);
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
            if open { Err("still open".into()) } else { Ok(()) },
        );
    }
    for i in 0..tls_flood.len() {
        let open = tls_open.contains(&i);
        tally.check(
            format!("silent TLS socket {i}"),
            if open { Err("still open".into()) } else { Ok(()) },
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
        let mut publish = Publish::new("devices/d2/messages/events/", QoS::AtLeastOnce, "{\"slow\":1}");
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
async fn deaf_device(hub: &TestHub, id: &str, key: &str) -> tokio_rustls::client::TlsStream<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(hub.hub.mqtt_addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = hub.tls_connector().connect(name, tcp).await.unwrap();
    let mut subscribe = rumqttc::Subscribe::new_many([
        rumqttc::SubscribeFilter::new("$iothub/twin/PATCH/properties/desired/#".into(), QoS::AtMostOnce),
        rumqttc::SubscribeFilter::new("$iothub/methods/POST/#".into(), QoS::AtMostOnce),
    ]);
    subscribe.pkid = 1;
    let mut out = encode(Packet::Connect(connect_packet(id, &device_token(id, key), false, 60)));
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
    other.subscribe("$iothub/twin/res/#", QoS::AtLeastOnce).await;

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
    eprintln!("{patches} patches in {:?}, slowest {slowest:?}", started.elapsed());
    assert!(slowest < Duration::from_secs(2), "the API stayed responsive");

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
            Err(format!("still {state:?} 40 s after it stopped being served"))
        },
    );
    drop(deaf);
    // It can come back and catch up.
    let mut again = RawDevice::connect(&hub, "d1", &key1).await;
    again.subscribe("$iothub/twin/res/#", QoS::AtLeastOnce).await;
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
        ("PUBLISH claiming 268,435,455 bytes", vec![0x30, 0xff, 0xff, 0xff, 0x7f], false),
        ("SUBSCRIBE header of 1 MB", subscribe_header, false),
        ("CONNECT header over the limit, before CONNECT", connect_header, true),
        ("CONNECT with a 264 KB password", huge_password, true),
    ];

    let bad = |s: &[u8]| s.to_vec();
    let utf8: Vec<(&str, Vec<u8>, bool)> = vec![
        ("client id with 0xff", raw_connect(b"d1\xff", user.as_bytes(), token.as_bytes()), true),
        ("client id with a surrogate", raw_connect(b"d1\xed\xa0\x80", user.as_bytes(), token.as_bytes()), true),
        ("client id with an overlong '/'", raw_connect(b"d1\xc0\xaf", user.as_bytes(), token.as_bytes()), true),
        ("user name with 0xfe", raw_connect(b"d1", &[user.as_bytes(), b"\xfe"].concat(), token.as_bytes()), true),
        ("user name with a truncated sequence", raw_connect(b"d1", b"localhost/d1\xe2\x82/?api-version=2021-04-12", token.as_bytes()), true),
        ("password with 0x80", raw_connect(b"d1", user.as_bytes(), &[token.as_bytes(), b"\x80"].concat()), true),
        ("topic with 0xff", raw_publish_qos1(b"devices/d1/messages/events/\xff", 1, b"{}"), false),
        ("topic with an overlong '/'", raw_publish_qos1(b"devices/d1\xc0\xafmessages/events/", 1, b"{}"), false),
        ("topic with a truncated sequence", raw_publish_qos1(b"devices/d1/messages/events/\xe2\x82", 1, b"{}"), false),
        ("topic with a surrogate", raw_publish_qos1(b"$iothub/twin/GET/?$rid=\xed\xa0\x80", 1, b""), false),
        ("topic with U+0000", raw_publish_qos1(b"devices/d1/messages/events/\0", 1, b"{}"), false),
        ("property bag decoding to bad UTF-8", raw_publish_qos1(b"devices/d1/messages/events/a=%ff%fe", 1, b"{}"), false),
        ("rid decoding to bad UTF-8", raw_publish_qos1(b"$iothub/twin/GET/?$rid=%c0%af", 1, b""), false),
        ("subscription filter with 0xff", raw_subscribe(b"$iothub/methods/POST/\xff#"), false),
        ("subscription filter with U+0000", raw_subscribe(b"$iothub/methods/POST/\0#"), false),
    ];

    let mut short_topic = vec![0x32, 4];
    short_topic.extend(100u16.to_be_bytes());
    short_topic.extend([0, 1]);
    let lengths: Vec<(&str, Vec<u8>, bool)> = vec![
        ("five-byte remaining length", bad(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]), false),
        ("five-byte remaining length, before CONNECT", bad(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]), true),
        ("topic length past the remaining length", short_topic, false),
        ("PUBLISH with remaining length 0", bad(&[0x30, 0x00]), false),
        ("CONNECT with remaining length 0", bad(&[0x10, 0x00]), true),
        ("SUBSCRIBE without a filter", bad(&[0x82, 0x02, 0x00, 0x01]), false),
        ("QoS 1 PUBLISH with packet id 0", raw_publish_qos1(b"devices/d1/messages/events/", 0, b"{}"), false),
        ("reserved packet type 0", bad(&[0x00, 0x00]), false),
        ("reserved packet type 15", bad(&[0xf0, 0x00]), false),
        ("PUBLISH with QoS 3", frame(0x36, &[field(b"devices/d1/messages/events/"), vec![0, 1]].concat()), false),
        ("CONNECT naming protocol MQTX", {
            let mut c = raw_connect(b"d1", user.as_bytes(), token.as_bytes());
            c[6] = b'X';
            c
        }, true),
        ("CONNECT with protocol level 3", {
            let mut c = raw_connect(b"d1", user.as_bytes(), token.as_bytes());
            c[8] = 3;
            c
        }, true),
        ("CONNECT with will QoS but no will flag", {
            let mut c = raw_connect(b"d1", user.as_bytes(), token.as_bytes());
            c[9] |= 0b0001_1000;
            c
        }, true),
    ];

    for (kind, reaction, cases) in [
        ("oversize-packets", "connection closed, nothing answered", oversize),
        ("malformed-utf8", "connection closed, nothing answered", utf8),
        ("malformed-packets", "connection closed, nothing answered", lengths),
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
    device.subscribe("$iothub/twin/res/#", QoS::AtLeastOnce).await;
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
    device.subscribe("$iothub/twin/res/#", QoS::AtLeastOnce).await;
    let mut tally = Tally::new(
        "nested-json-mqtt",
        "reported patch answered 400 on the same connection",
    );
    let cases = [
        ("10,000 nested objects", nested_objects(10_000)),
        ("10,000 nested arrays", format!("{{\"a\":{}}}", nested_arrays(10_000))),
        ("100,000 unclosed brackets", format!("{{\"a\":{}", "[".repeat(100_000))),
        ("depth 11, over the twin limit of 10", nested_objects(11)),
        ("a raw control character in a string", "{\"a\":\"\u{1}\"}".to_string()),
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
    assert_eq!(status, 204, "a valid patch still works on the same connection");
    tally.finish();

    let mut tally = Tally::new("nested-json-rest", "answered 400; nothing changed");
    let deep = nested_objects(10_000);
    let parens = |n: usize| format!("SELECT * FROM devices WHERE {}1 = 1{}", "(".repeat(n), ")".repeat(n));
    let query = |q: String| Some(json!({ "query": q }).to_string());
    let cases: Vec<(&str, Method, &str, Option<String>)> = vec![
        ("twin PATCH, 10,000 levels", Method::PATCH, "/twins/d1", Some(format!("{{\"properties\":{{\"desired\":{deep}}}}}"))),
        ("twin PUT, 10,000 levels", Method::PUT, "/twins/d1", Some(format!("{{\"tags\":{deep}}}"))),
        ("twin PATCH, desired depth 11", Method::PATCH, "/twins/d1", Some(format!("{{\"properties\":{{\"desired\":{}}}}}", nested_objects(11)))),
        ("method payload, 10,000 levels", Method::POST, "/twins/d1/methods", Some(format!("{{\"methodName\":\"m\",\"payload\":{deep}}}"))),
        ("method payload, 100,000 unclosed arrays", Method::POST, "/twins/d1/methods", Some(format!("{{\"methodName\":\"m\",\"payload\":{}", "[".repeat(100_000)))),
        ("query body, 10,000 levels", Method::POST, "/devices/query", Some(format!("{{\"query\":{deep}}}"))),
        ("query with 10,000 parentheses", Method::POST, "/devices/query", query(parens(10_000))),
        ("query with 4,000 parentheses (under the length limit)", Method::POST, "/devices/query", query(parens(4_000))),
        ("query with 2,000 NOTs", Method::POST, "/devices/query", query(format!("SELECT * FROM devices WHERE {}deviceId = 'd1'", "NOT ".repeat(2_000)))),
        ("query with 1,000 nested IS_DEFINED", Method::POST, "/devices/query", query(format!("SELECT * FROM devices WHERE {}tags.a{}", "IS_DEFINED(".repeat(1_000), ")".repeat(1_000)))),
        ("query with 4,000 nested lists", Method::POST, "/devices/query", query(format!("SELECT * FROM devices WHERE deviceId IN {}'d1'{}", "[".repeat(4_000), "]".repeat(4_000)))),
        ("query with 2,000 unary minus", Method::POST, "/devices/query", query(format!("SELECT * FROM devices WHERE tags.a = {}1", "-".repeat(2_000)))),
        ("device PUT, 10,000 levels", Method::PUT, "/devices/d9", Some(format!("{{\"deviceId\":\"d9\",\"authentication\":{deep}}}"))),
        ("twin job, 10,000 levels", Method::PUT, "/jobs/v2/j1", Some(format!("{{\"type\":\"scheduleUpdateTwin\",\"queryCondition\":\"deviceId = 'd1'\",\"updateTwin\":{{\"properties\":{{\"desired\":{deep}}}}}}}"))),
        ("cloud-to-device payload, 10,000 levels", Method::POST, "/simdevice/devices/d1/messages/devicebound", Some(format!("{{\"payload\":{deep}}}"))),
    ];
    for (case, method, path, body) in cases {
        let asked = Instant::now();
        let (status, reply) = raw.call(method, path, &owner, body, &[("If-Match", "*")]).await;
        tally.check(
            case,
            if status == 400 && asked.elapsed() < Duration::from_secs(5) {
                Ok(())
            } else {
                Err(format!("answered {status} in {:?}: {reply}", asked.elapsed()))
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
