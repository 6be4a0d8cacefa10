//! The device agent's configuration: built-in defaults, then the TOML file, then environment
//! variables `SIMDEVICE__SECTION__KEY`, checked into the types the agent uses (defined here).
//!
//! The rooms, in the order a load goes through them:
//! - `layers`: the process environment, and the `config` crate merging the defaults (absent
//!   keys), the file and the `SIMDEVICE__*` variables into raw structs.
//! - `raw`: those raw structs, which refuse unknown keys, with every leaf a loose `Scalar`.
//! - `check` and `identity`: each raw value checked into the types below, naming its key.
//! - `files`: the key file and the CA file a configuration names (their mode, their content);
//!   the telemetry template is read and checked by [`crate::common::template`].
//! - `error`: [`ConfigError`], and the `config` crate's errors translated into ones that name
//!   the key (`telemetry.interval_secs`), the file, and the environment variable when the value
//!   came from one.
//! - `render`: the effective configuration as TOML, the key masked (`simdevice config check`).
//!
//! Secrets (the device key, a connection string) never appear in an error, in `Debug` output or
//! in [`Config::to_masked_toml`]. This module reads the configuration file, the key file, the
//! CA file and the telemetry template; it never opens a connection, and it imports only
//! `protocol` and `common`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::common::template::Template;

mod check;
mod error;
mod files;
mod identity;
mod layers;
mod provisioning;
mod proxy;
mod raw;
mod render;

pub use error::{CaFileError, ConfigError, KeyFileError, KeyProblem, X509FileError};
pub use proxy::{Proxy, ProxyUrlError, NO_PROXY_ENV, PROXY_ENV};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/simdevice/config.toml";
/// The prefix of the environment variables that override the file: `SIMDEVICE__TELEMETRY__SEED`.
pub const ENV_PREFIX: &str = "SIMDEVICE";
/// Between the prefix, the section and the key of an environment variable.
pub const ENV_SEPARATOR: &str = "__";

/// A device key. `Debug` and `Display` print `***`; only [`Secret::expose`] gives the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The checked configuration of one device agent.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from, if any.
    pub file: Option<PathBuf>,
    pub identity: Identity,
    pub connection: ConnectionSettings,
    pub telemetry: TelemetrySettings,
    pub connectivity: ConnectivitySettings,
    /// Methods that run a command, sorted by name.
    pub methods: Vec<CommandMethodConfig>,
    pub metrics: MetricsSettings,
    pub outbox: OutboxSettings,
    /// `[provisioning]`: register with DPS and connect where it assigns the device.
    pub provisioning: Option<Provisioning>,
}

pub use provisioning::UNASSIGNED_HOST;

/// The checked `[provisioning]` section (see `provisioning`).
#[derive(Clone, Debug)]
pub struct Provisioning {
    pub id_scope: String,
    pub registration_id: String,
    /// The DPS device endpoint (`global_endpoint`): host and port (8883 by default).
    pub host: String,
    pub port: u16,
    pub ca_file: Option<PathBuf>,
    /// The device key: the individual enrollment's, or derived from the group key.
    pub device_key: Secret,
    /// Where to dial the assigned hub instead of its host name (`host[:port]`).
    pub gateway_host_name: Option<String>,
    /// An X.509 registration's certificate and key (`[identity]` certificate_file and
    /// private_key_file); `device_key` is then empty.
    pub x509: Option<X509Files>,
    /// The HTTP proxy to reach DPS through (`[connection] proxy`, else `HTTPS_PROXY` unless
    /// `NO_PROXY` lists DPS's host); DPS is dialled with `[connection] transport` too.
    pub proxy: Option<Proxy>,
}

impl Provisioning {
    /// The identity of a device not assigned yet: the registration id, the key, no hub.
    pub fn unassigned_identity(&self) -> Identity {
        Identity {
            host_name: UNASSIGNED_HOST.into(),
            device_id: self.registration_id.clone(),
            key: self.device_key.clone(),
            gateway_host_name: None,
            ca_file: self.ca_file.clone(),
            x509: self.x509.clone(),
        }
    }

    /// The identity DPS assigned: its hub and device id, the registration's key.
    pub fn assigned_identity(&self, assigned_hub: &str, device_id: &str) -> Identity {
        Identity {
            host_name: assigned_hub.into(),
            device_id: device_id.into(),
            key: self.device_key.clone(),
            gateway_host_name: self.gateway_host_name.clone(),
            ca_file: self.ca_file.clone(),
            x509: self.x509.clone(),
        }
    }
}

/// Who the device is and where its hub is.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The hub's host name, as used in the SAS token and the MQTT user name (may carry `:port`).
    pub host_name: String,
    pub device_id: String,
    /// The device's symmetric key (base64), used to sign and renew SAS tokens; empty for an
    /// X.509 device (`x509` is set), which signs no token.
    pub key: Secret,
    /// Where to open the connection instead of `host_name` (`host[:port]`).
    pub gateway_host_name: Option<String>,
    /// An extra CA certificate (PEM) to trust, e.g. the local hub's `ca.pem`.
    pub ca_file: Option<PathBuf>,
    /// `identity.certificate_file` + `identity.private_key_file`: the device authenticates
    /// with this X.509 certificate in the TLS handshake instead of a SAS token.
    pub x509: Option<X509Files>,
}

/// An X.509 device's certificate (PEM, leaf first, optionally its chain) and private key
/// (PEM, readable by its owner only), as checked at load.
#[derive(Clone, Debug)]
pub struct X509Files {
    pub certificate_file: PathBuf,
    pub private_key_file: PathBuf,
    /// The leaf certificate's notAfter (checked not past at load).
    pub not_after: chrono::DateTime<chrono::Utc>,
}

impl Identity {
    /// The host and port to dial: `gateway_host_name` if set, else `host_name`; a `:port` suffix
    /// gives the port (default 8883), and an IPv6 literal comes in brackets (`[::1]:8883`),
    /// which are removed from the host returned.
    pub fn connect_address(&self) -> (String, u16) {
        self.dial_address(Transport::Mqtt)
    }

    /// [`Identity::connect_address`] for `transport`: without a `:port`, its standard port
    /// (8883 for MQTT, 443 for WebSocket).
    pub fn dial_address(&self, transport: Transport) -> (String, u16) {
        let target = self.gateway_host_name.as_deref().unwrap_or(&self.host_name);
        match identity::split_host_port(target) {
            Ok((host, port)) => (host.to_string(), port.unwrap_or(transport.default_port())),
            // Checked at load; an Identity built by hand with a bad name fails when dialled.
            Err(_) => (target.to_string(), transport.default_port()),
        }
    }
}

/// How the agent's MQTT reaches the hub (`[connection] transport`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// MQTT over TLS, port 8883.
    #[default]
    Mqtt,
    /// MQTT over WebSocket over TLS, port 443 (path `/$iothub/websocket`).
    WebSocket,
}

impl Transport {
    /// The configuration's word for it: `mqtt`, `websocket`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Mqtt => "mqtt",
            Transport::WebSocket => "websocket",
        }
    }

    pub fn parse(text: &str) -> Option<Transport> {
        match text.trim().to_ascii_lowercase().as_str() {
            "mqtt" => Some(Transport::Mqtt),
            "websocket" | "websockets" | "ws" => Some(Transport::WebSocket),
            _ => None,
        }
    }

    /// The port dialled when the host name gives none.
    pub fn default_port(self) -> u16 {
        match self {
            Transport::Mqtt => crate::protocol::MQTT_TLS_PORT,
            Transport::WebSocket => crate::protocol::WEBSOCKET_PORT,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Proxy {
    /// The proxy for a connection to `host` when the configuration names none: `HTTPS_PROXY`
    /// (or `https_proxy`) in `env`, unless `NO_PROXY` (or `no_proxy`) lists the host or `*`.
    /// The error names the variable (its value is never quoted: it may hold a password).
    pub fn from_env(env: &[(String, String)], host: &str) -> Result<Option<Proxy>, ConfigError> {
        match proxy::from_env(env, host) {
            None => Ok(None),
            Some((_, Ok(proxy))) => Ok(Some(proxy)),
            Some((name, Err(error))) => Err(ConfigError::Invalid {
                key: "connection.proxy".into(),
                file: None,
                env_var: Some(name.into()),
                message: error.to_string(),
            }),
        }
    }
}

/// How the agent keeps its connection.
#[derive(Clone, Debug)]
pub struct ConnectionSettings {
    /// MQTT keep-alive, 5..=1177 s (IoT Hub's limits).
    pub keep_alive: Duration,
    /// Lifetime of each SAS token the agent signs, at least 2 s.
    pub sas_lifetime: Duration,
    /// Fraction of the token lifetime after which the agent reconnects with a new token.
    pub renew_at: f64,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Deadline for TCP (and the proxy's CONNECT) + TLS (+ the WebSocket upgrade) + CONNACK.
    pub connect_timeout: Duration,
    /// MQTT over TLS, or over WebSocket (`transport`).
    pub transport: Transport,
    /// The HTTP proxy to tunnel through with CONNECT (`proxy`, else `HTTPS_PROXY`); `None`:
    /// dial the hub directly.
    pub proxy: Option<Proxy>,
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            keep_alive: Duration::from_secs(240),
            sas_lifetime: Duration::from_secs(3600),
            renew_at: 0.8,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(30),
            transport: Transport::Mqtt,
            proxy: None,
        }
    }
}

/// What the simulated sensors produce and how often.
#[derive(Clone, Debug)]
pub struct TelemetrySettings {
    pub interval: Duration,
    /// Readings kept while offline; the oldest is dropped when full.
    pub queue_size: usize,
    /// Seed of the simulated readings; `None` draws one from the OS.
    pub seed: Option<u64>,
    /// The body and properties of each reading, instead of the environment reading
    /// (`telemetry.template`, read and checked at load). Shared: a fleet gives every device's
    /// configuration the same one.
    pub template: Option<Arc<Template>>,
    /// `(min, max)` of each reading, `min < max`.
    pub temperature: (f64, f64),
    pub humidity: (f64, f64),
    pub uv: (f64, f64),
    /// Readings to produce in all, then stop (`None`: no end). Set by the fleet
    /// (`--messages`); not a configuration file key.
    pub messages: Option<u64>,
    /// Delay of the first reading after start, so that devices started together do not
    /// send together. Set by the fleet from its seed; not a configuration file key.
    pub start_phase: Duration,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            interval: Duration::from_secs(10),
            queue_size: 1000,
            seed: None,
            template: None,
            temperature: (70.0, 100.0),
            humidity: (70.0, 100.0),
            uv: (0.0, 1.0),
            messages: None,
            start_phase: Duration::ZERO,
        }
    }
}

/// What the device reports about its (simulated) cellular link.
#[derive(Clone, Debug)]
pub struct ConnectivitySettings {
    pub operator: String,
    pub technology: String,
}

impl Default for ConnectivitySettings {
    fn default() -> Self {
        ConnectivitySettings {
            operator: "Contoso Mobile".to_string(),
            technology: "LTE-M".to_string(),
        }
    }
}

/// Where readings wait for the hub, and the agent's state (`[outbox]`).
#[derive(Clone, Debug)]
pub struct OutboxSettings {
    /// The SQLite file. `None`: `simdevice run` uses [`OutboxSettings::default_path`]; an agent
    /// started as a library keeps readings in memory (bounded by `telemetry.queue_size`).
    pub path: Option<PathBuf>,
    /// Readings kept on disk at most; the oldest are dropped beyond.
    pub max_readings: usize,
    /// Readings older than this are dropped.
    pub max_age: Duration,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        OutboxSettings {
            path: None,
            max_readings: 100_000,
            max_age: Duration::from_secs(7 * 86_400),
        }
    }
}

impl OutboxSettings {
    /// `$STATE_DIRECTORY/outbox.db` under systemd (`StateDirectory=`; the first one when it
    /// lists several), else `/var/lib/simdevice/outbox.db`.
    pub fn default_path() -> PathBuf {
        let dir = std::env::var_os("STATE_DIRECTORY")
            .and_then(|dirs| {
                dirs.to_str()
                    .and_then(|d| d.split(':').next())
                    .map(PathBuf::from)
            })
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("/var/lib/simdevice"));
        dir.join("outbox.db")
    }
}

/// The health and metrics endpoint (`[metrics]`).
#[derive(Clone, Debug, Default)]
pub struct MetricsSettings {
    /// Where to serve `/healthz` and `/metrics` over plain HTTP; `None` (the default): off.
    pub listen: Option<std::net::SocketAddr>,
}

/// A direct method answered by running a command (`[methods.NAME]`).
#[derive(Clone, Debug)]
pub struct CommandMethodConfig {
    pub name: String,
    /// The program (an absolute path) and its arguments; never run through a shell.
    pub command: Vec<String>,
    pub timeout: Duration,
}

impl Config {
    /// `path`: the `--config` value; `None` means [`DEFAULT_CONFIG_PATH`]. A missing file is an
    /// error only when the path was given explicitly or when no identity comes from the
    /// environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let explicit = path.is_some();
        let path = path.unwrap_or(Path::new(DEFAULT_CONFIG_PATH));
        let env = layers::process_env()?;
        match std::fs::read_to_string(path) {
            Ok(text) => Config::from_sources(Some((path, &text)), &env),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let env_identity = layers::env_keys(&env)
                    .keys()
                    .any(|k| k.starts_with("identity."));
                if explicit || !env_identity {
                    Err(ConfigError::FileMissing {
                        path: path.to_path_buf(),
                    })
                } else {
                    Config::from_sources(None, &env)
                }
            }
            Err(source) => Err(ConfigError::FileRead {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// The same from explicit TOML text and an explicit environment (for tests; no process
    /// environment is read). `env` is the whole environment: `SIMDEVICE__*` variables override
    /// the file, and `identity.key_env` names one of them.
    pub fn from_sources(
        file: Option<(&Path, &str)>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let origin = error::Origin {
            file: file.map(|(path, _)| path),
            env_keys: layers::env_keys(env),
        };
        let raw = layers::merge(file.map(|(_, text)| text), env)
            .map_err(|error| origin.translate(error))?;
        check::Check::new(origin, env).config(raw)
    }

    /// A configuration for a given identity and defaults for everything else (used by
    /// `simdevice run --local`).
    pub fn for_identity(identity: Identity) -> Config {
        Config {
            file: None,
            identity,
            connection: ConnectionSettings::default(),
            telemetry: TelemetrySettings::default(),
            connectivity: ConnectivitySettings::default(),
            methods: Vec::new(),
            metrics: MetricsSettings::default(),
            outbox: OutboxSettings::default(),
            provisioning: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDENTITY: &str = "[identity]\nhost_name = \"hub.example\"\ndevice_id = \"d1\"\n\
                            key = \"a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2U=\"\n";

    fn load(extra: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let text = format!("{IDENTITY}{extra}");
        Config::from_sources(Some((Path::new("/etc/simdevice/config.toml"), &text)), &env)
    }

    #[test]
    fn the_transport_picks_the_default_port_and_a_gateway_port_wins() {
        let config = load("", &[]).unwrap();
        assert_eq!(config.connection.transport, Transport::Mqtt);
        assert_eq!(config.identity.connect_address().1, 8883);
        let config = load("[connection]\ntransport = \"websocket\"\n", &[]).unwrap();
        assert_eq!(config.connection.transport, Transport::WebSocket);
        assert_eq!(
            config.identity.dial_address(Transport::WebSocket),
            ("hub.example".to_string(), 443)
        );
        let mut identity = config.identity.clone();
        identity.gateway_host_name = Some("localhost:9443".into());
        assert_eq!(
            identity.dial_address(Transport::WebSocket),
            ("localhost".to_string(), 9443)
        );
        let error = load("[connection]\ntransport = \"amqp\"\n", &[]).unwrap_err();
        assert!(
            error.to_string().contains("connection.transport"),
            "{error}"
        );
        let from_env = load("", &[("SIMDEVICE__CONNECTION__TRANSPORT", "websocket")]).unwrap();
        assert_eq!(from_env.connection.transport, Transport::WebSocket);
    }

    #[test]
    fn the_proxy_comes_from_the_file_or_https_proxy_minus_no_proxy() {
        let file = "[connection]\nproxy = \"http://u:pw@proxy:3128\"\n";
        let config = load(file, &[("HTTPS_PROXY", "http://other:1")]).unwrap();
        let proxy = config.connection.proxy.as_ref().unwrap();
        assert_eq!((proxy.host.as_str(), proxy.port), ("proxy", 3128));
        // Shown masked by `config check`.
        let rendered = config.to_masked_toml();
        assert!(rendered.contains("http://***@proxy:3128"), "{rendered}");
        assert!(!rendered.contains("pw"), "{rendered}");

        let config = load("", &[("https_proxy", "http://envproxy:8080")]).unwrap();
        assert_eq!(config.connection.proxy.unwrap().host, "envproxy");
        let config = load(
            "",
            &[
                ("HTTPS_PROXY", "http://envproxy:8080"),
                ("NO_PROXY", "hub.example"),
            ],
        )
        .unwrap();
        assert!(config.connection.proxy.is_none());
        assert!(load("", &[]).unwrap().connection.proxy.is_none());

        let error = load("[connection]\nproxy = \"socks5://u:pw@p:1\"\n", &[]).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("connection.proxy") && !text.contains("pw"),
            "{text}"
        );
        let error = load("", &[("HTTPS_PROXY", "proxy:3128")]).unwrap_err();
        assert!(error.to_string().contains("HTTPS_PROXY"), "{error}");
    }
}
