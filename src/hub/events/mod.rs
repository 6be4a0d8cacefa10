//! The retained event store: the one record of the telemetry the hub accepted, partitioned as
//! an event hub is, read by the Event Hubs-compatible endpoint (`hub::amqp`).
//!
//! A device's messages always go to the same partition: FNV-1a (32 bits) of the device id's
//! UTF-8 bytes, modulo the partition count (IoT Hub does not document its hash; what matters
//! is that it is stable, also across restarts). Each partition numbers its events from 0
//! (`sequence_number`) and gives each an offset, its byte position in the partition's log
//! (`segment`), as Event Hubs does; both only grow. Retention: an event is dropped when it is
//! older than `max_age` or when the partition holds more than `max_count` (oldest first); a
//! segment file is deleted once all its events are dropped. Retained events are kept in
//! memory too (the count bound is the memory bound), so reads never touch the disk.
//!
//! Appending is one `write` under the partition's lock, for one event or for the run of
//! telemetry a device connection read at once ([`EventStore::append_telemetry`]). Without
//! capture, when the disk fails the partition goes on in memory alone (logged once, counted):
//! the store is then a record for readers. With capture (`StoreSettings::durable`) the store
//! is also what makes an acknowledged message survive a kill until capture has published it:
//! an append whose write fails is refused (the device is not acknowledged and sends it again;
//! of a run, what the disk wholly took before the failure is kept), and each partition
//! keeps every segment file that holds an event capture has not published yet, whatever
//! retention says (the capture cursor, `events/{partition}/captured`, written by capture after
//! each file). Memory retention is unchanged, so capture reads what memory no longer holds
//! from the segment files ([`Partition::read_durable`]). Readers wait on a `watch` of the
//! partition's next sequence number: no polling.
//!
//! This module knows files and memory only: no sockets, no AMQP, no other part of the hub.

pub mod segment;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use tokio::sync::watch;

use crate::protocol::property_bag::PropertyBag;
use segment::Record;
// What IoT Hub stamps as `iothub-connection-auth-method` on a device's message is
// `AuthMethod::as_json` of the record's `auth`: the built-in endpoint, capture's files and the
// recent-events extension all call it, so they say the same.
pub use segment::{AuthMethod, Source};

/// Partitions of a new hub (`--partitions`), as an IoT Hub's default.
pub const DEFAULT_PARTITIONS: u32 = 4;
/// How long events are kept (`--retention-secs`): one day, IoT Hub's default.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Events kept per partition at most (`--retention-count`): the store's memory bound.
pub const DEFAULT_MAX_COUNT: usize = 100_000;
/// A segment file is closed and a new one begun past this size.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// The store's directory inside the hub's state directory.
pub const DIR: &str = "events";
/// The capture cursor's file in a partition's directory: the first sequence number capture
/// has not published.
const CAPTURED: &str = "captured";

#[derive(Clone, Debug)]
pub struct StoreSettings {
    pub partitions: u32,
    pub max_age: Duration,
    pub max_count: usize,
    /// Capture is on: refuse appends the disk does not take, keep what capture has not
    /// published (module notes).
    pub durable: bool,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            partitions: DEFAULT_PARTITIONS,
            max_age: DEFAULT_RETENTION,
            max_count: DEFAULT_MAX_COUNT,
            durable: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EventStoreError {
    #[error("the event store {path} is unusable")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The state has another partition count than asked for: events would move partitions.
    #[error("the event store has {found} partitions, not {asked} (--partitions cannot change on an existing state)")]
    PartitionCount { found: u32, asked: u32 },
    #[error("--partitions must be 1 to 32")]
    BadPartitions,
}

/// The outcome of [`EventStore::append_telemetry`]: the partition, the events stored (in the
/// order given), and, when the durable store's disk refused the rest, why.
pub struct Appended {
    pub partition: u32,
    pub events: Vec<Arc<StoredEvent>>,
    pub refused: Option<AppendError>,
}

/// Why an append was refused (only with [`StoreSettings::durable`]).
#[derive(Debug, thiserror::Error)]
#[error("the event store cannot write partition {partition}")]
pub struct AppendError {
    pub partition: u32,
    #[source]
    pub source: std::io::Error,
}

/// One retained event, as readers get it.
#[derive(Debug)]
pub struct StoredEvent {
    pub offset: u64,
    pub record: Record,
}

impl StoredEvent {
    pub fn sequence_number(&self) -> i64 {
        self.record.sequence_number
    }

    pub fn enqueued_time(&self) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(self.record.enqueued_ms)
            .single()
            .unwrap_or_default()
    }
}

/// What a partition holds now, for `$management` (`com.microsoft:partition`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionInfo {
    /// The first retained sequence number (the next one when empty).
    pub begin_sequence_number: i64,
    /// The last sequence number given (-1 before the first event).
    pub last_sequence_number: i64,
    pub last_offset: String,
    pub last_enqueued_ms: i64,
    pub is_empty: bool,
}

/// Where a reader starts, from the filter a receiver sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest retained event (offset `-1`).
    Beginning,
    /// Only events appended from now on (`@latest`).
    Latest,
    Offset {
        offset: u64,
        inclusive: bool,
    },
    Sequence {
        sequence: i64,
        inclusive: bool,
    },
    /// Milliseconds since the Unix epoch.
    EnqueuedTime {
        ms: i64,
        inclusive: bool,
    },
}

struct Segment {
    base_offset: u64,
    last_sequence: i64,
}

struct Log {
    events: VecDeque<Arc<StoredEvent>>,
    next_sequence: i64,
    next_offset: u64,
    last_offset: Option<u64>,
    last_enqueued_ms: i64,
    /// Closed segments, oldest first (the open one is `writer`).
    closed: VecDeque<Segment>,
    writer: Option<segment::Writer>,
    /// Last sequence number in the open segment (-1 when empty).
    writer_last_sequence: i64,
}

pub struct Partition {
    id: u32,
    dir: PathBuf,
    log: Mutex<Log>,
    next: watch::Sender<i64>,
    /// The next sequence number, readable without the lock.
    next_sequence: AtomicI64,
    /// The first sequence number capture has not published; `i64::MAX` without capture, so
    /// that it holds nothing back.
    captured: AtomicI64,
    durable: bool,
}

/// The hub's notion of now for retention: the system clock, or (tests) tokio's clock from a
/// fixed start, so that paused time drives expiry.
#[derive(Clone, Copy, Debug)]
pub enum Clock {
    System,
    Tokio {
        start_ms: i64,
        start: tokio::time::Instant,
    },
}

impl Clock {
    pub fn now_ms(&self) -> i64 {
        match self {
            Clock::System => Utc::now().timestamp_millis(),
            Clock::Tokio { start_ms, start } => start_ms + start.elapsed().as_millis() as i64,
        }
    }
}

pub struct EventStore {
    settings: StoreSettings,
    partitions: Vec<Partition>,
    clock: Clock,
    created_ms: i64,
    disk_failures: AtomicU64,
}

/// The partition of a device: FNV-1a of its id modulo the partition count (module notes).
pub fn partition_of(device_id: &str, partitions: u32) -> u32 {
    segment::fnv1a(device_id.as_bytes()) % partitions.max(1)
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> EventStoreError + '_ {
    move |source| EventStoreError::Io {
        path: path.to_owned(),
        source,
    }
}

impl EventStore {
    /// Opens the store in `state_dir/events` (creating it), reading back every retained event.
    pub fn open(
        state_dir: &Path,
        settings: StoreSettings,
        clock: Clock,
    ) -> Result<EventStore, EventStoreError> {
        if settings.partitions == 0 || settings.partitions > 32 {
            return Err(EventStoreError::BadPartitions);
        }
        let root = state_dir.join(DIR);
        std::fs::create_dir_all(&root).map_err(io_error(&root))?;
        let found = std::fs::read_dir(&root)
            .map_err(io_error(&root))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.parse::<u32>().is_ok())
            })
            .count() as u32;
        if found != 0 && found != settings.partitions {
            return Err(EventStoreError::PartitionCount {
                found,
                asked: settings.partitions,
            });
        }
        let created_path = root.join("created");
        let created_ms = match std::fs::read_to_string(&created_path) {
            Ok(text) => text.trim().parse().unwrap_or_else(|_| clock.now_ms()),
            Err(_) => {
                let now = clock.now_ms();
                std::fs::write(&created_path, now.to_string()).map_err(io_error(&created_path))?;
                now
            }
        };
        let partitions = (0..settings.partitions)
            .map(|id| Partition::open(&root, id, settings.durable))
            .collect::<Result<Vec<_>, _>>()?;
        let store = EventStore {
            settings,
            partitions,
            clock,
            created_ms,
            disk_failures: AtomicU64::new(0),
        };
        store.expire();
        Ok(store)
    }

    /// Opened for capture ([`StoreSettings::durable`]).
    pub fn is_durable(&self) -> bool {
        self.settings.durable
    }

    pub fn partition_count(&self) -> u32 {
        self.partitions.len() as u32
    }

    pub fn partition(&self, id: u32) -> Option<&Partition> {
        self.partitions.get(id as usize)
    }

    /// When the store was first made (milliseconds since the epoch): the event hub's
    /// `created_at`.
    pub fn created_ms(&self) -> i64 {
        self.created_ms
    }

    /// The partition of a device in this store.
    pub fn partition_of(&self, device_id: &str) -> u32 {
        partition_of(device_id, self.partition_count())
    }

    /// Appends an accepted message to its device's partition, with how its device
    /// authenticated. Returns the partition and the event as stored (numbered, with its
    /// offset). Fails only when the store is durable and the disk did not take the event.
    pub fn append(
        &self,
        device_id: Arc<str>,
        generation_id: Arc<str>,
        auth: AuthMethod,
        properties: PropertyBag,
        body: Bytes,
        enqueued_time: DateTime<Utc>,
    ) -> Result<(u32, Arc<StoredEvent>), AppendError> {
        let record = Record::new(
            Source::Telemetry,
            auth,
            device_id,
            generation_id,
            properties,
            body,
            enqueued_time,
        );
        self.append_one(record)
    }

    /// Appends messages one device sent (in the order given) to its partition in one write:
    /// what a device connection read at once. The events stored come back in that order;
    /// with a durable store whose disk failed part-way, they are the ones the disk wholly
    /// took before the failure (none, when it took none), and the error says why the rest
    /// were refused.
    pub fn append_telemetry(
        &self,
        device_id: &Arc<str>,
        generation_id: &Arc<str>,
        auth: AuthMethod,
        messages: impl IntoIterator<Item = (PropertyBag, Bytes, DateTime<Utc>)>,
    ) -> Appended {
        let records = messages
            .into_iter()
            .map(|(properties, body, enqueued_time)| {
                Record::new(
                    Source::Telemetry,
                    auth,
                    device_id.clone(),
                    generation_id.clone(),
                    properties,
                    body,
                    enqueued_time,
                )
            })
            .collect();
        let partition = partition_of(device_id, self.partition_count());
        let (events, refused) = self.partitions[partition as usize].append(
            records,
            self.retention(),
            &self.disk_failures,
        );
        Appended {
            partition,
            events,
            refused,
        }
    }

    /// Appends an event of `source` (telemetry, or one the hub makes itself, such as a twin
    /// change) to its device's partition, as [`EventStore::append`] does. No connection sent
    /// it, so it carries no auth method of its own (the default, which no reader shows).
    pub fn append_from(
        &self,
        source: Source,
        device_id: Arc<str>,
        generation_id: Arc<str>,
        properties: PropertyBag,
        body: Bytes,
        enqueued_time: DateTime<Utc>,
    ) -> Result<(u32, Arc<StoredEvent>), AppendError> {
        let record = Record::new(
            source,
            AuthMethod::default(),
            device_id,
            generation_id,
            properties,
            body,
            enqueued_time,
        );
        self.append_one(record)
    }

    /// Numbers `record` in its device's partition and stores it.
    fn append_one(&self, record: Record) -> Result<(u32, Arc<StoredEvent>), AppendError> {
        let id = partition_of(&record.device_id, self.partition_count());
        let partition = &self.partitions[id as usize];
        let (mut events, refused) =
            partition.append(vec![record], self.retention(), &self.disk_failures);
        if let Some(error) = refused {
            return Err(error);
        }
        // An append of one record stores it or says why not.
        let event = events.pop().ok_or_else(|| AppendError {
            partition: id,
            source: std::io::Error::other("the append stored nothing"),
        })?;
        Ok((id, event))
    }

    /// What retention keeps now: events enqueued from this time (ms) on, and this many.
    fn retention(&self) -> (i64, usize) {
        (self.cutoff(self.clock.now_ms()), self.settings.max_count)
    }

    /// Capture has published every event of `partition` before `sequence`: records it (the
    /// cursor file first, so that a kill after this call never republishes them) and drops
    /// the segment files retention no longer needs.
    pub fn set_captured(&self, partition: u32, sequence: i64) -> std::io::Result<()> {
        let Some(p) = self.partition(partition) else {
            return Ok(());
        };
        p.write_captured(sequence)?;
        p.retain(self.cutoff(self.clock.now_ms()), self.settings.max_count);
        Ok(())
    }

    fn cutoff(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(self.settings.max_age.as_millis() as i64)
    }

    /// Drops what retention no longer keeps, in every partition (the hub calls it every
    /// [`EXPIRY_INTERVAL`]; appends also drop what they push out).
    pub fn expire(&self) {
        let cutoff = self.cutoff(self.clock.now_ms());
        for partition in &self.partitions {
            partition.retain(cutoff, self.settings.max_count);
        }
    }

    /// Appends whose disk write failed (their partition then runs in memory alone).
    pub fn disk_failures(&self) -> u64 {
        self.disk_failures.load(Ordering::Relaxed)
    }
}

/// How often the hub drops expired events when nothing is appended.
pub const EXPIRY_INTERVAL: Duration = Duration::from_secs(60);

impl Partition {
    fn open(root: &Path, id: u32, durable: bool) -> Result<Partition, EventStoreError> {
        let dir = root.join(id.to_string());
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let mut log = Log {
            events: VecDeque::new(),
            next_sequence: 0,
            next_offset: 0,
            last_offset: None,
            last_enqueued_ms: 0,
            closed: VecDeque::new(),
            writer: None,
            writer_last_sequence: -1,
        };
        let segments = segment::list(&dir).map_err(io_error(&dir))?;
        let count = segments.len();
        for (index, (base, path)) in segments.into_iter().enumerate() {
            let (records, len) = segment::read(&path, base).map_err(io_error(&path))?;
            let mut last_sequence = -1;
            for (offset, record) in records {
                last_sequence = record.sequence_number;
                log.next_sequence = record.sequence_number + 1;
                log.last_offset = Some(offset);
                log.last_enqueued_ms = record.enqueued_ms;
                log.events
                    .push_back(Arc::new(StoredEvent { offset, record }));
            }
            log.next_offset = base + len;
            if index + 1 == count {
                log.writer = Some(segment::Writer::open(&dir, base, len).map_err(io_error(&path))?);
                log.writer_last_sequence = last_sequence;
            } else {
                log.closed.push_back(Segment {
                    base_offset: base,
                    last_sequence,
                });
            }
        }
        if log.writer.is_none() {
            let path = dir.join(segment::file_name(0));
            log.writer = Some(segment::Writer::create(&dir, 0).map_err(io_error(&path))?);
        }
        let captured_path = dir.join(CAPTURED);
        let captured = if durable {
            match std::fs::read_to_string(&captured_path) {
                // Never past the log's end (a tail cut after a power cut): numbers given again
                // must be captured again.
                Ok(text) => match text.trim().parse::<i64>() {
                    Ok(sequence) => sequence.min(log.next_sequence),
                    // Unreadable (not seen: it is written by a rename): everything retained
                    // is captured again, a duplicate rather than a loss.
                    Err(_) => {
                        tracing::warn!(file = %captured_path.display(), "capture cursor unreadable; capture starts again from the oldest retained event");
                        0
                    }
                },
                // Capture starts now: what was accepted before it was on is not owed.
                Err(_) => log.next_sequence,
            }
        } else {
            // Without capture nothing is owed: a later start with capture begins from then.
            let _ = std::fs::remove_file(&captured_path);
            i64::MAX
        };
        let (next, _) = watch::channel(log.next_sequence);
        let partition = Partition {
            id,
            dir,
            next_sequence: AtomicI64::new(log.next_sequence),
            log: Mutex::new(log),
            next,
            captured: AtomicI64::new(captured),
            durable,
        };
        if durable {
            partition
                .write_captured(captured)
                .map_err(io_error(&captured_path))?;
        }
        Ok(partition)
    }

    /// The next sequence number this partition gives.
    pub fn next_sequence(&self) -> i64 {
        self.next_sequence.load(Ordering::Acquire)
    }

    /// The first sequence number capture has not published (`i64::MAX` without capture).
    pub fn captured(&self) -> i64 {
        self.captured.load(Ordering::Acquire)
    }

    /// Writes the capture cursor (a temporary, then a rename), then holds less.
    fn write_captured(&self, sequence: i64) -> std::io::Result<()> {
        let path = self.dir.join(CAPTURED);
        let temporary = self.dir.join("captured.tmp");
        std::fs::write(&temporary, sequence.to_string())?;
        std::fs::rename(&temporary, &path)?;
        self.captured.store(sequence, Ordering::Release);
        Ok(())
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Numbers `records` and appends them in one write, and applies `retention` (cutoff
    /// time, count) under the same lock. Returns the events stored, in order, and why the
    /// rest were refused: only when durable, and only those the disk did not wholly take.
    fn append(
        &self,
        records: Vec<Record>,
        retention: (i64, usize),
        failures: &AtomicU64,
    ) -> (Vec<Arc<StoredEvent>>, Option<AppendError>) {
        let mut log = self.lock();
        let start = log.next_offset;
        // Every record framed into one buffer, each with where its frame ends there.
        let mut frames = Vec::new();
        let mut numbered = Vec::with_capacity(records.len());
        for (sequence, mut record) in (log.next_sequence..).zip(records) {
            record.sequence_number = sequence;
            record.frame_into(&mut frames);
            numbered.push((record, frames.len() as u64));
        }
        if numbered.is_empty() {
            return (Vec::new(), None);
        }
        let full = log
            .writer
            .as_ref()
            .is_some_and(|w| w.len > 0 && w.len + frames.len() as u64 > SEGMENT_BYTES);
        // Durable, a failed write left no writer: begin a new segment for these.
        if full || (self.durable && log.writer.is_none()) {
            self.roll(&mut log, start);
        }
        // The bytes whose records are stored: all of them, but for a durable store's failure.
        let mut kept = frames.len() as u64;
        let mut refused = None;
        match log
            .writer
            .as_mut()
            .map(|writer| writer.append_frames(&frames))
        {
            Some((_, None)) => {}
            Some((written, Some(source))) if self.durable => {
                failures.fetch_add(1, Ordering::Relaxed);
                kept = numbered
                    .iter()
                    .map(|(_, end)| *end)
                    .take_while(|end| *end <= written)
                    .last()
                    .unwrap_or(0);
                refused = Some(AppendError {
                    partition: self.id,
                    source,
                });
            }
            Some((_, Some(error))) => {
                tracing::warn!(partition = self.id, %error, "event store write failed; this partition goes on in memory alone");
                failures.fetch_add(1, Ordering::Relaxed);
                log.writer = None;
            }
            None if self.durable => {
                failures.fetch_add(1, Ordering::Relaxed);
                kept = 0;
                refused = Some(AppendError {
                    partition: self.id,
                    source: std::io::Error::other("no segment file could be opened"),
                });
            }
            None => {}
        }
        let mut stored = Vec::with_capacity(numbered.len());
        let mut offset = start;
        for (record, end) in numbered.into_iter().take_while(|(_, end)| *end <= kept) {
            log.next_sequence = record.sequence_number + 1;
            log.last_offset = Some(offset);
            log.last_enqueued_ms = record.enqueued_ms;
            log.writer_last_sequence = record.sequence_number;
            let event = Arc::new(StoredEvent { offset, record });
            log.events.push_back(event.clone());
            stored.push(event);
            offset = start + end;
        }
        log.next_offset = offset;
        if refused.is_some() {
            // The failed write may have left part of a record: what comes next goes to a new
            // segment, so that reading this one back stops only at its own torn tail.
            self.roll(&mut log, offset);
        }
        if stored.is_empty() {
            return (stored, refused);
        }
        let next = log.next_sequence;
        self.next_sequence.store(next, Ordering::Release);
        self.retain_locked(&mut log, retention.0, retention.1);
        drop(log);
        self.next.send_replace(next);
        (stored, refused)
    }

    /// Closes the open segment and begins one at `offset`.
    fn roll(&self, log: &mut Log, offset: u64) {
        if let Some(writer) = log.writer.take() {
            // A segment that begins where the next one would holds no whole record (its first
            // write failed): it is begun again below, not kept as a closed one, whose deletion
            // by retention would then remove the file the new segment writes to.
            if writer.base_offset != offset {
                log.closed.push_back(Segment {
                    base_offset: writer.base_offset,
                    last_sequence: log.writer_last_sequence,
                });
            }
        }
        match segment::Writer::create(&self.dir, offset) {
            Ok(writer) => log.writer = Some(writer),
            Err(error) => {
                tracing::warn!(partition = self.id, %error, "cannot begin an event segment; this partition goes on in memory alone")
            }
        }
    }

    /// Drops events enqueued before `cutoff_ms` and all but the newest `max_count`; deletes
    /// the closed segments left with no retained event and none capture still needs.
    fn retain(&self, cutoff_ms: i64, max_count: usize) {
        self.retain_locked(&mut self.lock(), cutoff_ms, max_count);
    }

    fn retain_locked(&self, log: &mut Log, cutoff_ms: i64, max_count: usize) {
        while let Some(front) = log.events.front() {
            if log.events.len() > max_count || front.record.enqueued_ms < cutoff_ms {
                log.events.pop_front();
            } else {
                break;
            }
        }
        let first_kept = log
            .events
            .front()
            .map_or(log.next_sequence, |e| e.sequence_number())
            .min(self.captured());
        while log
            .closed
            .front()
            .is_some_and(|s| s.last_sequence < first_kept)
        {
            let Some(old) = log.closed.pop_front() else {
                break;
            };
            let path = self.dir.join(segment::file_name(old.base_offset));
            if let Err(error) = std::fs::remove_file(&path) {
                tracing::warn!(file = %path.display(), %error, "cannot delete an expired event segment");
            }
        }
    }

    /// A receiver of the partition's next sequence number, to wait for new events.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.next.subscribe()
    }

    /// The sequence number a reader starting at `start` reads first (possibly one not yet
    /// given: it then waits for it).
    pub fn resolve(&self, start: &StartAt) -> i64 {
        let log = self.lock();
        let first = log
            .events
            .front()
            .map_or(log.next_sequence, |e| e.sequence_number());
        let after = |pred: &dyn Fn(&StoredEvent) -> bool| {
            let index = log.events.partition_point(|e| !pred(e));
            log.events
                .get(index)
                .map_or(log.next_sequence, |e| e.sequence_number())
        };
        let sequence = match *start {
            StartAt::Beginning => first,
            StartAt::Latest => log.next_sequence,
            StartAt::Sequence {
                sequence,
                inclusive,
            } => {
                if inclusive {
                    sequence
                } else {
                    sequence.saturating_add(1)
                }
            }
            StartAt::Offset { offset, inclusive } => after(&|e| {
                if inclusive {
                    e.offset >= offset
                } else {
                    e.offset > offset
                }
            }),
            StartAt::EnqueuedTime { ms, inclusive } => after(&|e| {
                if inclusive {
                    e.record.enqueued_ms >= ms
                } else {
                    e.record.enqueued_ms > ms
                }
            }),
        };
        sequence.clamp(first, log.next_sequence.max(first))
    }

    /// Up to `max` retained events from sequence number `from` on (from the oldest retained
    /// one when `from` has expired).
    pub fn read(&self, from: i64, max: usize) -> Vec<Arc<StoredEvent>> {
        let log = self.lock();
        let Some(first) = log.events.front().map(|e| e.sequence_number()) else {
            return Vec::new();
        };
        let skip = (from.max(first) - first) as usize;
        log.events.iter().skip(skip).take(max).cloned().collect()
    }

    /// Up to `max` events from sequence number `from` on, read from the segment files when
    /// memory no longer holds `from` (capture behind, or catching up after a restart). What
    /// neither holds (expired, or lost with a failed disk) is passed over: the first event
    /// returned may come after `from`.
    pub fn read_durable(&self, from: i64, max: usize) -> std::io::Result<Vec<Arc<StoredEvent>>> {
        let file = {
            let log = self.lock();
            let in_memory = log
                .events
                .front()
                .map_or(log.next_sequence, |e| e.sequence_number());
            if from >= in_memory {
                None
            } else {
                // The oldest segment whose last event is at or after `from`: closed ones, then
                // the open one.
                log.closed
                    .iter()
                    .find(|s| s.last_sequence >= from)
                    .map(|s| s.base_offset)
                    .or_else(|| log.writer.as_ref().map(|w| w.base_offset))
            }
        };
        let Some(base) = file else {
            return Ok(self.read(from, max));
        };
        // Outside the lock: a segment may be megabytes. Records appended meanwhile are read
        // next time.
        let events: Vec<Arc<StoredEvent>> =
            segment::read_only(&self.dir.join(segment::file_name(base)), base)?
                .into_iter()
                .filter(|(_, r)| r.sequence_number >= from)
                .take(max)
                .map(|(offset, record)| Arc::new(StoredEvent { offset, record }))
                .collect();
        if events.is_empty() {
            // That segment held nothing from `from` on (its records are older): memory has the rest.
            return Ok(self.read(from, max));
        }
        Ok(events)
    }

    pub fn info(&self) -> PartitionInfo {
        let log = self.lock();
        PartitionInfo {
            begin_sequence_number: log
                .events
                .front()
                .map_or(log.next_sequence, |e| e.sequence_number()),
            last_sequence_number: log.next_sequence - 1,
            last_offset: log
                .last_offset
                .map_or_else(|| "-1".to_string(), |o| o.to_string()),
            last_enqueued_ms: log.last_enqueued_ms,
            is_empty: log.events.is_empty(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(store: &EventStore, device: &str, n: u32) -> (u32, i64) {
        let now = Utc
            .timestamp_millis_opt(store.clock.now_ms())
            .single()
            .unwrap();
        store
            .append(
                Arc::from(device),
                Arc::from("gen"),
                AuthMethod::Sas,
                PropertyBag::new(),
                Bytes::from(format!("{{\"n\":{n}}}")),
                now,
            )
            .map(|(partition, event)| (partition, event.sequence_number()))
            .unwrap()
    }

    fn settings(max_age: Duration, max_count: usize) -> StoreSettings {
        StoreSettings {
            partitions: 4,
            max_age,
            max_count,
            durable: false,
        }
    }

    #[test]
    fn a_device_keeps_its_partition_and_each_partition_numbers_from_zero() {
        let dir = tempfile::tempdir().unwrap();
        let store = EventStore::open(dir.path(), StoreSettings::default(), Clock::System).unwrap();
        let (p, s0) = append(&store, "dev-1", 0);
        let (q, s1) = append(&store, "dev-1", 1);
        assert_eq!((p, s0, q, s1), (p, 0, p, 1));
        assert_eq!(p, partition_of("dev-1", 4));
        let other = (0..50)
            .map(|i| format!("d{i}"))
            .find(|d| partition_of(d, 4) != p)
            .unwrap();
        assert_eq!(
            append(&store, &other, 0).1,
            0,
            "another partition starts at 0"
        );
        let events = store.partition(p).unwrap().read(0, 10);
        assert_eq!(events.len(), 2);
        assert!(events[0].offset < events[1].offset);
        let info = store.partition(p).unwrap().info();
        assert_eq!(info.last_sequence_number, 1);
        assert_eq!(info.last_offset, events[1].offset.to_string());
        assert!(!info.is_empty);
    }

    #[test]
    fn a_run_of_telemetry_is_stored_in_order_in_one_write_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let now = Utc::now();
        let device: Arc<str> = Arc::from("dev-1");
        let (partition, offsets) = {
            let store =
                EventStore::open(dir.path(), StoreSettings::default(), Clock::System).unwrap();
            append(&store, "dev-1", 0);
            let messages = (1..=3).map(|n| {
                let mut properties = PropertyBag::new();
                properties.insert("n", n.to_string());
                (properties, Bytes::from(format!("{{\"n\":{n}}}")), now)
            });
            let appended =
                store.append_telemetry(&device, &Arc::from("gen"), AuthMethod::Sas, messages);
            assert!(appended.refused.is_none());
            assert_eq!(appended.partition, partition_of("dev-1", 4));
            let numbers: Vec<i64> = appended
                .events
                .iter()
                .map(|e| e.sequence_number())
                .collect();
            assert_eq!(
                numbers,
                vec![1, 2, 3],
                "numbered after what came before, in order"
            );
            // Each offset is where the record before it ends: one frame after another.
            let all = store.partition(appended.partition).unwrap().read(0, 10);
            assert_eq!(all.len(), 4);
            for pair in all.windows(2) {
                let frame = pair[0].record.framed().len() as u64;
                assert_eq!(pair[1].offset, pair[0].offset + frame);
            }
            let info = store.partition(appended.partition).unwrap().info();
            assert_eq!(info.last_sequence_number, 3);
            assert_eq!(info.last_offset, all[3].offset.to_string());
            let offsets: Vec<u64> = all.iter().map(|e| e.offset).collect();
            (appended.partition, offsets)
        };
        let store = EventStore::open(dir.path(), StoreSettings::default(), Clock::System).unwrap();
        let events = store.partition(partition).unwrap().read(0, 10);
        assert_eq!(events.iter().map(|e| e.offset).collect::<Vec<_>>(), offsets);
        assert_eq!(events[3].record.body, Bytes::from("{\"n\":3}"));
        assert_eq!(
            events[2]
                .record
                .properties
                .application_properties()
                .collect::<Vec<_>>(),
            vec![("n", Some("2"))]
        );
        let empty = store.append_telemetry(&device, &Arc::from("gen"), AuthMethod::Sas, []);
        assert!(empty.events.is_empty() && empty.refused.is_none());
        assert_eq!(append(&store, "dev-1", 4).1, 4, "numbering goes on");
    }

    #[test]
    fn a_durable_store_whose_disk_refuses_a_run_stores_none_of_it_and_numbers_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = EventStore::open(dir.path(), settings_durable(), Clock::System).unwrap();
        let (p, _) = append(&store, "dev-1", 0);
        // The disk fills up: every write fails (ENOSPC).
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let offset = store.partitions[p as usize].lock().next_offset;
        store.partitions[p as usize].lock().writer = Some(segment::Writer::over(full, 0, offset));
        let messages =
            (1..=3).map(|n| (PropertyBag::new(), Bytes::from(format!("{n}")), Utc::now()));
        let appended = store.append_telemetry(
            &Arc::from("dev-1"),
            &Arc::from("gen"),
            AuthMethod::Sas,
            messages,
        );
        assert!(appended.events.is_empty());
        let refused = appended.refused.expect("the run is refused");
        assert_eq!(refused.partition, p);
        assert_eq!(store.disk_failures(), 1);
        assert_eq!(store.partition(p).unwrap().read(0, 10).len(), 1);
        // What comes next goes to a new segment and takes the next number: nothing was given
        // to the refused run.
        assert_eq!(append(&store, "dev-1", 1).1, 1);
        let reopened = EventStore::open(dir.path(), settings_durable(), Clock::System).unwrap();
        let events = reopened.partition(p).unwrap().read(0, 10);
        let numbers: Vec<i64> = events.iter().map(|e| e.sequence_number()).collect();
        assert_eq!(numbers, vec![0, 1]);
        assert_eq!(
            events[1].offset, offset,
            "the new segment begins where the refused run would have"
        );
    }

    #[test]
    fn a_failed_first_write_into_a_new_segment_leaves_nothing_in_front_of_what_follows() {
        let dir = tempfile::tempdir().unwrap();
        let store = EventStore::open(dir.path(), settings_durable(), Clock::System).unwrap();
        let (p, _) = append(&store, "dev-1", 0);
        let offset = store.partitions[p as usize].lock().next_offset;
        // A segment begun at `offset` (the one before it closed) whose first write fails
        // part-way: a torn record in its file, and a disk that refuses the rest (ENOSPC).
        let partition = &store.partitions[p as usize];
        let partition_dir = partition.dir.clone();
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        {
            let mut log = partition.lock();
            partition.roll(&mut log, offset);
            log.writer = Some(segment::Writer::over(full, offset, 0));
        }
        std::fs::write(
            partition_dir.join(segment::file_name(offset)),
            b"\x40\0\0\0torn",
        )
        .unwrap();
        let refused = store.append_telemetry(
            &Arc::from("dev-1"),
            &Arc::from("gen"),
            AuthMethod::Sas,
            [(PropertyBag::new(), Bytes::from("lost"), Utc::now())],
        );
        assert!(refused.events.is_empty() && refused.refused.is_some());
        assert_eq!(append(&store, "dev-1", 1).1, 1);
        assert_eq!(append(&store, "dev-1", 2).1, 2);
        // Capture publishes the first event and retention by count drops it, and with it every
        // segment that ends before the oldest kept one: never the one being written.
        store.set_captured(p, 1).unwrap();
        partition.retain(0, 2);
        assert!(!dir_has(&partition_dir, &segment::file_name(0)));
        drop(store);
        let reopened = EventStore::open(dir.path(), settings_durable(), Clock::System).unwrap();
        let events = reopened.partition(p).unwrap().read(0, 10);
        let numbers: Vec<i64> = events.iter().map(|e| e.sequence_number()).collect();
        assert_eq!(
            numbers,
            vec![1, 2],
            "what followed the failure is read back"
        );
        assert_eq!(events[0].offset, offset);
    }

    fn dir_has(dir: &Path, name: &str) -> bool {
        dir.join(name).exists()
    }

    fn settings_durable() -> StoreSettings {
        StoreSettings {
            durable: true,
            ..StoreSettings::default()
        }
    }

    #[test]
    fn events_survive_a_reopen_and_numbering_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (p, offsets) = {
            let store =
                EventStore::open(dir.path(), StoreSettings::default(), Clock::System).unwrap();
            append(&store, "dev-1", 0);
            let (p, _) = append(&store, "dev-1", 1);
            let offsets: Vec<u64> = store
                .partition(p)
                .unwrap()
                .read(0, 10)
                .iter()
                .map(|e| e.offset)
                .collect();
            (p, offsets)
        };
        let store = EventStore::open(dir.path(), StoreSettings::default(), Clock::System).unwrap();
        let events = store.partition(p).unwrap().read(0, 10);
        assert_eq!(events.iter().map(|e| e.offset).collect::<Vec<_>>(), offsets);
        assert_eq!(&events[1].record.body[..], b"{\"n\":1}");
        assert_eq!(append(&store, "dev-1", 2), (p, 2));
        assert!(store.partition(p).unwrap().read(2, 1)[0].offset > offsets[1]);
        let other = StoreSettings {
            partitions: 8,
            ..StoreSettings::default()
        };
        assert!(matches!(
            EventStore::open(dir.path(), other, Clock::System),
            Err(EventStoreError::PartitionCount { found: 4, asked: 8 })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn retention_drops_by_age_and_by_count() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::Tokio {
            start_ms: 1_700_000_000_000,
            start: tokio::time::Instant::now(),
        };
        let store =
            EventStore::open(dir.path(), settings(Duration::from_secs(60), 3), clock).unwrap();
        let (p, _) = append(&store, "dev-1", 0);
        tokio::time::advance(Duration::from_secs(30)).await;
        append(&store, "dev-1", 1);
        let partition = store.partition(p).unwrap();
        tokio::time::advance(Duration::from_secs(31)).await;
        store.expire();
        let kept: Vec<i64> = partition
            .read(0, 10)
            .iter()
            .map(|e| e.sequence_number())
            .collect();
        assert_eq!(kept, vec![1], "the first is over 60 s old");
        for n in 2..6 {
            append(&store, "dev-1", n);
        }
        let kept: Vec<i64> = partition
            .read(0, 10)
            .iter()
            .map(|e| e.sequence_number())
            .collect();
        assert_eq!(kept, vec![3, 4, 5], "at most three");
        assert_eq!(partition.info().begin_sequence_number, 3);
        tokio::time::advance(Duration::from_secs(61)).await;
        store.expire();
        let info = partition.info();
        assert!(info.is_empty);
        assert_eq!(
            (info.begin_sequence_number, info.last_sequence_number),
            (6, 5)
        );
    }

    #[test]
    fn start_positions_resolve_as_event_hubs_filters_do() {
        let dir = tempfile::tempdir().unwrap();
        let store = EventStore::open(dir.path(), StoreSettings::default(), Clock::System).unwrap();
        let (p, _) = append(&store, "dev-1", 0);
        append(&store, "dev-1", 1);
        append(&store, "dev-1", 2);
        let partition = store.partition(p).unwrap();
        let events = partition.read(0, 10);
        let (o1, t1) = (events[1].offset, events[1].record.enqueued_ms);
        assert_eq!(partition.resolve(&StartAt::Beginning), 0);
        assert_eq!(partition.resolve(&StartAt::Latest), 3);
        assert_eq!(
            partition.resolve(&StartAt::Offset {
                offset: o1,
                inclusive: false
            }),
            2
        );
        assert_eq!(
            partition.resolve(&StartAt::Offset {
                offset: o1,
                inclusive: true
            }),
            1
        );
        assert_eq!(
            partition.resolve(&StartAt::Sequence {
                sequence: 1,
                inclusive: false
            }),
            2
        );
        assert_eq!(
            partition.resolve(&StartAt::Sequence {
                sequence: 1,
                inclusive: true
            }),
            1
        );
        assert_eq!(
            partition.resolve(&StartAt::Sequence {
                sequence: 99,
                inclusive: true
            }),
            3
        );
        assert_eq!(
            partition.resolve(&StartAt::EnqueuedTime {
                ms: t1 - 1_000_000,
                inclusive: false
            }),
            0
        );
        assert_eq!(
            partition.resolve(&StartAt::EnqueuedTime {
                ms: i64::MAX,
                inclusive: false
            }),
            3
        );
    }

    #[tokio::test]
    async fn a_reader_wakes_on_an_append() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            EventStore::open(dir.path(), StoreSettings::default(), Clock::System).unwrap(),
        );
        let p = partition_of("dev-1", 4);
        let mut next = store.partition(p).unwrap().subscribe();
        let writer = {
            let store = store.clone();
            tokio::spawn(async move { append(&store, "dev-1", 0) })
        };
        tokio::time::timeout(Duration::from_secs(5), next.wait_for(|n| *n >= 1))
            .await
            .expect("woken within the deadline")
            .unwrap();
        assert_eq!(writer.await.unwrap(), (p, 0));
    }
}
