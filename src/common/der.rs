//! Just enough of a DER reader to describe a certificate: subject (and its common name),
//! issuer, notBefore and notAfter, and its SHA-1 and SHA-256 thumbprints. Doctor shows the
//! hub's certificate with it and warns before a certificate expires; the agent checks its own
//! X.509 certificate's dates at start; the hub reads a device certificate's common name.
//! Signatures are never checked here (rustls and webpki do that). Anything it does not
//! understand gives `None`, never a failed check.
//!
//! Pure: bytes in, a summary out.

/// What the check shows of a certificate.
#[derive(Debug, PartialEq)]
pub struct CertificateSummary {
    pub subject: String,
    /// The subject's first common name (CN), if it has one.
    pub common_name: Option<String>,
    pub issuer: String,
    pub not_before: chrono::DateTime<chrono::Utc>,
    pub not_after: chrono::DateTime<chrono::Utc>,
}

/// Reads subject, issuer and notAfter from an X.509 certificate (DER); rustls has verified
/// it already, this only describes it. `None` if it does not parse.
pub fn certificate_summary(der: &[u8]) -> Option<CertificateSummary> {
    let (_, certificate, _) = der_read(der)?;
    let (_, mut tbs, _) = der_read(certificate)?;
    let mut next = || {
        let (tag, content, rest) = der_read(tbs)?;
        tbs = rest;
        Some((tag, content))
    };
    let (mut tag, _) = next()?;
    if tag == 0xa0 {
        // [0] version, then the serial number.
        (tag, _) = next()?;
    }
    if tag != 0x02 {
        return None;
    }
    let _signature = next()?;
    let (_, issuer) = next()?;
    let (_, validity) = next()?;
    let (_, subject) = next()?;
    let (before_tag, not_before, after_not_before) = der_read(validity)?;
    let (time_tag, not_after, _) = der_read(after_not_before)?;
    Some(CertificateSummary {
        subject: der_name(subject)?,
        common_name: der_common_name(subject),
        issuer: der_name(issuer)?,
        not_before: der_time(before_tag, not_before)?,
        not_after: der_time(time_tag, not_after)?,
    })
}

/// One attribute of a certificate's subject, as encoded: its OID's arcs, the string's DER
/// tag (UTF8String 0x0c, PrintableString 0x13, ...) and its bytes. What a signer needs to
/// name this certificate as the issuer byte for byte (the fleet's in-memory CA).
#[derive(Debug, PartialEq)]
pub struct NameAttribute {
    pub oid: Vec<u64>,
    pub tag: u8,
    pub value: Vec<u8>,
}

/// The subject of a certificate (DER), attribute by attribute in order; `None` if it does
/// not parse or has a multi-valued RDN (which the fleet's signer cannot reproduce).
pub fn subject_attributes(der: &[u8]) -> Option<Vec<NameAttribute>> {
    let (_, certificate, _) = der_read(der)?;
    let (_, tbs, _) = der_read(certificate)?;
    let (mut tag, _, mut rest) = der_read(tbs)?;
    if tag == 0xa0 {
        // [0] version, then the serial number.
        (tag, _, rest) = der_read(rest)?;
    }
    if tag != 0x02 {
        return None;
    }
    let (_, _signature, rest) = der_read(rest)?;
    let (_, _issuer, rest) = der_read(rest)?;
    let (_, _validity, rest) = der_read(rest)?;
    let (_, mut name, _) = der_read(rest)?;
    let mut attributes = Vec::new();
    while !name.is_empty() {
        let (_, set, after) = der_read(name)?;
        name = after;
        let (_, attribute, more) = der_read(set)?;
        if !more.is_empty() {
            return None;
        }
        let (_, oid, value) = der_read(attribute)?;
        let (tag, text, _) = der_read(value)?;
        attributes.push(NameAttribute {
            oid: oid_arcs(oid)?,
            tag,
            value: text.to_vec(),
        });
    }
    Some(attributes)
}

/// The arcs of an OBJECT IDENTIFIER's content (`55 04 03` -> 2.5.4.3).
fn oid_arcs(content: &[u8]) -> Option<Vec<u64>> {
    let mut arcs = Vec::new();
    let mut value: u64 = 0;
    for &byte in content {
        value = value.checked_mul(128)? | u64::from(byte & 0x7f);
        if byte & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (value / 40).min(2);
                arcs.push(first);
                arcs.push(value - first * 40);
            } else {
                arcs.push(value);
            }
            value = 0;
        }
    }
    (!arcs.is_empty()).then_some(arcs)
}

/// The SHA-1 thumbprint of a certificate (DER) as IoT Hub shows it: 40 upper-case hex digits.
pub fn thumbprint_sha1(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der);
    hex_upper(digest.as_ref())
}

/// The SHA-256 thumbprint of a certificate (DER): 64 upper-case hex digits.
pub fn thumbprint_sha256(der: &[u8]) -> String {
    use sha2::Digest;
    hex_upper(&sha2::Sha256::digest(der))
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// The value of the first CN attribute of a Name.
fn der_common_name(mut name: &[u8]) -> Option<String> {
    while !name.is_empty() {
        let (_, set, rest) = der_read(name)?;
        name = rest;
        let (_, attribute, _) = der_read(set)?;
        let (_, oid, value) = der_read(attribute)?;
        if oid == [0x55, 0x04, 0x03] {
            let (_, text, _) = der_read(value)?;
            return Some(String::from_utf8_lossy(text).into_owned());
        }
    }
    None
}

/// One DER element: (tag, content, what follows).
fn der_read(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let length = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let mut length = 0usize;
        for &byte in &rest[..count] {
            length = (length << 8) | usize::from(byte);
        }
        rest = &rest[count..];
        length
    };
    if rest.len() < length {
        return None;
    }
    Some((tag, &rest[..length], &rest[length..]))
}

/// A Name as `CN=..., O=...` (the usual attributes; others are skipped).
fn der_name(mut name: &[u8]) -> Option<String> {
    let mut parts = Vec::new();
    while !name.is_empty() {
        let (_, set, rest) = der_read(name)?;
        name = rest;
        let (_, attribute, _) = der_read(set)?;
        let (_, oid, value) = der_read(attribute)?;
        let (_, text, _) = der_read(value)?;
        let label = match oid {
            [0x55, 0x04, 0x03] => "CN",
            [0x55, 0x04, 0x06] => "C",
            [0x55, 0x04, 0x07] => "L",
            [0x55, 0x04, 0x08] => "ST",
            [0x55, 0x04, 0x0a] => "O",
            [0x55, 0x04, 0x0b] => "OU",
            _ => continue,
        };
        parts.push(format!("{label}={}", String::from_utf8_lossy(text)));
    }
    if parts.is_empty() {
        Some("(no name)".to_string())
    } else {
        Some(parts.join(", "))
    }
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn der_time(tag: u8, content: &[u8]) -> Option<chrono::DateTime<chrono::Utc>> {
    let text = std::str::from_utf8(content).ok()?;
    let full = match tag {
        0x17 => {
            let year: u32 = text.get(..2)?.parse().ok()?;
            let century = if year >= 50 { "19" } else { "20" };
            format!("{century}{text}")
        }
        0x18 => text.to_string(),
        _ => return None,
    };
    let naive = chrono::NaiveDateTime::parse_from_str(&full, "%Y%m%d%H%M%SZ").ok()?;
    Some(naive.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_a_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "doctor test");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "simdevice");
        params.not_after = rcgen::date_time_ymd(2049, 12, 31);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.clone().self_signed(&key).unwrap();
        let summary = certificate_summary(cert.der()).unwrap();
        assert_eq!(summary.subject, "CN=doctor test, O=simdevice");
        assert_eq!(summary.common_name.as_deref(), Some("doctor test"));
        assert!(summary.not_before < summary.not_after);
        assert_eq!(summary.issuer, summary.subject);
        assert_eq!(
            summary.not_after.format("%Y-%m-%d").to_string(),
            "2049-12-31"
        );
        params.not_after = rcgen::date_time_ymd(2051, 1, 2);
        let cert = params.self_signed(&key).unwrap();
        let summary = certificate_summary(cert.der()).unwrap();
        assert_eq!(
            summary.not_after.format("%Y-%m-%d").to_string(),
            "2051-01-02"
        );
        assert_eq!(certificate_summary(&cert.der()[..40]), None);
    }

    #[test]
    fn thumbprints_are_upper_case_hex_of_the_der() {
        // Known digests of the bytes "abc".
        assert_eq!(
            thumbprint_sha1(b"abc"),
            "A9993E364706816ABA3E25717850C26C9CD0D89D"
        );
        assert_eq!(
            thumbprint_sha256(b"abc"),
            "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD"
        );
    }
}
