//! The fleet: many full agents in one process (`simdevice fleet`), one slice of a device range
//! per shard, and the run report each shard writes.

pub mod report;
pub mod shard;
