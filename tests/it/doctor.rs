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

/// `simdevice doctor` with `args` after the configuration and state directory.
async fn doctor_with(config: &Path, state_dir: &Path, args: &[&str]) -> Outcome {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_simdevice"));
    crate::common::isolated(&mut command)
        .arg("doctor")
        .arg("--config")
        .arg(config)
        .arg("--state-dir")
        .arg(state_dir)
        .args(args)
        .env_remove("RUST_LOG");
    let output = command.output().await.unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.is_empty(), "{stderr}");
    Outcome {
        code: output.status.code().unwrap(),
        stdout: String::from_utf8(output.stdout).unwrap(),
    }
}

/// A symmetric-key enrollment group `id` on the hub's DPS (`status` enabled or disabled);
/// its key.
async fn enrollment_group(hub: &TestHub, id: &str, status: &str) -> String {
    let service_key = hub.hub.state().dps.service_key().to_string();
    let dps = Service::with_key(hub, "provisioningserviceowner", &service_key, now() + 3600);
    let group_key = simdevice::protocol::sas::generate_key();
    let put = dps
        .call(
            reqwest::Method::PUT,
            &format!("/enrollmentGroups/{id}"),
            Some(serde_json::json!({"provisioningStatus": status,
                "attestation": {"type": "symmetricKey",
                "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}}})),
            &[],
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    group_key
}

/// A `[provisioning]`-only configuration (mode 0600) of `registration_id` with `group_key`,
/// DPS at `dps_port` over `transport`, the assigned hub dialled at the test hub's port for it.
fn write_provisioned_config(
    hub: &TestHub,
    dir: &Path,
    registration_id: &str,
    group_key: &str,
    dps_port: u16,
    transport: &str,
) -> PathBuf {
    let hub_port = match transport {
        "websocket" => hub.hub.ws_addr().port(),
        _ => hub.hub.mqtt_addr().port(),
    };
    let text = format!(
        "[provisioning]\nid_scope = \"{scope}\"\nregistration_id = \"{registration_id}\"\n\
         global_endpoint = \"localhost:{dps_port}\"\nca_file = \"{ca}\"\ngroup_key = \"{group_key}\"\n\
         gateway_host_name = \"localhost:{hub_port}\"\n\
         [connection]\ntransport = \"{transport}\"\n\
         [outbox]\npath = \"{outbox}\"\n",
        scope = hub.hub.info().id_scope.clone().unwrap(),
        ca = hub.hub.info().ca_file.display(),
        outbox = dir.join("outbox.db").display(),
    );
    let path = dir.join("provisioned.toml");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provisioned_device_checks_dps_then_registers_only_when_asked() {
    let hub = TestHub::start().await;
    let group_key = enrollment_group(&hub, "doc-group", "enabled").await;
    let dir = tempfile::tempdir().unwrap();
    let dps_port = hub.hub.dps_addr().unwrap().port();
    let config = write_provisioned_config(&hub, dir.path(), "doc-1", &group_key, dps_port, "mqtt");

    // Without --register: reachability and the CONNECT, then no assignment known, no
    // registration made (the device does not exist afterwards).
    let out = doctor_with(&config, hub.dir.path(), &[]).await;
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert!(
        line(&out, "[ok]", "configuration").contains("registration doc-1 with DPS at localhost:")
    );
    assert!(line(&out, "[ok]", "DPS DNS").contains("localhost resolves to"));
    line(&out, "[ok]", "DPS TCP");
    assert!(line(&out, "[ok]", "DPS TLS").contains("verified"));
    assert!(line(&out, "[ok]", "DPS CONNECT").contains("CONNACK 0"));
    assert!(line(&out, "[warn]", "DPS registration").contains("no cached assignment"));
    assert!(hint(&out, "DPS registration").contains("--register"));
    assert!(!out.stdout.contains(" authentication: "), "{}", out.stdout);
    assert!(!hub.hub.state().registry.contains("doc-1"));

    // --register: a registration, then the hub checks on the assigned hub.
    let out = doctor_with(&config, hub.dir.path(), &["--register"]).await;
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert!(
        line(&out, "[ok]", "DPS registration")
            .contains("assigned to hub localhost as device doc-1"),
        "{}",
        out.stdout
    );
    assert!(line(&out, "[ok]", "authentication").contains("CONNACK 0"));
    assert!(hub.hub.state().registry.contains("doc-1"));
    let cache = dir.path().join("outbox.db.provisioning.json");
    assert!(!cache.exists(), "doctor leaves the cache alone");
    assert!(!out.stdout.contains(&group_key));

    // With the agent's cache: the cached hub is checked, nothing is registered again.
    std::fs::write(
        &cache,
        serde_json::json!({"id_scope": hub.hub.info().id_scope.clone().unwrap(),
            "registration_id": "doc-1", "assigned_hub": "localhost", "device_id": "doc-1"})
        .to_string(),
    )
    .unwrap();
    // A register request would now be answered 429 once and counted: none may come.
    let dps = &hub.hub.state().dps;
    dps.throttle_next(1);
    let out = doctor_with(&config, hub.dir.path(), &[]).await;
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert!(line(&out, "[ok]", "DPS registration").contains("cached assignment: hub localhost"));
    assert!(line(&out, "[ok]", "authentication").contains("CONNACK 0"));
    assert_eq!(
        dps.throttled.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "doctor registered without --register"
    );
    dps.throttle_next(0);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dps_refusals_name_the_step_and_the_dps_error_code() {
    let hub = TestHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let dps_port = hub.hub.dps_addr().unwrap().port();

    // A key no enrollment accepts: the CONNECT fails, CONNACK 5, with a hint; no key shown.
    let unknown = simdevice::protocol::sas::generate_key();
    let config = write_provisioned_config(&hub, dir.path(), "doc-2", &unknown, dps_port, "mqtt");
    let out = doctor_with(&config, hub.dir.path(), &["--register"]).await;
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(line(&out, "[FAIL]", "DPS CONNECT").contains("CONNACK 5"));
    assert!(hint(&out, "DPS CONNECT").contains("no enrollment accepts registration doc-2"));
    assert!(!out.stdout.contains(" DPS registration: "));
    assert!(!out.stdout.contains(&unknown));

    // A disabled enrollment: the CONNECT passes, the registration is refused with DPS's code.
    let disabled = enrollment_group(&hub, "doc-off", "disabled").await;
    let config = write_provisioned_config(&hub, dir.path(), "doc-3", &disabled, dps_port, "mqtt");
    let out = doctor_with(&config, hub.dir.path(), &["--register"]).await;
    assert_eq!(out.code, 1, "{}", out.stdout);
    line(&out, "[ok]", "DPS CONNECT");
    let refused = line(&out, "[FAIL]", "DPS registration");
    assert!(refused.contains("error 401003, status 401"), "{refused}");
    assert!(hint(&out, "DPS registration").contains("enabled"));
    assert!(!hub.hub.state().registry.contains("doc-3"));

    // Nothing listening at the endpoint: DPS TCP fails with DPS's hint, and stops there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let config = write_provisioned_config(&hub, dir.path(), "doc-4", &disabled, port, "mqtt");
    let out = doctor_with(&config, hub.dir.path(), &[]).await;
    assert_eq!(out.code, 1, "{}", out.stdout);
    line(&out, "[FAIL]", "DPS TCP");
    assert!(hint(&out, "DPS TCP").contains("provisioning.global_endpoint"));
    assert!(!out.stdout.contains(" DPS TLS: "));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provisioned_device_over_websocket_checks_the_dps_upgrade() {
    let hub = TestHub::start().await;
    let group_key = enrollment_group(&hub, "doc-ws", "enabled").await;
    let dir = tempfile::tempdir().unwrap();
    let ws_port = hub.hub.dps_ws_addr().unwrap().port();
    let config = write_provisioned_config(
        &hub,
        dir.path(),
        "doc-ws-1",
        &group_key,
        ws_port,
        "websocket",
    );
    let out = doctor_with(&config, hub.dir.path(), &["--register"]).await;
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert!(
        line(&out, "[ok]", "DPS WebSocket").contains(&format!(
            "wss://localhost:{ws_port}/$iothub/websocket accepted the upgrade"
        )),
        "{}",
        out.stdout
    );
    assert!(line(&out, "[ok]", "DPS CONNECT").contains("wss://localhost:"));
    line(&out, "[ok]", "DPS registration");
    // The hub's checks then go over WebSocket too.
    line(&out, "[ok]", "WebSocket");
    assert!(line(&out, "[ok]", "authentication").contains("CONNACK 0"));

    // The DPS MQTT port is no WebSocket endpoint: named at the upgrade, with the key to fix.
    let mqtt_port = hub.hub.dps_addr().unwrap().port();
    let config = write_provisioned_config(
        &hub,
        dir.path(),
        "doc-ws-2",
        &group_key,
        mqtt_port,
        "websocket",
    );
    let out = doctor_with(&config, hub.dir.path(), &[]).await;
    assert_eq!(out.code, 1, "{}", out.stdout);
    line(&out, "[FAIL]", "DPS WebSocket");
    assert!(hint(&out, "DPS WebSocket").contains("provisioning.global_endpoint"));
    hub.stop().await;
}
