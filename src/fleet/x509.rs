//! `fleet --x509-ca FILE --x509-ca-key FILE`: an X.509 fleet. Each device gets a certificate
//! issued in memory at start (CN = its device id, client-auth usage, ECDSA P-256, valid from
//! a day ago for [`VALIDITY_DAYS`]) signed by the given CA, and presents it (with the CA
//! certificate as its chain) to DPS and to the hub. Nothing is written to disk.
//!
//! rcgen 0.13 signs with an issuer `Certificate`, so the CA is rebuilt from its key and its
//! subject copied attribute by attribute (same OIDs, same string types, same order): the
//! issuer name of every device certificate is then the CA's subject byte for byte, which is
//! how a verifier finds the CA. The authority key identifier is left out (rcgen would compute
//! it its own way, which need not be the CA's).
//!
//! Memory: a device holds its certificate (about 400 bytes of DER) and its signing key, shared
//! with its TLS configuration (a clone of the fleet's, which shares the roots and verifier).
//! Uses rcgen and rustls only; knows nothing of connections.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Datelike;
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

/// How long an issued device certificate is valid, in days from today.
pub const VALIDITY_DAYS: i64 = 365;

#[derive(Debug, thiserror::Error)]
pub enum FleetX509Error {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("the subject of the CA certificate {} cannot be copied into its devices' certificates (a multi-valued or repeated attribute, or an unusual string type)", path.display())]
    Subject { path: PathBuf },
    /// The key file is not a PKCS#8 PEM key (the text is never shown: it is a secret).
    #[error("{} is not a PKCS#8 PEM private key (convert one with `openssl pkcs8 -topk8 -nocrypt`)", path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("the key in {} is not the CA certificate's key", key.display())]
    KeyMismatch { key: PathBuf },
    #[error("cannot issue the certificate of device {device_id}")]
    Issue {
        device_id: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot use the certificate of device {device_id} for TLS")]
    Tls {
        device_id: String,
        #[source]
        source: rustls::Error,
    },
}

/// The CA the fleet issues its devices' certificates with.
pub struct FleetCa {
    /// The CA rebuilt for signing: its subject and key (its own signature is not used).
    issuer: rcgen::Certificate,
    key: KeyPair,
    /// The CA certificate as given, sent after each device's certificate.
    der: CertificateDer<'static>,
}

impl std::fmt::Debug for FleetCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCa").finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, FleetX509Error> {
    std::fs::read_to_string(path).map_err(|source| FleetX509Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The CA's subject as rcgen writes it, or `None` when it cannot be reproduced exactly.
fn copied_subject(der: &[u8]) -> Option<DistinguishedName> {
    let mut name = DistinguishedName::new();
    let mut seen = Vec::new();
    for attribute in crate::common::der::subject_attributes(der)? {
        let text = || std::str::from_utf8(&attribute.value).ok();
        let value = match attribute.tag {
            0x0c => DnValue::Utf8String(text()?.to_string()),
            0x13 => DnValue::PrintableString(text()?.try_into().ok()?),
            0x16 => DnValue::Ia5String(text()?.try_into().ok()?),
            0x14 => DnValue::TeletexString(text()?.try_into().ok()?),
            _ => return None,
        };
        let ty = DnType::from_oid(&attribute.oid);
        // rcgen keeps one value per attribute type.
        if seen.contains(&ty) {
            return None;
        }
        seen.push(ty.clone());
        name.push(ty, value);
    }
    Some(name)
}

impl FleetCa {
    /// Reads the CA certificate (the first of the PEM file) and its PKCS#8 key, checking that
    /// they belong together.
    pub fn load(certificate: &Path, key: &Path) -> Result<FleetCa, FleetX509Error> {
        let pem = read(certificate)?;
        let der = crate::common::pem::parse_pem_certificates(&pem)
            .ok()
            .and_then(|certs| certs.into_iter().next())
            .ok_or_else(|| FleetX509Error::NoCertificate {
                path: certificate.to_path_buf(),
            })?;
        let subject = copied_subject(&der).ok_or_else(|| FleetX509Error::Subject {
            path: certificate.to_path_buf(),
        })?;
        let key_pair = KeyPair::from_pem(&read(key)?).map_err(|source| FleetX509Error::Key {
            path: key.to_path_buf(),
            source,
        })?;
        if !spki_contains(&der, &key_pair.public_key_der()) {
            return Err(FleetX509Error::KeyMismatch {
                key: key.to_path_buf(),
            });
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = subject;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = params
            .self_signed(&key_pair)
            .map_err(|source| FleetX509Error::Key {
                path: key.to_path_buf(),
                source,
            })?;
        Ok(FleetCa {
            issuer,
            key: key_pair,
            der,
        })
    }

    /// A certificate for `device_id` with a new key, as the device's TLS client identity.
    pub fn issue(&self, device_id: &str) -> Result<Arc<CertifiedKey>, FleetX509Error> {
        let issue_error = |source| FleetX509Error::Issue {
            device_id: device_id.to_string(),
            source,
        };
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, device_id);
        params.distinguished_name = name;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = false;
        let today = chrono::Utc::now().date_naive();
        let ymd = |d: chrono::NaiveDate| date_time_ymd(d.year(), d.month() as u8, d.day() as u8);
        params.not_before = ymd(today - chrono::Duration::days(1));
        params.not_after = ymd(today + chrono::Duration::days(VALIDITY_DAYS));
        let key = KeyPair::generate().map_err(issue_error)?;
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(issue_error)?;
        let tls_error = |source| FleetX509Error::Tls {
            device_id: device_id.to_string(),
            source,
        };
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing =
            rustls::crypto::ring::sign::any_supported_type(&private).map_err(tls_error)?;
        Ok(Arc::new(CertifiedKey::new(
            vec![cert.der().clone(), self.der.clone()],
            signing,
        )))
    }
}

/// Whether the certificate `der` carries the public key `spki` (its SubjectPublicKeyInfo).
fn spki_contains(der: &[u8], spki: &[u8]) -> bool {
    !spki.is_empty() && der.windows(spki.len()).any(|w| w == spki)
}

/// The client certificate of one device: always the same one.
#[derive(Debug)]
struct OneCertificate(Arc<CertifiedKey>);

impl ResolvesClientCert for OneCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `base` (the fleet's shared configuration) presenting `certificate` as the client's.
pub fn with_certificate(
    base: &rustls::ClientConfig,
    certificate: Arc<CertifiedKey>,
) -> Arc<rustls::ClientConfig> {
    let mut config = base.clone();
    config.client_auth_cert_resolver = Arc::new(OneCertificate(certificate));
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA with a subject of two string types, written as PEM files.
    fn ca_files(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(
            DnType::CountryName,
            DnValue::PrintableString("NL".try_into().unwrap()),
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Contoso");
        params
            .distinguished_name
            .push(DnType::CommonName, "fleet CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&key).unwrap();
        let (c, k) = (dir.join("ca.pem"), dir.join("ca.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k, cert.der().to_vec())
    }

    #[test]
    fn issued_certificates_name_the_ca_byte_for_byte_and_verify_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, ca_der) = ca_files(dir.path());
        let ca = FleetCa::load(&cert, &key).unwrap();
        let issued = ca.issue("door-0042").unwrap();
        let leaf = &issued.cert[0];
        let summary = crate::common::der::certificate_summary(leaf).unwrap();
        assert_eq!(summary.common_name.as_deref(), Some("door-0042"));
        let ca_subject = crate::common::der::certificate_summary(&ca_der)
            .unwrap()
            .subject;
        assert_eq!(summary.issuer, ca_subject);
        assert!(ca_subject.contains("C=NL") && ca_subject.contains("O=Contoso"));
        // webpki finds the CA by the issuer name and checks the signature.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca_der)).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        verifier
            .verify_client_cert(leaf, &issued.cert[1..], now)
            .expect("chains to the CA");
    }

    #[test]
    fn a_key_that_is_not_the_cas_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _, _) = ca_files(dir.path());
        let other = dir.path().join("other.key");
        std::fs::write(&other, KeyPair::generate().unwrap().serialize_pem()).unwrap();
        assert!(matches!(
            FleetCa::load(&cert, &other),
            Err(FleetX509Error::KeyMismatch { .. })
        ));
        let junk = dir.path().join("junk.key");
        std::fs::write(&junk, "not a key").unwrap();
        let error = FleetCa::load(&cert, &junk).unwrap_err();
        assert!(matches!(error, FleetX509Error::Key { .. }), "{error}");
        assert!(!error.to_string().contains("not a key"));
    }
}
