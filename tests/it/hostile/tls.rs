//! TLS verification: the agent never talks to a hub whose certificate another CA signed, and
//! no code in the crate can turn verification off.

use serde_json::json;
use simdevice::config::Secret;

use super::*;
use crate::common::agent::{eventually, RunningAgent};

#[tokio::test]
async fn an_agent_never_connects_to_a_hub_signed_by_another_ca() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let other = tempfile::tempdir().unwrap();
    let other_ca = simdevice::hub::tls::load_or_create(other.path(), &[])
        .unwrap()
        .ca_file;
    let mut config = agent_config("d1", other_ca, hub.hub.mqtt_addr());
    config.identity.key = Secret::new(key);
    let agent = RunningAgent::start(config);
    // Three failed attempts (the TLS handshake refused each) and readings queued meanwhile.
    eventually(Duration::from_secs(15), || async {
        (agent.reconnects("failed") >= 3 && agent.counter(|c| &c.readings_produced) > 3)
            .then_some(())
    })
    .await;
    let mut tally = Tally::new(
        "tls-verification",
        "no connection to a hub whose certificate another CA signed; readings stay queued",
    );
    let connects = agent.counter(|c| &c.connects);
    let produced = agent.counter(|c| &c.readings_produced);
    let acknowledged = agent.counter(|c| &c.readings_acknowledged);
    let reason = agent
        .handle
        .ctx
        .counters()
        .last_disconnect()
        .unwrap_or_default();
    let events = hub
        .service()
        .get("/simdevice/events?deviceId=d1")
        .await
        .body;
    eprintln!("another CA: {connects} connects, {produced} produced, last disconnect {reason:?}");
    tally.check(
        "the hub's certificate from another CA",
        if connects == 0 && acknowledged == 0 && produced > 3 && events == json!([]) && reason.contains("certificate") {
            Ok(())
        } else {
            Err(format!("{connects} connects, {acknowledged}/{produced} readings acknowledged, events {events}, reason {reason:?}"))
        },
    );
    tally.finish();
    agent.stop().await;
    hub.stop().await;
}

/// No code path turns certificate verification off: no custom verifier, no "dangerous" or
/// "insecure" option, in the agent, the service client or anywhere else in the crate.
#[test]
fn no_code_can_turn_tls_verification_off() {
    let forbidden = [
        "dangerous(",
        "danger_accept_invalid",
        "ServerCertVerifier",
        "accept_invalid_hostnames",
        "NoCertificateVerification",
        "insecure",
        "skip_verify",
        "verify_peer",
    ];
    let mut found = Vec::new();
    let mut files = 0;
    let mut stack = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files += 1;
                let text = std::fs::read_to_string(&path).unwrap();
                for word in forbidden {
                    if text.to_lowercase().contains(&word.to_lowercase()) {
                        found.push(format!("{}: {word}", path.display()));
                    }
                }
            }
        }
    }
    assert!(files > 20, "read the crate's sources ({files} files)");
    assert!(
        found.is_empty(),
        "TLS verification could be turned off: {found:?}"
    );
}
