//! Raw values checked into the types the agent uses: [`Check`] reads each loose `Scalar` as a
//! string, a number, a count or a duration within its range, and checks the sections one by
//! one (the identity is in `identity`), naming the key of every value it refuses.
//!
//! No I/O here except through `files` (the key file and the CA file) and the telemetry
//! template's reader.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use super::error::{ConfigError, KeyProblem, Origin};
use super::raw::{
    RawConfig, RawConnection, RawConnectivity, RawMethod, RawMetrics, RawOutbox, RawTelemetry,
    Scalar,
};
use super::{
    CommandMethodConfig, Config, ConnectionSettings, ConnectivitySettings, Identity,
    MetricsSettings, OutboxSettings, Proxy, TelemetrySettings, Transport,
};
use crate::common::template::Template;
use crate::protocol::method::validate_method_name;

/// Turns raw values into checked ones, naming where each came from.
pub(super) struct Check<'a> {
    pub(super) origin: Origin<'a>,
    /// The whole environment, for `identity.key_env`.
    pub(super) env: &'a [(String, String)],
}

impl<'a> Check<'a> {
    pub(super) fn new(origin: Origin<'a>, env: &'a [(String, String)]) -> Check<'a> {
        Check { origin, env }
    }

    pub(super) fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        self.origin.invalid(key, message)
    }

    pub(super) fn config(&self, mut raw: RawConfig) -> Result<Config, ConfigError> {
        // DPS is dialled as the hub is (`[connection] transport` and proxy): the endpoint's
        // port follows the transport when it names none. A transport that is no word of ours
        // is refused by `connection` below.
        let transport = match &raw.connection.transport {
            Some(Scalar::Text(text)) => Transport::parse(text).unwrap_or_default(),
            _ => Transport::default(),
        };
        let proxy_configured =
            matches!(&raw.connection.proxy, Some(Scalar::Text(t)) if !t.is_empty());
        // `[provisioning]` may stand in for `[identity]` (`provisioning`).
        let (identity, provisioning) = if raw.identity.is_empty() {
            // Only a certificate and its key in `[identity]`: an X.509 device that DPS assigns.
            let certificate = (
                self.string(
                    "identity.certificate_file",
                    raw.identity.certificate_file.take(),
                )?,
                self.string(
                    "identity.private_key_file",
                    raw.identity.private_key_file.take(),
                )?,
            );
            match self.provisioning(raw.provisioning, None, certificate, transport)? {
                Some(p) => (p.unassigned_identity(), Some(p)),
                None => (self.identity(raw.identity)?, None),
            }
        } else {
            let identity = self.identity(raw.identity)?;
            let provisioning = self.provisioning(
                raw.provisioning,
                Some(&identity.device_id),
                (None, None),
                transport,
            )?;
            (identity, provisioning)
        };
        let connection = self.connection(raw.connection, &identity)?;
        let provisioning = match provisioning {
            Some(p) => Some(self.provisioning_proxy(p, &connection, proxy_configured)?),
            None => None,
        };
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
            file: self.origin.file(),
            identity,
            connection,
            telemetry,
            connectivity,
            methods,
            metrics,
            outbox,
            provisioning,
        })
    }

    /// A string value; an empty string counts as not set.
    pub(super) fn string(
        &self,
        key: &str,
        value: Option<Scalar>,
    ) -> Result<Option<String>, ConfigError> {
        match value {
            None => Ok(None),
            Some(Scalar::Text(text)) if text.is_empty() => Ok(None),
            Some(Scalar::Text(text)) => Ok(Some(text)),
            Some(_) => Err(self.invalid(key, "must be a string (in quotes)")),
        }
    }

    /// A finite number, or `default` when unset.
    fn number(&self, key: &str, value: Option<Scalar>, default: f64) -> Result<f64, ConfigError> {
        let number = match value {
            None => return Ok(default),
            Some(Scalar::Int(n)) => n as f64,
            Some(Scalar::Float(x)) => x,
            Some(Scalar::Text(text)) => match text.trim().parse::<f64>() {
                Ok(x) => x,
                Err(_) => return Err(self.invalid(key, format!("{text:?} is not a number"))),
            },
            Some(Scalar::Bool) => return Err(self.invalid(key, "must be a number, not a boolean")),
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
        let number = self.number(key, value, default)?;
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

    fn connection(
        &self,
        raw: RawConnection,
        identity: &Identity,
    ) -> Result<ConnectionSettings, ConfigError> {
        let d = ConnectionSettings::default();
        let transport = match self.string("connection.transport", raw.transport)? {
            None => d.transport,
            Some(text) => Transport::parse(&text).ok_or_else(|| {
                self.invalid(
                    "connection.transport",
                    format!("{text:?} is not a transport: \"mqtt\" or \"websocket\""),
                )
            })?,
        };
        // Set in the configuration: used as given (NO_PROXY is for the environment's proxy).
        let proxy = match self.string("connection.proxy", raw.proxy)? {
            Some(url) => Some(
                Proxy::parse(&url)
                    .map_err(|error| self.invalid("connection.proxy", error.to_string()))?,
            ),
            None => {
                let (host, _) = identity.dial_address(transport);
                Proxy::from_env(self.env, &host)?
            }
        };
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
            transport,
            proxy,
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
        let template = self.template(raw.template)?;
        Ok(TelemetrySettings {
            interval,
            queue_size,
            seed,
            template,
            temperature,
            humidity,
            uv,
            ..TelemetrySettings::default()
        })
    }

    /// The template file, read and checked now. A relative path is taken from the working
    /// directory, as every other path of the configuration.
    fn template(&self, value: Option<Scalar>) -> Result<Option<Arc<Template>>, ConfigError> {
        const KEY: &str = "telemetry.template";
        let Some(path) = self.string(KEY, value)? else {
            return Ok(None);
        };
        match Template::load(Path::new(&path)) {
            Ok(template) => Ok(Some(Arc::new(template))),
            Err(source) => Err(ConfigError::Template {
                file: self.origin.file(),
                env_var: self.origin.env_keys.get(KEY).cloned(),
                source: Box::new(source),
            }),
        }
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
        let min = self.number(&min_key, min, default.0)?;
        let max = self.number(&max_key, max, default.1)?;
        if min < max {
            return Ok((min, max));
        }
        // Name the key the user set; when both came from the same place, the minimum.
        let key = if self.origin.set_by_env(&max_key) {
            &max_key
        } else {
            &min_key
        };
        Err(self.invalid(
            key,
            format!("{min_key} ({min}) must be less than {max_key} ({max})"),
        ))
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
                .origin
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
        let command = raw_command
            .into_iter()
            .enumerate()
            .map(|(index, arg)| {
                let problem = match arg {
                    Scalar::Text(text) if !text.contains('\0') => return Ok(text),
                    Scalar::Text(_) => "contains a NUL character",
                    _ => "must be a string (in quotes)",
                };
                Err(self.invalid(&command_key, format!("element {index} {problem}")))
            })
            .collect::<Result<Vec<String>, ConfigError>>()?;
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
}

/// A device key: non-empty base64, wherever it came from.
pub(super) fn check_base64(key: &str) -> Result<(), KeyProblem> {
    match BASE64.decode(key) {
        Ok(bytes) if !bytes.is_empty() => Ok(()),
        Ok(_) => Err(KeyProblem::Empty),
        Err(_) => Err(KeyProblem::NotBase64),
    }
}
