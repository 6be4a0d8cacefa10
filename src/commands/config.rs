//! `simdevice config check`: load the agent's configuration exactly as `simdevice run` would
//! (defaults, file, `SIMDEVICE__*` environment), print it with the key masked and exit 0, or
//! return why it was refused (main prints it and exits 78, EX_CONFIG). It reads files, never
//! connects.
//!
//! `simdevice config init`: write the commented example configuration (`config/simdevice.toml`,
//! built in) with the device's connection string filled in, checked as `config check` would,
//! with mode 0600 (it holds the key); an existing file is replaced only with `--force`.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};

/// Why `config check` refused a configuration or `config init` wrote none. `main` prints it
/// with its source chain and exits 78 when [`ConfigCommandError::is_config`] says so.
#[derive(Debug, thiserror::Error)]
pub enum ConfigCommandError {
    #[error(transparent)]
    Refused(#[from] ConfigError),
    #[error("--ca-file {path} cannot be made absolute")]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} exists; pass --force to replace it")]
    Exists(PathBuf),
    #[error("cannot create {0}")]
    CreateDir(PathBuf, #[source] std::io::Error),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

impl ConfigCommandError {
    /// A refused configuration (exit 78); a file that cannot be written is not.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            ConfigCommandError::Refused(_) | ConfigCommandError::CaFile { .. }
        )
    }
}

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
    /// Write a commented configuration file for a device (mode 0600: it holds the key).
    Init {
        /// The device connection string: HostName=...;DeviceId=...;SharedAccessKey=...
        #[arg(long, env = "SIMDEVICE_CONNECTION_STRING", hide_env_values = true)]
        connection_string: String,
        /// An extra CA certificate (PEM) to trust, e.g. a local hub's ca.pem
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Where to write [default: /etc/simdevice/config.toml]
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Replace an existing file
        #[arg(long)]
        force: bool,
    },
}

pub fn run(args: ConfigArgs) -> Result<(), ConfigCommandError> {
    match args.command {
        ConfigCommand::Check { config } => check(config.as_deref(), &mut std::io::stdout().lock()),
        ConfigCommand::Init {
            connection_string,
            ca_file,
            output,
            force,
        } => {
            let output = output.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
            let request = InitRequest {
                connection_string: &connection_string,
                ca_file: ca_file.as_deref(),
                output: &output,
                force,
            };
            init(&request, &mut std::io::stdout().lock())
        }
    }
}

/// The example configuration, as committed: every key with its default, commented.
const TEMPLATE: &str = include_str!("../../config/simdevice.toml");

struct InitRequest<'a> {
    connection_string: &'a str,
    ca_file: Option<&'a Path>,
    output: &'a Path,
    force: bool,
}

fn init(request: &InitRequest<'_>, out: &mut dyn Write) -> Result<(), ConfigCommandError> {
    let ca_file = request
        .ca_file
        .map(|path| {
            std::path::absolute(path).map_err(|source| ConfigCommandError::CaFile {
                path: path.to_owned(),
                source,
            })
        })
        .transpose()?;
    let text = render_init(request.connection_string, ca_file.as_deref());
    // Checked exactly as `config check` will read it (without the environment).
    let config = Config::from_sources(Some((request.output, &text)), &[])?;
    write_private(request.output, &text, request.force)?;
    let path = request.output.display();
    let _ = writeln!(
        out,
        "wrote {path} (mode 0600: it holds the key) for device {} on {}",
        config.identity.device_id, config.identity.host_name
    );
    let _ = writeln!(out, "check it:  simdevice config check --config {path}");
    let _ = writeln!(out, "try it:    simdevice doctor --config {path}");
    Ok(())
}

/// The template with `connection_string` (and `ca_file`) set in `[identity]`.
fn render_init(connection_string: &str, ca_file: Option<&Path>) -> String {
    let quote = |text: &str| toml::Value::String(text.to_string()).to_string();
    let mut lines: Vec<String> = vec![
        "# Written by `simdevice config init`. It holds the device key: keep it mode 0600."
            .to_string(),
        "#".to_string(),
    ];
    let (mut section, mut wrote_cs, mut wrote_ca) = (String::new(), false, ca_file.is_none());
    for line in TEMPLATE.lines() {
        if line.starts_with('[') {
            section = line.to_string();
        }
        let in_identity = section == "[identity]";
        if in_identity && !wrote_cs && line.starts_with("# connection_string = ") {
            lines.push(format!("connection_string = {}", quote(connection_string)));
            wrote_cs = true;
        } else if in_identity && !wrote_ca && line.starts_with("# ca_file = ") {
            let path = ca_file.map(|p| p.display().to_string()).unwrap_or_default();
            lines.push(format!("ca_file = {}", quote(&path)));
            wrote_ca = true;
        } else {
            lines.push(line.to_string());
        }
        if line == "[identity]" && !(wrote_cs && wrote_ca) {
            // Set at once if the template ever lacks the commented lines.
            let missing = !TEMPLATE.contains("\n# connection_string = ")
                || (!wrote_ca && !TEMPLATE.contains("\n# ca_file = "));
            if missing {
                lines.push(format!("connection_string = {}", quote(connection_string)));
                wrote_cs = true;
                if let Some(path) = ca_file {
                    lines.push(format!("ca_file = {}", quote(&path.display().to_string())));
                    wrote_ca = true;
                }
            }
        }
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

/// Writes `text` to `path` with mode 0600, all at once (a temporary file, then a link or a
/// rename): an existing file is kept unless `force`.
fn write_private(path: &Path, text: &str, force: bool) -> Result<(), ConfigCommandError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if !force && std::fs::symlink_metadata(path).is_ok() {
        return Err(ConfigCommandError::Exists(path.to_owned()));
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| ConfigCommandError::CreateDir(dir.clone(), e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config.toml".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(crate::common::file_mode::PRIVATE)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(text.as_bytes())?;
            file.sync_all()
        });
    if let Err(error) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(ConfigCommandError::Write(tmp, error));
    }
    let placed = if force {
        std::fs::rename(&tmp, path)
    } else {
        // A hard link never replaces an existing file, even one created since the check.
        std::fs::hard_link(&tmp, path).and_then(|()| std::fs::remove_file(&tmp))
    };
    if let Err(error) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(if error.kind() == std::io::ErrorKind::AlreadyExists {
            ConfigCommandError::Exists(path.to_owned())
        } else {
            ConfigCommandError::Write(path.to_owned(), error)
        });
    }
    Ok(())
}

fn check(path: Option<&Path>, out: &mut dyn Write) -> Result<(), ConfigCommandError> {
    let config = Config::load(path)?;
    // A closed stdout (`| head`) is not worth a panic or an error code.
    let _ = out.write_all(config.to_masked_toml().as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `config check` as `main` reports it: the output, and the error line with its chain.
    fn run_check(path: &Path) -> (Result<(), bool>, String, String) {
        let mut out = Vec::new();
        let result = check(Some(path), &mut out);
        let err = match &result {
            Ok(()) => String::new(),
            Err(error) => format!("error: {}", crate::common::logging::error_chain(error)),
        };
        let out = String::from_utf8(out).unwrap();
        (result.map_err(|e| e.is_config()), out, err)
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
        let (result, out, err) = run_check(&good);
        assert_eq!(result, Ok(()), "{err}");
        assert!(out.contains("device_id = \"d\""), "{out}");
        assert!(out.contains("interval_secs = 10"), "{out}");
        assert!(!out.contains("c2VjcmV0a2V5"), "{out}");
        assert!(err.is_empty(), "{err}");
    }

    #[test]
    fn init_fills_in_the_identity_of_the_committed_template() {
        let text = render_init("HostName=h;DeviceId=d;SharedAccessKey=a2V5", None);
        assert!(
            text.contains("\nconnection_string = \"HostName=h;DeviceId=d;SharedAccessKey=a2V5\"\n")
        );
        assert!(text.contains("\n# ca_file = \"\""), "{text}");
        assert!(
            text.contains("\n# interval_secs = 10"),
            "the rest stays commented"
        );
        let config = Config::from_sources(Some((Path::new("x.toml"), &text)), &[]).unwrap();
        assert_eq!(config.identity.device_id, "d");

        let text = render_init(
            "HostName=h;DeviceId=d;SharedAccessKey=a2V5",
            Some(Path::new("/ca \"x\".pem")),
        );
        let table: toml::Table = text.parse().unwrap();
        assert_eq!(table["identity"]["ca_file"].as_str(), Some("/ca \"x\".pem"));
    }

    #[test]
    fn a_bad_or_missing_file_is_a_configuration_error_naming_the_key_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.toml");
        std::fs::write(
            &bad,
            "[identity]\nhost_name = \"h\"\ndevice_id = \"d\"\nkey = \"a2V5\"\n\
             [telemetry]\ninterval_secs = 0\n",
        )
        .unwrap();
        let (result, out, err) = run_check(&bad);
        assert_eq!(result, Err(true), "a configuration error: exit 78");
        assert!(out.is_empty(), "{out}");
        assert!(
            err.starts_with("error: telemetry.interval_secs in "),
            "{err}"
        );

        let (result, _, err) = run_check(&dir.path().join("missing.toml"));
        assert_eq!(result, Err(true), "a configuration error: exit 78");
        assert!(err.contains("missing.toml"), "{err}");
    }
}
