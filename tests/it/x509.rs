//! X.509 device authentication through real sockets: devices registered over REST as
//! `selfSigned` (SHA-1 and SHA-256 thumbprints, primary and secondary) or
//! `certificateAuthority` (a CA the hub generated, or one given as `--x509-ca`), our agent
//! connecting with its certificate, sending telemetry and answering a method, and every
//! refusal as a CONNACK 5.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use rumqttc::{Connect, ConnectReturnCode, Login, Packet};
use serde_json::{json, Value};
use simdevice::config::X509Files;

use crate::common::agent::{agent_config, eventually, RunningAgent};
use crate::common::{device_token, user_name, RawDevice, TestHub};

/// A device certificate and key, as the hub issued them.
struct Issued {
    cert_pem: String,
    key_pem: String,
    sha1: String,
    sha256: String,
}

async fn issue(hub: &TestHub, device: &str, ca: Option<&str>, days: i64) -> Issued {
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
    let text = |name: &str| reply.body[name].as_str().unwrap().to_string();
    Issued {
        cert_pem: text("certificate"),
        key_pem: text("privateKey"),
        sha1: text("thumbprintSha1"),
        sha256: text("thumbprintSha256"),
    }
}

async fn generate_ca(hub: &TestHub, name: &str) {
    let path = format!("/simdevice/certificates/{name}/generate");
    let reply = hub.service().call(Method::POST, &path, None, &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

/// `PUT /devices/{id}` with the body azure-iot-hub's create_device_with_x509 or
/// create_device_with_certificate_authority sends.
async fn register(hub: &TestHub, id: &str, authentication: Value) -> crate::common::Reply {
    let body = json!({
        "deviceId": id,
        "status": "enabled",
        "authentication": authentication,
        "capabilities": {"iotEdge": false},
        "statusReason": null,
        "deviceScope": null,
        "parentScopes": null,
    });
    hub.service()
        .call(Method::PUT, &format!("/devices/{id}"), Some(body), &[])
        .await
}

fn self_signed(primary: &str, secondary: Option<&str>) -> Value {
    json!({"type": "selfSigned", "x509Thumbprint": {
        "primaryThumbprint": primary, "secondaryThumbprint": secondary}})
}

fn ca_signed() -> Value {
    json!({"type": "certificateAuthority"})
}

/// Writes the pair (the key 0600) and returns the agent's view of it.
fn write_pair(dir: &Path, name: &str, issued: &Issued) -> X509Files {
    use std::os::unix::fs::PermissionsExt;
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    std::fs::write(&key, &issued.key_pem).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let der = simdevice::common::pem::parse_pem_certificates(&issued.cert_pem).unwrap();
    let summary = simdevice::common::der::certificate_summary(&der[0]).unwrap();
    X509Files {
        certificate_file: cert,
        private_key_file: key,
        not_after: summary.not_after,
    }
}

/// An agent of `id` that authenticates with `files`.
fn x509_agent(hub: &TestHub, id: &str, files: X509Files) -> RunningAgent {
    let mut config = agent_config(hub, id, "", hub.hub.mqtt_addr());
    config.identity.key = simdevice::config::Secret::new(String::new());
    config.identity.x509 = Some(files);
    config.telemetry.interval = Duration::from_millis(300);
    RunningAgent::start(config)
}

/// The agent's readings reach the hub and it answers lockDoor.
async fn assert_works(hub: &TestHub, id: &str) {
    let service = hub.service();
    eventually(Duration::from_secs(10), || async {
        (!service.events(id).await.is_empty()).then_some(())
    })
    .await;
    let answer = service.invoke(id, "lockDoor", Value::Null).await;
    assert_eq!(answer.body["status"], 200, "{}", answer.body);
}

/// A raw device over TLS that presents `issued` (if any) and sends CONNECT with `password`.
async fn raw_connect(
    hub: &TestHub,
    id: &str,
    issued: Option<&Issued>,
    password: &str,
) -> ConnectReturnCode {
    let mut roots = rustls::RootCertStore::empty();
    for cert in simdevice::common::pem::parse_pem_certificates(&hub.ca_pem()).unwrap() {
        roots.add(cert).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match issued {
        None => builder.with_no_client_auth(),
        Some(issued) => {
            let chain = simdevice::common::pem::parse_pem_certificates(&issued.cert_pem).unwrap();
            let key = rustls_pemfile::private_key(&mut issued.key_pem.as_bytes())
                .unwrap()
                .unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut device = RawDevice::open_at(hub.hub.mqtt_addr(), connector).await;
    let mut connect = Connect::new(id);
    connect.keep_alive = 60;
    connect.login = Some(Login::new(user_name(id), password));
    device.send(Packet::Connect(connect)).await;
    match device.recv().await {
        Some(Packet::ConnAck(ack)) => ack.code,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn x509_devices_are_registered_shown_and_changed_as_iot_hub_does() {
    let hub = TestHub::start().await;
    let service = hub.service();
    let sha1 = "A".repeat(40);
    let sha256 = "b".repeat(64);
    let created = register(&hub, "ss-1", self_signed(&sha1, Some(&sha256))).await;
    assert_eq!(created.status, 200, "{}", created.body);
    let auth = &service.get("/devices/ss-1").await.body["authentication"];
    assert_eq!(auth["type"], "selfSigned");
    assert_eq!(auth["x509Thumbprint"]["primaryThumbprint"], sha1.as_str());
    assert_eq!(
        auth["x509Thumbprint"]["secondaryThumbprint"],
        sha256.as_str()
    );
    assert_eq!(
        auth["symmetricKey"],
        json!({"primaryKey": null, "secondaryKey": null})
    );
    let listed = service.get("/devices").await.body;
    assert_eq!(listed[0]["authentication"]["type"], "selfSigned");
    let query = json!({"query": "SELECT * FROM devices WHERE authenticationType = 'selfSigned'"});
    let found = service
        .call(Method::POST, "/devices/query", Some(query), &[])
        .await;
    assert_eq!(found.body.as_array().unwrap().len(), 1, "{}", found.body);
    assert_eq!(
        found.body[0]["x509Thumbprint"]["primaryThumbprint"],
        sha1.as_str()
    );

    assert_eq!(register(&hub, "ca-1", ca_signed()).await.status, 200);
    let twin = service.get("/twins/ca-1").await.body;
    assert_eq!(twin["authenticationType"], "certificateAuthority");

    // Bad thumbprints: IoT Hub's error shape, 400 ArgumentInvalid.
    for bad in ["XYZ", "ABCD", &"G".repeat(40), &"a".repeat(41)] {
        let reply = register(&hub, "bad", self_signed(bad, None)).await;
        assert_eq!(reply.status, 400, "{bad}: {}", reply.body);
        assert_eq!(reply.error_code(), Some(400004), "{}", reply.body);
        assert!(reply.body["Message"]
            .as_str()
            .unwrap()
            .starts_with("ErrorCode:ArgumentInvalid;"));
    }
    let reply = register(&hub, "bad", json!({"type": "selfSigned"})).await;
    assert_eq!(reply.status, 400, "{}", reply.body);

    // The type changes with a PUT carrying If-Match; back to sas, keys are generated.
    let body = json!({"deviceId": "ss-1", "status": "enabled", "authentication": ca_signed()});
    let headers = [("if-match", "\"*\"")];
    let changed = service
        .call(Method::PUT, "/devices/ss-1", Some(body), &headers)
        .await;
    assert_eq!(changed.status, 200, "{}", changed.body);
    assert_eq!(
        changed.body["authentication"]["type"],
        "certificateAuthority"
    );
    let body = json!({"deviceId": "ss-1", "status": "enabled", "authentication": {"type": "sas"}});
    let back = service
        .call(Method::PUT, "/devices/ss-1", Some(body), &headers)
        .await;
    assert_eq!(back.body["authentication"]["type"], "sas");
    assert!(back.body["authentication"]["symmetricKey"]["primaryKey"].is_string());
    hub.stop().await;
}

#[tokio::test]
async fn self_signed_devices_connect_by_sha1_and_by_sha256_secondary_thumbprint() {
    let hub = TestHub::start().await;
    let files = tempfile::tempdir().unwrap();
    let first = issue(&hub, "ss-sha1", None, 30).await;
    assert_eq!(
        register(&hub, "ss-sha1", self_signed(&first.sha1, None))
            .await
            .status,
        200
    );
    let second = issue(&hub, "ss-sha256", None, 30).await;
    let other = "C".repeat(64);
    assert_eq!(
        register(
            &hub,
            "ss-sha256",
            self_signed(&other, Some(&second.sha256.to_lowercase()))
        )
        .await
        .status,
        200
    );
    let a = x509_agent(&hub, "ss-sha1", write_pair(files.path(), "a", &first));
    let b = x509_agent(&hub, "ss-sha256", write_pair(files.path(), "b", &second));
    assert_works(&hub, "ss-sha1").await;
    assert_works(&hub, "ss-sha256").await;
    assert_eq!(a.reconnects("refused"), 0);
    a.stop().await;
    b.stop().await;
    hub.stop().await;
}

#[tokio::test]
async fn a_ca_signed_device_connects_with_a_ca_the_hub_generated() {
    let hub = TestHub::start().await;
    generate_ca(&hub, "fleet-ca").await;
    let listed = hub.service().get("/simdevice/certificates").await.body;
    assert_eq!(listed["value"][0]["name"], "fleet-ca");
    assert_eq!(listed["value"][0]["canIssue"], true);
    assert!(!listed.to_string().contains("PRIVATE KEY"));
    assert_eq!(register(&hub, "ca-door", ca_signed()).await.status, 200);
    let files = tempfile::tempdir().unwrap();
    let issued = issue(&hub, "ca-door", Some("fleet-ca"), 30).await;
    let agent = x509_agent(&hub, "ca-door", write_pair(files.path(), "d", &issued));
    assert_works(&hub, "ca-door").await;
    agent.stop().await;
    hub.stop().await;
}

/// `--x509-ca FILE`: a CA whose key the hub never saw.
#[tokio::test]
async fn a_ca_given_on_the_command_line_is_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "outside CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca = params.self_signed(&ca_key).unwrap();
    let ca_file: PathBuf = dir.path().join("outside-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let hub = TestHub::start_with(|config| config.x509_cas = vec![ca_file.clone()]).await;

    let mut leaf = rcgen::CertificateParams::default();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "outside-door");
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = leaf.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    let issued = Issued {
        cert_pem: leaf.pem(),
        key_pem: leaf_key.serialize_pem(),
        sha1: String::new(),
        sha256: String::new(),
    };
    assert_eq!(
        register(&hub, "outside-door", ca_signed()).await.status,
        200
    );
    let code = raw_connect(&hub, "outside-door", Some(&issued), "").await;
    assert_eq!(code, ConnectReturnCode::Success);
    // A CA from the command line cannot be deleted through the API.
    let name = format!("file:{}", ca_file.display());
    let path = format!("/simdevice/certificates/{}", urlencode(&name));
    let reply = hub.service().call(Method::DELETE, &path, None, &[]).await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    hub.stop().await;
}

fn urlencode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[tokio::test]
async fn every_other_certificate_is_refused_with_connack_5() {
    let hub = TestHub::start().await;
    generate_ca(&hub, "good-ca").await;
    generate_ca(&hub, "gone-ca").await;
    assert_eq!(register(&hub, "ca-dev", ca_signed()).await.status, 200);
    let own = issue(&hub, "ss-dev", None, 30).await;
    assert_eq!(
        register(&hub, "ss-dev", self_signed(&own.sha256, None))
            .await
            .status,
        200
    );
    let sas_key = hub.add_device("sas-dev");

    // The control: each device with its right certificate is accepted.
    let right = issue(&hub, "ca-dev", Some("good-ca"), 30).await;
    assert_eq!(
        raw_connect(&hub, "ca-dev", Some(&right), "").await,
        ConnectReturnCode::Success
    );
    assert_eq!(
        raw_connect(&hub, "ss-dev", Some(&own), "").await,
        ConnectReturnCode::Success
    );

    let refused = ConnectReturnCode::NotAuthorized;
    // Wrong CN: signed by a trusted CA for another device.
    let wrong_cn = issue(&hub, "someone-else", Some("good-ca"), 30).await;
    assert_eq!(
        raw_connect(&hub, "ca-dev", Some(&wrong_cn), "").await,
        refused
    );
    // Unknown thumbprint.
    let stranger = issue(&hub, "ss-dev", None, 30).await;
    assert_eq!(
        raw_connect(&hub, "ss-dev", Some(&stranger), "").await,
        refused
    );
    // Expired, CA-signed and self-signed.
    let expired = issue(&hub, "ca-dev", Some("good-ca"), -1).await;
    assert_eq!(
        raw_connect(&hub, "ca-dev", Some(&expired), "").await,
        refused
    );
    let expired_own = issue(&hub, "ss-expired", None, -1).await;
    assert_eq!(
        register(&hub, "ss-expired", self_signed(&expired_own.sha1, None))
            .await
            .status,
        200
    );
    assert_eq!(
        raw_connect(&hub, "ss-expired", Some(&expired_own), "").await,
        refused
    );
    // From a CA the hub no longer trusts.
    let other_ca = issue(&hub, "ca-dev", Some("gone-ca"), 30).await;
    let reply = hub
        .service()
        .call(Method::DELETE, "/simdevice/certificates/gone-ca", None, &[])
        .await;
    assert_eq!(reply.status, 204);
    assert_eq!(
        raw_connect(&hub, "ca-dev", Some(&other_ca), "").await,
        refused
    );
    // Self-signed for a certificateAuthority device: no chain.
    let unchained = issue(&hub, "ca-dev", None, 30).await;
    assert_eq!(
        raw_connect(&hub, "ca-dev", Some(&unchained), "").await,
        refused
    );
    // An X.509 device with no certificate, and with a SAS token instead.
    assert_eq!(raw_connect(&hub, "ca-dev", None, "").await, refused);
    let token = device_token("ss-dev", &"A".repeat(44));
    assert_eq!(raw_connect(&hub, "ss-dev", None, &token).await, refused);
    // A SAS device presenting a certificate but a bad token; its good token still works.
    let bad = device_token("sas-dev", "c2ltZGV2aWNlLXdyb25nLWtleS0xMjM0NTY3ODkw");
    let cert = issue(&hub, "sas-dev", None, 30).await;
    assert_eq!(
        raw_connect(&hub, "sas-dev", Some(&cert), &bad).await,
        refused
    );
    let good = device_token("sas-dev", &sas_key);
    assert_eq!(
        raw_connect(&hub, "sas-dev", Some(&cert), &good).await,
        ConnectReturnCode::Success
    );
    assert_eq!(
        raw_connect(&hub, "sas-dev", None, &good).await,
        ConnectReturnCode::Success
    );
    hub.stop().await;
}

#[tokio::test]
async fn an_expired_certificate_is_a_configuration_error_for_the_agent() {
    let hub = TestHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let expired = issue(&hub, "old-door", None, -1).await;
    let files = write_pair(dir.path(), "old", &expired);
    let toml = format!(
        "[identity]\nconnection_string = \"HostName=localhost;DeviceId=old-door;x509=true\"\n\
         certificate_file = \"{}\"\nprivate_key_file = \"{}\"\n",
        files.certificate_file.display(),
        files.private_key_file.display()
    );
    let config_file = dir.path().join("config.toml");
    std::fs::write(&config_file, toml).unwrap();
    let error = simdevice::config::Config::load(Some(&config_file)).unwrap_err();
    let message = simdevice::common::logging::error_chain(&error);
    assert!(message.contains("expired"), "{message}");

    // x509=true without the files names both keys.
    std::fs::write(
        &config_file,
        "[identity]\nconnection_string = \"HostName=localhost;DeviceId=d;x509=true\"\n",
    )
    .unwrap();
    let message = simdevice::config::Config::load(Some(&config_file))
        .unwrap_err()
        .to_string();
    assert!(message.contains("identity.certificate_file"), "{message}");
    assert!(message.contains("identity.private_key_file"), "{message}");

    // A key file others can read is refused, as identity.key_file is.
    let fresh = issue(&hub, "new-door", None, 30).await;
    let files = write_pair(dir.path(), "new", &fresh);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        &files.private_key_file,
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let toml = format!(
        "[identity]\nconnection_string = \"HostName=localhost;DeviceId=new-door;x509=true\"\n\
         certificate_file = \"{}\"\nprivate_key_file = \"{}\"\n",
        files.certificate_file.display(),
        files.private_key_file.display()
    );
    std::fs::write(&config_file, toml).unwrap();
    let message = simdevice::config::Config::load(Some(&config_file))
        .unwrap_err()
        .to_string();
    assert!(message.contains("chmod 600"), "{message}");
    std::fs::set_permissions(
        &files.private_key_file,
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let config = simdevice::config::Config::load(Some(&config_file)).unwrap();
    assert!(config.identity.x509.is_some());
    hub.stop().await;
}
