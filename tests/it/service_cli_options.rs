//! `simdevice service` through the built binary against the in-process hub: the connection
//! options (`--local`, `--state-dir`, `--connection-string`, `--ca-file`) are accepted before or
//! after the verb, their environment variables still work, every verb's `--help` lists them, and
//! a failure is one `error: ...` line on stderr with its causes, never the key, and exit code
//! 2 (usage, configuration) or 1 (the hub or the network).

use std::ffi::OsStr;
use std::path::Path;
use std::process::Output;

use crate::common::{RawDevice, TestHub};
use rumqttc::{Packet, QoS};
use serde_json::{json, Value};

/// Runs `simdevice service ARGV...` with `env` set and the connection variables of the test
/// run's own environment removed.
async fn simdevice_service<I, S>(argv: I, env: &[(&str, &OsStr)]) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_simdevice"));
    command
        .arg("service")
        .args(argv)
        .env_remove("IOTHUB_CONNECTION_STRING")
        .env_remove("SIMDEVICE_HUB_STATE_DIR")
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().await.expect("simdevice runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The JSON on stdout of a successful run.
fn answer(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "exit {:?}, stderr: {}",
        output.status.code(),
        stderr(output)
    );
    serde_json::from_slice(&output.stdout).expect("stdout is JSON")
}

/// Sends one telemetry message from `device` and waits for the hub's PUBACK.
async fn send_telemetry(hub: &TestHub, device: &str, key: &str) {
    let mut raw = RawDevice::connect(hub, device, key).await;
    let pkid = raw
        .publish(
            &format!("devices/{device}/messages/events/"),
            QoS::AtLeastOnce,
            r#"{"open":true}"#,
        )
        .await;
    match raw.recv().await {
        Some(Packet::PubAck(ack)) => assert_eq!(ack.pkid, pkid),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn connection_options_before_or_after_the_verb() {
    let hub = TestHub::start().await;
    let key = hub.add_device("door-01");
    send_telemetry(&hub, "door-01", &key).await;
    let dir = hub.dir.path().as_os_str();

    // After the verb and its argument, as Azure CLI users type them.
    let events = answer(
        &simdevice_service(
            [
                OsStr::new("events"),
                "door-01".as_ref(),
                "--local".as_ref(),
                "--state-dir".as_ref(),
                dir,
            ],
            &[],
        )
        .await,
    );
    let events = events.as_array().expect("an array of events");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["deviceId"], "door-01");
    assert_eq!(events[0]["body"], json!({"open": true}));

    // After a nested verb, in the other order.
    let shown = answer(
        &simdevice_service(
            [
                OsStr::new("device"),
                "show".as_ref(),
                "door-01".as_ref(),
                "--state-dir".as_ref(),
                dir,
                "--local".as_ref(),
            ],
            &[],
        )
        .await,
    );
    assert_eq!(shown["deviceId"], "door-01");
    assert_eq!(shown["authentication"]["symmetricKey"]["primaryKey"], key);

    // The old order, and one option on each side of the verb.
    let old = answer(
        &simdevice_service(
            [
                OsStr::new("--local"),
                "--state-dir".as_ref(),
                dir,
                "device".as_ref(),
                "show".as_ref(),
                "door-01".as_ref(),
            ],
            &[],
        )
        .await,
    );
    assert_eq!(old, shown);
    let split = answer(
        &simdevice_service(
            [
                OsStr::new("--local"),
                "twin".as_ref(),
                "show".as_ref(),
                "door-01".as_ref(),
                "--state-dir".as_ref(),
                dir,
            ],
            &[],
        )
        .await,
    );
    assert_eq!(split["deviceId"], "door-01");
    hub.stop().await;
}

#[tokio::test]
async fn environment_variables_and_a_later_flag_that_overrides_them() {
    let hub = TestHub::start().await;
    hub.add_device("door-01");
    let ca_file = hub.hub.info().ca_file.clone();
    let right = hub.hub.info().service_connection_string.clone();
    let wrong_key = simdevice::protocol::sas::generate_key();
    let wrong = format!(
        "HostName=localhost:{};SharedAccessKeyName=iothubowner;SharedAccessKey={wrong_key}",
        hub.hub.api_addr().port(),
    );

    // SIMDEVICE_HUB_STATE_DIR with --local after the verb.
    let shown = answer(
        &simdevice_service(
            ["device", "show", "door-01", "--local"],
            &[("SIMDEVICE_HUB_STATE_DIR", hub.dir.path().as_os_str())],
        )
        .await,
    );
    assert_eq!(shown["deviceId"], "door-01");

    // IOTHUB_CONNECTION_STRING alone, --ca-file after the verb: the wrong key is the hub's 401.
    let output = simdevice_service(
        [
            OsStr::new("device"),
            "list".as_ref(),
            "--ca-file".as_ref(),
            ca_file.as_os_str(),
        ],
        &[("IOTHUB_CONNECTION_STRING", OsStr::new(&wrong))],
    )
    .await;
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "stderr: {text}");
    assert!(text.starts_with("error: "), "stderr: {text}");
    assert!(text.contains("401"), "stderr: {text}");
    assert!(!text.contains(&wrong_key), "the key is not shown: {text}");

    // --connection-string after the verb wins over the variable.
    let listed = answer(
        &simdevice_service(
            [
                OsStr::new("device"),
                "list".as_ref(),
                "--connection-string".as_ref(),
                right.as_ref(),
                "--ca-file".as_ref(),
                ca_file.as_os_str(),
            ],
            &[("IOTHUB_CONNECTION_STRING", OsStr::new(&wrong))],
        )
        .await,
    );
    assert_eq!(listed[0]["deviceId"], "door-01");
    hub.stop().await;
}

#[tokio::test]
async fn every_verb_lists_the_connection_options_in_its_help() {
    let verbs: &[&[&str]] = &[
        &["device", "create"],
        &["device", "list"],
        &["device", "show"],
        &["device", "delete"],
        &["device", "enable"],
        &["device", "disable"],
        &["twin", "show"],
        &["twin", "update"],
        &["invoke"],
        &["query"],
        &["events"],
    ];
    for verb in verbs {
        let output = simdevice_service(verb.iter().chain(&["--help"]), &[]).await;
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{verb:?}: {}", stderr(&output));
        for option in [
            "--connection-string <CONNECTION_STRING>",
            "--local",
            "--state-dir <STATE_DIR>",
            "--ca-file <CA_FILE>",
        ] {
            assert!(
                help.contains(option),
                "{verb:?} --help lacks {option}:\n{help}"
            );
        }
    }
}

#[tokio::test]
async fn a_failure_is_one_line_with_its_causes_and_the_right_exit_code() {
    // No hub.json: a configuration mistake (2), the missing file as the last cause.
    let empty = tempfile::tempdir().expect("temp dir");
    let output = simdevice_service(
        [
            OsStr::new("device"),
            "list".as_ref(),
            "--local".as_ref(),
            "--state-dir".as_ref(),
            empty.path().as_os_str(),
        ],
        &[],
    )
    .await;
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "stderr: {text}");
    assert!(output.stdout.is_empty());
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    let dir = empty.path().display();
    let hub_json = Path::new(empty.path()).join("hub.json");
    let expected_start = format!(
        "error: no usable local hub state in {dir} (start one with `simdevice hub`): cannot read {}",
        hub_json.display()
    );
    assert!(text.starts_with(&expected_start), "stderr: {text}");
    assert!(text.trim_end().ends_with("(os error 2)"), "stderr: {text}");

    // A CA file that is not there: 2, with the path and the I/O error.
    let output = simdevice_service(
        [
            "device",
            "list",
            "--connection-string",
            "HostName=h;SharedAccessKeyName=p;SharedAccessKey=a2V5",
            "--ca-file",
            "/nonexistent/ca.pem",
        ],
        &[],
    )
    .await;
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "stderr: {text}");
    assert!(
        text.starts_with("error: cannot read the CA file /nonexistent/ca.pem: "),
        "stderr: {text}"
    );
    assert!(!text.contains("a2V5"), "the key is not shown: {text}");

    // A connection string that does not parse: 2, the field named, its value not.
    let output = simdevice_service(
        [
            "query",
            "SELECT * FROM devices",
            "--connection-string",
            "HostName=h;SharedAccessKeyName=p;SharedAccessKey=no key!",
        ],
        &[],
    )
    .await;
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "stderr: {text}");
    assert_eq!(
        text.trim_end(),
        "error: the service connection string is not usable: connection string field \
         'SharedAccessKey' is not valid base64"
    );

    // A hub whose certificate is not trusted: the network said no (1); the request, reqwest's
    // error and the TLS cause are all on the line.
    let hub = TestHub::start().await;
    let right = hub.hub.info().service_connection_string.clone();
    let output =
        simdevice_service(["device", "show", "d1", "--connection-string", &right], &[]).await;
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "stderr: {text}");
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    assert!(
        text.starts_with("error: GET /devices/d1 got no answer: error sending request for url"),
        "stderr: {text}"
    );
    assert!(
        text.to_lowercase().contains("certificate"),
        "stderr: {text}"
    );
    let key = right
        .split("SharedAccessKey=")
        .nth(1)
        .expect("the connection string has a key");
    assert!(!text.contains(key), "the key is not shown: {text}");

    // The hub's own error stays as it was: name, code and message, exit 1.
    let output = simdevice_service(
        [
            OsStr::new("device"),
            "show".as_ref(),
            "d1".as_ref(),
            "--local".as_ref(),
            "--state-dir".as_ref(),
            hub.dir.path().as_os_str(),
        ],
        &[],
    )
    .await;
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "stderr: {text}");
    assert!(
        text.starts_with("error: DeviceNotFound (404001): "),
        "stderr: {text}"
    );
    hub.stop().await;
}
