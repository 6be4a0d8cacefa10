//! `simdevice provision`: register the device with DPS as the configuration's `[provisioning]`
//! says, and cache the assignment that `simdevice run` connects with. A cached assignment is
//! shown and kept unless `--force` asks for a new registration (a device moved to another
//! hub, a re-created enrollment); a running agent picks it up at its next start, or by
//! itself when its hub refuses it.

use std::io::Write as _;
use std::path::PathBuf;

use crate::agent::provision::{self, ProvisionError, ProvisionRunError};
use crate::agent::AgentError;
use crate::config::{Config, ConfigError, OutboxSettings};

#[derive(Debug, clap::Args)]
pub struct ProvisionArgs {
    /// The configuration file [default: /etc/simdevice/config.toml]
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Register again even when an assignment is cached.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionCommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the configuration has no [provisioning] section")]
    NotConfigured,
    #[error("cannot set up TLS for DPS")]
    Tls(#[from] AgentError),
    #[error(transparent)]
    Register(#[from] ProvisionError),
    #[error(transparent)]
    Cache(#[from] ProvisionRunError),
}

impl ProvisionCommandError {
    pub fn is_config(&self) -> bool {
        match self {
            ProvisionCommandError::Config(_) | ProvisionCommandError::NotConfigured => true,
            ProvisionCommandError::Tls(error) => error.is_config(),
            ProvisionCommandError::Register(_) | ProvisionCommandError::Cache(_) => false,
        }
    }
}

pub async fn run(args: ProvisionArgs) -> Result<(), ProvisionCommandError> {
    let mut config = Config::load(args.config.as_deref())?;
    if config.outbox.path.is_none() {
        config.outbox.path = Some(OutboxSettings::default_path());
    }
    let p = config
        .provisioning
        .clone()
        .ok_or(ProvisionCommandError::NotConfigured)?;
    let cache = provision::cache_path(&config);
    let mut out = std::io::stdout().lock();
    if !args.force {
        if let Some(cached) = provision::load_cached(&cache, &p) {
            let _ = writeln!(
                out,
                "cached: device {} on {} ({}); --force registers again",
                cached.device_id,
                cached.assigned_hub,
                cache.display()
            );
            return Ok(());
        }
    }
    let tls = crate::agent::client_tls_for(&p.unassigned_identity())?;
    let registration = provision::registration_for(
        &p,
        config.connection.transport,
        tls,
        config.connection.connect_timeout,
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let assignment = provision::register(&registration, now).await?;
    provision::save_cached(&cache, &p, &assignment)?;
    let _ = writeln!(
        out,
        "assigned: device {} on {} ({}); cached in {}",
        assignment.device_id,
        assignment.assigned_hub,
        assignment.substatus.as_deref().unwrap_or("assigned"),
        cache.display()
    );
    Ok(())
}
