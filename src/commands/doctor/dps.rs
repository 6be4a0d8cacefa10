//! The Device Provisioning Service checks of a configuration with `[provisioning]`: the DPS
//! endpoint's reachability (DNS, TCP, the proxy's tunnel, TLS, the WebSocket upgrade: the same
//! checks as the hub's, named `DPS ...`), the registration's MQTT CONNECT (its SAS token
//! against the enrollments: CONNACK 0 or 5), then where the device is assigned: the cached
//! assignment, or with `--register` a real registration.
//!
//! Why not always register: a registration re-runs the enrollment's allocation policy (the
//! device may be assigned to another hub, and a reprovisioning policy may migrate or reset
//! its twin data) and counts against DPS's registration quota. DPS's MQTT API has no
//! read-only lookup (the operation-status query needs the operation id of a registration in
//! progress), so without `--register` the check reads the agent's cache and the hub checks
//! that follow dial that hub. `--register` registers as the agent would and prints DPS's
//! answer (its error code and message when it refuses); it leaves the cache alone.
//!
//! Dials DPS only; never prints the key or the token.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::mqttbytes::v4::ConnectReturnCode;

use super::Check;
use crate::agent::mqtt::{Wire, WireError};
use crate::agent::provision::{self, Assignment, ProvisionError, Registration};
use crate::common::logging::error_chain;
use crate::config::{Config, Provisioning};

/// Longest wait for the CONNECT, and for the whole registration with `--register`.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

/// The registration the agent would make.
pub(super) fn registration(
    config: &Config,
    p: &Provisioning,
    tls: Arc<rustls::ClientConfig>,
) -> Registration {
    provision::registration_for(p, config.connection.transport, tls, REGISTER_TIMEOUT)
}

/// Renames a hub check (`DNS`, `TCP`, ...) as the DPS endpoint's, with DPS's hint for the
/// two whose hint names the hub's settings.
pub(super) fn as_dps(mut check: Check) -> Check {
    check.name = match check.name {
        "DNS" => "DPS DNS",
        "TCP" => "DPS TCP",
        "proxy CONNECT" => "DPS proxy CONNECT",
        "TLS" => "DPS TLS",
        "WebSocket" => "DPS WebSocket",
        other => other,
    };
    if check.status == super::Status::Fail && matches!(check.name, "DPS DNS" | "DPS TCP") {
        check.hint = Some(
            "check provisioning.global_endpoint (default global.azure-devices-provisioning.net; \
             a local hub: localhost:<dps_port>, or <dps_ws_port> with transport = \"websocket\") \
             and that outbound 8883 (MQTT) or 443 (WebSocket) is allowed"
                .into(),
        );
    }
    check
}

/// The registration's CONNECT, then DISCONNECT: whether an enrollment accepts its id and key.
pub(super) async fn connect(registration: &Registration) -> Check {
    const NAME: &str = "DPS CONNECT";
    let now = chrono::Utc::now().timestamp().max(0) as u64;
    let connect = match registration.connect_packet(now) {
        Ok(connect) => connect,
        Err(error) => {
            let hint = "the key (or group_key) must be base64";
            return Check::fail(NAME, error_chain(&error), hint);
        }
    };
    let endpoint = registration.endpoint();
    let id = &registration.registration_id;
    match tokio::time::timeout(STEP_TIMEOUT, Wire::open(&registration.dial(), &connect)).await {
        Ok(Ok((mut wire, _))) => {
            let _ = tokio::time::timeout(Duration::from_secs(2), wire.disconnect()).await;
            Check::ok(
                NAME,
                format!(
                    "CONNACK 0 (accepted) from {endpoint}: an enrollment accepts registration \
                     {id}'s key; disconnected"
                ),
            )
        }
        Ok(Err(WireError::Refused(code))) => {
            let hint = match code {
                ConnectReturnCode::ServiceUnavailable => {
                    "DPS is throttling or unavailable: try again later".to_string()
                }
                _ => format!(
                    "no enrollment accepts registration {id} with this key: check \
                     provisioning.id_scope and registration_id, the key (group_key derives the \
                     device key from the registration id), and that the enrollment exists"
                ),
            };
            Check::fail(
                NAME,
                format!(
                    "CONNACK {} from {endpoint} for registration {id}",
                    code as u8
                ),
                hint,
            )
        }
        Ok(Err(error)) => Check::fail(
            NAME,
            format!(
                "the MQTT connection to {endpoint} failed: {}",
                error_chain(&error)
            ),
            "the earlier checks passed, so DPS closed the connection: check the endpoint's port",
        ),
        Err(_) => Check::fail(
            NAME,
            format!(
                "no CONNACK from {endpoint} within {} s",
                STEP_TIMEOUT.as_secs()
            ),
            "DPS accepted TLS but did not answer CONNECT: check that the port serves DPS's MQTT",
        ),
    }
}

/// Where the device is assigned: with `register`, a registration now; else the agent's cache.
/// `None` when no hub is known (the hub checks cannot run).
pub(super) async fn assignment(
    config: &Config,
    p: &Provisioning,
    registration: &Registration,
    register: bool,
) -> (Check, Option<Assignment>) {
    const NAME: &str = "DPS registration";
    let cache = provision::cache_path(config);
    let cached = provision::load_cached(&cache, p);
    if !register {
        return match cached {
            Some(a) => (
                Check::ok(
                    NAME,
                    format!(
                        "cached assignment: hub {} as device {} ({}); not registered again \
                         (`doctor --register` does)",
                        a.assigned_hub,
                        a.device_id,
                        cache.display()
                    ),
                ),
                Some(a),
            ),
            None => (
                Check::warn(
                    NAME,
                    format!(
                        "no cached assignment ({}): the agent registers at its first start",
                        cache.display()
                    ),
                    "`simdevice provision` registers now; `simdevice doctor --register` \
                     registers and checks the assigned hub",
                ),
                None,
            ),
        };
    }
    let now = chrono::Utc::now().timestamp().max(0) as u64;
    match provision::register(registration, now).await {
        Ok(a) => {
            let moved = cached
                .as_ref()
                .is_some_and(|c| c.assigned_hub != a.assigned_hub || c.device_id != a.device_id);
            let detail = format!(
                "assigned to hub {} as device {}{}",
                a.assigned_hub,
                a.device_id,
                a.substatus
                    .as_deref()
                    .map(|s| format!(" (substatus {s})"))
                    .unwrap_or_default()
            );
            if moved {
                let hint = format!(
                    "the agent's cache ({}) names another hub or device: `simdevice provision \
                     --force` updates it (the agent also registers again when its hub refuses it)",
                    cache.display()
                );
                (Check::warn(NAME, detail, hint), Some(a))
            } else {
                (Check::ok(NAME, detail), Some(a))
            }
        }
        Err(error) => {
            let hint = match &error {
                ProvisionError::Refused { status: 401, .. } => {
                    "DPS refused the registration: is the enrollment (or its group) enabled, and \
                     does its attestation match this key?"
                }
                ProvisionError::Refused { status: 404, .. } => {
                    "DPS knows no such registration: check provisioning.id_scope and the \
                     enrollment"
                }
                ProvisionError::Refused { status: 429, .. } => {
                    "DPS is throttling registrations: try again later"
                }
                ProvisionError::Refused { .. } => {
                    "DPS's error code and message above say why; see the enrollment in the DPS \
                     service (simdevice service dps ... for a local hub)"
                }
                ProvisionError::Unauthorized { .. } => {
                    "the CONNECT was refused this time: check the enrollment and the key"
                }
                _ => "the CONNECT passed a moment ago: try again; check DPS's logs",
            };
            (Check::fail(NAME, error_chain(&error), hint), None)
        }
    }
}
