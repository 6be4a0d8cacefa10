//! The `[identity]` section: a connection string, or a host name, a device id and exactly one
//! of a key, a key file or a key environment variable; or, for an X.509 device, a certificate
//! file and a private key file (with a connection string that says `x509=true`, or with a host
//! name and a device id); a gateway and a CA file. Host names are
//! checked here (`host[:port]`, IPv6 in brackets), device ids by the rule of
//! [`crate::protocol::identity`], which the hub's registry applies too.
//!
//! Reads files only through `files`; the key is never put in an error.

use std::path::PathBuf;
use std::str::FromStr;

use super::check::{check_base64, Check};
use super::error::ConfigError;
use super::files::{check_ca_file, check_x509_files, read_key_file};
use super::raw::RawIdentity;
use super::{Identity, Secret, X509Files};
use crate::protocol::connection_string::DeviceConnectionString;
use crate::protocol::identity::validate_device_id;

const CONNECTION_STRING: &str = "identity.connection_string";
const HOST_NAME: &str = "identity.host_name";
const DEVICE_ID: &str = "identity.device_id";
const KEY: &str = "identity.key";
const KEY_FILE: &str = "identity.key_file";
const KEY_ENV: &str = "identity.key_env";
const GATEWAY: &str = "identity.gateway_host_name";
const CERTIFICATE_FILE: &str = "identity.certificate_file";
const PRIVATE_KEY_FILE: &str = "identity.private_key_file";

impl Check<'_> {
    pub(super) fn identity(&self, raw: RawIdentity) -> Result<Identity, ConfigError> {
        let connection_string = self.string(CONNECTION_STRING, raw.connection_string)?;
        let host_name = self.string(HOST_NAME, raw.host_name)?;
        let device_id = self.string(DEVICE_ID, raw.device_id)?;
        let key = self.string(KEY, raw.key)?;
        let key_file = self.string(KEY_FILE, raw.key_file)?;
        let key_env = self.string(KEY_ENV, raw.key_env)?;
        let gateway = self.string(GATEWAY, raw.gateway_host_name)?;
        let ca_file = self.string("identity.ca_file", raw.ca_file)?;
        let certificate_file = self.string(CERTIFICATE_FILE, raw.certificate_file)?;
        let private_key_file = self.string(PRIVATE_KEY_FILE, raw.private_key_file)?;
        let x509 = certificate_file.is_some() || private_key_file.is_some();

        let separate = set_keys(&[
            (host_name.is_some(), HOST_NAME),
            (device_id.is_some(), DEVICE_ID),
            (key.is_some(), KEY),
            (key_file.is_some(), KEY_FILE),
            (key_env.is_some(), KEY_ENV),
        ]);
        if x509 {
            let keys = set_keys(&[
                (key.is_some(), KEY),
                (key_file.is_some(), KEY_FILE),
                (key_env.is_some(), KEY_ENV),
            ]);
            if let Some(first) = keys.first() {
                return Err(self.invalid(
                    first,
                    "give a device key or an X.509 certificate (identity.certificate_file, \
                     identity.private_key_file), not both",
                ));
            }
        }

        let (host_name, device_id, key, gateway) = if let Some(text) = connection_string {
            if !separate.is_empty() {
                return Err(self.invalid(
                    CONNECTION_STRING,
                    format!(
                        "give either a connection string or host_name, device_id and a key, \
                         not both (also set: {})",
                        separate.join(", ")
                    ),
                ));
            }
            self.connection_string(&text, gateway, x509)?
        } else {
            if separate.is_empty() {
                return Err(ConfigError::MissingIdentity {
                    file: self.origin.file(),
                });
            }
            let Some(host_name) = host_name else {
                return Err(self.invalid(
                    HOST_NAME,
                    "is missing (the hub's host name, e.g. myhub.azure-devices.net)",
                ));
            };
            let Some(device_id) = device_id else {
                return Err(self.invalid(DEVICE_ID, "is missing"));
            };
            self.address(HOST_NAME, "", &host_name)?;
            validate_device_id(&device_id)
                .map_err(|error| self.invalid(DEVICE_ID, error.to_string()))?;
            if let Some(gateway) = &gateway {
                self.address(GATEWAY, "", gateway)?;
            }
            let key = if x509 {
                String::new()
            } else {
                self.device_key(key, key_file, key_env)?
            };
            (host_name, device_id, key, gateway)
        };
        let x509 = self.x509_files(certificate_file, private_key_file)?;

        let ca_file = match ca_file {
            None => None,
            Some(path) => Some(check_ca_file(PathBuf::from(path)).map_err(ConfigError::CaFile)?),
        };
        Ok(Identity {
            host_name,
            device_id,
            key: Secret::new(key),
            gateway_host_name: gateway,
            ca_file,
            x509,
        })
    }

    /// `identity.certificate_file` + `identity.private_key_file`, both or neither, checked.
    pub(super) fn x509_files(
        &self,
        certificate_file: Option<String>,
        private_key_file: Option<String>,
    ) -> Result<Option<X509Files>, ConfigError> {
        match (certificate_file, private_key_file) {
            (None, None) => Ok(None),
            (Some(certificate), Some(private_key)) => Ok(Some(
                check_x509_files(
                    PathBuf::from(certificate),
                    PathBuf::from(private_key),
                    chrono::Utc::now(),
                )
                .map_err(ConfigError::X509File)?,
            )),
            (Some(_), None) => Err(self.invalid(
                PRIVATE_KEY_FILE,
                "is missing: identity.certificate_file needs the certificate's private key",
            )),
            (None, Some(_)) => Err(self.invalid(
                CERTIFICATE_FILE,
                "is missing: identity.private_key_file needs the certificate it belongs to",
            )),
        }
    }

    /// A device connection string with a SharedAccessKey -> host name, device id, key and
    /// gateway (from the string or from `identity.gateway_host_name`, not both).
    fn connection_string(
        &self,
        text: &str,
        gateway: Option<String>,
        certificate_given: bool,
    ) -> Result<(String, String, String, Option<String>), ConfigError> {
        const KEY: &str = CONNECTION_STRING;
        let parsed = DeviceConnectionString::from_str(text)
            .map_err(|error| self.invalid(KEY, error.to_string()))?;
        if parsed.shared_access_signature.is_some() {
            return Err(self.invalid(
                KEY,
                "carries a SharedAccessSignature, which expires and cannot be renewed: \
                 the agent signs its own tokens, so give the device's SharedAccessKey",
            ));
        }
        if parsed.x509 && !certificate_given {
            return Err(self.invalid(
                KEY,
                "uses x509=true: give the device's certificate and key as \
                 identity.certificate_file and identity.private_key_file",
            ));
        }
        if certificate_given && !parsed.x509 {
            return Err(self.invalid(
                KEY,
                "has a SharedAccessKey while identity.certificate_file / \
                 identity.private_key_file are set: an X.509 device's connection string \
                 says x509=true",
            ));
        }
        if parsed.module_id.is_some() {
            return Err(self.invalid(KEY, "names a ModuleId; module identities are not supported"));
        }
        let device_key = match parsed.shared_access_key {
            Some(key) => key,
            None if parsed.x509 => String::new(),
            None => return Err(self.invalid(KEY, "has no SharedAccessKey")),
        };
        let gateway = match (parsed.gateway_host_name, gateway) {
            (Some(_), Some(_)) => {
                return Err(self.invalid(
                    GATEWAY,
                    "is set twice: in the connection string (GatewayHostName) and as \
                     identity.gateway_host_name; keep one",
                ))
            }
            (from_string, from_key) => from_string.or(from_key),
        };
        if let Some(gateway) = &gateway {
            self.address(KEY, "GatewayHostName ", gateway)?;
        }
        self.address(KEY, "HostName ", &parsed.host_name)?;
        validate_device_id(&parsed.device_id)
            .map_err(|error| self.invalid(KEY, format!("DeviceId: {error}")))?;
        Ok((parsed.host_name, parsed.device_id, device_key, gateway))
    }

    /// `value` as a `host[:port]` to dial; the error reads `{key}: {label}"value": reason`.
    fn address(&self, key: &str, label: &str, value: &str) -> Result<(), ConfigError> {
        split_host_port(value)
            .map(|_| ())
            .map_err(|reason| self.invalid(key, format!("{label}{value:?}: {reason}")))
    }

    /// Exactly one of `key`, `key_file`, `key_env`, and a base64 value.
    fn device_key(
        &self,
        key: Option<String>,
        key_file: Option<String>,
        key_env: Option<String>,
    ) -> Result<String, ConfigError> {
        let given = set_keys(&[
            (key.is_some(), KEY),
            (key_file.is_some(), KEY_FILE),
            (key_env.is_some(), KEY_ENV),
        ]);
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
            check_base64(&key).map_err(|problem| self.invalid(KEY, problem.to_string()))?;
            return Ok(key);
        }
        if let Some(path) = key_file {
            return read_key_file(PathBuf::from(path)).map_err(ConfigError::KeyFile);
        }
        if let Some(var) = key_env {
            let value = self
                .env
                .iter()
                .rev()
                .find(|(name, _)| *name == var)
                .map(|(_, value)| value.trim().to_string());
            let message = match value {
                None => format!("environment variable {var} is not set"),
                Some(value) if value.is_empty() => format!("environment variable {var} is empty"),
                Some(value) => match check_base64(&value) {
                    Ok(()) => return Ok(value),
                    Err(problem) => format!("environment variable {var}: {problem}"),
                },
            };
            return Err(self.invalid(KEY_ENV, message));
        }
        Err(self.invalid(
            KEY,
            "no device key: give exactly one of identity.key, identity.key_file, identity.key_env",
        ))
    }
}

/// The names of the keys that are set, in the order given.
fn set_keys<'k>(keys: &[(bool, &'k str)]) -> Vec<&'k str> {
    keys.iter()
        .filter_map(|&(set, name)| set.then_some(name))
        .collect()
}

/// `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 literal -> host (without brackets)
/// and port.
pub(super) fn split_host_port(target: &str) -> Result<(&str, Option<u16>), String> {
    let (host, port) = if let Some(rest) = target.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| "has '[' without a matching ']'".to_string())?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{host:?} in brackets is not an IPv6 address"));
        }
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err("expected ':port' after ']'".to_string()),
            },
        }
    } else if target.parse::<std::net::Ipv6Addr>().is_ok() {
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
    if host.contains(':') && host.parse::<std::net::Ipv6Addr>().is_err() {
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
    fn set_keys_keeps_the_order_given() {
        assert_eq!(
            set_keys(&[(true, "a"), (false, "b"), (true, "c")]),
            vec!["a", "c"]
        );
    }
}
