//! The command-line interface: the clap command tree, nothing else. Each verb's work is in
//! `commands::*` (and `service::cli` for `simdevice service`).

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the device agent (the daemon): telemetry, twin, direct methods.
    Run(crate::commands::run::RunArgs),
    /// Check the agent's configuration.
    Config(crate::commands::config::ConfigArgs),
    /// Run a local emulator of Azure IoT Hub (device MQTT on 8883, service REST API on 8443).
    Hub(HubArgs),
    /// Talk to the service API of an IoT Hub, real or local.
    Service(crate::service::cli::ServiceArgs),
    /// Check the configuration, DNS, TCP, TLS, clock and authentication against the hub.
    Doctor(crate::commands::doctor::DoctorArgs),
    /// Print a shell completion script (bash, zsh, fish, ...).
    Completions(crate::commands::generate::CompletionsArgs),
    /// Print the man page (roff).
    Man,
}

#[derive(Debug, clap::Args)]
pub struct HubArgs {
    /// Directory for the hub's CA, keys, registry and twins [default: the per-user data directory]
    #[arg(long, env = "SIMDEVICE_HUB_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Address to listen on. Loopback by default; anything else exposes the hub to the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: IpAddr,
    /// Port for device MQTT over TLS (0 picks a free port, reported in hub.json).
    #[arg(long, default_value_t = crate::hub::DEFAULT_MQTT_PORT)]
    pub mqtt_port: u16,
    /// Port for the service REST API over HTTPS (0 picks a free port).
    #[arg(long, default_value_t = crate::hub::DEFAULT_API_PORT)]
    pub api_port: u16,
    /// Extra host name for the server certificate (repeatable).
    #[arg(long = "hostname")]
    pub hostnames: Vec<String>,
    /// Register any device whose key derives from the hub's group key on its first connect.
    #[arg(long)]
    pub auto_register: bool,
    /// Register this device at start-up if it does not exist yet (repeatable).
    #[arg(long = "device")]
    pub devices: Vec<String>,
    /// Serve /healthz and /metrics (Prometheus) over plain HTTP at this address, e.g.
    /// 127.0.0.1:9101 [default: off]
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// The default place for the hub's state: `$XDG_DATA_HOME/simdevice/hub` or its equivalent.
pub fn default_hub_state_dir() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("simdevice")
        .join("hub")
}
