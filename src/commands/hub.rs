//! `simdevice hub`: start the local IoT Hub, print how to reach it, run until SIGINT/SIGTERM.

use std::io::Write;

use crate::cli::{default_hub_state_dir, HubArgs};
use crate::hub::registry::{DeviceSpec, DeviceStatus};
use crate::hub::{Hub, HubConfig, HubError};

pub async fn run(args: HubArgs) -> Result<(), HubError> {
    let state_dir = args.state_dir.unwrap_or_else(default_hub_state_dir);
    let hub = Hub::start(HubConfig {
        state_dir: state_dir.clone(),
        bind: args.bind,
        mqtt_port: args.mqtt_port,
        api_port: args.api_port,
        hostnames: args.hostnames,
        auto_register: args.auto_register,
    })
    .await?;
    for id in &args.devices {
        if !hub.state().registry.contains(id) {
            hub.state().registry.create(DeviceSpec {
                id: id.clone(),
                status: DeviceStatus::Enabled,
                status_reason: None,
                primary_key: None,
                secondary_key: None,
            })?;
        }
    }
    print_banner(&hub, &state_dir);
    wait_for_signal().await;
    tracing::info!("stopping the hub");
    hub.shutdown().await;
    Ok(())
}

/// What a user needs to reach the hub; connection strings carry keys, so they go to stdout
/// (the user's terminal), never to the log.
fn print_banner(hub: &Hub, state_dir: &std::path::Path) {
    let info = hub.info();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "simdevice hub is running");
    let _ = writeln!(out, "  host name:        {}", info.hostname);
    let _ = writeln!(out, "  device MQTT/TLS:  {}", hub.mqtt_addr());
    let _ = writeln!(out, "  service HTTPS:    {}", hub.api_addr());
    let _ = writeln!(out, "  trust this CA:    {}", info.ca_file.display());
    let _ = writeln!(
        out,
        "  state directory:  {} (hub.json has all of this)",
        state_dir.display()
    );
    let _ = writeln!(out, "  service connection string (iothubowner):");
    let _ = writeln!(out, "    {}", info.service_connection_string);
    if info.group_key.is_some() {
        let _ = writeln!(out, "  auto-register: on (group key in hub.json)");
    }
    let ids = hub.state().registry.ids();
    if ids.is_empty() {
        let _ = writeln!(
            out,
            "  no devices yet: `simdevice service --local device create ID`"
        );
    } else {
        let _ = writeln!(out, "  devices:");
        for id in ids {
            if let Some(cs) = hub.device_connection_string(&id) {
                let _ = writeln!(out, "    {id}: {cs}");
            }
        }
    }
    let _ = writeln!(out, "Press Ctrl-C to stop.");
    let _ = out.flush();
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the hub");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
