//! The agent's durable state: one SQLite file (WAL, `synchronous=NORMAL`) holding the readings
//! the hub has not acknowledged yet (`readings`: seq, message id, creation time, body) and one
//! row of agent state (`state`: the device id, the next `seq`, the last applied desired
//! version with what it set, the door). A process crash (SIGKILL) loses nothing committed; a
//! power cut may lose the last commits, never the file. This module knows rows, not policy:
//! the bounds (size, age) are the outbox's, the meaning of the door and of desired properties
//! belongs to their modules.
//!
//! Threading, decided: one dedicated writer thread per agent owns the connection, fed by a
//! bounded channel ([`JOBS`] jobs). The async side never runs SQLite: an insert (a reading, the
//! desired state, the door) sends a job and awaits its commit; the connection task's
//! acknowledgements only append a `seq` to a list under a mutex (bounded by the readings held)
//! and wake the writer, so the MQTT session loop never waits on the disk. The writer commits
//! whatever has gathered in one transaction (group commit), so a burst of PUBACKs costs one
//! commit. `spawn_blocking` per write was the alternative; it would reorder writes and give
//! no batching. A deletion that has not reached the disk when the process dies only means that
//! reading is sent again (at-least-once; consumers de-duplicate by `$.mid`).
//!
//! Failure: the first write that fails (disk full, read-only file system, permission) is logged
//! once as an error naming the file, the store stops, `Counters::outbox_durable` turns false,
//! and every later call answers "not written": the outbox keeps its readings in memory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};

use super::context::HandlerContext;
use super::door::DoorState;
use super::outbox::Reading;

/// Jobs waiting for the writer thread; senders of inserts wait when it is full.
pub const JOBS: usize = 256;
/// Jobs committed in one transaction, at most.
const BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the directory {} of the outbox: {source}", dir.display())]
    Directory {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the outbox {} for writing: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot use the outbox {}: {source}", path.display())]
    Sqlite {
        path: PathBuf,
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
    #[error("cannot start the outbox writer thread: {0}")]
    Thread(std::io::Error),
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
    /// Deletions are waiting in `Shared::deletes`.
    Wake,
    /// Commit what is waiting, then stop.
    Close,
}

struct Job {
    op: Op,
    /// Told whether the job was committed.
    reply: Option<oneshot::Sender<bool>>,
}

struct Shared {
    path: PathBuf,
    /// Acknowledged or dropped readings not yet deleted on disk.
    deletes: Mutex<Vec<u64>>,
    healthy: AtomicBool,
    ctx: HandlerContext,
}

impl Shared {
    fn deletes(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.deletes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, error: &rusqlite::Error) {
        self.healthy.store(false, Ordering::Release);
        self.ctx
            .counters()
            .outbox_durable
            .store(false, Ordering::Relaxed);
        tracing::error!(path = %self.path.display(), %error,
            "cannot write the outbox; it is no longer durable");
        tracing::warn!(path = %self.path.display(),
            "readings are now kept in memory only: those not yet acknowledged are lost if the agent stops");
    }
}

/// A handle on the writer thread; cheap to clone. Every call after a failure (or after
/// [`Store::close`]) returns "not written" at once.
#[derive(Clone)]
pub struct Store {
    jobs: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

impl Store {
    /// Opens (or creates) the file and its directory, checks that it belongs to `device_id`,
    /// loads what it holds and starts the writer thread. Blocking: call it from
    /// `spawn_blocking`. Sets `outbox_durable` in the context's counters on success.
    pub fn open(
        path: &Path,
        device_id: &str,
        ctx: HandlerContext,
    ) -> Result<(Store, Persisted), StoreError> {
        Self::open_with(path, device_id, ctx, |_| Ok(()))
    }

    fn open_with(
        path: &Path,
        device_id: &str,
        ctx: HandlerContext,
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

        let (jobs, receiver) = mpsc::channel(JOBS);
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            deletes: Mutex::new(Vec::new()),
            healthy: AtomicBool::new(true),
            ctx: ctx.clone(),
        });
        std::thread::Builder::new()
            .name("simdevice-outbox".into())
            .spawn({
                let shared = shared.clone();
                move || writer(conn, receiver, &shared)
            })
            .map_err(StoreError::Thread)?;
        ctx.counters().outbox_durable.store(true, Ordering::Relaxed);
        Ok((Store { jobs, shared }, persisted))
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// False once a write has failed.
    pub fn is_durable(&self) -> bool {
        self.shared.healthy.load(Ordering::Acquire)
    }

    async fn commit(&self, op: Op) -> bool {
        if !self.is_durable() {
            return false;
        }
        let (reply, committed) = oneshot::channel();
        let job = Job {
            op,
            reply: Some(reply),
        };
        if self.jobs.send(job).await.is_err() {
            return false;
        }
        committed.await.unwrap_or(false)
    }

    /// Stores a reading (and moves the next `seq` past it); true once committed.
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

    /// Deletes readings (acknowledged or dropped) without waiting: never blocks the caller.
    pub fn delete(&self, seqs: impl IntoIterator<Item = u64>) {
        if !self.is_durable() {
            return;
        }
        let wake = {
            let mut deletes = self.shared.deletes();
            let was_empty = deletes.is_empty();
            deletes.extend(seqs);
            was_empty && !deletes.is_empty()
        };
        if wake {
            // Full: the writer has jobs queued and takes the deletions in its next round.
            let _ = self.jobs.try_send(Job {
                op: Op::Wake,
                reply: None,
            });
        }
    }

    /// Commits what is waiting and stops the writer thread.
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
        .prepare("SELECT seq, message_id, created, body FROM readings ORDER BY seq")
        .map_err(sql)?;
    let rows = stmt
        .query_map([], |r| {
            let created: i64 = r.get(2)?;
            let body: Vec<u8> = r.get(3)?;
            Ok(Reading {
                seq: uint(r.get(0)?),
                message_id: r.get(1)?,
                created: Utc
                    .timestamp_millis_opt(created)
                    .single()
                    .unwrap_or(DateTime::<Utc>::UNIX_EPOCH),
                body: Bytes::from(body),
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

/// The writer thread: takes what has gathered, commits it in one transaction, answers.
fn writer(mut conn: Connection, mut jobs: mpsc::Receiver<Job>, shared: &Shared) {
    while let Some(first) = jobs.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let deletes = std::mem::take(&mut *shared.deletes());
        let closing = batch.iter().any(|job| matches!(job.op, Op::Close));
        let outcome = write_batch(&mut conn, &batch, &deletes);
        if let Err(error) = &outcome {
            shared.fail(error);
        }
        for job in batch {
            if let Some(reply) = job.reply {
                let _ = reply.send(outcome.is_ok());
            }
        }
        if outcome.is_err() || closing {
            return;
        }
    }
}

fn write_batch(conn: &mut Connection, batch: &[Job], deletes: &[u64]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    for job in batch {
        match &job.op {
            Op::Insert(reading) => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO readings (seq, message_id, created, body)
                     VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![
                    int(reading.seq),
                    reading.message_id,
                    reading.created.timestamp_millis(),
                    &reading.body[..]
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
            Op::Wake | Op::Close => {}
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
        }
    }

    fn open(path: &Path) -> (Store, Persisted) {
        let (ctx, _reports) = HandlerContext::for_tests();
        Store::open(path, "test-device", ctx).expect("store opens")
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
        let (ctx, _reports) = HandlerContext::for_tests();
        let error = Store::open(&path, "other-device", ctx)
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
        let (ctx, _reports) = HandlerContext::for_tests();
        let error = Store::open(&file.join("outbox.db"), "d", ctx.clone())
            .err()
            .expect("refused");
        let message = error.to_string();
        assert!(message.contains(&file.display().to_string()), "{message}");
        assert!(message.contains("os error"), "{message}");
        assert!(!ctx.counters().outbox_durable.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_full_disk_stops_the_store_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let (ctx, _reports) = HandlerContext::for_tests();
        // The file may not grow: the next page it needs is "disk full" (SQLITE_FULL).
        let (store, _) = Store::open_with(&path, "d", ctx.clone(), |conn| {
            let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            conn.pragma_update(None, "max_page_count", pages)
        })
        .unwrap();
        assert!(ctx.counters().outbox_durable.load(Ordering::Relaxed));
        let big = Reading {
            body: Bytes::from(vec![b'x'; 64 * 1024]),
            ..reading(1)
        };
        assert!(!store.insert(&big).await, "the write fails");
        assert!(!store.is_durable());
        assert!(!ctx.counters().outbox_durable.load(Ordering::Relaxed));
        assert!(!store.insert(&reading(2)).await, "and stays failed");
        store.delete([1]);
        assert!(store.shared.deletes().is_empty(), "nothing piles up");
    }
}
