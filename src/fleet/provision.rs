//! `simdevice fleet --dps`: every device of the slice registers with the Device Provisioning
//! Service before any connects to a hub, at a bounded rate, and then connects as DPS
//! assigned it (hub host name and device id).
//!
//! Registrations start at most `rate` per second (DPS throttles registrations per instance);
//! at most [`IN_FLIGHT`] are open at once. A 429 is waited out as its `retry-after` says (in
//! `agent::provision`); a registration that fails for a transient reason (network, timeout,
//! 5xx) is tried again up to [`ATTEMPTS`] times with backoff; a refusal (wrong key, disabled
//! enrollment) ends the provisioning with that device's reason. Uses the agent's registration
//! client; knows nothing of the run that follows.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::devices::FleetDevice;
use crate::agent::backoff::Backoff;
use crate::agent::provision::{self, ProvisionError, Registration};

/// Registrations open at the same time, at most.
pub const IN_FLIGHT: usize = 32;
/// Tries of one device's registration when it fails for a transient reason.
pub const ATTEMPTS: u32 = 5;

/// Where and how the slice registers.
#[derive(Clone)]
pub struct DpsSettings {
    pub host: String,
    pub port: u16,
    /// MQTT over TLS or over WebSocket, as the fleet's `--transport`.
    pub transport: crate::config::Transport,
    /// The HTTP proxy to tunnel through, if any.
    pub proxy: Option<crate::config::Proxy>,
    pub id_scope: String,
    pub tls: Arc<rustls::ClientConfig>,
    /// Registrations started per second.
    pub rate: f64,
    /// Dial the assigned hub here instead (`host:port`), as `--gateway` does.
    pub gateway_host_name: Option<String>,
    /// One registration's deadline.
    pub deadline: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetProvisionError {
    #[error("device {device_id} could not be provisioned")]
    Device {
        device_id: String,
        #[source]
        source: ProvisionError,
    },
    #[error("provisioning was stopped")]
    Stopped,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn register_one(
    registration: Registration,
    stop: CancellationToken,
) -> Result<provision::Assignment, ProvisionError> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut attempt = 1;
    loop {
        match provision::register(&registration, now_unix()).await {
            Err(error) if error.is_transient() && attempt < ATTEMPTS => {
                let delay = backoff.next_delay();
                tracing::warn!(device = %registration.registration_id, attempt, error = %crate::common::logging::error_chain(&error),
                    "DPS registration failed; trying again");
                tokio::select! {
                    _ = stop.cancelled() => return Err(error),
                    _ = tokio::time::sleep(delay) => {}
                }
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Registers every device (its id is the registration id, its key the derived one, or its
/// certificate for an X.509 device) and
/// returns them as assigned, in the same order.
pub async fn provision_all(
    devices: Vec<FleetDevice>,
    settings: &DpsSettings,
    stop: &CancellationToken,
) -> Result<Vec<FleetDevice>, FleetProvisionError> {
    let gap = if settings.rate > 0.0 {
        Duration::from_secs_f64(1.0 / settings.rate)
    } else {
        Duration::ZERO
    };
    let mut assigned: Vec<Option<FleetDevice>> = vec![None; devices.len()];
    let mut running = JoinSet::new();
    let mut next_start = tokio::time::Instant::now();
    let mut pending = devices.into_iter().enumerate();
    let mut exhausted = false;
    loop {
        // Start the next device when its turn has come and there is room.
        if !exhausted && running.len() < IN_FLIGHT {
            tokio::select! {
                _ = stop.cancelled() => return Err(FleetProvisionError::Stopped),
                _ = tokio::time::sleep_until(next_start) => {}
            }
            match pending.next() {
                Some((index, device)) => {
                    let registration = Registration {
                        host: settings.host.clone(),
                        port: settings.port,
                        transport: settings.transport,
                        proxy: settings.proxy.clone(),
                        // An X.509 device registers with its certificate and no key.
                        tls: match &device.certificate {
                            Some(c) => super::x509::with_certificate(&settings.tls, c.clone()),
                            None => settings.tls.clone(),
                        },
                        id_scope: settings.id_scope.clone(),
                        registration_id: device.device_id.clone(),
                        device_key: device.key.expose().to_string(),
                        payload: None,
                        deadline: settings.deadline,
                    };
                    let stop = stop.clone();
                    running.spawn(async move {
                        (index, device, register_one(registration, stop).await)
                    });
                    next_start += gap;
                    continue;
                }
                None => exhausted = true,
            }
        }
        let Some(joined) = (tokio::select! {
            _ = stop.cancelled() => return Err(FleetProvisionError::Stopped),
            joined = running.join_next() => joined,
        }) else {
            break;
        };
        let Ok((index, device, result)) = joined else {
            continue; // a panicked task: its device stays unassigned and is reported below
        };
        match result {
            Ok(assignment) => {
                assigned[index] = Some(FleetDevice {
                    device_id: assignment.device_id,
                    host_name: assignment.assigned_hub,
                    gateway_host_name: settings.gateway_host_name.clone(),
                    key: device.key,
                    certificate: device.certificate,
                });
            }
            Err(source) => {
                return Err(FleetProvisionError::Device {
                    device_id: device.device_id,
                    source,
                })
            }
        }
    }
    let count = assigned.len();
    let done: Vec<FleetDevice> = assigned.into_iter().flatten().collect();
    if done.len() != count {
        return Err(FleetProvisionError::Stopped);
    }
    tracing::info!(devices = count, "every device of the slice is provisioned");
    Ok(done)
}
