//! Shards of a device range (filled in by issue 9).
