//! Crash-safe persistence of the hub's state in one SQLite file (`hub.db`).
//!
//! The store knows rows, not IoT Hub rules: devices are kept as JSON documents keyed by id,
//! shared access policies as rows, a few settings (the group key) as name/value pairs, CA
//! certificates as JSON documents keyed by name, and scheduled jobs as JSON documents with one
//! JSON row per (job, device). It
//! runs in WAL mode with `synchronous=NORMAL`: a crash of the process never loses a committed
//! write and never corrupts the file; a power cut may lose the last commits but not the file.
//! Calls are synchronous and short (one row each), made under a mutex.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the hub database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("hub database")]
    Sql(#[from] rusqlite::Error),
}

/// A shared access policy as stored: name, two keys and its rights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyRow {
    pub name: String,
    pub primary_key: String,
    pub secondary_key: String,
    pub rights: String,
}

pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS policies (name TEXT PRIMARY KEY, primary_key TEXT NOT NULL,
                 secondary_key TEXT NOT NULL, rights TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS job_devices (job_id TEXT NOT NULL, device_id TEXT NOT NULL,
                 doc TEXT NOT NULL, PRIMARY KEY (job_id, device_id));
             CREATE TABLE IF NOT EXISTS dps_enrollments (kind TEXT NOT NULL, id TEXT NOT NULL,
                 doc TEXT NOT NULL, PRIMARY KEY (kind, id));
             CREATE TABLE IF NOT EXISTS certificates (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS c2d_messages (seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 device_id TEXT NOT NULL, doc TEXT NOT NULL, body BLOB NOT NULL);",
        )
        .map_err(open_err)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite itself consistent, so the poison flag
        // carries no information worth stopping for.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn load_devices(&self) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, doc FROM devices ORDER BY id")?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn put_device(&self, id: &str, doc: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO devices (id, doc) VALUES (?1, ?2)
             ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
            params![id, doc],
        )?;
        Ok(())
    }

    pub fn delete_device(&self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM devices WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// The CA certificates (`x509.rs`), as JSON documents keyed by name.
    pub fn load_certificates(&self) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name, doc FROM certificates ORDER BY name")?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn put_certificate(&self, name: &str, doc: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO certificates (name, doc) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET doc = excluded.doc",
            params![name, doc],
        )?;
        Ok(())
    }

    pub fn delete_certificate(&self, name: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM certificates WHERE name = ?1", params![name])?;
        Ok(())
    }

    pub fn load_policies(&self) -> Result<Vec<PolicyRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, primary_key, secondary_key, rights FROM policies ORDER BY name",
        )?;
        let rows = stmt.query_map([], |row| {
            Ok(PolicyRow {
                name: row.get(0)?,
                primary_key: row.get(1)?,
                secondary_key: row.get(2)?,
                rights: row.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn put_policy(&self, policy: &PolicyRow) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO policies (name, primary_key, secondary_key, rights)
             VALUES (?1, ?2, ?3, ?4)",
            params![
                policy.name,
                policy.primary_key,
                policy.secondary_key,
                policy.rights
            ],
        )?;
        Ok(())
    }

    pub fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT value FROM settings WHERE name = ?1",
                params![name],
                |row| row.get(0),
            )
            .optional()?)
    }

    pub fn put_setting(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO settings (name, value) VALUES (?1, ?2)",
            params![name, value],
        )?;
        Ok(())
    }
}

impl Store {
    pub fn load_jobs(&self) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, doc FROM jobs ORDER BY id")?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn put_job(&self, id: &str, doc: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO jobs (id, doc) VALUES (?1, ?2)
             ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
            params![id, doc],
        )?;
        Ok(())
    }

    /// Every per-device job row as (job id, device id, doc).
    pub fn load_job_devices(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT job_id, device_id, doc FROM job_devices ORDER BY job_id, device_id")?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Writes a job document and any number of its device rows (device id, doc) in one
    /// transaction.
    pub fn put_job_with_devices(
        &self,
        id: &str,
        doc: Option<&str>,
        devices: &[(String, String)],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if let Some(doc) = doc {
            tx.execute(
                "INSERT INTO jobs (id, doc) VALUES (?1, ?2)
                 ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
                params![id, doc],
            )?;
        }
        {
            let mut stmt = tx.prepare(
                "INSERT INTO job_devices (job_id, device_id, doc) VALUES (?1, ?2, ?3)
                 ON CONFLICT(job_id, device_id) DO UPDATE SET doc = excluded.doc",
            )?;
            for (device_id, doc) in devices {
                stmt.execute(params![id, device_id, doc])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// DPS enrollments (`hub::dps`): JSON documents keyed by kind (`individual`, `group`) and id.
impl Store {
    pub fn load_dps_enrollments(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT kind, id, doc FROM dps_enrollments ORDER BY kind, id")?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn put_dps_enrollment(&self, kind: &str, id: &str, doc: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO dps_enrollments (kind, id, doc) VALUES (?1, ?2, ?3)
             ON CONFLICT(kind, id) DO UPDATE SET doc = excluded.doc",
            params![kind, id, doc],
        )?;
        Ok(())
    }

    pub fn delete_dps_enrollment(&self, kind: &str, id: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "DELETE FROM dps_enrollments WHERE kind = ?1 AND id = ?2",
            params![kind, id],
        )?;
        Ok(())
    }
}

/// Cloud-to-device messages waiting for their device (`hub::c2d`): one row each, in the order
/// they were sent (`seq`), the properties as a JSON document and the body as it was sent.
impl Store {
    /// Every waiting message as (seq, device id, doc, body), oldest first.
    #[allow(clippy::type_complexity)]
    pub fn load_c2d(&self) -> Result<Vec<(i64, String, String, Vec<u8>)>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT seq, device_id, doc, body FROM c2d_messages ORDER BY seq")?;
        let rows = stmt.query_map([], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Stores a message and returns its `seq`.
    pub fn put_c2d(&self, device_id: &str, doc: &str, body: &[u8]) -> Result<i64, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO c2d_messages (device_id, doc, body) VALUES (?1, ?2, ?3)",
            params![device_id, doc, body],
        )?;
        Ok(conn.last_insert_rowid())
    }

    pub fn delete_c2d(&self, seqs: &[i64]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare("DELETE FROM c2d_messages WHERE seq = ?1")?;
            for seq in seqs {
                stmt.execute(params![seq])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        {
            let store = Store::open(&path).unwrap();
            store.put_device("d1", "{\"a\":1}").unwrap();
            store.put_device("d1", "{\"a\":2}").unwrap();
            store.put_device("d2", "{}").unwrap();
            store.delete_device("d2").unwrap();
            store.put_setting("group_key", "k").unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.load_devices().unwrap(),
            vec![("d1".to_string(), "{\"a\":2}".to_string())]
        );
        assert_eq!(store.setting("group_key").unwrap().as_deref(), Some("k"));
        assert_eq!(store.setting("other").unwrap(), None);
    }

    #[test]
    fn jobs_and_their_device_rows_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        {
            let store = Store::open(&path).unwrap();
            store.put_job("j1", "{\"s\":1}").unwrap();
            let rows = vec![("d1".to_string(), "{}".to_string())];
            store
                .put_job_with_devices("j1", Some("{\"s\":2}"), &rows)
                .unwrap();
            let rows = vec![("d1".to_string(), "{\"done\":true}".to_string())];
            store.put_job_with_devices("j1", None, &rows).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.load_jobs().unwrap(),
            vec![("j1".to_string(), "{\"s\":2}".to_string())]
        );
        assert_eq!(
            store.load_job_devices().unwrap(),
            vec![(
                "j1".to_string(),
                "d1".to_string(),
                "{\"done\":true}".to_string()
            )]
        );
    }
}
