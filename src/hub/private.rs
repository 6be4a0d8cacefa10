//! Secrets at rest: the hub's state directory holds every policy key and device key (`hub.db`
//! and its `-wal`/`-shm` files), the service connection string (`hub.json`) and the CA key
//! (`ca.key`), so the directory is [`DIR_MODE`] (0700) and those files [`FILE_MODE`] (0600).
//!
//! Modes are set exactly, whatever the umask: a file is created with the mode and then
//! `chmod`ed to it (the umask can only have narrowed it). SQLite creates `-wal` and `-shm` with
//! the mode of the database file (and `fchmod`s them to it, past the umask), so creating
//! `hub.db` 0600 before SQLite opens it covers all three.
//!
//! State left by an older version with wider modes is tightened at start, with a warning that
//! names each path and its old mode; the hub does not refuse to start (as ssh does with a wide
//! key file), because the fix is certain and the operator is told. This module knows paths and
//! modes only: which files are secret is the caller's list.

use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The state directory: its owner only.
pub const DIR_MODE: u32 = 0o700;
/// A file that holds a secret: readable and writable by its owner only.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` [`DIR_MODE`] if it is missing (its parents with the usual modes). An
/// existing directory is left as it is: [`tighten`] it once it is ours.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    match DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => fs::set_permissions(dir, Permissions::from_mode(DIR_MODE)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates an empty file [`FILE_MODE`] if it is missing; an existing one is left as it is.
pub fn create_file(path: &Path) -> io::Result<()> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
    {
        Ok(file) => file.set_permissions(Permissions::from_mode(FILE_MODE)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes a secret file [`FILE_MODE`], under a temporary name then renamed, so that a reader
/// never sees half a file and the old file's mode does not carry over.
pub fn write_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(tmp)?;
    // The temporary file may be left over (and wider) from a crash: set the mode exactly.
    file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    file.write_all(contents)?;
    file.sync_all()?;
    fs::rename(tmp, path)
}

/// Narrows `path` to `mode` when it grants anything more (a narrower mode is left alone).
/// Returns the old mode when it changed anything; a missing path is not an error.
pub fn tighten(path: &Path, mode: u32) -> io::Result<Option<u32>> {
    let old = match fs::metadata(path) {
        Ok(metadata) => metadata.permissions().mode() & 0o7777,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if old & !mode == 0 {
        return Ok(None);
    }
    fs::set_permissions(path, Permissions::from_mode(mode))?;
    tracing::warn!(
        path = %path.display(),
        old_mode = format!("{old:04o}"),
        new_mode = format!("{mode:04o}"),
        "tightened the mode of hub state that holds secrets (left by an older version?)"
    );
    Ok(Some(old))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o7777
    }

    #[test]
    fn created_modes_are_exact_and_wide_ones_are_tightened() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("a/state");
        create_dir(&dir).expect("create dir");
        assert_eq!(mode(&dir), DIR_MODE);
        create_dir(&dir).expect("an existing dir is fine");

        let file = dir.join("secret");
        write_file(&file, b"key").expect("write");
        assert_eq!(mode(&file), FILE_MODE);
        assert_eq!(fs::read(&file).expect("read"), b"key");

        fs::set_permissions(&file, Permissions::from_mode(0o644)).expect("widen");
        assert_eq!(tighten(&file, FILE_MODE).expect("tighten"), Some(0o644));
        assert_eq!(mode(&file), FILE_MODE);
        assert_eq!(tighten(&file, FILE_MODE).expect("again"), None);
        fs::set_permissions(&file, Permissions::from_mode(0o400)).expect("narrow");
        assert_eq!(tighten(&file, FILE_MODE).expect("narrower"), None);
        assert_eq!(mode(&file), 0o400);
        assert_eq!(
            tighten(&dir.join("missing"), FILE_MODE).expect("missing"),
            None
        );

        let empty = dir.join("empty");
        create_file(&empty).expect("create");
        assert_eq!(mode(&empty), FILE_MODE);
        fs::write(&empty, b"kept").expect("fill");
        create_file(&empty).expect("an existing file is left alone");
        assert_eq!(fs::read(&empty).expect("read"), b"kept");
    }
}
