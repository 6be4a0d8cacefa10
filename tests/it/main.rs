//! The integration tests, in one binary so the library is linked once: one module per area,
//! each driving the real network path (the hub in-process on `127.0.0.1:0`, the agent
//! in-process or as the `simdevice` binary), and the shared test support in `common/`.
//!
//! Run one area with a filter: `cargo nextest run --test it hostile::` (or `cargo test --test
//! it -- faults:: --nocapture` for the report lines of `scripts/fault-report`).

mod common;

mod agent;
mod agent_durability;
mod agent_lock;
mod agent_payloads;
mod agent_process;
mod agent_session;
mod agent_template;
mod amqp;
mod archive;
mod auth_method;
mod c2d;
mod capture_blob;
mod capture_walkthrough;
mod cli_generate;
mod config;
mod doctor;
mod dps;
mod dps_transport;
mod faults;
mod fleet;
mod fleet_engine;
mod hostile;
mod hub_api;
mod hub_capture;
mod hub_jobs;
mod hub_listeners;
mod hub_mqtt;
mod hub_state;
mod metrics;
mod monitor;
mod sdnotify;
mod service_cli;
mod service_cli_options;
mod websocket;
mod x509;
