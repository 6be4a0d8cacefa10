//! The files a configuration names besides itself: the key file (private to its owner, like an
//! ssh key, and holding a base64 key), the CA file (PEM with at least one certificate), and an
//! X.509 device's certificate file (PEM) and private key file (PEM, private like the key file).
//!
//! Reads those files; writes nothing. Modes are judged by [`crate::common::file_mode`], as
//! `simdevice doctor` judges them.

use std::path::PathBuf;

use super::check::check_base64;
use super::error::{CaFileError, KeyFileError, X509FileError};
use super::X509Files;
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

/// An X.509 device's certificate and key: the certificate PEM with a readable leaf that has
/// not expired at `now`, the key file private to its owner (as `read_key_file` demands) with a
/// PEM private key. Whether the key matches the certificate is for the TLS set-up (and
/// `simdevice doctor`) to say.
pub(super) fn check_x509_files(
    certificate_file: PathBuf,
    private_key_file: PathBuf,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<X509Files, X509FileError> {
    const CERT: &str = "identity.certificate_file";
    const KEY: &str = "identity.private_key_file";
    let text =
        std::fs::read_to_string(&certificate_file).map_err(|source| X509FileError::Read {
            key: CERT,
            path: certificate_file.clone(),
            source,
        })?;
    let certs = crate::common::pem::parse_pem_certificates(&text).map_err(|source| {
        X509FileError::NotPem {
            key: CERT,
            path: certificate_file.clone(),
            source,
        }
    })?;
    let Some(leaf) = certs.first() else {
        return Err(X509FileError::NoCertificate {
            path: certificate_file,
        });
    };
    let Some(summary) = crate::common::der::certificate_summary(leaf) else {
        return Err(X509FileError::Unreadable {
            path: certificate_file,
        });
    };
    if summary.not_after < now {
        return Err(X509FileError::Expired {
            path: certificate_file,
            not_after: summary.not_after.to_rfc3339(),
        });
    }
    let metadata = std::fs::metadata(&private_key_file).map_err(|source| X509FileError::Read {
        key: KEY,
        path: private_key_file.clone(),
        source,
    })?;
    if !metadata.is_file() {
        return Err(X509FileError::NotAFile {
            key: KEY,
            path: private_key_file,
        });
    }
    let mode = FileMode::of(&metadata);
    if !mode.is_private() {
        return Err(X509FileError::NotPrivate {
            path: private_key_file,
            mode,
        });
    }
    let key_text = std::fs::read(&private_key_file).map_err(|source| X509FileError::Read {
        key: KEY,
        path: private_key_file.clone(),
        source,
    })?;
    match rustls_pemfile::private_key(&mut key_text.as_slice()) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(X509FileError::NoKey {
                path: private_key_file,
            })
        }
        Err(source) => {
            return Err(X509FileError::NotPem {
                key: KEY,
                path: private_key_file,
                source,
            })
        }
    }
    Ok(X509Files {
        certificate_file,
        private_key_file,
        not_after: summary.not_after,
    })
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
