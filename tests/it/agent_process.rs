//! The `simdevice run` binary as a user runs it: a config file, JSON logs, SIGHUP reload
//! without reconnecting, SIGTERM to a clean exit 0, and no key in any output.

use std::process::Stdio;
use std::time::Duration;

use crate::common::agent::identity_toml;
use crate::common::*;
use serde_json::Value;

fn write_config(path: &std::path::Path, hub: &TestHub, key: &str, interval: f64) {
    let identity = identity_toml(
        "d1",
        key,
        hub.hub.mqtt_addr().port(),
        &hub.hub.info().ca_file,
    );
    let text = format!("{identity}\n[telemetry]\ninterval_secs = {interval}\n");
    std::fs::write(path, text).unwrap();
}

#[tokio::test]
async fn sighup_reloads_without_reconnecting_and_sigterm_exits_0() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let service = hub.service();
    let config = hub.dir.path().join("agent.toml");
    write_config(&config, &hub, &key, 1.0);
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_simdevice"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config)
        // The durable outbox goes to the test's directory, not /var/lib/simdevice.
        .env("STATE_DIRECTORY", hub.dir.path())
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let mut info = Value::Null;
    for _ in 0..100 {
        info = service.device_info("d1").await;
        if info["counters"]["readingsAcknowledged"]
            .as_u64()
            .unwrap_or(0)
            >= 1
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(info["telemetryIntervalSeconds"], 1.0);
    assert_eq!(info["counters"]["connects"], 1);

    write_config(&config, &hub, &key, 0.5);
    let pid = child.id().unwrap() as i32;
    std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    let mut reloaded = Value::Null;
    for _ in 0..50 {
        reloaded = service.device_info("d1").await;
        if reloaded["telemetryIntervalSeconds"] == 0.5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        reloaded["telemetryIntervalSeconds"], 0.5,
        "SIGHUP applied the new interval"
    );
    assert_eq!(reloaded["counters"]["connects"], 1, "without reconnecting");

    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("the agent exits after SIGTERM")
        .unwrap();
    assert!(output.status.success(), "exit status {:?}", output.status);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(!stderr.contains(&key), "the key appeared in the logs");
    let lines: Vec<Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    let messages: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["fields"]["message"].as_str())
        .collect();
    assert!(messages.contains(&"connected to IoT Hub"), "{messages:?}");
    assert!(messages.contains(&"configuration reloaded"), "{messages:?}");
    assert!(
        messages.contains(&"disconnected from IoT Hub")
            || messages.iter().any(|m| m.starts_with("stopping"))
    );
    hub.stop().await;
}

#[tokio::test]
async fn a_bad_configuration_exits_78_and_config_check_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[identity]\nconnection_string = \"HostName=h;DeviceId=d;SharedAccessKey=c2VjcmV0c2VjcmV0c2VjcmV0\"\n[telemetry]\ninterval_secs = 0\n",
    )
    .unwrap();
    for args in [vec!["run", "--config"], vec!["config", "check", "--config"]] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_simdevice"))
            .args(&args)
            .arg(&config)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(78), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("telemetry.interval_secs"), "{stderr}");
        assert!(!stderr.contains("c2VjcmV0"), "the key leaked: {stderr}");
    }
    std::fs::write(
        &config,
        "[identity]\nconnection_string = \"HostName=h;DeviceId=d;SharedAccessKey=c2VjcmV0c2VjcmV0c2VjcmV0\"\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_simdevice"))
        .args(["config", "check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("interval_secs = 10"), "{stdout}");
    assert!(!stdout.contains("c2VjcmV0"), "the key leaked: {stdout}");
}

/// The `[provisioning]` configuration of registration `reg-kiosk` (an individual enrollment
/// whose device id is `kiosk-9`, so the assigned device is not the registration id), with
/// `/metrics` on `metrics_port` and this telemetry interval.
fn write_provisioned(
    path: &std::path::Path,
    hub: &TestHub,
    key: &str,
    metrics_port: u16,
    interval: f64,
) {
    let text = format!(
        "[provisioning]\nid_scope = \"{}\"\nregistration_id = \"reg-kiosk\"\n\
         global_endpoint = \"localhost:{}\"\nca_file = \"{}\"\nkey = \"{key}\"\n\
         gateway_host_name = \"localhost:{}\"\n\
         [telemetry]\ninterval_secs = {interval}\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\
         [outbox]\npath = \"{}\"\n",
        hub.hub.info().id_scope.clone().unwrap(),
        hub.hub.dps_addr().unwrap().port(),
        hub.hub.info().ca_file.display(),
        hub.hub.mqtt_addr().port(),
        hub.dir.path().join("kiosk-outbox.db").display(),
    );
    std::fs::write(path, text).unwrap();
}

#[tokio::test]
async fn a_provisioned_run_serves_metrics_and_reloads_on_sighup() {
    let hub = TestHub::start().await;
    let dps_key = hub.hub.state().dps.service_key().to_string();
    let dps = Service::with_key(&hub, "provisioningserviceowner", &dps_key, now() + 3600);
    let put = dps
        .call(
            reqwest::Method::PUT,
            "/enrollments/reg-kiosk",
            Some(
                serde_json::json!({"attestation": {"type": "symmetricKey"}, "deviceId": "kiosk-9"}),
            ),
            &[],
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let key = put.body["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    let metrics_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let config = hub.dir.path().join("kiosk.toml");
    write_provisioned(&config, &hub, &key, metrics_port, 1.0);
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_simdevice"));
    let child = isolated(&mut command)
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // /metrics and /healthz are the assigned device's, once it is connected.
    let metrics = crate::common::agent::eventually(Duration::from_secs(20), || async {
        let text = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .any(|l| l == "simdevice_agent_connected 1")
            .then_some(text)
    })
    .await;
    assert!(
        metrics.contains("simdevice_agent_connects_total 1"),
        "{metrics}"
    );
    let health = reqwest::get(format!("http://127.0.0.1:{metrics_port}/healthz"))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    let service = hub.service();
    let info = crate::common::agent::eventually(Duration::from_secs(10), || async {
        let info = service.device_info("kiosk-9").await;
        (info["telemetryIntervalSeconds"] == 1.0).then_some(info)
    })
    .await;
    assert_eq!(info["counters"]["connects"], 1);

    // SIGHUP: the new interval reaches the assigned device (kiosk-9, not reg-kiosk), without
    // reconnecting or registering again.
    write_provisioned(&config, &hub, &key, metrics_port, 0.5);
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    let reloaded = crate::common::agent::eventually(Duration::from_secs(10), || async {
        let info = service.device_info("kiosk-9").await;
        (info["telemetryIntervalSeconds"] == 0.5).then_some(info)
    })
    .await;
    assert_eq!(reloaded["counters"]["connects"], 1, "without reconnecting");

    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("the agent exits after SIGTERM")
        .unwrap();
    assert!(output.status.success(), "exit status {:?}", output.status);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(!stderr.contains(&key), "the key appeared in the logs");
    let messages: Vec<String> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|l| l["fields"]["message"].as_str().map(str::to_string))
        .collect();
    assert!(
        messages.iter().any(|m| m == "configuration reloaded"),
        "{messages:?}"
    );
    assert_eq!(
        messages
            .iter()
            .filter(|m| *m == "provisioned by DPS")
            .count(),
        1,
        "registered once: {messages:?}"
    );
    hub.stop().await;
}
