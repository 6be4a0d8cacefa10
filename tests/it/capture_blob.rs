//! Capture to Azure Blob Storage, against Azurite (the official emulator, started here): a
//! container named `azure://` with the account's connection string, and an `https://` container
//! URL with a SAS made by the official Blob SDK; storage going down while devices send, and
//! coming back. Read back with `simdevice archive to-csv` from the same container.

use std::process::Stdio;
use std::time::Duration;

use simdevice::common::blob::{self, Location};
use simdevice::hub::capture::{CaptureSettings, Codec, Destination, Encoding, Format};

use crate::common::agent::eventually;
use crate::common::azurite::Azurite;
use crate::common::{isolated, RawDevice, TestHub};

const BIN: &str = env!("CARGO_BIN_EXE_simdevice");
const TELEMETRY: &str = "devices/d1/messages/events/$.ct=application%2Fjson&$.ce=utf-8";

fn container(dest: &str, connection_string: &str) -> Destination {
    match blob::parse(dest, Some(connection_string)).unwrap() {
        Location::Container(container) => Destination::Container(container),
        Location::Directory(_) => panic!("a container"),
    }
}

/// `simdevice archive to-csv SOURCE --out OUT --delete` with `env`; the CSV rows per file.
async fn read_back(
    source: &str,
    env: &[(&str, String)],
    out: &std::path::Path,
) -> (std::process::Output, Vec<String>) {
    let output = isolated(&mut tokio::process::Command::new(BIN))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(["archive", "to-csv", source, "--delete"])
        .arg("--out")
        .arg(out)
        .output()
        .await
        .unwrap();
    let mut rows = Vec::new();
    if let Ok(entries) = std::fs::read_dir(out) {
        for entry in entries {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            rows.extend(text.lines().skip(1).map(str::to_string));
        }
    }
    rows.sort();
    (output, rows)
}

#[tokio::test]
async fn capture_to_an_https_container_url_with_a_sas_and_read_back_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let azurite = Azurite::start_https(&dir.path().join("azurite"));
    let url = azurite.container_sas_url("telemetry");
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let ca = azurite.ca_file.clone().unwrap();
    // The hub and the reader trust Azurite's CA as any rustls client on Linux can be told to.
    let env = [("SSL_CERT_FILE", ca.display().to_string())];
    let state = dir.path().join("hub");
    let mut hub = isolated(&mut tokio::process::Command::new(BIN))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
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
        .args(["--capture", &url, "--capture-format", "iothub"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let info: serde_json::Value = eventually(Duration::from_secs(20), || async {
        serde_json::from_slice(&std::fs::read(state.join("hub.json")).ok()?).ok()
    })
    .await;
    let dest = info["capture"]["dest"].as_str().unwrap();
    assert!(
        !dest.contains("sig="),
        "hub.json names the container, not its SAS: {dest}"
    );
    let sender = isolated(&mut tokio::process::Command::new(BIN))
        .args(["fleet", "--local", "--count", "3", "--messages", "4"])
        .args(["--interval-secs", "0", "--connect-rate", "0"])
        .arg("--state-dir")
        .arg(&state)
        .output()
        .await
        .unwrap();
    assert!(
        sender.status.success(),
        "{}",
        String::from_utf8_lossy(&sender.stderr)
    );
    let pid = hub.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(Duration::from_secs(30), hub.wait())
        .await
        .unwrap()
        .unwrap();
    let stderr = {
        use tokio::io::AsyncReadExt;
        let mut text = String::new();
        hub.stderr
            .take()
            .unwrap()
            .read_to_string(&mut text)
            .await
            .unwrap();
        text
    };
    assert!(status.success(), "hub exit {status}: {stderr}");
    assert!(!stderr.contains("sig="), "the SAS is logged: {stderr}");

    let blobs = azurite.blobs("telemetry");
    assert!(
        !blobs.is_empty()
            && blobs.iter().all(|b| b.starts_with("localhost/")
                && b.split('/')
                    .nth(1)
                    .is_some_and(|p| p.parse::<u32>().is_ok())),
        "{blobs:?}"
    );
    let out = dir.path().join("csv");
    let (output, rows) = read_back(&url, &env, &out).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(rows.len(), 12, "3 devices x 4 readings: {rows:?}");
    assert_eq!(azurite.blobs("telemetry"), Vec::<String>::new(), "--delete");
}

#[tokio::test]
async fn storage_down_is_retried_with_the_messages_kept_and_published_when_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut azurite = Azurite::start(&dir.path().join("azurite"));
    azurite.container_sas_url("capture");
    let connection_string = azurite.connection_string();
    let settings = CaptureSettings {
        destination: container("azure://capture", &connection_string),
        format: Format::EventHubs,
        codec: Codec::Deflate,
        encoding: Encoding::Avro,
        window: Duration::from_secs(1),
        window_bytes: 314_572_800,
        skip_empty: true,
    };
    let hub = TestHub::start_with(|c| c.capture = Some(settings)).await;
    let intake = hub.hub.state().capture.clone().unwrap();
    let counters = intake.counters.clone();
    let key = hub.add_device("d1");
    let mut device = RawDevice::connect(&hub, "d1", &key).await;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    for n in 0..3 {
        device
            .publish_acked(TELEMETRY, format!(r#"{{"id":"d1","n":{n}}}"#))
            .await;
    }
    eventually(Duration::from_secs(30), || async {
        (load(&counters.files) >= 1 && intake.pending() == 0).then_some(())
    })
    .await;

    azurite.stop();
    for n in 3..6 {
        // Acknowledged while storage is down: the buffer holds them.
        device
            .publish_acked(TELEMETRY, format!(r#"{{"id":"d1","n":{n}}}"#))
            .await;
    }
    eventually(Duration::from_secs(30), || async {
        (load(&counters.errors) >= 2).then_some(())
    })
    .await;
    assert_eq!(intake.pending(), 3, "kept, not dropped");
    assert_eq!(load(&counters.refused), 0);

    azurite.restart();
    eventually(Duration::from_secs(30), || async {
        (intake.pending() == 0).then_some(())
    })
    .await;
    hub.stop().await;

    let env = [("AZURE_STORAGE_CONNECTION_STRING", connection_string)];
    let (output, rows) = read_back("azure://capture", &env, &dir.path().join("csv")).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ns: Vec<&str> = rows.iter().map(|r| r.rsplit(',').next().unwrap()).collect();
    let mut ns: Vec<u32> = ns.iter().map(|n| n.parse().unwrap()).collect();
    ns.sort();
    assert_eq!(
        ns,
        (0..6).collect::<Vec<_>>(),
        "every reading once: {rows:?}"
    );
}
