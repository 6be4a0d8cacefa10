//! The local DPS through real sockets: enrollments over the DPS service REST API, registration
//! over MQTT/TLS with the agent's registration client, the device it creates connecting to the
//! hub, and the refusals (wrong key, disabled enrollment, wrong policy, stale etag, bad body).

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use simdevice::agent::provision::{self, Assignment, ProvisionError, Registration};
use simdevice::protocol::sas;

use crate::common::{now, RawDevice, Service, TestHub};

fn dps_service(hub: &TestHub) -> Service {
    let key = hub.hub.state().dps.service_key().to_string();
    Service::with_key(hub, "provisioningserviceowner", &key, now() + 3600)
}

fn registration(hub: &TestHub, registration_id: &str, device_key: &str) -> Registration {
    Registration {
        host: "localhost".into(),
        port: hub.hub.dps_addr().expect("the test hub serves DPS").port(),
        transport: simdevice::config::Transport::Mqtt,
        proxy: None,
        tls: simdevice::agent::client_tls(Some(&hub.hub.info().ca_file)).unwrap(),
        id_scope: hub.hub.info().id_scope.clone().unwrap(),
        registration_id: registration_id.into(),
        device_key: device_key.into(),
        payload: None,
        deadline: Duration::from_secs(10),
    }
}

fn primary_key(doc: &Value) -> String {
    doc["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("a primary key")
        .to_string()
}

#[tokio::test]
async fn a_group_enrollment_provisions_a_device_that_then_connects_with_its_twin_set() {
    let hub = TestHub::start().await;
    let dps = dps_service(&hub);
    let put = dps
        .call(
            Method::PUT,
            "/enrollmentGroups/fleet-a",
            Some(json!({
                "enrollmentGroupId": "fleet-a",
                "attestation": {"type": "symmetricKey"},
                "initialTwin": {"tags": {"site": "north"},
                                "properties": {"desired": {"telemetryInterval": 7}}}
            })),
            &[],
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let group_key = primary_key(&put.body);
    let device_key = sas::derive_device_key(&group_key, "sensor-001").unwrap();

    let assignment = provision::register(&registration(&hub, "sensor-001", &device_key), now())
        .await
        .expect("registered");
    assert_eq!(
        assignment,
        Assignment {
            assigned_hub: "localhost".into(),
            device_id: "sensor-001".into(),
            substatus: Some("initialAssignment".into()),
            payload: None,
        }
    );
    let twin = hub
        .service()
        .call(Method::GET, "/twins/sensor-001", None, &[])
        .await;
    assert_eq!(twin.status, 200);
    assert_eq!(twin.body["tags"]["site"], "north");
    assert_eq!(twin.body["properties"]["desired"]["telemetryInterval"], 7);
    // The device key DPS gave the device is the one the hub accepts.
    let mut device = RawDevice::connect(&hub, "sensor-001", &device_key).await;
    device
        .publish_acked("devices/sensor-001/messages/events/", "{}")
        .await;

    // Registering again keeps the twin and says the data was kept.
    let again = provision::register(&registration(&hub, "sensor-001", &device_key), now())
        .await
        .expect("registered again");
    assert_eq!(again.substatus.as_deref(), Some("deviceDataMigrated"));
    let twin = hub
        .service()
        .call(Method::GET, "/twins/sensor-001", None, &[])
        .await;
    assert_eq!(twin.body["tags"]["site"], "north");
    hub.stop().await;
}

#[tokio::test]
async fn an_individual_enrollment_names_the_device_and_passes_the_payload_through() {
    let hub = TestHub::start().await;
    let dps = dps_service(&hub);
    let key = sas::generate_key();
    let put = dps
        .call(
            Method::PUT,
            "/enrollments/reg-7",
            Some(json!({
                "registrationId": "reg-7",
                "deviceId": "kiosk-7",
                "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": ""}},
            })),
            &[],
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(primary_key(&put.body), key);
    let mut request = registration(&hub, "reg-7", &key);
    request.payload = Some(json!({"model": "k1"}));
    let assignment = provision::register(&request, now())
        .await
        .expect("registered");
    assert_eq!(assignment.device_id, "kiosk-7");
    assert_eq!(assignment.payload, Some(json!({"model": "k1"})));
    assert_eq!(hub.device_key("kiosk-7"), key);

    let listed = dps
        .call(
            Method::POST,
            "/enrollments/query",
            Some(json!({"query": "*"})),
            &[],
        )
        .await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.body.as_array().map(Vec::len), Some(1));
    assert!(listed.headers.get("x-ms-continuation").is_none());
    hub.stop().await;
}

#[tokio::test]
async fn refusals_say_why() {
    let hub = TestHub::start().await;
    let dps = dps_service(&hub);
    let put = dps
        .call(
            Method::PUT,
            "/enrollments/solo",
            Some(
                json!({"attestation": {"type": "symmetricKey"}, "provisioningStatus": "disabled"}),
            ),
            &[],
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let key = primary_key(&put.body);

    // A key no enrollment has: CONNACK 5.
    let wrong = provision::register(&registration(&hub, "solo", &sas::generate_key()), now()).await;
    assert!(
        matches!(wrong, Err(ProvisionError::Unauthorized { .. })),
        "{wrong:?}"
    );
    // The right key of a disabled enrollment: refused with DPS's code and message.
    match provision::register(&registration(&hub, "solo", &key), now()).await {
        Err(ProvisionError::Refused {
            status,
            code,
            message,
        }) => {
            assert_eq!((status, code), (401, 401_003));
            assert!(message.contains("disabled"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!hub.hub.state().registry.contains("solo"));
    // A token for another id scope is refused as well.
    let mut other_scope = registration(&hub, "solo", &key);
    other_scope.id_scope = "0ne00000000".into();
    assert!(matches!(
        provision::register(&other_scope, now()).await,
        Err(ProvisionError::Unauthorized { .. })
    ));
    hub.stop().await;
}

#[tokio::test]
async fn the_service_api_checks_policy_etag_and_body() {
    let hub = TestHub::start().await;
    let dps = dps_service(&hub);
    // The IoT Hub owner's token is not the DPS's.
    let owner = hub
        .service()
        .call(Method::GET, "/enrollmentGroups/g", None, &[])
        .await;
    assert_eq!(owner.status, 401);
    assert_eq!(owner.error_code(), Some(401_002));

    let missing = dps
        .call(Method::GET, "/enrollmentGroups/g", None, &[])
        .await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.error_code(), Some(404_201));
    assert!(missing.body["trackingId"].is_string() && missing.body["timestampUtc"].is_string());

    let bad = dps
        .call(
            Method::PUT,
            "/enrollmentGroups/g",
            Some(json!({"attestation": {"type": "tpm"}})),
            &[],
        )
        .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.error_code(), Some(400_004));

    let created = dps
        .call(
            Method::PUT,
            "/enrollmentGroups/g",
            Some(json!({"attestation": {"type": "symmetricKey"}})),
            &[],
        )
        .await;
    let etag = created.body["etag"].as_str().unwrap().to_string();
    let updated = dps
        .call(
            Method::PUT,
            "/enrollmentGroups/g",
            Some(
                json!({"attestation": {"type": "symmetricKey"}, "provisioningStatus": "disabled"}),
            ),
            &[("If-Match", &etag)],
        )
        .await;
    assert_eq!(updated.status, 200);
    assert_eq!(updated.body["provisioningStatus"], "disabled");
    let stale = dps
        .call(
            Method::DELETE,
            "/enrollmentGroups/g",
            None,
            &[("If-Match", &etag)],
        )
        .await;
    assert_eq!(stale.status, 412);
    let deleted = dps
        .call(Method::DELETE, "/enrollmentGroups/g", None, &[])
        .await;
    assert_eq!(deleted.status, 204);
    let gone = dps
        .call(Method::GET, "/enrollmentGroups/g", None, &[])
        .await;
    assert_eq!(gone.status, 404);
    hub.stop().await;
}

fn telemetry_of(hub: &TestHub, device_id: &str) -> u64 {
    hub.hub
        .state()
        .registry
        .get(device_id, |d| {
            d.live
                .telemetry_received
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .unwrap_or(0)
}

/// An agent configured with only `[provisioning]` (a group key) for `registration_id`.
fn provisioned_config(
    hub: &TestHub,
    registration_id: &str,
    group_key: &str,
    outbox: &std::path::Path,
) -> simdevice::config::Config {
    let provisioning = simdevice::config::Provisioning {
        id_scope: hub.hub.info().id_scope.clone().unwrap(),
        registration_id: registration_id.into(),
        host: "localhost".into(),
        port: hub.hub.dps_addr().unwrap().port(),
        ca_file: Some(hub.hub.info().ca_file.clone()),
        device_key: simdevice::config::Secret::new(
            sas::derive_device_key(group_key, registration_id).unwrap(),
        ),
        // The assigned hub is `localhost`; its MQTT port is the test hub's free one.
        gateway_host_name: Some(format!("localhost:{}", hub.hub.mqtt_addr().port())),
        x509: None,
        proxy: None,
    };
    let mut config = simdevice::config::Config::for_identity(provisioning.unassigned_identity());
    config.provisioning = Some(provisioning);
    config.outbox.path = Some(outbox.to_path_buf());
    config.telemetry.interval = Duration::from_millis(200);
    config.connection.backoff_min = Duration::from_millis(100);
    config.connection.backoff_max = Duration::from_millis(500);
    config
}

async fn telemetry_grows(hub: &TestHub, device_id: &str) {
    let before = telemetry_of(hub, device_id);
    crate::common::agent::eventually(Duration::from_secs(15), || async {
        (telemetry_of(hub, device_id) > before).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_agent_provisions_from_a_group_key_keeps_its_assignment_and_registers_again_when_deleted(
) {
    let hub = TestHub::start().await;
    let dps = dps_service(&hub);
    let group_key = sas::generate_key();
    let group = json!({"attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}}});
    let put = dps
        .call(
            Method::PUT,
            "/enrollmentGroups/agents",
            Some(group.clone()),
            &[],
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let state = tempfile::tempdir().unwrap();
    let outbox = state.path().join("outbox.db");
    let config = provisioned_config(&hub, "agent-1", &group_key, &outbox);
    let cache = provision::cache_path(&config);

    // First start: registers, caches the assignment, sends telemetry to the assigned hub.
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(provision::run_provisioned(
        config.clone(),
        false,
        stop.clone(),
    ));
    telemetry_grows(&hub, "agent-1").await;
    let cached: Value = serde_json::from_str(&std::fs::read_to_string(&cache).unwrap()).unwrap();
    assert_eq!(cached["device_id"], "agent-1");
    assert_eq!(cached["assigned_hub"], "localhost");
    stop.cancel();
    run.await.unwrap().unwrap();

    // With the enrollment gone DPS would refuse the device: a restart that still connects
    // used the cached assignment.
    let deleted = dps
        .call(Method::DELETE, "/enrollmentGroups/agents", None, &[])
        .await;
    assert_eq!(deleted.status, 204);
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(provision::run_provisioned(
        config.clone(),
        false,
        stop.clone(),
    ));
    telemetry_grows(&hub, "agent-1").await;

    // The device deleted from the hub: the hub refuses it (CONNACK 5), and the agent
    // registers again (refused while the enrollment is gone, then assigned once it is back).
    assert_eq!(
        hub.service()
            .call(
                Method::DELETE,
                "/devices/agent-1",
                None,
                &[("If-Match", "*")]
            )
            .await
            .status,
        204
    );
    let put = dps
        .call(Method::PUT, "/enrollmentGroups/agents", Some(group), &[])
        .await;
    assert_eq!(put.status, 200);
    crate::common::agent::eventually(Duration::from_secs(15), || async {
        hub.hub.state().registry.contains("agent-1").then_some(())
    })
    .await;
    telemetry_grows(&hub, "agent-1").await;
    stop.cancel();
    run.await.unwrap().unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn a_refused_registration_backs_off_until_the_enrollment_exists() {
    let hub = TestHub::start().await;
    let group_key = sas::generate_key();
    let state = tempfile::tempdir().unwrap();
    let config = provisioned_config(&hub, "late-1", &group_key, &state.path().join("o.db"));
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(provision::run_provisioned(config, false, stop.clone()));
    // No enrollment yet: nothing is created, and the agent keeps trying.
    let registration = registration(
        &hub,
        "late-1",
        &sas::derive_device_key(&group_key, "late-1").unwrap(),
    );
    assert!(matches!(
        provision::register(&registration, now()).await,
        Err(ProvisionError::Unauthorized { .. })
    ));
    assert!(!hub.hub.state().registry.contains("late-1"));
    let put = dps_service(&hub)
        .call(
            Method::PUT,
            "/enrollmentGroups/late",
            Some(json!({"attestation": {"type": "symmetricKey",
                "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}}})),
            &[],
        )
        .await;
    assert_eq!(put.status, 200);
    telemetry_grows(&hub, "late-1").await;
    stop.cancel();
    run.await.unwrap().unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn simdevice_provision_registers_caches_and_registers_again_with_force() {
    let hub = TestHub::start().await;
    let group_key = sas::generate_key();
    let put = dps_service(&hub)
        .call(
            Method::PUT,
            "/enrollmentGroups/cli",
            Some(json!({"attestation": {"type": "symmetricKey",
                "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}}})),
            &[],
        )
        .await;
    assert_eq!(put.status, 200);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[provisioning]\nid_scope = \"{}\"\nregistration_id = \"cli-1\"\n\
             global_endpoint = \"localhost:{}\"\nca_file = \"{}\"\ngroup_key = \"{group_key}\"\n\
             [outbox]\npath = \"{}\"\n",
            hub.hub.info().id_scope.clone().unwrap(),
            hub.hub.dps_addr().unwrap().port(),
            hub.hub.info().ca_file.display(),
            dir.path().join("outbox.db").display(),
        ),
    )
    .unwrap();
    let provision = |force: bool| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_simdevice"));
        crate::common::isolated(&mut command)
            .arg("provision")
            .arg("--config")
            .arg(&config);
        if force {
            command.arg("--force");
        }
        async move {
            let output = command.output().await.unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8(output.stdout).unwrap()
        }
    };
    let first = provision(false).await;
    assert!(
        first.starts_with("assigned: device cli-1 on localhost (initialAssignment)"),
        "{first}"
    );
    assert!(hub.hub.state().registry.contains("cli-1"));
    let second = provision(false).await;
    assert!(
        second.starts_with("cached: device cli-1 on localhost"),
        "{second}"
    );
    let forced = provision(true).await;
    assert!(forced.contains("(deviceDataMigrated)"), "{forced}");
    hub.stop().await;
}

mod cli {
    use clap::Parser;
    use serde_json::Value;
    use simdevice::commands::service::{execute, ServiceArgs, ServiceCommandError};

    use crate::common::TestHub;

    #[derive(Parser)]
    struct Wrapper {
        #[command(subcommand)]
        command: Verb,
    }

    #[derive(clap::Subcommand)]
    enum Verb {
        Service(ServiceArgs),
    }

    /// `simdevice service --local --state-dir <hub dir> dps ARGV...`: the printed JSON.
    async fn dps(hub: &TestHub, argv: &[&str]) -> Result<Value, ServiceCommandError> {
        let dir = hub.dir.path().to_str().unwrap();
        let head = ["simdevice", "service", "--local", "--state-dir", dir, "dps"];
        let full = head.iter().chain(argv).copied();
        let Ok(Wrapper {
            command: Verb::Service(args),
        }) = Wrapper::try_parse_from(full)
        else {
            panic!("{argv:?} does not parse");
        };
        let mut out = Vec::new();
        execute(args, &mut out).await?;
        Ok(serde_json::from_slice(&out).unwrap())
    }

    #[tokio::test]
    async fn service_dps_creates_shows_lists_and_deletes_enrollments() {
        let hub = TestHub::start().await;
        let created = dps(
            &hub,
            &[
                "enrollment-group",
                "create",
                "g1",
                "--initial-twin",
                r#"{"tags":{"site":"a"}}"#,
            ],
        )
        .await
        .unwrap();
        assert_eq!(created["enrollmentGroupId"], "g1");
        assert_eq!(created["initialTwin"]["tags"]["site"], "a");
        assert!(created["attestation"]["symmetricKey"]["primaryKey"].is_string());
        let shown = dps(&hub, &["enrollment-group", "show", "g1"])
            .await
            .unwrap();
        assert_eq!(shown, created);
        let individual = dps(
            &hub,
            &[
                "enrollment",
                "create",
                "r1",
                "--device-id",
                "dev-r1",
                "--disabled",
            ],
        )
        .await
        .unwrap();
        assert_eq!(individual["deviceId"], "dev-r1");
        assert_eq!(individual["provisioningStatus"], "disabled");
        let listed = dps(&hub, &["enrollment", "list"]).await.unwrap();
        assert_eq!(listed.as_array().map(Vec::len), Some(1));
        let stale = dps(&hub, &["enrollment", "delete", "r1", "--etag", "\"99\""])
            .await
            .unwrap_err();
        assert_eq!(stale.status(), Some(412));
        let deleted = dps(&hub, &["enrollment", "delete", "r1"]).await.unwrap();
        assert_eq!(deleted["deleted"], true);
        let missing = dps(&hub, &["enrollment", "show", "r1"]).await.unwrap_err();
        assert_eq!(
            (missing.status(), missing.code()),
            (Some(404), Some(404_201))
        );
        hub.stop().await;
    }

    #[tokio::test]
    async fn service_dps_creates_x509_enrollments_by_ca_name_or_certificate_file() {
        let hub = TestHub::start().await;
        let dir = tempfile::tempdir().unwrap();
        let ca_pem = super::generate_ca(&hub, "cli-ca").await;
        let by_name = dps(
            &hub,
            &["enrollment-group", "create", "g-ca", "--x509-ca", "cli-ca"],
        )
        .await
        .unwrap();
        assert_eq!(by_name["attestation"]["type"], "x509");
        assert_eq!(
            by_name["attestation"]["x509"]["caReferences"]["primary"],
            "cli-ca"
        );
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca_pem).unwrap();
        let by_file = dps(
            &hub,
            &[
                "enrollment-group",
                "create",
                "g-pem",
                "--certificate",
                ca_file.to_str().unwrap(),
            ],
        )
        .await
        .unwrap();
        let signing = &by_file["attestation"]["x509"]["signingCertificates"]["primary"];
        assert!(
            signing["info"]["subjectName"]
                .as_str()
                .unwrap()
                .contains("CN=cli-ca"),
            "{signing}"
        );
        let (_, device_pem) = super::issue_pair(&hub, dir.path(), "cli-dev", None, 30).await;
        let device_file = dir.path().join("cli-dev.pem");
        std::fs::write(&device_file, device_pem).unwrap();
        let individual = dps(
            &hub,
            &[
                "enrollment",
                "create",
                "cli-dev",
                "--certificate",
                device_file.to_str().unwrap(),
            ],
        )
        .await
        .unwrap();
        assert!(
            individual["attestation"]["x509"]["clientCertificates"]["primary"]["info"]
                ["sha256Thumbprint"]
                .is_string()
        );
        // CA references are for groups; an unknown CA is the service's 400.
        let wrong = dps(
            &hub,
            &["enrollment", "create", "cli-dev", "--x509-ca", "cli-ca"],
        )
        .await
        .unwrap_err();
        assert!(wrong.is_usage(), "{wrong}");
        let unknown = dps(
            &hub,
            &["enrollment-group", "create", "g-x", "--x509-ca", "nope"],
        )
        .await
        .unwrap_err();
        assert_eq!(unknown.status(), Some(400));
        hub.stop().await;
    }
}

#[tokio::test]
async fn a_throttled_registration_waits_its_retry_after_and_succeeds() {
    let hub = TestHub::start().await;
    let key = sas::generate_key();
    let put = dps_service(&hub)
        .call(
            Method::PUT,
            "/enrollments/busy",
            Some(json!({"attestation": {"type": "symmetricKey",
                "symmetricKey": {"primaryKey": key, "secondaryKey": key}}})),
            &[],
        )
        .await;
    assert_eq!(put.status, 200);
    hub.hub.state().dps.throttle_next(2);
    let started = std::time::Instant::now();
    let assignment = provision::register(&registration(&hub, "busy", &key), now())
        .await
        .expect("assigned after the throttling");
    assert_eq!(assignment.device_id, "busy");
    let throttled = hub
        .hub
        .state()
        .dps
        .throttled
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(throttled, 2);
    // Two 429s with retry-after=1 each, then the register's own retry-after=1 before the poll.
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    hub.stop().await;
}

#[tokio::test]
async fn a_fleet_with_dps_provisions_its_slice_then_sends() {
    let hub = TestHub::start().await;
    let group_key = sas::generate_key();
    let put = dps_service(&hub)
        .call(
            Method::PUT,
            "/enrollmentGroups/fleet",
            Some(json!({"attestation": {"type": "symmetricKey",
                "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}}})),
            &[],
        )
        .await;
    assert_eq!(put.status, 200);
    hub.hub.state().dps.throttle_next(1);
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_simdevice"));
    crate::common::isolated(&mut command).args([
        "fleet",
        "--dps",
        &hub.hub.info().id_scope.clone().unwrap(),
        "--dps-endpoint",
        &format!("localhost:{}", hub.hub.dps_addr().unwrap().port()),
        "--dps-rate",
        "50",
        "--group-key",
        &group_key,
        "--gateway",
        &format!("localhost:{}", hub.hub.mqtt_addr().port()),
        "--ca-file",
        hub.hub.info().ca_file.to_str().unwrap(),
        "--prefix",
        "fd-",
        "--count",
        "3",
        "--messages",
        "2",
        "--interval-secs",
        "0.1",
        "--report",
        report.to_str().unwrap(),
    ]);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the fleet ends")
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["connected"], 3, "{report}");
    for id in ["fd-1", "fd-2", "fd-3"] {
        assert!(
            hub.hub.state().registry.contains(id),
            "{id} was not provisioned"
        );
        assert!(telemetry_of(&hub, id) >= 2, "{id} sent too little");
    }
    assert_eq!(
        hub.hub
            .state()
            .dps
            .throttled
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    hub.stop().await;
}

#[tokio::test]
async fn simdevice_run_with_only_provisioning_registers_sends_and_exits_0_on_sigterm() {
    let hub = TestHub::start().await;
    let group_key = sas::generate_key();
    let put = dps_service(&hub)
        .call(
            Method::PUT,
            "/enrollmentGroups/daemons",
            Some(json!({"attestation": {"type": "symmetricKey",
                "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}}})),
            &[],
        )
        .await;
    assert_eq!(put.status, 200);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let outbox = dir.path().join("outbox.db");
    std::fs::write(
        &config,
        format!(
            "[provisioning]\nid_scope = \"{}\"\nregistration_id = \"daemon-1\"\n\
             global_endpoint = \"localhost:{}\"\nca_file = \"{}\"\ngroup_key = \"{group_key}\"\n\
             gateway_host_name = \"localhost:{}\"\n[telemetry]\ninterval_secs = 0.2\n\
             [outbox]\npath = \"{}\"\n",
            hub.hub.info().id_scope.clone().unwrap(),
            hub.hub.dps_addr().unwrap().port(),
            hub.hub.info().ca_file.display(),
            hub.hub.mqtt_addr().port(),
            outbox.display(),
        ),
    )
    .unwrap();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_simdevice"));
    let mut child = crate::common::isolated(&mut command)
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    telemetry_grows(&hub, "daemon-1").await;
    assert!(std::fs::metadata(format!("{}.provisioning.json", outbox.display())).is_ok());
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("the agent stops")
        .unwrap();
    assert!(status.success(), "{status:?}");
    hub.stop().await;
}

/// A device certificate (CN = `device`) the hub issues, signed by its CA `ca` or self-signed,
/// written into `dir` (the key 0600): what an X.509 device holds.
async fn issue_pair(
    hub: &TestHub,
    dir: &std::path::Path,
    device: &str,
    ca: Option<&str>,
    days: i64,
) -> (simdevice::config::X509Files, String) {
    use std::os::unix::fs::PermissionsExt;
    let reply = hub
        .service()
        .call(
            Method::POST,
            "/simdevice/device-certificates",
            Some(json!({"deviceId": device, "ca": ca, "days": days})),
            &[],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let cert_pem = reply.body["certificate"].as_str().unwrap().to_string();
    let name = format!("{device}-{}", rand::random::<u32>());
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, reply.body["privateKey"].as_str().unwrap()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let der = simdevice::common::pem::parse_pem_certificates(&cert_pem).unwrap();
    let summary = simdevice::common::der::certificate_summary(&der[0]).unwrap();
    let files = simdevice::config::X509Files {
        certificate_file: cert,
        private_key_file: key,
        not_after: summary.not_after,
    };
    (files, cert_pem)
}

/// The TLS client configuration of a device presenting `files`.
fn x509_tls(
    hub: &TestHub,
    files: &simdevice::config::X509Files,
) -> std::sync::Arc<rustls::ClientConfig> {
    let identity = simdevice::config::Identity {
        host_name: "localhost".into(),
        device_id: "unused".into(),
        key: simdevice::config::Secret::new(String::new()),
        gateway_host_name: None,
        ca_file: Some(hub.hub.info().ca_file.clone()),
        x509: Some(files.clone()),
    };
    simdevice::agent::client_tls_for(&identity).unwrap()
}

/// An X.509 registration: no key, the certificate in the TLS configuration.
fn x509_registration(
    hub: &TestHub,
    registration_id: &str,
    files: &simdevice::config::X509Files,
) -> Registration {
    Registration {
        tls: x509_tls(hub, files),
        ..registration(hub, registration_id, "")
    }
}

/// CONNECT to the hub's MQTT port with `files`' certificate and no password: the CONNACK code.
async fn connect_with_certificate(
    hub: &TestHub,
    device: &str,
    files: &simdevice::config::X509Files,
) -> rumqttc::ConnectReturnCode {
    let connector = tokio_rustls::TlsConnector::from(x509_tls(hub, files));
    let mut raw = RawDevice::open_at(hub.hub.mqtt_addr(), connector).await;
    let mut connect = rumqttc::Connect::new(device);
    connect.keep_alive = 60;
    connect.login = Some(rumqttc::Login::new(crate::common::user_name(device), ""));
    raw.send(rumqttc::Packet::Connect(connect)).await;
    match raw.recv().await {
        Some(rumqttc::Packet::ConnAck(ack)) => ack.code,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

async fn generate_ca(hub: &TestHub, name: &str) -> String {
    let path = format!("/simdevice/certificates/{name}/generate");
    let reply = hub.service().call(Method::POST, &path, None, &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body["properties"]["certificate"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn an_x509_group_by_ca_reference_provisions_devices_that_connect_with_their_certificate() {
    let hub = TestHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let dps = dps_service(&hub);
    generate_ca(&hub, "plant-ca").await;
    // A reference to a CA the hub does not have is refused.
    let unknown = dps
        .call(
            Method::PUT,
            "/enrollmentGroups/cams",
            Some(json!({"attestation": {"type": "x509", "x509": {"caReferences": {"primary": "nope"}}}})),
            &[],
        )
        .await;
    assert_eq!(
        (unknown.status, &unknown.body["errorCode"]),
        (400, &json!(400_004)),
        "{}",
        unknown.body
    );
    let put = dps
        .call(
            Method::PUT,
            "/enrollmentGroups/cams",
            Some(json!({
                "enrollmentGroupId": "cams",
                "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "plant-ca"}}},
                "initialTwin": {"tags": {"line": "3"}},
            })),
            &[],
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(put.body["attestation"]["type"], "x509");
    assert_eq!(
        put.body["attestation"]["x509"]["caReferences"]["primary"],
        "plant-ca"
    );

    let (files, _) = issue_pair(&hub, dir.path(), "cam-01", Some("plant-ca"), 30).await;
    let assignment = provision::register(&x509_registration(&hub, "cam-01", &files), now())
        .await
        .expect("registered with the certificate");
    assert_eq!(assignment.device_id, "cam-01");
    assert_eq!(assignment.substatus.as_deref(), Some("initialAssignment"));
    let device = hub.service().get("/devices/cam-01").await.body;
    assert_eq!(device["authentication"]["type"], "certificateAuthority");
    assert_eq!(
        hub.service().get("/twins/cam-01").await.body["tags"]["line"],
        "3"
    );
    assert_eq!(
        connect_with_certificate(&hub, "cam-01", &files).await,
        rumqttc::ConnectReturnCode::Success
    );

    // Refused at CONNECT (CONNACK 5), as DPS refuses: a certificate of another CA, one whose
    // CN is not the registration id, an expired one, and a SAS token for a group of X.509.
    let (stranger, _) = issue_pair(&hub, dir.path(), "cam-02", None, 30).await;
    let (expired, _) = issue_pair(&hub, dir.path(), "cam-04", Some("plant-ca"), -2).await;
    for (registration_id, files) in [
        ("cam-02", &stranger),
        ("cam-03", &files),
        ("cam-04", &expired),
    ] {
        let refused =
            provision::register(&x509_registration(&hub, registration_id, files), now()).await;
        assert!(
            matches!(refused, Err(ProvisionError::Unauthorized { .. })),
            "{registration_id}: {refused:?}"
        );
    }
    let sas = provision::register(&registration(&hub, "cam-05", &sas::generate_key()), now()).await;
    assert!(
        matches!(sas, Err(ProvisionError::Unauthorized { .. })),
        "{sas:?}"
    );
    assert!(!hub.hub.state().registry.contains("cam-02"));

    // A disabled group: DPS's 401 with its code, after the CONNECT.
    let mut body = put.body.clone();
    body["provisioningStatus"] = json!("disabled");
    let off = dps
        .call(Method::PUT, "/enrollmentGroups/cams", Some(body), &[])
        .await;
    assert_eq!(off.status, 200, "{}", off.body);
    let (files_6, _) = issue_pair(&hub, dir.path(), "cam-06", Some("plant-ca"), 30).await;
    match provision::register(&x509_registration(&hub, "cam-06", &files_6), now()).await {
        Err(ProvisionError::Refused { status, code, .. }) => {
            assert_eq!((status, code), (401, 401_003))
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    hub.stop().await;
}

#[tokio::test]
async fn signing_certificates_and_individual_x509_enrollments_create_self_signed_devices() {
    let hub = TestHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let dps = dps_service(&hub);
    // The group's CA is given as PEM and is not one the hub trusts for devices.
    let ca_pem = generate_ca(&hub, "vendor-ca").await;
    let (files, _) = issue_pair(&hub, dir.path(), "pump-01", Some("vendor-ca"), 30).await;
    let deleted = hub
        .service()
        .call(
            Method::DELETE,
            "/simdevice/certificates/vendor-ca",
            None,
            &[],
        )
        .await;
    assert!(deleted.status < 300, "{}", deleted.body);
    let put = dps
        .call(
            Method::PUT,
            "/enrollmentGroups/pumps",
            Some(json!({"attestation": {"type": "x509", "x509": {
                "signingCertificates": {"primary": {"certificate": ca_pem}}}}})),
            &[],
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let info = &put.body["attestation"]["x509"]["signingCertificates"]["primary"]["info"];
    assert!(
        info["subjectName"]
            .as_str()
            .unwrap()
            .contains("CN=vendor-ca"),
        "{info}"
    );
    assert_eq!(info["sha256Thumbprint"].as_str().map(str::len), Some(64));

    let assignment = provision::register(&x509_registration(&hub, "pump-01", &files), now())
        .await
        .expect("registered");
    assert_eq!(assignment.device_id, "pump-01");
    let leaf = simdevice::common::pem::parse_pem_certificates(
        &std::fs::read_to_string(&files.certificate_file).unwrap(),
    )
    .unwrap();
    let thumbprint = simdevice::common::der::thumbprint_sha256(&leaf[0]);
    let auth = &hub.service().get("/devices/pump-01").await.body["authentication"];
    assert_eq!(auth["type"], "selfSigned");
    assert_eq!(
        auth["x509Thumbprint"]["primaryThumbprint"],
        thumbprint.as_str()
    );
    assert_eq!(
        connect_with_certificate(&hub, "pump-01", &files).await,
        rumqttc::ConnectReturnCode::Success
    );

    // An individual enrollment: the device's own certificate, whose CN is the registration id.
    let (own, own_pem) = issue_pair(&hub, dir.path(), "gate-01", None, 30).await;
    let mismatch = dps
        .call(
            Method::PUT,
            "/enrollments/gate-02",
            Some(json!({"attestation": {"type": "x509", "x509": {
                "clientCertificates": {"primary": {"certificate": own_pem}}}}})),
            &[],
        )
        .await;
    assert_eq!(mismatch.status, 400, "{}", mismatch.body);
    let put = dps
        .call(
            Method::PUT,
            "/enrollments/gate-01",
            Some(
                json!({"deviceId": "gate-device", "attestation": {"type": "x509", "x509": {
                "clientCertificates": {"primary": {"certificate": own_pem}}}}}),
            ),
            &[],
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    // Another certificate with the same CN is not the enrolled one.
    let (other, _) = issue_pair(&hub, dir.path(), "gate-01", None, 30).await;
    let refused = provision::register(&x509_registration(&hub, "gate-01", &other), now()).await;
    assert!(
        matches!(refused, Err(ProvisionError::Unauthorized { .. })),
        "{refused:?}"
    );
    let assignment = provision::register(&x509_registration(&hub, "gate-01", &own), now())
        .await
        .expect("registered");
    assert_eq!(assignment.device_id, "gate-device");
    assert_eq!(
        hub.service().get("/devices/gate-device").await.body["authentication"]["type"],
        "selfSigned"
    );
    assert_eq!(
        connect_with_certificate(&hub, "gate-device", &own).await,
        rumqttc::ConnectReturnCode::Success
    );
    hub.stop().await;
}

#[tokio::test]
async fn an_agent_with_an_x509_identity_and_provisioning_registers_and_connects_with_its_certificate(
) {
    let hub = TestHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    generate_ca(&hub, "agents-ca").await;
    let put = dps_service(&hub)
        .call(
            Method::PUT,
            "/enrollmentGroups/x509-agents",
            Some(json!({"attestation": {"type": "x509", "x509": {"caReferences": {"primary": "agents-ca"}}}})),
            &[],
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let (files, _) = issue_pair(&hub, dir.path(), "meter-9", Some("agents-ca"), 30).await;
    // The configuration as a user writes it: no key anywhere, the registration id from the CN.
    let text = format!(
        "[identity]\ncertificate_file = \"{}\"\nprivate_key_file = \"{}\"\n\
         [provisioning]\nid_scope = \"{}\"\nglobal_endpoint = \"localhost:{}\"\nca_file = \"{}\"\n\
         gateway_host_name = \"localhost:{}\"\n[telemetry]\ninterval_secs = 0.2\n\
         [outbox]\npath = \"{}\"\n",
        files.certificate_file.display(),
        files.private_key_file.display(),
        hub.hub.info().id_scope.clone().unwrap(),
        hub.hub.dps_addr().unwrap().port(),
        hub.hub.info().ca_file.display(),
        hub.hub.mqtt_addr().port(),
        dir.path().join("outbox.db").display(),
    );
    let config = simdevice::config::Config::from_sources(
        Some((&dir.path().join("config.toml"), &text)),
        &[],
    )
    .expect("the configuration loads");
    assert_eq!(
        config
            .provisioning
            .as_ref()
            .map(|p| p.registration_id.as_str()),
        Some("meter-9")
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(provision::run_provisioned(config, false, stop.clone()));
    crate::common::agent::eventually(Duration::from_secs(15), || async {
        hub.hub.state().registry.contains("meter-9").then_some(())
    })
    .await;
    telemetry_grows(&hub, "meter-9").await;
    assert_eq!(
        hub.service().get("/devices/meter-9").await.body["authentication"]["type"],
        "certificateAuthority"
    );
    stop.cancel();
    run.await.unwrap().unwrap();
    hub.stop().await;
}

/// A CA made outside the hub (as a user's own PKI would), written as PEM: (certificate, key).
fn own_ca(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "Fabrikam");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let cert = params.self_signed(&key).unwrap();
    let (cert_file, key_file) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    (cert_file, key_file, cert.pem())
}

async fn run_fleet(args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_simdevice"));
    crate::common::isolated(&mut command)
        .arg("fleet")
        .args(args)
        .args(["--report", report.to_str().unwrap()]);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the fleet ends")
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap()
}

#[tokio::test]
async fn an_x509_fleet_provisions_through_a_group_or_connects_as_certificate_authority_devices() {
    let hub = TestHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (ca_cert, ca_key, ca_pem) = own_ca(dir.path(), "fleet-ca");
    let put = dps_service(&hub)
        .call(
            Method::PUT,
            "/enrollmentGroups/x509-fleet",
            Some(json!({"attestation": {"type": "x509", "x509": {
                "signingCertificates": {"primary": {"certificate": ca_pem}}}}})),
            &[],
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let ca_file = hub.hub.info().ca_file.to_str().unwrap().to_string();
    let gateway = format!("localhost:{}", hub.hub.mqtt_addr().port());
    let common = [
        "--x509-ca",
        ca_cert.to_str().unwrap(),
        "--x509-ca-key",
        ca_key.to_str().unwrap(),
        "--gateway",
        &gateway,
        "--ca-file",
        &ca_file,
        "--count",
        "3",
        "--messages",
        "2",
        "--interval-secs",
        "0.1",
    ];

    // With --dps: registered through the X.509 group with the certificates the fleet issued.
    let scope = hub.hub.info().id_scope.clone().unwrap();
    let endpoint = format!("localhost:{}", hub.hub.dps_addr().unwrap().port());
    let mut args = vec![
        "--dps",
        &scope,
        "--dps-endpoint",
        &endpoint,
        "--prefix",
        "xd-",
    ];
    args.extend_from_slice(&common);
    let report = run_fleet(&args).await;
    assert_eq!(report["connected"], 3, "{report}");
    for id in ["xd-1", "xd-2", "xd-3"] {
        let device = hub.service().get(&format!("/devices/{id}")).await.body;
        assert_eq!(device["authentication"]["type"], "selfSigned", "{device}");
        assert!(telemetry_of(&hub, id) >= 2, "{id} sent too little");
    }

    // Without DPS: the hub trusts the CA and has the devices as certificateAuthority.
    let added = hub
        .service()
        .call(
            Method::PUT,
            "/simdevice/certificates/fleet-ca",
            Some(json!({"certificate": std::fs::read_to_string(&ca_cert).unwrap()})),
            &[],
        )
        .await;
    assert_eq!(added.status, 200, "{}", added.body);
    for id in ["xc-1", "xc-2", "xc-3"] {
        let created = hub
            .service()
            .call(
                Method::PUT,
                &format!("/devices/{id}"),
                Some(json!({"deviceId": id, "authentication": {"type": "certificateAuthority"}})),
                &[],
            )
            .await;
        assert_eq!(created.status, 200, "{}", created.body);
    }
    let mut args = vec!["--host", "localhost", "--prefix", "xc-"];
    args.extend_from_slice(&common);
    let report = run_fleet(&args).await;
    assert_eq!(report["connected"], 3, "{report}");
    for id in ["xc-1", "xc-2", "xc-3"] {
        assert!(telemetry_of(&hub, id) >= 2, "{id} sent too little");
    }
    hub.stop().await;
}
