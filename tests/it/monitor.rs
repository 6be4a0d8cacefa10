//! `simdevice service monitor`, the built binary against the in-process hub: from the service
//! connection string (`--local`) through IoT Hub's redirect, from an Event Hubs connection
//! string, the DEVICE filter, `--from`, `--properties`, Ctrl-C, and refusals that name the
//! problem without the key.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

use crate::common::{isolated, RawDevice, TestHub};

const DEADLINE: Duration = Duration::from_secs(20);

struct Monitor {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Lines<BufReader<ChildStderr>>,
}

fn command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_simdevice"));
    isolated(&mut command)
        .env_remove("IOTHUB_CONNECTION_STRING")
        .env("RUST_LOG", "info")
        .arg("service")
        .arg("monitor")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

impl Monitor {
    /// Starts `service monitor ARGS` and waits until every partition has its receiver.
    async fn start(args: &[&str]) -> Monitor {
        let mut child = command(args).spawn().expect("the binary starts");
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut monitor = Monitor {
            child,
            stdout,
            stderr,
        };
        let attached = tokio::time::timeout(DEADLINE, async {
            while let Some(line) = monitor.stderr.next_line().await.unwrap() {
                if line.contains("a receiver on every partition") {
                    return;
                }
            }
            panic!("monitor ended before attaching");
        })
        .await;
        assert!(attached.is_ok(), "the receivers attach within the deadline");
        monitor
    }

    async fn next_event(&mut self) -> Value {
        let line = tokio::time::timeout(DEADLINE, self.stdout.next_line())
            .await
            .expect("an event line within the deadline")
            .unwrap()
            .expect("a line, not the end of the output");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
    }

    /// Ctrl-C: the process ends by itself, 0, and prints nothing more.
    async fn interrupt(mut self) -> String {
        let pid = self.child.id().expect("still running").to_string();
        let sent = std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("ends within the deadline after SIGINT")
            .unwrap();
        let mut rest = String::new();
        while let Ok(Some(line)) = self.stderr.next_line().await {
            rest.push_str(&line);
            rest.push('\n');
        }
        assert!(status.success(), "exit 0 after Ctrl-C: {status:?}\n{rest}");
        rest
    }
}

fn state_dir(hub: &TestHub) -> &str {
    hub.dir.path().to_str().unwrap()
}

async fn send(device: &mut RawDevice, id: &str, body: &str) {
    device
        .publish_acked(
            &format!("devices/{id}/messages/events/$.ct=application%2Fjson&unit=c"),
            body,
        )
        .await;
}

#[tokio::test]
async fn monitor_follows_the_redirect_and_streams_one_devices_telemetry() {
    let hub = TestHub::start().await;
    let (one, other) = ("mon-dev-1", "mon-dev-2");
    let (key1, key2) = (hub.add_device(one), hub.add_device(other));
    let mut d1 = RawDevice::connect(&hub, one, &key1).await;
    let mut d2 = RawDevice::connect(&hub, other, &key2).await;
    send(&mut d1, one, r#"{"n":0}"#).await;

    let mut monitor = Monitor::start(&[
        "--local",
        "--state-dir",
        state_dir(&hub),
        one,
        "--from",
        "start",
        "--properties",
    ])
    .await;
    let first = monitor.next_event().await;
    assert_eq!(first["event"]["origin"], one);
    assert_eq!(
        first["event"]["payload"],
        serde_json::json!({"n": 0}),
        "parsed JSON"
    );
    assert!(first["event"]["enqueuedTime"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert_eq!(
        first["event"]["properties"]["application"]["unit"], "c",
        "{first}"
    );
    assert_eq!(
        first["event"]["properties"]["system"]["content_type"],
        "application/json"
    );
    assert_eq!(
        first["event"]["annotations"]["iothub-message-source"],
        "Telemetry"
    );
    // Another device's telemetry is left out; the next line is this device's next reading.
    send(&mut d2, other, r#"{"n":100}"#).await;
    send(&mut d1, one, "not json").await;
    let second = monitor.next_event().await;
    assert_eq!(second["event"]["origin"], one);
    assert_eq!(second["event"]["payload"], "not json", "text stays text");
    let stderr = monitor.interrupt().await;
    for key in [
        &key1,
        &hub.hub
            .state()
            .policies
            .get("iothubowner")
            .unwrap()
            .primary_key,
    ] {
        assert!(!stderr.contains(key.as_str()), "no key in the log");
    }
    hub.hub.shutdown().await;
}

#[tokio::test]
async fn from_now_and_from_a_time_skip_what_came_before() {
    let hub = TestHub::start().await;
    let id = "mon-from-1";
    let key = hub.add_device(id);
    let mut device = RawDevice::connect(&hub, id, &key).await;
    send(&mut device, id, r#"{"n":"before"}"#).await;
    let before_ms = chrono::Utc::now().timestamp_millis();

    let mut now =
        Monitor::start(&["--local", "--state-dir", state_dir(&hub), "--from", "now"]).await;
    send(&mut device, id, r#"{"n":"after"}"#).await;
    assert_eq!(now.next_event().await["event"]["payload"]["n"], "after");
    now.interrupt().await;

    // From a time after the first reading: the first line is the second reading.
    let since = (before_ms + 1).to_string();
    let mut timed =
        Monitor::start(&["--local", "--state-dir", state_dir(&hub), "--from", &since]).await;
    assert_eq!(timed.next_event().await["event"]["payload"]["n"], "after");
    timed.interrupt().await;
    hub.hub.shutdown().await;
}

#[tokio::test]
async fn an_event_hubs_connection_string_reads_without_the_redirect() {
    let hub = TestHub::start().await;
    let id = "mon-eh-1";
    let key = hub.add_device(id);
    let mut device = RawDevice::connect(&hub, id, &key).await;
    send(&mut device, id, r#"{"eh":true}"#).await;
    let info = simdevice::common::local_hub::HubInfo::read(hub.dir.path()).unwrap();
    let emulator = info
        .eventhub_emulator_connection_string
        .expect("the plain port's connection string");
    let mut monitor = Monitor::start(&["--connection-string", &emulator, "--from", "start"]).await;
    assert_eq!(monitor.next_event().await["event"]["payload"]["eh"], true);
    monitor.interrupt().await;
    hub.hub.shutdown().await;
}

/// Runs a monitor that must fail at once; returns (exit code, stderr).
async fn refused(args: &[&str]) -> (Option<i32>, String) {
    let output = tokio::time::timeout(DEADLINE, command(args).output())
        .await
        .expect("fails within the deadline")
        .unwrap();
    assert!(output.stdout.is_empty(), "no event printed");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn bad_connection_strings_and_keys_are_refused_with_a_clear_error() {
    let hub = TestHub::start().await;
    let (code, stderr) = refused(&[
        "--connection-string",
        "HostName=h;SharedAccessKeyName=p;SharedAccessKey=not base64!",
    ])
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("connection string"), "{stderr}");
    assert!(!stderr.contains("not base64!"), "{stderr}");

    let (code, stderr) = refused(&[
        "--connection-string",
        "Endpoint=sb://localhost/;SharedAccessKeyName=service;SharedAccessKey=a2V5",
    ])
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("EntityPath"), "{stderr}");

    // A wrong key for the local hub: the login is refused, the key not shown.
    let info = simdevice::common::local_hub::HubInfo::read(hub.dir.path()).unwrap();
    let wrong = "d3Jvbmcta2V5LXdyb25nLWtleQ==";
    let connection_string = format!(
        "HostName=localhost:{};SharedAccessKeyName=service;SharedAccessKey={wrong}",
        info.api_port
    );
    let port = info.amqp_port.unwrap().to_string();
    let ca = info.ca_file.to_str().unwrap().to_string();
    let (code, stderr) = refused(&[
        "--connection-string",
        &connection_string,
        "--amqp-port",
        &port,
        "--ca-file",
        &ca,
    ])
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("did not open an AMQP connection as service@sas.root.localhost"),
        "{stderr}"
    );
    assert!(!stderr.contains(wrong), "{stderr}");

    // A policy without ServiceConnect logs in but gets no redirect.
    let registry = hub
        .hub
        .state()
        .policies
        .get("registryRead")
        .unwrap()
        .primary_key
        .clone();
    let connection_string = format!(
        "HostName=localhost:{};SharedAccessKeyName=registryRead;SharedAccessKey={registry}",
        info.api_port
    );
    let (code, stderr) = refused(&[
        "--connection-string",
        &connection_string,
        "--amqp-port",
        &port,
        "--ca-file",
        &ca,
    ])
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("unauthorized"), "{stderr}");
    assert!(!stderr.contains(registry.as_str()), "{stderr}");
    hub.hub.shutdown().await;
}
