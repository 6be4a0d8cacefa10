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
