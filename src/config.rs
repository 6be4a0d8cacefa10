//! The device agent's configuration: built-in defaults, then the TOML file, then environment
//! variables `SIMDEVICE__SECTION__KEY`, checked into the types the agent uses.
//!
//! The layers are merged by the `config` crate into raw structs that refuse unknown keys; every
//! leaf is read as a loose `Scalar` and checked here, so each error names its key
//! (`telemetry.interval_secs`), the file, and the environment variable when the value came from
//! one. Secrets (the device key, a connection string) never appear in an error, in `Debug`
//! output or in [`Config::to_masked_toml`]. This module reads the configuration file, the key
//! file and the CA file; it never opens a connection.
//!
//! Environment values are kept as text (no `try_parsing`): parsing them early would turn a
//! device id such as `007` into `7` and round `1.5` into `2` for integer keys. Numbers are parsed
//! here instead, so `SIMDEVICE__TELEMETRY__INTERVAL_SECS=5` still works. Environment keys are
//! lowercased (a method table can be overridden from the environment only if its name is
//! lowercase), and lists (`methods.NAME.command`) can only come from the file.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::protocol::connection_string::DeviceConnectionString;
use crate::protocol::method::validate_method_name;

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
}

/// Who the device is and where its hub is.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The hub's host name, as used in the SAS token and the MQTT user name (may carry `:port`).
    pub host_name: String,
    pub device_id: String,
    /// The device's symmetric key (base64), used to sign and renew SAS tokens.
    pub key: Secret,
    /// Where to open the connection instead of `host_name` (`host[:port]`).
    pub gateway_host_name: Option<String>,
    /// An extra CA certificate (PEM) to trust, e.g. the local hub's `ca.pem`.
    pub ca_file: Option<PathBuf>,
}

impl Identity {
    /// The host and port to dial: `gateway_host_name` if set, else `host_name`; a `:port` suffix
    /// gives the port (default 8883), and an IPv6 literal comes in brackets (`[::1]:8883`),
    /// which are removed from the host returned.
    pub fn connect_address(&self) -> (String, u16) {
        let target = self.gateway_host_name.as_deref().unwrap_or(&self.host_name);
        match split_host_port(target) {
            Ok((host, port)) => (
                host.to_string(),
                port.unwrap_or(crate::protocol::MQTT_TLS_PORT),
            ),
            // Checked at load; an Identity built by hand with a bad name fails when dialled.
            Err(_) => (target.to_string(), crate::protocol::MQTT_TLS_PORT),
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
    /// Deadline for TCP + TLS + CONNACK.
    pub connect_timeout: Duration,
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
    /// `(min, max)` of each reading, `min < max`.
    pub temperature: (f64, f64),
    pub humidity: (f64, f64),
    pub uv: (f64, f64),
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            interval: Duration::from_secs(10),
            queue_size: 1000,
            seed: None,
            temperature: (70.0, 100.0),
            humidity: (70.0, 100.0),
            uv: (0.0, 1.0),
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

/// Why the configuration was refused. Messages name the key and where its value came from;
/// they never contain a key or a connection string.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {} does not exist", path.display())]
    FileMissing { path: PathBuf },
    #[error("cannot read configuration file {}: {reason}", path.display())]
    FileRead { path: PathBuf, reason: String },
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
    #[error(
        "no device identity{}: set identity.connection_string, or identity.host_name, \
         identity.device_id and one of identity.key, identity.key_file, identity.key_env \
         (in the file or as SIMDEVICE__IDENTITY__* environment variables)",
        in_file(file.as_deref())
    )]
    MissingIdentity { file: Option<PathBuf> },
    #[error("identity.key_file {}: {reason}", path.display())]
    KeyFile { path: PathBuf, reason: String },
    #[error("identity.ca_file {}: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },
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

impl Config {
    /// `path`: the `--config` value; `None` means [`DEFAULT_CONFIG_PATH`]. A missing file is an
    /// error only when the path was given explicitly or when no identity comes from the
    /// environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let explicit = path.is_some();
        let path = path.unwrap_or(Path::new(DEFAULT_CONFIG_PATH));
        let env = process_env()?;
        match std::fs::read_to_string(path) {
            Ok(text) => Config::from_sources(Some((path, &text)), &env),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let env_identity = env_keys(&env).keys().any(|k| k.starts_with("identity."));
                if explicit || !env_identity {
                    Err(ConfigError::FileMissing {
                        path: path.to_path_buf(),
                    })
                } else {
                    Config::from_sources(None, &env)
                }
            }
            Err(error) => Err(ConfigError::FileRead {
                path: path.to_path_buf(),
                reason: error.to_string(),
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
        let check = Check {
            file: file.map(|(path, _)| path),
            env_keys: env_keys(env),
            env,
        };
        let mut builder = config::Config::builder();
        if let Some((_, text)) = file {
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
        let raw: RawConfig = builder
            .build()
            .and_then(|merged| merged.try_deserialize())
            .map_err(|error| check.translate(error))?;
        check.config(raw)
    }

    /// The effective configuration as TOML with the key masked, for `simdevice config check`.
    pub fn to_masked_toml(&self) -> String {
        use toml::{Table, Value};
        let text = |s: &str| Value::String(s.to_string());
        let path = |p: &Path| Value::String(p.display().to_string());

        let mut identity = Table::new();
        identity.insert("host_name".into(), text(&self.identity.host_name));
        identity.insert("device_id".into(), text(&self.identity.device_id));
        identity.insert("key".into(), text("***"));
        if let Some(gateway) = &self.identity.gateway_host_name {
            identity.insert("gateway_host_name".into(), text(gateway));
        }
        if let Some(ca_file) = &self.identity.ca_file {
            identity.insert("ca_file".into(), path(ca_file));
        }

        let c = &self.connection;
        let mut connection = Table::new();
        connection.insert("keep_alive_secs".into(), seconds(c.keep_alive));
        connection.insert("sas_lifetime_secs".into(), seconds(c.sas_lifetime));
        connection.insert("renew_at".into(), Value::Float(c.renew_at));
        connection.insert("backoff_min_secs".into(), seconds(c.backoff_min));
        connection.insert("backoff_max_secs".into(), seconds(c.backoff_max));
        connection.insert("connect_timeout_secs".into(), seconds(c.connect_timeout));

        let t = &self.telemetry;
        let mut telemetry = Table::new();
        telemetry.insert("interval_secs".into(), seconds(t.interval));
        telemetry.insert(
            "queue_size".into(),
            Value::Integer(i64::try_from(t.queue_size).unwrap_or(i64::MAX)),
        );
        if let Some(seed) = t.seed {
            // TOML integers are signed; a larger seed is written as text, which loads back.
            let value = i64::try_from(seed)
                .map(Value::Integer)
                .unwrap_or_else(|_| Value::String(seed.to_string()));
            telemetry.insert("seed".into(), value);
        }
        for (name, (min, max)) in [
            ("temperature", t.temperature),
            ("humidity", t.humidity),
            ("uv", t.uv),
        ] {
            telemetry.insert(format!("{name}_min"), Value::Float(min));
            telemetry.insert(format!("{name}_max"), Value::Float(max));
        }

        let mut connectivity = Table::new();
        connectivity.insert("operator".into(), text(&self.connectivity.operator));
        connectivity.insert("technology".into(), text(&self.connectivity.technology));

        let mut methods = Table::new();
        for method in &self.methods {
            let mut table = Table::new();
            table.insert(
                "command".into(),
                Value::Array(method.command.iter().map(|arg| text(arg)).collect()),
            );
            table.insert("timeout_secs".into(), seconds(method.timeout));
            methods.insert(method.name.clone(), Value::Table(table));
        }

        let mut metrics = Table::new();
        let listen = self.metrics.listen.map(|addr| addr.to_string());
        metrics.insert("listen".into(), text(listen.as_deref().unwrap_or("")));

        let o = &self.outbox;
        let mut outbox = Table::new();
        let outbox_path = o.path.clone().unwrap_or_else(OutboxSettings::default_path);
        outbox.insert("path".into(), path(&outbox_path));
        outbox.insert(
            "max_readings".into(),
            Value::Integer(i64::try_from(o.max_readings).unwrap_or(i64::MAX)),
        );
        outbox.insert("max_age_secs".into(), seconds(o.max_age));

        let mut root = Table::new();
        root.insert("identity".into(), Value::Table(identity));
        root.insert("connection".into(), Value::Table(connection));
        root.insert("telemetry".into(), Value::Table(telemetry));
        root.insert("connectivity".into(), Value::Table(connectivity));
        root.insert("metrics".into(), Value::Table(metrics));
        root.insert("outbox".into(), Value::Table(outbox));
        if !methods.is_empty() {
            root.insert("methods".into(), Value::Table(methods));
        }
        let source = match &self.file {
            Some(file) => format!("defaults, then {}, then", file.display()),
            None => "defaults (no file), then".to_string(),
        };
        let body = toml::to_string(&root)
            .unwrap_or_else(|error| format!("# cannot format the configuration: {error}\n"));
        format!(
            "# simdevice effective configuration: {source} SIMDEVICE__* environment variables.\n\
             # The device key is masked.\n\n{body}"
        )
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
        }
    }
}

/// Whole seconds as a TOML integer, fractions as a float.
fn seconds(duration: Duration) -> toml::Value {
    if duration.subsec_nanos() == 0 {
        if let Ok(secs) = i64::try_from(duration.as_secs()) {
            return toml::Value::Integer(secs);
        }
    }
    toml::Value::Float(duration.as_secs_f64())
}

/// The process environment as UTF-8 pairs. Variables that are not UTF-8 are skipped, except
/// ours, which are an error.
fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
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
fn env_keys(env: &[(String, String)]) -> HashMap<String, String> {
    env.iter()
        .filter_map(|(name, _)| env_key(name).map(|key| (key, name.clone())))
        .collect()
}

/// One leaf value as given: environment values are always text.
enum Scalar {
    Bool,
    Int(i128),
    Float(f64),
    Text(String),
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;

        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, a number or a boolean")
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool)
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }

            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }

            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Scalar, E> {
                Ok(Scalar::Int(i128::try_from(v).unwrap_or(i128::MAX)))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(v))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Text(v.to_string()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar::Text(v))
            }
        }

        deserializer.deserialize_any(ScalarVisitor)
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    identity: RawIdentity,
    #[serde(default)]
    connection: RawConnection,
    #[serde(default)]
    telemetry: RawTelemetry,
    #[serde(default)]
    connectivity: RawConnectivity,
    #[serde(default)]
    methods: BTreeMap<String, RawMethod>,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    outbox: RawOutbox,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    connection_string: Option<Scalar>,
    host_name: Option<Scalar>,
    device_id: Option<Scalar>,
    key: Option<Scalar>,
    key_file: Option<Scalar>,
    key_env: Option<Scalar>,
    gateway_host_name: Option<Scalar>,
    ca_file: Option<Scalar>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConnection {
    keep_alive_secs: Option<Scalar>,
    sas_lifetime_secs: Option<Scalar>,
    renew_at: Option<Scalar>,
    backoff_min_secs: Option<Scalar>,
    backoff_max_secs: Option<Scalar>,
    connect_timeout_secs: Option<Scalar>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    interval_secs: Option<Scalar>,
    queue_size: Option<Scalar>,
    seed: Option<Scalar>,
    temperature_min: Option<Scalar>,
    temperature_max: Option<Scalar>,
    humidity_min: Option<Scalar>,
    humidity_max: Option<Scalar>,
    uv_min: Option<Scalar>,
    uv_max: Option<Scalar>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConnectivity {
    operator: Option<Scalar>,
    technology: Option<Scalar>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbox {
    path: Option<Scalar>,
    max_readings: Option<Scalar>,
    max_age_secs: Option<Scalar>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Scalar>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMethod {
    command: Option<Vec<Scalar>>,
    timeout_secs: Option<Scalar>,
}

/// Turns raw values into checked ones, naming where each came from.
struct Check<'a> {
    file: Option<&'a Path>,
    env_keys: HashMap<String, String>,
    env: &'a [(String, String)],
}

impl Check<'_> {
    fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.to_string(),
            file: self.file.map(Path::to_path_buf),
            env_var: self.env_keys.get(key).cloned(),
            message: message.into(),
        }
    }

    fn translate(&self, error: config::ConfigError) -> ConfigError {
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
                let message = wrong_type(&unexpected.to_string(), expected);
                self.invalid(&key, message)
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
                    let key = if parent.is_empty() {
                        "(configuration)"
                    } else {
                        &parent
                    };
                    self.invalid(key, message)
                }
            }
            config::ConfigError::FileParse { cause, .. } => ConfigError::Parse {
                path: self
                    .file
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("(text)")),
                message: parse_message(&cause.to_string()),
            },
            other => {
                let key = at.unwrap_or_else(|| "(configuration)".to_string());
                self.invalid(&key, other.to_string())
            }
        }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let identity = self.identity(raw.identity)?;
        let connection = self.connection(raw.connection)?;
        let telemetry = self.telemetry(raw.telemetry)?;
        let connectivity = self.connectivity(raw.connectivity)?;
        let methods = raw
            .methods
            .into_iter()
            .map(|(name, method)| self.method(name, method))
            .collect::<Result<Vec<_>, _>>()?;
        let metrics = self.metrics(raw.metrics)?;
        let outbox = self.outbox(raw.outbox)?;
        Ok(Config {
            file: self.file.map(Path::to_path_buf),
            identity,
            connection,
            telemetry,
            connectivity,
            methods,
            metrics,
            outbox,
        })
    }

    fn outbox(&self, raw: RawOutbox) -> Result<OutboxSettings, ConfigError> {
        let d = OutboxSettings::default();
        let path = self.string("outbox.path", raw.path)?.map(PathBuf::from);
        let max_readings = self.count_in(
            "outbox.max_readings",
            raw.max_readings,
            d.max_readings,
            10_000_000,
        )?;
        let max_age = self.seconds_in(
            "outbox.max_age_secs",
            raw.max_age_secs,
            d.max_age,
            (1.0, 366.0 * 86_400.0),
        )?;
        Ok(OutboxSettings {
            path,
            max_readings,
            max_age,
        })
    }

    fn metrics(&self, raw: RawMetrics) -> Result<MetricsSettings, ConfigError> {
        const KEY: &str = "metrics.listen";
        let listen = match self.string(KEY, raw.listen)? {
            None => None,
            Some(text) => Some(text.trim().parse::<std::net::SocketAddr>().map_err(|_| {
                self.invalid(
                    KEY,
                    format!(
                        "{text:?} is not an IP address and port, e.g. \"127.0.0.1:9100\" or \
                         \"[::1]:9100\" (empty: off)"
                    ),
                )
            })?),
        };
        Ok(MetricsSettings { listen })
    }

    /// A string value; an empty string counts as not set.
    fn string(&self, key: &str, value: Option<Scalar>) -> Result<Option<String>, ConfigError> {
        match value {
            None => Ok(None),
            Some(Scalar::Text(text)) if text.is_empty() => Ok(None),
            Some(Scalar::Text(text)) => Ok(Some(text)),
            Some(_) => Err(self.invalid(key, "must be a string (in quotes)")),
        }
    }

    fn number(&self, key: &str, value: Scalar) -> Result<f64, ConfigError> {
        let number = match value {
            Scalar::Int(n) => n as f64,
            Scalar::Float(x) => x,
            Scalar::Text(text) => match text.trim().parse::<f64>() {
                Ok(x) => x,
                Err(_) => return Err(self.invalid(key, format!("{text:?} is not a number"))),
            },
            Scalar::Bool => return Err(self.invalid(key, "must be a number, not a boolean")),
        };
        if number.is_finite() {
            Ok(number)
        } else {
            Err(self.invalid(key, "must be a finite number"))
        }
    }

    fn float_in(
        &self,
        key: &str,
        value: Option<Scalar>,
        default: f64,
        (min, max): (f64, f64),
    ) -> Result<f64, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        let number = self.number(key, value)?;
        if (min..=max).contains(&number) {
            Ok(number)
        } else {
            Err(self.invalid(key, format!("{number} is out of range {min}..={max}")))
        }
    }

    /// Seconds, integer or fraction, within `range`.
    fn seconds_in(
        &self,
        key: &str,
        value: Option<Scalar>,
        default: Duration,
        range: (f64, f64),
    ) -> Result<Duration, ConfigError> {
        let secs = self.float_in(key, value, default.as_secs_f64(), range)?;
        Duration::try_from_secs_f64(secs)
            .map_err(|_| self.invalid(key, format!("{secs} is not a valid number of seconds")))
    }

    /// A count within `1..=max`, or `default` when unset.
    fn count_in(
        &self,
        key: &str,
        value: Option<Scalar>,
        default: usize,
        max: i128,
    ) -> Result<usize, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        let n = self.integer(key, value)?;
        if !(1..=max).contains(&n) {
            return Err(self.invalid(key, format!("{n} is out of range 1..={max}")));
        }
        usize::try_from(n).map_err(|_| self.invalid(key, "is too large for this machine"))
    }

    fn integer(&self, key: &str, value: Scalar) -> Result<i128, ConfigError> {
        match value {
            Scalar::Int(n) => Ok(n),
            Scalar::Text(text) => text
                .trim()
                .parse::<i128>()
                .map_err(|_| self.invalid(key, format!("{text:?} is not a whole number"))),
            Scalar::Float(x) => Err(self.invalid(key, format!("{x} is not a whole number"))),
            Scalar::Bool => Err(self.invalid(key, "must be a whole number, not a boolean")),
        }
    }

    fn identity(&self, raw: RawIdentity) -> Result<Identity, ConfigError> {
        let connection_string = self.string("identity.connection_string", raw.connection_string)?;
        let host_name = self.string("identity.host_name", raw.host_name)?;
        let device_id = self.string("identity.device_id", raw.device_id)?;
        let key = self.string("identity.key", raw.key)?;
        let key_file = self.string("identity.key_file", raw.key_file)?;
        let key_env = self.string("identity.key_env", raw.key_env)?;
        let gateway = self.string("identity.gateway_host_name", raw.gateway_host_name)?;
        let ca_file = self.string("identity.ca_file", raw.ca_file)?;

        let separate: Vec<&str> = [
            (host_name.is_some(), "identity.host_name"),
            (device_id.is_some(), "identity.device_id"),
            (key.is_some(), "identity.key"),
            (key_file.is_some(), "identity.key_file"),
            (key_env.is_some(), "identity.key_env"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();

        let (host_name, device_id, key, gateway) = if let Some(text) = connection_string {
            const KEY: &str = "identity.connection_string";
            if !separate.is_empty() {
                return Err(self.invalid(
                    KEY,
                    format!(
                        "give either a connection string or host_name, device_id and a key, \
                         not both (also set: {})",
                        separate.join(", ")
                    ),
                ));
            }
            let parsed = DeviceConnectionString::from_str(&text)
                .map_err(|error| self.invalid(KEY, error.to_string()))?;
            if parsed.shared_access_signature.is_some() {
                return Err(self.invalid(
                    KEY,
                    "carries a SharedAccessSignature, which expires and cannot be renewed: \
                     the agent signs its own tokens, so give the device's SharedAccessKey",
                ));
            }
            if parsed.x509 {
                return Err(self.invalid(
                    KEY,
                    "uses x509=true; X.509 device authentication is not supported, \
                     give the device's SharedAccessKey",
                ));
            }
            if parsed.module_id.is_some() {
                return Err(
                    self.invalid(KEY, "names a ModuleId; module identities are not supported")
                );
            }
            let Some(device_key) = parsed.shared_access_key else {
                return Err(self.invalid(KEY, "has no SharedAccessKey"));
            };
            let gateway = match (parsed.gateway_host_name, gateway) {
                (Some(_), Some(_)) => {
                    return Err(self.invalid(
                        "identity.gateway_host_name",
                        "is set twice: in the connection string (GatewayHostName) and as \
                         identity.gateway_host_name; keep one",
                    ))
                }
                (from_string, from_key) => from_string.or(from_key),
            };
            if let Some(gateway) = &gateway {
                split_host_port(gateway).map_err(|reason| {
                    self.invalid(KEY, format!("GatewayHostName {gateway:?}: {reason}"))
                })?;
            }
            split_host_port(&parsed.host_name).map_err(|reason| {
                self.invalid(KEY, format!("HostName {:?}: {reason}", parsed.host_name))
            })?;
            check_device_id(&parsed.device_id)
                .map_err(|reason| self.invalid(KEY, format!("DeviceId: {reason}")))?;
            (parsed.host_name, parsed.device_id, device_key, gateway)
        } else {
            if separate.is_empty() {
                return Err(ConfigError::MissingIdentity {
                    file: self.file.map(Path::to_path_buf),
                });
            }
            let Some(host_name) = host_name else {
                return Err(self.invalid(
                    "identity.host_name",
                    "is missing (the hub's host name, e.g. myhub.azure-devices.net)",
                ));
            };
            let Some(device_id) = device_id else {
                return Err(self.invalid("identity.device_id", "is missing"));
            };
            split_host_port(&host_name).map_err(|reason| {
                self.invalid("identity.host_name", format!("{host_name:?}: {reason}"))
            })?;
            check_device_id(&device_id)
                .map_err(|reason| self.invalid("identity.device_id", reason))?;
            if let Some(gateway) = &gateway {
                split_host_port(gateway).map_err(|reason| {
                    self.invalid(
                        "identity.gateway_host_name",
                        format!("{gateway:?}: {reason}"),
                    )
                })?;
            }
            let key = self.device_key(key, key_file, key_env)?;
            (host_name, device_id, key, gateway)
        };

        let ca_file = match ca_file {
            None => None,
            Some(path) => Some(check_ca_file(PathBuf::from(path))?),
        };
        Ok(Identity {
            host_name,
            device_id,
            key: Secret::new(key),
            gateway_host_name: gateway,
            ca_file,
        })
    }

    /// Exactly one of `key`, `key_file`, `key_env`, and a base64 value.
    fn device_key(
        &self,
        key: Option<String>,
        key_file: Option<String>,
        key_env: Option<String>,
    ) -> Result<String, ConfigError> {
        let given: Vec<&str> = [
            (key.is_some(), "identity.key"),
            (key_file.is_some(), "identity.key_file"),
            (key_env.is_some(), "identity.key_env"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        if given.len() > 1 {
            return Err(self.invalid(
                given[0],
                format!(
                    "give exactly one of identity.key, identity.key_file, identity.key_env \
                     (set: {})",
                    given.join(", ")
                ),
            ));
        }
        if let Some(key) = key {
            check_base64(&key).map_err(|reason| self.invalid("identity.key", reason))?;
            return Ok(key);
        }
        if let Some(path) = key_file {
            return read_key_file(PathBuf::from(path));
        }
        if let Some(var) = key_env {
            let value = self
                .env
                .iter()
                .rev()
                .find(|(name, _)| *name == var)
                .map(|(_, value)| value.trim().to_string());
            return match value {
                None => Err(self.invalid(
                    "identity.key_env",
                    format!("environment variable {var} is not set"),
                )),
                Some(value) if value.is_empty() => Err(self.invalid(
                    "identity.key_env",
                    format!("environment variable {var} is empty"),
                )),
                Some(value) => {
                    check_base64(&value).map_err(|reason| {
                        self.invalid(
                            "identity.key_env",
                            format!("environment variable {var}: {reason}"),
                        )
                    })?;
                    Ok(value)
                }
            };
        }
        Err(self.invalid(
            "identity.key",
            "no device key: give exactly one of identity.key, identity.key_file, identity.key_env",
        ))
    }

    fn connection(&self, raw: RawConnection) -> Result<ConnectionSettings, ConfigError> {
        let d = ConnectionSettings::default();
        let backoff_min = self.seconds_in(
            "connection.backoff_min_secs",
            raw.backoff_min_secs,
            d.backoff_min,
            (0.01, 3600.0),
        )?;
        let backoff_max = self.seconds_in(
            "connection.backoff_max_secs",
            raw.backoff_max_secs,
            d.backoff_max,
            (0.01, 86_400.0),
        )?;
        if backoff_max < backoff_min {
            return Err(self.invalid(
                "connection.backoff_max_secs",
                format!(
                    "{} must be at least connection.backoff_min_secs ({})",
                    backoff_max.as_secs_f64(),
                    backoff_min.as_secs_f64()
                ),
            ));
        }
        Ok(ConnectionSettings {
            keep_alive: self.seconds_in(
                "connection.keep_alive_secs",
                raw.keep_alive_secs,
                d.keep_alive,
                (5.0, 1177.0),
            )?,
            sas_lifetime: self.seconds_in(
                "connection.sas_lifetime_secs",
                raw.sas_lifetime_secs,
                d.sas_lifetime,
                (2.0, 365.0 * 86_400.0),
            )?,
            renew_at: self.float_in(
                "connection.renew_at",
                raw.renew_at,
                d.renew_at,
                (0.1, 0.95),
            )?,
            backoff_min,
            backoff_max,
            connect_timeout: self.seconds_in(
                "connection.connect_timeout_secs",
                raw.connect_timeout_secs,
                d.connect_timeout,
                (0.1, 300.0),
            )?,
        })
    }

    fn telemetry(&self, raw: RawTelemetry) -> Result<TelemetrySettings, ConfigError> {
        let d = TelemetrySettings::default();
        let interval = self.seconds_in(
            "telemetry.interval_secs",
            raw.interval_secs,
            d.interval,
            (0.05, 86_400.0),
        )?;
        let queue_size = self.count_in(
            "telemetry.queue_size",
            raw.queue_size,
            d.queue_size,
            1_000_000,
        )?;
        let seed = match raw.seed {
            None => None,
            Some(Scalar::Text(text)) if text.trim().is_empty() => None,
            Some(value) => {
                let n = self.integer("telemetry.seed", value)?;
                Some(u64::try_from(n).map_err(|_| {
                    self.invalid(
                        "telemetry.seed",
                        format!("{n} is out of range 0..={}", u64::MAX),
                    )
                })?)
            }
        };
        let temperature = self.range(
            "telemetry.temperature",
            raw.temperature_min,
            raw.temperature_max,
            d.temperature,
        )?;
        let humidity = self.range(
            "telemetry.humidity",
            raw.humidity_min,
            raw.humidity_max,
            d.humidity,
        )?;
        let uv = self.range("telemetry.uv", raw.uv_min, raw.uv_max, d.uv)?;
        Ok(TelemetrySettings {
            interval,
            queue_size,
            seed,
            temperature,
            humidity,
            uv,
        })
    }

    /// `{prefix}_min` < `{prefix}_max`, both finite.
    fn range(
        &self,
        prefix: &str,
        min: Option<Scalar>,
        max: Option<Scalar>,
        default: (f64, f64),
    ) -> Result<(f64, f64), ConfigError> {
        let min_key = format!("{prefix}_min");
        let max_key = format!("{prefix}_max");
        let min = match min {
            Some(value) => self.number(&min_key, value)?,
            None => default.0,
        };
        let max = match max {
            Some(value) => self.number(&max_key, value)?,
            None => default.1,
        };
        if min < max {
            Ok((min, max))
        } else {
            // Name the key the user set; when both came from the same place, the minimum.
            let key = if self.env_keys.contains_key(&max_key) {
                max_key.clone()
            } else {
                min_key.clone()
            };
            Err(self.invalid(
                &key,
                format!("{min_key} ({min}) must be less than {max_key} ({max})"),
            ))
        }
    }

    fn connectivity(&self, raw: RawConnectivity) -> Result<ConnectivitySettings, ConfigError> {
        let d = ConnectivitySettings::default();
        let operator = self.string("connectivity.operator", raw.operator)?;
        let technology = self.string("connectivity.technology", raw.technology)?;
        Ok(ConnectivitySettings {
            operator: operator.unwrap_or(d.operator),
            technology: technology.unwrap_or(d.technology),
        })
    }

    fn method(&self, name: String, raw: RawMethod) -> Result<CommandMethodConfig, ConfigError> {
        let prefix = format!("methods.{name}");
        validate_method_name(&name)
            .map_err(|error| self.invalid(&prefix, format!("invalid method name: {error}")))?;
        let command_key = format!("{prefix}.command");
        let Some(raw_command) = raw.command else {
            let from_env = self
                .env_keys
                .keys()
                .any(|key| key.starts_with(&format!("{prefix}.")));
            let hint = if from_env {
                format!(
                    " (environment variables set keys of {prefix}, but the command can only \
                     come from the file; environment keys are lowercased, so only a method \
                     with a lowercase name can be overridden)"
                )
            } else {
                String::new()
            };
            return Err(self.invalid(
                &command_key,
                format!(
                    "is missing (e.g. command = [\"/usr/local/bin/reboot-device\", \"--now\"]){hint}"
                ),
            ));
        };
        let mut command = Vec::with_capacity(raw_command.len());
        for (index, arg) in raw_command.into_iter().enumerate() {
            match arg {
                Scalar::Text(text) if text.contains('\0') => {
                    return Err(self.invalid(
                        &command_key,
                        format!("element {index} contains a NUL character"),
                    ))
                }
                Scalar::Text(text) => command.push(text),
                _ => {
                    return Err(self.invalid(
                        &command_key,
                        format!("element {index} must be a string (in quotes)"),
                    ))
                }
            }
        }
        match command.first() {
            None => return Err(self.invalid(&command_key, "is empty; give at least the program")),
            Some(program) if !Path::new(program).is_absolute() => {
                return Err(self.invalid(
                    &command_key,
                    format!("the program {program:?} must be an absolute path"),
                ))
            }
            Some(_) => {}
        }
        let timeout = self.seconds_in(
            &format!("{prefix}.timeout_secs"),
            raw.timeout_secs,
            Duration::from_secs(30),
            (1.0, 300.0),
        )?;
        Ok(CommandMethodConfig {
            name,
            command,
            timeout,
        })
    }
}

/// "expected a table, found a string", from serde's "invalid type" parts, never quoting the
/// value found: it could be a key or a connection string.
fn wrong_type(found: &str, expected: &str) -> String {
    let found = if found.starts_with("string") || found.starts_with("character") {
        "a string"
    } else if found.starts_with("sequence") {
        "a list"
    } else if found.starts_with("map") {
        "a table"
    } else if found.starts_with("boolean") {
        "a boolean"
    } else if found.starts_with("unit") {
        "nothing"
    } else {
        "a number"
    };
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

fn check_base64(key: &str) -> Result<(), String> {
    match BASE64.decode(key) {
        Ok(bytes) if !bytes.is_empty() => Ok(()),
        Ok(_) => Err("the key is empty".to_string()),
        Err(_) => Err("the key is not valid base64".to_string()),
    }
}

/// Reads a key file: refused when group or others may read or write it (like ssh), trailing
/// whitespace trimmed, base64.
fn read_key_file(path: PathBuf) -> Result<String, ConfigError> {
    let fail = |path: &Path, reason: String| ConfigError::KeyFile {
        path: path.to_path_buf(),
        reason,
    };
    let metadata = std::fs::metadata(&path).map_err(|e| fail(&path, e.to_string()))?;
    if !metadata.is_file() {
        return Err(fail(&path, "is not a regular file".to_string()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(fail(
                &path,
                format!(
                    "is accessible by group or others (mode {mode:04o}); \
                     run: chmod 600 {}",
                    path.display()
                ),
            ));
        }
    }
    let text = std::fs::read_to_string(&path).map_err(|e| fail(&path, e.to_string()))?;
    let key = text.trim_end().to_string();
    check_base64(&key).map_err(|reason| fail(&path, reason))?;
    Ok(key)
}

fn check_ca_file(path: PathBuf) -> Result<PathBuf, ConfigError> {
    let fail = |reason: String| ConfigError::CaFile {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| fail(e.to_string()))?;
    match crate::common::pem::parse_pem_certificates(&text) {
        Ok(certs) if certs.is_empty() => Err(fail("contains no PEM certificate".to_string())),
        Ok(_) => Ok(path),
        Err(error) => Err(fail(format!("is not valid PEM: {error}"))),
    }
}

/// Device ids as IoT Hub accepts them: up to 128 ASCII letters, digits and `-.%_*?!(),:=@$'`.
fn check_device_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("is empty".to_string());
    }
    let chars = id.chars().count();
    if chars > 128 {
        return Err(format!(
            "is {chars} characters, over the 128-character limit"
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-.%_*?!(),:=@$'".contains(*c)))
    {
        return Err(format!(
            "{id:?} contains {c:?}; device ids allow ASCII letters, digits and -.%_*?!(),:=@$'"
        ));
    }
    Ok(())
}

/// `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 literal -> host (without brackets)
/// and port.
fn split_host_port(target: &str) -> Result<(&str, Option<u16>), String> {
    let (host, port) = if let Some(rest) = target.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| "has '[' without a matching ']'".to_string())?;
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(format!("{host:?} in brackets is not an IPv6 address"));
        }
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err("expected ':port' after ']'".to_string()),
            },
        }
    } else if target.parse::<Ipv6Addr>().is_ok() {
        (target, None)
    } else {
        match target.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (target, None),
        }
    };
    if host.is_empty() {
        return Err("has no host".to_string());
    }
    if let Some(c) = host
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '[' | ']' | '@'))
    {
        return Err(format!("the host contains {c:?}"));
    }
    if host.contains(':') && host.parse::<Ipv6Addr>().is_err() {
        return Err("the host contains ':' (give an IPv6 address in brackets)".to_string());
    }
    let port = match port {
        None => None,
        Some(text) => match text.parse::<u16>() {
            Ok(port) if port != 0 => Some(port),
            _ => return Err(format!("{text:?} is not a port number (1..=65535)")),
        },
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("h.example"), Ok(("h.example", None)));
        assert_eq!(
            split_host_port("localhost:8884"),
            Ok(("localhost", Some(8884)))
        );
        assert_eq!(split_host_port("[::1]:9000"), Ok(("::1", Some(9000))));
        assert_eq!(split_host_port("[::1]"), Ok(("::1", None)));
        assert_eq!(split_host_port("::1"), Ok(("::1", None)));
        assert!(split_host_port("h:0").is_err());
        assert!(split_host_port("h:99999").is_err());
        assert!(split_host_port("h:x").is_err());
        assert!(split_host_port(":8883").is_err());
        assert!(split_host_port("[::1").is_err());
        assert!(split_host_port("[nothost]:1").is_err());
        assert!(split_host_port("a:b:c").is_err());
        assert!(split_host_port("my host").is_err());
    }

    #[test]
    fn device_id_rules() {
        assert!(check_device_id("door-01.a_b*c?d!(e),f:g=h@i$j'k%").is_ok());
        assert!(check_device_id("").is_err());
        assert!(check_device_id(&"a".repeat(128)).is_ok());
        assert!(check_device_id(&"a".repeat(129)).is_err());
        assert!(check_device_id("door/01").is_err());
        assert!(check_device_id("tür").is_err());
        assert!(check_device_id("a b").is_err());
    }

    #[test]
    fn env_keys_map_like_the_config_crate() {
        assert_eq!(
            env_key("SIMDEVICE__TELEMETRY__INTERVAL_SECS").as_deref(),
            Some("telemetry.interval_secs")
        );
        assert_eq!(env_key("SIMDEVICE_DEVICE_KEY"), None);
        assert_eq!(env_key("SIMDEVICE_HUB_STATE_DIR"), None);
    }

    #[test]
    fn parse_messages_drop_the_source_line() {
        let full = "TOML parse error at line 2, column 7\n  |\n2 | key = \"c2VjcmV0\n  |       ^\ninvalid basic string\n";
        let message = parse_message(full);
        assert_eq!(message, "at line 2, column 7: invalid basic string");
        assert!(!message.contains("c2VjcmV0"));
    }
}
