//! The command-line interface: the clap command tree, nothing else. Each verb's work is in
//! `commands::*`. The verbs a build has follow its features (`hub`, `service`,
//! `fleet`, `archive`).

use clap::{Parser, Subcommand};

use crate::common::logging::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "simdevice",
    version,
    about = "A simulated Azure IoT device, and a local Azure IoT Hub to run it against"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the device agent (the daemon): telemetry, twin, direct methods.
    Run(crate::commands::run::RunArgs),
    /// Register the device with the Device Provisioning Service ([provisioning]) and cache
    /// where it is assigned.
    Provision(crate::commands::provision::ProvisionArgs),
    /// Check the agent's configuration.
    Config(crate::commands::config::ConfigArgs),
    /// Run a local emulator of Azure IoT Hub (device MQTT on 8883, service REST API on 8443).
    #[cfg(feature = "hub")]
    Hub(Box<crate::commands::hub::HubArgs>),
    /// Talk to the service API of an IoT Hub, real or local.
    #[cfg(feature = "service")]
    Service(crate::commands::service::ServiceArgs),
    /// Run many simulated devices in one process: one shard of a device range, with a report.
    #[cfg(feature = "fleet")]
    Fleet(Box<crate::commands::fleet::FleetArgs>),
    /// Read a telemetry archive (Avro capture files): `archive to-csv`, one CSV per device.
    #[cfg(feature = "archive")]
    Archive(crate::commands::archive::ArchiveArgs),
    /// Check the configuration, DNS, TCP, TLS, clock and authentication against the hub.
    Doctor(crate::commands::doctor::DoctorArgs),
    /// Print a shell completion script (bash, zsh, fish, ...).
    Completions(crate::commands::generate::CompletionsArgs),
    /// Print the man page (roff).
    Man,
}
