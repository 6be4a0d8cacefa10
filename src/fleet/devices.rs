//! Who the fleet's devices are: ids from a prefix and a range with keys derived from a group
//! key (nothing per device to hand out), or one device connection string per line of a file.
//! Pure apart from reading that file; knows nothing of connections.

use std::path::{Path, PathBuf};

use crate::config::{Identity, Secret};
use crate::protocol::connection_string::{ConnectionStringError, DeviceConnectionString};
use crate::protocol::identity::{validate_device_id, DeviceIdError};
use crate::protocol::sas;

/// One device of the fleet: what its agent connects as (`Debug` shows the key as `***`).
#[derive(Clone, Debug)]
pub struct FleetDevice {
    pub device_id: String,
    pub host_name: String,
    pub gateway_host_name: Option<String>,
    /// Empty for an X.509 device.
    pub key: Secret,
    /// `--x509-ca`: the device's certificate and key, issued in memory (`fleet::x509`).
    pub certificate: Option<std::sync::Arc<rustls::sign::CertifiedKey>>,
}

impl FleetDevice {
    pub fn identity(&self, ca_file: Option<&Path>) -> Identity {
        Identity {
            host_name: self.host_name.clone(),
            device_id: self.device_id.clone(),
            key: self.key.clone(),
            gateway_host_name: self.gateway_host_name.clone(),
            ca_file: ca_file.map(Path::to_path_buf),
            // The agent only asks whether it is an X.509 device (no token, no renewal): its
            // certificate is in the TLS configuration the fleet gives it, not in files.
            x509: self.certificate.as_ref().map(|_| crate::config::X509Files {
                certificate_file: PathBuf::from("(issued in memory by the fleet)"),
                private_key_file: PathBuf::from("(issued in memory by the fleet)"),
                not_after: chrono::Utc::now() + chrono::Duration::days(super::x509::VALIDITY_DAYS),
            }),
        }
    }
}

/// The devices `ids` (already sliced for this shard) on `host_name`, each with a certificate
/// issued by `ca` (CN = its id) and no key.
pub fn from_ca(
    ids: impl IntoIterator<Item = String>,
    host_name: &str,
    gateway_host_name: Option<&str>,
    ca: &super::x509::FleetCa,
) -> Result<Vec<FleetDevice>, DevicesError> {
    ids.into_iter()
        .map(|device_id| {
            validate_device_id(&device_id).map_err(|source| DevicesError::BadId {
                device_id: device_id.clone(),
                source,
            })?;
            let certificate = ca.issue(&device_id)?;
            Ok(FleetDevice {
                device_id,
                host_name: host_name.to_string(),
                gateway_host_name: gateway_host_name.map(str::to_string),
                key: Secret::new(String::new()),
                certificate: Some(certificate),
            })
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error("--group-key is not a usable key (it must be base64)")]
    GroupKey(#[source] sas::SasError),
    #[error("the device id {device_id:?} made from --prefix is not a valid IoT Hub device id")]
    BadId {
        device_id: String,
        #[source]
        source: DeviceIdError,
    },
    #[error("cannot read the devices file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: not a device connection string", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        #[source]
        source: ConnectionStringError,
    },
    #[error("{}:{line}: the fleet signs its own tokens: give a SharedAccessKey (not a SharedAccessSignature or x509)", path.display())]
    NoKey { path: PathBuf, line: usize },
    #[error("{}:{line}: {device_id} is already on line {first}", path.display())]
    Duplicate {
        path: PathBuf,
        line: usize,
        first: usize,
        device_id: String,
    },
    #[error("{} lists no device", path.display())]
    Empty { path: PathBuf },
    #[error(transparent)]
    X509(#[from] super::x509::FleetX509Error),
}

/// The devices `ids` (already sliced for this shard) on `host_name`, each key derived from
/// `group_key` with the DPS group-enrollment derivation.
pub fn from_group_key(
    ids: impl IntoIterator<Item = String>,
    host_name: &str,
    gateway_host_name: Option<&str>,
    group_key: &str,
) -> Result<Vec<FleetDevice>, DevicesError> {
    ids.into_iter()
        .map(|device_id| {
            validate_device_id(&device_id).map_err(|source| DevicesError::BadId {
                device_id: device_id.clone(),
                source,
            })?;
            let key =
                sas::derive_device_key(group_key, &device_id).map_err(DevicesError::GroupKey)?;
            Ok(FleetDevice {
                device_id,
                host_name: host_name.to_string(),
                gateway_host_name: gateway_host_name.map(str::to_string),
                key: Secret::new(key),
                certificate: None,
            })
        })
        .collect()
}

/// The devices of a file: one device connection string per line; blank lines and lines
/// starting with `#` are skipped. Every line is checked, so a bad one is named by its number
/// before anything connects.
pub fn from_file(path: &Path) -> Result<Vec<FleetDevice>, DevicesError> {
    let text = std::fs::read_to_string(path).map_err(|source| DevicesError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_lines(path, &text)
}

fn parse_lines(path: &Path, text: &str) -> Result<Vec<FleetDevice>, DevicesError> {
    let mut devices: Vec<FleetDevice> = Vec::new();
    let mut lines_of: std::collections::HashMap<String, usize> = Default::default();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parsed: DeviceConnectionString = line.parse().map_err(|source| DevicesError::Line {
            path: path.to_path_buf(),
            line: line_no,
            source,
        })?;
        let Some(key) = parsed.shared_access_key.clone() else {
            return Err(DevicesError::NoKey {
                path: path.to_path_buf(),
                line: line_no,
            });
        };
        if parsed.module_id.is_some() {
            return Err(DevicesError::Line {
                path: path.to_path_buf(),
                line: line_no,
                source: ConnectionStringError::UnknownField("ModuleId".into()),
            });
        }
        if let Some(first) = lines_of.insert(parsed.device_id.clone(), line_no) {
            return Err(DevicesError::Duplicate {
                path: path.to_path_buf(),
                line: line_no,
                first,
                device_id: parsed.device_id,
            });
        }
        devices.push(FleetDevice {
            device_id: parsed.device_id,
            host_name: parsed.host_name,
            gateway_host_name: parsed.gateway_host_name,
            key: Secret::new(key),
            certificate: None,
        });
    }
    if devices.is_empty() {
        return Err(DevicesError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seS0wMTIzNDU2Nzg5";

    #[test]
    fn keys_are_derived_per_device_from_the_group_key() {
        let ids = ["door-1".to_string(), "door-2".to_string()];
        let devices = from_group_key(ids, "hub.local", None, KEY).unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(
            devices[0].key.expose(),
            sas::derive_device_key(KEY, "door-1").unwrap()
        );
        assert_ne!(devices[0].key.expose(), devices[1].key.expose());
    }

    #[test]
    fn a_group_key_that_is_not_base64_is_refused_once() {
        let error = from_group_key(["a".to_string()], "h", None, "not base64!").unwrap_err();
        assert!(matches!(error, DevicesError::GroupKey(_)), "{error}");
        assert!(
            !error.to_string().contains("not base64!"),
            "no key in errors"
        );
    }

    #[test]
    fn a_devices_file_is_checked_line_by_line() {
        let path = Path::new("devices.txt");
        let good = format!(
            "# fleet\n\nHostName=h.local;DeviceId=a;SharedAccessKey={KEY}\nHostName=h.local;DeviceId=b;SharedAccessKey={KEY}\n"
        );
        let devices = parse_lines(path, &good).unwrap();
        assert_eq!(
            devices
                .iter()
                .map(|d| d.device_id.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );

        let bad = format!("HostName=h.local;DeviceId=a;SharedAccessKey={KEY}\nDeviceId=b\n");
        let error = parse_lines(path, &bad).unwrap_err().to_string();
        assert!(error.starts_with("devices.txt:2:"), "{error}");

        let sas =
            "HostName=h;DeviceId=a;SharedAccessSignature=SharedAccessSignature sr=x&sig=y&se=1\n";
        let error = parse_lines(path, sas).unwrap_err().to_string();
        assert!(
            error.contains("devices.txt:1:") && error.contains("SharedAccessKey"),
            "{error}"
        );

        let twice = format!("{good}HostName=h.local;DeviceId=a;SharedAccessKey={KEY}\n");
        let error = parse_lines(path, &twice).unwrap_err().to_string();
        assert!(error.contains(":5: a is already on line 3"), "{error}");

        let error = parse_lines(path, "# nothing\n").unwrap_err().to_string();
        assert!(error.contains("lists no device"), "{error}");
    }
}
