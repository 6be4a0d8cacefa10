//! One state, one owner: an exclusive advisory lock (`flock`) on a lock file next to the state
//! it guards (the hub's state directory, an agent's outbox file), holding the owner's pid so that
//! a second process can say who has it.
//!
//! The lock is the kernel's, so it ends with the process however the process ends (SIGKILL
//! included): a stale lock file never blocks a restart. The pid written into the file is only
//! for the message; the lock itself decides.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Held for as long as the value lives; dropping it (or the process ending) releases the lock.
#[derive(Debug)]
pub struct StateLock {
    path: PathBuf,
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{what} is in use by another process (pid {pid}, lock file {path}); stop it first, or give this one its own state", pid = pid.map_or_else(|| "unknown".to_string(), |p| p.to_string()))]
    Held {
        what: String,
        path: PathBuf,
        pid: Option<u32>,
    },
    #[error("cannot lock {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StateLock {
    /// Takes the lock at `path` (created 0600 if missing) without waiting, and writes this
    /// process's pid into it. `what` names the guarded state in the error ("the hub state
    /// directory /var/lib/simdevice-hub").
    pub fn acquire(path: &Path, what: &str) -> Result<StateLock, LockError> {
        let io = |source| LockError::Io {
            path: path.to_owned(),
            source,
        };
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let pid = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Err(LockError::Held {
                    what: what.to_owned(),
                    path: path.to_owned(),
                    pid,
                });
            }
            Err(TryLockError::Error(source)) => return Err(io(source)),
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(StateLock {
            path: path.to_owned(),
            _file: file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_with_the_holders_pid_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.lock");
        let first = StateLock::acquire(&path, "the test state").expect("first lock");
        // flock locks belong to the open file description: a second open in the same process
        // conflicts just as another process would.
        match StateLock::acquire(&path, "the test state") {
            Err(LockError::Held { pid, what, .. }) => {
                assert_eq!(pid, Some(std::process::id()));
                assert_eq!(what, "the test state");
            }
            other => panic!("expected Held, got {other:?}"),
        }
        drop(first);
        StateLock::acquire(&path, "the test state").expect("free again after drop");
    }

    #[cfg(unix)]
    #[test]
    fn the_lock_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.lock");
        let _lock = StateLock::acquire(&path, "x").expect("lock");
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
