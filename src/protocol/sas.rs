//! Shared access signature (SAS) tokens: generating them (agent, service client), parsing and
//! verifying them (hub), and the key helpers around them (DPS group-enrollment key derivation,
//! random key generation).
//!
//! Token: `SharedAccessSignature sr={enc(resource)}&sig={enc(signature)}&se={expiry}[&skn={policy}]`,
//! signature = base64(HMAC-SHA256(base64-decode(key), enc(resource) + "\n" + expiry)). A verifier
//! recomputes the HMAC over `sr` and `se` exactly as received (some SDKs sign `sr` unencoded), then
//! compares the decoded `sr` with what it expects. No key or signature ever appears in an error or
//! in `Debug` output. The clock is never read here: callers pass Unix seconds.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::protocol::encoding::{dec, enc};

type HmacSha256 = Hmac<Sha256>;

const PREFIX: &str = "SharedAccessSignature ";

/// Why a token could not be made, parsed or accepted. Never carries a key or signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    #[error("SAS token does not start with 'SharedAccessSignature '")]
    MissingPrefix,
    #[error("SAS token is missing the '{0}' field")]
    MissingField(&'static str),
    #[error("SAS token has the '{0}' field more than once")]
    DuplicateField(&'static str),
    #[error("SAS token is malformed: {part} {problem}")]
    Malformed {
        part: &'static str,
        problem: &'static str,
    },
    #[error("the shared access key is not valid base64")]
    InvalidKey,
    #[error("SAS token signature does not match")]
    SignatureMismatch,
    #[error("SAS token expired at {expiry} (Unix seconds); it is now {now}")]
    Expired { expiry: u64, now: u64 },
}

/// The SAS resource URI of a device or module identity: `host/devices/id[/modules/m]`, unencoded.
pub fn device_resource(host: &str, device_id: &str, module_id: Option<&str>) -> String {
    match module_id {
        Some(m) => format!("{host}/devices/{device_id}/modules/{m}"),
        None => format!("{host}/devices/{device_id}"),
    }
}

fn sign(key_b64: &str, message: &[u8]) -> Result<HmacSha256, SasError> {
    let key = BASE64.decode(key_b64).map_err(|_| SasError::InvalidKey)?;
    let mut mac = HmacSha256::new_from_slice(&key).map_err(|_| SasError::InvalidKey)?;
    mac.update(message);
    Ok(mac)
}

/// Whether `key_b64` is a usable key (base64), checked before it is handed out or kept.
pub fn check_key(key_b64: &str) -> Result<(), SasError> {
    sign(key_b64, b"").map(|_| ())
}

/// Makes a token for `resource` (unencoded) that expires at `expiry_unix`. `key_name` is the policy
/// name for service tokens (`skn`); device tokens have none.
pub fn generate_token(
    resource: &str,
    key_b64: &str,
    key_name: Option<&str>,
    expiry_unix: u64,
) -> Result<String, SasError> {
    let sr = enc(resource);
    let string_to_sign = format!("{sr}\n{expiry_unix}");
    let signature = BASE64.encode(
        sign(key_b64, string_to_sign.as_bytes())?
            .finalize()
            .into_bytes(),
    );
    let mut token = format!("{PREFIX}sr={sr}&sig={}&se={expiry_unix}", enc(&signature));
    if let Some(name) = key_name {
        token.push_str("&skn=");
        token.push_str(&enc(name));
    }
    Ok(token)
}

/// A parsed token. `Debug` masks the signature.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` exactly as received (normally still percent-encoded); the signature covers this.
    pub resource_raw: String,
    /// `sr` percent-decoded.
    pub resource: String,
    /// `sig` percent-decoded (base64 text).
    pub signature: String,
    pub expiry: u64,
    /// `se` exactly as received; the signature covers this.
    pub expiry_raw: String,
    /// `skn`, decoded: the policy name of a service token.
    pub key_name: Option<String>,
}

impl fmt::Debug for SasToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SasToken")
            .field("resource_raw", &self.resource_raw)
            .field("resource", &self.resource)
            .field("signature", &"***")
            .field("expiry", &self.expiry)
            .field("key_name", &self.key_name)
            .finish()
    }
}

fn set_once<'a>(
    slot: &mut Option<&'a str>,
    name: &'static str,
    value: &'a str,
) -> Result<(), SasError> {
    if slot.replace(value).is_some() {
        return Err(SasError::DuplicateField(name));
    }
    Ok(())
}

fn decode_part(part: &'static str, value: &str) -> Result<String, SasError> {
    dec(value).map_err(|_| SasError::Malformed {
        part,
        problem: "is not valid percent-encoding",
    })
}

impl SasToken {
    /// Parses `SharedAccessSignature sr=..&sig=..&se=..[&skn=..]`, fields in any order. Unknown
    /// fields are ignored; `sr`, `sig` and `se` are required and may appear once each.
    pub fn parse(s: &str) -> Result<Self, SasError> {
        let rest = s.strip_prefix(PREFIX).ok_or(SasError::MissingPrefix)?;
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for segment in rest.split('&').filter(|seg| !seg.is_empty()) {
            let (name, value) = segment.split_once('=').ok_or(SasError::Malformed {
                part: "a field",
                problem: "has no '='",
            })?;
            match name {
                "sr" => set_once(&mut sr, "sr", value)?,
                "sig" => set_once(&mut sig, "sig", value)?,
                "se" => set_once(&mut se, "se", value)?,
                "skn" => set_once(&mut skn, "skn", value)?,
                _ => {}
            }
        }
        let resource_raw = sr.ok_or(SasError::MissingField("sr"))?;
        let signature = sig.ok_or(SasError::MissingField("sig"))?;
        let expiry_raw = se.ok_or(SasError::MissingField("se"))?;
        let not_a_number = SasError::Malformed {
            part: "se",
            problem: "is not a decimal number of seconds",
        };
        if expiry_raw.is_empty() || !expiry_raw.bytes().all(|b| b.is_ascii_digit()) {
            return Err(not_a_number);
        }
        let expiry = expiry_raw.parse::<u64>().map_err(|_| not_a_number)?;
        Ok(Self {
            resource_raw: resource_raw.to_string(),
            resource: decode_part("sr", resource_raw)?,
            signature: decode_part("sig", signature)?,
            expiry,
            expiry_raw: expiry_raw.to_string(),
            key_name: skn.map(|k| decode_part("skn", k)).transpose()?,
        })
    }

    /// Checks the signature against `key_b64`, over `sr` and `se` exactly as received, in
    /// constant time.
    pub fn verify_signature(&self, key_b64: &str) -> Result<(), SasError> {
        let claimed = BASE64
            .decode(&self.signature)
            .map_err(|_| SasError::Malformed {
                part: "sig",
                problem: "is not valid base64",
            })?;
        let string_to_sign = format!("{}\n{}", self.resource_raw, self.expiry_raw);
        sign(key_b64, string_to_sign.as_bytes())?
            .verify_slice(&claimed)
            .map_err(|_| SasError::SignatureMismatch)
    }

    /// A token is valid while `now_unix < expiry`.
    pub fn check_expiry(&self, now_unix: u64) -> Result<(), SasError> {
        if now_unix >= self.expiry {
            return Err(SasError::Expired {
                expiry: self.expiry,
                now: now_unix,
            });
        }
        Ok(())
    }
}

/// The device key of a DPS group enrollment:
/// base64(HMAC-SHA256(base64-decode(group key), registration id)).
pub fn derive_device_key(group_key_b64: &str, registration_id: &str) -> Result<String, SasError> {
    let mac = sign(group_key_b64, registration_id.as_bytes())?;
    Ok(BASE64.encode(mac.finalize().into_bytes()))
}

/// A fresh random 32-byte key, base64-encoded, from the operating system's generator.
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    BASE64.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &str = "c2VjcmV0LWtleS1ieXRlcy1mb3ItdGVzdGluZw==";

    #[test]
    fn resource_for_device_and_module() {
        assert_eq!(device_resource("h", "d1", None), "h/devices/d1");
        assert_eq!(
            device_resource("h", "d1", Some("m")),
            "h/devices/d1/modules/m"
        );
    }

    #[test]
    fn generated_token_has_the_documented_shape() {
        let token = generate_token("h.net/devices/d1", KEY, None, 1_700_000_000).unwrap();
        assert!(token.starts_with("SharedAccessSignature sr=h.net%2Fdevices%2Fd1&sig="));
        assert!(token.ends_with("&se=1700000000"));
        let parsed = SasToken::parse(&token).unwrap();
        assert_eq!(parsed.resource, "h.net/devices/d1");
        assert_eq!(parsed.resource_raw, "h.net%2Fdevices%2Fd1");
        assert_eq!(parsed.key_name, None);
        parsed.verify_signature(KEY).unwrap();

        let token = generate_token("localhost:8443", KEY, Some("iothubowner"), 5).unwrap();
        assert!(token.ends_with("&se=5&skn=iothubowner"));
        assert_eq!(
            SasToken::parse(&token).unwrap().key_name.as_deref(),
            Some("iothubowner")
        );
    }

    #[test]
    fn known_signature_matches_an_independent_computation() {
        // Recompute HMAC-SHA256 by hand over the documented string to sign: enc(resource), newline, expiry.
        let key = BASE64.encode(b"key");
        let token = generate_token("h/devices/d", &key, None, 1).unwrap();
        let parsed = SasToken::parse(&token).unwrap();
        let mut mac = HmacSha256::new_from_slice(b"key").unwrap();
        mac.update(b"h%2Fdevices%2Fd\n1");
        assert_eq!(parsed.signature, BASE64.encode(mac.finalize().into_bytes()));
    }

    #[test]
    fn verifies_over_sr_as_received_even_when_unencoded() {
        // Some service SDKs sign the raw host name.
        let mac = sign(KEY, b"localhost:8443\n99").unwrap();
        let sig = BASE64.encode(mac.finalize().into_bytes());
        let token = format!(
            "SharedAccessSignature skn=service&se=99&sig={}&sr=localhost:8443",
            enc(&sig)
        );
        let parsed = SasToken::parse(&token).unwrap();
        assert_eq!(parsed.resource, "localhost:8443");
        parsed.verify_signature(KEY).unwrap();
    }

    #[test]
    fn parse_errors() {
        assert_eq!(
            SasToken::parse("sr=a&sig=b&se=1"),
            Err(SasError::MissingPrefix)
        );
        assert_eq!(
            SasToken::parse("SharedAccessSignature sig=b&se=1"),
            Err(SasError::MissingField("sr"))
        );
        assert_eq!(
            SasToken::parse("SharedAccessSignature sr=a&se=1"),
            Err(SasError::MissingField("sig"))
        );
        assert_eq!(
            SasToken::parse("SharedAccessSignature sr=a&sig=b"),
            Err(SasError::MissingField("se"))
        );
        assert_eq!(
            SasToken::parse("SharedAccessSignature sr=a&sig=b&se=1&sr=c"),
            Err(SasError::DuplicateField("sr"))
        );
        for se in ["soon", "", "+5", "-1", "99999999999999999999999"] {
            let err =
                SasToken::parse(&format!("SharedAccessSignature sr=a&sig=b&se={se}")).unwrap_err();
            assert!(
                matches!(err, SasError::Malformed { part: "se", .. }),
                "{se}: {err}"
            );
        }
        assert!(matches!(
            SasToken::parse("SharedAccessSignature sr=a&sig&se=1"),
            Err(SasError::Malformed {
                part: "a field",
                ..
            })
        ));
        assert!(matches!(
            SasToken::parse("SharedAccessSignature sr=a%zz&sig=b&se=1"),
            Err(SasError::Malformed { part: "sr", .. })
        ));
    }

    #[test]
    fn verify_errors_never_show_the_signature() {
        let token = generate_token("h/devices/d1", KEY, None, 10).unwrap();
        let parsed = SasToken::parse(&token).unwrap();
        let other = generate_key();
        let err = parsed.verify_signature(&other).unwrap_err();
        assert_eq!(err, SasError::SignatureMismatch);
        assert!(!err.to_string().contains(&parsed.signature));
        assert!(!format!("{parsed:?}").contains(&parsed.signature));
        assert_eq!(parsed.verify_signature("***"), Err(SasError::InvalidKey));
        let bad_sig = SasToken::parse("SharedAccessSignature sr=a&sig=%21%21&se=1").unwrap();
        assert!(matches!(
            bad_sig.verify_signature(KEY),
            Err(SasError::Malformed { part: "sig", .. })
        ));
        assert_eq!(
            generate_token("r", "not base64!", None, 1),
            Err(SasError::InvalidKey)
        );
    }

    #[test]
    fn tampering_with_expiry_or_resource_fails() {
        let token = generate_token("h/devices/d1", KEY, None, 10).unwrap();
        let longer = token.replace("se=10", "se=9999");
        assert_eq!(
            SasToken::parse(&longer).unwrap().verify_signature(KEY),
            Err(SasError::SignatureMismatch)
        );
        let other = token.replace("d1", "d2");
        assert_eq!(
            SasToken::parse(&other).unwrap().verify_signature(KEY),
            Err(SasError::SignatureMismatch)
        );
        // Leading zeros are signed as received, so they do not alias the same signature.
        let zeros = token.replace("se=10", "se=010");
        assert_eq!(
            SasToken::parse(&zeros).unwrap().verify_signature(KEY),
            Err(SasError::SignatureMismatch)
        );
    }

    #[test]
    fn expiry() {
        let parsed = SasToken::parse(&generate_token("r", KEY, None, 100).unwrap()).unwrap();
        assert_eq!(parsed.check_expiry(99), Ok(()));
        assert_eq!(
            parsed.check_expiry(100),
            Err(SasError::Expired {
                expiry: 100,
                now: 100
            })
        );
    }

    #[test]
    fn dps_group_enrollment_vector() {
        let key = derive_device_key(
            "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==",
            "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6",
        )
        .unwrap();
        assert_eq!(key, "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=");
        assert_eq!(derive_device_key("!!", "x"), Err(SasError::InvalidKey));
    }

    #[test]
    fn generated_keys_are_32_random_bytes() {
        let a = generate_key();
        assert_eq!(BASE64.decode(&a).unwrap().len(), 32);
        assert_ne!(a, generate_key());
    }

    proptest! {
        #[test]
        fn generate_parse_verify_round_trip(
            resource in any::<String>(),
            key_bytes in proptest::collection::vec(any::<u8>(), 1..80),
            key_name in proptest::option::of(any::<String>()),
            expiry in any::<u64>(),
            flip in any::<prop::sample::Index>(),
        ) {
            let key = BASE64.encode(&key_bytes);
            let token = generate_token(&resource, &key, key_name.as_deref(), expiry).unwrap();
            let parsed = SasToken::parse(&token).unwrap();
            prop_assert_eq!(&parsed.resource, &resource);
            prop_assert_eq!(parsed.expiry, expiry);
            prop_assert_eq!(&parsed.key_name, &key_name);
            prop_assert_eq!(parsed.verify_signature(&key), Ok(()));

            // Flip one bit of the signature: verification must fail.
            let mut sig = BASE64.decode(&parsed.signature).unwrap();
            let i = flip.index(sig.len());
            sig[i] ^= 1;
            let tampered = SasToken { signature: BASE64.encode(&sig), ..parsed };
            prop_assert_eq!(tampered.verify_signature(&key), Err(SasError::SignatureMismatch));
        }
    }
}
