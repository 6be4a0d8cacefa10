//! The run report: what one `simdevice fleet` shard did, written as JSON when it exits, and the
//! merge of the S shards' reports (`simdevice fleet merge-reports`) into the report of the
//! whole range.
//!
//! Counts are summed; the acknowledgement latencies travel as a [`LatencyHistogram`] (an
//! hdrhistogram at 3 significant digits) written out bucket by bucket, so a merged report's
//! percentiles are those of one run over all the devices, not an average of percentiles.
//! [`merge`] refuses reports of different shard counts, a shard twice, and (unless asked for a
//! partial merge) a missing shard. Already-merged reports merge again when their shard sets are
//! disjoint: a merged report is just a report covering several shards.
//!
//! The JSON shape (keys in this order; `p50`, `p99`, `max` and `complete`, `missing` are derived
//! and recomputed when a report is read):
//!
//! ```json
//! {
//!   "shard": { "index": 1, "count": 4 },
//!   "devices": { "first": "door-02501", "last": "door-05000", "count": 2500 },
//!   "connected": 2500, "twins_fetched": 2500, "connectivity_reported": 2500,
//!   "readings_sent": 1002, "readings_acknowledged": 1000, "methods_answered": 12,
//!   "desired_applied": 3, "cloud_to_device": 7, "reconnects": 4,
//!   "errors": { "connect_refused": 2 },
//!   "ack_latency_ms": {
//!     "p50": 3.127, "p99": 41.983, "max": 250.111,
//!     "histogram": {
//!       "unit": "us",
//!       "counts": [[2049, 400], [3127, 580], [41983, 19], [250111, 1]]
//!     }
//!   },
//!   "started_at": "2026-12-01T13:54:45.120Z",
//!   "ended_at": "2026-12-01T14:04:45.377Z"
//! }
//! ```
//!
//! After a merge, `shard` is `{ "index": null, "count": 4, "indexes": [0, 1, 2, 3],
//! "complete": true, "missing": [] }`.
//!
//! No I/O beyond reading a report file ([`Report::read`]); the caller writes
//! [`Report::to_json_pretty`] where it wants.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::shard::{Shard, Slice};

/// Acknowledgement latencies (PUBLISH to PUBACK), mergeable without loss.
///
/// An hdrhistogram of microseconds at 3 significant digits (each value is kept within 0.1%),
/// resizing itself to the largest value recorded. In JSON it is written as
/// `{"p50": ms, "p99": ms, "max": ms, "histogram": {"unit": "us", "counts": [[value, count],
/// ...]}}`: `counts` lists, in ascending order, each bucket that holds samples as the highest
/// value the bucket stands for (what hdrhistogram reports for its percentiles and maximum) and
/// how many samples fell in it. Recording those pairs again rebuilds the same buckets, so the
/// round trip is exact. The percentiles are in milliseconds at microsecond resolution, `null`
/// when nothing was recorded.
#[derive(Clone)]
pub struct LatencyHistogram(Histogram<u64>);

/// See [`LatencyHistogram::CEILING_US`].
const CEILING_US: u64 = 7 * 24 * 3600 * 1_000_000;

/// Why a histogram in a report is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistogramError {
    #[error("ack_latency_ms.histogram.unit is {0:?}; only \"us\" (microseconds) is known")]
    Unit(String),
    #[error("ack_latency_ms.histogram holds {0} us, over the ceiling of {CEILING_US} us")]
    TooLarge(u64),
}

impl LatencyHistogram {
    /// Significant decimal digits kept of each value.
    pub const SIGNIFICANT_DIGITS: u8 = 3;
    /// Latencies above this many microseconds (a week) are recorded as this: a reading that
    /// waited that long is lost in all but name, and a bound keeps the histogram small.
    pub const CEILING_US: u64 = CEILING_US;

    /// An empty histogram.
    pub fn new() -> LatencyHistogram {
        let histogram = Histogram::new(Self::SIGNIFICANT_DIGITS)
            .expect("3 significant digits are within hdrhistogram's 0 to 5");
        LatencyHistogram(histogram)
    }

    /// Records one reading's latency.
    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).map_or(CEILING_US, |us| us.min(CEILING_US));
        self.record_us(us, 1)
            .expect("values up to the ceiling fit an auto-resizing histogram");
    }

    fn record_us(&mut self, us: u64, count: u64) -> Result<(), HistogramError> {
        // The ceiling's bucket reaches a little above it (its highest equivalent value is
        // what `counts` writes): values in that bucket are the ceiling.
        if us > CEILING_US && !self.0.equivalent(us, CEILING_US) {
            return Err(HistogramError::TooLarge(us));
        }
        self.0
            .record_n(us, count)
            .expect("values up to the ceiling fit an auto-resizing histogram");
        Ok(())
    }

    /// Adds `other`'s samples to this one's.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        self.0
            .add(&other.0)
            .expect("both histograms resize themselves and hold values up to the ceiling");
    }

    /// How many latencies were recorded.
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The latency at `percentile` (0 to 100) in milliseconds, `None` when empty.
    pub fn percentile_ms(&self, percentile: f64) -> Option<f64> {
        (!self.is_empty()).then(|| us_to_ms(self.0.value_at_percentile(percentile)))
    }

    /// The median, in milliseconds.
    pub fn p50_ms(&self) -> Option<f64> {
        self.percentile_ms(50.0)
    }

    /// The 99th percentile, in milliseconds.
    pub fn p99_ms(&self) -> Option<f64> {
        self.percentile_ms(99.0)
    }

    /// The largest latency, in milliseconds.
    pub fn max_ms(&self) -> Option<f64> {
        (!self.is_empty()).then(|| us_to_ms(self.0.max()))
    }

    /// The recorded buckets as `(highest value in us, count)`, ascending: the JSON `counts`.
    pub fn counts(&self) -> Vec<(u64, u64)> {
        self.0
            .iter_recorded()
            .map(|bucket| (bucket.value_iterated_to(), bucket.count_at_value()))
            .collect()
    }
}

/// Microseconds to milliseconds; the division gives the double nearest the 3-decimal value,
/// which serde_json writes as such (`12351` -> `12.351`).
fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Default for LatencyHistogram {
    fn default() -> LatencyHistogram {
        LatencyHistogram::new()
    }
}

/// Equal when they hold the same buckets (the internal array sizes may differ).
impl PartialEq for LatencyHistogram {
    fn eq(&self, other: &LatencyHistogram) -> bool {
        self.counts() == other.counts()
    }
}

/// The buckets, not hdrhistogram's whole counts array.
impl fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("counts_us", &self.counts())
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
struct LatencyJson {
    #[serde(default)]
    p50: Option<f64>,
    #[serde(default)]
    p99: Option<f64>,
    #[serde(default)]
    max: Option<f64>,
    histogram: HistogramJson,
}

#[derive(Serialize, Deserialize)]
struct HistogramJson {
    unit: String,
    counts: Vec<(u64, u64)>,
}

impl Serialize for LatencyHistogram {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        LatencyJson {
            p50: self.p50_ms(),
            p99: self.p99_ms(),
            max: self.max_ms(),
            histogram: HistogramJson {
                unit: "us".to_string(),
                counts: self.counts(),
            },
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for LatencyHistogram {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        // p50, p99 and max are derived from the buckets: read, then recomputed.
        let json = LatencyJson::deserialize(deserializer)?;
        if json.histogram.unit != "us" {
            return Err(D::Error::custom(HistogramError::Unit(json.histogram.unit)));
        }
        let mut histogram = LatencyHistogram::new();
        for (us, count) in json.histogram.counts {
            // A zero count would still move hdrhistogram's min and max: skipped.
            if count > 0 {
                histogram.record_us(us, count).map_err(D::Error::custom)?;
            }
        }
        Ok(histogram)
    }
}

/// Which shards a report covers: one (a shard's own report) or several (a merge).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ShardJson", into = "ShardJson")]
pub enum Shards {
    /// `{"index": 2, "count": 4}`.
    One(Shard),
    /// `{"index": null, "count": 4, "indexes": [0, 1, 3], "complete": false, "missing": [2]}`;
    /// `indexes` is not empty and each is below `count`.
    Merged { count: u64, indexes: BTreeSet<u64> },
}

impl Shards {
    /// How many shards the whole range was split into.
    pub fn count(&self) -> u64 {
        match self {
            Shards::One(shard) => shard.count(),
            Shards::Merged { count, .. } => *count,
        }
    }

    /// The indexes of the shards covered, ascending.
    pub fn indexes(&self) -> BTreeSet<u64> {
        match self {
            Shards::One(shard) => BTreeSet::from([shard.index()]),
            Shards::Merged { indexes, .. } => indexes.clone(),
        }
    }

    /// The indexes of the shards not covered, ascending.
    pub fn missing(&self) -> Vec<u64> {
        let indexes = self.indexes();
        (0..self.count()).filter(|i| !indexes.contains(i)).collect()
    }

    /// Whether every shard of the range is covered.
    pub fn is_complete(&self) -> bool {
        self.indexes().len() as u64 == self.count()
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct ShardJson {
    index: Option<u64>,
    count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    indexes: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    complete: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    missing: Option<Vec<u64>>,
}

/// Why a report's `shard` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardsError {
    #[error("shard.index {index} is out of range for shard.count {count}")]
    OutOfRange { index: u64, count: u64 },
    #[error("shard.indexes lists {0} twice")]
    Twice(u64),
    #[error("shard has both an index and indexes")]
    Both,
    #[error("shard has neither an index nor indexes")]
    Neither,
    #[error("shard.indexes is empty")]
    Empty,
}

impl TryFrom<ShardJson> for Shards {
    type Error = ShardsError;

    fn try_from(json: ShardJson) -> Result<Shards, ShardsError> {
        let count = json.count;
        let in_range = |index: u64| {
            if index < count {
                Ok(index)
            } else {
                Err(ShardsError::OutOfRange { index, count })
            }
        };
        match (json.index, json.indexes) {
            (Some(index), None) => Shard::new(index, count)
                .map(Shards::One)
                .map_err(|_| ShardsError::OutOfRange { index, count }),
            (None, Some(list)) => {
                if list.is_empty() {
                    return Err(ShardsError::Empty);
                }
                let mut indexes = BTreeSet::new();
                for index in list {
                    if !indexes.insert(in_range(index)?) {
                        return Err(ShardsError::Twice(index));
                    }
                }
                Ok(Shards::Merged { count, indexes })
            }
            (Some(_), Some(_)) => Err(ShardsError::Both),
            (None, None) => Err(ShardsError::Neither),
        }
    }
}

impl From<Shards> for ShardJson {
    fn from(shards: Shards) -> ShardJson {
        match shards {
            Shards::One(shard) => ShardJson {
                index: Some(shard.index()),
                count: shard.count(),
                indexes: None,
                complete: None,
                missing: None,
            },
            merged @ Shards::Merged { .. } => ShardJson {
                index: None,
                count: merged.count(),
                complete: Some(merged.is_complete()),
                missing: Some(merged.missing()),
                indexes: Some(merged.indexes().into_iter().collect()),
            },
        }
    }
}

/// The devices a report covers: the first and last id and how many.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Devices {
    pub first: String,
    pub last: String,
    pub count: u64,
}

/// What one shard (or a merge of shards) did. Every counter counts events over the run
/// except `connected`, which counts devices that connected at least once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub shard: Shards,
    pub devices: Devices,
    /// Devices that connected at least once.
    pub connected: u64,
    pub twins_fetched: u64,
    pub connectivity_reported: u64,
    pub readings_sent: u64,
    pub readings_acknowledged: u64,
    pub methods_answered: u64,
    pub desired_applied: u64,
    pub cloud_to_device: u64,
    pub reconnects: u64,
    /// Errors by kind (a short snake_case name chosen by the runner).
    pub errors: BTreeMap<String, u64>,
    #[serde(rename = "ack_latency_ms")]
    pub ack_latency: LatencyHistogram,
    #[serde(with = "rfc3339")]
    pub started_at: DateTime<Utc>,
    #[serde(with = "rfc3339")]
    pub ended_at: DateTime<Utc>,
}

/// Why a report file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read the report {}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// serde_json's message (the source) ends with the line and column.
    #[error("{} is not a fleet run report", .path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Why reports do not merge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("no reports to merge")]
    NoReports,
    #[error(
        "{} is a report of {count} shards but {} of {first_count}",
        .path.display(),
        .first_path.display()
    )]
    ShardCounts {
        first_path: PathBuf,
        first_count: u64,
        path: PathBuf,
        count: u64,
    },
    #[error(
        "shard {index} is in both {} and {} (overlapping reports)",
        .first_path.display(),
        .path.display()
    )]
    Overlap {
        index: u64,
        first_path: PathBuf,
        path: PathBuf,
    },
    #[error(
        "shard{} {} of {count} missing (--partial merges the reports present)",
        if .missing.len() == 1 { "" } else { "s" },
        list(.missing)
    )]
    Missing { count: u64, missing: Vec<u64> },
}

/// `0, 2, 5`.
fn list(indexes: &[u64]) -> String {
    let names: Vec<String> = indexes.iter().map(u64::to_string).collect();
    names.join(", ")
}

impl Report {
    /// An empty report of `shard` running `slice`, started (and, until the caller sets
    /// `ended_at`, ended) at `started_at`.
    pub fn new(shard: Shard, slice: &Slice, started_at: DateTime<Utc>) -> Report {
        let devices = Devices {
            first: slice.first_id(),
            last: slice.last_id(),
            count: slice.count(),
        };
        Report::empty(Shards::One(shard), devices, started_at, started_at)
    }

    /// A report with every counter at zero.
    fn empty(
        shard: Shards,
        devices: Devices,
        started_at: DateTime<Utc>,
        ended_at: DateTime<Utc>,
    ) -> Report {
        Report {
            shard,
            devices,
            connected: 0,
            twins_fetched: 0,
            connectivity_reported: 0,
            readings_sent: 0,
            readings_acknowledged: 0,
            methods_answered: 0,
            desired_applied: 0,
            cloud_to_device: 0,
            reconnects: 0,
            errors: BTreeMap::new(),
            ack_latency: LatencyHistogram::new(),
            started_at,
            ended_at,
        }
    }

    /// The report as indented JSON, keys in the documented order, with a final newline.
    pub fn to_json_pretty(&self) -> String {
        let mut json =
            serde_json::to_string_pretty(self).expect("a report is plain data with string keys");
        json.push('\n');
        json
    }

    /// Reads a report written by [`Report::to_json_pretty`].
    pub fn read(path: &Path) -> Result<Report, ReadError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ReadError::Json {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Adds `other`'s counters, errors and latencies to this report's, and widens its time
    /// span. The shard and devices are the caller's ([`merge`]).
    fn add(&mut self, other: &Report) {
        // Destructured in full so that a new field cannot be forgotten here.
        let Report {
            shard: _,
            devices: _,
            connected,
            twins_fetched,
            connectivity_reported,
            readings_sent,
            readings_acknowledged,
            methods_answered,
            desired_applied,
            cloud_to_device,
            reconnects,
            errors,
            ack_latency,
            started_at,
            ended_at,
        } = other;
        for (sum, add) in [
            (&mut self.connected, connected),
            (&mut self.twins_fetched, twins_fetched),
            (&mut self.connectivity_reported, connectivity_reported),
            (&mut self.readings_sent, readings_sent),
            (&mut self.readings_acknowledged, readings_acknowledged),
            (&mut self.methods_answered, methods_answered),
            (&mut self.desired_applied, desired_applied),
            (&mut self.cloud_to_device, cloud_to_device),
            (&mut self.reconnects, reconnects),
        ] {
            *sum = sum.saturating_add(*add);
        }
        for (kind, count) in errors {
            let sum = self.errors.entry(kind.clone()).or_insert(0);
            *sum = sum.saturating_add(*count);
        }
        self.ack_latency.merge(ack_latency);
        self.started_at = self.started_at.min(*started_at);
        self.ended_at = self.ended_at.max(*ended_at);
    }
}

/// Merges the reports of the shards of one range (each with the file it came from, for the
/// errors) into the report of all of them: counters and errors summed, latency histograms
/// merged, `started_at` the earliest, `ended_at` the latest, `devices.first` that of the
/// lowest shard, `devices.last` that of the highest, `devices.count` summed.
///
/// Refused: no reports, different shard counts, a shard in two reports. A shard in none is
/// refused too unless `allow_partial`; the merged `shard` then says `"complete": false` and
/// lists the `missing` indexes. Merged reports are merged again like any other, as long as
/// their shard sets are disjoint. The result is always [`Shards::Merged`], even from one report.
pub fn merge(reports: &[(PathBuf, Report)], allow_partial: bool) -> Result<Report, MergeError> {
    let Some((first_path, first)) = reports.first() else {
        return Err(MergeError::NoReports);
    };
    let count = first.shard.count();
    let mut owners: BTreeMap<u64, &Path> = BTreeMap::new();
    for (path, report) in reports {
        if report.shard.count() != count {
            return Err(MergeError::ShardCounts {
                first_path: first_path.clone(),
                first_count: count,
                path: path.clone(),
                count: report.shard.count(),
            });
        }
        for index in report.shard.indexes() {
            if let Some(owner) = owners.insert(index, path) {
                return Err(MergeError::Overlap {
                    index,
                    first_path: owner.to_path_buf(),
                    path: path.clone(),
                });
            }
        }
    }
    let shard = Shards::Merged {
        count,
        indexes: owners.keys().copied().collect(),
    };
    if !allow_partial && !shard.is_complete() {
        return Err(MergeError::Missing {
            count,
            missing: shard.missing(),
        });
    }

    // Disjoint, non-empty index sets: the lowest and the highest index each belong to one
    // report.
    let reports_only = || reports.iter().map(|(_, report)| report);
    let lowest = reports_only()
        .min_by_key(|report| report.shard.indexes().first().copied())
        .unwrap_or(first);
    let highest = reports_only()
        .max_by_key(|report| report.shard.indexes().last().copied())
        .unwrap_or(first);
    let devices = Devices {
        first: lowest.devices.first.clone(),
        last: highest.devices.last.clone(),
        count: 0,
    };
    let mut merged = Report::empty(shard, devices, first.started_at, first.ended_at);
    for report in reports_only() {
        merged.add(report);
        merged.devices.count = merged.devices.count.saturating_add(report.devices.count);
    }
    Ok(merged)
}

/// RFC 3339 in UTC (`2026-12-01T13:54:45.120Z`), with as many fractional digits as the time
/// holds, so a report reads back to the same instant.
mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        time: &DateTime<Utc>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&time.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<DateTime<Utc>, D::Error> {
        use serde::de::Error;
        let text = String::deserialize(deserializer)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|time| time.with_timezone(&Utc))
            .map_err(|error| D::Error::custom(format!("{text:?} is not an RFC 3339 time: {error}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::shard::IdRange;
    use proptest::prelude::*;

    const KINDS: [&str; 3] = ["connect_refused", "throttled", "ack_timeout"];

    fn doors(count: u64) -> IdRange {
        IdRange {
            prefix: "door-".to_string(),
            first: 1,
            count,
        }
    }

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_796_133_285_000 + ms).unwrap()
    }

    fn histogram(us: &[u64]) -> LatencyHistogram {
        let mut histogram = LatencyHistogram::new();
        for &us in us {
            histogram.record(Duration::from_micros(us));
        }
        histogram
    }

    /// What one shard did, in the property test.
    #[derive(Debug, Clone)]
    struct Run {
        counters: [u64; 9],
        errors: Vec<(usize, u64)>,
        start_ms: i64,
        length_ms: i64,
    }

    fn run() -> impl Strategy<Value = Run> {
        (
            prop::array::uniform9(0u64..10_000),
            prop::collection::vec((0..KINDS.len(), 1u64..50), 0..4),
            0i64..100_000,
            0i64..10_000_000,
        )
            .prop_map(|(counters, errors, start_ms, length_ms)| Run {
                counters,
                errors,
                start_ms,
                length_ms,
            })
    }

    fn counters_mut(report: &mut Report) -> [&mut u64; 9] {
        [
            &mut report.connected,
            &mut report.twins_fetched,
            &mut report.connectivity_reported,
            &mut report.readings_sent,
            &mut report.readings_acknowledged,
            &mut report.methods_answered,
            &mut report.desired_applied,
            &mut report.cloud_to_device,
            &mut report.reconnects,
        ]
    }

    /// Shard `index` of `count` over `devices`, having done `run` with these latencies.
    fn shard_report(devices: u64, index: u64, count: u64, run: &Run, us: &[u64]) -> Report {
        let shard = Shard::new(index, count).unwrap();
        let slice = doors(devices).slice(shard).unwrap();
        let mut report = Report::new(shard, &slice, at(run.start_ms));
        report.ended_at = at(run.start_ms + run.length_ms);
        for (field, value) in counters_mut(&mut report).into_iter().zip(run.counters) {
            *field = value;
        }
        for &(kind, count) in &run.errors {
            *report.errors.entry(KINDS[kind].to_string()).or_default() += count;
        }
        report.ack_latency = histogram(us);
        report
    }

    fn named(reports: Vec<Report>) -> Vec<(PathBuf, Report)> {
        reports
            .into_iter()
            .enumerate()
            .map(|(i, report)| (PathBuf::from(format!("shard-{i}.json")), report))
            .collect()
    }

    /// A report with every field set, for the round trips.
    fn busy_report() -> Report {
        let run = Run {
            counters: [2500, 2500, 2499, 50_000, 49_998, 12, 3, 7, 4],
            errors: vec![(0, 2), (2, 1)],
            start_ms: 120,
            length_ms: 600_257,
        };
        shard_report(10_000, 1, 4, &run, &[900, 2_048, 3_127, 3_127, 250_111])
    }

    #[test]
    fn percentiles_are_in_milliseconds() {
        let histogram = histogram(&(1..=1000).collect::<Vec<_>>());
        assert_eq!(histogram.len(), 1000);
        assert_eq!(histogram.p50_ms(), Some(0.5));
        assert_eq!(histogram.p99_ms(), Some(0.99));
        assert_eq!(histogram.max_ms(), Some(1.0));
        assert_eq!(histogram.percentile_ms(90.0), Some(0.9));
    }

    #[test]
    fn an_empty_histogram_has_no_percentiles() {
        let histogram = LatencyHistogram::new();
        assert!(histogram.is_empty());
        assert_eq!((histogram.p50_ms(), histogram.max_ms()), (None, None));
        let json = serde_json::to_value(&histogram).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "p50": null, "p99": null, "max": null,
                "histogram": { "unit": "us", "counts": [] }
            })
        );
        let back: LatencyHistogram = serde_json::from_value(json).unwrap();
        assert!(back.is_empty());
    }

    /// The module's example says what the code computes.
    #[test]
    fn the_documented_latencies_are_consistent() {
        let json = r#"{
            "p50": 3.127, "p99": 41.983, "max": 250.111,
            "histogram": {
              "unit": "us",
              "counts": [[2049, 400], [3127, 580], [41983, 19], [250111, 1]]
            }
        }"#;
        let histogram: LatencyHistogram = serde_json::from_str(json).unwrap();
        let written: serde_json::Value = serde_json::to_value(&histogram).unwrap();
        assert_eq!(
            written,
            serde_json::from_str::<serde_json::Value>(json).unwrap()
        );
    }

    #[test]
    fn values_keep_three_significant_digits() {
        // Up to 2047 us every microsecond has its own bucket; above, buckets widen (0.1%).
        let histogram = histogram(&[2_047, 12_345]);
        assert_eq!(histogram.counts(), [(2_047, 1), (12_351, 1)]);
        assert_eq!(histogram.max_ms(), Some(12.351));
    }

    #[test]
    fn latencies_past_the_ceiling_count_as_the_ceiling() {
        let mut histogram = LatencyHistogram::new();
        histogram.record(Duration::from_secs(u64::MAX));
        histogram.record(Duration::from_secs(30 * 24 * 3600));
        assert_eq!(histogram.len(), 2);
        let max_us = histogram.counts()[0].0;
        assert_eq!(histogram.counts(), [(max_us, 2)]);
        let ceiling = LatencyHistogram::CEILING_US;
        assert!(
            (ceiling..=ceiling + ceiling / 1000).contains(&max_us),
            "{max_us}"
        );
    }

    #[test]
    fn a_histogram_in_another_unit_is_refused() {
        let json = r#"{"histogram": {"unit": "ms", "counts": [[1, 1]]}}"#;
        let err = serde_json::from_str::<LatencyHistogram>(json).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("ack_latency_ms.histogram.unit is \"ms\"; only \"us\""),
            "{err}"
        );
    }

    #[test]
    fn a_value_past_the_ceiling_is_refused() {
        let json = format!(
            r#"{{"histogram": {{"unit": "us", "counts": [[{}, 1]]}}}}"#,
            u64::MAX
        );
        let err = serde_json::from_str::<LatencyHistogram>(&json).unwrap_err();
        assert!(err.to_string().contains("over the ceiling"), "{err}");
    }

    #[test]
    fn zero_counts_are_skipped() {
        let json = r#"{"histogram": {"unit": "us", "counts": [[5, 0], [7, 2]]}}"#;
        let histogram: LatencyHistogram = serde_json::from_str(json).unwrap();
        assert_eq!(histogram.counts(), [(7, 2)]);
        assert_eq!(histogram.max_ms(), Some(0.007));
    }

    #[test]
    fn a_report_is_written_in_the_documented_shape() {
        let shard = Shard::new(0, 2).unwrap();
        let slice = doors(3).slice(shard).unwrap();
        let mut report = Report::new(shard, &slice, at(120));
        report.ended_at = at(60_377);
        report.connected = 2;
        report.readings_sent = 4;
        report.readings_acknowledged = 3;
        report.errors.insert("connect_refused".into(), 1);
        report.ack_latency = histogram(&[3_127, 3_127, 41_983]);
        let expected = r#"{
  "shard": {
    "index": 0,
    "count": 2
  },
  "devices": {
    "first": "door-1",
    "last": "door-2",
    "count": 2
  },
  "connected": 2,
  "twins_fetched": 0,
  "connectivity_reported": 0,
  "readings_sent": 4,
  "readings_acknowledged": 3,
  "methods_answered": 0,
  "desired_applied": 0,
  "cloud_to_device": 0,
  "reconnects": 0,
  "errors": {
    "connect_refused": 1
  },
  "ack_latency_ms": {
    "p50": 3.127,
    "p99": 41.983,
    "max": 41.983,
    "histogram": {
      "unit": "us",
      "counts": [
        [
          3127,
          2
        ],
        [
          41983,
          1
        ]
      ]
    }
  },
  "started_at": "2026-12-01T13:54:45.120Z",
  "ended_at": "2026-12-01T13:55:45.377Z"
}
"#;
        assert_eq!(report.to_json_pretty(), expected);
    }

    #[test]
    fn a_report_round_trips_through_json() {
        let report = busy_report();
        let back: Report = serde_json::from_str(&report.to_json_pretty()).unwrap();
        assert_eq!(back, report);
        // To the nanosecond, as a runner's clock gives it.
        let mut report = report;
        report.started_at = DateTime::from_timestamp(1_796_133_285, 123_456_789).unwrap();
        let json = report.to_json_pretty();
        assert!(
            json.contains("\"2026-12-01T13:54:45.123456789Z\""),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), report);
    }

    #[test]
    fn a_merged_report_round_trips_through_json() {
        let reports = named(vec![busy_report()]);
        let merged = merge(&reports, true).unwrap();
        let json = merged.to_json_pretty();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            value["shard"],
            serde_json::json!({
                "index": null, "count": 4, "indexes": [1],
                "complete": false, "missing": [0, 2, 3]
            })
        );
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), merged);
    }

    #[test]
    fn read_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("shard-1.json");
        std::fs::write(&good, busy_report().to_json_pretty()).unwrap();
        assert_eq!(Report::read(&good).unwrap(), busy_report());

        let missing = dir.path().join("absent.json");
        let err = Report::read(&missing).unwrap_err();
        assert!(matches!(err, ReadError::Io { .. }));
        assert_eq!(
            err.to_string(),
            format!("cannot read the report {}", missing.display())
        );
    }

    #[test]
    fn a_json_error_keeps_its_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("shard-2.json");
        let text = busy_report()
            .to_json_pretty()
            .replace("\"readings_sent\": 50000", "\"readings_sent\": \"many\"");
        std::fs::write(&bad, text).unwrap();
        let err = Report::read(&bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{} is not a fleet run report", bad.display())
        );
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(source.ends_with("at line 14 column 25"), "{source}");
    }

    #[test]
    fn a_bad_shard_in_a_report_is_refused() {
        for (shard, message) in [
            (
                r#"{"index": 4, "count": 4}"#,
                "shard.index 4 is out of range for shard.count 4",
            ),
            (
                r#"{"index": null, "count": 4, "indexes": [1, 4]}"#,
                "shard.index 4 is out of range for shard.count 4",
            ),
            (
                r#"{"index": null, "count": 4, "indexes": [1, 1]}"#,
                "shard.indexes lists 1 twice",
            ),
            (
                r#"{"index": null, "count": 4, "indexes": []}"#,
                "shard.indexes is empty",
            ),
            (
                r#"{"index": 1, "count": 4, "indexes": [1]}"#,
                "shard has both an index and indexes",
            ),
            (
                r#"{"index": null, "count": 4}"#,
                "shard has neither an index nor indexes",
            ),
        ] {
            let err = serde_json::from_str::<Shards>(shard).unwrap_err();
            assert!(err.to_string().starts_with(message), "{shard}: {err}");
        }
    }

    #[test]
    fn no_reports_are_refused() {
        assert_eq!(merge(&[], true), Err(MergeError::NoReports));
    }

    #[test]
    fn different_shard_counts_are_refused() {
        let run = Run {
            counters: [1; 9],
            errors: vec![],
            start_ms: 0,
            length_ms: 1,
        };
        let reports = named(vec![
            shard_report(100, 0, 4, &run, &[]),
            shard_report(100, 1, 3, &run, &[]),
        ]);
        let err = merge(&reports, true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "shard-1.json is a report of 3 shards but shard-0.json of 4"
        );
    }

    #[test]
    fn the_same_shard_twice_is_refused() {
        let run = Run {
            counters: [1; 9],
            errors: vec![],
            start_ms: 0,
            length_ms: 1,
        };
        let reports = named(vec![
            shard_report(100, 0, 3, &run, &[]),
            shard_report(100, 2, 3, &run, &[]),
            shard_report(100, 2, 3, &run, &[]),
        ]);
        let err = merge(&reports, true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "shard 2 is in both shard-1.json and shard-2.json (overlapping reports)"
        );

        // A merged report overlapping a shard's own.
        let pair = merge(&reports[..2], true).unwrap();
        let again = named(vec![pair, reports[0].1.clone()]);
        let err = merge(&again, true).unwrap_err();
        assert!(matches!(err, MergeError::Overlap { index: 0, .. }), "{err}");
    }

    #[test]
    fn a_missing_shard_is_refused_unless_partial() {
        let run = Run {
            counters: [1; 9],
            errors: vec![],
            start_ms: 0,
            length_ms: 1,
        };
        let reports = named(vec![
            shard_report(100, 1, 5, &run, &[10]),
            shard_report(100, 3, 5, &run, &[20]),
        ]);
        let err = merge(&reports, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "shards 0, 2, 4 of 5 missing (--partial merges the reports present)"
        );
        let err = merge(&named(vec![shard_report(100, 1, 2, &run, &[])]), false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "shard 0 of 2 missing (--partial merges the reports present)"
        );

        let partial = merge(&reports, true).unwrap();
        assert!(!partial.shard.is_complete());
        assert_eq!(partial.shard.missing(), [0, 2, 4]);
        assert_eq!(partial.connected, 2);
        assert_eq!(partial.ack_latency.len(), 2);
        assert_eq!(
            (
                partial.devices.first.as_str(),
                partial.devices.last.as_str()
            ),
            ("door-021", "door-080")
        );
        assert_eq!(partial.devices.count, 40);
        let json: serde_json::Value = serde_json::from_str(&partial.to_json_pretty()).unwrap();
        assert_eq!(json["shard"]["complete"], false);
        assert_eq!(json["shard"]["missing"], serde_json::json!([0, 2, 4]));
    }

    #[test]
    fn merged_reports_merge_again() {
        let runs: Vec<Run> = (0..4)
            .map(|i| Run {
                counters: [i + 1; 9],
                errors: vec![(i as usize % KINDS.len(), i + 1)],
                start_ms: 100 * i as i64,
                length_ms: 1000 - 100 * i as i64,
            })
            .collect();
        let shards = named(
            (0..4)
                .map(|i| shard_report(50, i, 4, &runs[i as usize], &[100 * (i + 1)]))
                .collect(),
        );
        let all = merge(&shards, false).unwrap();
        // {3, 0} and {1, 2}: the lowest and highest shards in one merge, given out of order.
        let outer = merge(&[shards[3].clone(), shards[0].clone()], true).unwrap();
        let inner = merge(&[shards[2].clone(), shards[1].clone()], true).unwrap();
        let again = merge(&named(vec![inner, outer]), false).unwrap();
        assert_eq!(again, all);
        assert!(again.shard.is_complete());
        assert_eq!(again.devices.first, "door-01");
        assert_eq!(again.devices.last, "door-50");
    }

    proptest! {
        // Each case builds and merges up to 13 histograms: half the default cases.
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// S shards' reports, each from its part of the samples, merge into the report of one
        /// run over the whole range with all the samples; through their JSON files as well.
        #[test]
        fn shard_reports_merge_into_the_whole_run(
            (shards, devices) in (1u64..=6).prop_flat_map(|s| (Just(s), s..s + 200)),
            runs in prop::collection::vec(run(), 6),
            samples in prop::collection::vec(
                (prop_oneof![0u64..5_000, 0u64..60_000_000], 0u64..6),
                0..400,
            ),
            order in Just(()).prop_perturb(|_, mut rng| rng.random::<u64>()),
        ) {
            let part = |index: u64| -> Vec<u64> {
                samples.iter().filter(|(_, s)| s % shards == index).map(|&(us, _)| us).collect()
            };
            let mut reports: Vec<Report> = (0..shards)
                .map(|i| shard_report(devices, i, shards, &runs[i as usize], &part(i)))
                .collect();
            // Whatever order the files come in.
            let len = reports.len();
            reports.rotate_left((order % len as u64) as usize);

            // One run over the whole range, with every sample.
            let runs = &runs[..shards as usize];
            let whole_slice = doors(devices).slice(Shard::WHOLE).unwrap();
            let start = runs.iter().map(|r| r.start_ms).min().unwrap();
            let mut whole = Report::new(Shard::WHOLE, &whole_slice, at(start));
            whole.ended_at = at(runs.iter().map(|r| r.start_ms + r.length_ms).max().unwrap());
            for (i, field) in counters_mut(&mut whole).into_iter().enumerate() {
                *field = runs.iter().map(|r| r.counters[i]).sum();
            }
            for run in runs {
                for &(kind, count) in &run.errors {
                    *whole.errors.entry(KINDS[kind].to_string()).or_default() += count;
                }
            }
            let all: Vec<u64> = samples.iter().map(|&(us, _)| us).collect();
            whole.ack_latency = histogram(&all);

            let merged = merge(&named(reports.clone()), false).unwrap();
            prop_assert!(merged.shard.is_complete());
            prop_assert_eq!(merged.shard.indexes(), (0..shards).collect::<BTreeSet<_>>());
            prop_assert_eq!(merged.ack_latency.p50_ms(), whole.ack_latency.p50_ms());
            prop_assert_eq!(merged.ack_latency.p99_ms(), whole.ack_latency.p99_ms());
            prop_assert_eq!(merged.ack_latency.max_ms(), whole.ack_latency.max_ms());
            prop_assert_eq!(merged.ack_latency.counts(), whole.ack_latency.counts());
            prop_assert_eq!(&merged, &Report { shard: merged.shard.clone(), ..whole });

            // Through the files: written, read back, merged, the same.
            let read: Vec<Report> = reports
                .iter()
                .map(|r| serde_json::from_str(&r.to_json_pretty()).unwrap())
                .collect();
            prop_assert_eq!(merge(&named(read), false).unwrap(), merged);
        }

        #[test]
        fn a_histogram_reads_back_exactly(
            samples in prop::collection::vec(
                prop_oneof![0u64..3_000, 0u64..600_000_000, 0..=LatencyHistogram::CEILING_US],
                0..500,
            ),
        ) {
            let histogram = histogram(&samples);
            let json = serde_json::to_string(&histogram).unwrap();
            let back: LatencyHistogram = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(&back, &histogram);
            prop_assert_eq!(back.len(), samples.len() as u64);
            for percentile in [0.0, 1.0, 25.0, 50.0, 90.0, 99.0, 99.9, 100.0] {
                prop_assert_eq!(back.percentile_ms(percentile), histogram.percentile_ms(percentile));
            }
            prop_assert_eq!(back.max_ms(), histogram.max_ms());
            // And the buckets are the ones hdrhistogram made of the samples themselves.
            prop_assert_eq!(back.0.max(), histogram.0.max());
            prop_assert_eq!(back.0.min_nz(), histogram.0.min_nz());
            prop_assert_eq!(json, serde_json::to_string(&back).unwrap());
        }
    }
}
