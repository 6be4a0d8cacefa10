//! Device and service connection strings (configuration, `--connection-string`, the service
//! client). Parsing must never panic; a parsed string must format back to one that parses to the
//! same value (as `connection_string.rs` promises); `Debug` must never show a key or signature.

#![no_main]

use std::str::FromStr;

use libfuzzer_sys::fuzz_target;
use simdevice::protocol::connection_string::{DeviceConnectionString, ServiceConnectionString};

/// Long enough that no field or type name in the `Debug` output can contain it by chance.
const MIN_SECRET_CHECKED: usize = 24;

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
        let debug = format!("{device:?}");
        let shown = [
            Some(device.host_name.as_str()),
            Some(device.device_id.as_str()),
            device.module_id.as_deref(),
            device.gateway_host_name.as_deref(),
        ];
        for secret in [&device.shared_access_key, &device.shared_access_signature]
            .into_iter()
            .flatten()
        {
            let elsewhere = shown.iter().flatten().any(|f| f.contains(secret.as_str()));
            if secret.len() >= MIN_SECRET_CHECKED && !elsewhere {
                assert!(!debug.contains(secret.as_str()), "Debug shows a secret");
            }
        }
    }

    if let Ok(service) = ServiceConnectionString::from_str(s) {
        let formatted = service.to_string();
        assert_eq!(
            ServiceConnectionString::from_str(&formatted).as_ref(),
            Ok(&service),
            "{formatted:?}"
        );
        let debug = format!("{service:?}");
        let secret = service.shared_access_key.as_str();
        let elsewhere =
            service.host_name.contains(secret) || service.shared_access_key_name.contains(secret);
        if secret.len() >= MIN_SECRET_CHECKED && !elsewhere {
            assert!(!debug.contains(secret), "Debug shows the key");
        }
    }
});
