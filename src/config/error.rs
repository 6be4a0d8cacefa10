//! Why a configuration was refused: [`ConfigError`], whose messages name the key, the file, and
//! the environment variable when the value came from one; and the translation of the `config`
//! crate's errors (unknown keys, wrong types, TOML syntax) into such messages.
//!
//! A lower error (an I/O error, a PEM error, the `config` crate's own) is kept as the `source`
//! and not repeated in the message, so a printer of the whole chain shows each cause once.
//! Where the lower error's text could quote a value it is not kept: serde's "invalid type"
//! quotes the string found, and the TOML parser quotes the offending line, either of which may
//! be the device key; those become our own words, which never quote a value.
//!
//! No I/O here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::common::file_mode::FileMode;
use crate::common::template::TemplateError;

/// Why the configuration was refused. Messages name the key and where its value came from;
/// they never contain a key or a connection string.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {} does not exist", path.display())]
    FileMissing { path: PathBuf },
    #[error("cannot read configuration file {}", path.display())]
    FileRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `message`: the TOML parser's position and reason, without the line it quotes.
    #[error("cannot parse configuration file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    /// A value that is missing, of the wrong type, out of range or unknown. `env_var` is set
    /// when the value came from that environment variable.
    #[error("{}", describe_invalid(key, file.as_deref(), env_var.as_deref(), message))]
    Invalid {
        key: String,
        file: Option<PathBuf>,
        env_var: Option<String>,
        message: String,
    },
    /// The `config` crate failed in a way that is not about a value (its text quotes none).
    #[error("{}", describe_invalid(key, file.as_deref(), None, "the configuration layers cannot be merged"))]
    Layers {
        key: String,
        file: Option<PathBuf>,
        /// Boxed: the `config` crate's error is large, and this case is rare.
        #[source]
        source: Box<config::ConfigError>,
    },
    #[error(
        "no device identity{}: set identity.connection_string, or identity.host_name, \
         identity.device_id and one of identity.key, identity.key_file, identity.key_env \
         (in the file or as SIMDEVICE__IDENTITY__* environment variables)",
        in_file(file.as_deref())
    )]
    MissingIdentity { file: Option<PathBuf> },
    #[error(transparent)]
    KeyFile(KeyFileError),
    #[error(transparent)]
    CaFile(CaFileError),
    #[error(transparent)]
    X509File(X509FileError),
    /// `telemetry.template` names a file that cannot be read or is not a valid template; the
    /// source names the file, the line and the column.
    #[error("{}", describe_invalid("telemetry.template", file.as_deref(), env_var.as_deref(), "the template is refused"))]
    Template {
        file: Option<PathBuf>,
        env_var: Option<String>,
        /// Boxed: it is large, and this case is rare.
        #[source]
        source: Box<TemplateError>,
    },
}

/// Why the file `identity.key_file` names was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("identity.key_file {}: cannot read it", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("identity.key_file {}: is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error(
        "identity.key_file {}: is accessible by group or others (mode {mode}); run: chmod 600 {}",
        path.display(),
        path.display()
    )]
    NotPrivate { path: PathBuf, mode: FileMode },
    #[error("identity.key_file {}: {problem}", path.display())]
    BadKey { path: PathBuf, problem: KeyProblem },
}

impl KeyFileError {
    pub fn path(&self) -> &Path {
        match self {
            KeyFileError::Read { path, .. }
            | KeyFileError::NotAFile { path }
            | KeyFileError::NotPrivate { path, .. }
            | KeyFileError::BadKey { path, .. } => path,
        }
    }
}

/// Why the file `identity.ca_file` names was refused.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("identity.ca_file {}: cannot read it", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("identity.ca_file {}: is not valid PEM", path.display())]
    NotPem {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("identity.ca_file {}: contains no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
}

/// Why `identity.certificate_file` or `identity.private_key_file` was refused.
#[derive(Debug, thiserror::Error)]
pub enum X509FileError {
    #[error("{key} {}: cannot read it", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{key} {}: is not a regular file", path.display())]
    NotAFile { key: &'static str, path: PathBuf },
    #[error("{key} {}: is not valid PEM", path.display())]
    NotPem {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("identity.certificate_file {}: contains no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("identity.certificate_file {}: the certificate cannot be read (not X.509 DER)", path.display())]
    Unreadable { path: PathBuf },
    #[error("identity.certificate_file {}: the certificate expired at {not_after}", path.display())]
    Expired { path: PathBuf, not_after: String },
    #[error("identity.private_key_file {}: contains no PEM private key", path.display())]
    NoKey { path: PathBuf },
    #[error(
        "identity.private_key_file {}: is accessible by group or others (mode {mode}); run: chmod 600 {}",
        path.display(),
        path.display()
    )]
    NotPrivate { path: PathBuf, mode: FileMode },
}

/// Why a device key (base64) was refused, wherever it came from. The decoder's own error is
/// not kept: it names the offending byte of the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    #[error("the key is empty")]
    Empty,
    #[error("the key is not valid base64")]
    NotBase64,
}

fn in_file(file: Option<&Path>) -> String {
    match file {
        Some(path) => format!(" in {}", path.display()),
        None => " (no configuration file)".to_string(),
    }
}

fn describe_invalid(
    key: &str,
    file: Option<&Path>,
    env_var: Option<&str>,
    message: &str,
) -> String {
    match (env_var, file) {
        (Some(var), _) => format!("{key} (from environment variable {var}): {message}"),
        (None, Some(path)) => format!("{key} in {}: {message}", path.display()),
        (None, None) => format!("{key}: {message}"),
    }
}

/// Where the values of one load came from: the file, and the key each `SIMDEVICE__*`
/// variable sets. Every error about a key is made here, so each names its origin.
pub(super) struct Origin<'a> {
    pub(super) file: Option<&'a Path>,
    /// Configuration key -> the environment variable that set it.
    pub(super) env_keys: HashMap<String, String>,
}

impl Origin<'_> {
    pub(super) fn file(&self) -> Option<PathBuf> {
        self.file.map(Path::to_path_buf)
    }

    /// `key` is wrong: `message` says how, in words that never quote a secret.
    pub(super) fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.to_string(),
            file: self.file(),
            env_var: self.env_keys.get(key).cloned(),
            message: message.into(),
        }
    }

    /// Whether `key` was set by an environment variable.
    pub(super) fn set_by_env(&self, key: &str) -> bool {
        self.env_keys.contains_key(key)
    }

    /// The `config` crate's error as one that names the key and the file.
    pub(super) fn translate(&self, error: config::ConfigError) -> ConfigError {
        self.translate_at(error, None)
    }

    fn translate_at(&self, error: config::ConfigError, at: Option<String>) -> ConfigError {
        match error {
            config::ConfigError::At { error, key, .. } => self.translate_at(*error, key.or(at)),
            config::ConfigError::Type {
                unexpected,
                expected,
                key,
                ..
            } => {
                let key = key.or(at).unwrap_or_default();
                self.invalid(&key, wrong_type(&unexpected.to_string(), expected))
            }
            config::ConfigError::Message(message) => {
                let parent = at.unwrap_or_default();
                if let Some((field, rest)) = unknown_field(&message) {
                    let key = if parent.is_empty() {
                        field
                    } else {
                        format!("{parent}.{field}")
                    };
                    self.invalid(&key, format!("unknown key ({rest})"))
                } else {
                    let message = match message
                        .strip_prefix("invalid type: ")
                        .and_then(|rest| rest.rsplit_once(", expected "))
                    {
                        Some((found, expected)) => wrong_type(found, expected),
                        None => message,
                    };
                    self.invalid(or_whole(&parent), message)
                }
            }
            config::ConfigError::FileParse { cause, .. } => ConfigError::Parse {
                path: self.file().unwrap_or_else(|| PathBuf::from("(text)")),
                message: parse_message(&cause.to_string()),
            },
            source => ConfigError::Layers {
                key: or_whole(at.as_deref().unwrap_or_default()).to_string(),
                file: self.file(),
                source: Box::new(source),
            },
        }
    }
}

/// The key an error is about; the whole configuration when the `config` crate names none.
fn or_whole(key: &str) -> &str {
    if key.is_empty() {
        "(configuration)"
    } else {
        key
    }
}

/// "expected a table, found a string", from serde's "invalid type" parts, never quoting the
/// value found: it could be a key or a connection string.
fn wrong_type(found: &str, expected: &str) -> String {
    const FOUND: [(&str, &str); 6] = [
        ("string", "a string"),
        ("character", "a string"),
        ("sequence", "a list"),
        ("map", "a table"),
        ("boolean", "a boolean"),
        ("unit", "nothing"),
    ];
    let found = FOUND
        .iter()
        .find(|(prefix, _)| found.starts_with(prefix))
        .map_or("a number", |(_, name)| name);
    let expected = if expected.starts_with("struct") || expected == "a map" {
        "a table"
    } else if expected == "a sequence" {
        "a list"
    } else {
        expected
    };
    format!("expected {expected}, found {found}")
}

/// `unknown field `x`, expected ...` (serde's wording) -> (`x`, `expected ...`).
fn unknown_field(message: &str) -> Option<(String, String)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let rest = rest.trim_start_matches(',').trim();
    let rest = if rest.is_empty() {
        "no keys are expected here".to_string()
    } else {
        rest.to_string()
    };
    Some((field.to_string(), rest))
}

/// The TOML parser's position and reason, without the quoted source line (which could hold
/// a key).
fn parse_message(full: &str) -> String {
    let lines: Vec<&str> = full.lines().map(str::trim).collect();
    let position = lines
        .iter()
        .find(|line| line.starts_with("TOML parse error"))
        .map(|line| {
            line.trim_start_matches("TOML parse error")
                .trim()
                .to_string()
        });
    let reason = lines
        .iter()
        .rev()
        .find(|line| {
            !line.is_empty()
                && !line.starts_with('|')
                && !line.starts_with("TOML parse error")
                && !line
                    .split_once('|')
                    .is_some_and(|(n, _)| n.trim().chars().all(|c| c.is_ascii_digit()))
        })
        .map(|line| line.to_string());
    match (position, reason) {
        (Some(position), Some(reason)) => format!("{position}: {reason}"),
        (Some(position), None) => position,
        (None, Some(reason)) => reason,
        (None, None) => "invalid TOML".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_messages_drop_the_source_line() {
        let full = "TOML parse error at line 2, column 7\n  |\n2 | key = \"c2VjcmV0\n  |       ^\ninvalid basic string\n";
        let message = parse_message(full);
        assert_eq!(message, "at line 2, column 7: invalid basic string");
        assert!(!message.contains("c2VjcmV0"));
    }

    #[test]
    fn a_read_error_is_the_source_and_not_repeated() {
        let error = ConfigError::KeyFile(KeyFileError::Read {
            path: PathBuf::from("/k"),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert_eq!(error.to_string(), "identity.key_file /k: cannot read it");
        let source = std::error::Error::source(&error).expect("the I/O error");
        assert_eq!(source.to_string(), "entity not found");
        assert_eq!(
            crate::common::logging::error_chain(&error),
            "identity.key_file /k: cannot read it: entity not found"
        );
    }
}
