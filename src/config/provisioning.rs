//! The `[provisioning]` section: register with the Device Provisioning Service before
//! connecting. `id_scope`; `registration_id` (default: `identity.device_id`); `global_endpoint`
//! (`host[:port]`, default `global.azure-devices-provisioning.net`); `ca_file`; exactly one of
//! `key`, `key_file`, `key_env` (an individual enrollment's key) or `group_key` (an enrollment
//! group's, from which the device key is derived), or none of them when `[identity]` holds
//! only `certificate_file` and `private_key_file` (an X.509 registration: the certificate is
//! presented to DPS and then to the assigned hub; `registration_id` defaults to its common
//! name, as DPS requires); `gateway_host_name` (dial the assigned hub there instead,
//! `host[:port]`, as `identity.gateway_host_name` does).
//!
//! With `[provisioning]` the `[identity]` section may be left out: the identity then names the
//! registration (host name [`UNASSIGNED_HOST`]) until the agent knows its assignment. No key
//! appears in an error.

use std::path::PathBuf;

use super::check::{check_base64, Check};
use super::error::ConfigError;
use super::files::{check_ca_file, read_key_file};
use super::identity::split_host_port;
use super::raw::RawProvisioning;
use super::{ConnectionSettings, Provisioning, Proxy, Secret, Transport, X509Files};
use crate::protocol::dps::GLOBAL_ENDPOINT;
use crate::protocol::identity::validate_device_id;

/// The host name of an identity that DPS has not assigned yet.
pub const UNASSIGNED_HOST: &str = "unassigned.invalid";

impl Check<'_> {
    pub(super) fn provisioning(
        &self,
        raw: RawProvisioning,
        device_id: Option<&str>,
        (certificate_file, private_key_file): (Option<String>, Option<String>),
        transport: Transport,
    ) -> Result<Option<Provisioning>, ConfigError> {
        let id_scope = self.string("provisioning.id_scope", raw.id_scope)?;
        let registration_id = self.string("provisioning.registration_id", raw.registration_id)?;
        let endpoint = self.string("provisioning.global_endpoint", raw.global_endpoint)?;
        let ca_file = self.string("provisioning.ca_file", raw.ca_file)?;
        let key = self.string("provisioning.key", raw.key)?;
        let key_file = self.string("provisioning.key_file", raw.key_file)?;
        let key_env = self.string("provisioning.key_env", raw.key_env)?;
        let group_key = self.string("provisioning.group_key", raw.group_key)?;
        let gateway = self.string("provisioning.gateway_host_name", raw.gateway_host_name)?;
        let anything = [
            &id_scope,
            &registration_id,
            &endpoint,
            &ca_file,
            &key,
            &key_file,
            &key_env,
            &group_key,
            &gateway,
        ]
        .iter()
        .any(|v| v.is_some());
        if !anything {
            return Ok(None);
        }
        let Some(id_scope) = id_scope else {
            return Err(self.invalid(
                "provisioning.id_scope",
                "is missing (the DPS instance's id scope, e.g. 0ne00000001)",
            ));
        };
        let x509 = self.x509_files(certificate_file, private_key_file)?;
        let common_name = x509.as_ref().and_then(certificate_common_name);
        let Some(registration_id) = registration_id
            .or(device_id.map(str::to_string))
            .or(common_name)
        else {
            return Err(self.invalid(
                "provisioning.registration_id",
                "is missing (and there is no identity.device_id to default to)",
            ));
        };
        validate_device_id(&registration_id)
            .map_err(|e| self.invalid("provisioning.registration_id", e.to_string()))?;
        let endpoint = endpoint.unwrap_or_else(|| GLOBAL_ENDPOINT.to_string());
        let (host, port) = split_host_port(&endpoint).map_err(|reason| {
            self.invalid(
                "provisioning.global_endpoint",
                format!("{endpoint:?}: {reason}"),
            )
        })?;
        if let Some(gateway) = &gateway {
            split_host_port(gateway).map_err(|reason| {
                self.invalid(
                    "provisioning.gateway_host_name",
                    format!("{gateway:?}: {reason}"),
                )
            })?;
        }
        let given: Vec<&str> = [
            (key.is_some(), "provisioning.key"),
            (key_file.is_some(), "provisioning.key_file"),
            (key_env.is_some(), "provisioning.key_env"),
            (group_key.is_some(), "provisioning.group_key"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        if x509.is_some() && !given.is_empty() {
            return Err(self.invalid(
                given[0],
                "is not for an X.509 device (identity.certificate_file): it registers with its certificate",
            ));
        }
        if x509.is_none() && given.len() != 1 {
            return Err(self.invalid(
                given.first().copied().unwrap_or("provisioning.key"),
                format!(
                    "give exactly one of provisioning.key, key_file, key_env or group_key (set: {})",
                    if given.is_empty() { "none".to_string() } else { given.join(", ") }
                ),
            ));
        }
        let device_key = if x509.is_some() {
            String::new()
        } else if let Some(key) = key {
            check_base64(&key).map_err(|p| self.invalid("provisioning.key", p.to_string()))?;
            key
        } else if let Some(path) = key_file {
            read_key_file(PathBuf::from(path)).map_err(ConfigError::KeyFile)?
        } else if let Some(var) = key_env {
            let value = self
                .env
                .iter()
                .rev()
                .find(|(name, _)| *name == var)
                .map(|(_, value)| value.trim().to_string())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    self.invalid(
                        "provisioning.key_env",
                        format!("environment variable {var} is not set or empty"),
                    )
                })?;
            check_base64(&value).map_err(|p| {
                self.invalid(
                    "provisioning.key_env",
                    format!("environment variable {var}: {p}"),
                )
            })?;
            value
        } else {
            let group_key = group_key.unwrap_or_default();
            check_base64(&group_key)
                .map_err(|p| self.invalid("provisioning.group_key", p.to_string()))?;
            crate::protocol::sas::derive_device_key(&group_key, &registration_id)
                .map_err(|e| self.invalid("provisioning.group_key", e.to_string()))?
        };
        let ca_file = match ca_file {
            None => None,
            Some(path) => Some(check_ca_file(PathBuf::from(path)).map_err(ConfigError::CaFile)?),
        };
        Ok(Some(Provisioning {
            id_scope,
            registration_id,
            host: host.to_string(),
            // DPS listens where the hub does: 8883 for MQTT, 443 for WebSocket.
            port: port.unwrap_or(transport.default_port()),
            ca_file,
            device_key: Secret::new(device_key),
            gateway_host_name: gateway,
            x509,
            proxy: None,
        }))
    }

    /// The proxy DPS is dialled through: `[connection] proxy` when the file (or its
    /// environment key) sets one, else `HTTPS_PROXY` unless `NO_PROXY` exempts DPS's own host,
    /// which may differ from the hub's.
    pub(super) fn provisioning_proxy(
        &self,
        mut p: Provisioning,
        connection: &ConnectionSettings,
        configured: bool,
    ) -> Result<Provisioning, ConfigError> {
        p.proxy = if configured {
            connection.proxy.clone()
        } else {
            Proxy::from_env(self.env, &p.host)?
        };
        Ok(p)
    }
}

/// The common name of the certificate in `files` (read once more: it was checked at load).
fn certificate_common_name(files: &X509Files) -> Option<String> {
    let pem = std::fs::read_to_string(&files.certificate_file).ok()?;
    let certificates = crate::common::pem::parse_pem_certificates(&pem).ok()?;
    crate::common::der::certificate_summary(certificates.first()?)?.common_name
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, UNASSIGNED_HOST};

    const KEY: &str = "c2VjcmV0LWtleS1ieXRlcy1mb3ItdGVzdGluZw==";

    fn load(text: &str) -> Result<Config, String> {
        Config::from_sources(Some((Path::new("/etc/simdevice/t.toml"), text)), &[])
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_group_key_alone_is_an_identity_to_be_assigned() {
        let config = load(&format!(
            "[provisioning]\nid_scope = \"0ne00000001\"\nregistration_id = \"dev-9\"\ngroup_key = \"{KEY}\"\n"
        ))
        .unwrap();
        let p = config.provisioning.clone().unwrap();
        assert_eq!(
            (p.host.as_str(), p.port),
            ("global.azure-devices-provisioning.net", 8883)
        );
        assert_eq!(
            p.device_key.expose(),
            crate::protocol::sas::derive_device_key(KEY, "dev-9").unwrap()
        );
        assert_eq!(config.identity.host_name, UNASSIGNED_HOST);
        assert_eq!(config.identity.device_id, "dev-9");
        let rendered = config.to_masked_toml();
        assert!(!rendered.contains("[identity]"), "{rendered}");
        assert!(
            rendered.contains("[provisioning]") && rendered.contains("registration_id = \"dev-9\""),
            "{rendered}"
        );
        assert!(!rendered.contains(KEY), "{rendered}");
    }

    #[test]
    fn the_registration_id_defaults_to_the_device_id_and_the_endpoint_may_carry_a_port() {
        let config = load(&format!(
            "[identity]\nhost_name = \"h.example.net\"\ndevice_id = \"door-01\"\nkey = \"{KEY}\"\n\
             [provisioning]\nid_scope = \"0ne1\"\nglobal_endpoint = \"localhost:8884\"\nkey = \"{KEY}\"\n"
        ))
        .unwrap();
        let p = config.provisioning.unwrap();
        assert_eq!(p.registration_id, "door-01");
        assert_eq!((p.host.as_str(), p.port), ("localhost", 8884));
        assert_eq!(p.device_key.expose(), KEY);
    }

    #[test]
    fn dps_is_dialled_with_the_connections_transport_and_its_own_no_proxy() {
        let text = format!(
            "[identity]\nhost_name = \"h.example.net\"\ndevice_id = \"d1\"\nkey = \"{KEY}\"\n\
             [connection]\ntransport = \"websocket\"\n\
             [provisioning]\nid_scope = \"0ne1\"\nkey = \"{KEY}\"\n"
        );
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let path = Path::new("/etc/simdevice/t.toml");
        // WebSocket: the global endpoint's 443, as real DPS serves it.
        let config = Config::from_sources(Some((path, &text)), &[]).unwrap();
        let p = config.provisioning.unwrap();
        assert_eq!(p.port, 443);
        assert!(p.proxy.is_none());
        // HTTPS_PROXY for both; NO_PROXY is checked against each one's own host.
        let proxied = env(&[
            ("HTTPS_PROXY", "http://proxy:3128"),
            ("NO_PROXY", "global.azure-devices-provisioning.net"),
        ]);
        let config = Config::from_sources(Some((path, &text)), &proxied).unwrap();
        assert!(config.provisioning.unwrap().proxy.is_none());
        assert_eq!(config.connection.proxy.unwrap().host, "proxy");
        let proxied = env(&[
            ("HTTPS_PROXY", "http://proxy:3128"),
            ("NO_PROXY", "h.example.net"),
        ]);
        let config = Config::from_sources(Some((path, &text)), &proxied).unwrap();
        assert_eq!(config.provisioning.unwrap().proxy.unwrap().host, "proxy");
        assert!(config.connection.proxy.is_none());
        // A proxy the file names is used for DPS as given, NO_PROXY aside.
        let text = text.replace(
            "[provisioning]",
            "proxy = \"http://fileproxy:8080\"\n[provisioning]",
        );
        let config = Config::from_sources(Some((path, &text)), &proxied).unwrap();
        assert_eq!(
            config.provisioning.unwrap().proxy.unwrap().host,
            "fileproxy"
        );
        // MQTT keeps 8883.
        let config = load(&format!(
            "[provisioning]\nid_scope = \"s\"\nregistration_id = \"d\"\nkey = \"{KEY}\"\n"
        ))
        .unwrap();
        assert_eq!(config.provisioning.unwrap().port, 8883);
    }

    #[test]
    fn mistakes_name_the_key_and_never_the_secret() {
        for (text, key) in [
            (format!("[provisioning]\nregistration_id = \"d\"\nkey = \"{KEY}\"\n"), "provisioning.id_scope"),
            (format!("[provisioning]\nid_scope = \"s\"\nkey = \"{KEY}\"\n"), "provisioning.registration_id"),
            ("[provisioning]\nid_scope = \"s\"\nregistration_id = \"d\"\n".to_string(), "provisioning.key"),
            (
                format!("[provisioning]\nid_scope = \"s\"\nregistration_id = \"d\"\nkey = \"{KEY}\"\ngroup_key = \"{KEY}\"\n"),
                "provisioning.key",
            ),
            (
                format!("[provisioning]\nid_scope = \"s\"\nregistration_id = \"d\"\nkey = \"{KEY}\"\nglobal_endpoint = \"a:b:c\"\n"),
                "provisioning.global_endpoint",
            ),
            ("[provisioning]\nid_scope = \"s\"\nregistration_id = \"d\"\ngroup_key = \"no!\"\n".to_string(), "provisioning.group_key"),
        ] {
            let message = load(&text).unwrap_err();
            assert!(message.contains(key), "{key}: {message}");
            assert!(!message.contains(KEY), "the key leaked: {message}");
        }
    }

    /// A certificate (CN `cam-7`) and its key, the key 0600.
    fn certificate_pair(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cam-7");
        let cert = params.self_signed(&key).unwrap();
        let (cert_file, key_file) = (dir.join("cam.pem"), dir.join("cam.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        (cert_file, key_file)
    }

    #[test]
    fn an_x509_identity_registers_with_its_certificate_and_its_common_name() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = certificate_pair(dir.path());
        let files = format!(
            "[identity]\ncertificate_file = \"{}\"\nprivate_key_file = \"{}\"\n",
            cert.display(),
            key.display()
        );
        let config = load(&format!("{files}[provisioning]\nid_scope = \"0ne1\"\n")).unwrap();
        let p = config.provisioning.clone().unwrap();
        assert_eq!(p.registration_id, "cam-7");
        assert_eq!(p.device_key.expose(), "");
        assert!(p.x509.is_some());
        assert_eq!(config.identity.host_name, UNASSIGNED_HOST);
        assert!(config.identity.x509.is_some());
        let assigned = p.assigned_identity("hub.example.net", "cam-7");
        assert_eq!(
            assigned.x509.map(|x| x.certificate_file),
            Some(cert.clone())
        );
        let rendered = config.to_masked_toml();
        assert!(rendered.contains("certificate_file"), "{rendered}");
        assert!(!rendered.contains("key = \"***\""), "{rendered}");

        // A key as well is a mistake; without [provisioning] the certificate alone is no identity.
        let both = load(&format!(
            "{files}[provisioning]\nid_scope = \"0ne1\"\ngroup_key = \"{KEY}\"\n"
        ))
        .unwrap_err();
        assert!(both.contains("provisioning.group_key"), "{both}");
        assert!(!both.contains(KEY), "{both}");
        assert!(load(&files).is_err());
    }
}
