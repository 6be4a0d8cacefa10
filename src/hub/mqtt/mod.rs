//! The device side of the hub: MQTT 3.1.1 over TLS, and over WebSocket inside TLS.
//!
//! `listener` accepts TCP connections on both ports and bounds how many may be in their
//! handshakes at once (one pool for both); `connection` does the TLS step and serves one
//! device from its CONNECT to close, over any byte stream; `websocket` puts the upgrade
//! between the two for the WebSocket port. Packets are encoded and decoded with rumqttc's MQTT
//! codec, topics with the shared `protocol::topic` code.

pub mod connection;
pub mod listener;
pub mod websocket;
