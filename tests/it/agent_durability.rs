//! The durable outbox and the agent's state, as a user sees them: the `simdevice run` binary
//! SIGKILLed with readings unacknowledged and started again (every `seq` arrives once after
//! de-duplication by `$.mid`, in order, with its original message id, and new readings carry
//! on after the last one); the door, its unlock timer and the last applied desired version
//! surviving a crash; an outbox path that cannot be created (the agent runs on memory and says
//! `durable: false`); and the size bound (the newest readings kept, the rest counted).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::common::agent::{eventually, identity_toml, RunningAgent};
use crate::common::*;
use reqwest::Method;
use serde_json::{json, Value};

use simdevice::config::Config;

fn seq_of(event: &Value) -> u64 {
    event["body"]["seq"].as_u64().expect("a reading has a seq")
}

fn mid_of(event: &Value) -> String {
    event["systemProperties"]["message-id"]
        .as_str()
        .expect("a reading has a message id")
        .to_string()
}

async fn invoke(service: &Service, id: &str, method: &str, payload: Value) -> Value {
    service.invoke(id, method, payload).await.body
}

/// `getDeviceInfo`'s payload once the device answers.
async fn device_info(service: &Service, id: &str) -> Value {
    eventually(Duration::from_secs(20), || async {
        let info = service.device_info(id).await;
        (!info.is_null()).then_some(info)
    })
    .await
}

/// (seq, message id) of the readings an outbox file holds, read as any SQLite client would.
fn outbox_rows(path: &Path) -> Vec<(u64, String)> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("the outbox file opens");
    let mut stmt = conn
        .prepare("SELECT seq, message_id FROM readings ORDER BY seq")
        .expect("the readings table exists");
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
        .unwrap();
    rows.map(|row| row.unwrap()).collect()
}

/// The agent binary with a configuration file, its log in `log`.
struct Process {
    child: tokio::process::Child,
}

impl Process {
    fn start(config: &Path, log: &Path) -> Process {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_simdevice"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Process { child }
    }

    async fn sigkill(mut self) {
        self.child.start_kill().unwrap();
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("the agent dies")
            .unwrap();
        assert!(!status.success(), "killed, not exited: {status:?}");
    }
}

fn write_config(path: &Path, hub: &TestHub, key: &str, mqtt_port: u16, extra: &str) {
    let identity = identity_toml("d1", key, mqtt_port, &hub.hub.info().ca_file);
    let text = format!(
        "{identity}\n[connection]\nbackoff_min_secs = 0.1\nbackoff_max_secs = 0.5\n\n{extra}"
    );
    std::fs::write(path, text).unwrap();
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test]
async fn readings_unacknowledged_at_a_sigkill_go_out_after_the_restart() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let service = hub.service();
    let relay = Relay::start(hub.hub.mqtt_addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state/outbox.db");
    let config = dir.path().join("agent.toml");
    let log = dir.path().join("agent.log");
    write_config(
        &config,
        &hub,
        &key,
        relay.addr.port(),
        &format!(
            "[telemetry]\ninterval_secs = 0.1\n\n[outbox]\npath = \"{}\"\n",
            db.display()
        ),
    );

    let agent = Process::start(&config, &log);
    eventually(Duration::from_secs(20), || async {
        (service.events("d1").await.len() >= 5).then_some(())
    })
    .await;
    relay.cut();
    // Readings pile up on disk, unacknowledged, while the hub is out of reach.
    eventually(Duration::from_secs(20), || async {
        (outbox_rows(&db).len() >= 20).then_some(())
    })
    .await;
    agent.sigkill().await;
    let waiting = outbox_rows(&db);
    assert!(waiting.len() >= 20, "{} readings waiting", waiting.len());
    let last = waiting.last().expect("readings waiting").0;
    let delivered_before: BTreeSet<String> =
        service.events("d1").await.iter().map(mid_of).collect();

    relay.restore();
    let agent = Process::start(&config, &log);
    let all = eventually(Duration::from_secs(30), || async {
        let all = service.events("d1").await;
        all.iter().any(|e| seq_of(e) >= last + 3).then_some(all)
    })
    .await;
    agent.sigkill().await;

    // Exactly once after de-duplication by message id, no gap, one message id per seq.
    let mut by_mid: BTreeMap<String, u64> = BTreeMap::new();
    let mut first_seen = Vec::new();
    for event in &all {
        let (mid, seq) = (mid_of(event), seq_of(event));
        if let Some(known) = by_mid.insert(mid.clone(), seq) {
            assert_eq!(known, seq, "message id {mid} sent with two seqs");
        } else {
            first_seen.push(seq);
        }
    }
    let unique: BTreeSet<u64> = by_mid.values().copied().collect();
    assert_eq!(unique.len(), by_mid.len(), "a seq was used twice");
    let max = *unique.iter().max().unwrap();
    assert_eq!(unique, (1..=max).collect(), "no gap in seq");
    assert!(
        first_seen.windows(2).all(|w| w[0] < w[1]),
        "in order: {first_seen:?}"
    );
    // Those waiting on disk went out with their original seq and message id.
    for (seq, mid) in &waiting {
        assert_eq!(by_mid.get(mid), Some(seq), "reading {seq} ({mid})");
    }
    // New readings carry on after the last one produced before the crash.
    let next = all
        .iter()
        .find(|e| seq_of(e) == last + 1)
        .expect("the next reading");
    assert!(!waiting.iter().any(|(_, mid)| *mid == mid_of(next)));
    assert!(!delivered_before.contains(&mid_of(next)));
    let log = log_of(&log);
    assert!(log.contains("outbox opened"), "{log}");
    assert!(!log.contains(&key), "the key leaked into the log");
    hub.stop().await;
}

#[tokio::test]
async fn the_door_its_unlock_timer_and_the_applied_desired_version_survive_a_crash() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let service = hub.service();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    let log = dir.path().join("agent.log");
    write_config(
        &config,
        &hub,
        &key,
        hub.hub.mqtt_addr().port(),
        &format!(
            "[telemetry]\ninterval_secs = 2\n\n[outbox]\npath = \"{}\"\n",
            dir.path().join("outbox.db").display()
        ),
    );

    let agent = Process::start(&config, &log);
    let info = device_info(&service, "d1").await;
    assert_eq!(info["durable"], true);
    let patch = json!({"properties": {"desired": {"building": 43, "telemetryInterval": 0.5}}});
    let updated = service
        .call(Method::PATCH, "/twins/d1", Some(patch), &[])
        .await;
    let version = updated.body["properties"]["desired"]["$version"]
        .as_u64()
        .unwrap();
    let answer = invoke(&service, "d1", "lockDoor", json!({"lockTime": "8s"})).await;
    assert_eq!(answer["status"], 200);
    let before = eventually(Duration::from_secs(10), || async {
        let reported = service.reported("d1").await;
        (reported["building"]["av"] == version && reported["door"]["locked"] == true)
            .then_some(reported)
    })
    .await;
    let info = device_info(&service, "d1").await;
    assert_eq!(info["counters"]["desiredApplied"], 2);
    let door = info["door"].clone();
    let unlock_at: chrono::DateTime<chrono::Utc> =
        door["unlockAt"].as_str().unwrap().parse().unwrap();
    agent.sigkill().await;

    let agent = Process::start(&config, &log);
    // The catch-up after the connect ends with a report of the door: wait for it.
    let after = eventually(Duration::from_secs(20), || async {
        let reported = service.reported("d1").await;
        (reported["$version"].as_u64() > before["$version"].as_u64()).then_some(reported)
    })
    .await;
    let info = device_info(&service, "d1").await;
    assert_eq!(
        info["counters"]["desiredApplied"], 0,
        "an applied desired version is not applied again"
    );
    assert_eq!(after["building"], before["building"]);
    assert_eq!(
        after["$metadata"]["building"]["$lastUpdated"],
        before["$metadata"]["building"]["$lastUpdated"],
        "the acknowledgement was not sent again"
    );
    assert_eq!(
        info["telemetryIntervalSeconds"], 0.5,
        "its effect is restored"
    );
    assert_eq!(info["settings"]["building"], 43);
    if chrono::Utc::now() < unlock_at {
        assert_eq!(
            info["door"], door,
            "the door is still locked until {unlock_at}"
        );
    }
    // The unlock timer resumed: the door opens itself at its time, and says so.
    let unlocked = eventually(Duration::from_secs(20), || async {
        let reported = service.reported("d1").await;
        (reported["door"]["locked"] == false).then_some(reported)
    })
    .await;
    assert!(chrono::Utc::now() >= unlock_at);
    assert_eq!(unlocked["door"]["unlockAt"], Value::Null);
    agent.sigkill().await;
    hub.stop().await;
}

fn agent_config(hub: &TestHub, id: &str, key: &str, mqtt_port: u16, outbox: PathBuf) -> Config {
    let mqtt = std::net::SocketAddr::from(([127, 0, 0, 1], mqtt_port));
    let mut config = crate::common::agent::agent_config(hub, id, key, mqtt);
    config.telemetry.interval = Duration::from_millis(100);
    config.telemetry.seed = None;
    config.outbox.path = Some(outbox);
    config
}

#[tokio::test]
async fn an_outbox_that_cannot_be_created_leaves_the_agent_running_on_memory() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let service = hub.service();
    // Under a regular file: no directory can be made there, whoever runs the test.
    let file = hub.dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let agent = RunningAgent::start(agent_config(
        &hub,
        "d1",
        &key,
        hub.hub.mqtt_addr().port(),
        file.join("outbox.db"),
    ));
    let readings = eventually(Duration::from_secs(20), || async {
        let all = service.events("d1").await;
        (all.len() >= 5).then_some(all)
    })
    .await;
    let seqs: Vec<u64> = readings.iter().take(5).map(seq_of).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    let info = device_info(&service, "d1").await;
    assert_eq!(info["durable"], false);
    assert!(!file.join("outbox.db").exists());
    agent.stop().await;
    hub.stop().await;
}

#[tokio::test]
async fn a_full_outbox_keeps_the_newest_readings_and_counts_the_dropped_ones() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let service = hub.service();
    let relay = Relay::start(hub.hub.mqtt_addr()).await;
    relay.cut();
    let db = hub.dir.path().join("agent/outbox.db");
    let mut config = agent_config(&hub, "d1", &key, relay.addr.port(), db.clone());
    config.outbox.max_readings = 5;
    let agent = RunningAgent::start(config);
    let ctx = agent.handle.ctx.clone();
    let produced = || {
        ctx.counters()
            .readings_produced
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    eventually(Duration::from_secs(20), || async {
        (produced() >= 20).then_some(())
    })
    .await;
    // No more readings: what is kept can then be told exactly.
    ctx.set_telemetry_interval(Duration::from_secs(86_400));
    // The last reading produced is on disk (a reading is counted before it is stored).
    let (last, kept) = eventually(Duration::from_secs(10), || async {
        let last = produced();
        let kept: Vec<u64> = outbox_rows(&db).iter().map(|(seq, _)| *seq).collect();
        (kept.last() == Some(&last)).then_some((last, kept))
    })
    .await;
    assert_eq!(
        kept,
        (last - 4..=last).collect::<Vec<_>>(),
        "the newest 5 on disk"
    );

    relay.restore();
    let arrived = eventually(Duration::from_secs(20), || async {
        let all = service.events("d1").await;
        (all.len() >= 5).then_some(all)
    })
    .await;
    let info = device_info(&service, "d1").await;
    assert_eq!(info["counters"]["readingsDropped"], last - 5);
    assert_eq!(info["durable"], true);
    let seqs: Vec<u64> = service.events("d1").await.iter().map(seq_of).collect();
    assert_eq!(seqs, (last - 4..=last).collect::<Vec<_>>(), "{arrived:?}");
    // Acknowledged readings leave the file.
    eventually(Duration::from_secs(10), || async {
        outbox_rows(&db).is_empty().then_some(())
    })
    .await;
    agent.stop().await;
    hub.stop().await;
}

#[tokio::test]
async fn a_recreated_twin_gets_its_desired_properties_applied_despite_the_saved_version() {
    let db = tempfile::tempdir().unwrap();
    let path = db.path().join("outbox.db");
    let first = TestHub::start().await;
    let key = first.add_device("d1");
    let service = first.service();
    let agent = RunningAgent::start(agent_config(
        &first,
        "d1",
        &key,
        first.hub.mqtt_addr().port(),
        path.clone(),
    ));
    let mut version = 0;
    for floor in [1, 2] {
        let patch = json!({"properties": {"desired": {"floor": floor}}});
        let updated = service
            .call(Method::PATCH, "/twins/d1", Some(patch), &[])
            .await;
        version = updated.body["properties"]["desired"]["$version"]
            .as_u64()
            .unwrap();
        eventually(Duration::from_secs(10), || async {
            (service.reported("d1").await["floor"]["av"] == version).then_some(())
        })
        .await;
    }
    agent.stop().await;
    first.stop().await;

    // Another hub, the same device id: its twin starts again at a lower desired version.
    let second = TestHub::start().await;
    let key = second.add_device("d1");
    let service = second.service();
    let patch = json!({"properties": {"desired": {"floor": 9}}});
    let updated = service
        .call(Method::PATCH, "/twins/d1", Some(patch), &[])
        .await;
    let lower = updated.body["properties"]["desired"]["$version"]
        .as_u64()
        .unwrap();
    assert!(lower < version, "{lower} < {version}");
    let agent = RunningAgent::start(agent_config(
        &second,
        "d1",
        &key,
        second.hub.mqtt_addr().port(),
        path,
    ));
    let ack = eventually(Duration::from_secs(15), || async {
        let floor = service.reported("d1").await["floor"].clone();
        (floor["av"] == lower).then_some(floor)
    })
    .await;
    assert_eq!(ack["value"], 9);
    agent.stop().await;
    second.stop().await;
}
