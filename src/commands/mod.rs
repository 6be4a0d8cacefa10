//! What each command-line verb does, given its parsed arguments.

pub mod hub;
