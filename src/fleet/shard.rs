//! Shards of a device range: which slice of `prefix` + `first ..= first + count - 1` one
//! `simdevice fleet` process runs when the work is split over S processes (a Kubernetes Indexed
//! Job, an Azure Batch job with one task per shard, or several shells).
//!
//! [`Shard::resolve`] reads the shard from `--shard-index` / `--shard-count`, falling back to
//! the index Kubernetes gives each pod of an Indexed Job in `JOB_COMPLETION_INDEX`;
//! [`IdRange::slice`] cuts the range into S contiguous slices that never overlap nor leave a gap,
//! balanced (sizes differ by at most one; the lowest shards take the extra devices). The ids of
//! a slice are padded to the width of the last id of the WHOLE range, so S shards render exactly
//! the ids one run over the whole range does.
//!
//! Pure: no I/O, and the environment is passed in, never read here.

use std::num::ParseIntError;

/// The environment variable a Kubernetes Indexed Job sets to each pod's completion index.
pub const SHARD_INDEX_ENV: &str = "JOB_COMPLETION_INDEX";

/// One shard of S: `index` in `0..count`. Built only through [`Shard::new`] or
/// [`Shard::resolve`], so the index is always in range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shard {
    index: u64,
    count: u64,
}

/// Where a shard index came from, for the error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexSource {
    /// `--shard-index`.
    Flag,
    /// The `JOB_COMPLETION_INDEX` environment variable.
    Env,
}

/// `--shard-index 3` or `JOB_COMPLETION_INDEX=3`, as the user wrote it.
struct Named(IndexSource, u64);

impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IndexSource::Flag => write!(f, "--shard-index {}", self.1),
            IndexSource::Env => write!(f, "{SHARD_INDEX_ENV}={}", self.1),
        }
    }
}

/// Why a shard or its slice is refused. Each message names the flag or variable and the
/// values; the command prints it and exits 78 (a configuration error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("--shard-count 0: there must be at least one shard")]
    ZeroShards,
    #[error("--shard-count {count} without --shard-index (and {SHARD_INDEX_ENV} is not set)")]
    CountWithoutIndex { count: u64 },
    #[error("{} without --shard-count", Named(*.from, *.index))]
    IndexWithoutCount { index: u64, from: IndexSource },
    #[error(
        "{} is out of range for --shard-count {count} (0 to {})",
        Named(*.from, *.index),
        .count - 1
    )]
    OutOfRange {
        index: u64,
        count: u64,
        from: IndexSource,
    },
    #[error("{SHARD_INDEX_ENV}={value:?} is not a shard index (a whole number from 0)")]
    BadEnv {
        value: String,
        #[source]
        error: ParseIntError,
    },
    #[error("--count 0: there are no devices to run (--shard-count {shards})")]
    NoDevices { shards: u64 },
    #[error("--shard-count {shards} is more than the {devices} devices of --count {devices}")]
    MoreShardsThanDevices { shards: u64, devices: u64 },
    #[error(
        "--first {first} --count {count} runs past the largest device number ({})",
        u64::MAX
    )]
    PastLastNumber { first: u64, count: u64 },
}

impl Shard {
    /// The whole range in one process: shard 0 of 1.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Shard `index` of `count` (an index given on the command line).
    pub fn new(index: u64, count: u64) -> Result<Shard, ShardError> {
        Self::checked(index, count, IndexSource::Flag)
    }

    /// The shard from `--shard-index`, `--shard-count` and the value of `JOB_COMPLETION_INDEX`
    /// (`env_index`, read by the caller), which stands in for `--shard-index` when that is
    /// absent (the flag wins; the variable is then not even parsed). Neither flag nor
    /// variable: the whole range ([`Shard::WHOLE`]). An index, from either, needs a count, and
    /// a count needs an index: a pod that forgot one must not run the whole range beside its
    /// siblings.
    pub fn resolve(
        index: Option<u64>,
        count: Option<u64>,
        env_index: Option<String>,
    ) -> Result<Shard, ShardError> {
        let index = match (index, env_index) {
            (Some(index), _) => Some((index, IndexSource::Flag)),
            (None, Some(value)) => match value.parse::<u64>() {
                Ok(index) => Some((index, IndexSource::Env)),
                Err(error) => return Err(ShardError::BadEnv { value, error }),
            },
            (None, None) => None,
        };
        match (index, count) {
            (None, None) => Ok(Shard::WHOLE),
            (_, Some(0)) => Err(ShardError::ZeroShards),
            (None, Some(count)) => Err(ShardError::CountWithoutIndex { count }),
            (Some((index, from)), None) => Err(ShardError::IndexWithoutCount { index, from }),
            (Some((index, from)), Some(count)) => Self::checked(index, count, from),
        }
    }

    fn checked(index: u64, count: u64, from: IndexSource) -> Result<Shard, ShardError> {
        if count == 0 {
            Err(ShardError::ZeroShards)
        } else if index >= count {
            Err(ShardError::OutOfRange { index, count, from })
        } else {
            Ok(Shard { index, count })
        }
    }

    /// This shard's index, in `0..count()`.
    pub fn index(self) -> u64 {
        self.index
    }

    /// How many shards share the range.
    pub fn count(self) -> u64 {
        self.count
    }
}

/// A numbered device range: `prefix` + `first ..= first + count - 1` (`--prefix`, `--first`,
/// `--count`). Checked when sliced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdRange {
    pub prefix: String,
    pub first: u64,
    pub count: u64,
}

impl IdRange {
    /// The first number when `--first` is not given.
    pub const DEFAULT_FIRST: u64 = 1;

    /// `shard`'s slice of the range. With N devices and S shards, each shard gets N / S
    /// devices and the first N % S shards one more; shard i starts where shard i - 1 ends.
    /// Refused: no devices, more shards than devices (a shard would run nothing), a range past
    /// `u64::MAX`.
    pub fn slice(&self, shard: Shard) -> Result<Slice, ShardError> {
        let (first, count, shards) = (self.first, self.count, shard.count);
        if count == 0 {
            return Err(ShardError::NoDevices { shards });
        }
        let last = first
            .checked_add(count - 1)
            .ok_or(ShardError::PastLastNumber { first, count })?;
        if shards > count {
            return Err(ShardError::MoreShardsThanDevices {
                shards,
                devices: count,
            });
        }
        let (base, extra) = (count / shards, count % shards);
        // No overflow: index * base + min(index, extra) <= count, and first + count - 1 fits.
        let start = first + shard.index * base + shard.index.min(extra);
        let size = base + u64::from(shard.index < extra);
        Ok(Slice {
            prefix: self.prefix.clone(),
            first: start,
            count: size,
            width: digits(last),
        })
    }
}

/// One shard's devices: numbers `first ..= first + count - 1` (never empty), rendered with the
/// whole range's prefix and width.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    prefix: String,
    first: u64,
    count: u64,
    width: usize,
}

impl Slice {
    /// The slice's first device number.
    pub fn first(&self) -> u64 {
        self.first
    }

    /// The slice's last device number.
    pub fn last(&self) -> u64 {
        self.first + (self.count - 1)
    }

    /// How many devices the slice holds (at least one).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The id of device `number`, padded to the width of the whole range's last id.
    pub fn id(&self, number: u64) -> String {
        padded_id(&self.prefix, number, self.width)
    }

    /// The id of the slice's first device.
    pub fn first_id(&self) -> String {
        self.id(self.first)
    }

    /// The id of the slice's last device.
    pub fn last_id(&self) -> String {
        self.id(self.last())
    }

    /// The slice's device ids, in order.
    pub fn ids(&self) -> impl Iterator<Item = String> + '_ {
        (self.first..=self.last()).map(|number| self.id(number))
    }
}

/// `prefix` + `number` zero-padded to `width` digits: the rendering of
/// [`crate::protocol::identity::numbered_ids`], with the width of a range larger than the
/// numbers rendered (a shard's slice pads to the last id of the whole range).
pub fn padded_id(prefix: &str, number: u64, width: usize) -> String {
    format!("{prefix}{number:0width$}")
}

/// Decimal digits of `n` (1 for 0).
fn digits(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |log| log as usize + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::identity::numbered_ids;
    use proptest::prelude::*;

    fn range(prefix: &str, first: u64, count: u64) -> IdRange {
        IdRange {
            prefix: prefix.to_string(),
            first,
            count,
        }
    }

    fn slices(range: &IdRange, shards: u64) -> Vec<Slice> {
        (0..shards)
            .map(|i| range.slice(Shard::new(i, shards).unwrap()).unwrap())
            .collect()
    }

    /// The slices follow each other from `first` to the last number, none empty, balanced.
    fn assert_partition(range: &IdRange, slices: &[Slice]) {
        let mut next = range.first;
        for slice in slices {
            assert_eq!(slice.first(), next, "no gap nor overlap at {next}");
            assert!(slice.count() >= 1);
            next = slice.last() + 1;
        }
        assert_eq!(
            next - range.first,
            range.count,
            "the slices cover the range"
        );
        let sizes: Vec<u64> = slices.iter().map(Slice::count).collect();
        let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        assert!(max - min <= 1, "balanced: {sizes:?}");
        assert!(
            sizes.windows(2).all(|w| w[0] >= w[1]),
            "extra ones first: {sizes:?}"
        );
    }

    fn assert_same_ids(range: &IdRange, slices: &[Slice]) {
        let whole = numbered_ids(&range.prefix, range.first, range.count).unwrap();
        assert!(
            slices.iter().flat_map(Slice::ids).eq(whole),
            "the shards' ids are the whole range's"
        );
    }

    #[test]
    fn neither_flag_nor_env_is_the_whole_range() {
        assert_eq!(Shard::resolve(None, None, None), Ok(Shard::WHOLE));
        assert_eq!((Shard::WHOLE.index(), Shard::WHOLE.count()), (0, 1));
    }

    #[test]
    fn flags_give_the_shard() {
        let shard = Shard::resolve(Some(2), Some(4), None).unwrap();
        assert_eq!((shard.index(), shard.count()), (2, 4));
        assert_eq!(Shard::resolve(Some(0), Some(1), None), Ok(Shard::WHOLE));
    }

    #[test]
    fn the_env_stands_in_for_a_missing_index() {
        let shard = Shard::resolve(None, Some(4), Some("3".into())).unwrap();
        assert_eq!((shard.index(), shard.count()), (3, 4));
    }

    #[test]
    fn the_flag_wins_over_the_env() {
        let shard = Shard::resolve(Some(1), Some(4), Some("3".into())).unwrap();
        assert_eq!(shard.index(), 1);
        // The variable is not even parsed then.
        let shard = Shard::resolve(Some(1), Some(4), Some("x".into())).unwrap();
        assert_eq!(shard.index(), 1);
    }

    #[test]
    fn a_count_without_an_index_is_refused() {
        let err = Shard::resolve(None, Some(4), None).unwrap_err();
        assert_eq!(err, ShardError::CountWithoutIndex { count: 4 });
        assert_eq!(
            err.to_string(),
            "--shard-count 4 without --shard-index (and JOB_COMPLETION_INDEX is not set)"
        );
    }

    #[test]
    fn an_index_without_a_count_is_refused() {
        let err = Shard::resolve(Some(2), None, None).unwrap_err();
        assert_eq!(err.to_string(), "--shard-index 2 without --shard-count");
        let err = Shard::resolve(None, None, Some("2".into())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "JOB_COMPLETION_INDEX=2 without --shard-count"
        );
    }

    #[test]
    fn an_index_out_of_range_is_refused() {
        let err = Shard::resolve(Some(4), Some(4), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--shard-index 4 is out of range for --shard-count 4 (0 to 3)"
        );
        let err = Shard::resolve(None, Some(4), Some("7".into())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "JOB_COMPLETION_INDEX=7 is out of range for --shard-count 4 (0 to 3)"
        );
        assert!(matches!(
            Shard::new(5, 2),
            Err(ShardError::OutOfRange {
                index: 5,
                count: 2,
                ..
            })
        ));
    }

    #[test]
    fn zero_shards_are_refused() {
        for (index, env) in [(Some(0), None), (None, Some("0".to_string())), (None, None)] {
            let err = Shard::resolve(index, Some(0), env).unwrap_err();
            assert_eq!(err, ShardError::ZeroShards);
            assert_eq!(
                err.to_string(),
                "--shard-count 0: there must be at least one shard"
            );
        }
        assert_eq!(Shard::new(0, 0), Err(ShardError::ZeroShards));
    }

    #[test]
    fn an_env_value_that_is_not_a_number_is_refused() {
        for value in ["abc", "", "-1", " 1", "1.5"] {
            let err = Shard::resolve(None, Some(4), Some(value.into())).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "JOB_COMPLETION_INDEX={value:?} is not a shard index (a whole number from 0)"
                )
            );
            assert!(std::error::Error::source(&err).is_some(), "the parse error");
        }
    }

    #[test]
    fn the_lowest_shards_take_the_extra_devices() {
        let range = range("door-", 1, 10);
        let got: Vec<(u64, u64)> = slices(&range, 4)
            .iter()
            .map(|s| (s.first(), s.count()))
            .collect();
        assert_eq!(got, [(1, 3), (4, 3), (7, 2), (9, 2)]);
    }

    #[test]
    fn slice_ids_are_padded_to_the_whole_range() {
        let doors = range("door-", 1, 10_000);
        let first = doors.slice(Shard::new(0, 4).unwrap()).unwrap();
        assert_eq!(first.first_id(), "door-00001");
        assert_eq!(first.last_id(), "door-02500");
        let last = doors.slice(Shard::new(3, 4).unwrap()).unwrap();
        assert_eq!(last.first_id(), "door-07501");
        assert_eq!(last.last_id(), "door-10000");
        let ids: Vec<String> = range("d", 8, 3)
            .slice(Shard::new(0, 3).unwrap())
            .unwrap()
            .ids()
            .collect();
        assert_eq!(ids, ["d08"], "padded to the width of d10");
    }

    #[test]
    fn zero_devices_are_refused() {
        let err = range("d", 1, 0)
            .slice(Shard::new(0, 3).unwrap())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "--count 0: there are no devices to run (--shard-count 3)"
        );
    }

    #[test]
    fn more_shards_than_devices_are_refused() {
        let err = range("d", 1, 3)
            .slice(Shard::new(0, 5).unwrap())
            .unwrap_err();
        assert_eq!(
            err,
            ShardError::MoreShardsThanDevices {
                shards: 5,
                devices: 3
            }
        );
        assert_eq!(
            err.to_string(),
            "--shard-count 5 is more than the 3 devices of --count 3"
        );
    }

    #[test]
    fn a_range_past_the_largest_number_is_refused() {
        let err = range("d", u64::MAX, 2).slice(Shard::WHOLE).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "--first {} --count 2 runs past the largest device number ({})",
                u64::MAX,
                u64::MAX
            )
        );
        // The very last number is fine.
        let slice = range("d", u64::MAX, 1).slice(Shard::WHOLE).unwrap();
        assert_eq!(slice.last_id(), format!("d{}", u64::MAX));
    }

    #[test]
    fn digits_counts_decimal_digits() {
        for (n, d) in [(0, 1), (9, 1), (10, 2), (99, 2), (100, 3), (u64::MAX, 20)] {
            assert_eq!(digits(n), d, "{n}");
            assert_eq!(digits(n), n.to_string().len());
        }
    }

    /// Every small case, where the property test's random N rarely falls, including ranges
    /// whose width changes inside them (95 ..= 104).
    #[test]
    fn every_small_range_and_shard_count_partitions() {
        for first in [0, 1, 7, 95] {
            for n in 1..=40 {
                let range = range("d-", first, n);
                for s in 1..=n {
                    let slices = slices(&range, s);
                    assert_partition(&range, &slices);
                    assert_same_ids(&range, &slices);
                }
            }
        }
    }

    proptest! {
        #[test]
        fn slices_partition_the_range(
            (n, s) in (1u64..100_000).prop_flat_map(|n| (Just(n), 1..=n.min(500))),
            first in prop_oneof![Just(0u64), Just(1), 0u64..1_000_000_000_000],
        ) {
            let range = range("door-", first, n);
            assert_partition(&range, &slices(&range, s));
        }
    }

    proptest! {
        // Rendering up to 200,000 ids a case: fewer cases than the default.
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn shard_ids_are_the_whole_range_ids(
            (n, s) in (1u64..100_000).prop_flat_map(|n| (Just(n), 1..=n.min(500))),
            first in prop_oneof![Just(1u64), 0u64..1_000_000_000_000],
            prefix in "[a-z]{0,6}-?",
        ) {
            let range = range(&prefix, first, n);
            assert_same_ids(&range, &slices(&range, s));
        }
    }
}
