//! Test support: an in-process hub on 127.0.0.1 with free ports, a raw MQTT-over-TLS device
//! that speaks packet by packet (to test refusals exactly), and a service REST client. Beside
//! it: `agent` (agents run in-process), `azurite` (the storage emulator), `proxy` (a
//! fault-injecting TCP proxy), `fake_hub` (a scripted hub that misbehaves) and `raw_mqtt`
//! (bytes the codec would refuse to write).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::{Connect, Login, Packet, Publish, QoS, Subscribe};
use serde_json::Value;
use simdevice::hub::registry::DeviceSpec;
use simdevice::hub::{Hub, HubConfig};
use simdevice::protocol::sas;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

pub const WAIT: Duration = Duration::from_secs(5);

/// A child `simdevice` (or a program that starts one) freed of the caller's environment that
/// would change what it does (a shard index, group keys, a hub state directory, a proxy, a
/// capture destination), and killed if the test drops it.
pub fn isolated(command: &mut tokio::process::Command) -> &mut tokio::process::Command {
    command
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("SIMDEVICE_GROUP_KEY")
        .env_remove("SIMDEVICE_HUB_GROUP_KEY")
        .env_remove("SIMDEVICE_HUB_STATE_DIR")
        // What the binary also takes from the environment, set on some machines (a CI
        // runner's proxy, a storage account): a test gives these itself when it means to.
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env_remove("AZURE_STORAGE_CONNECTION_STRING")
        .env_remove("SIMDEVICE_HUB_CAPTURE")
        .kill_on_drop(true)
}

pub struct TestHub {
    pub hub: Hub,
    pub dir: tempfile::TempDir,
}

impl TestHub {
    pub async fn start() -> TestHub {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut HubConfig)) -> TestHub {
        // RUST_LOG=debug shows the hub's log in failing tests.
        {
            use tracing_subscriber::prelude::*;
            let filter = std::env::var("RUST_LOG")
                .ok()
                .and_then(|spec| spec.parse::<tracing_subscriber::filter::Targets>().ok())
                .unwrap_or_default();
            let layer = tracing_subscriber::fmt::layer().with_test_writer();
            let _ = tracing_subscriber::registry()
                .with(layer.with_filter(filter))
                .try_init();
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = HubConfig::ephemeral(dir.path());
        adjust(&mut config);
        let hub = Hub::start(config).await.expect("hub starts");
        TestHub { hub, dir }
    }

    /// Registers a device and returns its primary key.
    pub fn add_device(&self, id: &str) -> String {
        self.hub
            .state()
            .registry
            .create(DeviceSpec::enabled(id))
            .expect("device created");
        self.device_key(id)
    }

    pub fn device_key(&self, id: &str) -> String {
        self.hub
            .state()
            .registry
            .get(id, |d| d.primary_key.clone())
            .expect("device exists")
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(&self.hub.info().ca_file).expect("CA file")
    }

    pub fn tls_connector(&self) -> tokio_rustls::TlsConnector {
        tls_connector_for(&self.ca_pem())
    }

    pub fn service(&self) -> Service {
        Service::new(self, "iothubowner")
    }

    pub async fn stop(self) {
        self.hub.shutdown().await;
    }
}

/// A TLS client that trusts `ca_pem` (a hub's CA), e.g. for a hub run as a child process.
pub fn tls_connector_for(ca_pem: &str) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in simdevice::common::pem::parse_pem_certificates(ca_pem).unwrap() {
        roots.add(cert).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

pub fn now() -> u64 {
    chrono::Utc::now().timestamp() as u64
}

/// A device token for `localhost/devices/{id}` valid for an hour.
pub fn device_token(id: &str, key: &str) -> String {
    sas::generate_token(
        &sas::device_resource("localhost", id, None),
        key,
        None,
        now() + 3600,
    )
    .unwrap()
}

/// The MQTT user name a device `id` of the test hub presents.
pub fn user_name(id: &str) -> String {
    format!("localhost/{id}/?api-version=2021-04-12&DeviceClientType=simdevice-tests")
}

pub fn connect_packet(id: &str, password: &str, clean_session: bool, keep_alive: u16) -> Connect {
    let mut connect = Connect::new(id);
    connect.clean_session = clean_session;
    connect.keep_alive = keep_alive;
    connect.login = Some(Login::new(user_name(id), password));
    connect
}

/// A device that speaks MQTT packet by packet over TLS.
pub struct RawDevice {
    pub stream: TlsStream<TcpStream>,
    buf: BytesMut,
    next_pkid: u16,
}

impl RawDevice {
    pub async fn open(hub: &TestHub) -> RawDevice {
        Self::open_at(hub.hub.mqtt_addr(), hub.tls_connector()).await
    }

    /// A connection to a hub anywhere (a hub run as a child process, for example).
    pub async fn open_at(
        addr: std::net::SocketAddr,
        connector: tokio_rustls::TlsConnector,
    ) -> RawDevice {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let stream = connector.connect(name, tcp).await.unwrap();
        RawDevice {
            stream,
            buf: BytesMut::new(),
            next_pkid: 0,
        }
    }

    /// Opens a connection and sends CONNECT; returns the device and the CONNACK code.
    pub async fn connect_with(hub: &TestHub, connect: Connect) -> (RawDevice, rumqttc::ConnAck) {
        let mut device = Self::open(hub).await;
        device.send(Packet::Connect(connect)).await;
        match device.recv().await {
            Some(Packet::ConnAck(ack)) => (device, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connects with the device's key; panics unless accepted.
    pub async fn connect(hub: &TestHub, id: &str, key: &str) -> RawDevice {
        let (device, ack) =
            Self::connect_with(hub, connect_packet(id, &device_token(id, key), false, 60)).await;
        assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
        device
    }

    pub async fn send(&mut self, packet: Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, 1 << 20).unwrap();
        self.send_bytes(&out).await;
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        // A write may fail once the hub has closed; the test then sees the close on recv.
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }

    /// The next packet, or None when the hub closed the connection. Panics after WAIT.
    pub async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(WAIT)
            .await
            .expect("no packet and no close in time")
    }

    /// Ok(None): closed; Err: nothing within `limit`.
    pub async fn recv_within(&mut self, limit: Duration) -> Result<Option<Packet>, ()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match Packet::read(&mut self.buf, 1 << 20) {
                Ok(packet) => return Ok(Some(packet)),
                Err(rumqttc::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("hub sent a malformed packet: {e}"),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err(()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Asserts that the hub closes the connection (after any packets it still sends).
    pub async fn expect_closed(&mut self) {
        loop {
            match self.recv().await {
                None => return,
                Some(Packet::PubAck(_)) | Some(Packet::SubAck(_)) => continue,
                Some(other) => panic!("expected the hub to close, got {other:?}"),
            }
        }
    }

    pub fn pkid(&mut self) -> u16 {
        self.next_pkid += 1;
        self.next_pkid
    }

    pub async fn publish(&mut self, topic: &str, qos: QoS, payload: impl Into<Vec<u8>>) -> u16 {
        let mut publish = Publish::new(topic, qos, payload);
        if qos != QoS::AtMostOnce {
            publish.pkid = self.pkid();
        }
        let pkid = publish.pkid;
        self.send(Packet::Publish(publish)).await;
        pkid
    }

    /// A QoS 1 publish that the hub must acknowledge: panics unless the next packet is its
    /// PUBACK. Returns the packet id.
    pub async fn publish_acked(&mut self, topic: &str, payload: impl Into<Vec<u8>>) -> u16 {
        let pkid = self.publish(topic, QoS::AtLeastOnce, payload).await;
        match self.recv().await {
            Some(Packet::PubAck(ack)) if ack.pkid == pkid => pkid,
            other => panic!("expected PUBACK {pkid} to the publish on {topic}, got {other:?}"),
        }
    }

    /// Answers method call `rid` with `status` and `payload` (QoS 1).
    pub async fn answer_method(&mut self, rid: &str, status: u16, payload: impl Into<Vec<u8>>) {
        self.publish(
            &format!("$iothub/methods/res/{status}/?$rid={rid}"),
            QoS::AtLeastOnce,
            payload,
        )
        .await;
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> rumqttc::SubAck {
        let mut subscribe = Subscribe::new(filter, qos);
        subscribe.pkid = self.pkid();
        self.send(Packet::Subscribe(subscribe)).await;
        loop {
            match self.recv().await {
                Some(Packet::SubAck(ack)) => return ack,
                Some(_) => continue,
                None => panic!("closed while waiting for SUBACK to {filter}"),
            }
        }
    }

    /// Waits for the next PUBLISH from the hub, acknowledging QoS 1 ones.
    pub async fn next_publish(&mut self) -> Publish {
        loop {
            match self.recv().await {
                Some(Packet::Publish(publish)) => {
                    if publish.qos == QoS::AtLeastOnce {
                        self.send(Packet::PubAck(rumqttc::PubAck::new(publish.pkid)))
                            .await;
                    }
                    return publish;
                }
                Some(_) => continue,
                None => panic!("closed while waiting for a publish"),
            }
        }
    }

    /// Twin GET over MQTT; returns (status, body).
    pub async fn twin_get(&mut self, rid: &str) -> (u16, Value) {
        self.publish(
            &format!("$iothub/twin/GET/?$rid={rid}"),
            QoS::AtLeastOnce,
            " ",
        )
        .await;
        let publish = self.next_publish().await;
        assert!(
            publish.topic.contains(&format!("$rid={rid}")),
            "{}",
            publish.topic
        );
        (
            status_of(&publish.topic),
            serde_json::from_slice(&publish.payload).unwrap(),
        )
    }

    /// Reported patch over MQTT; returns the response topic and body.
    pub async fn twin_patch(&mut self, rid: &str, body: &str) -> (u16, String, Vec<u8>) {
        self.publish(
            &format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
            QoS::AtLeastOnce,
            body,
        )
        .await;
        let publish = self.next_publish().await;
        (
            status_of(&publish.topic),
            publish.topic,
            publish.payload.to_vec(),
        )
    }
}

/// The request id of a topic (`...?$rid={rid}`, the last property), or "" without one.
pub fn rid_of(topic: &str) -> String {
    topic.split("$rid=").nth(1).unwrap_or_default().to_string()
}

/// The status segment of `$iothub/twin/res/{status}/...`.
pub fn status_of(topic: &str) -> u16 {
    topic.split('/').nth(3).unwrap().parse().unwrap()
}

/// A service REST client with a policy's token.
pub struct Service {
    client: reqwest::Client,
    base: String,
    token: String,
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn error_code(&self) -> Option<u64> {
        self.body["errorCode"].as_u64()
    }
}

impl Service {
    pub fn new(hub: &TestHub, policy: &str) -> Service {
        let key = hub
            .hub
            .state()
            .policies
            .get(policy)
            .expect("policy")
            .primary_key
            .clone();
        Self::with_key(hub, policy, &key, now() + 3600)
    }

    pub fn with_key(hub: &TestHub, policy: &str, key: &str, expiry: u64) -> Service {
        let host = format!("localhost:{}", hub.hub.api_addr().port());
        let token = sas::generate_token(&host, key, Some(policy), expiry).unwrap();
        let ca = reqwest::Certificate::from_pem(hub.ca_pem().as_bytes()).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(ca)
            .resolve("localhost", hub.hub.api_addr())
            .build()
            .unwrap();
        Service {
            client,
            base: format!("https://{host}"),
            token,
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{path}{sep}api-version=2021-04-12", self.base);
        let mut request = self
            .client
            .request(method, url)
            .header("Authorization", &self.token);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request sent");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.call(reqwest::Method::GET, path, None, &[]).await
    }

    /// A direct method call with a 10 s response timeout.
    pub async fn invoke(&self, id: &str, method: &str, payload: Value) -> Reply {
        let body = serde_json::json!({"methodName": method, "payload": payload, "responseTimeoutInSeconds": 10});
        self.call(
            reqwest::Method::POST,
            &format!("/twins/{id}/methods"),
            Some(body),
            &[],
        )
        .await
    }

    /// The device's recent telemetry as the hub holds it (`/simdevice/events`).
    pub async fn events(&self, id: &str) -> Vec<Value> {
        self.get(&format!("/simdevice/events?deviceId={id}&limit=10000"))
            .await
            .body
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The device's `connectionState` as the twin shows it.
    pub async fn connection_state(&self, id: &str) -> String {
        let twin = self.get(&format!("/twins/{id}")).await.body;
        twin["connectionState"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until the twin shows `state` (`Connected` or `Disconnected`); panics after `limit`.
    pub async fn wait_connection_state(&self, id: &str, state: &str, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let now = self.connection_state(id).await;
            if now == state {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} still {now:?}, not {state:?}, after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The payload of the device's answer to `getDeviceInfo` (Null if it did not answer 200).
    pub async fn device_info(&self, id: &str) -> Value {
        let answer = self.invoke(id, "getDeviceInfo", Value::Null).await.body;
        if answer["status"] == 200 {
            answer["payload"].clone()
        } else {
            Value::Null
        }
    }

    /// The device twin's reported properties.
    pub async fn reported(&self, id: &str) -> Value {
        self.get(&format!("/twins/{id}")).await.body["properties"]["reported"].clone()
    }
}

/// A TCP relay between a client and a server on loopback that a test can cut and restore,
/// to take a device offline without touching either side.
pub struct Relay {
    pub addr: std::net::SocketAddr,
    state: Arc<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: std::net::SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (state, _) = tokio::sync::watch::channel(true);
        let state = Arc::new(state);
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        return;
                    };
                    if !*state.borrow() {
                        drop(inbound);
                        continue;
                    }
                    let mut up = state.subscribe();
                    tokio::spawn(async move {
                        let Ok(outbound) = TcpStream::connect(target).await else {
                            return;
                        };
                        let (mut a, mut b) = (inbound, outbound);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                            _ = up.wait_for(|open| !*open) => {}
                        }
                    });
                }
            }
        });
        Relay { addr, state, task }
    }

    /// Drops every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.state.send_replace(false);
    }

    pub fn restore(&self) {
        self.state.send_replace(true);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub mod agent;
pub mod amqp_cbs;
pub mod azurite;
pub mod fake_hub;
pub mod proxy;
pub mod raw_mqtt;

/// Opens `count` plain TCP connections to `addr` (the kernel completes each handshake; nothing
/// is sent), non-blocking, from a blocking thread: the raw material of the flood tests.
pub async fn open_tcp(addr: std::net::SocketAddr, count: usize) -> Vec<std::net::TcpStream> {
    tokio::task::spawn_blocking(move || {
        (0..count)
            .map(|_| {
                let socket = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                    .expect("the kernel completes the TCP handshake");
                socket.set_nonblocking(true).expect("non-blocking");
                socket
            })
            .collect()
    })
    .await
    .expect("the connecting thread ends")
}
