//! A client of the IoT Hub service REST API (placeholder until written).
pub mod cli;
