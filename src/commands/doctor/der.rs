//! Just enough of a DER reader to describe the hub's certificate: subject, issuer and notAfter.
//! rustls has verified the certificate already; this only reads it to show it and to warn
//! before it expires. Anything it does not understand gives `None`, never a failed check.
//!
//! Pure: bytes in, a summary out.

/// What the check shows of a certificate.
#[derive(Debug, PartialEq)]
pub struct CertificateSummary {
    pub subject: String,
    pub issuer: String,
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
    let (_, _, after_not_before) = der_read(validity)?;
    let (time_tag, not_after, _) = der_read(after_not_before)?;
    Some(CertificateSummary {
        subject: der_name(subject)?,
        issuer: der_name(issuer)?,
        not_after: der_time(time_tag, not_after)?,
    })
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
}
