//! What each command-line verb does, given its parsed arguments.

pub mod config;
pub mod hub;
pub mod run;
