//! Direct-method requests as the service API sends them (`POST /twins/{id}/methods`) and the result
//! it returns, with the limits IoT Hub enforces: response timeout 5..=300 s (default 30), connect
//! timeout 0..=300 s (default 0: the device must be online now), payload up to 128 KB.
//!
//! Method names travel raw in the topic `$iothub/methods/POST/{name}/`, so a name may not contain
//! characters that would break the topic (`/`, `?`, `#`, `+`, control characters). The 100-character
//! cap on names is this project's choice; the IoT Hub docs name no limit.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const MAX_NAME_CHARS: usize = 100;
pub const MAX_PAYLOAD_BYTES: usize = 128 * 1024;
pub const DEFAULT_RESPONSE_TIMEOUT_SECS: u64 = 30;
pub const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 0;
pub const RESPONSE_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 5..=300;
pub const CONNECT_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 0..=300;

/// Why a method invocation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MethodError {
    #[error("methodName is empty")]
    EmptyName,
    #[error("methodName is {0} characters, over the {MAX_NAME_CHARS}-character limit")]
    NameTooLong(usize),
    #[error("methodName {name:?} contains {ch:?}, which is not allowed")]
    InvalidNameChar { name: String, ch: char },
    #[error("responseTimeoutInSeconds is {0}; it must be between 5 and 300")]
    ResponseTimeoutOutOfRange(u64),
    #[error("connectTimeoutInSeconds is {0}; it must be between 0 and 300")]
    ConnectTimeoutOutOfRange(u64),
    #[error("payload is {0} bytes, over the {MAX_PAYLOAD_BYTES}-byte limit")]
    PayloadTooLarge(usize),
}

/// The body of `POST /twins/{id}/methods`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MethodInvocation {
    pub method_name: String,
    #[serde(default)]
    pub payload: Value,
    pub response_timeout_in_seconds: Option<u64>,
    pub connect_timeout_in_seconds: Option<u64>,
}

impl MethodInvocation {
    pub fn validate(&self) -> Result<(), MethodError> {
        validate_method_name(&self.method_name)?;
        if let Some(t) = self.response_timeout_in_seconds {
            if !RESPONSE_TIMEOUT_RANGE.contains(&t) {
                return Err(MethodError::ResponseTimeoutOutOfRange(t));
            }
        }
        if let Some(t) = self.connect_timeout_in_seconds {
            if !CONNECT_TIMEOUT_RANGE.contains(&t) {
                return Err(MethodError::ConnectTimeoutOutOfRange(t));
            }
        }
        let size = serde_json::to_vec(&self.payload)
            .expect("a JSON value always serializes")
            .len();
        if size > MAX_PAYLOAD_BYTES {
            return Err(MethodError::PayloadTooLarge(size));
        }
        Ok(())
    }

    /// How long to wait for the device's answer (default 30 s).
    pub fn response_timeout(&self) -> Duration {
        Duration::from_secs(
            self.response_timeout_in_seconds
                .unwrap_or(DEFAULT_RESPONSE_TIMEOUT_SECS),
        )
    }

    /// How long to wait for the device to come online (default 0: it must be online now).
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(
            self.connect_timeout_in_seconds
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT_SECS),
        )
    }
}

/// Checks a method name for use in `$iothub/methods/POST/{name}/`.
pub fn validate_method_name(name: &str) -> Result<(), MethodError> {
    if name.is_empty() {
        return Err(MethodError::EmptyName);
    }
    let chars = name.chars().count();
    if chars > MAX_NAME_CHARS {
        return Err(MethodError::NameTooLong(chars));
    }
    if let Some(ch) = name
        .chars()
        .find(|c| c.is_control() || matches!(c, '/' | '?' | '#' | '+'))
    {
        return Err(MethodError::InvalidNameChar {
            name: name.to_string(),
            ch,
        });
    }
    Ok(())
}

/// What the service API returns: the device's status and body, as is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodResult {
    pub status: i32,
    pub payload: Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn invocation(v: Value) -> MethodInvocation {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn parses_the_service_body_with_defaults() {
        let m = invocation(json!({"methodName": "reboot"}));
        assert_eq!(m.payload, Value::Null);
        assert_eq!(m.response_timeout(), Duration::from_secs(30));
        assert_eq!(m.connect_timeout(), Duration::ZERO);
        m.validate().unwrap();

        let m = invocation(json!({
            "methodName": "comp*setInterval", "payload": {"s": 5},
            "responseTimeoutInSeconds": 5, "connectTimeoutInSeconds": 300
        }));
        m.validate().unwrap();
        assert_eq!(m.response_timeout(), Duration::from_secs(5));
        assert_eq!(m.connect_timeout(), Duration::from_secs(300));
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            json!({"methodName": "comp*setInterval", "payload": {"s": 5},
                   "responseTimeoutInSeconds": 5, "connectTimeoutInSeconds": 300})
        );
    }

    #[test]
    fn validation_errors() {
        let check = |v: Value| invocation(v).validate();
        assert_eq!(
            check(json!({"methodName": ""})),
            Err(MethodError::EmptyName)
        );
        assert_eq!(
            check(json!({"methodName": "x".repeat(101)})),
            Err(MethodError::NameTooLong(101))
        );
        assert_eq!(
            check(json!({"methodName": "a/b"})),
            Err(MethodError::InvalidNameChar {
                name: "a/b".into(),
                ch: '/'
            })
        );
        assert_eq!(
            check(json!({"methodName": "m", "responseTimeoutInSeconds": 4})),
            Err(MethodError::ResponseTimeoutOutOfRange(4))
        );
        assert_eq!(
            check(json!({"methodName": "m", "responseTimeoutInSeconds": 301})),
            Err(MethodError::ResponseTimeoutOutOfRange(301))
        );
        assert_eq!(
            check(json!({"methodName": "m", "connectTimeoutInSeconds": 301})),
            Err(MethodError::ConnectTimeoutOutOfRange(301))
        );
        let big = "x".repeat(MAX_PAYLOAD_BYTES);
        assert_eq!(
            check(json!({"methodName": "m", "payload": big})),
            Err(MethodError::PayloadTooLarge(MAX_PAYLOAD_BYTES + 2))
        );
        let fits = "x".repeat(MAX_PAYLOAD_BYTES - 2);
        assert_eq!(check(json!({"methodName": "m", "payload": fits})), Ok(()));
    }

    #[test]
    fn result_serializes_as_the_service_api_does() {
        let r = MethodResult {
            status: 200,
            payload: json!({"ok": true}),
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"status": 200, "payload": {"ok": true}})
        );
        let back: MethodResult =
            serde_json::from_value(json!({"status": -1, "payload": null})).unwrap();
        assert_eq!(back.status, -1);
    }
}
