//! A client of the IoT Hub service REST API (api-version 2021-04-12) for any hub, real Azure or
//! the local emulator, behind `simdevice service`.
//!
//! - [`client`]: [`client::ServiceClient`], one HTTPS client per service connection string, with
//!   SAS tokens made from the policy key and renewed before they expire, and
//!   [`client::ServiceError`], which keeps IoT Hub's error code and message.
//! - [`monitor`]: the events of the hub's built-in Event Hubs-compatible endpoint over AMQP
//!   (following IoT Hub's redirect), behind `simdevice service monitor`.
//!
//! This module talks to a hub only over the network: it never reaches into `crate::hub`. It never
//! logs or prints a key or a token. The `simdevice service ...` verbs are `commands::service`.

pub mod client;
pub mod monitor;
