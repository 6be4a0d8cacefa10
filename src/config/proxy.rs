//! The HTTP proxy of `[connection] proxy`: its URL parsed into a [`Proxy`] (credentials kept
//! as a secret, never shown), and the choice between the configured proxy and the
//! environment's (`HTTPS_PROXY`, `https_proxy`, minus the hosts `NO_PROXY` exempts).
//!
//! Pure: the environment is passed in, nothing is dialled.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use super::identity::split_host_port;
use super::Secret;

/// The environment variables a proxy may come from, in the order they are read.
pub const PROXY_ENV: [&str; 2] = ["HTTPS_PROXY", "https_proxy"];
/// The environment variables of the hosts reached without the proxy.
pub const NO_PROXY_ENV: [&str; 2] = ["NO_PROXY", "no_proxy"];

/// An HTTP proxy that tunnels with CONNECT. `Display` and `Debug` show `http://host:port`,
/// with `***@` in place of any credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    pub host: String,
    pub port: u16,
    /// `user:password` from the URL, for `Proxy-Authorization: Basic`.
    pub credentials: Option<Secret>,
}

/// Why a proxy URL was refused. Never quotes the URL (it may hold a password).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyUrlError {
    #[error("the proxy must be an http:// URL (CONNECT over plain HTTP), not {scheme}://")]
    Scheme { scheme: String },
    #[error("the proxy URL must start with http://")]
    NoScheme,
    #[error("the proxy URL has no host")]
    NoHost,
    #[error("the proxy URL's port is not a number from 1 to 65535")]
    Port,
    #[error("the proxy URL may hold only http://[user:password@]host[:port][/]")]
    Path,
}

impl Proxy {
    /// `http://[user:password@]host[:port][/]`; the port defaults to 80 (HTTP's), an IPv6
    /// literal comes in brackets. Percent-encoded credentials are sent as written.
    pub fn parse(url: &str) -> Result<Proxy, ProxyUrlError> {
        let url = url.trim();
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(ProxyUrlError::NoScheme);
        };
        if !scheme.eq_ignore_ascii_case("http") {
            return Err(ProxyUrlError::Scheme {
                scheme: scheme.to_ascii_lowercase(),
            });
        }
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#']) {
            return Err(ProxyUrlError::Path);
        }
        let (credentials, host_port) = match authority.rsplit_once('@') {
            Some((credentials, host_port)) => (Some(credentials), host_port),
            None => (None, authority),
        };
        if host_port.is_empty() || host_port.starts_with(':') {
            return Err(ProxyUrlError::NoHost);
        }
        let (host, port) = split_host_port(host_port).map_err(|_| ProxyUrlError::Port)?;
        if host.is_empty() {
            return Err(ProxyUrlError::NoHost);
        }
        let port = match port {
            Some(0) => return Err(ProxyUrlError::Port),
            Some(port) => port,
            None => 80,
        };
        Ok(Proxy {
            host: host.to_string(),
            port,
            credentials: credentials
                .filter(|c| !c.is_empty())
                .map(|c| Secret::new(c.to_string())),
        })
    }

    /// The `Proxy-Authorization` header's value, when the URL had credentials.
    pub fn authorization(&self) -> Option<String> {
        self.credentials
            .as_ref()
            .map(|c| format!("Basic {}", BASE64.encode(c.expose())))
    }
}

impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = if self.credentials.is_some() {
            "***@"
        } else {
            ""
        };
        if self.host.contains(':') {
            write!(f, "http://{auth}[{}]:{}", self.host, self.port)
        } else {
            write!(f, "http://{auth}{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The first of `names` set (non-empty) in `env`: its name and value.
pub fn env_value<'a>(
    env: &'a [(String, String)],
    names: &[&'static str],
) -> Option<(&'static str, &'a str)> {
    names.iter().find_map(|name| {
        env.iter()
            .find(|(key, value)| key == name && !value.trim().is_empty())
            .map(|(_, value)| (*name, value.as_str()))
    })
}

/// Whether `NO_PROXY` (or `no_proxy`) exempts `host`: an entry `*`, or the host name itself
/// (exact, case aside; a `:port` on an entry is ignored). Domain suffixes are not matched.
pub fn no_proxy_exempts(env: &[(String, String)], host: &str) -> bool {
    let Some((_, list)) = env_value(env, &NO_PROXY_ENV) else {
        return false;
    };
    list.split(',').map(str::trim).any(|entry| {
        let name = split_host_port(entry).map_or(entry, |(name, _)| name);
        entry == "*" || name.eq_ignore_ascii_case(host)
    })
}

/// The environment's proxy for a connection to `host`: `HTTPS_PROXY` (or `https_proxy`) unless
/// `NO_PROXY` exempts the host. The name of the variable comes with it, for an error.
pub fn from_env(
    env: &[(String, String)],
    host: &str,
) -> Option<(&'static str, Result<Proxy, ProxyUrlError>)> {
    let (name, url) = env_value(env, &PROXY_ENV)?;
    if no_proxy_exempts(env, host) {
        return None;
    }
    Some((name, Proxy::parse(url)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn urls_parse_and_show_no_credentials() {
        let proxy = Proxy::parse("http://proxy.example:3128").unwrap();
        assert_eq!((proxy.host.as_str(), proxy.port), ("proxy.example", 3128));
        assert_eq!(proxy.authorization(), None);
        assert_eq!(proxy.to_string(), "http://proxy.example:3128");

        let proxy = Proxy::parse("HTTP://alice:s3cret@10.0.0.1/").unwrap();
        assert_eq!((proxy.host.as_str(), proxy.port), ("10.0.0.1", 80));
        assert_eq!(
            proxy.authorization().as_deref(),
            Some("Basic YWxpY2U6czNjcmV0")
        );
        assert_eq!(proxy.to_string(), "http://***@10.0.0.1:80");
        assert!(!format!("{proxy:?}").contains("s3cret"));

        let proxy = Proxy::parse("http://[::1]:8080").unwrap();
        assert_eq!((proxy.host.as_str(), proxy.port), ("::1", 8080));
        assert_eq!(proxy.to_string(), "http://[::1]:8080");
    }

    #[test]
    fn bad_urls_are_refused_without_quoting_them() {
        for (url, error) in [
            ("proxy:3128", ProxyUrlError::NoScheme),
            (
                "https://u:pw@proxy:3128",
                ProxyUrlError::Scheme {
                    scheme: "https".into(),
                },
            ),
            ("http://", ProxyUrlError::NoHost),
            ("http://u:pw@", ProxyUrlError::NoHost),
            ("http://proxy:http", ProxyUrlError::Port),
            ("http://proxy:0", ProxyUrlError::Port),
            ("http://proxy:3128/path", ProxyUrlError::Path),
        ] {
            assert_eq!(Proxy::parse(url), Err(error.clone()), "{url}");
            assert!(!error.to_string().contains("pw"));
        }
    }

    #[test]
    fn the_environment_proxy_honours_no_proxy_for_exact_names_and_star() {
        let proxied = env(&[("HTTPS_PROXY", "http://proxy:3128")]);
        let (name, proxy) = from_env(&proxied, "hub.azure-devices.net").unwrap();
        assert_eq!((name, proxy.unwrap().port), ("HTTPS_PROXY", 3128));

        let lower = env(&[("https_proxy", "http://proxy:3128")]);
        assert_eq!(from_env(&lower, "hub").unwrap().0, "https_proxy");

        let exempt = env(&[
            ("HTTPS_PROXY", "http://proxy:3128"),
            ("NO_PROXY", "localhost, Hub.Example:443"),
        ]);
        assert!(from_env(&exempt, "hub.example").is_none());
        assert!(from_env(&exempt, "localhost").is_none());
        assert!(
            from_env(&exempt, "a.hub.example").is_some(),
            "no suffix match"
        );

        let all = env(&[("HTTPS_PROXY", "http://proxy:3128"), ("no_proxy", "*")]);
        assert!(from_env(&all, "anything").is_none());
        assert!(from_env(&env(&[("HTTPS_PROXY", " ")]), "hub").is_none());
    }
}
