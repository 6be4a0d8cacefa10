//! The hub's TLS identity: a local certificate authority kept in the state directory and a
//! server certificate signed by it on every start. Clients are asked for a certificate, not
//! required to send one (X.509 devices, `x509.rs`).
//!
//! Clients trust `ca.pem`; the CA key never leaves the state directory (mode 0600, written
//! through `hub::private`). The server
//! certificate is re-issued at each start so that new `--hostname` names take effect at once.
//! Keys are ECDSA P-256: the cheapest handshake for rustls (see shared/docs/performance.md).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Datelike;
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::private;

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";
const CA_COMMON_NAME: &str = "simdevice local IoT Hub CA";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read or write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("certificate generation failed")]
    Generate(#[from] rcgen::Error),
    #[error("the TLS configuration was refused")]
    Rustls(#[from] rustls::Error),
    #[error("{path} is not a usable CA key")]
    BadCaKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
}

/// What the listeners need: the server configuration, and where clients find the CA.
pub struct TlsIdentity {
    pub server_config: Arc<rustls::ServerConfig>,
    pub ca_file: PathBuf,
    pub ca_pem: String,
}

/// Loads the CA from `state_dir` (creating it on first use) and issues a fresh server
/// certificate for `localhost`, `127.0.0.1`, `::1` and every name in `extra_names`.
pub fn load_or_create(state_dir: &Path, extra_names: &[String]) -> Result<TlsIdentity, TlsError> {
    let ca_file = state_dir.join(CA_CERT_FILE);
    let ca_key_file = state_dir.join(CA_KEY_FILE);
    let (ca_key, ca_pem) = if ca_key_file.exists() && ca_file.exists() {
        let key_pem = read(&ca_key_file)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| TlsError::BadCaKey {
            path: ca_key_file.clone(),
            source,
        })?;
        (key, read(&ca_file)?)
    } else {
        let key = KeyPair::generate()?;
        let cert = ca_params().self_signed(&key)?;
        write_private(&ca_key_file, &key.serialize_pem())?;
        write(&ca_file, &cert.pem())?;
        (key, cert.pem())
    };
    // rcgen signs with a `Certificate` value; rebuilding it from the same parameters and key
    // gives the same subject and key identifier as the stored ca.pem, so what it signs chains
    // to the file clients trust.
    let ca_cert = ca_params().self_signed(&ca_key)?;

    let server_key = KeyPair::generate()?;
    let server_cert = server_params(extra_names)?.signed_by(&server_key, &ca_cert, &ca_key)?;
    let chain = vec![server_cert.der().clone(), ca_cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let provider = server_provider();
    // Every client is asked for a certificate and none is required: X.509 devices send one,
    // SAS devices and service clients none (`x509::AskForClientCertificate`).
    let client_auth = super::x509::AskForClientCertificate::new(&provider);
    let mut server_config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(client_auth)
        .with_single_cert(chain, key)?;
    server_config.ignore_client_order = true;
    Ok(TlsIdentity {
        server_config: Arc::new(server_config),
        ca_file,
        ca_pem,
    })
}

/// aws-lc with the SHA-256 suites first, chosen whatever the client's order (the server's
/// choice, as TLS allows): their key schedule runs on the CPU's SHA-256 instructions where
/// SHA-384 has none, and its software block function was the hub's busiest symbol in a
/// connect storm (perf, during scripts/bench-fleet's ramp). Every suite stays offered.
fn server_provider() -> rustls::crypto::CryptoProvider {
    use rustls::CipherSuite::{TLS13_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256};
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    let first = |suite: &rustls::SupportedCipherSuite| {
        !matches!(
            suite.suite(),
            TLS13_AES_128_GCM_SHA256 | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        )
    };
    // A stable sort: the SHA-256 suites move to the front, the rest keep their order.
    provider.cipher_suites.sort_by_key(first);
    provider
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = date_time_ymd(2024, 1, 1);
    params.not_after = date_time_ymd(2049, 12, 31);
    params
}

fn server_params(extra_names: &[String]) -> Result<CertificateParams, TlsError> {
    let mut names = vec!["localhost".to_string()];
    names.extend(extra_names.iter().cloned());
    let mut params = CertificateParams::new(names)?;
    for ip in ["127.0.0.1", "::1"] {
        let addr = ip.parse().expect("a literal IP address");
        params.subject_alt_names.push(SanType::IpAddress(addr));
    }
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "localhost");
    params.distinguished_name = name;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let year = chrono::Utc::now().year();
    params.not_before = date_time_ymd(year - 1, 1, 1);
    params.not_after = date_time_ymd(year + 2, 1, 1);
    Ok(params)
}

fn read(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, text: &str) -> Result<(), TlsError> {
    fs::write(path, text).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes a secret readable by its owner only (`hub::private`).
fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    private::write_file(path, text.as_bytes()).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}
