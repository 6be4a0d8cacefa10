//! Device and service connection strings (`HostName=h;DeviceId=d;SharedAccessKey=k`).
//!
//! Parsing splits on `;`, then on the first `=` (base64 keys end in `=`); empty segments such as a
//! trailing `;` are ignored; surrounding whitespace of the whole string and of each value is
//! trimmed (so a value reads the same wherever its field stands). Field names
//! are case-sensitive, as Azure writes them. `Display` writes the canonical form back, fields in a
//! fixed order, so `parse(format(x)) == x`. Keys and signatures never appear in `Debug` output or in
//! error messages.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

const HOST_NAME: &str = "HostName";
const DEVICE_ID: &str = "DeviceId";
const MODULE_ID: &str = "ModuleId";
const SHARED_ACCESS_KEY: &str = "SharedAccessKey";
const SHARED_ACCESS_KEY_NAME: &str = "SharedAccessKeyName";
const SHARED_ACCESS_SIGNATURE: &str = "SharedAccessSignature";
const GATEWAY_HOST_NAME: &str = "GatewayHostName";
const X509: &str = "x509";

/// Why a connection string was refused. Messages name the field, never a key or signature value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionStringError {
    #[error("connection string is missing the required field '{0}'")]
    MissingField(&'static str),
    #[error("connection string field '{0}' has an empty value")]
    EmptyValue(String),
    #[error("connection string segment {0} has no '=' (expected Name=value)")]
    SegmentWithoutEquals(usize),
    #[error("connection string has an unknown field '{0}' (field names are case-sensitive)")]
    UnknownField(String),
    #[error("connection string field '{0}' appears more than once")]
    DuplicateField(String),
    #[error("connection string field '{0}' is not valid base64")]
    InvalidBase64(&'static str),
    #[error("connection string field 'x509' must be 'true' or 'false', not '{0}'")]
    InvalidX509(String),
    #[error(
        "device connection string needs one of SharedAccessKey, SharedAccessSignature or x509=true"
    )]
    MissingCredential,
    #[error("device connection string has more than one credential ({0}); give exactly one")]
    ConflictingCredentials(String),
}

/// A device (or module) connection string.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceConnectionString {
    pub host_name: String,
    pub device_id: String,
    pub module_id: Option<String>,
    pub shared_access_key: Option<String>,
    pub shared_access_signature: Option<String>,
    /// Where to open the TCP/TLS connection (may carry `:port`); `host_name` stays in the username
    /// and the token.
    pub gateway_host_name: Option<String>,
    pub x509: bool,
}

/// A service (shared access policy) connection string.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceConnectionString {
    pub host_name: String,
    pub shared_access_key_name: String,
    pub shared_access_key: String,
}

/// The `Name=value` pairs of a connection string, checked for shape, unknown and duplicate names.
struct Fields<'a> {
    pairs: Vec<(&'static str, &'a str)>,
}

impl<'a> Fields<'a> {
    fn parse(s: &'a str, allowed: &[&'static str]) -> Result<Self, ConnectionStringError> {
        let mut pairs: Vec<(&'static str, &'a str)> = Vec::new();
        for (index, segment) in s.trim().split(';').enumerate() {
            if segment.is_empty() {
                continue;
            }
            let (name, value) = segment
                .split_once('=')
                .ok_or(ConnectionStringError::SegmentWithoutEquals(index + 1))?;
            let value = value.trim();
            let name = allowed
                .iter()
                .copied()
                .find(|known| *known == name)
                .ok_or_else(|| ConnectionStringError::UnknownField(name.to_string()))?;
            if pairs.iter().any(|(seen, _)| *seen == name) {
                return Err(ConnectionStringError::DuplicateField(name.to_string()));
            }
            if value.is_empty() {
                return Err(ConnectionStringError::EmptyValue(name.to_string()));
            }
            pairs.push((name, value));
        }
        Ok(Self { pairs })
    }

    fn get(&self, name: &str) -> Option<String> {
        self.pairs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_string())
    }

    fn required(&self, name: &'static str) -> Result<String, ConnectionStringError> {
        self.get(name)
            .ok_or(ConnectionStringError::MissingField(name))
    }
}

fn check_base64(field: &'static str, value: &str) -> Result<(), ConnectionStringError> {
    BASE64
        .decode(value)
        .map(|_| ())
        .map_err(|_| ConnectionStringError::InvalidBase64(field))
}

impl FromStr for DeviceConnectionString {
    type Err = ConnectionStringError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fields = Fields::parse(
            s,
            &[
                HOST_NAME,
                DEVICE_ID,
                MODULE_ID,
                SHARED_ACCESS_KEY,
                SHARED_ACCESS_SIGNATURE,
                GATEWAY_HOST_NAME,
                X509,
            ],
        )?;
        let host_name = fields.required(HOST_NAME)?;
        let device_id = fields.required(DEVICE_ID)?;
        let shared_access_key = fields.get(SHARED_ACCESS_KEY);
        if let Some(key) = &shared_access_key {
            check_base64(SHARED_ACCESS_KEY, key)?;
        }
        let shared_access_signature = fields.get(SHARED_ACCESS_SIGNATURE);
        let x509 = match fields.get(X509) {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            Some(v) => return Err(ConnectionStringError::InvalidX509(v)),
        };
        let given: Vec<&str> = [
            (shared_access_key.is_some(), SHARED_ACCESS_KEY),
            (shared_access_signature.is_some(), SHARED_ACCESS_SIGNATURE),
            (x509, "x509=true"),
        ]
        .into_iter()
        .filter_map(|(present, name)| present.then_some(name))
        .collect();
        match given.len() {
            0 => return Err(ConnectionStringError::MissingCredential),
            1 => {}
            _ => {
                return Err(ConnectionStringError::ConflictingCredentials(
                    given.join(", "),
                ));
            }
        }
        Ok(Self {
            host_name,
            device_id,
            module_id: fields.get(MODULE_ID),
            shared_access_key,
            shared_access_signature,
            gateway_host_name: fields.get(GATEWAY_HOST_NAME),
            x509,
        })
    }
}

impl fmt::Display for DeviceConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{HOST_NAME}={};{DEVICE_ID}={}",
            self.host_name, self.device_id
        )?;
        if let Some(m) = &self.module_id {
            write!(f, ";{MODULE_ID}={m}")?;
        }
        if let Some(k) = &self.shared_access_key {
            write!(f, ";{SHARED_ACCESS_KEY}={k}")?;
        }
        if let Some(s) = &self.shared_access_signature {
            write!(f, ";{SHARED_ACCESS_SIGNATURE}={s}")?;
        }
        if let Some(g) = &self.gateway_host_name {
            write!(f, ";{GATEWAY_HOST_NAME}={g}")?;
        }
        if self.x509 {
            write!(f, ";{X509}=true")?;
        }
        Ok(())
    }
}

fn mask(secret: &Option<String>) -> Option<&'static str> {
    secret.as_ref().map(|_| "***")
}

impl fmt::Debug for DeviceConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceConnectionString")
            .field("host_name", &self.host_name)
            .field("device_id", &self.device_id)
            .field("module_id", &self.module_id)
            .field("shared_access_key", &mask(&self.shared_access_key))
            .field(
                "shared_access_signature",
                &mask(&self.shared_access_signature),
            )
            .field("gateway_host_name", &self.gateway_host_name)
            .field("x509", &self.x509)
            .finish()
    }
}

impl FromStr for ServiceConnectionString {
    type Err = ConnectionStringError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fields = Fields::parse(s, &[HOST_NAME, SHARED_ACCESS_KEY_NAME, SHARED_ACCESS_KEY])?;
        let host_name = fields.required(HOST_NAME)?;
        let shared_access_key_name = fields.required(SHARED_ACCESS_KEY_NAME)?;
        let shared_access_key = fields.required(SHARED_ACCESS_KEY)?;
        check_base64(SHARED_ACCESS_KEY, &shared_access_key)?;
        Ok(Self {
            host_name,
            shared_access_key_name,
            shared_access_key,
        })
    }
}

impl fmt::Display for ServiceConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{HOST_NAME}={};{SHARED_ACCESS_KEY_NAME}={};{SHARED_ACCESS_KEY}={}",
            self.host_name, self.shared_access_key_name, self.shared_access_key
        )
    }
}

impl fmt::Debug for ServiceConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceConnectionString")
            .field("host_name", &self.host_name)
            .field("shared_access_key_name", &self.shared_access_key_name)
            .field("shared_access_key", &"***")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &str = "c2VjcmV0LWtleS1ieXRlcy1mb3ItdGVzdGluZw==";

    fn device(s: &str) -> Result<DeviceConnectionString, ConnectionStringError> {
        s.parse()
    }

    #[test]
    fn parses_a_plain_device_string() {
        let cs = device(&format!(
            "HostName=h.azure-devices.net;DeviceId=d1;SharedAccessKey={KEY}"
        ))
        .unwrap();
        assert_eq!(cs.host_name, "h.azure-devices.net");
        assert_eq!(cs.device_id, "d1");
        assert_eq!(cs.shared_access_key.as_deref(), Some(KEY));
        assert_eq!(cs.module_id, None);
        assert!(!cs.x509);
    }

    #[test]
    fn parses_all_optional_device_fields_in_any_order_with_trailing_semicolon() {
        let cs = device(&format!(
            "GatewayHostName=localhost:8883;ModuleId=m1;SharedAccessKey={KEY};DeviceId=d1;HostName=h;"
        ))
        .unwrap();
        assert_eq!(cs.module_id.as_deref(), Some("m1"));
        assert_eq!(cs.gateway_host_name.as_deref(), Some("localhost:8883"));
        assert_eq!(
            cs.to_string(),
            format!(
                "HostName=h;DeviceId=d1;ModuleId=m1;SharedAccessKey={KEY};GatewayHostName=localhost:8883"
            )
        );
    }

    #[test]
    fn x509_and_signature_credentials() {
        let cs = device("HostName=h;DeviceId=d1;x509=true").unwrap();
        assert!(cs.x509);
        assert_eq!(cs.to_string(), "HostName=h;DeviceId=d1;x509=true");
        let cs = device("HostName=h;DeviceId=d1;SharedAccessSignature=SharedAccessSignature sr=h%2Fdevices%2Fd1&sig=abc%3D&se=1").unwrap();
        assert!(cs.shared_access_signature.is_some());
        assert_eq!(device(&cs.to_string()).unwrap(), cs);
    }

    #[test]
    fn device_errors_name_the_field() {
        assert_eq!(
            device(&format!("DeviceId=d1;SharedAccessKey={KEY}")),
            Err(ConnectionStringError::MissingField("HostName"))
        );
        assert_eq!(
            device(&format!("HostName=h;SharedAccessKey={KEY}")),
            Err(ConnectionStringError::MissingField("DeviceId"))
        );
        assert_eq!(
            device(&format!("HostName=;DeviceId=d1;SharedAccessKey={KEY}")),
            Err(ConnectionStringError::EmptyValue("HostName".into()))
        );
        assert_eq!(
            device(&format!("HostName=h;DeviceId;SharedAccessKey={KEY}")),
            Err(ConnectionStringError::SegmentWithoutEquals(2))
        );
        assert_eq!(
            device(&format!("HostName=h;deviceid=d1;SharedAccessKey={KEY}")),
            Err(ConnectionStringError::UnknownField("deviceid".into()))
        );
        assert_eq!(
            device(&format!(
                "HostName=h;DeviceId=d1;DeviceId=d2;SharedAccessKey={KEY}"
            )),
            Err(ConnectionStringError::DuplicateField("DeviceId".into()))
        );
        assert_eq!(
            device("HostName=h;DeviceId=d1"),
            Err(ConnectionStringError::MissingCredential)
        );
        assert_eq!(
            device("HostName=h;DeviceId=d1;x509=false"),
            Err(ConnectionStringError::MissingCredential)
        );
        assert_eq!(
            device("HostName=h;DeviceId=d1;x509=yes"),
            Err(ConnectionStringError::InvalidX509("yes".into()))
        );
        assert_eq!(
            device(&format!(
                "HostName=h;DeviceId=d1;SharedAccessKey={KEY};x509=true"
            )),
            Err(ConnectionStringError::ConflictingCredentials(
                "SharedAccessKey, x509=true".into()
            ))
        );
    }

    #[test]
    fn bad_key_error_does_not_leak_the_key() {
        let err = device("HostName=h;DeviceId=d1;SharedAccessKey=not*base64!secret").unwrap_err();
        assert_eq!(err, ConnectionStringError::InvalidBase64("SharedAccessKey"));
        assert!(!err.to_string().contains("secret"));
    }

    #[test]
    fn debug_masks_secrets() {
        let cs = device(&format!("HostName=h;DeviceId=d1;SharedAccessKey={KEY}")).unwrap();
        let dbg = format!("{cs:?}");
        assert!(!dbg.contains(KEY), "{dbg}");
        assert!(dbg.contains("***"));
        let svc: ServiceConnectionString =
            format!("HostName=h;SharedAccessKeyName=iothubowner;SharedAccessKey={KEY}")
                .parse()
                .unwrap();
        let dbg = format!("{svc:?}");
        assert!(!dbg.contains(KEY), "{dbg}");
        assert!(dbg.contains("iothubowner"));
    }

    #[test]
    fn service_string_parses_and_errors() {
        let svc: ServiceConnectionString = format!(
            "HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey={KEY}\n"
        )
        .parse()
        .unwrap();
        assert_eq!(svc.host_name, "localhost:8443");
        assert_eq!(svc.shared_access_key_name, "iothubowner");
        assert_eq!(
            svc.to_string(),
            format!(
                "HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey={KEY}"
            )
        );
        assert_eq!(
            format!("HostName=h;SharedAccessKey={KEY}").parse::<ServiceConnectionString>(),
            Err(ConnectionStringError::MissingField("SharedAccessKeyName"))
        );
        assert_eq!(
            format!("HostName=h;DeviceId=d;SharedAccessKeyName=p;SharedAccessKey={KEY}")
                .parse::<ServiceConnectionString>(),
            Err(ConnectionStringError::UnknownField("DeviceId".into()))
        );
        assert_eq!(
            "HostName=h;SharedAccessKeyName=p;SharedAccessKey=%%"
                .parse::<ServiceConnectionString>(),
            Err(ConnectionStringError::InvalidBase64("SharedAccessKey"))
        );
    }

    #[test]
    fn values_are_trimmed_wherever_the_field_stands() {
        // Found by fuzz/fuzz_targets/connection_string.rs: trailing whitespace of the last value
        // was trimmed with the whole string, that of any other value kept, so `Display` could
        // write a string that parsed to something else.
        let cs =
            device("HostName=h;DeviceId=d1;SharedAccessSignature=sig\u{b};GatewayHostName=g\t")
                .unwrap();
        assert_eq!(cs.shared_access_signature.as_deref(), Some("sig"));
        assert_eq!(cs.gateway_host_name.as_deref(), Some("g"));
        assert_eq!(device(&cs.to_string()).unwrap(), cs);
        assert_eq!(
            device("HostName= ;DeviceId=d1;x509=true"),
            Err(ConnectionStringError::EmptyValue("HostName".into()))
        );
    }

    fn value() -> impl Strategy<Value = String> {
        "[A-Za-z0-9.:_-]{1,20}"
    }

    fn key() -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<u8>(), 1..48).prop_map(|b| BASE64.encode(b))
    }

    proptest! {
        #[test]
        fn device_string_round_trips(
            host_name in value(),
            device_id in value(),
            module_id in proptest::option::of(value()),
            gateway_host_name in proptest::option::of(value()),
            credential in 0..3u8,
            k in key(),
            sig in "SharedAccessSignature sr=[a-z%0-9]{1,10}&sig=[A-Za-z0-9%]{1,10}&se=[0-9]{1,10}",
        ) {
            let cs = DeviceConnectionString {
                host_name,
                device_id,
                module_id,
                shared_access_key: (credential == 0).then_some(k),
                shared_access_signature: (credential == 1).then_some(sig),
                gateway_host_name,
                x509: credential == 2,
            };
            prop_assert_eq!(device(&cs.to_string()).unwrap(), cs);
        }

        #[test]
        fn service_string_round_trips(host_name in value(), name in value(), k in key()) {
            let cs = ServiceConnectionString { host_name, shared_access_key_name: name, shared_access_key: k };
            prop_assert_eq!(cs.to_string().parse::<ServiceConnectionString>().unwrap(), cs);
        }
    }
}
