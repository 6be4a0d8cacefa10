//! Percent-encoding as IoT Hub uses it in SAS tokens, property bags and topic queries.
//!
//! `enc` escapes every byte except the RFC 3986 unreserved set `A-Z a-z 0-9 - _ . ~`; `dec` is its
//! strict inverse: a `%` must be followed by two hex digits, `+` stays `+` (it is not a space), and
//! the result must be valid UTF-8.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Everything but `A-Z a-z 0-9 - _ . ~` is escaped.
const ENCODE_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Why a percent-encoded string could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A `%` not followed by two hex digits.
    #[error("invalid percent-escape at byte {position}")]
    InvalidEscape { position: usize },
    /// The decoded bytes are not UTF-8.
    #[error("percent-decoded text is not valid UTF-8")]
    InvalidUtf8,
}

/// Percent-encodes everything except `A-Z a-z 0-9 - _ . ~`.
pub fn enc(s: &str) -> String {
    utf8_percent_encode(s, ENCODE_SET).to_string()
}

/// Strict percent-decoding: `%XX` escapes only, `+` is left alone, the result must be UTF-8.
pub fn dec(s: &str) -> Result<String, DecodeError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = bytes.get(i + 1).and_then(|b| hex_value(*b));
            let lo = bytes.get(i + 2).and_then(|b| hex_value(*b));
            match (hi, lo) {
                (Some(hi), Some(lo)) => out.push(hi * 16 + lo),
                _ => return Err(DecodeError::InvalidEscape { position: i }),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| DecodeError::InvalidUtf8)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn enc_keeps_unreserved_and_escapes_the_rest() {
        assert_eq!(enc("AZaz09-_.~"), "AZaz09-_.~");
        assert_eq!(enc("host/devices/d1"), "host%2Fdevices%2Fd1");
        assert_eq!(enc("$.mid"), "%24.mid");
        assert_eq!(enc("a b+c=d&e"), "a%20b%2Bc%3Dd%26e");
        assert_eq!(enc("é"), "%C3%A9");
    }

    #[test]
    fn dec_decodes_both_hex_cases_and_leaves_plus() {
        assert_eq!(dec("host%2fdevices%2Fd1").unwrap(), "host/devices/d1");
        assert_eq!(dec("a+b").unwrap(), "a+b");
        assert_eq!(dec("%C3%A9").unwrap(), "é");
        assert_eq!(dec("").unwrap(), "");
    }

    #[test]
    fn dec_rejects_bad_escapes() {
        assert_eq!(dec("ab%"), Err(DecodeError::InvalidEscape { position: 2 }));
        assert_eq!(dec("%4"), Err(DecodeError::InvalidEscape { position: 0 }));
        assert_eq!(dec("x%zz"), Err(DecodeError::InvalidEscape { position: 1 }));
    }

    #[test]
    fn dec_rejects_invalid_utf8() {
        assert_eq!(dec("%FF%FE"), Err(DecodeError::InvalidUtf8));
    }

    proptest! {
        #[test]
        fn enc_dec_round_trip(s in any::<String>()) {
            prop_assert_eq!(dec(&enc(&s)).unwrap(), s);
        }

        #[test]
        fn enc_output_is_only_unreserved_or_escapes(s in any::<String>()) {
            let e = enc(&s);
            prop_assert!(e.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~%".contains(&b)));
        }
    }
}
