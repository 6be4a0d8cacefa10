//! DPS over WebSocket and through an HTTP CONNECT proxy (issue 11), through real sockets: the
//! agent's registration client against the hub's DPS WebSocket port (`--dps-ws-port`), the
//! same through a CONNECT proxy started by the test (for MQTT/TLS too), a provisioned agent
//! that registers and then runs over WebSocket through the proxy, and the refusals: MQTT on
//! the WebSocket port, an upgrade at another path or without the `mqtt` subprotocol, and a
//! proxy that refuses the tunnel, named in the registration's error without its credentials.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use simdevice::agent::provision::{self, ProvisionError, Registration};
use simdevice::common::logging::error_chain;
use simdevice::config::{Config, Provisioning, Proxy, Secret, Transport};
use simdevice::protocol::sas;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Error as WsError;

use crate::common::agent::eventually;
use crate::common::{now, Service, TestHub};
use crate::websocket::{ProxyMode, TestProxy};

/// A symmetric-key enrollment group on the hub's DPS; its key.
async fn enrollment_group(hub: &TestHub, id: &str) -> String {
    let key = hub.hub.state().dps.service_key().to_string();
    let dps = Service::with_key(hub, "provisioningserviceowner", &key, now() + 3600);
    let group_key = sas::generate_key();
    let put = dps
        .call(
            Method::PUT,
            &format!("/enrollmentGroups/{id}"),
            Some(json!({"attestation": {"type": "symmetricKey",
                "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}}})),
            &[],
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    group_key
}

/// A registration of `registration_id` (a device of the group `group_key`) at `port`.
fn registration(
    hub: &TestHub,
    registration_id: &str,
    group_key: &str,
    port: u16,
    transport: Transport,
    proxy: Option<Proxy>,
) -> Registration {
    Registration {
        host: "localhost".into(),
        port,
        transport,
        proxy,
        tls: simdevice::agent::client_tls(Some(&hub.hub.info().ca_file)).unwrap(),
        id_scope: hub.hub.info().id_scope.clone().unwrap(),
        registration_id: registration_id.into(),
        device_key: sas::derive_device_key(group_key, registration_id).unwrap(),
        payload: None,
        deadline: Duration::from_secs(10),
    }
}

fn dps_ws_port(hub: &TestHub) -> u16 {
    hub.hub
        .dps_ws_addr()
        .expect("the test hub serves DPS over WebSocket")
        .port()
}

#[tokio::test]
async fn the_registration_goes_over_websocket_and_mqtt_does_not_get_through_that_port() {
    let hub = TestHub::start().await;
    let ws_port = dps_ws_port(&hub);
    assert_eq!(hub.hub.info().dps_ws_port, Some(ws_port));
    assert_ne!(Some(ws_port), hub.hub.dps_addr().map(|a| a.port()));
    let group_key = enrollment_group(&hub, "ws-group").await;

    let ws = registration(
        &hub,
        "ws-dev-1",
        &group_key,
        ws_port,
        Transport::WebSocket,
        None,
    );
    let assignment = provision::register(&ws, now()).await.expect("assigned");
    assert_eq!(assignment.assigned_hub, "localhost");
    assert_eq!(assignment.device_id, "ws-dev-1");
    assert!(hub.hub.state().registry.contains("ws-dev-1"));

    // MQTT straight over TLS is not what that port speaks: the transport carried the above.
    let mqtt = registration(&hub, "ws-dev-2", &group_key, ws_port, Transport::Mqtt, None);
    let error = provision::register(&mqtt, now()).await.unwrap_err();
    assert!(
        matches!(error, ProvisionError::Wire { .. }),
        "{}",
        error_chain(&error)
    );
    assert!(!hub.hub.state().registry.contains("ws-dev-2"));

    // A wrong key is refused over WebSocket as over MQTT: CONNACK 5, named as such.
    let mut wrong = registration(
        &hub,
        "ws-dev-3",
        &group_key,
        ws_port,
        Transport::WebSocket,
        None,
    );
    wrong.device_key = sas::generate_key();
    let error = provision::register(&wrong, now()).await.unwrap_err();
    assert!(
        matches!(error, ProvisionError::Unauthorized { ref endpoint } if endpoint.starts_with("wss://localhost:")),
        "{}",
        error_chain(&error)
    );
    hub.stop().await;
}

#[tokio::test]
async fn the_registration_goes_through_a_connect_proxy_on_both_transports() {
    let hub = TestHub::start().await;
    let group_key = enrollment_group(&hub, "proxied").await;
    let proxy = TestProxy::start(ProxyMode::Tunnel {
        credentials: Some("alice:s3cret".into()),
    })
    .await;
    let via = Proxy::parse(&format!("http://alice:s3cret@{}", proxy.addr)).unwrap();

    let ws_port = dps_ws_port(&hub);
    let ws = registration(
        &hub,
        "px-ws",
        &group_key,
        ws_port,
        Transport::WebSocket,
        Some(via.clone()),
    );
    assert_eq!(
        provision::register(&ws, now()).await.unwrap().device_id,
        "px-ws"
    );
    assert_eq!(proxy.targets(), vec![format!("localhost:{ws_port}")]);

    let mqtt_port = hub.hub.dps_addr().unwrap().port();
    let mqtt = registration(
        &hub,
        "px-mqtt",
        &group_key,
        mqtt_port,
        Transport::Mqtt,
        Some(via),
    );
    assert_eq!(
        provision::register(&mqtt, now()).await.unwrap().device_id,
        "px-mqtt"
    );
    assert_eq!(
        proxy.targets(),
        vec![
            format!("localhost:{ws_port}"),
            format!("localhost:{mqtt_port}")
        ]
    );
    hub.stop().await;
}

#[tokio::test]
async fn a_proxy_that_refuses_the_tunnel_is_named_without_its_credentials() {
    let hub = TestHub::start().await;
    let group_key = enrollment_group(&hub, "refused").await;
    for (mode, expected) in [
        (
            ProxyMode::Tunnel {
                credentials: Some("bob:other".into()),
            },
            "HTTP 407",
        ),
        (ProxyMode::Status(502), "HTTP 502"),
    ] {
        let proxy = TestProxy::start(mode).await;
        let via = Proxy::parse(&format!("http://alice:s3cret@{}", proxy.addr)).unwrap();
        let r = registration(
            &hub,
            "px-refused",
            &group_key,
            dps_ws_port(&hub),
            Transport::WebSocket,
            Some(via),
        );
        let error = provision::register(&r, now()).await.unwrap_err();
        let text = error_chain(&error);
        assert!(error.is_transient(), "{text}");
        assert!(
            text.contains("cannot reach DPS at wss://localhost:"),
            "{text}"
        );
        assert!(text.contains(expected), "{expected}: {text}");
        assert!(
            text.contains(&format!("http://***@{}", proxy.addr)),
            "{text}"
        );
        assert!(
            !text.contains("s3cret") && !text.contains("alice"),
            "{text}"
        );
    }
    assert!(!hub.hub.state().registry.contains("px-refused"));
    hub.stop().await;
}

/// A WebSocket upgrade at the DPS WebSocket port's `path`, offering `subprotocol` if any.
async fn dps_upgrade(
    hub: &TestHub,
    path: &str,
    subprotocol: Option<&'static str>,
) -> Result<(), WsError> {
    let port = dps_ws_port(hub);
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = hub
        .tls_connector()
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("the DPS WebSocket port speaks TLS with the hub's certificate");
    let mut request = format!("wss://localhost:{port}{path}")
        .into_client_request()
        .unwrap();
    if let Some(protocol) = subprotocol {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(protocol));
    }
    tokio_tungstenite::client_async(request, tls)
        .await
        .map(|_| ())
}

#[tokio::test]
async fn the_dps_websocket_port_checks_the_upgrade_as_the_hubs_does() {
    let hub = TestHub::start().await;
    match dps_upgrade(&hub, "/mqtt", Some("mqtt")).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 404),
        other => panic!("a wrong path: {other:?}"),
    }
    match dps_upgrade(&hub, "/$iothub/websocket", None).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 400),
        other => panic!("no subprotocol: {other:?}"),
    }
    dps_upgrade(&hub, "/$iothub/websocket", Some("mqtt"))
        .await
        .expect("the right path and subprotocol are upgraded");
    hub.stop().await;
}

#[tokio::test]
async fn a_provisioned_agent_registers_and_runs_over_websocket_through_the_proxy() {
    let hub = TestHub::start().await;
    let group_key = enrollment_group(&hub, "agents-ws").await;
    let proxy = TestProxy::start(ProxyMode::Tunnel { credentials: None }).await;
    let via = Proxy::parse(&format!("http://{}", proxy.addr)).unwrap();
    let registration_id = "agent-ws-1";
    let provisioning = Provisioning {
        id_scope: hub.hub.info().id_scope.clone().unwrap(),
        registration_id: registration_id.into(),
        host: "localhost".into(),
        port: dps_ws_port(&hub),
        ca_file: Some(hub.hub.info().ca_file.clone()),
        device_key: Secret::new(sas::derive_device_key(&group_key, registration_id).unwrap()),
        // The assigned hub is `localhost`; its WebSocket port is the test hub's free one.
        gateway_host_name: Some(format!("localhost:{}", hub.hub.ws_addr().port())),
        proxy: Some(via.clone()),
        x509: None,
    };
    let state = tempfile::tempdir().unwrap();
    let mut config = Config::for_identity(provisioning.unassigned_identity());
    config.provisioning = Some(provisioning);
    config.outbox.path = Some(state.path().join("outbox.db"));
    config.telemetry.interval = Duration::from_millis(200);
    config.connection.transport = Transport::WebSocket;
    config.connection.proxy = Some(via);
    config.connection.backoff_min = Duration::from_millis(100);
    config.connection.backoff_max = Duration::from_millis(500);

    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(provision::run_provisioned(config, false, stop.clone()));
    eventually(Duration::from_secs(15), || async {
        hub.hub
            .state()
            .registry
            .get(registration_id, |d| {
                d.live
                    .telemetry_received
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .ok()
            .filter(|n| *n >= 1)
    })
    .await;
    // The registration and the session both went through the tunnel, each to its port.
    let targets = proxy.targets();
    assert_eq!(
        targets.first(),
        Some(&format!("localhost:{}", dps_ws_port(&hub))),
        "{targets:?}"
    );
    assert!(
        targets.contains(&format!("localhost:{}", hub.hub.ws_addr().port())),
        "{targets:?}"
    );
    stop.cancel();
    run.await.unwrap().unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn a_fleet_with_dps_over_websocket_registers_and_sends_through_https_proxy() {
    let hub = TestHub::start().await;
    let group_key = enrollment_group(&hub, "fleet-ws").await;
    let proxy = TestProxy::start(ProxyMode::Tunnel { credentials: None }).await;
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_simdevice"));
    crate::common::isolated(&mut command)
        .env("HTTPS_PROXY", format!("http://{}", proxy.addr))
        .args([
            "fleet",
            "--dps",
            &hub.hub.info().id_scope.clone().unwrap(),
            "--dps-endpoint",
            &format!("localhost:{}", dps_ws_port(&hub)),
            "--transport",
            "websocket",
            "--group-key",
            &group_key,
            "--gateway",
            &format!("localhost:{}", hub.hub.ws_addr().port()),
            "--ca-file",
            hub.hub.info().ca_file.to_str().unwrap(),
            "--prefix",
            "fw-",
            "--count",
            "2",
            "--messages",
            "2",
            "--interval-secs",
            "0.1",
            "--report",
            report.to_str().unwrap(),
        ]);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the fleet ends")
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["connected"], 2, "{report}");
    for id in ["fw-1", "fw-2"] {
        assert!(
            hub.hub.state().registry.contains(id),
            "{id} was not provisioned"
        );
    }
    // Two registrations to DPS's WebSocket port, then two sessions to the hub's, all tunnelled.
    let mut targets = proxy.targets();
    targets.sort();
    let mut expected = vec![
        format!("localhost:{}", dps_ws_port(&hub)),
        format!("localhost:{}", dps_ws_port(&hub)),
        format!("localhost:{}", hub.hub.ws_addr().port()),
        format!("localhost:{}", hub.hub.ws_addr().port()),
    ];
    expected.sort();
    assert_eq!(targets, expected);
    hub.stop().await;
}
