//! The fleet (issue 9): a thousand full devices against the in-process hub, through the
//! library (the hub's own counts are the check); the binary's `--messages` run, its report,
//! `merge-reports` over shards, and the refusals of bad input (exit 78).

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use simdevice::fleet::devices::from_group_key;
use simdevice::fleet::run::{Ending, Fleet, FleetSettings};
use simdevice::protocol::identity::numbered_ids;
use tokio_util::sync::CancellationToken;

use crate::common::agent::eventually;
use crate::common::{isolated, TestHub};

const BIN: &str = env!("CARGO_BIN_EXE_simdevice");

fn settings_for(hub: &TestHub, count: u64) -> FleetSettings {
    let info = hub.hub.info();
    let gateway = format!("{}:{}", info.hostname, info.mqtt_port);
    let group_key = info
        .group_key
        .clone()
        .expect("auto-register hub has a group key");
    let ids = numbered_ids("door-", 1, count).unwrap();
    FleetSettings {
        devices: from_group_key(ids, &info.hostname, Some(&gateway), &group_key).unwrap(),
        ca_file: Some(info.ca_file.clone()),
        interval: Duration::from_secs(1),
        messages: None,
        duration: None,
        connect_rate: Some(500.0),
        seed: 7,
        template: None,
        transport: Default::default(),
        proxy: None,
    }
}

/// Scenario 4's device half: 1,000 devices connect (auto-registered from the group key),
/// fetch their twin, report connectivity, send readings; `lockDoor` on a sample answers 200;
/// a desired patch to a sample is applied and acknowledged; the fleet's counts are the hub's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_devices_are_full_devices() {
    const N: u64 = 1000;
    let hub = TestHub::start_with(|c| c.auto_register = true).await;
    let service = hub.service();
    let fleet = Fleet::new(settings_for(&hub, N)).unwrap();
    let view = fleet.view();
    let stop = CancellationToken::new();
    let run = tokio::spawn(fleet.run(stop.clone(), |_| {}));

    eventually(Duration::from_secs(90), || async {
        let s = view.snapshot();
        (s.connectivity_reported == N && s.twins_fetched == N).then_some(())
    })
    .await;
    assert_eq!(
        hub.hub.state().registry.list(usize::MAX).len() as u64,
        N,
        "each device registered itself"
    );

    // A random sample (a fixed seed, so a failure can be replayed).
    let sample: Vec<String> = {
        use rand::seq::index::sample;
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        sample(&mut rng, N as usize, 20)
            .into_iter()
            .map(|i| format!("door-{:04}", i + 1))
            .collect()
    };
    for id in &sample {
        let answer = service.invoke(id, "lockDoor", json!({})).await;
        assert_eq!(answer.body["status"], 200, "{id}: {}", answer.body);
        assert_eq!(
            answer.body["payload"]["Response"], "lockDoor called successfully",
            "{id}: {}",
            answer.body
        );
    }
    let mut versions = Vec::new();
    for id in &sample {
        let patch = json!({"properties": {"desired": {"floor": 5}}});
        let updated = service
            .call(Method::PATCH, &format!("/twins/{id}"), Some(patch), &[])
            .await;
        versions.push(updated.body["properties"]["desired"]["$version"].clone());
    }
    for (id, version) in sample.iter().zip(&versions) {
        eventually(Duration::from_secs(20), || async {
            let reported = service.reported(id).await;
            (reported["floor"]["av"] == *version && reported["floor"]["ac"] == 200).then_some(())
        })
        .await;
    }
    // Every device sends: two readings each at least, acknowledged.
    eventually(Duration::from_secs(60), || async {
        (view.snapshot().readings_acknowledged >= 2 * N).then_some(())
    })
    .await;

    stop.cancel();
    let (ending, view) = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the fleet drains in time")
        .unwrap();
    assert_eq!(ending, Ending::Stopped);
    let s = view.snapshot();
    let state = hub.hub.state();
    assert_eq!(s.connected, N);
    assert_eq!(s.connected_now, 0, "every device disconnected at the end");
    assert_eq!(
        s.readings_acknowledged,
        state.telemetry.total(),
        "acknowledged by the fleet = received by the hub"
    );
    assert_eq!(
        s.readings_sent, s.readings_acknowledged,
        "nothing left in flight"
    );
    assert!(s.methods_answered >= sample.len() as u64, "{s:?}");
    assert!(s.desired_applied >= sample.len() as u64, "{s:?}");
    assert_eq!(s.error_total(), 0, "{:?}", s.errors);
    let latency = view.latency();
    assert!(latency.len() >= s.readings_acknowledged, "every ack timed");
    hub.stop().await;
}

async fn fleet_cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = tokio::process::Command::new(BIN);
    isolated(&mut command).arg("fleet").args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("the fleet ends in time")
        .expect("the binary runs")
}

fn report_of(output: &std::process::Output) -> Value {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr: {stderr}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "the report is JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// The Event Hubs walkthrough's sender (`--count 10 --messages 20`, no interval), sharded in
/// two as a Kubernetes Indexed Job would run it (`JOB_COMPLETION_INDEX`): each shard ends by
/// itself once its readings are acknowledged; the merged report is the hub's count.
#[tokio::test]
async fn shards_send_their_messages_and_their_reports_merge_to_the_hubs_count() {
    let hub = TestHub::start_with(|c| c.auto_register = true).await;
    let dir = hub.dir.path().to_str().unwrap().to_owned();
    let common = [
        "--local",
        "--state-dir",
        &dir,
        "--count",
        "10",
        "--messages",
        "20",
        "--interval-secs",
        "0",
        "--connect-rate",
        "0",
        "--seed",
        "1",
        "--shard-count",
        "2",
    ];
    let mut paths = Vec::new();
    for index in ["0", "1"] {
        let output = fleet_cli(&common, &[("JOB_COMPLETION_INDEX", index)]).await;
        let report = report_of(&output);
        assert_eq!(report["shard"]["index"], index.parse::<u64>().unwrap());
        assert_eq!(report["devices"]["count"], 5);
        assert_eq!(report["readings_acknowledged"], 100, "{report}");
        let path = hub.dir.path().join(format!("report-{index}.json"));
        std::fs::write(&path, &output.stdout).unwrap();
        paths.push(path);
    }
    // One shard of two is a gap: refused, unless --partial.
    let alone = fleet_cli(&["merge-reports", paths[0].to_str().unwrap()], &[]).await;
    let stderr = String::from_utf8_lossy(&alone.stderr);
    assert_eq!(alone.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("shard 1 of 2 missing"),
        "names the missing shard: {stderr}"
    );
    // The same shard twice is an overlap: refused, naming it.
    let twice = fleet_cli(
        &[
            "merge-reports",
            paths[0].to_str().unwrap(),
            paths[0].to_str().unwrap(),
        ],
        &[],
    )
    .await;
    let stderr = String::from_utf8_lossy(&twice.stderr);
    assert_eq!(twice.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("shard 0"), "names the shard: {stderr}");
    let partial = report_of(
        &fleet_cli(
            &["merge-reports", "--partial", paths[0].to_str().unwrap()],
            &[],
        )
        .await,
    );
    assert_eq!(partial["shard"]["complete"], false);
    assert_eq!(partial["shard"]["missing"], json!([1]));
    let output = fleet_cli(
        &[
            "merge-reports",
            paths[0].to_str().unwrap(),
            paths[1].to_str().unwrap(),
        ],
        &[],
    )
    .await;
    let merged = report_of(&output);
    assert_eq!(merged["devices"]["first"], "door-01");
    assert_eq!(merged["devices"]["last"], "door-10");
    assert_eq!(merged["devices"]["count"], 10);
    assert_eq!(merged["connected"], 10);
    assert_eq!(merged["readings_acknowledged"], 200);
    assert_eq!(
        merged["readings_acknowledged"].as_u64().unwrap(),
        hub.hub.state().telemetry.total()
    );
    hub.stop().await;
}

/// `--template`: every device renders the template with its own id and sequence numbers, and
/// the template's properties travel with each message.
#[tokio::test]
async fn the_fleet_sends_what_its_template_says() {
    let hub = TestHub::start_with(|c| c.auto_register = true).await;
    let dir = hub.dir.path().to_str().unwrap().to_owned();
    let template = hub.dir.path().join("template.json");
    std::fs::write(
        &template,
        r#"{"body": {"who": "${deviceId}", "n": "${seq}", "rpm": "${int(800, 1200)}"},
            "properties": {"source": "fleet-${deviceId}"}}"#,
    )
    .unwrap();
    let output = fleet_cli(
        &[
            "--local",
            "--state-dir",
            &dir,
            "--count",
            "2",
            "--messages",
            "3",
            "--interval-secs",
            "0",
            "--template",
            template.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(report_of(&output)["readings_acknowledged"], 6);
    let service = hub.service();
    for id in ["door-1", "door-2"] {
        let events = service.events(id).await;
        assert_eq!(events.len(), 3, "{events:?}");
        for (event, seq) in events.iter().zip(1..) {
            assert_eq!(event["body"]["who"], id, "{event}");
            assert_eq!(event["body"]["n"], seq, "{event}");
            let rpm = event["body"]["rpm"].as_u64().unwrap();
            assert!((800..=1200).contains(&rpm), "{event}");
            assert_eq!(
                event["properties"]["source"],
                format!("fleet-{id}"),
                "{event}"
            );
        }
    }
    hub.stop().await;
}

/// Bad input: each a clear error naming it, exit 78, before anything connects.
#[tokio::test]
async fn bad_input_is_refused_with_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let bad_file = dir.path().join("devices.txt");
    std::fs::write(
        &bad_file,
        "HostName=h;DeviceId=a;SharedAccessKey=a2V5\nnot a connection string\n",
    )
    .unwrap();
    let bad_template = dir.path().join("template.json");
    std::fs::write(&bad_template, "{\"body\": {\"x\": \"${nope}\"}}\n").unwrap();
    let host = ["--host", "hub.example", "--group-key", "a2V5a2V5a2V5"];
    // (arguments, environment, what the error must name)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            [&host[..], &["--shard-index", "3", "--shard-count", "2"]].concat(),
            vec![],
            "--shard-index 3",
        ),
        ([&host[..], &["--count", "0"]].concat(), vec![], "--count 0"),
        (
            [
                &host[..],
                &["--count", "5", "--shard-count", "6", "--shard-index", "0"],
            ]
            .concat(),
            vec![],
            "more than the 5 devices",
        ),
        (
            [&host[..], &["--shard-count", "2"]].concat(),
            vec![("JOB_COMPLETION_INDEX", "x")],
            "JOB_COMPLETION_INDEX",
        ),
        (
            vec!["--host", "hub.example", "--group-key", "not base64!"],
            vec![],
            "--group-key",
        ),
        (
            vec!["--devices", bad_file.to_str().unwrap()],
            vec![],
            "devices.txt:2",
        ),
    ];
    for (args, env, expected) in cases {
        let output = fleet_cli(&args, &env).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(78), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("not base64!"),
            "no key in errors: {stderr}"
        );
    }
}

/// `simdevice hub --auto-register --group-key KEY`: the hub takes a key handed out elsewhere
/// (a Kubernetes Secret) instead of making its own, so devices started with the same key
/// connect; a key that is not base64 stops the hub as a configuration error.
#[tokio::test]
async fn the_hub_takes_a_given_group_key() {
    const KEY: &str = "Z2l2ZW4tZ3JvdXAta2V5LWZvci10ZXN0cy0wMTIzNDU2Nzg5";
    let hub = TestHub::start_with(|c| {
        c.auto_register = true;
        c.group_key = Some(KEY.to_string());
    })
    .await;
    assert_eq!(hub.hub.info().group_key.as_deref(), Some(KEY));
    let mut settings = settings_for(&hub, 3);
    let info = hub.hub.info();
    let ids = numbered_ids("door-", 1, 3).unwrap();
    let gateway = format!("{}:{}", info.hostname, info.mqtt_port);
    settings.devices = from_group_key(ids, &info.hostname, Some(&gateway), KEY).unwrap();
    settings.messages = Some(2);
    settings.interval = Duration::ZERO;
    let fleet = Fleet::new(settings).unwrap();
    let (ending, view) = tokio::time::timeout(
        Duration::from_secs(30),
        fleet.run(CancellationToken::new(), |_| {}),
    )
    .await
    .expect("the fleet ends once its readings are acknowledged");
    assert_eq!(ending, Ending::Done);
    assert_eq!(view.snapshot().readings_acknowledged, 6);
    hub.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let mut config = simdevice::hub::HubConfig::ephemeral(dir.path());
    config.auto_register = true;
    config.group_key = Some("not base64!".into());
    let error = match simdevice::hub::Hub::start(config).await {
        Ok(_) => panic!("a bad group key is refused"),
        Err(error) => error,
    };
    assert!(error.is_config(), "{error}");
    assert!(error.to_string().contains("--group-key"), "{error}");
}

/// A hub that refuses connects (CONNACK 3, server unavailable) and throttles reported patches
/// (429) while the fleet ramps: each device backs off on its own, every one ends connected with
/// its connectivity reported, and no reading is lost: the hub holds exactly what was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_throttled_devices_back_off_alone_and_lose_nothing() {
    const N: u64 = 200;
    let hub = TestHub::start_with(|c| c.auto_register = true).await;
    let faults = &hub.hub.state().faults;
    faults.refuse_connects_for(Duration::from_secs(2));
    faults.throttle_reported_for(Duration::from_secs(3));
    let mut settings = settings_for(&hub, N);
    settings.connect_rate = None;
    settings.messages = Some(3);
    settings.interval = Duration::from_millis(500);
    let fleet = Fleet::new(settings).unwrap();
    let (ending, view) = tokio::time::timeout(
        Duration::from_secs(90),
        fleet.run(CancellationToken::new(), |_| {}),
    )
    .await
    .expect("every reading acknowledged in the end");
    assert_eq!(ending, Ending::Done);
    let s = view.snapshot();
    assert_eq!(s.connected, N);
    assert_eq!(s.connectivity_reported, N, "reported despite the 429s");
    assert!(
        s.errors.get("connect_failed").copied().unwrap_or(0) > 0,
        "{:?}",
        s.errors
    );
    assert_eq!(s.readings_acknowledged, 3 * N);
    assert_eq!(
        hub.hub.state().telemetry.total(),
        3 * N,
        "nothing lost, nothing twice"
    );
    hub.stop().await;
}
