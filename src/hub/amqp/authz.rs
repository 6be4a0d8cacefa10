//! Who may do what on one AMQP connection: the grant of its SASL PLAIN login (a policy name
//! and key) and those of the SAS tokens put on `$cbs`, each with the rights of its policy and
//! the token's expiry.
//!
//! A `$cbs` token is accepted in both signature styles that reach the real service:
//! IoT Hub style (HMAC-SHA256 keyed with the base64-decoded key, what azure-iot-hub and our
//! own service client send) and Service Bus style (keyed with the key text's UTF-8 bytes, what
//! azure-eventhub's `generate_sas_token` sends). Both sign `sr` as received, a newline and `se`.
//! Its resource must name one of the hub's host names (any scheme, any port, any path).
//! Failures are `AuthFailure`s for the log; the peer learns only "unauthorized".

use std::collections::HashMap;
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::hub::auth::{AuthFailure, Permission};
use crate::hub::HubState;
use crate::protocol::sas::SasToken;

/// What one login or token allows, until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub policy: String,
    pub rights: Vec<Permission>,
    /// Unix seconds; `None` for a SASL login (as long as the connection lives).
    pub expires: Option<u64>,
}

/// The grants of one connection.
#[derive(Debug, Default)]
pub struct Grants {
    sasl: Mutex<Option<Grant>>,
    /// By token audience: a new token for the same audience replaces the old one (renewal).
    tokens: Mutex<HashMap<String, Grant>>,
}

impl Grants {
    pub fn set_sasl(&self, grant: Grant) {
        *self.sasl.lock().unwrap_or_else(|p| p.into_inner()) = Some(grant);
    }

    pub fn put_token(&self, audience: String, grant: Grant) {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(audience, grant);
    }

    /// The longest-lived grant with `needed` that is valid at `now`: `Some(None)` for one
    /// without expiry, `Some(Some(t))` for one valid until `t`, `None` when nothing allows it.
    pub fn allows(&self, needed: Permission, now: u64) -> Option<Option<u64>> {
        let sasl = self.sasl.lock().unwrap_or_else(|p| p.into_inner());
        if sasl.as_ref().is_some_and(|g| g.rights.contains(&needed)) {
            return Some(None);
        }
        drop(sasl);
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens
            .values()
            .filter(|g| g.rights.contains(&needed))
            .filter_map(|g| g.expires)
            .filter(|&t| now < t)
            .max()
            .map(Some)
    }
}

/// Checks a SASL PLAIN login: the user name is a policy, the password one of its keys.
pub fn check_plain(state: &HubState, user: &str, password: &str) -> Result<Grant, AuthFailure> {
    let policy = state
        .policies
        .get(user)
        .ok_or_else(|| AuthFailure::UnknownPolicy(user.to_string()))?;
    let matches = [&policy.primary_key, &policy.secondary_key]
        .iter()
        .any(|k| constant_time_eq(k.as_bytes(), password.as_bytes()));
    if !matches {
        return Err(AuthFailure::BadSignature);
    }
    Ok(Grant {
        policy: policy.name.clone(),
        rights: policy.rights.clone(),
        expires: None,
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks a SAS token put on `$cbs` (or carried as a `$management` request's
/// `security_token`) against the hub's policies, in either signature style (module notes).
pub fn check_token(state: &HubState, text: &str, now: u64) -> Result<Grant, AuthFailure> {
    let token = SasToken::parse(text).map_err(|e| AuthFailure::Malformed(e.to_string()))?;
    let policy_name = token
        .key_name
        .clone()
        .ok_or_else(|| AuthFailure::Malformed("the token names no policy (skn)".into()))?;
    let host = resource_host(&token.resource);
    if !state.host_names.accepts(host) {
        return Err(AuthFailure::WrongHost(token.resource.clone()));
    }
    let policy = state
        .policies
        .get(&policy_name)
        .ok_or_else(|| AuthFailure::UnknownPolicy(policy_name.clone()))?;
    let signed = [&policy.primary_key, &policy.secondary_key]
        .iter()
        .any(|key| token.verify_signature(key).is_ok() || service_bus_signature_ok(&token, key));
    if !signed {
        return Err(AuthFailure::BadSignature);
    }
    token
        .check_expiry(now)
        .map_err(|_| AuthFailure::Expired(token.expiry))?;
    Ok(Grant {
        policy: policy.name.clone(),
        rights: policy.rights.clone(),
        expires: Some(token.expiry),
    })
}

/// The host of a token's resource: `sb://localhost:5671/hub/...`, `amqps://localhost/hub`,
/// `localhost/hub` and `localhost` all give `localhost`.
pub fn resource_host(resource: &str) -> &str {
    let rest = resource.split_once("://").map_or(resource, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority.rsplit_once(':') {
        // `[::1]:5671` or `localhost:5671`; a bare `::1` has no port to strip.
        Some((host, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!host.contains(':') || host.ends_with(']')) =>
        {
            host
        }
        _ => authority,
    }
}

/// Service Bus style: HMAC-SHA256 keyed with the key text itself (not base64-decoded).
fn service_bus_signature_ok(token: &SasToken, key_text: &str) -> bool {
    use base64::Engine;
    let Ok(claimed) = base64::engine::general_purpose::STANDARD.decode(&token.signature) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key_text.as_bytes()) else {
        return false;
    };
    mac.update(format!("{}\n{}", token.resource_raw, token.expiry_raw).as_bytes());
    mac.verify_slice(&claimed).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_hosts_drop_scheme_port_and_path() {
        assert_eq!(resource_host("sb://localhost/hub"), "localhost");
        assert_eq!(
            resource_host("amqps://localhost:5671/hub/ConsumerGroups/$Default"),
            "localhost"
        );
        assert_eq!(resource_host("localhost"), "localhost");
        assert_eq!(resource_host("localhost:5671"), "localhost");
        assert_eq!(resource_host("[::1]:5671/x"), "[::1]");
        assert_eq!(resource_host("127.0.0.1/hub"), "127.0.0.1");
    }

    #[test]
    fn service_bus_style_signs_with_the_key_text() {
        // What azure-eventhub's generate_sas_token computes, rebuilt here: HMAC keyed with the
        // key text over quote_plus(audience), a newline and the expiry.
        use base64::Engine;
        let key = "c2VjcmV0LWtleS1mb3ItdGVzdHM=";
        let sr = "sb%3A%2F%2Flocalhost%2Fhub";
        let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
        mac.update(format!("{sr}\n2000000000").as_bytes());
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let sig = percent_encoding::utf8_percent_encode(&sig, percent_encoding::NON_ALPHANUMERIC);
        let token = SasToken::parse(&format!(
            "SharedAccessSignature sr={sr}&sig={sig}&se=2000000000&skn=service"
        ))
        .unwrap();
        assert!(service_bus_signature_ok(&token, key));
        assert!(!service_bus_signature_ok(&token, "b3RoZXIta2V5"));
        assert!(
            token.verify_signature(key).is_err(),
            "not the IoT Hub style"
        );
    }

    #[test]
    fn grants_allow_until_they_expire() {
        let grants = Grants::default();
        assert_eq!(grants.allows(Permission::ServiceConnect, 100), None);
        let grant = |rights: Vec<Permission>, expires| Grant {
            policy: "p".into(),
            rights,
            expires,
        };
        grants.put_token("a".into(), grant(vec![Permission::RegistryRead], Some(500)));
        assert_eq!(
            grants.allows(Permission::ServiceConnect, 100),
            None,
            "wrong right"
        );
        grants.put_token(
            "b".into(),
            grant(vec![Permission::ServiceConnect], Some(200)),
        );
        assert_eq!(
            grants.allows(Permission::ServiceConnect, 100),
            Some(Some(200))
        );
        assert_eq!(
            grants.allows(Permission::ServiceConnect, 200),
            None,
            "expired"
        );
        grants.set_sasl(grant(vec![Permission::ServiceConnect], None));
        assert_eq!(
            grants.allows(Permission::ServiceConnect, 10_000),
            Some(None)
        );
    }
}
