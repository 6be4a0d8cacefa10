//! `simdevice archive to-csv`, the binary on archives written here with apache-avro and the
//! documented schemas: Event Hubs Capture (`EventData`, union-typed maps, Body `["null",
//! "bytes"]`) and IoT Hub routing (`Message`, string maps), both codecs, laid out in Capture's
//! and routing's paths; and the bad input a reader meets (an empty file, a truncated one, wrong
//! magic, a Body that is null, not JSON, or without `id`). What is checked is what the user
//! gets: the CSV files, the messages on stderr, the exit code, and which files `--delete`
//! removes.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use apache_avro::schema::Schema;
use apache_avro::types::Value;
use apache_avro::{Codec, DeflateSettings, Writer};

/// Microsoft's "Explore captured Avro files" page (avro-tools getschema of a Capture file).
const CAPTURE_SCHEMA: &str = r#"{"type":"record","name":"EventData","namespace":"Microsoft.ServiceBus.Messaging","fields":[
    {"name":"SequenceNumber","type":"long"},
    {"name":"Offset","type":"string"},
    {"name":"EnqueuedTimeUtc","type":"string"},
    {"name":"SystemProperties","type":{"type":"map","values":["long","double","string","bytes"]}},
    {"name":"Properties","type":{"type":"map","values":["long","double","string","bytes"]}},
    {"name":"Body","type":["null","bytes"]}]}"#;

/// IoT Hub message routing to a storage endpoint.
const ROUTING_SCHEMA: &str = r#"{"type":"record","name":"Message","namespace":"Microsoft.Azure.Devices","fields":[
    {"name":"EnqueuedTimeUtc","type":"string"},
    {"name":"Properties","type":{"type":"map","values":"string"}},
    {"name":"SystemProperties","type":{"type":"map","values":"string"}},
    {"name":"Body","type":["null","bytes"]}]}"#;

fn simdevice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_simdevice"))
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("AZURE_STORAGE_CONNECTION_STRING")
        .output()
        .expect("simdevice runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn deflate() -> Codec {
    Codec::Deflate(DeflateSettings::default())
}

/// A Capture record as IoT Hub's built-in endpoint has them: the device id a string of the
/// union, the enqueued time a long of it, an application property as bytes.
fn capture_record(seq: i64, device: &str, body: Option<&str>) -> Value {
    let union = |i, v| Value::Union(i, Box::new(v));
    let system = HashMap::from([
        (
            "iothub-connection-device-id".to_owned(),
            union(2, Value::String(device.into())),
        ),
        (
            "x-opt-enqueued-time".to_owned(),
            union(0, Value::Long(1_638_456_000_000 + seq)),
        ),
        ("x-opt-weight".to_owned(), union(1, Value::Double(0.5))),
    ]);
    let properties = HashMap::from([("note".to_owned(), union(3, Value::Bytes(b"n".to_vec())))]);
    Value::Record(vec![
        ("SequenceNumber".into(), Value::Long(seq)),
        ("Offset".into(), Value::String((seq * 1000).to_string())),
        (
            "EnqueuedTimeUtc".into(),
            Value::String("12/2/2021 2:58:24 PM".into()),
        ),
        ("SystemProperties".into(), Value::Map(system)),
        ("Properties".into(), Value::Map(properties)),
        (
            "Body".into(),
            match body {
                None => union(0, Value::Null),
                Some(text) => union(1, Value::Bytes(text.as_bytes().to_vec())),
            },
        ),
    ])
}

fn routing_record(device: &str, body: &str) -> Value {
    let system = HashMap::from([
        (
            "connectionDeviceId".to_owned(),
            Value::String(device.into()),
        ),
        (
            "connectionAuthMethod".to_owned(),
            Value::String(r#"{"scope":"device","type":"sas","issuer":"iothub"}"#.into()),
        ),
        (
            "enqueuedTime".to_owned(),
            Value::String("2018-06-11T00:00:08.2250000Z".into()),
        ),
    ]);
    Value::Record(vec![
        (
            "EnqueuedTimeUtc".into(),
            Value::String("2018-06-11T00:00:08.2250000Z".into()),
        ),
        ("Properties".into(), Value::Map(HashMap::new())),
        ("SystemProperties".into(), Value::Map(system)),
        (
            "Body".into(),
            Value::Union(1, Box::new(Value::Bytes(body.as_bytes().to_vec()))),
        ),
    ])
}

/// The container file's bytes; `flush_each` puts every record in a block of its own.
fn avro_bytes(schema: &str, codec: Codec, records: Vec<Value>, flush_each: bool) -> Vec<u8> {
    let schema = Schema::parse_str(schema).unwrap();
    let mut writer = Writer::with_codec(&schema, Vec::new(), codec).unwrap();
    for record in records {
        writer.append_value(record).unwrap();
        if flush_each {
            writer.flush().unwrap();
        }
    }
    writer.into_inner().unwrap()
}

fn put(root: &Path, relative: &str, bytes: &[u8]) {
    let path = root.join(relative);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn reading(id: &str, n: u32) -> String {
    format!(
        r#"{{"humidity": {h}, "id": "{id}", "temperature": {t}, "timestamp": "2021-12-02T14:58:{n:02}Z", "uv": {n}, "site": "roof, north"}}"#,
        h = 40 + n,
        t = 20.5 + f64::from(n),
    )
}

fn row(id: &str, n: u32) -> String {
    format!(
        "{id},2021-12-02T14:58:{n:02}Z,{n},{t},{h},\"roof, north\"\n",
        h = 40 + n,
        t = 20.5 + f64::from(n)
    )
}

const HEADER: &str = "id,timestamp,uv,temperature,humidity,site\n";

#[test]
fn capture_and_routing_files_both_codecs_become_one_csv_per_id_in_time_order() {
    let source = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    // Capture, two partitions: partition 1's file is earlier than partition 0's second one,
    // so time order (not path order) puts reading 2 before reading 3.
    put(
        source.path(),
        "ns/hub/0/2021/12/02/14/58/00.avro",
        &avro_bytes(
            CAPTURE_SCHEMA,
            deflate(),
            vec![
                capture_record(1, "dev-a", Some(&reading("sensor-a", 1))),
                capture_record(2, "dev-b", Some(&reading("sensor-b", 1))),
            ],
            false,
        ),
    );
    put(
        source.path(),
        "ns/hub/0/2021/12/02/14/59/00.avro",
        &avro_bytes(
            CAPTURE_SCHEMA,
            Codec::Null,
            vec![capture_record(3, "dev-a", Some(&reading("sensor-a", 3)))],
            false,
        ),
    );
    put(
        source.path(),
        "ns/hub/1/2021/12/02/14/58/30.avro",
        &avro_bytes(
            CAPTURE_SCHEMA,
            Codec::Null,
            vec![capture_record(1, "dev-a", Some(&reading("sensor-a", 2)))],
            false,
        ),
    );
    // Capture's empty window: an empty file.
    put(source.path(), "ns/hub/1/2021/12/02/14/59/30.avro", b"");
    // Routing to storage, deflate, later still.
    put(
        source.path(),
        "iothub/0/2021/12/02/15/00.avro",
        &avro_bytes(
            ROUTING_SCHEMA,
            deflate(),
            vec![routing_record("dev-b", &reading("sensor-b", 4))],
            false,
        ),
    );

    let output = simdevice(&[
        "archive",
        "to-csv",
        source.path().to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(0), "{err}");
    assert!(
        err.contains("4 files read, 5 rows written, 0 records skipped, 1 empty files"),
        "{err}"
    );
    assert_eq!(
        read(&out.path().join("sensor-a.csv")),
        format!(
            "{HEADER}{}{}{}",
            row("sensor-a", 1),
            row("sensor-a", 2),
            row("sensor-a", 3)
        )
    );
    assert_eq!(
        read(&out.path().join("sensor-b.csv")),
        format!("{HEADER}{}{}", row("sensor-b", 1), row("sensor-b", 4))
    );
    // Nothing deleted without --delete.
    assert!(source
        .path()
        .join("ns/hub/0/2021/12/02/14/58/00.avro")
        .exists());

    // A second run appends under the existing header (no second header).
    let again = simdevice(&[
        "archive",
        "to-csv",
        source.path().to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    let b = read(&out.path().join("sensor-b.csv"));
    assert_eq!(b.matches("id,timestamp").count(), 1, "{b}");
    assert_eq!(b.lines().count(), 5, "{b}");
}

#[test]
fn by_device_groups_on_the_system_properties_device_id_with_safe_file_names() {
    let source = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    put(
        source.path(),
        "ns/hub/0/2021/12/02/14/58/00.avro",
        &avro_bytes(
            CAPTURE_SCHEMA,
            deflate(),
            vec![
                capture_record(1, "../escape", Some(&reading("x", 1))),
                capture_record(2, "plain-dev", Some(r#"{"uv": 3}"#)),
            ],
            false,
        ),
    );
    let output = simdevice(&[
        "archive",
        "to-csv",
        source.path().to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
        "--by",
        "device",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let mut names: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["%2E%2E%2Fescape.csv", "plain-dev.csv"]);
    // A reading without `id` is fine when grouping by device.
    assert_eq!(read(&out.path().join("plain-dev.csv")), "uv\n3\n");
}

#[test]
fn bad_files_and_records_are_reported_skipped_and_the_rest_is_written() {
    let source = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    // One good file with bad records among good ones.
    put(
        source.path(),
        "ns/hub/0/2021/12/02/14/58/00.avro",
        &avro_bytes(
            CAPTURE_SCHEMA,
            deflate(),
            vec![
                capture_record(1, "d", Some(&reading("good", 1))),
                capture_record(2, "d", None),
                capture_record(3, "d", Some("temperature=21")),
                capture_record(4, "d", Some(r#"{"uv": 1}"#)),
                capture_record(5, "d", Some(&reading("good", 5))),
            ],
            false,
        ),
    );
    // Wrong magic.
    put(
        source.path(),
        "ns/hub/0/2021/12/02/14/59/00.avro",
        b"PK\x03\x04this is a zip",
    );
    // Truncated: three blocks of one record, cut inside the last.
    let whole = avro_bytes(
        CAPTURE_SCHEMA,
        Codec::Null,
        vec![
            capture_record(6, "d", Some(&reading("good", 6))),
            capture_record(7, "d", Some(&reading("good", 7))),
            capture_record(8, "d", Some(&reading("good", 8))),
        ],
        true,
    );
    let truncated = "ns/hub/0/2021/12/02/15/00/00.avro";
    put(source.path(), truncated, &whole[..whole.len() - 40]);
    // A later good file: the run goes on past the broken ones.
    put(
        source.path(),
        "ns/hub/0/2021/12/02/15/01/00.avro",
        &avro_bytes(
            CAPTURE_SCHEMA,
            Codec::Null,
            vec![capture_record(9, "d", Some(&reading("good", 9)))],
            false,
        ),
    );

    let output = simdevice(&[
        "archive",
        "to-csv",
        source.path().to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
        "--delete",
    ]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert_eq!(
        read(&out.path().join("good.csv")),
        format!(
            "{HEADER}{}{}{}{}{}",
            row("good", 1),
            row("good", 5),
            row("good", 6),
            row("good", 7),
            row("good", 9)
        ),
        "{err}"
    );
    let first = source.path().join("ns/hub/0/2021/12/02/14/58/00.avro");
    let first = first.display();
    for (needle, why) in [
        (
            format!("file={first} record=1 reason=Body is null"),
            "null body",
        ),
        (
            format!("file={first} record=2 reason=Body is not JSON"),
            "non-JSON body",
        ),
        (
            format!("file={first} record=3 reason=the reading has no id"),
            "no id",
        ),
        (
            "14/59/00.avro reason=not an Avro object container file: wrong magic".to_owned(),
            "wrong magic",
        ),
        (
            "15/00/00.avro record=2 reason=cannot decode".to_owned(),
            "truncated",
        ),
        (
            "3 files read, 5 rows written, 4 records skipped, 1 unreadable files, 2 files deleted"
                .to_owned(),
            "summary",
        ),
    ] {
        assert!(err.contains(&needle), "{why}: no {needle:?} in\n{err}");
    }
    // --delete removed the files read to their end (bad records and all), and kept the
    // wrong-magic and the truncated ones.
    let left: Vec<_> = ["14/58/00", "14/59/00", "15/00/00", "15/01/00"]
        .iter()
        .map(|t| {
            source
                .path()
                .join(format!("ns/hub/0/2021/12/02/{t}.avro"))
                .exists()
        })
        .collect();
    assert_eq!(left, [false, true, true, false]);
}

#[test]
fn a_column_the_existing_header_lacks_is_dropped_and_reported() {
    let source = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("s.csv"), "id,uv\ns,0\n").unwrap();
    put(
        source.path(),
        "ns/hub/0/2021/12/02/14/58/00.avro",
        &avro_bytes(
            CAPTURE_SCHEMA,
            Codec::Null,
            vec![capture_record(
                1,
                "d",
                Some(r#"{"id":"s","uv":1,"extra":"x"}"#),
            )],
            false,
        ),
    );
    let output = simdevice(&[
        "archive",
        "to-csv",
        source.path().to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert_eq!(read(&out.path().join("s.csv")), "id,uv\ns,0\ns,1\n");
    assert!(err.contains("columns=extra"), "{err}");
    assert!(err.contains("1 values dropped"), "{err}");
}

#[test]
fn a_missing_source_or_an_unusable_container_is_a_configuration_error() {
    let out = tempfile::tempdir().unwrap();
    let out = out.path().to_str().unwrap();
    let missing = simdevice(&["archive", "to-csv", "/nonexistent/archive", "--out", out]);
    assert_eq!(missing.status.code(), Some(78));
    assert!(
        stderr(&missing).contains("source /nonexistent/archive"),
        "{}",
        stderr(&missing)
    );

    for (source, reason) in [
        (
            "azure://capture",
            "AZURE_STORAGE_CONNECTION_STRING is not set",
        ),
        (
            "https://acct.blob.core.windows.net/capture",
            "carries no SAS",
        ),
        (
            "http://acct.blob.core.windows.net/capture?sv=2022&sig=SECRETSIG",
            "only for a loopback emulator",
        ),
        ("azure://Not_A_Container", "is not a container name"),
    ] {
        let output = simdevice(&["archive", "to-csv", source, "--out", out]);
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(78), "{err}");
        assert!(err.contains(reason), "{source}: {err}");
        assert!(!err.contains("SECRETSIG"), "the SAS is printed: {err}");
    }
}

#[test]
fn help_documents_the_exit_status() {
    let output = simdevice(&["archive", "to-csv", "--help"]);
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(help.contains("Exit status: 0 when everything was converted; 1 when something"));
}
