//! Capture (`simdevice hub --capture DIR`): devices send telemetry over MQTT/TLS, the hub
//! writes Avro files in Azure's layouts; read back with apache-avro and checked field by field.
//! The in-process hub for the formats and windows; the `simdevice` binary for SIGTERM, SIGKILL
//! (every acknowledged reading in exactly one file after the restart) and the refused
//! Blob Storage destinations.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use simdevice::common::local_hub::HubInfo;
use simdevice::hub::capture::{CaptureSettings, Codec, Destination, Encoding, Format};

use crate::common::{connect_packet, device_token, tls_connector_for, RawDevice, TestHub};

const TELEMETRY: &str = "devices/d1/messages/events/$.ct=application%2Fjson&$.ce=utf-8&alert=high";

fn settings(dir: &Path, format: Format, codec: Codec, window_secs: u64) -> CaptureSettings {
    CaptureSettings {
        destination: Destination::Directory(dir.to_owned()),
        format,
        codec,
        encoding: Encoding::Avro,
        window: Duration::from_secs(window_secs),
        window_bytes: 314_572_800,
        skip_empty: true,
    }
}

/// Every regular file under `root` except hidden ones (the temporaries), sorted.
fn files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.file_name().unwrap().to_string_lossy().starts_with('.') {
                continue; // the hub's temporaries
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

struct File {
    path: PathBuf,
    schema: apache_avro::Schema,
    codec: Option<String>,
    records: Vec<HashMap<String, Value>>,
}

fn read(path: &Path) -> File {
    let bytes = std::fs::read(path).unwrap();
    let reader = apache_avro::Reader::new(&bytes[..]).unwrap();
    let schema = reader.writer_schema().clone();
    let codec = codec_of(&bytes);
    let records = reader
        .map(|r| match r.unwrap() {
            Value::Record(fields) => fields.into_iter().collect(),
            other => panic!("not a record: {other:?}"),
        })
        .collect();
    File {
        path: path.to_owned(),
        schema,
        codec,
        records,
    }
}

/// The `avro.codec` of a file's header, as written (absent means null).
fn codec_of(bytes: &[u8]) -> Option<String> {
    let key = b"avro.codec";
    let at = bytes.windows(key.len()).position(|w| w == key)? + key.len();
    // The value: a zig-zag varint length, then the bytes.
    let len = (bytes[at] >> 1) as usize;
    Some(String::from_utf8_lossy(&bytes[at + 1..at + 1 + len]).into_owned())
}

/// Waits until the files under `root` hold `count` records; returns them. Panics after 20 s.
async fn wait_for_records(root: &Path, count: usize) -> Vec<File> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all: Vec<File> = files(root)
            .iter()
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .map(|p| read(p))
            .collect();
        let n: usize = all.iter().map(|f| f.records.len()).sum();
        if n >= count {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} of {count} records captured"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn unwrap_union(value: &Value) -> &Value {
    match value {
        Value::Union(_, inner) => inner,
        other => other,
    }
}

fn text(value: &Value) -> &str {
    match unwrap_union(value) {
        Value::String(s) => s,
        other => panic!("not a string: {other:?}"),
    }
}

fn map(value: &Value) -> &HashMap<String, Value> {
    match value {
        Value::Map(m) => m,
        other => panic!("not a map: {other:?}"),
    }
}

fn body(record: &HashMap<String, Value>) -> Vec<u8> {
    match unwrap_union(&record["Body"]) {
        Value::Bytes(b) => b.clone(),
        other => panic!("body is not bytes: {other:?}"),
    }
}

async fn send_readings(hub: &TestHub, count: usize) -> Vec<String> {
    let key = hub.add_device("d1");
    let mut device = RawDevice::connect(hub, "d1", &key).await;
    let mut sent = Vec::new();
    for n in 0..count {
        let reading = format!(r#"{{"id":"d1","n":{n},"temperature":21.5}}"#);
        device.publish_acked(TELEMETRY, reading.clone()).await;
        sent.push(reading);
    }
    sent
}

#[tokio::test]
async fn eventhubs_capture_writes_every_field_in_capture_form_and_layout() {
    let out = tempfile::tempdir().unwrap();
    let settings = settings(out.path(), Format::EventHubs, Codec::Deflate, 1);
    let hub = TestHub::start_with(|c| c.capture = Some(settings)).await;
    let info = HubInfo::read(hub.dir.path()).unwrap();
    let capture = info.capture.expect("hub.json reports capture");
    assert_eq!(
        (capture.format.as_str(), capture.codec.as_str()),
        ("eventhubs", "deflate")
    );
    assert_eq!((capture.window_secs, capture.skip_empty), (1, true));
    assert_eq!(Path::new(&capture.dest), out.path());
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let sent = send_readings(&hub, 3).await;
    let files = wait_for_records(out.path(), 3).await;
    let after = chrono::Utc::now();

    assert_eq!(
        layout(out.path(), &files[0].path),
        "simdevice/localhost/#/####/##/##/##/##/##.avro"
    );
    let file = &files[0];
    assert_eq!(file.codec.as_deref(), Some("deflate"));
    let apache_avro::Schema::Record(schema) = &file.schema else {
        panic!("schema is not a record")
    };
    assert_eq!(
        schema.name.fullname(None),
        "Microsoft.ServiceBus.Messaging.EventData"
    );
    let records: Vec<_> = files.iter().flat_map(|f| f.records.iter()).collect();
    assert_eq!(records.len(), 3);
    for (i, record) in records.iter().enumerate() {
        let Value::Long(seq) = record["SequenceNumber"] else {
            panic!("SequenceNumber is not a long")
        };
        // The device's partition of a new hub numbers its events from 0; the offset is the
        // event's byte position in the partition, as the Event Hubs endpoint gives them.
        assert_eq!(seq, i as i64);
        let offset: u64 = text(&record["Offset"]).parse().expect("a numeric offset");
        assert!(i == 0 || offset > 0, "offsets grow: {offset}");
        let enqueued = chrono::NaiveDateTime::parse_from_str(
            text(&record["EnqueuedTimeUtc"]),
            "%m/%d/%Y %I:%M:%S %p",
        )
        .unwrap()
        .and_utc();
        assert!(
            enqueued >= before - chrono::Duration::seconds(1) && enqueued <= after,
            "{enqueued}"
        );
        let system = map(&record["SystemProperties"]);
        assert_eq!(text(&system["iothub-connection-device-id"]), "d1");
        assert_eq!(text(&system["content-type"]), "application/json");
        assert_eq!(text(&system["content-encoding"]), "utf-8");
        assert_eq!(text(&system["iothub-message-source"]), "Telemetry");
        assert_eq!(text(&system["x-opt-offset"]), text(&record["Offset"]));
        assert_eq!(
            unwrap_union(&system["x-opt-sequence-number"]),
            &Value::Long(seq)
        );
        let Value::Long(ms) = unwrap_union(&system["x-opt-enqueued-time"]) else {
            panic!("x-opt-enqueued-time is not a long")
        };
        assert_eq!(*ms / 1000, enqueued.timestamp());
        assert_eq!(text(&map(&record["Properties"])["alert"]), "high");
        assert_eq!(body(record), sent[i].as_bytes());
    }
    hub.stop().await;
}

/// The layout of a file's path under `root`: each number replaced by as many `#`, so
/// `simdevice/localhost/0/2024/03/04/05/06/07.avro` is `simdevice/localhost/#/####/##/##/##/##/##.avro`.
fn layout(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap();
    rel.iter()
        .map(|part| {
            let part = part.to_string_lossy();
            let (stem, ext) = part
                .split_once('.')
                .map_or((&*part, None), |(s, e)| (s, Some(e)));
            let stem = if stem.chars().all(|c| c.is_ascii_digit()) {
                "#".repeat(stem.len())
            } else {
                stem.to_string()
            };
            ext.map_or(stem.clone(), |e| format!("{stem}.{e}"))
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test]
async fn iothub_capture_writes_routing_messages_in_its_layout_without_compression() {
    let out = tempfile::tempdir().unwrap();
    let settings = settings(out.path(), Format::IotHub, Codec::Null, 1);
    let hub = TestHub::start_with(|c| c.capture = Some(settings)).await;
    let sent = send_readings(&hub, 2).await;
    let generation = hub
        .hub
        .state()
        .registry
        .get("d1", |d| d.generation_id.clone())
        .unwrap();
    let files = wait_for_records(out.path(), 2).await;
    assert_eq!(
        layout(out.path(), &files[0].path),
        "localhost/#/####/##/##/##/##"
    );
    // apache-avro writes no `avro.codec` for null, which the Avro spec reads as null.
    assert_eq!(files[0].codec.as_deref().unwrap_or("null"), "null");
    let apache_avro::Schema::Record(schema) = &files[0].schema else {
        panic!("schema is not a record")
    };
    assert_eq!(
        schema.name.fullname(None),
        "Microsoft.Azure.Devices.Message"
    );
    let records: Vec<_> = files.iter().flat_map(|f| f.records.iter()).collect();
    for (i, record) in records.iter().enumerate() {
        let enqueued = text(&record["EnqueuedTimeUtc"]);
        // ISO 8601, seven fractional digits, UTC.
        assert_eq!(
            enqueued.len(),
            "2018-06-11T00:00:08.2250000Z".len(),
            "{enqueued}"
        );
        chrono::DateTime::parse_from_rfc3339(enqueued).unwrap();
        let system = map(&record["SystemProperties"]);
        assert_eq!(text(&system["connectionDeviceId"]), "d1");
        assert_eq!(text(&system["connectionDeviceGenerationId"]), generation);
        let auth: serde_json::Value =
            serde_json::from_str(text(&system["connectionAuthMethod"])).unwrap();
        assert_eq!(auth["type"], "sas");
        assert_eq!(text(&system["enqueuedTime"]), enqueued);
        assert_eq!(text(&system["contentType"]), "application/json");
        assert_eq!(text(&system["contentEncoding"]), "utf-8");
        assert_eq!(text(&map(&record["Properties"])["alert"]), "high");
        assert_eq!(body(record), sent[i].as_bytes());
    }
    hub.stop().await;
}

#[tokio::test]
async fn stopping_the_hub_writes_the_open_window() {
    let out = tempfile::tempdir().unwrap();
    let settings = settings(out.path(), Format::EventHubs, Codec::Deflate, 300);
    let hub = TestHub::start_with(|c| c.capture = Some(settings)).await;
    let sent = send_readings(&hub, 2).await;
    assert!(files(out.path()).is_empty(), "the window is still open");
    hub.stop().await;
    let files = wait_for_records(out.path(), 2).await;
    assert_eq!(files.len(), 1);
    let bodies: Vec<Vec<u8>> = files[0].records.iter().map(body).collect();
    assert_eq!(bodies, [sent[0].as_bytes(), sent[1].as_bytes()]);
}

// --- the binary ---------------------------------------------------------------------------

fn hub_binary(state: &Path, capture: &Path, window_secs: u64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_simdevice"))
        .args([
            "hub",
            "--mqtt-port",
            "0",
            "--api-port",
            "0",
            "--auto-register",
        ])
        .arg("--state-dir")
        .arg(state)
        .arg("--capture")
        .arg(capture)
        .args(["--capture-window-secs", &window_secs.to_string()])
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("SIMDEVICE_HUB_GROUP_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the hub binary starts")
}

/// Waits for the child's `hub.json` (written after both listeners are bound); `previous` is
/// the one of an earlier run, which a restart replaces.
fn wait_for_info(state: &Path, child: &mut Child, previous: Option<&HubInfo>) -> HubInfo {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(info) = HubInfo::read(state) {
            if previous != Some(&info) {
                return info;
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the hub exited early: {status}");
        }
        assert!(Instant::now() < deadline, "no hub.json");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connects device `id` to the hub `info` describes (auto-registered by the group key) and
/// sends `readings`, each acknowledged.
async fn send_to(info: &HubInfo, id: &str, readings: &[String]) {
    let group = info.group_key.as_deref().expect("auto-register is on");
    let key = simdevice::protocol::sas::derive_device_key(group, id).unwrap();
    let ca = std::fs::read_to_string(&info.ca_file).unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], info.mqtt_port));
    let mut device = RawDevice::open_at(addr, tls_connector_for(&ca)).await;
    device
        .send(rumqttc::Packet::Connect(connect_packet(
            id,
            &device_token(id, &key),
            true,
            60,
        )))
        .await;
    match device.recv().await {
        Some(rumqttc::Packet::ConnAck(ack)) => {
            assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let topic = format!("devices/{id}/messages/events/");
    for reading in readings {
        device.publish_acked(&topic, reading.clone()).await;
    }
}

fn readings(from: usize, to: usize) -> Vec<String> {
    (from..to)
        .map(|n| format!(r#"{{"id":"d1","n":{n}}}"#))
        .collect()
}

#[tokio::test]
async fn after_sigkill_mid_window_every_acknowledged_reading_is_in_exactly_one_file() {
    let root = tempfile::tempdir().unwrap();
    let (state, out) = (root.path().join("state"), root.path().join("capture"));
    let mut first = hub_binary(&state, &out, 300);
    let info = wait_for_info(&state, &mut first, None);
    let before = readings(0, 20);
    send_to(&info, "d1", &before).await;
    // SIGKILL in the middle of a 300 s window: nothing is published yet.
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(
        files(&out).is_empty(),
        "no file before the window closed: {:?}",
        files(&out)
    );

    let mut second = hub_binary(&state, &out, 1);
    let info = wait_for_info(&state, &mut second, Some(&info));
    let after = readings(20, 25);
    send_to(&info, "d1", &after).await;
    let files = wait_for_records(&out, 25).await;
    let mut got: Vec<Vec<u8>> = files
        .iter()
        .flat_map(|f| f.records.iter().map(body))
        .collect();
    // The recovered readings and the new ones close in one window: a reading replayed twice
    // would be in that same file.
    assert_eq!(got.len(), 25, "a reading was captured twice");
    let mut sequence: Vec<i64> = files
        .iter()
        .flat_map(|f| f.records.iter())
        .map(|r| match r["SequenceNumber"] {
            Value::Long(n) => n,
            _ => panic!("SequenceNumber is not a long"),
        })
        .collect();
    sequence.sort();
    sequence.dedup();
    assert_eq!(sequence.len(), 25, "sequence numbers are unique");
    got.sort();
    let mut want: Vec<Vec<u8>> = before
        .iter()
        .chain(&after)
        .map(|r| r.as_bytes().to_vec())
        .collect();
    want.sort();
    assert_eq!(got, want);
    second.kill().unwrap();
    second.wait().unwrap();
}

#[tokio::test]
async fn routing_json_encoding_writes_one_json_object_a_line() {
    let out = tempfile::tempdir().unwrap();
    let settings = CaptureSettings {
        encoding: Encoding::Json,
        ..settings(out.path(), Format::IotHub, Codec::Deflate, 1)
    };
    let hub = TestHub::start_with(|c| c.capture = Some(settings)).await;
    assert_eq!(
        HubInfo::read(hub.dir.path())
            .unwrap()
            .capture
            .unwrap()
            .encoding,
        "json"
    );
    let sent = send_readings(&hub, 3).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let lines: Vec<serde_json::Value> = loop {
        let lines: Vec<serde_json::Value> = files(out.path())
            .iter()
            .flat_map(|p| {
                std::fs::read_to_string(p)
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        if lines.len() >= 3 {
            break lines;
        }
        assert!(Instant::now() < deadline, "{} of 3 lines", lines.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let files = files(out.path());
    assert!(
        files[0]
            .strip_prefix(out.path())
            .unwrap()
            .starts_with(format!(
                "localhost/{}",
                simdevice::hub::events::partition_of("d1", 4)
            )),
        "{files:?}"
    );
    for (line, reading) in lines.iter().zip(&sent) {
        // application/json in utf-8: the body is the JSON itself.
        let body: serde_json::Value = serde_json::from_str(reading).unwrap();
        assert_eq!(line["Body"], body, "{line}");
        assert_eq!(line["SystemProperties"]["connectionDeviceId"], "d1");
        assert_eq!(line["SystemProperties"]["contentType"], "application/json");
        assert_eq!(line["Properties"]["alert"], "high");
        assert!(
            line["EnqueuedTimeUtc"].as_str().unwrap().ends_with('Z'),
            "{line}"
        );
    }
    hub.stop().await;
}

#[tokio::test]
async fn sigterm_writes_the_open_window_before_the_hub_exits() {
    let root = tempfile::tempdir().unwrap();
    let (state, out) = (root.path().join("state"), root.path().join("capture"));
    let mut hub = hub_binary(&state, &out, 300);
    let info = wait_for_info(&state, &mut hub, None);
    let sent = readings(0, 3);
    send_to(&info, "d1", &sent).await;
    let pid = hub.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    assert_eq!(hub.wait().unwrap().code(), Some(0));
    let files = wait_for_records(&out, 3).await;
    // One file per partition (empty archives are written by default, as on Azure); d1's
    // partition has the readings.
    assert_eq!(files.len(), 4);
    let with_records: Vec<_> = files.iter().filter(|f| !f.records.is_empty()).collect();
    assert_eq!(with_records.len(), 1);
    let got: Vec<Vec<u8>> = with_records[0].records.iter().map(body).collect();
    let want: Vec<Vec<u8>> = sent.iter().map(|r| r.as_bytes().to_vec()).collect();
    assert_eq!(got, want);
}

#[test]
fn unusable_containers_are_refused_at_start_with_exit_78() {
    for (dest, reason) in [
        (
            "azure://telemetry",
            "AZURE_STORAGE_CONNECTION_STRING is not set",
        ),
        (
            "https://account.blob.core.windows.net/c1x",
            "carries no SAS",
        ),
        (
            "http://account.blob.core.windows.net/c1x?sv=x&sig=SECRETSIG",
            "only for a loopback emulator",
        ),
        ("ftp://host/x", "not a destination this hub knows"),
    ] {
        refused_at_start(&["--capture", dest], reason);
    }
    refused_at_start(
        &["--capture", "/tmp/x", "--capture-encoding", "json"],
        "add --capture-format iothub",
    );
}

/// `simdevice hub ARGS` exits 78 before it starts, saying `reason`, never the SAS.
fn refused_at_start(args: &[&str], reason: &str) {
    let dest = args.join(" ");
    let state = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_simdevice"))
        .args(["hub", "--mqtt-port", "0", "--api-port", "0"])
        .args(args)
        .arg("--state-dir")
        .arg(state.path())
        .env_remove("NOTIFY_SOCKET")
        .env_remove("AZURE_STORAGE_CONNECTION_STRING")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78), "{dest}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(reason), "{dest}: {stderr}");
    assert!(!stderr.contains("SECRETSIG"), "{dest}: {stderr}");
    assert!(
        !state.path().join("hub.json").exists(),
        "refused before the hub starts"
    );
}

/// The value of an unlabelled sample in a Prometheus text exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_count_written_files_and_pending_messages() {
    use simdevice::common::exposition;
    use simdevice::hub::metrics::HubMetrics;
    use tokio_util::sync::CancellationToken;

    let out = tempfile::tempdir().unwrap();
    let settings = settings(out.path(), Format::EventHubs, Codec::Deflate, 1);
    let hub = TestHub::start_with(|c| c.capture = Some(settings)).await;
    let stop = CancellationToken::new();
    let addr = exposition::serve(
        "127.0.0.1:0".parse().unwrap(),
        std::sync::Arc::new(HubMetrics {
            state: hub.hub.state().clone(),
            stopping: stop.clone(),
        }),
        stop.clone(),
    )
    .await
    .unwrap()
    .local_addr;
    let scrape = || async {
        reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let before = scrape().await;
    assert_eq!(
        sample(&before, "simdevice_hub_capture_files_total"),
        Some(0.0)
    );
    send_readings(&hub, 2).await;
    wait_for_records(out.path(), 2).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = scrape().await;
        let files = sample(&text, "simdevice_hub_capture_files_total").unwrap();
        let pending = sample(&text, "simdevice_hub_capture_pending_events").unwrap();
        if files >= 1.0 && pending == 0.0 {
            assert_eq!(
                sample(&text, "simdevice_hub_capture_errors_total"),
                Some(0.0)
            );
            assert_eq!(
                sample(&text, "simdevice_hub_capture_refused_total"),
                Some(0.0)
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "files {files}, pending {pending}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    hub.stop().await;
}
