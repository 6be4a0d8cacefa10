//! The layers: built-in defaults (every key left out), then the TOML file, then the
//! `SIMDEVICE__SECTION__KEY` environment variables, merged by the `config` crate into
//! [`RawConfig`]. Also the process environment, and which key each variable sets, so that an
//! error can name the variable a bad value came from.
//!
//! Environment values are kept as text (no `try_parsing`): parsing them early would turn a
//! device id such as `007` into `7` and round `1.5` into `2` for integer keys; the checks parse
//! numbers instead, so `SIMDEVICE__TELEMETRY__INTERVAL_SECS=5` still works. Environment keys are
//! lowercased (a method table can be overridden from the environment only if its name is
//! lowercase), and lists (`methods.NAME.command`) can only come from the file.
//!
//! Reads the process environment; no files (the caller reads the configuration file).

use std::collections::HashMap;

use super::error::ConfigError;
use super::raw::RawConfig;
use super::{ENV_PREFIX, ENV_SEPARATOR};

/// The file's text (if any) under the `SIMDEVICE__*` variables of `env`, as raw structs.
pub(super) fn merge(
    file: Option<&str>,
    env: &[(String, String)],
) -> Result<RawConfig, config::ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(text) = file {
        builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
    }
    let env_map: config::Map<String, String> = env.iter().cloned().collect();
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator(ENV_SEPARATOR)
            .separator(ENV_SEPARATOR)
            .try_parsing(false)
            .source(Some(env_map)),
    );
    builder.build()?.try_deserialize()
}

/// The process environment as UTF-8 pairs. Variables that are not UTF-8 are skipped, except
/// ours, which are an error.
pub(super) fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut env = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Ok(name) = name.into_string() else {
            continue;
        };
        match value.into_string() {
            Ok(value) => env.push((name, value)),
            Err(_) => {
                if let Some(key) = env_key(&name) {
                    return Err(ConfigError::Invalid {
                        key,
                        file: None,
                        env_var: Some(name),
                        message: "the value is not valid UTF-8".to_string(),
                    });
                }
            }
        }
    }
    Ok(env)
}

/// The configuration key an environment variable sets, as the `config` crate maps it:
/// `SIMDEVICE__TELEMETRY__INTERVAL_SECS` -> `telemetry.interval_secs`.
fn env_key(name: &str) -> Option<String> {
    let lower = name.to_lowercase();
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}").to_lowercase();
    lower
        .strip_prefix(&prefix)
        .map(|rest| rest.replace(ENV_SEPARATOR, "."))
}

/// Configuration key -> the environment variable that set it.
pub(super) fn env_keys(env: &[(String, String)]) -> HashMap<String, String> {
    env.iter()
        .filter_map(|(name, _)| env_key(name).map(|key| (key, name.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_keys_map_like_the_config_crate() {
        assert_eq!(
            env_key("SIMDEVICE__TELEMETRY__INTERVAL_SECS").as_deref(),
            Some("telemetry.interval_secs")
        );
        assert_eq!(env_key("SIMDEVICE_DEVICE_KEY"), None);
        assert_eq!(env_key("SIMDEVICE_HUB_STATE_DIR"), None);
    }
}
