//! The X.509 device's certificate check: when it expires (a warning within
//! [`crate::agent::CERTIFICATE_WARNING_DAYS`]), and whether the private key belongs to it (the
//! TLS client set-up refuses a pair whose public keys differ). Reads the two files the
//! configuration names; no network.

use super::Check;
use crate::config::Identity;

const NAME: &str = "certificate";

/// `None` for a SAS device.
pub(super) fn check(identity: &Identity) -> Option<Check> {
    let x509 = identity.x509.as_ref()?;
    if let Err(error) = crate::agent::client_tls_for(identity) {
        let hint = "identity.private_key_file must hold the key of identity.certificate_file \
                    (issue a new pair, e.g. `simdevice service certificate issue`)";
        return Some(Check::fail(
            NAME,
            crate::common::logging::error_chain(&error),
            hint,
        ));
    }
    let left = x509.not_after - chrono::Utc::now();
    let detail = format!(
        "{}: the key matches; valid until {} ({} days)",
        x509.certificate_file.display(),
        x509.not_after.to_rfc3339(),
        left.num_days()
    );
    Some(
        if left < chrono::Duration::days(crate::agent::CERTIFICATE_WARNING_DAYS) {
            Check::warn(
                NAME,
                detail,
                "the certificate expires soon: issue a new one and register its thumbprint \
                 (selfSigned) before it does",
            )
        } else {
            Check::ok(NAME, detail)
        },
    )
}
