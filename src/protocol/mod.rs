//! Pure Azure IoT Hub conventions shared by the device agent and the hub emulator: percent-encoding,
//! device ids, connection strings, SAS tokens, property bags, MQTT topic names, twin documents and
//! patch merging, direct-method requests and service error codes.
//!
//! Nothing here does I/O: no tokio, no sockets, no files, no clock reads (callers pass the time in).
//! Both sides build and parse the wire format through these functions, so they cannot drift apart.

/// The IoT Hub API version every side speaks: the device MQTT user name, the service REST API.
pub const API_VERSION: &str = "2021-04-12";
/// The port of MQTT over TLS, which every device SDK dials.
pub const MQTT_TLS_PORT: u16 = 8883;
/// The port of MQTT over WebSocket (TLS), for networks that let only HTTPS out.
pub const WEBSOCKET_PORT: u16 = 443;

pub mod connection_string;
pub mod dps;
pub mod encoding;
pub mod error_code;
pub mod identity;
pub mod method;
pub mod property_bag;
pub mod sas;
pub mod topic;
pub mod twin;
