//! The local hub as its clients see it: `hub.json` (what `simdevice hub` writes into its state
//! directory for scripts, `simdevice service --local`, `simdevice doctor` and `run --local`),
//! the default state directory and the default ports. The hub writes this file; everything else
//! only reads it, so this leaf is all they need to know of the hub.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The default port of the local hub's service REST API (HTTPS). Devices use
/// [`crate::protocol::MQTT_TLS_PORT`].
pub const DEFAULT_API_PORT: u16 = 8443;

/// The default port of the local DPS's device endpoint. Azure's DPS listens on 8883 of its
/// own host; locally 8883 is the hub's, so the DPS takes the next port.
pub const DEFAULT_DPS_PORT: u16 = 8884;
/// The default port of the local DPS's device endpoint over WebSocket. Real DPS has it on its
/// own host's 443; locally 443 is the hub's WebSocket, so DPS's takes one of its own, above
/// 1024 so that an unprivileged hub (the container's uid 10001) gets it without falling back.
pub const DEFAULT_DPS_WS_PORT: u16 = 8444;

/// What `hub.json` says.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HubInfo {
    pub hostname: String,
    pub mqtt_port: u16,
    pub api_port: u16,
    /// MQTT over WebSocket (path `/$iothub/websocket`); 0 in files of older versions.
    #[serde(default)]
    pub ws_port: u16,
    pub ca_file: PathBuf,
    pub service_connection_string: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_key: Option<String>,
    /// With `simdevice hub --capture`: what is archived, and where. Absent in older files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CaptureInfo>,
    /// The local DPS's device endpoint (MQTT over TLS), when the hub serves one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dps_port: Option<u16>,
    /// The same endpoint over WebSocket (path `/$iothub/websocket`), when the hub serves one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dps_ws_port: Option<u16>,
    /// The local DPS's id scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_scope: Option<String>,
    /// The DPS service API's connection string (policy `provisioningserviceowner`; host:
    /// the hub's service HTTPS port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dps_service_connection_string: Option<String>,
    /// The Event Hubs-compatible endpoint's AMQP-over-TLS port. Absent in older files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amqp_port: Option<u16>,
    /// Its plain AMQP port, for clients in emulator mode (loopback unless widened).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amqp_plain_port: Option<u16>,
    /// `Endpoint=sb://...;SharedAccessKeyName=...;SharedAccessKey=...;EntityPath=...`, as the
    /// portal shows it (policy `service`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eventhub_connection_string: Option<String>,
    /// The same for the plain port, with `UseDevelopmentEmulator=true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eventhub_emulator_connection_string: Option<String>,
}

/// `hub.json`'s `capture` object.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CaptureInfo {
    /// The capture directory, absolute, or the container (never its SAS).
    pub dest: String,
    /// `eventhubs` or `iothub`.
    pub format: String,
    /// `deflate` or `null`.
    pub codec: String,
    /// `avro` or (routing only) `json`; absent in older files.
    #[serde(default = "avro")]
    pub encoding: String,
    pub window_secs: u64,
    pub window_bytes: u64,
    pub skip_empty: bool,
}

fn avro() -> String {
    "avro".into()
}

#[derive(Debug, thiserror::Error)]
pub enum HubInfoError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a hub.json this version understands")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl HubInfo {
    pub const FILE_NAME: &'static str = "hub.json";

    pub fn read(state_dir: &Path) -> Result<HubInfo, HubInfoError> {
        let path = state_dir.join(Self::FILE_NAME);
        let text = std::fs::read_to_string(&path).map_err(|source| HubInfoError::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| HubInfoError::Parse { path, source })
    }
}

/// The default place for the hub's state: `$XDG_DATA_HOME/simdevice/hub` or its equivalent.
pub fn default_state_dir() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("simdevice")
        .join("hub")
}
