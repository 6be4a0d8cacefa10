//! The `Date` header of one HTTPS answer, for `simdevice doctor`'s clock check: a `HEAD /` over
//! tokio-rustls, the status line and headers read, the connection closed.
//!
//! Written by hand rather than with an HTTP client crate so that the device-only build carries
//! no HTTP framework for one header of one request. It reads at most [`MAX_HEAD`] bytes.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The longest answer head read.
pub const MAX_HEAD: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpsDateError {
    #[error("{host} is not a usable TLS server name")]
    ServerName {
        host: String,
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connection failed")]
    Io(#[from] std::io::Error),
    #[error("the answer is not HTTP")]
    NotHttp,
    #[error("the answer has no usable Date header")]
    NoDate,
}

/// Sends `HEAD /` to `host:port` and returns the answer's `Date`, within `timeout` in all.
pub async fn fetch(
    tls: Arc<rustls::ClientConfig>,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<DateTime<Utc>, HttpsDateError> {
    let server_name =
        rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|source| {
            HttpsDateError::ServerName {
                host: host.to_owned(),
                source,
            }
        })?;
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let exchange = async {
        let tcp = TcpStream::connect((host, port)).await?;
        let mut stream = TlsConnector::from(tls).connect(server_name, tcp).await?;
        let request = format!(
            "HEAD / HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: simdevice-doctor\r\n\
             Connection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        stream.flush().await?;
        let mut head = Vec::new();
        let mut chunk = [0u8; 2048];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(head)
    };
    let head = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HttpsDateError::Timeout(timeout))??;
    date_of(&String::from_utf8_lossy(&head))
}

/// The `Date` of an HTTP answer head (RFC 7231 IMF-fixdate, which RFC 2822 parsing accepts).
fn date_of(head: &str) -> Result<DateTime<Utc>, HttpsDateError> {
    let mut lines = head.split("\r\n");
    if !lines
        .next()
        .is_some_and(|status| status.starts_with("HTTP/1."))
    {
        return Err(HttpsDateError::NotHttp);
    }
    lines
        .take_while(|line| !line.is_empty())
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("date"))
        .and_then(|(_, value)| DateTime::parse_from_rfc2822(value.trim()).ok())
        .map(|date| date.to_utc())
        .ok_or(HttpsDateError::NoDate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_date_header_is_found_in_any_case_and_refused_when_absent_or_bad() {
        let head = "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nDATE: Tue, 01 Dec 2026 11:06:16 GMT\r\n\r\n";
        assert_eq!(
            date_of(head).expect("date").to_rfc3339(),
            "2026-12-01T11:06:16+00:00"
        );
        assert!(matches!(
            date_of("HTTP/1.1 200 OK\r\nserver: x\r\n\r\n"),
            Err(HttpsDateError::NoDate)
        ));
        assert!(matches!(
            date_of("HTTP/1.1 200 OK\r\ndate: yesterday\r\n\r\n"),
            Err(HttpsDateError::NoDate)
        ));
        assert!(matches!(
            date_of("SSH-2.0-OpenSSH\r\n"),
            Err(HttpsDateError::NotHttp)
        ));
    }
}
