//! The device side of the hub: MQTT 3.1.1 over TLS.
//!
//! `listener` accepts TCP connections and bounds how many may be in their handshake at once;
//! `connection` serves one device from TLS handshake to close. Packets are encoded and decoded
//! with rumqttc's MQTT codec, topics with the shared `protocol::topic` code.

pub mod connection;
pub mod listener;
