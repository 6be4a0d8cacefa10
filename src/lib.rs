//! simdevice: a simulated Azure IoT device and a local Azure IoT Hub to run it against.
//!
//! - [`agent`]: the device agent behind `simdevice run`, configured by [`config`].
//! - [`protocol`]: pure IoT Hub conventions (connection strings, SAS tokens, topics, property
//!   bags, twin documents), shared by every side so they cannot drift apart. No I/O.
//! - [`hub`]: the local IoT Hub emulator (device MQTT over TLS, service REST API over HTTPS).
//! - [`service`]: a client of the service REST API of any hub, behind `simdevice service`.
//! - [`cli`] and [`commands`]: the command line and what each verb does.
//! - [`logging`]: tracing set-up; [`metrics`]: the optional /healthz and /metrics server;
//!   [`sdnotify`]: systemd readiness, watchdog and stopping notifications.
//!
//! ARCHITECTURE.md at the repository root has the map and the message flows.

pub mod agent;
pub mod cli;
pub mod commands;
pub mod common;
pub mod config;
pub mod hub;
pub mod protocol;
pub mod service;
