//! `simdevice service ...` against the in-process hub: each test parses a real command line,
//! runs it through `commands::service::execute` (or the built binary) and checks the JSON a user
//! would see, or the error code and exit status.

use crate::common::{RawDevice, TestHub};
use clap::Parser;
use rumqttc::QoS;
use serde_json::{json, Value};
use simdevice::commands::service::{execute, ServiceArgs, ServiceCommandError};
use simdevice::service::client::ServiceError;

#[derive(Parser)]
struct Wrapper {
    #[command(subcommand)]
    command: Verb,
}

#[derive(clap::Subcommand)]
enum Verb {
    Service(ServiceArgs),
}

fn parse(argv: &[&str]) -> ServiceArgs {
    let full = ["simdevice", "service"].iter().chain(argv).copied();
    match Wrapper::try_parse_from(full) {
        Ok(Wrapper {
            command: Verb::Service(args),
        }) => args,
        Err(error) => panic!("{argv:?} does not parse: {error}"),
    }
}

/// Runs `simdevice service --local --state-dir <hub dir> ARGV...`; returns the printed JSON.
async fn local(hub: &TestHub, argv: &[&str]) -> Result<Value, ServiceCommandError> {
    let dir = hub.dir.path().to_str().expect("utf-8 temp dir");
    let mut full = vec!["--local", "--state-dir", dir];
    full.extend_from_slice(argv);
    run_args(parse(&full)).await
}

async fn run_args(args: ServiceArgs) -> Result<Value, ServiceCommandError> {
    let mut out = Vec::new();
    execute(args, &mut out).await?;
    let text = String::from_utf8(out).expect("utf-8 output");
    assert!(text.ends_with('\n'), "output ends with a newline: {text:?}");
    Ok(serde_json::from_str(&text).expect("stdout is JSON"))
}

#[tokio::test]
async fn device_create_show_list_disable_enable_delete() {
    let hub = TestHub::start().await;

    let created = local(&hub, &["device", "create", "d1"]).await.unwrap();
    assert_eq!(created["deviceId"], "d1");
    assert_eq!(created["status"], "enabled");
    let key = created["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap();
    assert_eq!(key.len(), 44, "the hub generated a 32-byte key");

    let disabled = local(&hub, &["device", "create", "d2", "--disabled"])
        .await
        .unwrap();
    assert_eq!(disabled["status"], "disabled");

    // Creating it again is the hub's 409001.
    let error = local(&hub, &["device", "create", "d1"]).await.unwrap_err();
    assert_eq!(error.code(), Some(409001), "{error}");
    assert!(!error.is_usage(), "{error}");

    let shown = local(&hub, &["device", "show", "d1"]).await.unwrap();
    assert_eq!(shown["deviceId"], "d1");
    assert_eq!(shown["authentication"]["symmetricKey"]["primaryKey"], key);

    let listed = local(&hub, &["device", "list"]).await.unwrap();
    let mut ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["deviceId"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["d1", "d2"]);
    let top = local(&hub, &["device", "list", "--top", "1"])
        .await
        .unwrap();
    assert_eq!(top.as_array().unwrap().len(), 1);

    // Disable, then enable: the status changes and the keys stay.
    let after = local(&hub, &["device", "disable", "d1"]).await.unwrap();
    assert_eq!(after["status"], "disabled");
    assert_eq!(
        local(&hub, &["device", "show", "d1"]).await.unwrap()["status"],
        "disabled"
    );
    let after = local(&hub, &["device", "enable", "d1"]).await.unwrap();
    assert_eq!(after["status"], "enabled");
    assert_eq!(after["authentication"]["symmetricKey"]["primaryKey"], key);
    assert_eq!(hub.device_key("d1"), key);

    let deleted = local(&hub, &["device", "delete", "d1"]).await.unwrap();
    assert_eq!(deleted, json!({"deviceId": "d1", "deleted": true}));
    let error = local(&hub, &["device", "show", "d1"]).await.unwrap_err();
    assert_eq!(error.code(), Some(404001));
    hub.stop().await;
}

#[tokio::test]
async fn unknown_device_prints_the_iot_hub_error() {
    let hub = TestHub::start().await;
    let error = local(&hub, &["device", "show", "d9"]).await.unwrap_err();
    assert_eq!(error.status(), Some(404));
    assert_eq!(error.code(), Some(404001));
    let text = error.to_string();
    assert!(text.starts_with("DeviceNotFound (404001): "), "{text}");
    assert!(text.contains("d9"), "{text}");
    assert!(!error.is_usage(), "{error}");

    let error = local(&hub, &["twin", "show", "d9"]).await.unwrap_err();
    assert_eq!(error.code(), Some(404001));
    hub.stop().await;
}

#[tokio::test]
async fn twin_update_tags_and_desired_then_show() {
    let hub = TestHub::start().await;
    hub.add_device("d1");
    let updated = local(
        &hub,
        &[
            "twin",
            "update",
            "d1",
            "--tags",
            r#"{"location":{"plant":"Redmond43"}}"#,
            "--desired",
            r#"{"telemetryInterval":5,"mode":"eco"}"#,
        ],
    )
    .await
    .unwrap();
    assert_eq!(updated["tags"], json!({"location": {"plant": "Redmond43"}}));
    assert_eq!(
        updated["properties"]["desired"]["telemetryInterval"],
        json!(5)
    );

    // A second patch merges; null removes.
    let etag = updated["etag"].as_str().unwrap().to_string();
    local(
        &hub,
        &[
            "twin",
            "update",
            "d1",
            "--desired",
            r#"{"mode":null}"#,
            "--etag",
            &etag,
        ],
    )
    .await
    .unwrap();

    let twin = local(&hub, &["twin", "show", "d1"]).await.unwrap();
    assert_eq!(twin["deviceId"], "d1");
    assert_eq!(twin["tags"]["location"]["plant"], "Redmond43");
    let desired = &twin["properties"]["desired"];
    assert_eq!(desired["telemetryInterval"], json!(5));
    assert!(desired.get("mode").is_none(), "{desired}");
    assert_eq!(desired["$version"], json!(3));

    // The old etag no longer matches: 412001.
    let error = local(
        &hub,
        &["twin", "update", "d1", "--desired", "{}", "--etag", &etag],
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), Some(412001), "{error}");

    // Bad input is refused before anything is sent, with exit code 2.
    let error = local(&hub, &["twin", "update", "d1", "--tags", "{not json"])
        .await
        .unwrap_err();
    assert!(error.to_string().contains("--tags"), "{error}");
    assert!(error.is_usage(), "{error}");
    let error = local(&hub, &["twin", "update", "d1"]).await.unwrap_err();
    assert!(error.is_usage(), "{error}");
    hub.stop().await;
}

#[tokio::test]
async fn query_follows_continuation_pages() {
    let hub = TestHub::start().await;
    for i in 0..120 {
        hub.add_device(&format!("bulk-{i:03}"));
    }
    let rows = local(&hub, &["query", "SELECT * FROM devices"])
        .await
        .unwrap();
    let rows = rows.as_array().unwrap();
    // The hub pages at 100 rows, so this took two requests.
    assert_eq!(rows.len(), 120);
    let mut ids: Vec<&str> = rows
        .iter()
        .map(|r| r["deviceId"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 120);

    let count = local(&hub, &["query", "SELECT COUNT() AS n FROM devices"])
        .await
        .unwrap();
    assert_eq!(count, json!([{"n": 120}]));

    let error = local(&hub, &["query", "SELECT * FROM nowhere"])
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(400), "{error}");
    hub.stop().await;
}

#[tokio::test]
async fn invoke_a_direct_method_on_a_connected_device() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");

    // Offline: the hub's 404103.
    let error = local(&hub, &["invoke", "d1", "lockDoor"])
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(404103), "{error}");

    // A payload that is not JSON is a usage error that names it.
    let error = local(&hub, &["invoke", "d1", "lockDoor", "{oops"])
        .await
        .unwrap_err();
    assert!(error.to_string().contains("PAYLOAD"), "{error}");
    assert!(error.is_usage(), "{error}");

    let mut device = RawDevice::connect(&hub, "d1", &key).await;
    device
        .subscribe("$iothub/methods/POST/#", QoS::AtLeastOnce)
        .await;
    let answer = async {
        let request = device.next_publish().await;
        let rid = request
            .topic
            .strip_prefix("$iothub/methods/POST/lockDoor/?$rid=")
            .expect("method topic")
            .to_string();
        let payload: Value = serde_json::from_slice(&request.payload).unwrap();
        device
            .answer_method(
                &rid,
                200,
                serde_json::to_vec(&json!({"locked": true, "echo": payload})).unwrap(),
            )
            .await;
    };
    let (result, ()) = tokio::join!(
        local(
            &hub,
            &[
                "invoke",
                "d1",
                "lockDoor",
                r#"{"lockTime":"10m"}"#,
                "--timeout",
                "10"
            ]
        ),
        answer
    );
    assert_eq!(
        result.unwrap(),
        json!({"status": 200, "payload": {"locked": true, "echo": {"lockTime": "10m"}}})
    );
    hub.stop().await;
}

#[tokio::test]
async fn events_show_recent_telemetry() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    hub.add_device("d2");
    let mut device = RawDevice::connect(&hub, "d1", &key).await;
    device
        .publish_acked(
            "devices/d1/messages/events/%24.mid=m-1&alert=yes",
            r#"{"temperature":71}"#,
        )
        .await;

    let events = local(&hub, &["events", "d1"]).await.unwrap();
    let events = events.as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["deviceId"], "d1");
    assert_eq!(events[0]["body"], json!({"temperature": 71}));
    assert_eq!(events[0]["properties"], json!({"alert": "yes"}));
    assert_eq!(events[0]["systemProperties"]["message-id"], "m-1");

    let all = local(&hub, &["events"]).await.unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1);
    assert_eq!(
        local(&hub, &["events", "d2"]).await.unwrap(),
        json!([]),
        "another device's events are not shown"
    );
    let sequence = events[0]["sequenceNumber"].as_u64().unwrap().to_string();
    assert_eq!(
        local(&hub, &["events", "d1", "--after", &sequence])
            .await
            .unwrap(),
        json!([])
    );
    hub.stop().await;
}

#[tokio::test]
async fn connection_string_with_a_wrong_key_gets_401() {
    let hub = TestHub::start().await;
    let ca_file = hub.hub.info().ca_file.clone();
    let wrong = format!(
        "HostName=localhost:{};SharedAccessKeyName=iothubowner;SharedAccessKey={}",
        hub.hub.api_addr().port(),
        simdevice::protocol::sas::generate_key()
    );
    let error = run_args(parse(&[
        "--connection-string",
        &wrong,
        "--ca-file",
        ca_file.to_str().unwrap(),
        "device",
        "list",
    ]))
    .await
    .unwrap_err();
    assert_eq!(error.status(), Some(401), "{error}");
    assert!(error.to_string().contains("401"), "{error}");
    assert!(!error.is_usage(), "{error}");

    // The right key through the same path works (so the 401 was the key, not the TLS set-up).
    let right = hub.hub.info().service_connection_string.clone();
    let listed = run_args(parse(&[
        "--connection-string",
        &right,
        "--ca-file",
        ca_file.to_str().unwrap(),
        "device",
        "list",
    ]))
    .await
    .unwrap();
    assert_eq!(listed, json!([]));

    // Without the hub's CA the certificate is not trusted: a transport error, not a 401.
    let error = run_args(parse(&["--connection-string", &right, "device", "list"]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            ServiceCommandError::Service(ServiceError::Transport { .. })
        ),
        "expected a TLS failure, got {error}"
    );
    hub.stop().await;
}

#[tokio::test]
async fn missing_hub_configuration_is_a_usage_error() {
    let empty = tempfile::tempdir().unwrap();
    let error = run_args(parse(&[
        "--local",
        "--state-dir",
        empty.path().to_str().unwrap(),
        "device",
        "list",
    ]))
    .await
    .unwrap_err();
    assert!(error.is_usage(), "{error}");
    assert!(error.to_string().contains("simdevice hub"), "{error}");

    let error = run_args(parse(&[
        "--connection-string",
        "HostName=h;SharedAccessKeyName=p",
        "device",
        "list",
    ]))
    .await
    .unwrap_err();
    assert!(error.is_usage(), "{error}");
    // The field is named by the parse error, the source of "the service connection string is
    // not usable".
    let chain = format!("{:#}", anyhow::Error::from(error));
    assert!(chain.contains("SharedAccessKey"), "{chain}");
}

#[tokio::test]
async fn the_binary_prints_json_and_error_codes() {
    let hub = TestHub::start().await;
    hub.add_device("d1");
    let dir = hub.dir.path().to_owned();
    let run = |args: &'static [&'static str]| {
        let dir = dir.clone();
        tokio::process::Command::new(env!("CARGO_BIN_EXE_simdevice"))
            .arg("service")
            .arg("--local")
            .arg("--state-dir")
            .arg(dir)
            .args(args)
            .env_remove("IOTHUB_CONNECTION_STRING")
            .env_remove("SIMDEVICE_HUB_STATE_DIR")
            .kill_on_drop(true)
            .output()
    };

    let output = run(&["device", "show", "nobody"]).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("404001"), "stderr: {stderr}");
    assert!(stderr.contains("DeviceNotFound"), "stderr: {stderr}");
    assert!(output.stdout.is_empty());

    let output = run(&["device", "list"]).await.unwrap();
    assert!(
        output.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed: Value = serde_json::from_slice(&output.stdout).expect("stdout is JSON");
    assert_eq!(listed[0]["deviceId"], "d1");

    let output = run(&["twin", "update", "d1"]).await.unwrap();
    assert_eq!(output.status.code(), Some(2));
    hub.stop().await;
}

#[tokio::test]
async fn a_numbered_range_is_registered_in_bulk_with_keys_derived_from_the_group_key() {
    let hub = TestHub::start().await;
    let group_key = simdevice::protocol::sas::generate_key();
    let argv = [
        "device",
        "create",
        "--prefix",
        "door-",
        "--count",
        "150",
        "--group-key",
        &group_key,
    ];
    // 150 devices: two bulk calls (100 + 50); the first two attempts are throttled (429,
    // Retry-After: 1 s) and waited out.
    hub.hub.state().faults.throttle_bulk_registry(2);
    let started = std::time::Instant::now();
    let created = local(&hub, &argv).await.unwrap();
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(2),
        "each 429 was waited out for its Retry-After"
    );
    assert!(
        !hub.hub.state().faults.throttle_bulk(),
        "both throttles were met"
    );
    assert_eq!(created, json!({"created": 150, "failed": 0, "errors": []}));
    let registry = &hub.hub.state().registry;
    assert!(registry.contains("door-001") && registry.contains("door-150"));
    assert!(!registry.contains("door-000") && !registry.contains("door-151"));
    // The device needs nothing but the group key: its own key is derived, and it connects.
    let key = simdevice::protocol::sas::derive_device_key(&group_key, "door-042").unwrap();
    // (RawDevice::connect asserts that the hub accepted the CONNECT.)
    let device = RawDevice::connect(&hub, "door-042", &key).await;
    drop(device);

    // Again: every create is refused one by one (they exist), and said so.
    let again = local(&hub, &argv).await.unwrap();
    assert_eq!(again["created"], 0);
    assert_eq!(again["failed"], 150);
    assert_eq!(again["errors"][0]["deviceId"], "door-001");
    assert_eq!(again["errors"][0]["errorCode"], "DeviceAlreadyExists");
    assert!(!again.to_string().contains(&key), "no key in the answer");

    // Bad input is refused before any call: a prefix that makes invalid ids, a bad key.
    let bad_prefix = local(
        &hub,
        &[
            "device",
            "create",
            "--prefix",
            "a/",
            "--count",
            "2",
            "--group-key",
            &group_key,
        ],
    )
    .await
    .unwrap_err();
    assert!(bad_prefix.is_usage(), "{bad_prefix}");
    assert!(!registry.contains("a/1"));
    let bad_key = local(
        &hub,
        &[
            "device",
            "create",
            "--prefix",
            "x-",
            "--count",
            "2",
            "--group-key",
            "not base64!",
        ],
    )
    .await
    .unwrap_err();
    assert!(bad_key.is_usage(), "{bad_key}");
    assert!(!registry.contains("x-1"));
    hub.stop().await;
}

#[tokio::test]
async fn the_bulk_registry_call_answers_as_iot_hub_does() {
    let hub = TestHub::start().await;
    let service = hub.service();
    hub.add_device("old");
    let create = |id: &str| json!({"id": id, "importMode": "create"});
    let reply = service
        .call(
            reqwest::Method::POST,
            "/devices",
            Some(json!([create("new1"), create("old"), {"id": "old", "importMode": "delete"}])),
            &[],
        )
        .await;
    assert_eq!(reply.status, 400, "a device named twice: {}", reply.body);

    let reply = service
        .call(
            reqwest::Method::POST,
            "/devices",
            Some(
                json!([create("new1"), create("old"), {"id": "gone", "importMode": "delete"},
                        {"id": "new2", "importMode": "frobnicate"}]),
            ),
            &[],
        )
        .await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.body["isSuccessful"], false);
    let failed: Vec<&str> = reply.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["deviceId"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["old", "gone", "new2"], "{}", reply.body);
    let registry = &hub.hub.state().registry;
    assert!(
        registry.contains("new1"),
        "one failure does not stop the others"
    );

    let reply = service
        .call(
            reqwest::Method::POST,
            "/devices",
            Some(json!([{"id": "new1", "importMode": "delete"}, create("new3")])),
            &[],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.body,
        json!({"isSuccessful": true, "errors": [], "warnings": []})
    );
    assert!(!registry.contains("new1") && registry.contains("new3"));

    let many: Vec<Value> = (0..101).map(|i| create(&format!("m{i}"))).collect();
    let reply = service
        .call(
            reqwest::Method::POST,
            "/devices",
            Some(Value::Array(many)),
            &[],
        )
        .await;
    assert_eq!(reply.status, 400, "more than 100: {}", reply.body);
    assert!(!registry.contains("m0"));
    hub.stop().await;
}
