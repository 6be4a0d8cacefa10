//! What each command-line verb does, given its parsed arguments.

pub mod config;
pub mod doctor;
pub mod generate;
pub mod hub;
pub mod run;
pub mod service;
