//! The Unix permission bits of files the agent trusts: a key file must be private to its
//! owner (as ssh asks of a private key), a program a direct method runs must be executable and
//! writable by its owner only. The configuration check and `simdevice doctor` read modes here
//! so that they judge a file the same way and print its mode the same way (`0600`).
//!
//! Only reads metadata; never opens, changes or creates a file.

use std::fmt;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

/// The mode to create a file with that holds a secret: read and write for the owner only.
pub const PRIVATE: u32 = 0o600;

/// A file's permission bits (`0o7777`: with setuid, setgid and sticky). Shown as `0644`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileMode(u32);

impl FileMode {
    pub fn of(metadata: &std::fs::Metadata) -> FileMode {
        FileMode(metadata.permissions().mode() & 0o7777)
    }

    /// The mode of the file `path` names, following symbolic links (what opening it reaches).
    pub fn read(path: &Path) -> std::io::Result<FileMode> {
        std::fs::metadata(path).map(|metadata| FileMode::of(&metadata))
    }

    pub fn bits(self) -> u32 {
        self.0
    }

    /// Neither group nor others may read, write or run it.
    pub fn is_private(self) -> bool {
        self.0 & 0o077 == 0
    }

    /// Group or others may write it (and so change what it holds or runs).
    pub fn is_writable_by_others(self) -> bool {
        self.0 & 0o022 != 0
    }

    /// Someone may run it.
    pub fn is_executable(self) -> bool {
        self.0 & 0o111 != 0
    }
}

impl fmt::Display for FileMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(bits: u32) -> FileMode {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(bits)).unwrap();
        FileMode::read(&path).unwrap()
    }

    #[test]
    fn reads_and_shows_the_mode_of_a_file() {
        let mode = mode_of(0o640);
        assert_eq!(mode.bits(), 0o640);
        assert_eq!(mode.to_string(), "0640");
    }

    #[test]
    fn private_means_nothing_for_group_or_others() {
        assert!(mode_of(PRIVATE).is_private());
        assert!(mode_of(0o400).is_private());
        assert!(!mode_of(0o640).is_private());
        assert!(!mode_of(0o604).is_private());
        assert!(!mode_of(0o601).is_private());
    }

    #[test]
    fn writable_and_executable() {
        assert!(!mode_of(0o755).is_writable_by_others());
        assert!(mode_of(0o775).is_writable_by_others());
        assert!(mode_of(0o757).is_writable_by_others());
        assert!(mode_of(0o700).is_executable());
        assert!(!mode_of(0o644).is_executable());
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let error = FileMode::read(&dir.path().join("none")).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
    }
}
