//! PEM helpers shared by the agent (its `ca_file`), the configuration checks, `doctor` and the
//! hub: certificates out of PEM text.

use rustls::pki_types::CertificateDer;

/// Every `CERTIFICATE` block of `pem` (other blocks are skipped); an error for a malformed one.
pub fn parse_pem_certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, std::io::Error> {
    rustls_pemfile::certs(&mut pem.as_bytes()).collect()
}
