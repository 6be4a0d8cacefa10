//! `/healthz` and `/metrics` of the agent and the hub, scraped over HTTP while a real agent
//! talks to a real hub through TLS: the figures move with what happens, and the text is valid
//! Prometheus exposition format line by line.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use reqwest::Method;
use serde_json::{json, Value};
use simdevice::agent::metrics::AgentMetrics;
use simdevice::agent::Agent;
use simdevice::common::exposition;
use simdevice::config::{Config, Identity, Secret};
use simdevice::hub::metrics::HubMetrics;
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

/// One sample: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text format strictly: every line is `# HELP`, `# TYPE` or a sample of a family
/// whose TYPE came first; counters end in `_total`; no family is declared twice.
fn parse(text: &str) -> Vec<Sample> {
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helped = BTreeSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP has a name and a text");
            assert!(valid_name(name), "{line}");
            assert!(!help.is_empty(), "{line}");
            assert!(helped.insert(name.to_string()), "HELP twice: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a name and a type");
            assert!(valid_name(name), "{line}");
            assert!(matches!(kind, "counter" | "gauge"), "{line}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter without _total: {line}");
            }
            assert!(helped.contains(name), "TYPE before HELP: {line}");
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "TYPE twice: {line}"
            );
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').expect("labels end with }");
                (name, parse_labels(inner, line))
            }
        };
        assert!(valid_name(name), "{line}");
        assert!(types.contains_key(name), "sample before its TYPE: {line}");
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    samples
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_labels(mut inner: &str, line: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    while !inner.is_empty() {
        let (name, rest) = inner.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
        assert!(valid_name(name), "label name in {line}");
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => panic!("bad escape {other:?} in {line}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value in {line}"),
            }
        };
        labels.insert(name.to_string(), value);
        inner = &rest[end + 1..];
        inner = inner.strip_prefix(',').unwrap_or(inner);
    }
    labels
}

/// The value of the sample `name` with exactly these labels, if present.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples
        .iter()
        .find(|s| s.name == name && s.labels == wanted)
        .map(|s| s.value)
}

async fn scrape(addr: SocketAddr) -> Vec<Sample> {
    let response = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("metrics answered");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap();
    assert!(content_type.starts_with("text/plain; version=0.0.4"));
    parse(&response.text().await.unwrap())
}

async fn health(addr: SocketAddr) -> (u16, String) {
    let response = reqwest::get(format!("http://{addr}/healthz"))
        .await
        .expect("healthz answered");
    (response.status().as_u16(), response.text().await.unwrap())
}

/// Scrapes until `check` holds, for at most 15 s.
async fn scrape_until(addr: SocketAddr, what: &str, check: impl Fn(&[Sample]) -> bool) {
    for _ in 0..150 {
        if check(&scrape(addr).await) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not seen within 15 s");
}

async fn invoke(service: &Service, id: &str, method: &str) -> Reply {
    let body = json!({"methodName": method, "payload": null, "responseTimeoutInSeconds": 10});
    let path = format!("/twins/{id}/methods");
    service.call(Method::POST, &path, Some(body), &[]).await
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_hub_figures_move_with_what_happens() {
    let hub = TestHub::start().await;
    let key = hub.add_device("door-01");
    let service = hub.service();
    let stop = CancellationToken::new();
    let hub_metrics = exposition::serve(
        loopback(),
        Arc::new(HubMetrics {
            state: hub.hub.state().clone(),
            stopping: stop.clone(),
        }),
        stop.clone(),
    )
    .await
    .unwrap()
    .local_addr;

    let mut config = Config::for_identity(Identity {
        host_name: "localhost".into(),
        device_id: "door-01".into(),
        key: Secret::new(key.clone()),
        gateway_host_name: Some(format!("localhost:{}", hub.hub.mqtt_addr().port())),
        ca_file: Some(hub.hub.info().ca_file.clone()),
        x509: None,
    });
    config.telemetry.interval = Duration::from_millis(200);
    config.connection.backoff_min = Duration::from_millis(100);
    config.connection.backoff_max = Duration::from_millis(300);
    let agent = Agent::new(config).unwrap();
    let handle = agent.handle();
    let agent_stop = CancellationToken::new();
    let agent_metrics = exposition::serve(
        loopback(),
        Arc::new(AgentMetrics {
            ctx: handle.ctx.clone(),
            queue_capacity: 1000,
        }),
        stop.clone(),
    )
    .await
    .unwrap()
    .local_addr;
    let (status, body) = health(agent_metrics).await;
    assert_eq!(
        (status, body.as_str()),
        (503, "not connected to IoT Hub yet\n")
    );
    let agent_task = tokio::spawn(agent.run(agent_stop.clone()));

    // Connected, and readings acknowledged; then the counter keeps growing.
    scrape_until(agent_metrics, "connected with readings acknowledged", |s| {
        value(s, "simdevice_agent_connected", &[]) == Some(1.0)
            && value(s, "simdevice_agent_readings_acknowledged_total", &[]) >= Some(1.0)
    })
    .await;
    assert_eq!(health(agent_metrics).await, (200, "ok\n".to_string()));
    let before = scrape(agent_metrics).await;
    let acknowledged = value(&before, "simdevice_agent_readings_acknowledged_total", &[]).unwrap();
    assert_eq!(
        value(&before, "simdevice_agent_queue_capacity", &[]),
        Some(1000.0)
    );
    assert!(value(&before, "simdevice_agent_queue_length", &[]).unwrap() < 1000.0);
    assert_eq!(
        value(&before, "simdevice_agent_connects_total", &[]),
        Some(1.0)
    );
    scrape_until(agent_metrics, "more readings acknowledged", |s| {
        value(s, "simdevice_agent_readings_acknowledged_total", &[]).unwrap() > acknowledged
    })
    .await;

    // Method calls, counted with their name and status on both sides.
    assert_eq!(
        invoke(&service, "door-01", "lockDoor").await.body["status"],
        200
    );
    // The device's answer: 404, unknown method; the hub's: 404, unknown device.
    assert_eq!(
        invoke(&service, "door-01", "selfDestruct").await.body["status"],
        404
    );
    assert_eq!(invoke(&service, "nobody", "lockDoor").await.status, 404);
    let agent_now = scrape(agent_metrics).await;
    let calls = "simdevice_agent_method_calls_total";
    assert_eq!(
        value(
            &agent_now,
            calls,
            &[("method", "lockDoor"), ("status", "200")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &agent_now,
            calls,
            &[("method", "selfDestruct"), ("status", "404")]
        ),
        Some(1.0)
    );

    // The hub: a twin update from the service, a query, and a refused connection.
    let patch = json!({"properties": {"desired": {"telemetryInterval": 1}}});
    let reply = service
        .call(Method::PATCH, "/twins/door-01", Some(patch), &[])
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let query = json!({"query": "SELECT * FROM devices"});
    let reply = service
        .call(Method::POST, "/devices/query", Some(query), &[])
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let wrong = device_token("door-01", "d3Jvbmcta2V5LXdyb25nLWtleQ==");
    let (_, ack) = RawDevice::connect_with(&hub, connect_packet("door-01", &wrong, true, 60)).await;
    assert_eq!(ack.code, rumqttc::ConnectReturnCode::NotAuthorized);

    scrape_until(hub_metrics, "hub figures", |s| {
        value(
            s,
            "simdevice_hub_twin_updates_total",
            &[("source", "device")],
        ) >= Some(1.0)
    })
    .await;
    let hub_now = scrape(hub_metrics).await;
    let get = |name: &str, labels: &[(&str, &str)]| {
        value(&hub_now, name, labels).unwrap_or_else(|| panic!("{name} {labels:?}"))
    };
    assert_eq!(get("simdevice_hub_devices", &[]), 1.0);
    assert_eq!(get("simdevice_hub_connected_devices", &[]), 1.0);
    assert_eq!(
        get("simdevice_hub_connections_total", &[("result", "accepted")]),
        1.0
    );
    assert_eq!(
        get("simdevice_hub_connections_total", &[("result", "refused")]),
        1.0
    );
    assert!(get("simdevice_hub_telemetry_messages_total", &[]) >= acknowledged);
    assert_eq!(
        get("simdevice_hub_recent_events", &[]),
        get("simdevice_hub_telemetry_messages_total", &[])
    );
    assert_eq!(get("simdevice_hub_recent_events_dropped_total", &[]), 0.0);
    assert_eq!(
        get("simdevice_hub_twin_updates_total", &[("source", "service")]),
        1.0
    );
    assert_eq!(get("simdevice_hub_queries_total", &[]), 1.0);
    let hub_calls = "simdevice_hub_method_calls_total";
    assert_eq!(get(hub_calls, &[("status", "200")]), 1.0);
    // The device's 404 (unknown method) and the hub's 404 (unknown device).
    assert_eq!(get(hub_calls, &[("status", "404")]), 2.0);
    assert_eq!(health(hub_metrics).await, (200, "ok\n".to_string()));

    // The hub goes away: the agent says so, on /healthz and in its figures.
    hub.stop().await;
    scrape_until(agent_metrics, "disconnected", |s| {
        value(s, "simdevice_agent_connected", &[]) == Some(0.0)
            && value(s, "simdevice_agent_reconnects_total", &[("reason", "lost")]) == Some(1.0)
    })
    .await;
    let (status, body) = health(agent_metrics).await;
    assert_eq!(status, 503);
    assert!(body.starts_with("not connected to IoT Hub: "), "{body}");
    assert!(!body.contains(&key), "{body}");

    agent_stop.cancel();
    agent_task.await.unwrap();
    stop.cancel();
}

/// A port free now (bound and released), for a child process to listen on.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binaries_serve_metrics_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub = tokio::process::Command::new(env!("CARGO_BIN_EXE_simdevice"))
        .args([
            "hub",
            "--mqtt-port",
            "0",
            "--api-port",
            "0",
            "--device",
            "d1",
        ])
        .args(["--metrics-listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(hub.stdout.take().unwrap()).lines();
    let (mut hub_metrics, mut connection_string) = (None, None);
    while let Ok(Some(line)) = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap() {
        let line = line.trim();
        if let Some(url) = line.strip_prefix("metrics:") {
            let url = url.trim().trim_start_matches("http://");
            let addr = url.split('/').next().unwrap();
            hub_metrics = Some(addr.parse::<SocketAddr>().unwrap());
        }
        if let Some(cs) = line.strip_prefix("d1: ") {
            connection_string = Some(cs.to_string());
        }
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    let hub_metrics = hub_metrics.expect("the banner names the metrics address");
    assert_eq!(health(hub_metrics).await, (200, "ok\n".to_string()));

    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("hub.json")).unwrap())
            .unwrap();
    let agent_port = free_port();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[identity]\nconnection_string = \"{}\"\nca_file = \"{}\"\n\n\
             [metrics]\nlisten = \"127.0.0.1:{agent_port}\"\n",
            connection_string.expect("the banner lists d1"),
            info["ca_file"].as_str().unwrap(),
        ),
    )
    .unwrap();
    let _agent = tokio::process::Command::new(env!("CARGO_BIN_EXE_simdevice"))
        .args(["run", "--config"])
        .arg(&config)
        // The durable outbox goes to the test's directory, not /var/lib/simdevice.
        .env("STATE_DIRECTORY", config.parent().unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let agent_metrics: SocketAddr = format!("127.0.0.1:{agent_port}").parse().unwrap();
    for _ in 0..150 {
        if let Ok(response) = reqwest::get(format!("http://{agent_metrics}/healthz")).await {
            if response.status() == 200 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(health(agent_metrics).await, (200, "ok\n".to_string()));
    let agent_now = scrape(agent_metrics).await;
    assert_eq!(
        value(&agent_now, "simdevice_agent_connected", &[]),
        Some(1.0)
    );
    scrape_until(hub_metrics, "the agent's connection", |s| {
        value(s, "simdevice_hub_connected_devices", &[]) == Some(1.0)
    })
    .await;
}

#[test]
fn a_bad_listen_address_names_the_key_and_the_file() {
    let text = "[identity]\nhost_name = \"h\"\ndevice_id = \"d\"\nkey = \"c2VjcmV0a2V5\"\n\
                [metrics]\nlisten = \"localhost\"\n";
    let error = Config::from_sources(Some((std::path::Path::new("a.toml"), text)), &[])
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("metrics.listen in a.toml: "), "{error}");
    let text = text.replace("\"localhost\"", "\"[::1]:9100\"");
    let config = Config::from_sources(Some((std::path::Path::new("a.toml"), &text)), &[]).unwrap();
    assert_eq!(config.metrics.listen, Some("[::1]:9100".parse().unwrap()));
}
