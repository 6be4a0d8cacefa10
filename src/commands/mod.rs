//! What each command-line verb does, given its parsed arguments. A verb returns its own error
//! type; `main` alone turns an error into a message (with its source chain) and an exit code.

#[cfg(feature = "archive")]
pub mod archive;
pub mod config;
pub mod doctor;
#[cfg(feature = "fleet")]
pub mod fleet;
pub mod generate;
#[cfg(feature = "hub")]
pub mod hub;
#[cfg(feature = "hub")]
pub mod local;
pub mod provision;
pub mod run;
#[cfg(feature = "service")]
pub mod service;
