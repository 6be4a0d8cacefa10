//! `simdevice run --local`: the local IoT Hub started in this process, the device registered
//! there, and the agent's configuration pointing at it (its CA trusted, its outbox kept with
//! the hub's state), so the whole thing works with no Azure account and no set-up.

use std::path::PathBuf;

use crate::common::local_hub::default_state_dir;
use crate::config::{Config, Identity, Secret};
use crate::hub::error::IotHubError;
use crate::hub::registry::DeviceSpec;
use crate::hub::{Hub, HubConfig, HubError};

#[derive(Debug, clap::Args)]
pub struct LocalArgs {
    /// With --local: the hub's state directory [default: the per-user data directory, the
    /// same `simdevice hub` and `simdevice service --local` use]
    #[arg(long, requires = "local", env = "SIMDEVICE_HUB_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// With --local: the device id to register and run as.
    #[arg(long, requires = "local", default_value = "door-01")]
    pub device_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot start the local hub")]
    Hub(#[from] HubError),
    #[error("cannot register {device_id} in the local hub")]
    Register {
        device_id: String,
        #[source]
        source: IotHubError,
    },
}

impl LocalError {
    /// A state directory the hub cannot use (in use by another process, wrong modes) or a
    /// device id the registry refuses: the command line or the machine's set-up is at fault.
    pub fn is_config(&self) -> bool {
        match self {
            LocalError::Hub(error) => error.is_config(),
            LocalError::Register { .. } => true,
        }
    }
}

/// Starts the embedded hub, registers the device, prints how to reach both, and returns the
/// agent's configuration with the running hub (stop it after the agent).
pub async fn start(args: &LocalArgs) -> Result<(Config, Hub), LocalError> {
    let state_dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
    let mut hub_config = HubConfig::ephemeral(&state_dir);
    hub_config.auto_register = false;
    let hub = Hub::start(hub_config).await?;
    let register = |source| LocalError::Register {
        device_id: args.device_id.clone(),
        source,
    };
    let registry = &hub.state().registry;
    if !registry.contains(&args.device_id) {
        registry
            .create(DeviceSpec::enabled(&args.device_id))
            .map_err(register)?;
    }
    let key = registry
        .get(&args.device_id, |d| d.primary_key.clone())
        .map_err(register)?;
    let info = hub.info().clone();
    let identity = Identity {
        host_name: info.hostname.clone(),
        device_id: args.device_id.clone(),
        key: Secret::new(key),
        gateway_host_name: Some(format!("localhost:{}", info.mqtt_port)),
        ca_file: Some(info.ca_file.clone()),
        x509: None,
    };
    let id = &args.device_id;
    println!("simdevice: running device {id} against a local IoT Hub");
    println!("  hub state: {} (hub.json)", state_dir.display());
    println!(
        "  device MQTT/TLS: localhost:{}   service HTTPS: localhost:{}",
        info.mqtt_port, info.api_port
    );
    println!("From another terminal:");
    println!("  simdevice service --local invoke {id} lockDoor '{{\"lockTime\":\"10m\"}}'");
    println!("  simdevice service --local twin show {id}");
    println!(
        "  simdevice service --local twin update {id} --desired '{{\"telemetryInterval\":5}}'"
    );
    println!("  simdevice service --local events {id}");
    println!("Ctrl-C stops both.");
    let mut config = Config::for_identity(identity);
    // Each device's outbox and state live with the hub's state, so `--local` needs no set-up.
    config.outbox.path = Some(state_dir.join("agents").join(id).join("outbox.db"));
    Ok((config, hub))
}
