//! Capture: every device-to-cloud message the hub accepts, archived into Avro files in Azure's
//! layouts (Event Hubs Capture, or IoT Hub routing to storage), one file per partition per
//! closed window, in a directory or a Blob Storage container. The rooms, lowest first: `format`
//! (schemas, the file writer), `window` (when a window closes), `sink` (the destinations and
//! their atomic writes). This file is the intake the MQTT connections ask before they accept a
//! message, and the two tasks per partition behind it. It reads the hub's event store
//! (`hub::events`) and writes the destination, nothing else of the hub.
//!
//! One record of what was accepted: capture keeps no log of its own. A connection appends an
//! accepted message to the event store before it acknowledges it; with capture on, the store is
//! durable (an append the disk does not take is refused) and keeps every segment file holding
//! an event capture has not published (its cursor, see `events`). Per partition, the collector
//! task reads the partition's new events as they are appended and encodes each into the open
//! window's file; when the window closes (time or size, whichever first) it hands the file to
//! the publisher task and opens the next window at once. The publisher writes the file
//! (retrying with backoff while the destination fails), then moves the partition's capture
//! cursor past it. Files are published in the order their windows closed. At start the
//! collector begins at the cursor, so what a killed hub acknowledged but had not published
//! goes into the first window: each acknowledged message lands in one published file. (A
//! kill between a file's write and the cursor's would write that window again, under a `_1`
//! name; the window for it is one rename.)
//!
//! The buffer is bounded: per partition, the events not yet read by the collector
//! ([`MAX_BEHIND`]), the open window, one closed window waiting and one being written (each at
//! most the window's size, encoded). When a partition's collector falls [`HEADROOM`] short of
//! that bound, its devices' connections stop reading until it catches up ([`Intake::room`]): a
//! burst faster than capture is slowed, as a broker slows its publishers. When that lasts
//! ([`ROOM_WAIT`]: the destination is down and the publisher is retrying) and the bound is
//! reached, a message is refused, not dropped: [`Intake::check`] fails, the connection closes
//! without acknowledging it, and the device sends it again when it reconnects. Refusals are
//! counted (`simdevice_hub_capture_refused_total`) and logged.

pub mod avro;
pub mod format;
pub mod sink;
pub mod window;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use format::{Codec, Encoding, Format};
pub use sink::{Destination, Naming};
use window::{Closed, Window, WindowRules};

use crate::hub::events::{EventStore, Partition, Source};

/// Events of a partition its collector may be behind by. Past this the hub refuses new
/// telemetry from that partition's devices until capture catches up (module notes).
pub const MAX_BEHIND: i64 = 65_536;
/// How far short of [`MAX_BEHIND`] a connection stops reading from its device until the
/// collector catches up ([`Intake::room`]): room for what a thousand connections can have in
/// one read each, so that a burst is slowed, not refused.
pub const HEADROOM: i64 = 16_384;
/// How long a connection waits for room before it reads on anyway (and a full buffer then
/// refuses): the destination is down, not slow.
pub const ROOM_WAIT: Duration = Duration::from_secs(10);
/// The namespace in Event Hubs paths: the local hub has no Event Hubs namespace of its own.
pub const NAMESPACE: &str = "simdevice";
/// Azure's defaults: Event Hubs Capture's portal default window (300 s) and routing's default
/// chunk size (300 MiB, `maxChunkSizeInBytes` 314572800).
pub const DEFAULT_WINDOW_SECS: u64 = 300;
pub const DEFAULT_WINDOW_BYTES: u64 = 314_572_800;
/// First and last delay between attempts to write a file (or read the store) that failed.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Events a collector takes from the store at a time.
const BATCH: usize = 1024;

/// What `--capture` and its options say.
#[derive(Clone, Debug)]
pub struct CaptureSettings {
    pub destination: Destination,
    pub format: Format,
    pub codec: Codec,
    /// Avro, or (with `iothub`) routing's JSON encoding.
    pub encoding: Encoding,
    pub window: Duration,
    pub window_bytes: u64,
    pub skip_empty: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot use the capture directory {dest}")]
    Dir {
        dest: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "capture needs the event store to be durable (the hub opens it so when capture is on)"
    )]
    StoreNotDurable,
}

/// Why a message was not accepted for capture.
#[derive(Debug, thiserror::Error)]
#[error("capture is behind: its buffer for partition {partition} is full")]
pub struct Refused {
    pub partition: u32,
}

/// What `/metrics` shows of capture.
#[derive(Debug, Default)]
pub struct CaptureCounters {
    pub files: AtomicU64,
    pub errors: AtomicU64,
    pub refused: AtomicU64,
}

/// The connections' side: an atomic load or two per message.
pub struct Intake {
    store: Arc<EventStore>,
    /// Per partition: the first sequence number its collector has not read yet.
    collected: Vec<AtomicI64>,
    pub counters: Arc<CaptureCounters>,
    /// Woken by the collectors as they read: connections waiting in [`Intake::room`].
    drained: tokio::sync::Notify,
    /// [`MAX_BEHIND`] and [`HEADROOM`], or smaller in tests.
    max_behind: i64,
    headroom: i64,
}

impl Intake {
    fn behind(&self, partition: u32) -> i64 {
        let (Some(p), Some(collected)) = (
            self.store.partition(partition),
            self.collected.get(partition as usize),
        ) else {
            return 0;
        };
        p.next_sequence() - collected.load(Ordering::Acquire)
    }

    /// Whether a message of `partition` may be accepted now, with `pending` messages of the
    /// same connection accepted but not yet appended; call before appending it to the store.
    /// A refusal is counted and logged (once per thousand).
    pub fn check(&self, partition: u32, pending: usize) -> Result<(), Refused> {
        if self.behind(partition) + (pending as i64) < self.max_behind {
            return Ok(());
        }
        let refused = self.counters.refused.fetch_add(1, Ordering::Relaxed);
        // Once per thousand: a full buffer refuses many messages a second.
        if refused.is_multiple_of(1000) {
            tracing::warn!(
                refused = refused + 1,
                partition,
                "capture buffer full: telemetry refused"
            );
        }
        Err(Refused { partition })
    }

    /// Whether `partition`'s collector is at least [`HEADROOM`] short of the bound.
    pub fn has_room(&self, partition: u32) -> bool {
        self.behind(partition) <= self.max_behind - self.headroom
    }

    /// Resolves once `partition` has room. A connection awaits it before it reads more from
    /// its device while capture is behind, so that TCP slows the device (as a broker under load
    /// does) instead of the hub refusing what it sends; with [`ROOM_WAIT`] as its bound, see
    /// `mqtt/connection.rs`.
    pub async fn room(&self, partition: u32) {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.has_room(partition) {
                return;
            }
            drained.await;
        }
    }

    /// Accepted messages not yet in a published file.
    pub fn pending(&self) -> u64 {
        (0..self.store.partition_count())
            .filter_map(|id| self.store.partition(id))
            .map(|p| (p.next_sequence() - p.captured()).max(0) as u64)
            .sum()
    }
}

/// The running capture: the intake for the connections and the tasks' handles.
pub struct Capture {
    pub intake: Arc<Intake>,
    pub settings: CaptureSettings,
    finish: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Capture {
    /// Prepares the destination (a directory is made and swept of temporaries) and starts a
    /// collector and a publisher per partition of `store` (opened durable), each from the
    /// partition's capture cursor.
    pub fn start(
        settings: CaptureSettings,
        store: Arc<EventStore>,
        naming: Naming,
    ) -> Result<Capture, CaptureError> {
        Capture::start_with(settings, store, naming, MAX_BEHIND)
    }

    fn start_with(
        settings: CaptureSettings,
        store: Arc<EventStore>,
        naming: Naming,
        max_behind: i64,
    ) -> Result<Capture, CaptureError> {
        if !store.is_durable() {
            return Err(CaptureError::StoreNotDurable);
        }
        settings
            .destination
            .prepare()
            .map_err(|source| CaptureError::Dir {
                dest: settings.destination.describe(),
                source,
            })?;
        let rules = WindowRules {
            max_age: settings.window,
            max_bytes: settings.window_bytes,
            skip_empty: settings.skip_empty,
        };
        let partitions: Vec<u32> = (0..store.partition_count()).collect();
        let collected = partitions
            .iter()
            .map(|&id| AtomicI64::new(store.partition(id).map_or(0, Partition::captured)))
            .collect();
        let intake = Arc::new(Intake {
            store: store.clone(),
            collected,
            counters: Arc::new(CaptureCounters::default()),
            drained: tokio::sync::Notify::new(),
            max_behind: max_behind.max(2),
            headroom: HEADROOM.min(max_behind / 4).max(1),
        });
        let recovered = intake.pending();
        if recovered > 0 {
            tracing::info!(
                messages = recovered,
                "capture: messages acknowledged before the last stop and not yet in a file are \
                 recovered into the first windows"
            );
        }
        let finish = CancellationToken::new();
        let mut tasks = Vec::with_capacity(2 * partitions.len());
        for partition in partitions {
            // One closed window waits while another is written: the bound of the module notes.
            let (ready_tx, ready_rx) = mpsc::channel(1);
            let collector = Collector {
                partition,
                store: store.clone(),
                rules,
                format: settings.format,
                codec: settings.codec,
                encoding: settings.encoding,
                intake: intake.clone(),
                ready: ready_tx,
                finish: finish.clone(),
            };
            let publisher = Publisher {
                partition,
                store: store.clone(),
                destination: settings.destination.clone(),
                format: settings.format,
                naming: Naming {
                    partition: partition.to_string(),
                    ..naming.clone()
                },
                counters: intake.counters.clone(),
                ready: ready_rx,
                finish: finish.clone(),
            };
            tasks.push(tokio::spawn(collector.run()));
            tasks.push(tokio::spawn(publisher.run()));
        }
        Ok(Capture {
            intake,
            settings,
            finish,
            tasks: Mutex::new(tasks),
        })
    }

    /// Closes the open windows, publishes every closed one and ends the tasks. Call when no
    /// connection can accept messages any more. A file that cannot be written now stays in the
    /// store (with every later one) for the next start.
    pub async fn finish(&self) {
        self.finish.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// A closed window on its way to the publisher.
struct Ready {
    closed: Closed,
    /// When it closed: its file's name comes from this.
    closed_at: chrono::DateTime<chrono::Utc>,
    /// The partition's first sequence number after the window: the capture cursor once it
    /// is published.
    next: i64,
}

/// Owns a partition's open window: reads the partition's events into it, closes it, hands
/// it on.
struct Collector {
    partition: u32,
    store: Arc<EventStore>,
    rules: WindowRules,
    format: Format,
    codec: Codec,
    encoding: Encoding,
    intake: Arc<Intake>,
    ready: mpsc::Sender<Ready>,
    /// Cancelled by [`Capture::finish`]: take what is left, close the window, hand it on, end.
    finish: CancellationToken,
}

impl Collector {
    fn open(&self) -> Window {
        Window::open(Instant::now(), self.format, self.codec, self.encoding)
    }

    async fn run(self) {
        let Some(partition) = self.store.partition(self.partition) else {
            return;
        };
        let mut window = self.open();
        let mut appended = partition.subscribe();
        let mut next = partition.captured();
        let mut read_failures = 0u32;
        loop {
            let finishing = self.finish.is_cancelled();
            let batch = match partition.read_durable(next, BATCH) {
                Ok(batch) => {
                    read_failures = 0;
                    batch
                }
                Err(error) => {
                    // A segment file capture still needs cannot be read: said, counted,
                    // retried; nothing is passed over.
                    self.intake.counters.errors.fetch_add(1, Ordering::Relaxed);
                    let delay = (RETRY_FIRST * 2u32.saturating_pow(read_failures)).min(RETRY_MAX);
                    read_failures = read_failures.saturating_add(1);
                    tracing::error!(partition = self.partition, %error, retry_in = ?delay, "capture cannot read the event store");
                    if finishing {
                        return;
                    }
                    tokio::select! {
                        _ = self.finish.cancelled() => {}
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            };
            if let Some(first) = batch.first() {
                if first.sequence_number() > next {
                    // Retention dropped them before capture was on, or a failed disk lost them.
                    tracing::warn!(
                        partition = self.partition,
                        from = next,
                        to = first.sequence_number() - 1,
                        "capture: events no longer in the store are left out of the archive"
                    );
                }
                for event in &batch {
                    next = event.sequence_number() + 1;
                    // Telemetry only, as routing's default route sends to storage: twin change
                    // events share the partition, not the archive.
                    if event.record.source != Source::Telemetry {
                        continue;
                    }
                    if window.push(event, &self.rules) {
                        window = match self.close(window, next).await {
                            Some(window) => window,
                            None => return,
                        };
                    }
                }
                self.intake.collected[self.partition as usize].store(next, Ordering::Release);
                self.intake.drained.notify_waiters();
                if Instant::now() < window.deadline(&self.rules) {
                    continue;
                }
            } else if finishing {
                // No connection sends any more and everything is read: close, hand on, end.
                let _ = self.close(window, next).await;
                return;
            } else {
                let deadline = window.deadline(&self.rules);
                tokio::select! {
                    _ = self.finish.cancelled() => continue,
                    _ = appended.changed() => continue,
                    _ = tokio::time::sleep_until(deadline) => {}
                }
            }
            // The window's time is up.
            window = match self.close(window, next).await {
                Some(window) => window,
                None => return,
            };
        }
    }

    /// Closes `window` (everything before `next` is in it), hands its file to the publisher
    /// (waiting while another closed window waits there) and opens the next window. `None`
    /// when the publisher has stopped.
    async fn close(&self, window: Window, next: i64) -> Option<Window> {
        let ready = Ready {
            closed: window.close(&self.rules),
            closed_at: chrono::Utc::now(),
            next,
        };
        self.ready.send(ready).await.ok()?;
        Some(self.open())
    }
}

/// Writes a partition's closed windows' files in order, then moves its capture cursor.
struct Publisher {
    partition: u32,
    store: Arc<EventStore>,
    destination: Destination,
    format: Format,
    naming: Naming,
    counters: Arc<CaptureCounters>,
    ready: mpsc::Receiver<Ready>,
    finish: CancellationToken,
}

impl Publisher {
    async fn run(mut self) {
        while let Some(Ready {
            closed,
            closed_at,
            next,
        }) = self.ready.recv().await
        {
            if let Some(file) = closed.file {
                let relative = sink::relative_path(self.format, &self.naming, closed_at);
                if !self
                    .publish(&relative, Bytes::from(file), closed.messages)
                    .await
                {
                    // Stopped while the destination failed: this window's messages, and every
                    // later one's, stay in the store for the next start.
                    return;
                }
            }
            if let Err(error) = self.store.set_captured(self.partition, next) {
                // The file is published; a kill before a later cursor write would publish its
                // messages again (never lose them).
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(partition = self.partition, %error, "cannot record the capture cursor");
            }
        }
    }

    /// Writes one file, retrying with backoff; false when the hub stopped before it could.
    async fn publish(&self, relative: &str, file: Bytes, messages: u64) -> bool {
        let counters = &self.counters;
        let mut delay = RETRY_FIRST;
        loop {
            match sink::publish(&self.destination, relative, file.clone()).await {
                Ok(place) => {
                    counters.files.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(file = %place, messages, "capture file written");
                    return true;
                }
                Err(error) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %crate::common::logging::error_chain(&error), retry_in = ?delay, "capture file not written");
                    let stopped = self.finish.is_cancelled()
                        || tokio::select! {
                            _ = self.finish.cancelled() => true,
                            _ = tokio::time::sleep(delay) => false,
                        };
                    if stopped {
                        tracing::warn!(
                            messages,
                            partition = self.partition,
                            "capture window left in the event store for the next start"
                        );
                        return false;
                    }
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::hub::events::{Clock, StoreSettings};
    use crate::protocol::property_bag::PropertyBag;

    fn settings(dir: &Path) -> CaptureSettings {
        CaptureSettings {
            destination: Destination::Directory(dir.to_owned()),
            format: Format::EventHubs,
            codec: Codec::Null,
            encoding: Encoding::Avro,
            window: Duration::from_secs(60),
            window_bytes: DEFAULT_WINDOW_BYTES,
            skip_empty: true,
        }
    }

    fn one_second(dir: &Path) -> CaptureSettings {
        CaptureSettings {
            window: Duration::from_secs(1),
            ..settings(dir)
        }
    }

    fn naming() -> Naming {
        Naming {
            namespace: NAMESPACE.into(),
            hub: "localhost".into(),
            partition: String::new(),
        }
    }

    /// A durable store of one partition in `state`, keeping `max_count` events in memory.
    fn store(state: &Path, max_count: usize) -> Arc<EventStore> {
        let settings = StoreSettings {
            partitions: 1,
            max_count,
            durable: true,
            ..StoreSettings::default()
        };
        Arc::new(EventStore::open(state, settings, Clock::System).unwrap())
    }

    /// What a connection does with a device's message: ask the intake, then append.
    fn accept(intake: &Intake, store: &EventStore, n: u32) -> Result<i64, Refused> {
        intake.check(0, 0)?;
        Ok(append(store, n))
    }

    /// A device's reading appended to the store, as a connection does; its sequence number.
    fn append(store: &EventStore, n: u32) -> i64 {
        let (_, event) = store
            .append(
                Arc::from("dev-1"),
                Arc::from("gen"),
                crate::hub::events::AuthMethod::Sas,
                PropertyBag::new(),
                Bytes::from(format!("{{\"n\":{n}}}")),
                chrono::Utc::now(),
            )
            .unwrap();
        event.sequence_number()
    }

    /// Every published `.avro` file under `root`, with its sequence numbers.
    fn published(root: &Path) -> Vec<(PathBuf, Vec<i64>)> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_owned()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "avro") {
                    let bytes = std::fs::read(&path).unwrap();
                    let seqs = apache_avro::Reader::new(&bytes[..])
                        .unwrap()
                        .map(|r| match r.unwrap() {
                            apache_avro::types::Value::Record(f) => match &f[0].1 {
                                apache_avro::types::Value::Long(n) => *n,
                                other => panic!("{other:?}"),
                            },
                            other => panic!("{other:?}"),
                        })
                        .collect();
                    out.push((path, seqs));
                }
            }
        }
        out.sort();
        out
    }

    fn all_published(root: &Path) -> Vec<i64> {
        let mut all: Vec<i64> = published(root).into_iter().flat_map(|(_, s)| s).collect();
        all.sort();
        all
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "never happened: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Makes `dir` unwritable as a directory: it goes, and a file takes its name.
    fn break_dir(dir: &Path) {
        std::fs::remove_dir(dir).unwrap();
        std::fs::write(dir, b"").unwrap();
    }

    #[tokio::test]
    async fn a_window_is_written_when_its_time_is_up_and_the_cursor_then_moves_past_it() {
        let out = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let store = store(state.path(), 1000);
        let capture = Capture::start(one_second(out.path()), store.clone(), naming()).unwrap();
        for n in 0..3 {
            accept(&capture.intake, &store, n).unwrap();
        }
        let counters = capture.intake.counters.clone();
        until("a published file", || {
            counters.files.load(Ordering::Relaxed) == 1 && capture.intake.pending() == 0
        })
        .await;
        let files = published(out.path());
        assert_eq!(files[0].1, vec![0, 1, 2]);
        assert!(
            files[0]
                .0
                .starts_with(out.path().join("simdevice/localhost/0")),
            "{:?}",
            files[0].0
        );
        capture.finish().await;
        assert_eq!(store.partition(0).unwrap().captured(), 3);
        // skip_empty: the windows after that one wrote nothing.
        assert_eq!(published(out.path()).len(), 1);
    }

    #[tokio::test]
    async fn a_size_limit_closes_the_window_before_its_time() {
        let out = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let store = store(state.path(), 1000);
        let rules = CaptureSettings {
            window: Duration::from_secs(900),
            window_bytes: 2 * "{\"n\":0}".len() as u64,
            ..settings(out.path())
        };
        let capture = Capture::start(rules, store.clone(), naming()).unwrap();
        let start = Instant::now();
        for n in 0..2 {
            accept(&capture.intake, &store, n).unwrap();
        }
        until("a file", || !published(out.path()).is_empty()).await;
        assert!(Instant::now() - start < Duration::from_secs(10));
        assert_eq!(published(out.path())[0].1, vec![0, 1]);
        capture.finish().await;
    }

    #[tokio::test]
    async fn finish_writes_the_open_window() {
        let out = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let store = store(state.path(), 1000);
        let capture = Capture::start(settings(out.path()), store.clone(), naming()).unwrap();
        accept(&capture.intake, &store, 9).unwrap();
        capture.finish().await;
        assert_eq!(all_published(out.path()), vec![0]);
    }

    #[tokio::test]
    async fn a_store_that_is_not_durable_is_refused() {
        let out = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let plain = Arc::new(
            EventStore::open(state.path(), StoreSettings::default(), Clock::System).unwrap(),
        );
        assert!(matches!(
            Capture::start(settings(out.path()), plain, naming()),
            Err(CaptureError::StoreNotDurable)
        ));
    }

    #[tokio::test]
    async fn a_directory_that_cannot_be_written_is_retried_counted_and_the_full_buffer_refuses() {
        let base = tempfile::tempdir().unwrap();
        let out = base.path().join("out");
        let state = tempfile::tempdir().unwrap();
        let store = store(state.path(), 1000);
        let capture = Capture::start_with(one_second(&out), store.clone(), naming(), 8).unwrap();
        break_dir(&out);
        let intake = capture.intake.clone();
        // The publisher retries, one closed window waits, the collector waits behind it, and
        // the buffer of 8 fills: then messages are refused, not lost.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut accepted = 0;
        loop {
            assert!(Instant::now() < deadline, "nothing was ever refused");
            if accept(&intake, &store, accepted).is_err() {
                break;
            }
            accepted += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(intake.counters.refused.load(Ordering::Relaxed), 1);
        assert!(intake.counters.errors.load(Ordering::Relaxed) >= 1);
        assert_eq!(intake.pending(), u64::from(accepted));
        std::fs::remove_file(&out).unwrap();
        until("everything published", || intake.pending() == 0).await;
        capture.finish().await;
        let every: Vec<i64> = (0..i64::from(accepted)).collect();
        assert_eq!(all_published(&out), every, "every accepted message, once");
    }

    #[tokio::test]
    async fn while_capture_is_behind_room_waits_until_the_collector_catches_up() {
        let base = tempfile::tempdir().unwrap();
        let out = base.path().join("out");
        let state = tempfile::tempdir().unwrap();
        let store = store(state.path(), 1000);
        // A buffer of 8: room means 2 free places.
        let capture = Capture::start_with(one_second(&out), store.clone(), naming(), 8).unwrap();
        break_dir(&out);
        let intake = capture.intake.clone();
        assert!(intake.has_room(0));
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut n = 0;
        while intake.has_room(0) {
            assert!(Instant::now() < deadline, "the buffer never filled");
            accept(&intake, &store, n).unwrap();
            n += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let waiting = tokio::spawn({
            let intake = intake.clone();
            async move { intake.room(0).await }
        });
        assert!(!waiting.is_finished());
        std::fs::remove_file(&out).unwrap();
        tokio::time::timeout(Duration::from_secs(20), waiting)
            .await
            .expect("room comes once the destination is back")
            .unwrap();
        assert!(intake.has_room(0));
        capture.finish().await;
    }

    #[tokio::test]
    async fn what_a_killed_hub_left_unpublished_is_published_once_at_the_next_start() {
        let out = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        {
            // A hub "killed" mid-window: the store has the messages, no file was written.
            let store = store(state.path(), 1000);
            let capture = Capture::start(settings(out.path()), store.clone(), naming()).unwrap();
            accept(&capture.intake, &store, 0).unwrap();
            accept(&capture.intake, &store, 1).unwrap();
            drop(capture);
        }
        assert!(published(out.path()).is_empty());
        let store = store(state.path(), 1000);
        let capture = Capture::start(settings(out.path()), store.clone(), naming()).unwrap();
        assert_eq!(capture.intake.pending(), 2);
        accept(&capture.intake, &store, 2).unwrap();
        capture.finish().await;
        assert_eq!(all_published(out.path()), vec![0, 1, 2]);
        // And a start after a clean stop publishes nothing again.
        drop(capture);
        let capture = Capture::start(settings(out.path()), store.clone(), naming()).unwrap();
        assert_eq!(capture.intake.pending(), 0);
        capture.finish().await;
        assert_eq!(all_published(out.path()), vec![0, 1, 2]);
    }

    #[tokio::test]
    async fn twin_change_events_in_the_partition_are_not_archived() {
        let out = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let store = store(state.path(), 1000);
        let capture = Capture::start(settings(out.path()), store.clone(), naming()).unwrap();
        accept(&capture.intake, &store, 0).unwrap();
        store
            .append_from(
                Source::TwinChange,
                Arc::from("dev-1"),
                Arc::from(""),
                PropertyBag::new(),
                Bytes::from_static(b"{}"),
                chrono::Utc::now(),
            )
            .unwrap();
        accept(&capture.intake, &store, 2).unwrap();
        capture.finish().await;
        assert_eq!(all_published(out.path()), vec![0, 2]);
        assert_eq!(
            store.partition(0).unwrap().captured(),
            3,
            "read past, not owed"
        );
    }

    #[tokio::test]
    async fn capture_reads_from_the_segment_files_what_memory_no_longer_holds() {
        let out = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        {
            // Memory keeps 2 events; capture, not running, owes all 5.
            let store = store(state.path(), 2);
            let capture = Capture::start(settings(out.path()), store.clone(), naming()).unwrap();
            drop(capture);
            for n in 0..5 {
                append(&store, n);
            }
            assert_eq!(store.partition(0).unwrap().read(0, 10).len(), 2);
        }
        let store = store(state.path(), 2);
        let capture = Capture::start(settings(out.path()), store.clone(), naming()).unwrap();
        capture.finish().await;
        assert_eq!(all_published(out.path()), vec![0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn stopping_while_the_directory_is_unwritable_keeps_the_window_in_the_store() {
        let base = tempfile::tempdir().unwrap();
        let out = base.path().join("out");
        let state = tempfile::tempdir().unwrap();
        let store = store(state.path(), 1000);
        let capture = Capture::start(one_second(&out), store.clone(), naming()).unwrap();
        break_dir(&out);
        accept(&capture.intake, &store, 0).unwrap();
        let counters = capture.intake.counters.clone();
        until("an error", || counters.errors.load(Ordering::Relaxed) >= 1).await;
        accept(&capture.intake, &store, 1).unwrap();
        // Finishing does not wait for the directory to come back.
        tokio::time::timeout(Duration::from_secs(5), capture.finish())
            .await
            .expect("finish returns while the directory is unwritable");
        std::fs::remove_file(&out).unwrap();
        let capture = Capture::start(one_second(&out), store.clone(), naming()).unwrap();
        capture.finish().await;
        assert_eq!(all_published(&out), vec![0, 1], "both recovered, once");
    }

    #[tokio::test]
    async fn an_empty_window_writes_a_file_without_records_unless_skipped() {
        let out = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let store = store(state.path(), 1000);
        let empty_written = CaptureSettings {
            skip_empty: false,
            ..one_second(out.path())
        };
        let capture = Capture::start(empty_written, store, naming()).unwrap();
        until("an empty file", || !published(out.path()).is_empty()).await;
        assert!(published(out.path())[0].1.is_empty());
        capture.finish().await;
    }
}
