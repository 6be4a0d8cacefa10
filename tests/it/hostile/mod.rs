//! Hostile input, through the real network path (issue 4, "Hostile input" and "Access").
//!
//! The hub against floods of silent connections, slow clients, a device that never reads,
//! oversize and malformed packets, bad UTF-8, bad remaining lengths and deeply nested JSON;
//! a device trying every topic form to reach another device; every REST route under every
//! default policy; forged and misdirected tokens. The agent against a fake hub (TLS + the MQTT
//! codec) that accepts CONNECT and then misbehaves, and against a hub whose certificate comes
//! from another CA.
//!
//! One module per kind: `floods`, `malformed`, `access`, `tokens`, `misbehaving_hub` (the fake
//! hub itself is `common::fake_hub`), `tls`.
//!
//! Each group prints one line for `scripts/hostile-report`:
//! `HOSTILE: kind=K tried=N refused=M reaction=...`, where `refused` counts the bad inputs that
//! met the required reaction (refused, ignored, or survived, as `reaction` says); the test then
//! fails, naming every case that did not.

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use simdevice::config::Config;
use simdevice::protocol::sas;

use crate::common::*;

mod access;
mod floods;
mod malformed;
mod misbehaving_hub;
mod tls;
mod tokens;

// ---------------------------------------------------------------------------------------------
// Tally: one HOSTILE line per kind of bad input.

// ---------------------------------------------------------------------------------------------
// Tally: one HOSTILE line per kind of bad input.

struct Tally {
    kind: &'static str,
    reaction: &'static str,
    tried: usize,
    failures: Vec<String>,
}

impl Tally {
    fn new(kind: &'static str, reaction: &'static str) -> Tally {
        Tally {
            kind,
            reaction,
            tried: 0,
            failures: Vec::new(),
        }
    }

    /// One bad input: `Ok` if it met the required reaction, else what happened instead.
    fn check(&mut self, case: impl Display, outcome: Result<(), String>) {
        self.tried += 1;
        if let Err(what) = outcome {
            self.failures.push(format!("{case}: {what}"));
        }
    }

    fn finish(self) {
        println!(
            "HOSTILE: kind={} tried={} refused={} reaction=\"{}\"",
            self.kind,
            self.tried,
            self.tried - self.failures.len(),
            self.reaction
        );
        assert!(self.tried > 0, "{}: nothing was tried", self.kind);
        assert!(
            self.failures.is_empty(),
            "{}: {} of {} bad inputs did not get the required reaction ({}):\n  {}",
            self.kind,
            self.failures.len(),
            self.tried,
            self.reaction,
            self.failures.join("\n  ")
        );
    }
}

/// JSON nested `depth` levels deep: `{"a":{"a":...1...}}`, as text (a `Value` that deep
/// would overflow the stack when dropped).
fn nested_objects(depth: usize) -> String {
    format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
}

fn nested_arrays(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// Ok when the hub closes the connection before answering anything.
async fn closed_at_once(device: &mut RawDevice) -> Result<(), String> {
    match device.recv_within(Duration::from_secs(3)).await {
        Ok(None) => Ok(()),
        Ok(Some(packet)) => Err(format!("the hub answered {packet:?}")),
        Err(()) => Err("the connection is still open after 3 s".into()),
    }
}

/// A service REST client that sends any body and any Authorization header.
struct RawService {
    client: reqwest::Client,
    base: String,
    host: String,
}

impl RawService {
    fn new(hub: &TestHub) -> RawService {
        let host = format!("localhost:{}", hub.hub.api_addr().port());
        let ca = reqwest::Certificate::from_pem(hub.ca_pem().as_bytes()).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(ca)
            .resolve("localhost", hub.hub.api_addr())
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        RawService {
            client,
            base: format!("https://{host}"),
            host,
        }
    }

    fn policy_key(hub: &TestHub, policy: &str) -> String {
        hub.hub
            .state()
            .policies
            .get(policy)
            .expect("policy")
            .primary_key
            .clone()
    }

    fn token(&self, hub: &TestHub, policy: &str) -> String {
        sas::generate_token(
            &self.host,
            &Self::policy_key(hub, policy),
            Some(policy),
            now() + 3600,
        )
        .unwrap()
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        authorization: &str,
        body: Option<String>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{path}{sep}api-version=2021-04-12", self.base);
        let mut request = self
            .client
            .request(method, url)
            .header("Authorization", authorization);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request
                .header("Content-Type", "application/json")
                .body(body);
        }
        let response = request.send().await.expect("the hub answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

/// The agent's configuration for the hostile tests: a fresh key, and short connect and
/// keep-alive limits.
fn agent_config(id: &str, ca_file: PathBuf, mqtt: SocketAddr) -> Config {
    let key = sas::generate_key();
    let mut config = crate::common::agent::agent_config_with_ca(id, &key, ca_file, mqtt);
    config.telemetry.seed = Some(7);
    config.connection.connect_timeout = Duration::from_secs(1);
    // The shortest IoT Hub allows: a hub that stops making sense mid-packet (its bytes then
    // all read as the body of one long packet) is detected by the unanswered ping.
    config.connection.keep_alive = Duration::from_secs(5);
    config
}
