//! Device and service connection strings (configuration, `--connection-string`, the service
//! client). Parsing must never panic; a parsed string must format back to one that parses to the
//! same value (as `connection_string.rs` promises); `Debug` must never show a key or signature.

#![no_main]

use std::str::FromStr;

use libfuzzer_sys::fuzz_target;
use simdevice::protocol::connection_string::{DeviceConnectionString, ServiceConnectionString};

/// Stands in for a secret: if `Debug` showed secrets, a value with this one in their place
/// would print differently.
const OTHER_SECRET: &str = "c29tZXRoaW5nIGVsc2UgZW50aXJlbHk=";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let s = text.as_ref();

    if let Ok(device) = DeviceConnectionString::from_str(s) {
        let formatted = device.to_string();
        assert_eq!(
            DeviceConnectionString::from_str(&formatted).as_ref(),
            Ok(&device),
            "{formatted:?}"
        );
        // The Debug text does not depend on the secrets. (Searching it for the secret's text
        // is not enough: another field's escapes can spell it, `\r` followed by "e..." reads
        // as a secret that begins "re...".)
        let mut other = device.clone();
        other.shared_access_key = other.shared_access_key.map(|_| OTHER_SECRET.into());
        other.shared_access_signature = other.shared_access_signature.map(|_| OTHER_SECRET.into());
        assert_eq!(
            format!("{device:?}"),
            format!("{other:?}"),
            "Debug shows a secret"
        );
    }

    if let Ok(service) = ServiceConnectionString::from_str(s) {
        let formatted = service.to_string();
        assert_eq!(
            ServiceConnectionString::from_str(&formatted).as_ref(),
            Ok(&service),
            "{formatted:?}"
        );
        let mut other = service.clone();
        other.shared_access_key = OTHER_SECRET.into();
        assert_eq!(
            format!("{service:?}"),
            format!("{other:?}"),
            "Debug shows the key"
        );
    }
});
