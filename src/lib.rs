//! simdevice: a simulated Azure IoT device and a local Azure IoT Hub to run it against.
//!
//! Layers, lowest first; each uses only the ones below it (`scripts/check-layers` checks):
//! - [`protocol`]: pure IoT Hub conventions (connection strings, SAS tokens, topics, property
//!   bags, twin documents), shared by every side so they cannot drift apart. No I/O.
//! - [`common`]: leaves several sides share: PEM, `hub.json`, the metrics exposition server,
//!   systemd notifications, logging, state locks.
//! - [`config`]: the agent's layered configuration.
//! - [`agent`] (one simulated device) and [`hub`] (the local IoT Hub, feature `hub`), side by
//!   side, never importing each other.
//! - [`service`]: a client of the service REST API of any hub (feature `service`).
//! - [`fleet`]: many agents in one process, sharded, with their run report (feature `fleet`).
//! - [`archive`]: the archive reader, Avro capture files into CSV (feature `archive`).
//! - [`commands`]: what each verb does; [`cli`]: the clap command tree. `main` on top.
//!
//! ARCHITECTURE.md at the repository root has the map and the message flows.

pub mod agent;
#[cfg(feature = "archive")]
pub mod archive;
pub mod cli;
pub mod commands;
pub mod common;
pub mod config;
#[cfg(feature = "fleet")]
pub mod fleet;
#[cfg(feature = "hub")]
pub mod hub;
pub mod protocol;
#[cfg(feature = "service")]
pub mod service;
