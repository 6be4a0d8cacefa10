//! `iothub-connection-auth-method` through the real path: a SAS device, a self-signed
//! (thumbprint) device and a CA-signed device each send a reading over MQTT/TLS, and an AMQP
//! receiver on the Event Hubs-compatible endpoint, the recent-events extension and capture's
//! Avro files all show how that device authenticated. A twin change the hub makes carries no
//! auth method at all.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{Body, Message, Source};
use fe2o3_amqp::types::primitives::{Symbol, Value};
use fe2o3_amqp::{Connection, Receiver, Session};
use reqwest::Method;
use rumqttc::{Connect, ConnectReturnCode, Login, Packet};
use serde_json::json;
use simdevice::hub::capture::{CaptureSettings, Codec, Destination, Encoding, Format};
use simdevice::hub::events::partition_of;
use tokio::net::TcpStream;

use crate::common::{user_name, RawDevice, TestHub};

const DEADLINE: Duration = Duration::from_secs(10);

/// What IoT Hub stamps for each kind of device (see `AuthMethod::as_json` for the sources).
const SAS: &str =
    r#"{"scope":"device","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}"#;
const X509: &str = r#"{"scope":"device","type":"x509Certificate","issuer":"external","acceptingIpFilterRule":null}"#;

/// A device certificate and key issued by the hub (self-signed without `ca`), and its SHA-1
/// thumbprint.
async fn issue(hub: &TestHub, device: &str, ca: Option<&str>) -> (String, String, String) {
    let reply = hub
        .service()
        .call(
            Method::POST,
            "/simdevice/device-certificates",
            Some(json!({"deviceId": device, "ca": ca, "days": 30})),
            &[],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let text = |name: &str| reply.body[name].as_str().unwrap().to_string();
    (
        text("certificate"),
        text("privateKey"),
        text("thumbprintSha1"),
    )
}

/// `PUT /devices/{id}` with `authentication`, as the service SDKs send it.
async fn register(hub: &TestHub, id: &str, authentication: serde_json::Value) {
    let body = json!({"deviceId": id, "status": "enabled", "authentication": authentication});
    let reply = hub
        .service()
        .call(Method::PUT, &format!("/devices/{id}"), Some(body), &[])
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

/// A device connected over TLS with its certificate and no SAS token.
async fn x509_device(hub: &TestHub, id: &str, cert_pem: &str, key_pem: &str) -> RawDevice {
    let mut roots = rustls::RootCertStore::empty();
    for cert in simdevice::common::pem::parse_pem_certificates(&hub.ca_pem()).unwrap() {
        roots.add(cert).unwrap();
    }
    let chain = simdevice::common::pem::parse_pem_certificates(cert_pem).unwrap();
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .unwrap()
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut device = RawDevice::open_at(hub.hub.mqtt_addr(), connector).await;
    let mut connect = Connect::new(id);
    connect.keep_alive = 60;
    connect.login = Some(Login::new(user_name(id), ""));
    device.send(Packet::Connect(connect)).await;
    match device.recv().await {
        Some(Packet::ConnAck(ack)) => assert_eq!(ack.code, ConnectReturnCode::Success, "{id}"),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    device
}

/// The three devices of these tests, each with one reading sent and acknowledged; a reported
/// patch from the SAS device too (a twin change event in its partition).
const DEVICES: [(&str, &str); 3] = [
    ("auth-sas", SAS),
    ("auth-self-signed", X509),
    ("auth-ca-signed", X509),
];

async fn send_from_each(hub: &TestHub) {
    let key = hub.add_device("auth-sas");
    let mut sas = RawDevice::connect(hub, "auth-sas", &key).await;

    let (cert, key, sha1) = issue(hub, "auth-self-signed", None).await;
    register(
        hub,
        "auth-self-signed",
        json!({"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": sha1}}),
    )
    .await;
    let mut self_signed = x509_device(hub, "auth-self-signed", &cert, &key).await;

    let reply = hub
        .service()
        .call(
            Method::POST,
            "/simdevice/certificates/auth-ca/generate",
            None,
            &[],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    register(
        hub,
        "auth-ca-signed",
        json!({"type": "certificateAuthority"}),
    )
    .await;
    let (cert, key, _) = issue(hub, "auth-ca-signed", Some("auth-ca")).await;
    let mut ca_signed = x509_device(hub, "auth-ca-signed", &cert, &key).await;

    for (device, id) in [
        (&mut sas, "auth-sas"),
        (&mut self_signed, "auth-self-signed"),
        (&mut ca_signed, "auth-ca-signed"),
    ] {
        device
            .publish_acked(
                &format!("devices/{id}/messages/events/"),
                format!("{{\"from\":\"{id}\"}}"),
            )
            .await;
    }
    sas.subscribe("$iothub/twin/res/#", rumqttc::QoS::AtLeastOnce)
        .await;
    let (status, _, _) = sas.twin_patch("1", r#"{"door":"open"}"#).await;
    assert_eq!(status, 204);
}

fn annotation<'a>(message: &'a Message<Body<Value>>, key: &str) -> Option<&'a Value> {
    message
        .message_annotations
        .as_ref()?
        .0
        .get(&OwnedKey::Symbol(Symbol::from(key)))
}

fn text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        other => panic!("not a string: {other:?}"),
    }
}

/// Every event of `device`'s partition until its telemetry and (for the SAS device) its twin
/// change have come: (message source, auth method annotation) of each of `device`'s events.
async fn events_of(hub: &TestHub, device: &str, want: usize) -> Vec<(String, Option<String>)> {
    let addr = hub.hub.amqp_plain_addr().expect("a plain listener");
    let key = hub
        .hub
        .state()
        .policies
        .get("service")
        .unwrap()
        .primary_key
        .clone();
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut connection = Connection::builder()
        .container_id("it-auth-method")
        .hostname("localhost")
        .sasl_profile(SaslProfile::Plain {
            username: "service".into(),
            password: key,
        })
        .open_with_stream(stream)
        .await
        .unwrap();
    let mut session = Session::begin(&mut connection).await.unwrap();
    let partition = partition_of(device, 4);
    let source = Source::builder()
        .address(format!(
            "localhost/ConsumerGroups/$Default/Partitions/{partition}"
        ))
        .add_to_filter_using_legacy_format(
            "apache.org:selector-filter:string",
            Value::Described(Box::new(serde_amqp::described::Described {
                descriptor: serde_amqp::descriptor::Descriptor::Name(Symbol::from(
                    "apache.org:selector-filter:string",
                )),
                value: Value::String("amqp.annotation.x-opt-offset > '-1'".into()),
            })),
        )
        .build();
    let mut receiver = Receiver::builder()
        .name(format!("r-{device}"))
        .source(source)
        .attach(&mut session)
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < want {
        let delivery = tokio::time::timeout(DEADLINE, receiver.recv::<Body<Value>>())
            .await
            .unwrap_or_else(|_| panic!("{device}: only {seen:?} within the deadline"))
            .unwrap();
        receiver.accept(&delivery).await.unwrap();
        let message = delivery.into_message();
        if text(annotation(&message, "iothub-connection-device-id")).as_deref() != Some(device) {
            continue; // another device of the same partition
        }
        seen.push((
            text(annotation(&message, "iothub-message-source")).unwrap(),
            text(annotation(&message, "iothub-connection-auth-method")),
        ));
    }
    let _ = receiver.close().await;
    let _ = connection.close().await;
    seen
}

#[tokio::test]
async fn each_device_s_events_say_how_it_authenticated_on_the_endpoint_and_in_recent_events() {
    let hub = TestHub::start().await;
    send_from_each(&hub).await;

    for (device, want) in DEVICES {
        let expected = if device == "auth-sas" { 2 } else { 1 };
        let events = events_of(&hub, device, expected).await;
        assert_eq!(
            events[0],
            ("Telemetry".to_string(), Some(want.to_string())),
            "{device} on the Event Hubs endpoint"
        );
        if device == "auth-sas" {
            // The hub made this one: no connection's authentication to stamp.
            assert_eq!(events[1], ("twinChangeEvents".to_string(), None));
        }
        let recent = hub.service().events(device).await;
        assert_eq!(recent.len(), 1, "{device}: {recent:?}");
        assert_eq!(
            recent[0]["systemProperties"]["iothub-connection-auth-method"], want,
            "{device} in /simdevice/events"
        );
    }
    hub.stop().await;
}

/// Every record of the Avro files under `root` (capture's temporaries start with a dot).
fn captured(root: &Path) -> Vec<HashMap<String, apache_avro::types::Value>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name().unwrap().to_string_lossy().starts_with('.') {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            for record in apache_avro::Reader::new(&bytes[..]).unwrap() {
                match record.unwrap() {
                    apache_avro::types::Value::Record(fields) => {
                        out.push(fields.into_iter().collect())
                    }
                    other => panic!("not a record: {other:?}"),
                }
            }
        }
    }
    out
}

fn avro_text(value: &apache_avro::types::Value) -> &str {
    match value {
        apache_avro::types::Value::String(s) => s,
        apache_avro::types::Value::Union(_, inner) => avro_text(inner),
        other => panic!("not a string: {other:?}"),
    }
}

#[tokio::test]
async fn capture_records_say_how_each_device_authenticated() {
    let out = tempfile::tempdir().unwrap();
    let settings = CaptureSettings {
        destination: Destination::Directory(out.path().to_owned()),
        format: Format::IotHub,
        codec: Codec::Null,
        encoding: Encoding::Avro,
        window: Duration::from_secs(300),
        window_bytes: 314_572_800,
        skip_empty: true,
    };
    let hub = TestHub::start_with(|c| c.capture = Some(settings)).await;
    send_from_each(&hub).await;
    // Stopping the hub writes the open window.
    hub.stop().await;

    let mut methods: Vec<(String, String)> = captured(out.path())
        .iter()
        .map(|record| {
            let apache_avro::types::Value::Map(system) = &record["SystemProperties"] else {
                panic!("SystemProperties is not a map")
            };
            (
                avro_text(&system["connectionDeviceId"]).to_string(),
                avro_text(&system["connectionAuthMethod"]).to_string(),
            )
        })
        .collect();
    methods.sort();
    let mut want: Vec<(String, String)> = DEVICES
        .iter()
        .map(|(device, method)| (device.to_string(), method.to_string()))
        .collect();
    want.sort();
    assert_eq!(methods, want, "telemetry only, one record per device");
}
