//! Capture: every device-to-cloud message the hub accepts, archived into Avro files in Azure's
//! layouts (Event Hubs Capture, or IoT Hub routing to storage), one file per closed window, in a
//! directory or a Blob Storage container. The rooms, lowest first: `format` (schemas, the file
//! writer), `window` (when a window closes), `wal` (the write-ahead log that makes acknowledged
//! messages survive a kill), `sink` (the destinations and their atomic writes). This file is the
//! intake the MQTT connections call and the two tasks behind it. It touches the destination and
//! `capture/` in the state directory, nothing else of the hub.
//!
//! How a message flows: a connection calls [`Intake::accept`] before it acknowledges the
//! message. The intake takes a place in the bounded channel, appends the message to the
//! write-ahead log and sends it, all under one lock, so the log's order is the channel's. The
//! collector task encodes each message into the open window's file as it arrives; when the
//! window closes (time or size, whichever first) it rotates the log, takes the messages that
//! the old log segments hold, finishes the file and hands it to the publisher task, then opens
//! the next window at once. The publisher writes the file (retrying with backoff while the
//! destination fails), then deletes the log segments it covered. Files are published in the
//! order their windows closed. At start the segments left by a killed hub are read back into
//! the first window: each acknowledged message lands in exactly one published file.
//!
//! The buffer is bounded: the channel ([`CHANNEL_CAPACITY`] messages), the open window, one
//! closed window waiting and one being written (each at most the window's size, encoded). When
//! the channel runs low on room ([`HEADROOM`]), connections stop reading from their devices
//! until the collector catches up ([`Intake::room`]): a burst faster than capture is slowed,
//! as a broker slows its publishers. When that lasts ([`ROOM_WAIT`]: the destination is down
//! and the publisher is retrying) and the channel fills, a message is refused, not dropped:
//! `accept` fails, the connection closes without acknowledging it, and the device sends it
//! again when it reconnects. Refusals are counted (`simdevice_hub_capture_refused_total`) and
//! logged.

pub mod format;
pub mod sink;
pub mod wal;
pub mod window;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use format::Captured;
pub use format::{Codec, Encoding, Format};
pub use sink::{Destination, Naming};
use window::{Closed, Window, WindowRules};

use crate::hub::telemetry::Event;

/// Messages the channel between the connections and the collector holds. Past this the hub
/// refuses new telemetry until capture catches up (see the module comment).
pub const CHANNEL_CAPACITY: usize = 65_536;
/// Free places under which a connection stops reading from its device until the collector
/// catches up ([`Intake::room`]): room for what a thousand connections can have in one read
/// each, so that a burst is slowed, not refused.
pub const HEADROOM: usize = 16_384;
/// How long a connection waits for room before it reads on anyway (and a full channel then
/// refuses): the destination is down, not slow.
pub const ROOM_WAIT: Duration = Duration::from_secs(10);
/// The namespace in Event Hubs paths: the local hub has no Event Hubs namespace of its own.
pub const NAMESPACE: &str = "simdevice";
/// The local hub has one partition.
pub const PARTITION: &str = "0";
/// Azure's defaults: Event Hubs Capture's portal default window (300 s) and routing's default
/// chunk size (300 MiB, `maxChunkSizeInBytes` 314572800).
pub const DEFAULT_WINDOW_SECS: u64 = 300;
pub const DEFAULT_WINDOW_BYTES: u64 = 314_572_800;
/// First and last delay between attempts to write a file that failed.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);

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
    #[error("cannot start capture: its file format cannot be set up")]
    Encode(#[from] format::EncodeError),
    #[error(transparent)]
    Wal(#[from] wal::WalError),
}

/// Why a message was not accepted for capture.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("capture is behind: its buffer is full")]
    Full,
    #[error("capture has stopped")]
    Stopped,
    #[error("cannot append to the capture write-ahead log")]
    Wal(#[source] std::io::Error),
}

/// What `/metrics` shows of capture.
#[derive(Debug, Default)]
pub struct CaptureCounters {
    pub files: AtomicU64,
    pub errors: AtomicU64,
    pub refused: AtomicU64,
    /// Accepted messages not yet in a published file.
    pub pending: AtomicU64,
}

struct Log {
    wal: wal::Wal,
    tx: mpsc::Sender<Item>,
}

struct Item {
    segment: u64,
    message: Captured,
}

/// The connections' side: cheap to call, never blocks on the disk beyond one `write`.
pub struct Intake {
    log: Mutex<Log>,
    pub counters: Arc<CaptureCounters>,
    /// Woken by the collector as it takes messages: connections waiting in [`Intake::room`].
    drained: tokio::sync::Notify,
    /// A sender kept outside the lock, only to read the channel's free room without it.
    probe: mpsc::Sender<Item>,
    /// [`HEADROOM`], or a quarter of a smaller channel.
    headroom: usize,
}

impl Intake {
    /// Takes the message for capture, or says why not. On `Ok` the message is in the
    /// write-ahead log (it survives a kill of the hub) and on its way to a window.
    pub fn accept(&self, event: &Event, generation_id: &str) -> Result<(), Refused> {
        let mut guard = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let Log { wal, tx } = &mut *guard;
        let permit = match tx.try_reserve() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Full(())) => {
                let refused = self.counters.refused.fetch_add(1, Ordering::Relaxed);
                // Once per thousand: a full buffer refuses many messages a second.
                if refused.is_multiple_of(1000) {
                    tracing::warn!(
                        refused = refused + 1,
                        "capture buffer full: telemetry refused"
                    );
                }
                return Err(Refused::Full);
            }
            Err(mpsc::error::TrySendError::Closed(())) => return Err(Refused::Stopped),
        };
        let message = Captured {
            event: event.clone(),
            generation_id: generation_id.to_string(),
        };
        let segment = wal.append(&message).map_err(|e| {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "capture write-ahead log append failed: telemetry refused");
            Refused::Wal(e)
        })?;
        self.counters.pending.fetch_add(1, Ordering::Relaxed);
        permit.send(Item { segment, message });
        Ok(())
    }

    /// Whether the channel has [`HEADROOM`] free places (or has closed: `accept` then says so).
    pub fn has_room(&self) -> bool {
        self.probe.capacity() >= self.headroom || self.probe.is_closed()
    }

    /// Resolves once the channel has [`HEADROOM`] free places. A connection awaits it before it
    /// reads more from its device while capture is behind, so that TCP slows the device (as a
    /// broker under load does) instead of the hub refusing what it sends; with
    /// [`ROOM_WAIT`] as its bound, see `mqtt/connection.rs`.
    pub async fn room(&self) {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.has_room() {
                return;
            }
            drained.await;
        }
    }

    /// Starts a new log segment; returns its number. Every message of an older segment is in
    /// the channel already (append and send happen under the same lock).
    fn rotate(&self) -> Result<u64, wal::WalError> {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.wal.rotate()
    }

    fn published(&self, highest_sequence: Option<u64>, segment: Option<u64>) {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sequence) = highest_sequence {
            if let Err(error) = log.wal.mark_published(sequence) {
                tracing::warn!(%error, "cannot record the last published capture sequence number");
            }
        }
        let Some(segment) = segment else { return };
        if let Err(error) = log.wal.remove_before(segment) {
            tracing::warn!(%error, "cannot remove published capture log segments");
        }
    }
}

/// The running capture: the intake for the connections and the tasks' handles.
pub struct Capture {
    pub intake: Arc<Intake>,
    pub settings: CaptureSettings,
    /// The sequence number the hub's next message gets: after every one published or
    /// recovered.
    pub next_sequence: u64,
    finish: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Capture {
    /// Prepares the destination (a directory is made and swept of temporaries), opens the log
    /// in `state_dir/capture`, reads back what a killed hub left in the log, and starts the
    /// collector and the publisher.
    pub fn start(
        settings: CaptureSettings,
        state_dir: &Path,
        naming: Naming,
    ) -> Result<Capture, CaptureError> {
        Capture::start_with(settings, state_dir, naming, CHANNEL_CAPACITY)
    }

    fn start_with(
        settings: CaptureSettings,
        state_dir: &Path,
        naming: Naming,
        capacity: usize,
    ) -> Result<Capture, CaptureError> {
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
        // The first window is opened here so that a format that cannot be set up fails the
        // start, not the task.
        let first = Window::open(
            Instant::now(),
            settings.format,
            settings.codec,
            settings.encoding,
        )?;
        let (wal, recovered) = wal::Wal::open(&state_dir.join("capture"))?;
        let highest_recovered = recovered
            .iter()
            .map(|m| m.event.sequence_number)
            .max()
            .unwrap_or(0);
        let next_sequence = wal.last_published().max(highest_recovered) + 1;
        let (tx, rx) = mpsc::channel(capacity);
        let counters = Arc::new(CaptureCounters::default());
        counters
            .pending
            .store(recovered.len() as u64, Ordering::Relaxed);
        if !recovered.is_empty() {
            tracing::info!(
                messages = recovered.len(),
                "capture: messages acknowledged before the last stop and not yet in a file are \
                 recovered into the first window"
            );
        }
        let intake = Arc::new(Intake {
            probe: tx.clone(),
            headroom: HEADROOM.min(capacity / 4).max(1),
            log: Mutex::new(Log { wal, tx }),
            counters,
            drained: tokio::sync::Notify::new(),
        });
        let finish = CancellationToken::new();
        // One closed window waits while another is written: the bound of the module notes.
        let (ready_tx, ready_rx) = mpsc::channel(1);
        let collector = Collector {
            rules,
            format: settings.format,
            codec: settings.codec,
            encoding: settings.encoding,
            intake: intake.clone(),
            rx,
            ready: ready_tx,
            finish: finish.clone(),
        };
        let publisher = Publisher {
            destination: settings.destination.clone(),
            format: settings.format,
            naming,
            intake: intake.clone(),
            ready: ready_rx,
            finish: finish.clone(),
        };
        let tasks = vec![
            tokio::spawn(collector.run(first, recovered)),
            tokio::spawn(publisher.run()),
        ];
        Ok(Capture {
            intake,
            settings,
            next_sequence,
            finish,
            tasks: Mutex::new(tasks),
        })
    }

    /// Closes the open window, publishes every closed one and ends the tasks. Call when no
    /// connection can accept messages any more. A file that cannot be written now stays in the
    /// log (with every later one) for the next start.
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
    /// Once it is published, the log segments below this hold nothing unpublished. `None`
    /// when the rotation failed: its segments stay until a later window's rotation.
    segment: Option<u64>,
}

/// Owns the open window: encodes messages into it, closes it, hands it on.
struct Collector {
    rules: WindowRules,
    format: Format,
    codec: Codec,
    encoding: Encoding,
    intake: Arc<Intake>,
    rx: mpsc::Receiver<Item>,
    ready: mpsc::Sender<Ready>,
    /// Cancelled by [`Capture::finish`]: close the open window, hand it on, then end.
    finish: CancellationToken,
}

impl Collector {
    async fn run(mut self, mut window: Window, recovered: Vec<Captured>) {
        // Recovered messages are in segments older than any new one.
        let mut full = false;
        for message in &recovered {
            full |= self.push(&mut window, message);
        }
        drop(recovered);
        // A message of the next window, taken from the channel while closing this one.
        let mut carried: Option<Item> = None;
        // Messages taken from the channel: every 1024th wakes the connections waiting for room.
        let mut taken: u64 = 0;
        loop {
            if !full {
                let deadline = window.deadline(&self.rules);
                tokio::select! {
                    biased;
                    _ = self.finish.cancelled() => {
                        // No connection sends any more: take everything, close, hand on.
                        while let Ok(item) = self.rx.try_recv() {
                            self.push(&mut window, &item.message);
                        }
                        let _ = self.close(window, &mut carried).await;
                        return;
                    }
                    _ = tokio::time::sleep_until(deadline) => {}
                    item = self.rx.recv() => match item {
                        Some(item) => {
                            full = self.push(&mut window, &item.message);
                            taken += 1;
                            if taken.is_multiple_of(1024) {
                                self.intake.drained.notify_waiters();
                            }
                            continue;
                        }
                        None => return,
                    },
                }
            }
            if !self.close(window, &mut carried).await {
                return;
            }
            window = match Window::open(Instant::now(), self.format, self.codec, self.encoding) {
                Ok(window) => window,
                Err(error) => {
                    // Not seen in practice (the first window opened with the same settings);
                    // ending the task makes `accept` refuse rather than lose messages.
                    tracing::error!(%error, "capture stops: a window cannot be opened");
                    return;
                }
            };
            full = false;
            if let Some(item) = carried.take() {
                full = self.push(&mut window, &item.message);
            }
        }
    }

    /// Encodes `message` into `window`; true when the window is full. A message that cannot
    /// be encoded (not seen: the schemas take every event the hub accepts) is logged, counted
    /// and left out of the file.
    fn push(&self, window: &mut Window, message: &Captured) -> bool {
        match window.push(message, &self.rules) {
            Ok(full) => full,
            Err(error) => {
                let counters = &self.intake.counters;
                counters.errors.fetch_add(1, Ordering::Relaxed);
                counters.pending.fetch_sub(1, Ordering::Relaxed);
                tracing::error!(%error, sequence = message.event.sequence_number,
                    device = %message.event.device_id, "capture: a message cannot be encoded and is left out of its file");
                false
            }
        }
    }

    /// Closes `window`: rotates the log, moves the rest of the old segments' messages from the
    /// channel into it, finishes its file and hands it to the publisher (waiting while another
    /// closed window waits there). The first message of the new segment, if one was taken, is
    /// left in `carried`. False when the publisher has stopped.
    async fn close(&mut self, mut window: Window, carried: &mut Option<Item>) -> bool {
        let segment = match self.intake.rotate() {
            Ok(segment) => Some(segment),
            Err(error) => {
                // The window is still written; its segments stay until a later rotation, so
                // a kill before then replays them (duplicates, never losses).
                self.intake.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "cannot rotate the capture write-ahead log");
                None
            }
        };
        if let Some(segment) = segment {
            while let Ok(item) = self.rx.try_recv() {
                if item.segment >= segment {
                    *carried = Some(item);
                    break;
                }
                self.push(&mut window, &item.message);
            }
        }
        let messages = window.len();
        let closed = match window.close(&self.rules) {
            Ok(closed) => closed,
            Err(error) => {
                // As for `push`, not seen in practice (finishing writes the last block into
                // memory): the window's messages are left out of the archive, said and counted
                // here, since a later window's publication drops the log segments they are in.
                let counters = &self.intake.counters;
                counters.errors.fetch_add(1, Ordering::Relaxed);
                counters.pending.fetch_sub(messages, Ordering::Relaxed);
                tracing::error!(%error, messages, "capture window cannot be finished: its messages are left out of the archive");
                return true;
            }
        };
        self.intake.drained.notify_waiters();
        let ready = Ready {
            closed,
            closed_at: chrono::Utc::now(),
            segment,
        };
        self.ready.send(ready).await.is_ok()
    }
}

/// Writes closed windows' files in order, then drops the log segments they covered.
struct Publisher {
    destination: Destination,
    format: Format,
    naming: Naming,
    intake: Arc<Intake>,
    ready: mpsc::Receiver<Ready>,
    finish: CancellationToken,
}

impl Publisher {
    async fn run(mut self) {
        while let Some(ready) = self.ready.recv().await {
            let Ready {
                closed,
                closed_at,
                segment,
            } = ready;
            if let Some(file) = closed.file {
                let relative = sink::relative_path(self.format, &self.naming, closed_at);
                if !self
                    .publish(&relative, Bytes::from(file), closed.messages)
                    .await
                {
                    // Stopped while the destination failed: this window's messages, and every
                    // later one's, stay in the log for the next start (removing any segment now
                    // could drop them).
                    return;
                }
            }
            self.intake
                .counters
                .pending
                .fetch_sub(closed.messages, Ordering::Relaxed);
            self.intake.published(closed.highest_sequence, segment);
        }
    }

    /// Writes one file, retrying with backoff; false when the hub stopped before it could.
    async fn publish(&self, relative: &str, file: Bytes, messages: u64) -> bool {
        let counters = &self.intake.counters;
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
                            "capture window left in the write-ahead log for the next start"
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
    use std::path::PathBuf;

    use super::format::tests::sample;
    use super::*;

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

    fn naming() -> Naming {
        Naming {
            namespace: NAMESPACE.into(),
            hub: "localhost".into(),
            partition: PARTITION.into(),
        }
    }

    /// Every published `.avro` file under `root`, with its sequence numbers.
    fn published(root: &Path) -> Vec<(PathBuf, Vec<i64>)> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_owned()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
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

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "never happened: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_window_is_written_when_its_time_is_up_and_its_log_is_then_empty() {
        let out = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let one_second = CaptureSettings {
            window: Duration::from_secs(1),
            ..settings(out.path())
        };
        let capture = Capture::start(one_second, state.path(), naming()).unwrap();
        for n in 1..=3 {
            capture.intake.accept(&sample(n, "x").event, "g").unwrap();
        }
        assert_eq!(capture.intake.counters.pending.load(Ordering::Relaxed), 3);
        // Counted once the file is durable, a moment after it appears.
        let counters = capture.intake.counters.clone();
        until("a published file", || {
            counters.files.load(Ordering::Relaxed) == 1
                && counters.pending.load(Ordering::Relaxed) == 0
        })
        .await;
        assert_eq!(published(out.path())[0].1, vec![1, 2, 3]);
        capture.finish().await;
        let (_, left) = wal::Wal::open(&state.path().join("capture")).unwrap();
        assert!(left.is_empty(), "published messages are not replayed");
        // skip_empty: the windows after that one wrote nothing.
        assert_eq!(published(out.path()).len(), 1);
    }

    #[tokio::test]
    async fn a_size_limit_closes_the_window_before_its_time() {
        let out = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let one = sample(1, "x").size() as u64;
        let rules = CaptureSettings {
            window: Duration::from_secs(900),
            window_bytes: 2 * one,
            ..settings(out.path())
        };
        let capture = Capture::start(rules, state.path(), naming()).unwrap();
        let start = Instant::now();
        for n in 1..=2 {
            capture.intake.accept(&sample(n, "x").event, "g").unwrap();
        }
        until("a file", || !published(out.path()).is_empty()).await;
        assert!(Instant::now() - start < Duration::from_secs(10));
        assert_eq!(published(out.path())[0].1, vec![1, 2]);
        capture.finish().await;
    }

    #[tokio::test]
    async fn finish_writes_the_open_window() {
        let out = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let capture = Capture::start(settings(out.path()), state.path(), naming()).unwrap();
        capture.intake.accept(&sample(9, "x").event, "g").unwrap();
        capture.finish().await;
        assert_eq!(published(out.path())[0].1, vec![9]);
    }

    #[tokio::test]
    async fn a_directory_that_cannot_be_written_is_retried_counted_and_the_full_buffer_refuses() {
        let base = tempfile::tempdir().unwrap();
        let out = base.path().join("out");
        let state = tempfile::tempdir().unwrap();
        let one_second = CaptureSettings {
            window: Duration::from_secs(1),
            ..settings(&out)
        };
        let capture = Capture::start_with(one_second, state.path(), naming(), 2).unwrap();
        // The directory goes, and a file takes its name: nothing can be written there.
        std::fs::remove_dir(&out).unwrap();
        std::fs::write(&out, b"").unwrap();
        capture.intake.accept(&sample(1, "x").event, "g").unwrap();
        let counters = capture.intake.counters.clone();
        until("errors", || counters.errors.load(Ordering::Relaxed) >= 3).await;
        // The task is retrying: the buffer of 2 fills, then messages are refused, not lost.
        capture.intake.accept(&sample(2, "x").event, "g").unwrap();
        capture.intake.accept(&sample(3, "x").event, "g").unwrap();
        assert!(matches!(
            capture.intake.accept(&sample(4, "x").event, "g"),
            Err(Refused::Full)
        ));
        assert_eq!(counters.refused.load(Ordering::Relaxed), 1);
        assert_eq!(counters.pending.load(Ordering::Relaxed), 3);
        std::fs::remove_file(&out).unwrap();
        until("the file", || out.is_dir() && !published(&out).is_empty()).await;
        capture.finish().await;
        let all: Vec<i64> = published(&out).into_iter().flat_map(|(_, s)| s).collect();
        assert_eq!(all, vec![1, 2, 3]);
        assert_eq!(counters.pending.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn while_capture_is_behind_room_waits_until_the_collector_catches_up() {
        let base = tempfile::tempdir().unwrap();
        let out = base.path().join("out");
        let state = tempfile::tempdir().unwrap();
        let one_second = CaptureSettings {
            window: Duration::from_secs(1),
            ..settings(&out)
        };
        // A channel of 8: room means 2 free places.
        let capture = Capture::start_with(one_second, state.path(), naming(), 8).unwrap();
        std::fs::remove_dir(&out).unwrap();
        std::fs::write(&out, b"").unwrap();
        let intake = capture.intake.clone();
        assert!(intake.has_room());
        // The publisher retries, two closed windows wait (about 2 s), the collector waits
        // behind them, and the channel fills.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut n = 0;
        while intake.has_room() {
            assert!(Instant::now() < deadline, "the channel never filled");
            n += 1;
            if intake.accept(&sample(n, "x").event, "g").is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let waiting = tokio::spawn({
            let intake = intake.clone();
            async move { intake.room().await }
        });
        assert!(!waiting.is_finished());
        std::fs::remove_file(&out).unwrap();
        tokio::time::timeout(Duration::from_secs(20), waiting)
            .await
            .expect("room comes once the destination is back")
            .unwrap();
        assert!(intake.has_room());
        capture.finish().await;
    }

    #[tokio::test]
    async fn what_a_killed_hub_left_in_the_log_is_published_once_at_the_next_start() {
        let out = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        {
            // A hub "killed" mid-window: the log has the messages, no file was written.
            let (mut log, _) = wal::Wal::open(&state.path().join("capture")).unwrap();
            log.append(&sample(1, "a")).unwrap();
            log.append(&sample(2, "b")).unwrap();
        }
        let capture = Capture::start(settings(out.path()), state.path(), naming()).unwrap();
        assert_eq!(capture.intake.counters.pending.load(Ordering::Relaxed), 2);
        capture.intake.accept(&sample(3, "c").event, "g").unwrap();
        capture.finish().await;
        let all: Vec<i64> = published(out.path())
            .into_iter()
            .flat_map(|(_, s)| s)
            .collect();
        assert_eq!(all, vec![1, 2, 3]);
        let (_, left) = wal::Wal::open(&state.path().join("capture")).unwrap();
        assert!(left.is_empty());
    }

    #[tokio::test]
    async fn numbering_goes_on_after_what_was_published_and_what_was_recovered() {
        let out = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let capture = Capture::start(settings(out.path()), state.path(), naming()).unwrap();
        assert_eq!(capture.next_sequence, 1);
        capture.intake.accept(&sample(5, "x").event, "g").unwrap();
        capture.finish().await;
        let capture = Capture::start(settings(out.path()), state.path(), naming()).unwrap();
        assert_eq!(capture.next_sequence, 6, "after the published 5");
        capture.intake.accept(&sample(9, "x").event, "g").unwrap();
        drop(capture); // a kill: 9 stays in the log
        let capture = Capture::start(settings(out.path()), state.path(), naming()).unwrap();
        assert_eq!(capture.next_sequence, 10, "after the recovered 9");
        capture.finish().await;
    }

    #[tokio::test]
    async fn stopping_while_the_directory_is_unwritable_keeps_the_window_in_the_log() {
        let base = tempfile::tempdir().unwrap();
        let out = base.path().join("out");
        let state = tempfile::tempdir().unwrap();
        let one_second = CaptureSettings {
            window: Duration::from_secs(1),
            ..settings(&out)
        };
        let capture = Capture::start(one_second.clone(), state.path(), naming()).unwrap();
        std::fs::remove_dir(&out).unwrap();
        std::fs::write(&out, b"").unwrap();
        capture.intake.accept(&sample(1, "x").event, "g").unwrap();
        let counters = capture.intake.counters.clone();
        until("an error", || counters.errors.load(Ordering::Relaxed) >= 1).await;
        capture.intake.accept(&sample(2, "x").event, "g").unwrap();
        // Finishing does not wait for the directory to come back.
        tokio::time::timeout(Duration::from_secs(5), capture.finish())
            .await
            .expect("finish returns while the directory is unwritable");
        std::fs::remove_file(&out).unwrap();
        let capture = Capture::start(one_second, state.path(), naming()).unwrap();
        capture.finish().await;
        let all: Vec<i64> = published(&out).into_iter().flat_map(|(_, s)| s).collect();
        assert_eq!(all, vec![1, 2], "both recovered, once");
    }

    #[tokio::test]
    async fn an_empty_window_writes_a_file_without_records_unless_skipped() {
        let out = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let empty_written = CaptureSettings {
            window: Duration::from_secs(1),
            skip_empty: false,
            ..settings(out.path())
        };
        let capture = Capture::start(empty_written, state.path(), naming()).unwrap();
        until("an empty file", || !published(out.path()).is_empty()).await;
        assert!(published(out.path())[0].1.is_empty());
        capture.finish().await;
    }
}
