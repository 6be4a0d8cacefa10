//! MQTT over WebSocket (issue 11), through real sockets: the agent with `transport =
//! "websocket"` against the in-process hub's WebSocket listener (telemetry acknowledged, the
//! twin fetched, a desired patch applied, a direct method answered), the same through an HTTP
//! CONNECT proxy started here (which counts its tunnels), and the refusals: a wrong path, no
//! `mqtt` subprotocol, plain HTTP, an oversize frame, the shared pool of unauthenticated
//! connections, and a proxy answering 407 or 502, named in the agent's error.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use reqwest::Method;
use serde_json::{json, Value};
use simdevice::config::{Config, Proxy, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::common::agent::{agent_config, eventually, RunningAgent};
use crate::common::*;

/// An agent of `hub` for `id` dialling `addr` over WebSocket.
fn ws_config(hub: &TestHub, id: &str, key: &str, addr: SocketAddr) -> Config {
    let mut config = agent_config(hub, id, key, addr);
    config.connection.transport = Transport::WebSocket;
    config.connection.connect_timeout = Duration::from_secs(5);
    config
}

/// Telemetry acknowledged, the twin fetched and connectivity reported, a desired patch
/// applied and acknowledged, a direct method answered: the agent's whole session.
async fn full_session(hub: &TestHub, agent: &RunningAgent, id: &str) {
    let service = hub.service();
    eventually(Duration::from_secs(15), || async {
        (agent.counter(|c| &c.readings_acknowledged) >= 2).then_some(())
    })
    .await;
    let events = service.events(id).await;
    assert!(events.len() >= 2, "{events:?}");
    assert_eq!(events[0]["body"]["id"], id);

    eventually(Duration::from_secs(10), || async {
        let reported = service.reported(id).await;
        reported.get("connectivity").is_some().then_some(())
    })
    .await;
    assert!(agent.counter(|c| &c.twins_fetched) >= 1);

    let patch = json!({"properties": {"desired": {"floor": 7}}});
    let updated = service
        .call(Method::PATCH, &format!("/twins/{id}"), Some(patch), &[])
        .await;
    let version = updated.body["properties"]["desired"]["$version"]
        .as_u64()
        .unwrap();
    let acks = eventually(Duration::from_secs(10), || async {
        let reported = service.reported(id).await;
        (reported["floor"]["av"] == version).then_some(reported)
    })
    .await;
    assert_eq!(acks["floor"]["value"], 7);
    assert_eq!(acks["floor"]["ac"], 200);

    let answer = service.invoke(id, "getDeviceInfo", Value::Null).await;
    assert_eq!(answer.body["status"], 200, "{:?}", answer.body);
    assert_eq!(answer.body["payload"]["deviceId"], id);
}

#[tokio::test]
async fn the_agent_works_over_websocket() {
    let hub = TestHub::start().await;
    assert_ne!(hub.hub.ws_addr().port(), 0);
    assert_eq!(hub.hub.info().ws_port, hub.hub.ws_addr().port());
    let key = hub.add_device("ws-01");
    let agent = RunningAgent::start(ws_config(&hub, "ws-01", &key, hub.hub.ws_addr()));
    full_session(&hub, &agent, "ws-01").await;
    agent.stop().await;

    // The same agent over plain MQTT does not get through the WebSocket port: the transport
    // is really what carried the session above.
    let mut config = ws_config(&hub, "ws-01", &key, hub.hub.ws_addr());
    config.connection.transport = Transport::Mqtt;
    let agent = RunningAgent::start(config);
    eventually(Duration::from_secs(15), || async {
        (agent.reconnects("failed") >= 1).then_some(())
    })
    .await;
    assert_eq!(agent.counter(|c| &c.connects), 0);
    agent.stop().await;
}

#[tokio::test]
async fn the_agent_works_through_a_connect_proxy() {
    let hub = TestHub::start().await;
    let key = hub.add_device("ws-proxied");
    let proxy = TestProxy::start(ProxyMode::Tunnel {
        credentials: Some("alice:s3cret".into()),
    })
    .await;
    let mut config = ws_config(&hub, "ws-proxied", &key, hub.hub.ws_addr());
    config.connection.proxy =
        Some(Proxy::parse(&format!("http://alice:s3cret@{}", proxy.addr)).unwrap());
    let agent = RunningAgent::start(config);
    full_session(&hub, &agent, "ws-proxied").await;
    assert!(proxy.tunnels() >= 1, "the session went through the proxy");
    assert_eq!(
        proxy.targets(),
        vec![format!("localhost:{}", hub.hub.ws_addr().port()); proxy.tunnels() as usize]
    );
    agent.stop().await;

    // MQTT over TLS goes through a proxy the same way.
    let tunnels = proxy.tunnels();
    let mut config = agent_config(&hub, "ws-proxied", &key, hub.hub.mqtt_addr());
    config.connection.proxy =
        Some(Proxy::parse(&format!("http://alice:s3cret@{}", proxy.addr)).unwrap());
    let agent = RunningAgent::start(config);
    eventually(Duration::from_secs(15), || async {
        (agent.counter(|c| &c.readings_acknowledged) >= 1).then_some(())
    })
    .await;
    assert!(proxy.tunnels() > tunnels);
    agent.stop().await;
}

#[tokio::test]
async fn proxy_refusals_are_named_in_the_agents_error() {
    let hub = TestHub::start().await;
    let key = hub.add_device("ws-refused");
    for (mode, expected) in [
        // Credentials the proxy does not know: 407.
        (
            ProxyMode::Tunnel {
                credentials: Some("bob:other".into()),
            },
            "HTTP 407",
        ),
        (ProxyMode::Status(502), "HTTP 502"),
        (
            ProxyMode::Close,
            "closed the connection before answering CONNECT",
        ),
    ] {
        let proxy = TestProxy::start(mode).await;
        let mut config = ws_config(&hub, "ws-refused", &key, hub.hub.ws_addr());
        config.connection.proxy =
            Some(Proxy::parse(&format!("http://alice:s3cret@{}", proxy.addr)).unwrap());
        let agent = RunningAgent::start(config);
        let error = eventually(Duration::from_secs(15), || async {
            agent.handle.ctx.counters().last_disconnect()
        })
        .await;
        assert!(error.contains(expected), "{error}");
        assert!(
            error.contains(&format!("the proxy http://***@{}", proxy.addr)),
            "{error}"
        );
        assert!(
            !error.contains("s3cret") && !error.contains("alice"),
            "{error}"
        );
        assert_eq!(agent.counter(|c| &c.connects), 0);
        agent.stop().await;
    }

    // No proxy listening at all: refused.
    let unused = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = unused.local_addr().unwrap();
    drop(unused);
    let mut config = ws_config(&hub, "ws-refused", &key, hub.hub.ws_addr());
    config.connection.proxy = Some(Proxy::parse(&format!("http://{addr}")).unwrap());
    let agent = RunningAgent::start(config);
    let error = eventually(Duration::from_secs(15), || async {
        agent.handle.ctx.counters().last_disconnect()
    })
    .await;
    assert!(
        error.contains(&format!("cannot connect to the proxy http://{addr}")),
        "{error}"
    );
    assert!(error.to_lowercase().contains("refused"), "{error}");
    agent.stop().await;
}

/// TLS to the hub's WebSocket port, as a client that trusts its CA.
async fn tls_to(hub: &TestHub) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(hub.hub.ws_addr()).await.unwrap();
    hub.tls_connector()
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("the WebSocket port speaks TLS with the hub's certificate")
}

/// A WebSocket upgrade at `path`, offering `subprotocol` if any.
async fn upgrade(
    hub: &TestHub,
    path: &str,
    subprotocol: Option<&'static str>,
) -> Result<tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>, WsError>
{
    let url = format!("wss://localhost:{}{path}", hub.hub.ws_addr().port());
    let mut request = url.into_client_request().unwrap();
    if let Some(protocol) = subprotocol {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(protocol));
    }
    tokio_tungstenite::client_async(request, tls_to(hub).await)
        .await
        .map(|(ws, _)| ws)
}

/// Waits for the peer to close `stream` (EOF or an error), within `limit`.
async fn expect_closed_within(stream: &mut (impl tokio::io::AsyncRead + Unpin), limit: Duration) {
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the hub kept the connection open");
}

#[tokio::test]
async fn upgrades_the_hub_refuses() {
    let hub = TestHub::start().await;
    match upgrade(&hub, "/mqtt", Some("mqtt")).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 404),
        other => panic!("a wrong path: {other:?}"),
    }
    match upgrade(&hub, "/$iothub/websocket", None).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 400),
        other => panic!("no subprotocol: {other:?}"),
    }
    match upgrade(&hub, "/$iothub/websocket", Some("wamp")).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 400),
        other => panic!("another subprotocol: {other:?}"),
    }
    // The right one, with the query some SDKs add, is accepted and answered `mqtt`.
    let mut ws = upgrade(
        &hub,
        "/$iothub/websocket?iothub-no-client-cert=true",
        Some("mqtt"),
    )
    .await
    .expect("the upgrade is accepted");

    // A frame over the largest MQTT packet closes the connection.
    let big = vec![0u8; simdevice::hub::mqtt::connection::MAX_PACKET_SIZE + 1];
    let _ = ws.send(Message::Binary(Bytes::from(big))).await;
    let ended = tokio::time::timeout(WAIT, async {
        use futures_util::StreamExt;
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "an oversize frame closes the connection");

    // Plain HTTP (no upgrade): closed without an answer.
    let mut tls = tls_to(&hub).await;
    tls.write_all(b"GET /$iothub/websocket HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, tls.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the hub closes a plain HTTP request");
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));

    // The hub still serves a WebSocket device after all that.
    let key = hub.add_device("ws-after");
    let agent = RunningAgent::start(ws_config(&hub, "ws-after", &key, hub.hub.ws_addr()));
    eventually(Duration::from_secs(15), || async {
        (agent.counter(|c| &c.readings_acknowledged) >= 1).then_some(())
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn both_listeners_share_one_pool_of_unauthenticated_connections() {
    use simdevice::hub::mqtt::listener::MAX_UNAUTHENTICATED;
    let hub = TestHub::start().await;
    // Silent sockets on the MQTT port take the whole pool...
    let _held = open_tcp(hub.hub.mqtt_addr(), MAX_UNAUTHENTICATED).await;
    // ...which the hub has done once one more on the MQTT port is closed at once.
    eventually(Duration::from_secs(10), || async {
        let mut probe = TcpStream::connect(hub.hub.mqtt_addr()).await.unwrap();
        let mut byte = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_millis(500), probe.read(&mut byte))
            .await
            .is_ok();
        closed.then_some(())
    })
    .await;
    // A WebSocket connection then finds no permit either: closed at once, not held for the
    // 10 s handshake deadline.
    let mut socket = TcpStream::connect(hub.hub.ws_addr()).await.unwrap();
    expect_closed_within(&mut socket, Duration::from_secs(3)).await;
}

/// What the test proxy does with a CONNECT (also `dps_transport`'s).
#[derive(Clone)]
pub(crate) enum ProxyMode {
    /// Opens the tunnel; with credentials, only for a `Proxy-Authorization` carrying them
    /// (else 407).
    Tunnel { credentials: Option<String> },
    /// Answers this status.
    Status(u16),
    /// Closes the connection without an answer.
    Close,
}

/// A small HTTP CONNECT proxy on 127.0.0.1 that counts the tunnels it opened and their
/// targets. Dropping it stops it.
pub(crate) struct TestProxy {
    pub(crate) addr: SocketAddr,
    tunnels: Arc<AtomicU64>,
    targets: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestProxy {
    pub(crate) async fn start(mode: ProxyMode) -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tunnels = Arc::new(AtomicU64::new(0));
        let targets = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (tunnels.clone(), targets.clone());
        let task = tokio::spawn(async move {
            let mut relays = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                relays.spawn(serve_proxy(
                    client,
                    mode.clone(),
                    count.clone(),
                    seen.clone(),
                ));
            }
        });
        TestProxy {
            addr,
            tunnels,
            targets,
            task,
        }
    }

    pub(crate) fn tunnels(&self) -> u64 {
        self.tunnels.load(Ordering::SeqCst)
    }

    pub(crate) fn targets(&self) -> Vec<String> {
        self.targets.lock().unwrap().clone()
    }
}

async fn serve_proxy(
    mut client: TcpStream,
    mode: ProxyMode,
    tunnels: Arc<AtomicU64>,
    targets: Arc<Mutex<Vec<String>>>,
) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match client.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let target = head
        .strip_prefix("CONNECT ")
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_default()
        .to_string();
    let answer = |status: &str| format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
    match mode {
        ProxyMode::Close => {}
        ProxyMode::Status(status) => {
            let _ = client
                .write_all(answer(&format!("{status} Bad Gateway")).as_bytes())
                .await;
        }
        ProxyMode::Tunnel { credentials } => {
            if let Some(credentials) = credentials {
                use base64::Engine as _;
                let expected = format!(
                    "proxy-authorization: basic {}",
                    base64::engine::general_purpose::STANDARD.encode(credentials)
                );
                if !head.to_lowercase().contains(&expected.to_lowercase()) {
                    let _ = client
                        .write_all(answer("407 Proxy Authentication Required").as_bytes())
                        .await;
                    return;
                }
            }
            let Ok(mut upstream) = TcpStream::connect(&target).await else {
                let _ = client.write_all(answer("502 Bad Gateway").as_bytes()).await;
                return;
            };
            if client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            tunnels.fetch_add(1, Ordering::SeqCst);
            targets.lock().unwrap().push(target);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
    }
}

/// `simdevice doctor` for device `id` dialling `port` over WebSocket, through `proxy` if any:
/// its exit code and output.
async fn doctor(
    hub: &TestHub,
    id: &str,
    key: &str,
    port: u16,
    proxy: Option<String>,
) -> (i32, String) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    let mut text = crate::common::agent::identity_toml(id, key, port, &hub.hub.info().ca_file);
    text.push_str("[connection]\ntransport = \"websocket\"\n");
    if let Some(proxy) = proxy {
        text.push_str(&format!("proxy = \"{proxy}\"\n"));
    }
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_simdevice"))
        .arg("doctor")
        .arg("--config")
        .arg(&path)
        .arg("--state-dir")
        .arg(hub.dir.path())
        .env_remove("RUST_LOG")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    (
        output.status.code().unwrap(),
        String::from_utf8(output.stdout).unwrap(),
    )
}

#[tokio::test]
async fn doctor_checks_the_proxy_tunnel_and_the_websocket_upgrade() {
    let hub = TestHub::start().await;
    let key = hub.add_device("ws-doctor");
    let ws_port = hub.hub.ws_addr().port();

    let proxy = TestProxy::start(ProxyMode::Tunnel { credentials: None }).await;
    let (code, out) = doctor(
        &hub,
        "ws-doctor",
        &key,
        ws_port,
        Some(format!("http://{}", proxy.addr)),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("[ok]   TCP: 127.0.0.1:{}", proxy.addr.port())),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "[ok]   proxy CONNECT: http://{} opened a tunnel to localhost:{ws_port}",
            proxy.addr
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "[ok]   WebSocket: wss://localhost:{ws_port}/$iothub/websocket accepted"
        )),
        "{out}"
    );
    assert!(out.contains("[ok]   authentication: CONNACK 0"), "{out}");
    assert!(
        proxy.tunnels() >= 3,
        "TLS, WebSocket and authentication went through it"
    );

    let refusing = TestProxy::start(ProxyMode::Status(502)).await;
    let (code, out) = doctor(
        &hub,
        "ws-doctor",
        &key,
        ws_port,
        Some(format!("http://{}", refusing.addr)),
    )
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("[FAIL] proxy CONNECT:") && out.contains("HTTP 502"),
        "{out}"
    );
    assert!(
        !out.contains(" WebSocket: "),
        "later checks do not run: {out}"
    );

    // The MQTT port speaks TLS but not HTTP: the upgrade is the step that fails.
    let mqtt_port = hub.hub.mqtt_addr().port();
    let (code, out) = doctor(&hub, "ws-doctor", &key, mqtt_port, None).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("[ok]   TLS:"), "{out}");
    assert!(out.contains("[FAIL] WebSocket:"), "{out}");
}

#[tokio::test]
async fn the_fleet_passes_transport_and_proxy_to_its_devices() {
    let hub = TestHub::start_with(|c| c.auto_register = true).await;
    let proxy = TestProxy::start(ProxyMode::Tunnel { credentials: None }).await;
    let output = crate::common::isolated(&mut tokio::process::Command::new(env!(
        "CARGO_BIN_EXE_simdevice"
    )))
    .args(["fleet", "--local", "--state-dir"])
    .arg(hub.dir.path())
    .args(["--count", "3", "--messages", "2", "--interval-secs", "0"])
    .args(["--transport", "websocket", "--proxy"])
    .arg(format!("http://{}", proxy.addr))
    .env_remove("RUST_LOG")
    .output()
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["readings_acknowledged"], 6, "{report}");
    assert_eq!(proxy.tunnels(), 3, "one tunnel per device");
    let ws = format!("localhost:{}", hub.hub.ws_addr().port());
    assert!(
        proxy.targets().iter().all(|t| *t == ws),
        "{:?}",
        proxy.targets()
    );
}

#[tokio::test]
async fn default_ports_fall_back_to_a_free_one_a_given_port_does_not() {
    use simdevice::hub::Port;
    // A port that cannot be had (in use here; no permission for 443 is the other case).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let hub = TestHub::start_with(|c| {
        c.ws_port = Port::Default(port);
        c.amqp.port = Port::Default(port);
        c.amqp.plain_port = Some(Port::Default(port));
    })
    .await;
    let served = hub.hub.ws_addr().port();
    assert!(served != port && served != 0);
    assert_eq!(hub.hub.info().ws_port, served, "hub.json tells the port");
    let amqp = hub.hub.amqp_addr().port();
    assert!(amqp != port && amqp != 0);
    assert_eq!(hub.hub.info().amqp_port, Some(amqp));
    let plain = hub.hub.amqp_plain_addr().unwrap().port();
    assert!(plain != port && plain != 0);
    assert_eq!(hub.hub.info().amqp_plain_port, Some(plain));
    hub.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let mut config = simdevice::hub::HubConfig::ephemeral(dir.path());
    config.ws_port = Port::Chosen(port);
    let error = match simdevice::hub::Hub::start(config).await {
        Err(error) => error,
        Ok(_) => panic!("a given port that is taken must fail"),
    };
    assert!(
        matches!(&error, simdevice::hub::HubError::Bind { addr, .. } if addr.port() == port),
        "{error:?}"
    );
}
