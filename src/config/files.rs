//! The files a configuration names besides itself: the key file (private to its owner, like an
//! ssh key, and holding a base64 key) and the CA file (PEM with at least one certificate).
//!
//! Reads those two files; writes nothing. Modes are judged by [`crate::common::file_mode`], as
//! `simdevice doctor` judges them.

use std::path::PathBuf;

use super::check::check_base64;
use super::error::{CaFileError, KeyFileError};
use crate::common::file_mode::FileMode;

/// Reads a key file: refused when group or others may read or write it, trailing whitespace
/// trimmed, base64.
pub(super) fn read_key_file(path: PathBuf) -> Result<String, KeyFileError> {
    let metadata = match std::fs::metadata(&path) {
        Ok(metadata) => metadata,
        Err(source) => return Err(KeyFileError::Read { path, source }),
    };
    if !metadata.is_file() {
        return Err(KeyFileError::NotAFile { path });
    }
    let mode = FileMode::of(&metadata);
    if !mode.is_private() {
        return Err(KeyFileError::NotPrivate { path, mode });
    }
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(source) => return Err(KeyFileError::Read { path, source }),
    };
    let key = text.trim_end().to_string();
    match check_base64(&key) {
        Ok(()) => Ok(key),
        Err(problem) => Err(KeyFileError::BadKey { path, problem }),
    }
}

/// A CA file that holds at least one PEM certificate.
pub(super) fn check_ca_file(path: PathBuf) -> Result<PathBuf, CaFileError> {
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(source) => return Err(CaFileError::Read { path, source }),
    };
    match crate::common::pem::parse_pem_certificates(&text) {
        Ok(certs) if certs.is_empty() => Err(CaFileError::NoCertificate { path }),
        Ok(_) => Ok(path),
        Err(source) => Err(CaFileError::NotPem { path, source }),
    }
}
