//! The configuration as the `config` crate merges it, before any check: one struct per table,
//! each refusing unknown keys (`deny_unknown_fields`), every leaf a loose [`Scalar`] so that the
//! checks, not serde, decide what a value may be and say so with the key's name.
//!
//! Only types: no checks, no I/O.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// One leaf value as given: environment values are always text.
pub(super) enum Scalar {
    /// A boolean: no key takes one, so only its kind is kept for the error.
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
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) identity: RawIdentity,
    #[serde(default)]
    pub(super) connection: RawConnection,
    #[serde(default)]
    pub(super) telemetry: RawTelemetry,
    #[serde(default)]
    pub(super) connectivity: RawConnectivity,
    #[serde(default)]
    pub(super) methods: BTreeMap<String, RawMethod>,
    #[serde(default)]
    pub(super) metrics: RawMetrics,
    #[serde(default)]
    pub(super) outbox: RawOutbox,
    #[serde(default)]
    pub(super) provisioning: RawProvisioning,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdentity {
    pub(super) connection_string: Option<Scalar>,
    pub(super) host_name: Option<Scalar>,
    pub(super) device_id: Option<Scalar>,
    pub(super) key: Option<Scalar>,
    pub(super) key_file: Option<Scalar>,
    pub(super) key_env: Option<Scalar>,
    pub(super) gateway_host_name: Option<Scalar>,
    pub(super) ca_file: Option<Scalar>,
    pub(super) certificate_file: Option<Scalar>,
    pub(super) private_key_file: Option<Scalar>,
}

impl RawIdentity {
    /// No key of `[identity]` is set.
    pub(super) fn is_empty(&self) -> bool {
        [
            &self.connection_string,
            &self.host_name,
            &self.device_id,
            &self.key,
            &self.key_file,
            &self.key_env,
            &self.gateway_host_name,
            &self.ca_file,
        ]
        .iter()
        .all(|v| v.is_none())
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvisioning {
    pub(super) id_scope: Option<Scalar>,
    pub(super) registration_id: Option<Scalar>,
    pub(super) global_endpoint: Option<Scalar>,
    pub(super) ca_file: Option<Scalar>,
    pub(super) key: Option<Scalar>,
    pub(super) key_file: Option<Scalar>,
    pub(super) key_env: Option<Scalar>,
    pub(super) group_key: Option<Scalar>,
    pub(super) gateway_host_name: Option<Scalar>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConnection {
    pub(super) keep_alive_secs: Option<Scalar>,
    pub(super) sas_lifetime_secs: Option<Scalar>,
    pub(super) renew_at: Option<Scalar>,
    pub(super) backoff_min_secs: Option<Scalar>,
    pub(super) backoff_max_secs: Option<Scalar>,
    pub(super) connect_timeout_secs: Option<Scalar>,
    pub(super) transport: Option<Scalar>,
    pub(super) proxy: Option<Scalar>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    pub(super) interval_secs: Option<Scalar>,
    pub(super) queue_size: Option<Scalar>,
    pub(super) seed: Option<Scalar>,
    pub(super) template: Option<Scalar>,
    pub(super) temperature_min: Option<Scalar>,
    pub(super) temperature_max: Option<Scalar>,
    pub(super) humidity_min: Option<Scalar>,
    pub(super) humidity_max: Option<Scalar>,
    pub(super) uv_min: Option<Scalar>,
    pub(super) uv_max: Option<Scalar>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConnectivity {
    pub(super) operator: Option<Scalar>,
    pub(super) technology: Option<Scalar>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutbox {
    pub(super) path: Option<Scalar>,
    pub(super) max_readings: Option<Scalar>,
    pub(super) max_age_secs: Option<Scalar>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: Option<Scalar>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMethod {
    pub(super) command: Option<Vec<Scalar>>,
    pub(super) timeout_secs: Option<Scalar>,
}
