//! A fake IoT Hub for the agent to meet: TLS with the hub's own identity and rumqttc's codec,
//! scripted per connection (`Opening`: silent TCP, silent after CONNECT, a refusal, or served
//! like a minimal hub), that records what the agent sent (`Seen`) and lets the test write any
//! bytes to the connection being served. It is not the hub: it shares no code with
//! `simdevice::hub` beyond the TLS identity, so it can misbehave in ways the hub never would.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::{ConnAck, ConnectReturnCode, Packet, PubAck, Publish, QoS, SubAck};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::raw_mqtt::encode;
use super::{rid_of, status_of};

/// How the fake hub treats the next connection.
#[derive(Clone, Copy, Debug)]
pub enum Opening {
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
pub enum Seen {
    Connect,
    Publish { topic: String, payload: Bytes },
}

/// A TLS MQTT server on 127.0.0.1 with the hub's TLS identity and rumqttc's codec: it serves
/// CONNECT, SUBSCRIBE, twin GET and reported patches, PUBACKs readings, and lets the test write
/// anything to the current connection.
pub struct FakeHub {
    pub addr: SocketAddr,
    pub ca_file: PathBuf,
    _dir: tempfile::TempDir,
    current: Arc<Mutex<Option<mpsc::Sender<Vec<u8>>>>>,
    seen: mpsc::Receiver<Seen>,
    pub seqs: Arc<Mutex<BTreeSet<u64>>>,
    pub connects: Arc<AtomicUsize>,
    pub twin_body: Arc<Mutex<Vec<u8>>>,
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

pub const GOOD_TWIN: &str = r#"{"desired":{"$version":1},"reported":{"$version":1}}"#;

impl FakeHub {
    pub async fn start(script: Vec<Opening>) -> FakeHub {
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
    pub async fn try_send(&self, bytes: Vec<u8>) -> bool {
        let sender = self.current.lock().unwrap().clone();
        match sender {
            Some(sender) => sender.send(bytes).await.is_ok(),
            None => false,
        }
    }

    pub async fn send(&self, bytes: Vec<u8>) {
        assert!(self.try_send(bytes).await, "a connection is being served");
    }

    pub async fn try_publish(&self, topic: &str, payload: impl Into<Vec<u8>>) -> bool {
        self.try_send(encode(Packet::Publish(Publish::new(
            topic,
            QoS::AtMostOnce,
            payload,
        ))))
        .await
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        assert!(
            self.try_publish(topic, payload).await,
            "a connection is being served"
        );
    }

    /// Waits up to `limit` for something the agent sent that `pick` accepts.
    pub async fn wait_for<T>(
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
    pub async fn method_answer(&mut self, rid: &str) -> Option<(u16, Value)> {
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

    pub async fn next_connect(&mut self, limit: Duration) -> bool {
        self.wait_for(limit, |seen| matches!(seen, Seen::Connect).then_some(()))
            .await
            .is_some()
    }

    pub fn readings(&self) -> usize {
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
                            let rid = rid_of(&topic);
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
