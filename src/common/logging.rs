//! Tracing set-up: human-readable lines by default, JSON with `--log-format json`, filtered by
//! `RUST_LOG` (default `info`). Logs go to stderr; stdout is for command output.
//!
//! `RUST_LOG` takes a level and `target=level` pairs (`info`, `simdevice=debug,rumqttc=warn`):
//! tracing-subscriber's `Targets` filter, not `EnvFilter`, whose span and field matching needs
//! a regex engine (a tenth of the device-only binary's code) that no one here uses.

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

/// Log format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init(format: LogFormat, default: &str) {
    use std::io::IsTerminal;
    let filter = filter_with_default(std::env::var("RUST_LOG").ok().as_deref(), default);
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry();
    let result = match format {
        LogFormat::Text => registry.with(layer.with_filter(filter)).try_init(),
        LogFormat::Json => registry.with(layer.json().with_filter(filter)).try_init(),
    };
    if let Err(error) = result {
        eprintln!("logging is already set up: {error}");
    }
}

/// The filter `RUST_LOG` asks for: unset or empty is `info`; a value that does not parse is
/// `info` too, said once on stderr (logging is not up yet).
pub fn filter_from(rust_log: Option<&str>) -> Targets {
    filter_with_default(rust_log, "info")
}

/// The same with another filter when `RUST_LOG` is unset (`default` is a valid filter).
pub fn filter_with_default(rust_log: Option<&str>, default: &str) -> Targets {
    let default: Targets = default
        .parse()
        .unwrap_or_else(|_| Targets::new().with_default(LevelFilter::INFO));
    match rust_log.map(str::trim) {
        None | Some("") => default,
        Some(spec) => spec.parse().unwrap_or_else(|error| {
            eprintln!("RUST_LOG={spec:?} is not a filter ({error}); logging at info");
            default
        }),
    }
}

/// An error and its sources on one line, `outer: cause: root cause`, for a log line or
/// `main`'s message. A cause already at the end of the text so far (an `#[error(transparent)]`
/// wrapper, a message that quotes its source) is not repeated.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn rust_log_takes_a_level_and_targets_and_falls_back_to_info() {
        let info = filter_from(None);
        assert!(info.would_enable("simdevice", &Level::INFO));
        assert!(!info.would_enable("simdevice", &Level::DEBUG));
        assert!(filter_from(Some("")).would_enable("x", &Level::INFO));
        let some = filter_from(Some("warn,simdevice::agent=debug"));
        assert!(some.would_enable("simdevice::agent::twin", &Level::DEBUG));
        assert!(!some.would_enable("rumqttc", &Level::INFO));
        assert!(some.would_enable("rumqttc", &Level::WARN));
        let bad = filter_from(Some("simdevice=loud"));
        assert!(bad.would_enable("simdevice", &Level::INFO));
        assert!(!bad.would_enable("simdevice", &Level::DEBUG));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read configuration file /etc/x")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error(transparent)]
    struct Transparent(#[from] Outer);

    #[test]
    fn the_chain_is_joined_once_each() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "Permission denied");
        let error = Transparent::from(Outer(io));
        assert_eq!(
            error_chain(&error),
            "cannot read configuration file /etc/x: Permission denied"
        );
    }
}
