//! The checks that need no network: the configuration loads, and the device key is kept
//! somewhere private (a key file is judged by `Config::load` itself; a key in the main file is
//! a warning when group or others may read that file).
//!
//! Reads the configuration file and the environment; prints nothing (the caller records).

use std::path::Path;

use super::Check;
use crate::common::file_mode::FileMode;
use crate::config::{Config, ConfigError, ENV_PREFIX, ENV_SEPARATOR};

/// The configuration check's failure: the whole error with its causes, and a hint by kind.
pub(super) fn config_failure(error: &ConfigError) -> Check {
    let detail = crate::common::logging::error_chain(&error);
    match error {
        ConfigError::FileMissing { .. } => Check::fail(
            "configuration",
            detail,
            "write one with: simdevice config init --connection-string '...' --output FILE",
        ),
        ConfigError::KeyFile(key_file) => Check::fail(
            "key file",
            detail,
            format!(
                "the file must hold the base64 device key and be readable by its owner only: \
                 chmod 600 {}",
                key_file.path().display()
            ),
        ),
        ConfigError::CaFile(_) => Check::fail(
            "configuration",
            detail,
            "identity.ca_file must be a PEM certificate, e.g. the local hub's ca.pem (hub.json)",
        ),
        _ => Check::fail(
            "configuration",
            detail,
            "fix the named key; `simdevice config check` prints the effective configuration",
        ),
    }
}

/// Where the key comes from, and whether that place is private.
pub(super) fn key_storage(path: &Path, config: &Config) -> Check {
    const NAME: &str = "key storage";
    let env_var = |key: &str| {
        let name = format!("{ENV_PREFIX}{ENV_SEPARATOR}IDENTITY{ENV_SEPARATOR}{key}");
        std::env::var(name).ok().filter(|v| !v.is_empty())
    };
    let file_identity = config
        .file
        .as_ref()
        .and_then(|file| std::fs::read_to_string(file).ok())
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|table| table.get("identity").and_then(|v| v.as_table()).cloned())
        .unwrap_or_default();
    let in_file = |key: &str| {
        file_identity
            .get(key)
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    if let Some(key_file) = env_var("KEY_FILE").or_else(|| in_file("key_file")) {
        // Config::load refused the file unless it is private; say what it is.
        let mode = FileMode::read(Path::new(&key_file))
            .map(|mode| format!("mode {mode}"))
            .unwrap_or_else(|_| "mode unknown".into());
        return Check::ok(NAME, format!("key file {key_file} ({mode})"));
    }
    if let Some(var) = env_var("KEY_ENV").or_else(|| in_file("key_env")) {
        return Check::ok(
            NAME,
            format!("the key comes from environment variable {var}"),
        );
    }
    let key_in_file = env_var("KEY").is_none()
        && env_var("CONNECTION_STRING").is_none()
        && (in_file("key").is_some() || in_file("connection_string").is_some());
    if !key_in_file {
        return Check::ok(NAME, "the key comes from the environment");
    }
    match FileMode::read(path) {
        Ok(mode) if !mode.is_private() => Check::warn(
            NAME,
            format!(
                "{} holds the device key and group or others may read it (mode {mode})",
                path.display()
            ),
            format!(
                "chmod 600 {}, or keep the key in identity.key_file or identity.key_env",
                path.display()
            ),
        ),
        Ok(mode) => Check::ok(
            NAME,
            format!("the key is in {} (mode {mode})", path.display()),
        ),
        Err(_) => Check::ok(NAME, format!("the key is in {}", path.display())),
    }
}
