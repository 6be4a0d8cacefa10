//! The fleet as an engine runs it (scenario 4): the hub on one host and S shard processes
//! each on its own host, started as a Kubernetes Indexed Job starts its pods (the same command
//! line, `JOB_COMPLETION_INDEX` set per pod). The hosts are network namespaces made here (a
//! bridge in the hub's namespace, one veth pair per shard); where namespaces cannot be made
//! (not root, no iproute2), the same test runs every process on loopback. Either way the
//! merged report must equal the hub's own counts.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::agent::eventually;
use crate::common::isolated;

const BIN: &str = env!("CARGO_BIN_EXE_simdevice");
const SHARDS: u64 = 3;
const DEVICES: u64 = 30;
const MESSAGES: u64 = 4;

/// The hosts of one test: namespaces `sdf<pid>-hub` and `sdf<pid>-<k>`, deleted on drop (which
/// deletes the links inside them too).
struct Hosts {
    names: Vec<String>,
}

impl Hosts {
    fn hub(&self) -> &str {
        &self.names[0]
    }

    fn shard(&self, k: u64) -> &str {
        &self.names[1 + k as usize]
    }

    /// Builds the hosts, or `None` when this machine cannot (the loopback variant runs then).
    fn make() -> Option<Hosts> {
        // Set to run the loopback variant on a machine that could make namespaces.
        if std::env::var_os("SIMDEVICE_TEST_LOOPBACK_ONLY").is_some() {
            return None;
        }
        let base = format!("sdf{}", std::process::id());
        let mut hosts = Hosts { names: Vec::new() };
        let hub = format!("{base}-hub");
        if !ip(&["netns", "add", &hub]) {
            return None;
        }
        hosts.names.push(hub.clone());
        let ok = ip(&["-n", &hub, "link", "set", "lo", "up"])
            && ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])
            && ip(&["-n", &hub, "addr", "add", "10.77.0.1/24", "dev", "br0"])
            && ip(&["-n", &hub, "link", "set", "br0", "up"]);
        if !ok {
            return None;
        }
        for k in 0..SHARDS {
            let shard = format!("{base}-{k}");
            if !ip(&["netns", "add", &shard]) {
                return None;
            }
            hosts.names.push(shard.clone());
            let (outer, inner) = (format!("sdh{k}"), format!("sds{k}"));
            let address = format!("10.77.0.{}/24", 10 + k);
            let ok = ip(&[
                "-n", &hub, "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns",
                &shard,
            ]) && ip(&["-n", &hub, "link", "set", &outer, "master", "br0", "up"])
                && ip(&["-n", &shard, "addr", "add", &address, "dev", &inner])
                && ip(&["-n", &shard, "link", "set", &inner, "up"])
                && ip(&["-n", &shard, "link", "set", "lo", "up"]);
            if !ok {
                return None;
            }
        }
        Some(hosts)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for name in &self.names {
            ip(&["netns", "del", name]);
        }
    }
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `program args` inside namespace `ns` (on this host when `None`).
fn on_host(ns: Option<&str>, program: &str) -> tokio::process::Command {
    let mut command = match ns {
        Some(ns) => {
            let mut c = tokio::process::Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => tokio::process::Command::new(program),
    };
    isolated(&mut command).env("RUST_LOG", "warn");
    command
}

async fn hub_metric(ns: Option<&str>, metrics: &str, name: &str) -> f64 {
    let output = on_host(ns, "curl")
        .args(["-sf", &format!("http://{metrics}/metrics")])
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("report written")).expect("report is JSON")
}

#[tokio::test]
async fn shards_on_their_own_hosts_merge_to_the_hubs_counts() {
    let hosts = Hosts::make();
    match &hosts {
        Some(h) => eprintln!("hosts: {:?}", h.names),
        None => eprintln!("network namespaces cannot be made here: every process on loopback"),
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("hub");
    let hub_ns = hosts.as_ref().map(|h| h.hub().to_string());
    let (address, mqtt_port) = match hosts {
        Some(_) => ("10.77.0.1".to_string(), 8883),
        None => ("127.0.0.1".to_string(), 0),
    };
    // The hub's loopback (its own, in its namespace): a free port of this host's loopback.
    let metrics = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    let metrics = metrics.as_str();
    let mut hub = on_host(hub_ns.as_deref(), BIN)
        .args([
            "hub",
            "--auto-register",
            "--api-port",
            "0",
            "--metrics-listen",
            metrics,
        ])
        .arg("--state-dir")
        .arg(&state)
        .args([
            "--bind",
            &address,
            "--mqtt-port",
            &mqtt_port.to_string(),
            "--hostname",
            &address,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the hub starts");
    let info: Value = eventually(Duration::from_secs(20), || async {
        let text = std::fs::read(state.join("hub.json")).ok()?;
        serde_json::from_slice(&text).ok()
    })
    .await;
    let port = info["mqtt_port"].as_u64().unwrap();
    let group_key = info["group_key"].as_str().unwrap().to_string();
    let ca = info["ca_file"].as_str().unwrap().to_string();

    // The pods: one command line for all, the index from the engine's environment.
    let mut pods = Vec::new();
    for k in 0..SHARDS {
        let ns = hosts.as_ref().map(|h| h.shard(k).to_string());
        let report = dir.path().join(format!("report-{k}.json"));
        let child = on_host(ns.as_deref(), BIN)
            .args([
                "fleet",
                "--host",
                &address,
                "--gateway",
                &format!("{address}:{port}"),
            ])
            .args(["--ca-file", &ca, "--count", &DEVICES.to_string()])
            .args([
                "--shard-count",
                &SHARDS.to_string(),
                "--messages",
                &MESSAGES.to_string(),
            ])
            .args(["--interval-secs", "0", "--connect-rate", "0", "--seed", "4"])
            .arg("--report")
            .arg(&report)
            .env("SIMDEVICE_GROUP_KEY", &group_key)
            .env("JOB_COMPLETION_INDEX", k.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("a shard starts");
        pods.push((child, report));
    }
    let mut reports = Vec::new();
    for (child, report) in pods {
        let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .expect("each shard ends by itself")
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "shard failed: {stderr}");
        reports.push(report);
    }
    for (k, path) in reports.iter().enumerate() {
        let report = read_json(path);
        assert_eq!(report["shard"]["index"], k as u64);
        assert_eq!(report["devices"]["count"], DEVICES / SHARDS);
    }

    let merged_path = dir.path().join("merged.json");
    let status = on_host(None, BIN)
        .args(["fleet", "merge-reports"])
        .args(&reports)
        .arg("--output")
        .arg(&merged_path)
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let merged = read_json(&merged_path);
    assert_eq!(merged["shard"]["complete"], true);
    assert_eq!(merged["devices"]["first"], "door-01");
    assert_eq!(merged["devices"]["last"], "door-30");
    assert_eq!(merged["connected"], DEVICES);
    assert_eq!(merged["readings_acknowledged"], DEVICES * MESSAGES);

    // The hub's own counts: what it received and accepted.
    let telemetry = hub_metric(
        hub_ns.as_deref(),
        metrics,
        "simdevice_hub_telemetry_messages_total",
    )
    .await;
    assert_eq!(
        telemetry,
        (DEVICES * MESSAGES) as f64,
        "hub telemetry count"
    );
    assert_eq!(
        merged["readings_acknowledged"].as_u64().unwrap() as f64,
        telemetry
    );
    let accepted = hub_metric(
        hub_ns.as_deref(),
        metrics,
        "simdevice_hub_connections_total{result=\"accepted\"}",
    )
    .await;
    assert_eq!(
        accepted,
        merged["connected"].as_u64().unwrap() as f64,
        "one connection per device"
    );
    let registered = hub_metric(hub_ns.as_deref(), metrics, "simdevice_hub_devices").await;
    assert_eq!(registered, DEVICES as f64, "each device registered itself");
    let reported = hub_metric(
        hub_ns.as_deref(),
        metrics,
        "simdevice_hub_twin_updates_total{source=\"device\"}",
    )
    .await;
    assert!(
        reported >= merged["connectivity_reported"].as_u64().unwrap() as f64,
        "{reported} reported patches"
    );
    assert_eq!(merged["connectivity_reported"], DEVICES);

    let _ = hub.start_kill();
    let _ = hub.wait().await;
}
