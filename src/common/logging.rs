//! Tracing set-up: human-readable lines by default, JSON with `--log-format json`, filtered by
//! `RUST_LOG` (default `info`). Logs go to stderr; stdout is for command output.

use tracing_subscriber::EnvFilter;

/// Log format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    if let Err(error) = result {
        eprintln!("logging is already set up: {error}");
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
