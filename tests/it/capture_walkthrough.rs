//! Scenario 1, the Event Hubs Capture walkthrough, end to end through the binary: a hub that
//! captures (short windows) -> the walkthrough's sender (`simdevice fleet --count 10
//! --messages 20 --interval-secs 0`) -> `simdevice archive to-csv` -> ten CSV files of twenty
//! rows each, whose values are the readings the hub received. Once to a directory, once to a
//! Blob Storage container in Azurite (with `--delete`, as the walkthrough's reader does).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::common::agent::eventually;
use crate::common::azurite::Azurite;
use crate::common::isolated;

const BIN: &str = env!("CARGO_BIN_EXE_simdevice");

fn command() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(BIN);
    isolated(&mut command).env("RUST_LOG", "warn");
    command
}

/// The CSV rows of one file, as maps from the header's names.
fn rows(path: &std::path::Path) -> Vec<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .expect("a header")
        .split(',')
        .map(str::to_string)
        .collect();
    lines
        .map(|line| {
            header
                .iter()
                .cloned()
                .zip(line.split(',').map(str::to_string))
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn the_capture_walkthrough_runs_end_to_end_on_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let capture = dir.path().join("capture");
    walkthrough(dir.path(), capture.to_str().unwrap(), &[], false).await;
}

#[tokio::test]
async fn the_capture_walkthrough_runs_end_to_end_in_azurite() {
    let dir = tempfile::tempdir().unwrap();
    let azurite = Azurite::start(&dir.path().join("azurite"));
    azurite.container_sas_url("capture"); // makes the container
    let env = [(
        "AZURE_STORAGE_CONNECTION_STRING",
        azurite.connection_string(),
    )];
    walkthrough(dir.path(), "azure://capture/walkthrough", &env, true).await;
    // --delete: each blob went once its rows were written.
    assert_eq!(azurite.blobs("capture"), Vec::<String>::new());
}

/// The walkthrough with capture to `dest` (also the reader's source), `env` given to the hub
/// and the reader.
async fn walkthrough(dir: &std::path::Path, dest: &str, env: &[(&str, String)], delete: bool) {
    let state = dir.join("hub");
    let out = dir.join("csv");
    let mut hub = command()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args([
            "hub",
            "--auto-register",
            "--mqtt-port",
            "0",
            "--api-port",
            "0",
        ])
        .arg("--state-dir")
        .arg(&state)
        .args(["--capture", dest])
        .args(["--capture-window-secs", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the hub starts");
    let info: Value = eventually(Duration::from_secs(20), || async {
        serde_json::from_slice(&std::fs::read(state.join("hub.json")).ok()?).ok()
    })
    .await;
    assert_eq!(info["capture"]["format"], "eventhubs", "{info}");

    let sender = command()
        .args(["fleet", "--local", "--count", "10", "--messages", "20"])
        .args(["--interval-secs", "0", "--connect-rate", "0", "--seed", "1"])
        .arg("--state-dir")
        .arg(&state)
        .output();
    let sender = tokio::time::timeout(Duration::from_secs(60), sender)
        .await
        .expect("the sender ends")
        .unwrap();
    assert!(
        sender.status.success(),
        "{}",
        String::from_utf8_lossy(&sender.stderr)
    );
    let report: Value = serde_json::from_slice(&sender.stdout).unwrap();
    assert_eq!(report["readings_acknowledged"], 200);

    // What the hub received, per device and seq: what the CSV rows must say.
    let mut sent: BTreeMap<(String, u64), Value> = BTreeMap::new();
    for n in 1..=10 {
        let id = format!("door-{n:02}");
        let events = command()
            .args(["service", "--local", "events", &id])
            .arg("--state-dir")
            .arg(&state)
            .output()
            .await
            .unwrap();
        assert!(
            events.status.success(),
            "{}",
            String::from_utf8_lossy(&events.stderr)
        );
        let events: Value = serde_json::from_slice(&events.stdout).unwrap();
        for event in events.as_array().unwrap() {
            let body = event["body"].clone();
            sent.insert((id.clone(), body["seq"].as_u64().unwrap()), body);
        }
    }
    assert_eq!(sent.len(), 200);

    // The hub closes the open window at SIGTERM: every reading is in a file then.
    let pid = hub.id().expect("running") as i32;
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(Duration::from_secs(20), hub.wait())
        .await
        .expect("the hub stops")
        .unwrap();
    assert!(status.success(), "hub exit {status}");

    let mut archive = command();
    archive
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(["archive", "to-csv", dest])
        .arg("--out")
        .arg(&out);
    if delete {
        archive.arg("--delete");
    }
    let archive = archive.output().await.unwrap();
    assert!(
        archive.status.success(),
        "{}",
        String::from_utf8_lossy(&archive.stderr)
    );
    let mut files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 10, "{files:?}");
    for path in &files {
        let rows = rows(path);
        assert_eq!(rows.len(), 20, "{}", path.display());
        let id = path.file_stem().unwrap().to_str().unwrap();
        let mut seqs: Vec<u64> = rows.iter().map(|r| r["seq"].parse().unwrap()).collect();
        seqs.sort();
        assert_eq!(
            seqs,
            (1..=20).collect::<Vec<_>>(),
            "{id}: every reading once"
        );
        for row in &rows {
            assert_eq!(row["id"], id);
            let body = &sent[&(id.to_string(), row["seq"].parse().unwrap())];
            for field in ["timestamp", "temperature", "humidity", "uv"] {
                let expected = match &body[field] {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                assert_eq!(row[field], expected, "{id} {field}: {row:?} vs {body}");
            }
        }
    }
}
