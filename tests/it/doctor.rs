//! `simdevice doctor` as a user runs it, against the in-process hub: every check passes with
//! the right configuration; a wrong key, a closed port, a wrong CA or a readable key file each
//! fail at their own check with a hint; the exit code says whether anything failed; the key
//! never appears in the output.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use crate::common::agent::identity_toml;
use crate::common::*;

struct Outcome {
    code: i32,
    stdout: String,
}

async fn doctor(config: &Path, state_dir: &Path) -> Outcome {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_simdevice"))
        .arg("doctor")
        .arg("--config")
        .arg(config)
        .arg("--state-dir")
        .arg(state_dir)
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.is_empty(), "{stderr}");
    Outcome {
        code: output.status.code().unwrap(),
        stdout: String::from_utf8(output.stdout).unwrap(),
    }
}

/// A configuration with this key, MQTT port and CA; mode 0600.
fn write_config(dir: &Path, key: &str, port: u16, ca: &Path) -> PathBuf {
    let path = dir.join("agent.toml");
    let text = identity_toml("d1", key, port, ca);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The line of check `name`, asserting its tag.
fn line<'a>(out: &'a Outcome, tag: &str, name: &str) -> &'a str {
    let prefix = format!("{tag} {name}: ");
    out.stdout
        .lines()
        .find(|l| l.replace("[ok]  ", "[ok]").starts_with(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{}", out.stdout))
}

/// The hint printed under check `name`.
fn hint<'a>(out: &'a Outcome, name: &str) -> &'a str {
    let mut lines = out.stdout.lines();
    lines
        .find(|l| l.contains(&format!(" {name}: ")))
        .expect("the check's line");
    lines
        .next()
        .and_then(|l| l.trim().strip_prefix("hint: "))
        .unwrap_or_else(|| panic!("no hint under {name} in:\n{}", out.stdout))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_check_passes_against_a_working_hub() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let ca = hub.hub.info().ca_file.clone();
    let config = write_config(hub.dir.path(), &key, hub.hub.mqtt_addr().port(), &ca);

    let out = doctor(&config, hub.dir.path()).await;
    assert_eq!(out.code, 0, "{}", out.stdout);
    line(&out, "[ok]", "configuration");
    assert!(line(&out, "[ok]", "key storage").contains("(mode 0600)"));
    assert!(line(&out, "[ok]", "DNS").contains("localhost resolves to"));
    line(&out, "[ok]", "TCP");
    let tls = line(&out, "[ok]", "TLS");
    assert!(tls.contains("verified"), "{tls}");
    assert!(tls.contains("valid until 20"), "{tls}");
    // The clock is read from the hub's HTTPS port, named in hub.json.
    let clock = line(&out, "[ok]", "clock");
    let api = format!("https://localhost:{}/", hub.hub.api_addr().port());
    assert!(clock.contains(&api), "{clock}");
    assert!(line(&out, "[ok]", "authentication").contains("CONNACK 0"));
    assert!(
        out.stdout.ends_with("doctor: all 7 checks passed\n"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains(&key));
    assert!(!out.stdout.contains("[FAIL]") && !out.stdout.contains("[warn]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_fails_authentication_with_a_hint() {
    let hub = TestHub::start().await;
    hub.add_device("d1");
    let wrong = "d3Jvbmcta2V5LXdyb25nLWtleQ==";
    let ca = hub.hub.info().ca_file.clone();
    let config = write_config(hub.dir.path(), wrong, hub.hub.mqtt_addr().port(), &ca);

    let out = doctor(&config, hub.dir.path()).await;
    assert_eq!(out.code, 1, "{}", out.stdout);
    line(&out, "[ok]", "TLS");
    let auth = line(&out, "[FAIL]", "authentication");
    assert!(auth.contains("CONNACK 5 (not authorized)"), "{auth}");
    assert!(hint(&out, "authentication").contains("refused the key"));
    assert!(!out.stdout.contains(wrong));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_fails_tcp_and_stops_there() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let ca = hub.hub.info().ca_file.clone();
    let config = write_config(hub.dir.path(), &key, port, &ca);

    let out = doctor(&config, hub.dir.path()).await;
    assert_eq!(out.code, 1, "{}", out.stdout);
    line(&out, "[ok]", "DNS");
    let tcp = line(&out, "[FAIL]", "TCP");
    assert!(
        tcp.contains(&format!("cannot connect to localhost:{port}")),
        "{tcp}"
    );
    assert!(hint(&out, "TCP").contains(&format!("listening on port {port}")));
    assert!(!out.stdout.contains(" TLS: "), "later checks do not run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_ca_fails_tls_with_a_hint() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let other = TestHub::start().await;
    let other_ca = other.hub.info().ca_file.clone();
    let config = write_config(hub.dir.path(), &key, hub.hub.mqtt_addr().port(), &other_ca);

    let out = doctor(&config, hub.dir.path()).await;
    assert_eq!(out.code, 1, "{}", out.stdout);
    line(&out, "[ok]", "TCP");
    let tls = line(&out, "[FAIL]", "TLS");
    assert!(tls.contains("invalid peer certificate"), "{tls}");
    let hint = hint(&out, "TLS");
    assert!(hint.contains("not signed by a trusted CA"), "{hint}");
    assert!(hint.contains("identity.ca_file"), "{hint}");
    assert!(!out.stdout.contains(" authentication: "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_others_can_read_fails_with_chmod() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let dir = hub.dir.path();
    let key_file = dir.join("device.key");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[identity]\nhost_name = \"localhost\"\ndevice_id = \"d1\"\nkey_file = \"{}\"\n\
             gateway_host_name = \"localhost:{}\"\nca_file = \"{}\"\n",
            key_file.display(),
            hub.hub.mqtt_addr().port(),
            hub.hub.info().ca_file.display()
        ),
    )
    .unwrap();

    let out = doctor(&config, dir).await;
    assert_eq!(out.code, 1, "{}", out.stdout);
    line(&out, "[FAIL]", "key file");
    assert_eq!(
        hint(&out, "key file"),
        format!(
            "the file must hold the base64 device key and be readable by its owner only: \
             chmod 600 {}",
            key_file.display()
        )
    );

    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = doctor(&config, dir).await;
    assert_eq!(out.code, 0, "{}", out.stdout);
    let storage = line(&out, "[ok]", "key storage");
    assert!(storage.contains("device.key (mode 0600)"), "{storage}");
    assert!(!out.stdout.contains(&key));
}
