//! Where an archive lives: a local directory, or an Azure Blob Storage container (real Azure
//! Storage or Azurite, the official emulator), named as the operator writes it on the command
//! line. The hub's capture writes there and the archive reader reads there; this module only
//! turns the name into a [`Location`] (for a container, an `object_store` client) and knows
//! nothing of Avro or of either side.
//!
//! The three forms:
//! - a path: a directory;
//! - `azure://CONTAINER[/PREFIX]`: the account from the connection string in
//!   `AZURE_STORAGE_CONNECTION_STRING` (`AccountName` + `AccountKey`, or `SharedAccessSignature`,
//!   with `BlobEndpoint`/`EndpointSuffix`/`DefaultEndpointsProtocol`, or
//!   `UseDevelopmentStorage=true` for Azurite on 127.0.0.1:10000);
//! - `https://ACCOUNT.blob.core.windows.net/CONTAINER[/PREFIX]?SAS`, or path-style
//!   `https://HOST[:PORT]/ACCOUNT/CONTAINER[/PREFIX]?SAS` when the host is an IP address or
//!   `localhost` (emulators). `http://` is accepted only for a loopback host (Azurite's default).
//!
//! Secrets: a key or a SAS never appears in a message or in [`Container::name`] (the URL is named
//! without its query).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;

use object_store::azure::MicrosoftAzureBuilder;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

/// The environment variable `azure://` destinations take their account from (the name Azure's
/// tools use).
pub const CONNECTION_STRING_ENV: &str = "AZURE_STORAGE_CONNECTION_STRING";

/// Azurite's well-known account and key (published by Microsoft for the emulator).
const EMULATOR_ACCOUNT: &str = "devstoreaccount1";
const EMULATOR_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const EMULATOR_BLOB_ENDPOINT: &str = "http://127.0.0.1:10000/devstoreaccount1";

/// A new client: requests bounded in time, and few retries inside one call. The callers retry
/// on their own terms (the hub's capture with its backoff, for as long as it runs; the reader
/// not at all), and a hub told to stop must not wait out object_store's default of ten retries
/// over three minutes.
fn builder() -> MicrosoftAzureBuilder {
    let client = ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        // A window's file (up to the window's size) goes up in one request.
        .with_timeout(Duration::from_secs(300));
    let retry = RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 2,
        retry_timeout: Duration::from_secs(15),
    };
    MicrosoftAzureBuilder::new()
        .with_client_options(client)
        .with_retry(retry)
}

/// A parsed destination or source.
pub enum Location {
    Directory(PathBuf),
    Container(Container),
}

/// A Blob Storage container (and a prefix in it), with its client.
#[derive(Clone)]
pub struct Container {
    pub store: Arc<dyn ObjectStore>,
    /// Blob names start with this (no leading or trailing `/`); empty for the whole container.
    pub prefix: String,
    /// For messages and `hub.json`: `azure://CONTAINER/PREFIX`, or the URL without its query.
    pub name: String,
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container")
            .field("name", &self.name)
            .finish()
    }
}

impl Container {
    /// The object path of `relative` (a `/`-separated name) under the prefix.
    pub fn path(&self, relative: &str) -> object_store::path::Path {
        if self.prefix.is_empty() {
            object_store::path::Path::from(relative)
        } else {
            object_store::path::Path::from(format!("{}/{relative}", self.prefix))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("{url}: {CONNECTION_STRING_ENV} is not set (it names the storage account)")]
    NoConnectionString { url: String },
    #[error("{CONNECTION_STRING_ENV} is malformed: {reason}")]
    ConnectionString { reason: String },
    #[error("{url}: {reason}")]
    Url { url: String, reason: String },
    #[error("{url}: cannot make a Blob Storage client")]
    Client {
        url: String,
        #[source]
        source: object_store::Error,
    },
}

/// Parses `text` (a path or a container, module notes) with the connection string `env_value`
/// (the value of [`CONNECTION_STRING_ENV`], passed in so callers and tests decide where it
/// comes from).
pub fn parse(text: &str, env_value: Option<&str>) -> Result<Location, BlobError> {
    let lower = text.to_ascii_lowercase();
    if let Some(rest) = lower
        .strip_prefix("azure://")
        .map(|_| &text["azure://".len()..])
    {
        return azure_scheme(text, rest, env_value).map(Location::Container);
    }
    if lower.starts_with("https://") || lower.starts_with("http://") {
        return container_url(text).map(Location::Container);
    }
    Ok(Location::Directory(PathBuf::from(text)))
}

/// Whether `text` names a container rather than a directory.
pub fn is_container(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    ["azure://", "https://", "http://"]
        .iter()
        .any(|scheme| lower.starts_with(scheme))
}

/// `text` for messages: a URL without its query (which may carry a SAS).
pub fn redacted(text: &str) -> String {
    text.split('?').next().unwrap_or(text).to_owned()
}

fn azure_scheme(text: &str, rest: &str, env_value: Option<&str>) -> Result<Container, BlobError> {
    let url = redacted(text);
    let rest = rest.trim_matches('/');
    let (container, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    check_container_name(&url, container)?;
    let Some(value) = env_value.filter(|v| !v.trim().is_empty()) else {
        return Err(BlobError::NoConnectionString { url });
    };
    let account = StorageAccount::parse(value)?;
    let mut builder = builder()
        .with_account(&account.name)
        .with_container_name(container)
        .with_endpoint(account.blob_endpoint.clone());
    if account.blob_endpoint.starts_with("http://") {
        builder = builder.with_allow_http(true);
    }
    builder = match &account.credential {
        Credential::Key(key) => builder.with_access_key(key),
        Credential::Sas(sas) => builder.with_config(
            object_store::azure::AzureConfigKey::SasKey,
            sas.trim_start_matches('?'),
        ),
    };
    let store = builder.build().map_err(|source| BlobError::Client {
        url: url.clone(),
        source,
    })?;
    Ok(Container {
        store: Arc::new(store),
        prefix: prefix.trim_matches('/').to_owned(),
        name: url,
    })
}

fn container_url(text: &str) -> Result<Container, BlobError> {
    let name = redacted(text);
    let bad = |reason: &str| BlobError::Url {
        url: name.clone(),
        reason: reason.to_owned(),
    };
    let parsed = url::Url::parse(text).map_err(|e| bad(&format!("not a URL ({e})")))?;
    let host = parsed.host_str().ok_or_else(|| bad("no host"))?.to_owned();
    if parsed.scheme() == "http" && !is_loopback(&host) {
        return Err(bad(
            "http:// is accepted only for a loopback emulator; use https://",
        ));
    }
    let sas = parsed.query().unwrap_or_default();
    if sas.is_empty() {
        return Err(bad(
            "the URL carries no SAS (`?sv=...&sig=...`); give one with the permissions needed",
        ));
    }
    let mut segments: Vec<&str> = parsed
        .path_segments()
        .map(|s| s.filter(|p| !p.is_empty()).collect())
        .unwrap_or_default();
    // Path-style (emulators): the account is the first segment; otherwise the host's first label.
    let (account, origin) = if is_path_style(&host) {
        if segments.is_empty() {
            return Err(bad("no account in the path (`/ACCOUNT/CONTAINER`)"));
        }
        let account = segments.remove(0).to_owned();
        let port = parsed.port().map(|p| format!(":{p}")).unwrap_or_default();
        let origin = format!("{}://{host}{port}/{account}", parsed.scheme());
        (account, origin)
    } else {
        let account = host.split('.').next().unwrap_or_default().to_owned();
        let port = parsed.port().map(|p| format!(":{p}")).unwrap_or_default();
        (account, format!("{}://{host}{port}", parsed.scheme()))
    };
    if segments.is_empty() {
        return Err(bad("no container in the path"));
    }
    let container = segments.remove(0);
    check_container_name(&name, container)?;
    let mut builder = builder()
        .with_account(&account)
        .with_container_name(container)
        .with_endpoint(origin)
        .with_config(object_store::azure::AzureConfigKey::SasKey, sas);
    if parsed.scheme() == "http" {
        builder = builder.with_allow_http(true);
    }
    let store = builder.build().map_err(|source| BlobError::Client {
        url: name.clone(),
        source,
    })?;
    Ok(Container {
        store: Arc::new(store),
        prefix: segments.join("/"),
        name,
    })
}

/// `localhost` or an IP address: an emulator's host, whose URLs name the account in their path.
fn is_path_style(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || ip_of(host).is_some()
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || ip_of(host).is_some_and(|ip| ip.is_loopback())
}

/// The address a URL's host names, when it is one (IPv6 in brackets too).
fn ip_of(host: &str) -> Option<IpAddr> {
    host.trim_matches(['[', ']']).parse().ok()
}

/// Azure's container naming rules: 3 to 63 characters, lowercase letters, digits and single
/// hyphens, starting and ending with a letter or digit (`$root` and `$logs` aside).
fn check_container_name(url: &str, name: &str) -> Result<(), BlobError> {
    let valid = (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if valid || name == "$root" || name == "$logs" {
        Ok(())
    } else {
        Err(BlobError::Url {
            url: url.to_owned(),
            reason: format!(
                "`{name}` is not a container name (3 to 63 lowercase letters, digits and \
                 single hyphens)"
            ),
        })
    }
}

enum Credential {
    Key(String),
    Sas(String),
}

/// The parts of a storage connection string this needs.
struct StorageAccount {
    name: String,
    blob_endpoint: String,
    credential: Credential,
}

impl StorageAccount {
    /// `Key=value;...` as the portal shows it; keys compared case-insensitively, values split
    /// at their first `=` (account keys end in `=`).
    fn parse(text: &str) -> Result<StorageAccount, BlobError> {
        let bad = |reason: &str| BlobError::ConnectionString {
            reason: reason.to_owned(),
        };
        let mut fields = std::collections::HashMap::new();
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad("a part has no `=` (expected Key=value;...)"))?;
            fields.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
        let get = |key: &str| fields.get(key).cloned();
        if get("usedevelopmentstorage").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            let endpoint = get("developmentstorageproxyuri")
                .map(|proxy| format!("{}/{EMULATOR_ACCOUNT}", proxy.trim_end_matches('/')))
                .unwrap_or_else(|| EMULATOR_BLOB_ENDPOINT.to_owned());
            return Ok(StorageAccount {
                name: EMULATOR_ACCOUNT.to_owned(),
                blob_endpoint: endpoint,
                credential: Credential::Key(EMULATOR_KEY.to_owned()),
            });
        }
        let credential = match (get("accountkey"), get("sharedaccesssignature")) {
            (Some(key), _) => Credential::Key(key),
            (None, Some(sas)) => Credential::Sas(sas),
            (None, None) => return Err(bad("it has neither AccountKey nor SharedAccessSignature")),
        };
        let blob_endpoint = match get("blobendpoint") {
            Some(endpoint) => endpoint.trim_end_matches('/').to_owned(),
            None => {
                let name = get("accountname").ok_or_else(|| bad("it has no AccountName"))?;
                let protocol = get("defaultendpointsprotocol").unwrap_or_else(|| "https".into());
                let suffix = get("endpointsuffix").unwrap_or_else(|| "core.windows.net".into());
                format!("{protocol}://{name}.blob.{suffix}")
            }
        };
        let name = match get("accountname") {
            Some(name) => name,
            // A SAS connection string may name only the endpoint: the account is its first
            // host label, or the first path segment for an emulator's path-style endpoint.
            None => account_of_endpoint(&blob_endpoint)
                .ok_or_else(|| bad("it has no AccountName and its BlobEndpoint names none"))?,
        };
        if matches!(credential, Credential::Key(_)) && get("accountname").is_none() {
            return Err(bad("AccountKey needs AccountName"));
        }
        Ok(StorageAccount {
            name,
            blob_endpoint,
            credential,
        })
    }
}

fn account_of_endpoint(endpoint: &str) -> Option<String> {
    let parsed = url::Url::parse(endpoint).ok()?;
    let host = parsed.host_str()?;
    if is_path_style(host) {
        parsed
            .path_segments()?
            .find(|s| !s.is_empty())
            .map(str::to_owned)
    } else {
        host.split('.').next().map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(location: Location) -> Container {
        match location {
            Location::Container(c) => c,
            Location::Directory(d) => panic!("a directory: {}", d.display()),
        }
    }

    #[test]
    fn paths_are_directories_and_schemes_are_containers() {
        assert!(matches!(
            parse("out/capture", None),
            Ok(Location::Directory(_))
        ));
        assert!(is_container("AZURE://x"));
        assert!(is_container("https://a.blob.core.windows.net/c?sv=1"));
        assert!(!is_container("/tmp/x"));
    }

    #[test]
    fn azure_scheme_takes_the_account_from_the_connection_string() {
        let cs = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;EndpointSuffix=core.windows.net";
        let c = container(parse("azure://capture/iot/hub1", Some(cs)).unwrap());
        assert_eq!(c.prefix, "iot/hub1");
        assert_eq!(c.name, "azure://capture/iot/hub1");
        assert_eq!(c.path("a/b.avro").as_ref(), "iot/hub1/a/b.avro");
        let dev = container(parse("azure://capture", Some("UseDevelopmentStorage=true")).unwrap());
        assert_eq!(dev.prefix, "");
    }

    #[test]
    fn the_errors_name_the_problem_and_never_the_secret() {
        let no_env = parse("azure://capture", None).err().unwrap().to_string();
        assert!(no_env.contains(CONNECTION_STRING_ENV), "{no_env}");
        let no_key = parse("azure://capture", Some("AccountName=acct"))
            .err()
            .unwrap()
            .to_string();
        assert!(no_key.contains("neither AccountKey"), "{no_key}");
        let bad_name = parse("azure://Bad_Name", Some("UseDevelopmentStorage=true"))
            .err()
            .unwrap()
            .to_string();
        assert!(bad_name.contains("not a container name"), "{bad_name}");
        let no_sas = parse("https://acct.blob.core.windows.net/capture", None)
            .err()
            .unwrap()
            .to_string();
        assert!(no_sas.contains("no SAS"), "{no_sas}");
        let plain = parse("http://acct.blob.core.windows.net/capture?sig=SECRET", None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            plain.contains("loopback") && !plain.contains("SECRET"),
            "{plain}"
        );
        let malformed = parse("azure://capture", Some("AccountName=a;AccountKey"))
            .err()
            .unwrap()
            .to_string();
        assert!(malformed.contains("malformed"), "{malformed}");
    }

    #[test]
    fn container_urls_in_both_styles() {
        let virtual_host = container(
            parse(
                "https://acct.blob.core.windows.net/capture/p?sv=2022&sig=SECRET",
                None,
            )
            .unwrap(),
        );
        assert_eq!(virtual_host.prefix, "p");
        assert_eq!(
            virtual_host.name,
            "https://acct.blob.core.windows.net/capture/p"
        );
        let path_style = container(
            parse(
                "http://127.0.0.1:10000/devstoreaccount1/capture?sv=2022&sig=S",
                None,
            )
            .unwrap(),
        );
        assert_eq!(path_style.prefix, "");
        assert!(!format!("{path_style:?}").contains("sig"));
    }

    #[test]
    fn a_sas_connection_string_may_name_only_the_endpoint() {
        let account = StorageAccount::parse(
            "BlobEndpoint=https://acct.blob.core.windows.net/;SharedAccessSignature=sv=1&sig=x",
        )
        .unwrap();
        assert_eq!(account.name, "acct");
        assert_eq!(account.blob_endpoint, "https://acct.blob.core.windows.net");
        let emulator = StorageAccount::parse(
            "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;SharedAccessSignature=sv=1",
        )
        .unwrap();
        assert_eq!(emulator.name, "devstoreaccount1");
    }
}
