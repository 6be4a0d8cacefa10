//! The agent's durable state: one SQLite file (WAL, `synchronous=NORMAL`) holding the readings
//! the hub has not acknowledged yet (`readings`: seq, message id, creation time, body, the
//! application properties a telemetry template gave it, as a `k=v&k2=v2` bag) and one
//! row of agent state (`state`: the device id, the next `seq`, the last applied desired
//! version with what it set, the door). A process crash (SIGKILL) loses nothing committed; a
//! power cut may lose the last commits, never the file. This module knows rows of plain data
//! (readings, the door, the applied desired state), not policy and not the rest of the agent:
//! the bounds (size, age) are the outbox's, the meaning of the door and of desired properties
//! belongs to their modules, and nothing here sees a handler or the connection.
//!
//! Threading, decided: one dedicated writer thread per agent owns the connection. The async
//! side never runs SQLite: an insert (a reading, the desired state, the door) queues a job and
//! awaits its commit; at most [`JOBS`] jobs wait (a semaphore: the sender of one more waits for
//! room). The writer commits whatever has gathered in one transaction (group commit).
//! `spawn_blocking` per write was the alternative; it would reorder writes and give no batching.
//!
//! Deletions (acknowledged or dropped readings) are not worth a transaction of their own: they
//! only append a `seq` to a list under the mutex, without waking the writer, so the MQTT
//! session loop never waits on the disk, and they are committed with the next job. The writer
//! expects the next insert one insert gap after the last (readings come on a steady cadence)
//! and waits for it until [`DELETE_SLACK`] past that, never more than [`MAX_DELETE_DELAY`];
//! when no insert comes in time it commits the deletions alone. At the default cadence that is
//! one transaction per reading, its insert carrying the previous reading's deletion. A deletion
//! that has not reached the disk when the process dies only means that reading is sent again
//! (at-least-once; consumers de-duplicate by `$.mid`).
//!
//! Failure: the first write that fails (disk full, read-only file system, permission) is logged
//! once as an error naming the file, the store stops, the `durable` flag given at open turns
//! false, and every later call answers "not written": the outbox keeps its readings in memory.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Map, Value};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::door::DoorState;
use super::reading::Reading;
use crate::protocol::property_bag::PropertyBag;

/// Jobs waiting for the writer thread; senders of more wait for room.
pub const JOBS: usize = 256;
/// Jobs committed in one transaction, at most.
const BATCH: usize = 256;
/// How long past the expected next insert the writer waits before committing deletions alone.
pub const DELETE_SLACK: Duration = Duration::from_secs(1);
/// The longest a deletion waits for an insert to ride with.
pub const MAX_DELETE_DELAY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the directory {} of the outbox", dir.display())]
    Directory {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the outbox {} for writing", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use the outbox {}", path.display())]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the outbox {} belongs to device {found:?}, not {expected:?}: give each device its own \
         outbox.path", path.display()
    )]
    OtherDevice {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("cannot start the outbox writer thread")]
    Thread(#[source] std::io::Error),
}

/// What a desired-properties update left behind, so a restart needs not apply it again: its
/// `$version`, the telemetry interval it set (if it did) and the stored settings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AppliedDesired {
    pub version: u64,
    /// Seconds; `None` when no desired property has set the interval.
    pub telemetry_interval: Option<f64>,
    pub settings: Map<String, Value>,
}

/// What was on disk when the store opened.
#[derive(Debug)]
pub struct Persisted {
    /// Unacknowledged readings, in `seq` order.
    pub readings: Vec<Reading>,
    /// The `seq` of the next reading: after every `seq` ever produced with this file.
    pub next_seq: u64,
    pub desired: AppliedDesired,
    /// `None` until the door was first saved.
    pub door: Option<DoorState>,
}

impl Default for Persisted {
    fn default() -> Persisted {
        Persisted {
            readings: Vec::new(),
            next_seq: 1,
            desired: AppliedDesired::default(),
            door: None,
        }
    }
}

enum Op {
    Insert(Reading),
    Desired(AppliedDesired),
    Door(DoorState),
    /// Commit what is waiting, close the file, then answer.
    Close,
}

struct Job {
    op: Op,
    /// Told whether the job was committed.
    reply: oneshot::Sender<bool>,
    /// The job's place among the [`JOBS`]; freed once it is committed.
    _place: OwnedSemaphorePermit,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Acknowledged or dropped readings not yet deleted on disk.
    deletes: Vec<u64>,
    /// When `deletes` stopped being empty.
    deletes_since: Option<Instant>,
    /// The writer sleeps with no deadline: a deletion must wake it so that it sets one.
    writer_parked: bool,
    /// The writer has ended (a failed write, a close, every handle dropped): jobs are refused.
    stopped: bool,
    /// Every [`Store`] handle is gone: commit what is waiting and end.
    abandoned: bool,
}

struct Shared {
    path: PathBuf,
    /// True while the store writes; the agent shows it (`durable`).
    durable: Arc<AtomicBool>,
    queue: Mutex<Queue>,
    /// Wakes the writer: a job, a deletion while it is parked, the last handle dropped.
    wake: Condvar,
    /// Transactions committed, for tests and the curious.
    commits: AtomicU64,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, error: &rusqlite::Error) {
        self.durable.store(false, Ordering::Release);
        tracing::error!(path = %self.path.display(), %error,
            "cannot write the outbox; it is no longer durable");
        tracing::warn!(path = %self.path.display(),
            "readings are now kept in memory only: those not yet acknowledged are lost if the agent stops");
    }
}

/// Tells the writer when the last [`Store`] handle goes, so its thread does not outlive them.
struct Owner(Arc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.queue().abandoned = true;
        self.0.wake.notify_one();
    }
}

/// A handle on the writer thread; cheap to clone. Every call after a failure (or after
/// [`Store::close`]) returns "not written" at once.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    places: Arc<Semaphore>,
    _owner: Arc<Owner>,
}

impl Store {
    /// Opens (or creates) the file and its directory, checks that it belongs to `device_id`,
    /// loads what it holds and starts the writer thread. Blocking: call it from
    /// `spawn_blocking`. `durable` is set while the store writes (true from here, false after a
    /// failed write), for whoever shows it.
    pub fn open(
        path: &Path,
        device_id: &str,
        durable: Arc<AtomicBool>,
    ) -> Result<(Store, Persisted), StoreError> {
        Self::open_with(path, device_id, durable, |_| Ok(()))
    }

    fn open_with(
        path: &Path,
        device_id: &str,
        durable: Arc<AtomicBool>,
        setup: impl FnOnce(&Connection) -> rusqlite::Result<()>,
    ) -> Result<(Store, Persisted), StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Directory {
                dir: dir.to_path_buf(),
                source,
            })?;
        }
        // Opened once with std first: its error carries the OS reason (EACCES, EROFS, ...),
        // which SQLite reduces to "unable to open database file".
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| StoreError::File {
                path: path.to_path_buf(),
                source,
            })?;
        let sql = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(sql)?;
        let persisted = prepare(&conn, device_id, path)?;
        setup(&conn).map_err(sql)?;

        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            durable,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            commits: AtomicU64::new(0),
        });
        std::thread::Builder::new()
            .name("simdevice-outbox".into())
            .spawn({
                let shared = shared.clone();
                move || writer(conn, &shared)
            })
            .map_err(StoreError::Thread)?;
        shared.durable.store(true, Ordering::Release);
        Ok((
            Store {
                _owner: Arc::new(Owner(shared.clone())),
                shared,
                places: Arc::new(Semaphore::new(JOBS)),
            },
            persisted,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// False once a write has failed (or the store was closed).
    pub fn is_durable(&self) -> bool {
        self.shared.durable.load(Ordering::Acquire)
    }

    async fn commit(&self, op: Op) -> bool {
        if !self.is_durable() {
            return false;
        }
        let Ok(place) = self.places.clone().acquire_owned().await else {
            return false;
        };
        let (reply, committed) = oneshot::channel();
        {
            let mut queue = self.shared.queue();
            if queue.stopped {
                return false;
            }
            queue.jobs.push_back(Job {
                op,
                reply,
                _place: place,
            });
        }
        self.shared.wake.notify_one();
        committed.await.unwrap_or(false)
    }

    /// Stores a reading (and moves the next `seq` past it), with the deletions waiting; true
    /// once committed.
    pub async fn insert(&self, reading: &Reading) -> bool {
        self.commit(Op::Insert(reading.clone())).await
    }

    /// Stores the last applied desired version and what it set; true once committed.
    pub async fn save_desired(&self, desired: &AppliedDesired) -> bool {
        self.commit(Op::Desired(desired.clone())).await
    }

    /// Stores the door state; true once committed.
    pub async fn save_door(&self, door: &DoorState) -> bool {
        self.commit(Op::Door(door.clone())).await
    }

    /// Deletes readings (acknowledged or dropped) without waiting: never blocks the caller,
    /// and wakes the writer only when it sleeps with no deadline (see the module's note).
    pub fn delete(&self, seqs: impl IntoIterator<Item = u64>) {
        if !self.is_durable() {
            return;
        }
        let wake = {
            let mut queue = self.shared.queue();
            if queue.stopped {
                return;
            }
            let before = queue.deletes.len();
            queue.deletes.extend(seqs);
            if before == 0 && !queue.deletes.is_empty() {
                queue.deletes_since = Some(Instant::now());
            }
            queue.writer_parked && queue.deletes.len() > before
        };
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// Commits what is waiting, closes the file and stops the writer thread.
    pub async fn close(&self) {
        self.commit(Op::Close).await;
    }
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn uint(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Sets the file up (WAL, tables), claims it for `device_id` and reads what it holds.
fn prepare(conn: &Connection, device_id: &str, path: &Path) -> Result<Persisted, StoreError> {
    let sql = |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(sql)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sql)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(sql)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS readings (seq INTEGER PRIMARY KEY, message_id TEXT NOT NULL,
             created INTEGER NOT NULL, body BLOB NOT NULL);
         CREATE TABLE IF NOT EXISTS state (id INTEGER PRIMARY KEY CHECK (id = 1),
             device_id TEXT NOT NULL, next_seq INTEGER NOT NULL,
             last_desired_version INTEGER NOT NULL, desired TEXT, door TEXT);",
    )
    .map_err(sql)?;
    // Files written before templates have no `properties` column; NULL reads as none.
    let has_properties: bool = conn
        .query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('readings') WHERE name = 'properties'",
            [],
            |r| r.get(0),
        )
        .map_err(sql)?;
    if !has_properties {
        conn.execute_batch("ALTER TABLE readings ADD COLUMN properties TEXT")
            .map_err(sql)?;
    }
    type Row = (String, i64, i64, Option<String>, Option<String>);
    let row: Option<Row> = conn
        .query_row(
            "SELECT device_id, next_seq, last_desired_version, desired, door FROM state WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()
        .map_err(sql)?;
    let mut persisted = Persisted::default();
    match row {
        None => {
            conn.execute(
                "INSERT INTO state (id, device_id, next_seq, last_desired_version)
                 VALUES (1, ?1, 1, 0)",
                params![device_id],
            )
            .map_err(sql)?;
        }
        Some((found, next_seq, version, desired, door)) => {
            if found != device_id {
                return Err(StoreError::OtherDevice {
                    path: path.to_path_buf(),
                    found,
                    expected: device_id.to_string(),
                });
            }
            persisted.next_seq = uint(next_seq).max(1);
            persisted.desired = desired
                .as_deref()
                .map(desired_from_json)
                .unwrap_or_default();
            persisted.desired.version = uint(version);
            persisted.door = door.as_deref().and_then(door_from_json);
        }
    }
    let mut stmt = conn
        .prepare("SELECT seq, message_id, created, body, properties FROM readings ORDER BY seq")
        .map_err(sql)?;
    let rows = stmt
        .query_map([], |r| {
            let created: i64 = r.get(2)?;
            let body: Vec<u8> = r.get(3)?;
            let properties: Option<String> = r.get(4)?;
            Ok(Reading {
                seq: uint(r.get(0)?),
                message_id: r.get(1)?,
                created: Utc
                    .timestamp_millis_opt(created)
                    .single()
                    .unwrap_or(DateTime::<Utc>::UNIX_EPOCH),
                body: Bytes::from(body),
                // Written by `PropertyBag::format`; a bag that does not parse back (a file
                // edited by hand) leaves the reading without its properties.
                app_properties: properties
                    .as_deref()
                    .and_then(|text| PropertyBag::parse(text).ok())
                    .unwrap_or_default(),
            })
        })
        .map_err(sql)?;
    for reading in rows {
        persisted.readings.push(reading.map_err(sql)?);
    }
    if let Some(last) = persisted.readings.last() {
        persisted.next_seq = persisted.next_seq.max(last.seq + 1);
    }
    Ok(persisted)
}

fn millis(time: Option<DateTime<Utc>>) -> Value {
    time.map(|t| json!(t.timestamp_millis()))
        .unwrap_or(Value::Null)
}

fn from_millis(value: &Value) -> Option<DateTime<Utc>> {
    value
        .as_i64()
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
}

fn door_to_json(door: &DoorState) -> String {
    json!({
        "locked": door.locked,
        "lockedAt": millis(door.locked_at),
        "unlockAt": millis(door.unlock_at),
    })
    .to_string()
}

fn door_from_json(text: &str) -> Option<DoorState> {
    let value: Value = serde_json::from_str(text).ok()?;
    Some(DoorState {
        locked: value.get("locked")?.as_bool()?,
        locked_at: from_millis(&value["lockedAt"]),
        unlock_at: from_millis(&value["unlockAt"]),
    })
}

fn desired_to_json(desired: &AppliedDesired) -> String {
    json!({
        "telemetryInterval": desired.telemetry_interval,
        "settings": desired.settings,
    })
    .to_string()
}

/// The version is kept in its own column; a document that cannot be read is taken as empty.
fn desired_from_json(text: &str) -> AppliedDesired {
    let value: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    AppliedDesired {
        version: 0,
        telemetry_interval: value["telemetryInterval"].as_f64(),
        settings: value["settings"].as_object().cloned().unwrap_or_default(),
    }
}

/// Insert cadence as the writer sees it.
#[derive(Default)]
struct Cadence {
    last_insert: Option<Instant>,
    gap: Option<Duration>,
}

impl Cadence {
    fn inserted(&mut self, at: Instant) {
        if let Some(last) = self.last_insert {
            self.gap = Some(at - last);
        }
        self.last_insert = Some(at);
    }

    /// When the next insert is late: one gap (at most [`MAX_DELETE_DELAY`]) after the last
    /// insert, plus [`DELETE_SLACK`]. `None` until the cadence is known.
    fn next_insert_late(&self) -> Option<Instant> {
        let (last, gap) = (self.last_insert?, self.gap?);
        Some(last + gap.min(MAX_DELETE_DELAY) + DELETE_SLACK)
    }

    /// When deletions waiting since `since` are committed alone: when the next insert is late,
    /// but no sooner than [`DELETE_SLACK`] and no later than [`MAX_DELETE_DELAY`] after `since`.
    fn delete_deadline(&self, since: Instant) -> Instant {
        self.next_insert_late()
            .unwrap_or(since)
            .clamp(since + DELETE_SLACK, since + MAX_DELETE_DELAY)
    }
}

/// What the writer takes for one transaction.
struct Round {
    jobs: Vec<Job>,
    deletes: Vec<u64>,
    /// No handle is left: commit this and end.
    last: bool,
}

/// Waits until there is something to commit: a job, every handle gone, or deletions whose
/// deadline has come. Right after an insert the writer does not park: it sleeps until the next
/// insert is late, because that reading's deletion is about to come and must not wake it.
fn next_round(shared: &Shared, cadence: &Cadence) -> Round {
    let mut queue = shared.queue();
    loop {
        if !queue.jobs.is_empty() || queue.abandoned {
            break;
        }
        let now = Instant::now();
        let wake_at = match queue.deletes_since {
            Some(since) => Some(cadence.delete_deadline(since)),
            None => cadence.next_insert_late().filter(|at| *at > now),
        };
        match wake_at {
            Some(at) if at <= now => break,
            Some(at) => {
                queue.writer_parked = false;
                queue = shared
                    .wake
                    .wait_timeout(queue, at - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            None => {
                queue.writer_parked = true;
                queue = shared.wake.wait(queue).unwrap_or_else(|p| p.into_inner());
            }
        }
    }
    queue.writer_parked = false;
    queue.deletes_since = None;
    let take = queue.jobs.len().min(BATCH);
    Round {
        jobs: queue.jobs.drain(..take).collect(),
        deletes: std::mem::take(&mut queue.deletes),
        last: queue.abandoned && queue.jobs.is_empty(),
    }
}

/// The writer thread: takes what has gathered, commits it in one transaction, answers.
fn writer(mut conn: Connection, shared: &Shared) {
    let mut cadence = Cadence::default();
    loop {
        let round = next_round(shared, &cadence);
        let closing = round.last || round.jobs.iter().any(|job| matches!(job.op, Op::Close));
        let outcome = if round.jobs.is_empty() && round.deletes.is_empty() {
            Ok(())
        } else {
            let written = write_batch(&mut conn, &round.jobs, &round.deletes);
            if written.is_ok() {
                shared.commits.fetch_add(1, Ordering::Relaxed);
            }
            written
        };
        if let Err(error) = &outcome {
            shared.fail(error);
        }
        if round.jobs.iter().any(|job| matches!(job.op, Op::Insert(_))) {
            cadence.inserted(Instant::now());
        }
        if outcome.is_err() || closing {
            {
                let mut queue = shared.queue();
                queue.stopped = true;
                // Jobs queued meanwhile are answered "not written" (their replies dropped).
                queue.jobs.clear();
                queue.deletes.clear();
            }
            shared.durable.store(false, Ordering::Release);
            // The file is closed before anyone learns that the store has stopped, so a new
            // owner of the file never meets this connection.
            drop(conn);
            for job in round.jobs {
                let _ = job.reply.send(outcome.is_ok());
            }
            return;
        }
        for job in round.jobs {
            let _ = job.reply.send(true);
        }
    }
}

fn write_batch(conn: &mut Connection, batch: &[Job], deletes: &[u64]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    for job in batch {
        match &job.op {
            Op::Insert(reading) => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO readings (seq, message_id, created, body, properties)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    int(reading.seq),
                    reading.message_id,
                    reading.created.timestamp_millis(),
                    &reading.body[..],
                    (!reading.app_properties.is_empty()).then(|| reading.app_properties.format()),
                ])?;
                tx.prepare_cached("UPDATE state SET next_seq = max(next_seq, ?1) WHERE id = 1")?
                    .execute(params![int(reading.seq.saturating_add(1))])?;
            }
            Op::Desired(desired) => {
                tx.prepare_cached(
                    "UPDATE state SET last_desired_version = ?1, desired = ?2 WHERE id = 1",
                )?
                .execute(params![int(desired.version), desired_to_json(desired)])?;
            }
            Op::Door(door) => {
                tx.prepare_cached("UPDATE state SET door = ?1 WHERE id = 1")?
                    .execute(params![door_to_json(door)])?;
            }
            Op::Close => {}
        }
    }
    for seq in deletes {
        tx.prepare_cached("DELETE FROM readings WHERE seq = ?1")?
            .execute(params![int(*seq)])?;
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(seq: u64) -> Reading {
        Reading {
            seq,
            message_id: format!("mid-{seq}"),
            created: Utc::now(),
            body: Bytes::from(format!("{{\"seq\":{seq}}}")),
            app_properties: PropertyBag::new(),
        }
    }

    fn open(path: &Path) -> (Store, Persisted) {
        Store::open(path, "test-device", Arc::default()).expect("store opens")
    }

    /// The seqs in the file, read by a second connection as any SQLite client would.
    fn seqs_on_disk(path: &Path) -> Vec<u64> {
        let conn = Connection::open(path).unwrap();
        let mut stmt = conn
            .prepare("SELECT seq FROM readings ORDER BY seq")
            .unwrap();
        let rows = stmt.query_map([], |r| r.get::<_, i64>(0)).unwrap();
        rows.map(|seq| uint(seq.unwrap())).collect()
    }

    #[tokio::test]
    async fn readings_and_state_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/outbox.db");
        let (store, persisted) = open(&path);
        assert!(persisted.readings.is_empty());
        assert_eq!(persisted.next_seq, 1);
        assert!(persisted.door.is_none());
        for seq in 1..=5 {
            assert!(store.insert(&reading(seq)).await);
        }
        store.delete([2, 4]);
        let mut door = DoorState::default();
        door.lock(Utc::now(), Some(std::time::Duration::from_secs(600)));
        assert!(store.save_door(&door).await);
        let mut settings = Map::new();
        settings.insert("building".into(), json!(43));
        let desired = AppliedDesired {
            version: 7,
            telemetry_interval: Some(2.5),
            settings,
        };
        assert!(store.save_desired(&desired).await);
        store.close().await;
        assert!(!store.insert(&reading(6)).await, "closed");

        let (_store, persisted) = open(&path);
        let seqs: Vec<u64> = persisted.readings.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 3, 5]);
        assert_eq!(persisted.readings[1].message_id, "mid-3");
        assert_eq!(persisted.readings[1].body, Bytes::from("{\"seq\":3}"));
        assert_eq!(persisted.next_seq, 6);
        assert_eq!(persisted.desired, desired);
        let restored = persisted.door.expect("door saved");
        assert!(restored.locked);
        assert_eq!(
            restored.unlock_at.map(|t| t.timestamp_millis()),
            door.unlock_at.map(|t| t.timestamp_millis())
        );
    }

    #[tokio::test]
    async fn a_readings_template_properties_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let (store, _) = open(&path);
        let mut app_properties = PropertyBag::new();
        app_properties.insert("alert", "a=b&c %");
        app_properties.insert("source", "sim");
        let with = Reading {
            app_properties: app_properties.clone(),
            ..reading(1)
        };
        assert!(store.insert(&with).await);
        assert!(store.insert(&reading(2)).await);
        store.close().await;
        let (_store, persisted) = open(&path);
        assert_eq!(persisted.readings[0].app_properties, app_properties);
        assert!(persisted.readings[1].app_properties.is_empty());
    }

    #[tokio::test]
    async fn a_file_from_before_templates_opens_and_keeps_its_readings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE readings (seq INTEGER PRIMARY KEY, message_id TEXT NOT NULL,
                     created INTEGER NOT NULL, body BLOB NOT NULL);
                 INSERT INTO readings VALUES (4, 'mid-4', 0, x'7b7d');",
            )
            .unwrap();
        }
        let (store, persisted) = open(&path);
        assert_eq!(persisted.readings.len(), 1);
        assert_eq!(persisted.readings[0].message_id, "mid-4");
        assert!(persisted.readings[0].app_properties.is_empty());
        let mut app_properties = PropertyBag::new();
        app_properties.insert("k", "v");
        let reading = Reading {
            app_properties: app_properties.clone(),
            ..reading(5)
        };
        assert!(store.insert(&reading).await, "the new column is written");
        store.close().await;
        let (_store, persisted) = open(&path);
        assert_eq!(persisted.readings[1].app_properties, app_properties);
    }

    #[tokio::test]
    async fn next_seq_never_goes_back_even_when_everything_was_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let (store, _) = open(&path);
        for seq in 1..=3 {
            assert!(store.insert(&reading(seq)).await);
        }
        store.delete([1, 2, 3]);
        store.close().await;
        let (_store, persisted) = open(&path);
        assert!(persisted.readings.is_empty());
        assert_eq!(persisted.next_seq, 4);
    }

    #[test]
    fn a_file_of_another_device_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        drop(open(&path));
        let error = Store::open(&path, "other-device", Arc::default())
            .err()
            .expect("refused");
        let message = error.to_string();
        assert!(message.contains("test-device"), "{message}");
        assert!(message.contains("other-device"), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
    }

    #[test]
    fn an_impossible_path_names_the_path_and_the_os_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "not a directory").unwrap();
        let durable = Arc::new(AtomicBool::new(false));
        let error = Store::open(&file.join("outbox.db"), "d", durable.clone())
            .err()
            .expect("refused");
        let message = error.to_string();
        assert!(message.contains(&file.display().to_string()), "{message}");
        let cause = std::error::Error::source(&error)
            .expect("the OS error")
            .to_string();
        assert!(cause.contains("os error"), "{cause}");
        assert!(!durable.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_full_disk_stops_the_store_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let durable = Arc::new(AtomicBool::new(false));
        // The file may not grow: the next page it needs is "disk full" (SQLITE_FULL).
        let (store, _) = Store::open_with(&path, "d", durable.clone(), |conn| {
            let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            conn.pragma_update(None, "max_page_count", pages)
        })
        .unwrap();
        assert!(durable.load(Ordering::Relaxed));
        let big = Reading {
            body: Bytes::from(vec![b'x'; 64 * 1024]),
            ..reading(1)
        };
        assert!(!store.insert(&big).await, "the write fails");
        assert!(!store.is_durable());
        assert!(!durable.load(Ordering::Relaxed));
        assert!(!store.insert(&reading(2)).await, "and stays failed");
        store.delete([1]);
        assert!(store.shared.queue().deletes.is_empty(), "nothing piles up");
    }

    #[tokio::test]
    async fn a_deletion_rides_with_the_next_insert() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let (store, _) = open(&path);
        assert!(store.insert(&reading(1)).await);
        assert_eq!(store.shared.commits.load(Ordering::Relaxed), 1);
        store.delete([1]);
        assert!(store.insert(&reading(2)).await);
        assert_eq!(
            store.shared.commits.load(Ordering::Relaxed),
            2,
            "one transaction for the insert and the deletion before it"
        );
        assert_eq!(seqs_on_disk(&path), vec![2]);
    }

    #[tokio::test]
    async fn a_deletion_with_no_insert_to_ride_with_is_committed_alone_soon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let (store, _) = open(&path);
        assert!(store.insert(&reading(1)).await);
        assert!(store.insert(&reading(2)).await);
        let asked = Instant::now();
        store.delete([1]);
        let limit = DELETE_SLACK * 2 + Duration::from_secs(5);
        while seqs_on_disk(&path) != vec![2] {
            assert!(asked.elapsed() < limit, "the deletion is still not on disk");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(store.shared.commits.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn deletions_wait_for_the_next_insert_within_bounds() {
        let now = Instant::now();
        let mut cadence = Cadence::default();
        assert_eq!(
            cadence.delete_deadline(now),
            now + DELETE_SLACK,
            "no cadence yet"
        );
        cadence.inserted(now - Duration::from_secs(20));
        cadence.inserted(now - Duration::from_secs(10));
        assert_eq!(
            cadence.delete_deadline(now - Duration::from_secs(9)),
            now + DELETE_SLACK,
            "until the next insert (10 s after the last) is late"
        );
        assert_eq!(
            cadence.delete_deadline(now + Duration::from_secs(30)),
            now + Duration::from_secs(30) + DELETE_SLACK,
            "the insert is late already: soon"
        );
        cadence.inserted(now);
        cadence.inserted(now + Duration::from_secs(3600));
        let since = now + Duration::from_secs(3600);
        assert_eq!(cadence.delete_deadline(since), since + MAX_DELETE_DELAY);
    }

    #[tokio::test]
    async fn the_writer_ends_with_the_last_handle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let (store, _) = open(&path);
        assert!(store.insert(&reading(1)).await);
        store.delete([1]);
        let shared = store.shared.clone();
        drop(store);
        let asked = Instant::now();
        while !shared.queue().stopped {
            assert!(
                asked.elapsed() < Duration::from_secs(5),
                "the writer still runs"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(seqs_on_disk(&path).is_empty(), "what waited was committed");
    }
}
