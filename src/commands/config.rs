//! `simdevice config check`: load the agent's configuration exactly as `simdevice run` would
//! (defaults, file, `SIMDEVICE__*` environment), print it with the key masked and exit 0, or
//! print why it was refused and exit 78 (EX_CONFIG). It reads files, never connects.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::Config;

/// sysexits.h EX_CONFIG: the configuration is wrong; the systemd unit does not restart on it.
pub const EX_CONFIG: u8 = 78;

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Check the agent's configuration and print the effective result (the key masked).
    Check {
        /// Configuration file [default: /etc/simdevice/config.toml]
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

pub fn run(args: ConfigArgs) -> ExitCode {
    match args.command {
        ConfigCommand::Check { config } => check(
            config.as_deref(),
            &mut std::io::stdout().lock(),
            &mut std::io::stderr().lock(),
        ),
    }
}

fn check(path: Option<&Path>, out: &mut dyn Write, err: &mut dyn Write) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            // A closed stdout (`| head`) is not worth a panic or an error code.
            let _ = out.write_all(config.to_masked_toml().as_bytes());
            ExitCode::SUCCESS
        }
        Err(error) => {
            let _ = writeln!(err, "error: {error}");
            ExitCode::from(EX_CONFIG)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_check(path: &Path) -> (ExitCode, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = check(Some(path), &mut out, &mut err);
        let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
        (code, text(out), text(err))
    }

    #[test]
    fn a_good_file_prints_the_masked_configuration_and_exits_0() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(
            &good,
            "[identity]\nhost_name = \"h\"\ndevice_id = \"d\"\nkey = \"c2VjcmV0a2V5\"\n",
        )
        .unwrap();
        let (code, out, err) = run_check(&good);
        assert_eq!(code, ExitCode::SUCCESS, "{err}");
        assert!(out.contains("device_id = \"d\""), "{out}");
        assert!(out.contains("interval_secs = 10"), "{out}");
        assert!(!out.contains("c2VjcmV0a2V5"), "{out}");
        assert!(err.is_empty(), "{err}");
    }

    #[test]
    fn a_bad_or_missing_file_prints_an_error_and_exits_78() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.toml");
        std::fs::write(
            &bad,
            "[identity]\nhost_name = \"h\"\ndevice_id = \"d\"\nkey = \"a2V5\"\n\
             [telemetry]\ninterval_secs = 0\n",
        )
        .unwrap();
        let (code, out, err) = run_check(&bad);
        assert_eq!(code, ExitCode::from(EX_CONFIG));
        assert!(out.is_empty(), "{out}");
        assert!(
            err.starts_with("error: telemetry.interval_secs in "),
            "{err}"
        );

        let (code, _, err) = run_check(&dir.path().join("missing.toml"));
        assert_eq!(code, ExitCode::from(EX_CONFIG));
        assert!(err.contains("missing.toml"), "{err}");
    }
}
