//! The fleet: many full agents in one process (`simdevice fleet`), one slice of a device range
//! per shard, and the run report each shard writes.
//!
//! Rooms, lowest first: `shard` (which slice of the id range is ours), `report` (the JSON a
//! shard writes and `merge-reports` merges, with its mergeable latency histogram), `devices`
//! (identities from a range and a group key, or from a file), `provision` (`--dps`: the slice registered
//! with DPS first), `run` (the agents, the ramp, the end), `progress` (the live line), `metrics` (`/metrics` and `/healthz`); `x509` (`--x509-ca`: device certificates issued in memory).

pub mod devices;
pub mod metrics;
pub mod progress;
pub mod provision;
pub mod report;
pub mod run;
pub mod shard;
pub mod x509;
