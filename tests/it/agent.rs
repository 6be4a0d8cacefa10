//! The device agent against the in-process hub, through real TLS sockets: telemetry with
//! contiguous sequence numbers across token renewals and hub restarts, the twin catch-up
//! after an outage, the built-in and command methods, and desired-property acknowledgements.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::common::agent::{agent_config, eventually, RunningAgent};
use crate::common::*;
use reqwest::Method;
use serde_json::{json, Value};
use simdevice::config::CommandMethodConfig;

fn seqs(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["body"]["seq"].as_u64().unwrap())
        .collect()
}

/// Asserts 1..=max each arrived exactly once (after de-duplication by message id).
fn assert_contiguous(all: &[Value]) -> u64 {
    let mut by_mid = std::collections::BTreeMap::new();
    for event in all {
        let mid = event["systemProperties"]["message-id"]
            .as_str()
            .unwrap()
            .to_string();
        by_mid.insert(mid, event["body"]["seq"].as_u64().unwrap());
    }
    let unique: BTreeSet<u64> = by_mid.values().copied().collect();
    assert_eq!(unique.len(), by_mid.len(), "one message id per seq");
    let max = *unique.iter().max().expect("some readings");
    assert_eq!(
        unique,
        (1..=max).collect::<BTreeSet<u64>>(),
        "no gap in seq"
    );
    max
}

#[tokio::test]
async fn telemetry_twin_and_methods_end_to_end() {
    let hub = TestHub::start().await;
    let key = hub.add_device("door-01");
    let service = hub.service();
    let agent = RunningAgent::start(agent_config(&hub, "door-01", &key, hub.hub.mqtt_addr()));

    let readings = eventually(Duration::from_secs(10), || async {
        let all = service.events("door-01").await;
        (all.len() >= 3).then_some(all)
    })
    .await;
    let first = &readings[0];
    assert_eq!(first["body"]["id"], "door-01");
    assert_eq!(first["body"]["seq"], 1);
    assert!((70..=100).contains(&first["body"]["temperature"].as_i64().unwrap()));
    assert!((70..=100).contains(&first["body"]["humidity"].as_i64().unwrap()));
    assert!((0.0..=1.0).contains(&first["body"]["uv"].as_f64().unwrap()));
    assert!(first["body"]["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        first["systemProperties"]["content-type"],
        "application/json"
    );
    assert_eq!(first["systemProperties"]["content-encoding"], "utf-8");
    assert!(first["properties"]["iothub-creation-time-utc"].is_string());
    assert_ne!(
        readings[0]["systemProperties"]["message-id"],
        readings[1]["systemProperties"]["message-id"]
    );

    // Connectivity is reported on connect (scenario 2).
    let twin = eventually(Duration::from_secs(10), || async {
        let reported = service.reported("door-01").await;
        reported.get("connectivity").is_some().then_some(reported)
    })
    .await;
    assert_eq!(twin["connectivity"]["type"], "cellular");
    assert!(twin["connectivity"]["signalStrengthDbm"].is_i64());
    let query = json!({"query": "SELECT * FROM devices WHERE properties.reported.connectivity.type = 'cellular'"});
    let found = service
        .call(Method::POST, "/devices/query", Some(query), &[])
        .await;
    assert_eq!(found.body.as_array().unwrap().len(), 1);

    // lockDoor with and without a payload, a bad payload, an unknown method.
    let answer = service.invoke("door-01", "lockDoor", Value::Null).await;
    assert_eq!(
        answer.body,
        json!({"status": 200, "payload": {"Response": "lockDoor called successfully"}})
    );
    let answer = service
        .invoke("door-01", "lockDoor", json!({"lockTime": "10m"}))
        .await;
    assert_eq!(answer.body["status"], 200);
    let door = eventually(Duration::from_secs(10), || async {
        let reported = service.reported("door-01").await;
        reported["door"]["unlockAt"]
            .is_string()
            .then_some(reported["door"].clone())
    })
    .await;
    assert_eq!(door["locked"], true);
    let answer = service
        .invoke("door-01", "lockDoor", json!({"lockTime": "soon"}))
        .await;
    assert_eq!(answer.body["status"], 400);
    assert!(answer.body["payload"]["error"]
        .as_str()
        .unwrap()
        .contains("soon"));
    let answer = service.invoke("door-01", "selfDestruct", Value::Null).await;
    assert_eq!(answer.body["status"], 404);
    assert!(answer.body["payload"]["error"]
        .as_str()
        .unwrap()
        .contains("selfDestruct"));
    let info = service
        .invoke("door-01", "getDeviceInfo", Value::Null)
        .await;
    assert_eq!(info.body["payload"]["deviceId"], "door-01");
    assert!(
        info.body["payload"]["counters"]["readingsAcknowledged"]
            .as_u64()
            .unwrap()
            >= 3
    );

    // Desired properties are applied and acknowledged (scenario 3's twin half).
    let patch =
        json!({"properties": {"desired": {"building": 43, "floor": 3, "telemetryInterval": 0.5}}});
    let updated = service
        .call(Method::PATCH, "/twins/door-01", Some(patch), &[])
        .await;
    let version = updated.body["properties"]["desired"]["$version"]
        .as_u64()
        .unwrap();
    let acks = eventually(Duration::from_secs(10), || async {
        let reported = service.reported("door-01").await;
        (reported["floor"]["av"] == version).then_some(reported)
    })
    .await;
    assert_eq!(
        acks["building"],
        json!({"value": 43, "ac": 200, "av": version, "ad": "stored"})
    );
    assert_eq!(acks["telemetryInterval"]["ac"], 200);
    assert_eq!(
        agent.handle.ctx.telemetry_interval(),
        Duration::from_millis(500)
    );
    let bad = json!({"properties": {"desired": {"telemetryInterval": "fast"}}});
    service
        .call(Method::PATCH, "/twins/door-01", Some(bad), &[])
        .await;
    let rejected = eventually(Duration::from_secs(10), || async {
        let reported = service.reported("door-01").await;
        (reported["telemetryInterval"]["ac"] == 400).then_some(reported)
    })
    .await;
    assert!(rejected["telemetryInterval"]["ad"]
        .as_str()
        .unwrap()
        .contains("number"));

    agent.stop().await;
    eventually(Duration::from_secs(5), || async {
        let twin = service.get("/twins/door-01").await.body;
        (twin["connectionState"] == "Disconnected").then_some(())
    })
    .await;
    assert_contiguous(&service.events("door-01").await);
    hub.stop().await;
}

#[tokio::test]
async fn desired_patch_made_while_offline_is_applied_after_reconnect() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let service = hub.service();
    let relay = Relay::start(hub.hub.mqtt_addr()).await;
    let agent = RunningAgent::start(agent_config(&hub, "d1", &key, relay.addr));
    service
        .wait_connection_state("d1", "Connected", Duration::from_secs(10))
        .await;

    relay.cut();
    service
        .wait_connection_state("d1", "Disconnected", Duration::from_secs(10))
        .await;
    let patch = json!({"properties": {"desired": {"floor": 7}}});
    let updated = service
        .call(Method::PATCH, "/twins/d1", Some(patch), &[])
        .await;
    let version = updated.body["properties"]["desired"]["$version"]
        .as_u64()
        .unwrap();
    // Readings pile up while offline: two more than were acknowledged when the link went.
    let offline_from = agent.counter(|c| &c.readings_acknowledged);
    eventually(Duration::from_secs(10), || async {
        (agent.counter(|c| &c.readings_produced) >= offline_from + 2).then_some(())
    })
    .await;
    relay.restore();

    let ack = eventually(Duration::from_secs(15), || async {
        let reported = service.reported("d1").await;
        (reported["floor"]["av"] == version).then_some(reported["floor"].clone())
    })
    .await;
    assert_eq!(
        ack,
        json!({"value": 7, "ac": 200, "av": version, "ad": "stored"})
    );
    // Readings produced while offline arrive after the reconnect, without a gap.
    let produced = agent.counter(|c| &c.readings_produced);
    assert!(produced >= offline_from + 2);
    eventually(Duration::from_secs(10), || async {
        let seqs = seqs(&service.events("d1").await);
        (seqs.iter().max() >= Some(&produced)).then_some(())
    })
    .await;
    agent.stop().await;
    assert!(assert_contiguous(&service.events("d1").await) >= produced);
    hub.stop().await;
}

#[tokio::test]
async fn short_lived_tokens_are_renewed_without_losing_or_repeating_readings() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let service = hub.service();
    let mut config = agent_config(&hub, "d1", &key, hub.hub.mqtt_addr());
    config.connection.sas_lifetime = Duration::from_secs(2);
    config.connection.renew_at = 0.5;
    config.telemetry.interval = Duration::from_millis(50);
    let agent = RunningAgent::start(config);
    let handle = agent.handle.clone();
    eventually(Duration::from_secs(30), || async {
        let renewals = handle
            .ctx
            .counters()
            .token_renewals
            .load(std::sync::atomic::Ordering::Relaxed);
        (renewals >= 5).then_some(())
    })
    .await;
    agent.stop().await;
    let all = service.events("d1").await;
    let max = assert_contiguous(&all);
    assert_eq!(all.len() as u64, max, "no reading was delivered twice");
    let acknowledged = handle
        .ctx
        .counters()
        .readings_acknowledged
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(acknowledged, max);
    hub.stop().await;
}

#[tokio::test]
async fn the_hub_restarted_under_the_agent_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = simdevice::hub::HubConfig::ephemeral(dir.path());
    let first = TestHub {
        hub: simdevice::hub::Hub::start(config.clone()).await.unwrap(),
        dir,
    };
    let key = first.add_device("d1");
    config.mqtt_port = first.hub.mqtt_addr().port();
    config.api_port = first.hub.api_addr().port();
    let agent = RunningAgent::start(agent_config(&first, "d1", &key, first.hub.mqtt_addr()));
    let service = first.service();
    eventually(Duration::from_secs(10), || async {
        (service.events("d1").await.len() >= 3).then_some(())
    })
    .await;

    let mut received = service.events("d1").await;
    let TestHub { hub, dir } = first;
    hub.shutdown().await;
    // The outage lasts until the agent has noticed it and produced readings it cannot send.
    let produced = agent.counter(|c| &c.readings_produced);
    eventually(Duration::from_secs(10), || async {
        let offline = !agent
            .handle
            .ctx
            .counters()
            .connected
            .load(Ordering::Relaxed);
        (offline && agent.counter(|c| &c.readings_produced) >= produced + 3).then_some(())
    })
    .await;
    let second = TestHub {
        hub: simdevice::hub::Hub::start(config).await.unwrap(),
        dir,
    };
    let service = second.service();
    // The readings produced during the outage arrive, and then new ones.
    let produced = agent.counter(|c| &c.readings_produced);
    eventually(Duration::from_secs(15), || async {
        let seqs = seqs(&service.events("d1").await);
        (seqs.iter().max() > Some(&produced)).then_some(())
    })
    .await;
    agent.stop().await;
    received.extend(service.events("d1").await);
    assert_contiguous(&received);
    second.stop().await;
}

#[tokio::test]
async fn a_configured_command_answers_a_method() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let service = hub.service();
    let script = hub.dir.path().join("echo-method.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nread -r payload\nprintf '{\"echo\":%s}' \"$payload\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut config = agent_config(&hub, "d1", &key, hub.hub.mqtt_addr());
    config.methods.push(CommandMethodConfig {
        name: "echo".into(),
        command: vec![script.display().to_string()],
        timeout: Duration::from_secs(5),
    });
    let agent = RunningAgent::start(config);
    let answer = eventually(Duration::from_secs(10), || async {
        let answer = service.invoke("d1", "echo", json!({"n": 1})).await;
        (answer.status == 200).then_some(answer)
    })
    .await;
    assert_eq!(
        answer.body,
        json!({"status": 200, "payload": {"echo": {"n": 1}}})
    );
    agent.stop().await;
    hub.stop().await;
}

#[tokio::test]
async fn a_refused_device_backs_off_and_never_connects() {
    let hub = TestHub::start().await;
    hub.add_device("d1");
    let wrong = simdevice::protocol::sas::generate_key();
    let config = agent_config(&hub, "d1", &wrong, hub.hub.mqtt_addr());
    let backoff_max = config.connection.backoff_max;
    let agent = RunningAgent::start(config);
    // The hub refuses each attempt (CONNACK 5); between two, the agent waits at least half
    // its longest backoff (refused credentials are not retried fast).
    let refused = || {
        hub.hub
            .state()
            .counters
            .connections_refused
            .load(Ordering::Relaxed)
    };
    let refused_at = |n: u64| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        while refused() < n {
            assert!(Instant::now() < deadline, "{n} refusals within 10 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Instant::now()
    };
    let first = refused_at(1).await;
    let second = refused_at(2).await;
    let third = refused_at(3).await;
    // Polled every 5 ms on a busy machine: allow 50 ms of lateness in seeing the first one.
    let least = backoff_max / 2 - Duration::from_millis(50);
    assert!(
        second - first >= least && third - second >= least,
        "retried after {:?} and {:?}, not backed off by at least {least:?}",
        second - first,
        third - second
    );
    assert_eq!(agent.counter(|c| &c.connects), 0);
    assert!(
        agent.reconnects("refused") >= 2,
        "the agent saw the refusals"
    );
    eventually(Duration::from_secs(10), || async {
        (agent.counter(|c| &c.readings_produced) > 3).then_some(())
    })
    .await;
    assert_eq!(agent.counter(|c| &c.connects), 0, "never connected");
    agent.stop().await;
    hub.stop().await;
}

#[tokio::test]
async fn a_slow_method_blocks_neither_telemetry_nor_other_calls_and_c2d_is_received() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let service = hub.service();
    let script = hub.dir.path().join("slow.sh");
    let started_marker = hub.dir.path().join("slow.started");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ntouch '{}'\nsleep 3\necho '{{}}'\n",
            started_marker.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut config = agent_config(&hub, "d1", &key, hub.hub.mqtt_addr());
    config.methods.push(CommandMethodConfig {
        name: "slow".into(),
        command: vec![script.display().to_string()],
        timeout: Duration::from_secs(10),
    });
    let agent = RunningAgent::start(config);
    eventually(Duration::from_secs(10), || async {
        (service.events("d1").await.len() >= 2).then_some(())
    })
    .await;

    let slow = tokio::spawn({
        let service = hub.service();
        async move { service.invoke("d1", "slow", Value::Null).await }
    });
    // The slow command is running.
    eventually(Duration::from_secs(5), || async {
        started_marker.exists().then_some(())
    })
    .await;
    let before = service.events("d1").await.len();
    let started = std::time::Instant::now();
    let quick = service.invoke("d1", "getDeviceInfo", Value::Null).await;
    assert_eq!(quick.body["status"], 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "getDeviceInfo waited for the slow call"
    );
    eventually(Duration::from_secs(2), || async {
        (service.events("d1").await.len() > before).then_some(())
    })
    .await;
    assert!(
        !slow.is_finished(),
        "telemetry went on while the slow call ran"
    );
    assert_eq!(slow.await.unwrap().body["status"], 200);

    let body = json!({"payload": {"hello": "device"}});
    let sent = service
        .call(
            Method::POST,
            "/simdevice/devices/d1/messages/devicebound",
            Some(body),
            &[],
        )
        .await;
    assert_eq!(sent.status, 200);
    let counters = &agent.handle.ctx;
    eventually(Duration::from_secs(5), || async {
        (counters
            .counters()
            .cloud_to_device
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1)
            .then_some(())
    })
    .await;
    agent.stop().await;
    hub.stop().await;
}
