//! [`ServiceClient`]: the IoT Hub service REST API over HTTPS, for any hub.
//!
//! Built from a service connection string (`HostName=h;SharedAccessKeyName=p;SharedAccessKey=k`)
//! and optionally an extra CA in PEM (the local hub's). The base URL is `https://{HostName}`;
//! every request carries `?api-version=2021-04-12` and an `Authorization: SharedAccessSignature`
//! token for the policy, valid for an hour and made afresh when less than five minutes remain.
//! Server certificates are checked against Mozilla's roots (webpki-roots) plus the extra CA.
//!
//! Failures come back as [`ServiceError`]: the hub's answer (HTTP status, the IoT Hub error code
//! from the `iothub-errorcode` header or the body, and its message), a transport failure or an
//! unreadable answer (with the `reqwest`/`serde_json` error as its source), a client set-up
//! failure (the extra CA, TLS, the key), or input the client refused before sending. Neither the
//! key nor a token is ever put into an error, a log line or `Debug` output: requests are named by
//! method and path only.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::{HeaderMap, AUTHORIZATION, IF_MATCH};
use reqwest::{Method, StatusCode};
use serde_json::{json, Map, Value};

use crate::protocol::connection_string::ServiceConnectionString;
use crate::protocol::encoding::enc;
use crate::protocol::error_code::ErrorCode;
use crate::protocol::method::{MethodError, MethodInvocation, DEFAULT_RESPONSE_TIMEOUT_SECS};
use crate::protocol::sas::{self, SasError};

/// The service API version this client speaks.
use crate::protocol::API_VERSION;

/// The most operations one bulk registry call may carry, as on IoT Hub.
pub const BULK_MAX_DEVICES: usize = 100;
/// How many times a throttled (429) bulk registry call is waited out and sent again.
pub const BULK_THROTTLE_RETRIES: u32 = 5;

/// The hub's refusal: its status, the `iothub-errorcode` header and the body.
fn hub_error(status: StatusCode, headers: &HeaderMap, text: &str) -> ServiceError {
    let header_code = headers
        .get("iothub-errorcode")
        .and_then(|v| v.to_str().ok());
    parse_hub_error(status.as_u16(), header_code, text)
}

/// An answer body as JSON (empty: null).
fn parse_answer(request_line: &str, text: &str) -> Result<Value, ServiceError> {
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(text).map_err(|source| ServiceError::AnswerNotJson {
        request: request_line.to_owned(),
        source,
    })
}
/// Lifetime of each SAS token.
const TOKEN_LIFETIME_SECS: u64 = 3600;
/// A token with less than this left is replaced before the next request.
const TOKEN_RENEW_MARGIN_SECS: u64 = 300;
/// Time to open the TCP and TLS connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a whole request (direct methods add their own response timeout to this).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest error message kept from a body that is not IoT Hub's JSON shape.
const MAX_RAW_MESSAGE_CHARS: usize = 500;

/// Why a service call failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The hub answered with an error status. This is the hub's data, not a chain of causes.
    #[error("{}", describe_hub_error(*.status, .name.as_deref(), *.code, .message))]
    Hub {
        /// The HTTP status.
        status: u16,
        /// The IoT Hub error name (`DeviceNotFound`), when the hub gave one.
        name: Option<String>,
        /// The six-digit IoT Hub error code (`404001`), from the body or derived from the name.
        code: Option<u32>,
        /// The hub's message, without the `ErrorCode:Name;` prefix.
        message: String,
    },
    /// The request got no answer: DNS, TCP, TLS or a timeout.
    #[error("{request} got no answer")]
    Transport {
        /// The method and path (`GET /devices/d1`), without the query or any header.
        request: String,
        #[source]
        source: reqwest::Error,
    },
    /// The answer's body could not be read to its end.
    #[error("cannot read the answer to {request}")]
    ReadAnswer {
        request: String,
        #[source]
        source: reqwest::Error,
    },
    /// A 2xx answer whose body is not JSON.
    #[error("the answer to {request} is not JSON")]
    AnswerNotJson {
        request: String,
        #[source]
        source: serde_json::Error,
    },
    /// A 2xx answer in JSON, but not of the shape the call returns.
    #[error("the answer to {request} is not {expected}")]
    UnexpectedAnswer {
        request: String,
        /// What it should have been: "a device object", "a JSON array".
        expected: &'static str,
    },
    /// Refused before sending: the device id is empty.
    #[error("the device id is empty")]
    EmptyDeviceId,
    /// Refused before sending: the query is empty.
    #[error("the query is empty")]
    EmptyQuery,
    /// Refused before sending: a twin patch that is not a JSON object.
    #[error("a twin patch must be a JSON object")]
    TwinPatchNotObject,
    /// Refused before sending: a direct method call IoT Hub would refuse.
    #[error("the direct method call is not valid")]
    InvalidMethod(#[source] MethodError),
    /// The extra CA is not PEM.
    #[error("the extra CA is not valid PEM")]
    CaNotPem(#[source] std::io::Error),
    /// The extra CA holds a certificate rustls cannot use as a root.
    #[error("an extra CA certificate is not usable")]
    CaUnusable(#[source] rustls::Error),
    /// The extra CA holds no certificate at all.
    #[error("the extra CA holds no PEM certificate")]
    CaEmpty,
    /// The TLS configuration cannot be built.
    #[error("cannot set up TLS")]
    Tls(#[source] rustls::Error),
    /// The HTTP client cannot be built.
    #[error("cannot set up the HTTP client")]
    HttpClient(#[source] reqwest::Error),
    /// No SAS token can be made from the policy key (it is not base64). The key is not named.
    #[error("cannot make a SAS token from the policy's key")]
    Token(#[source] SasError),
}

impl ServiceError {
    /// The six-digit IoT Hub error code, if the hub gave one.
    pub fn code(&self) -> Option<u32> {
        match self {
            ServiceError::Hub { code, .. } => *code,
            _ => None,
        }
    }

    /// The HTTP status, if the hub answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ServiceError::Hub { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True for mistakes in the input or the configuration (the connection string's key, the
    /// extra CA) rather than a refusal or failure of the service call itself.
    pub fn is_usage(&self) -> bool {
        match self {
            ServiceError::Hub { .. }
            | ServiceError::Transport { .. }
            | ServiceError::ReadAnswer { .. }
            | ServiceError::AnswerNotJson { .. }
            | ServiceError::UnexpectedAnswer { .. } => false,
            ServiceError::EmptyDeviceId
            | ServiceError::EmptyQuery
            | ServiceError::TwinPatchNotObject
            | ServiceError::InvalidMethod(_)
            | ServiceError::CaNotPem(_)
            | ServiceError::CaUnusable(_)
            | ServiceError::CaEmpty
            | ServiceError::Tls(_)
            | ServiceError::HttpClient(_)
            | ServiceError::Token(_) => true,
        }
    }
}

fn describe_hub_error(status: u16, name: Option<&str>, code: Option<u32>, message: &str) -> String {
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let head = match (name, code) {
        (Some(name), Some(code)) => format!("{name} ({code})"),
        (Some(name), None) => format!("{name} (HTTP {status})"),
        (None, Some(code)) => format!("HTTP {status} ({code})"),
        (None, None) => format!("HTTP {status} {reason}").trim_end().to_string(),
    };
    if message.is_empty() {
        head
    } else {
        format!("{head}: {message}")
    }
}

/// Reads an error answer: the `iothub-errorcode` header, and a body in any of IoT Hub's shapes:
/// `{"Message":"ErrorCode:Name;text","ExceptionMessage":...,"errorCode":404001}`,
/// `{"errorCode":404103,"message":"text",...}`, or `{"Message":"{\"errorCode\":...}"}` (JSON in a
/// string). A body that is not JSON is kept as the message, shortened.
pub fn parse_hub_error(status: u16, header_code: Option<&str>, body: &str) -> ServiceError {
    let mut name: Option<String> = None;
    let mut code: Option<u32> = None;
    if let Some(header) = header_code.map(str::trim).filter(|h| !h.is_empty()) {
        match header.parse::<u32>() {
            Ok(number) => code = Some(number),
            Err(_) => name = Some(header.to_string()),
        }
    }
    let message = match serde_json::from_str::<Value>(body) {
        Ok(value @ Value::Object(_)) => read_error_object(&value, &mut name, &mut code),
        _ => shorten(body.trim()),
    };
    // Fill in whichever of name and number is missing from the other.
    if code.is_none() {
        code = name
            .as_deref()
            .and_then(ErrorCode::from_name)
            .map(ErrorCode::code);
    }
    if name.is_none() {
        name = code
            .and_then(ErrorCode::from_code)
            .map(|c| c.name().to_string());
    }
    ServiceError::Hub {
        status,
        name,
        code,
        message,
    }
}

fn read_error_object(value: &Value, name: &mut Option<String>, code: &mut Option<u32>) -> String {
    let field = |keys: &[&str]| keys.iter().find_map(|k| value.get(*k));
    if code.is_none() {
        *code = field(&["errorCode", "ErrorCode"]).and_then(|v| match v {
            Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            Value::String(s) => s.parse().ok(),
            _ => None,
        });
    }
    let Some(text) = field(&["Message", "message"]).and_then(Value::as_str) else {
        return String::new();
    };
    if let Ok(inner @ Value::Object(_)) = serde_json::from_str::<Value>(text) {
        return read_error_object(&inner, name, code);
    }
    match text
        .strip_prefix("ErrorCode:")
        .and_then(|rest| rest.split_once(';'))
    {
        Some((error_name, rest)) => {
            if name.is_none() && !error_name.is_empty() {
                *name = Some(error_name.to_string());
            }
            rest.trim().to_string()
        }
        None => text.trim().to_string(),
    }
}

fn shorten(text: &str) -> String {
    if text.chars().count() <= MAX_RAW_MESSAGE_CHARS {
        text.to_string()
    } else {
        let cut: String = text.chars().take(MAX_RAW_MESSAGE_CHARS).collect();
        format!("{cut}...")
    }
}

/// `If-Match` as IoT Hub wants it: always quoted, `"*"` for "any version".
fn if_match_value(etag: Option<&str>) -> String {
    match etag.map(str::trim) {
        None | Some("") | Some("*") | Some("\"*\"") => "\"*\"".to_string(),
        Some(tag) if tag.len() >= 2 && tag.starts_with('"') && tag.ends_with('"') => {
            tag.to_string()
        }
        Some(tag) => format!("\"{tag}\""),
    }
}

/// A SAS token and when it expires (Unix seconds).
struct Token {
    value: String,
    expiry: u64,
}

/// A client of one hub's service API.
pub struct ServiceClient {
    http: reqwest::Client,
    base_url: String,
    host_name: String,
    policy: String,
    /// The policy key (base64). Secret: never printed.
    key: String,
    token: Mutex<Option<Token>>,
}

impl std::fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceClient")
            .field("base_url", &self.base_url)
            .field("policy", &self.policy)
            .field("key", &"***")
            .finish()
    }
}

fn now_unix() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0)
}

impl ServiceClient {
    /// A client for the hub named in `connection_string`. `extra_ca_pem` holds one or more PEM
    /// certificates trusted besides the public roots (the local hub's CA).
    pub fn new(
        connection_string: &ServiceConnectionString,
        extra_ca_pem: Option<&str>,
    ) -> Result<ServiceClient, ServiceError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(pem) = extra_ca_pem {
            let mut added = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
                let cert = cert.map_err(ServiceError::CaNotPem)?;
                roots.add(cert).map_err(ServiceError::CaUnusable)?;
                added += 1;
            }
            if added == 0 {
                return Err(ServiceError::CaEmpty);
            }
        }
        // ring, as the agent uses: no aws-lc start-up cost for a one-shot command.
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(ServiceError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("simdevice/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ServiceError::HttpClient)?;
        let client = ServiceClient {
            http,
            base_url: format!("https://{}", connection_string.host_name),
            host_name: connection_string.host_name.clone(),
            policy: connection_string.shared_access_key_name.clone(),
            key: connection_string.shared_access_key.clone(),
            token: Mutex::new(None),
        };
        // Refuse an unusable key now rather than on the first request.
        client.authorization(now_unix())?;
        Ok(client)
    }

    /// `https://{HostName}`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The token for a request made at `now` (Unix seconds): the current one, or a new one when
    /// less than the renewal margin is left.
    fn authorization(&self, now: u64) -> Result<String, ServiceError> {
        let mut slot = self
            .token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(token) = slot.as_ref() {
            if now + TOKEN_RENEW_MARGIN_SECS < token.expiry {
                return Ok(token.value.clone());
            }
        }
        let expiry = now + TOKEN_LIFETIME_SECS;
        let value = sas::generate_token(&self.host_name, &self.key, Some(&self.policy), expiry)
            .map_err(ServiceError::Token)?;
        *slot = Some(Token {
            value: value.clone(),
            expiry,
        });
        Ok(value)
    }

    fn url(&self, path: &str, params: &[(&str, String)]) -> String {
        let mut url = format!("{}{path}?", self.base_url);
        for (name, value) in params {
            url.push_str(name);
            url.push('=');
            url.push_str(&enc(value));
            url.push('&');
        }
        url.push_str("api-version=");
        url.push_str(API_VERSION);
        url
    }

    /// Sends one request; returns the body (JSON, or null when empty) and the headers of a 2xx
    /// answer, or the hub's error.
    async fn send(
        &self,
        method: Method,
        url: String,
        body: Option<&Value>,
        headers: &[(&'static str, String)],
        timeout: Option<Duration>,
    ) -> Result<(Value, HeaderMap), ServiceError> {
        let (request_line, status, headers, text) =
            self.exchange(method, url, body, headers, timeout).await?;
        if !status.is_success() {
            return Err(hub_error(status, &headers, &text));
        }
        Ok((parse_answer(&request_line, &text)?, headers))
    }

    /// One request and its raw answer (what the errors name: the method and the path, never
    /// the query or a header).
    async fn exchange(
        &self,
        method: Method,
        url: String,
        body: Option<&Value>,
        headers: &[(&'static str, String)],
        timeout: Option<Duration>,
    ) -> Result<(String, StatusCode, HeaderMap, String), ServiceError> {
        let request_line = format!(
            "{method} {}",
            url.split('?')
                .next()
                .unwrap_or(&url)
                .trim_start_matches(&self.base_url)
        );
        let mut request = self
            .http
            .request(method, &url)
            .header(AUTHORIZATION, self.authorization(now_unix())?)
            .header(reqwest::header::ACCEPT, "application/json");
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        let response = request
            .send()
            .await
            .map_err(|source| ServiceError::Transport {
                request: request_line.clone(),
                source,
            })?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response
            .text()
            .await
            .map_err(|source| ServiceError::ReadAnswer {
                request: request_line.clone(),
                source,
            })?;
        Ok((request_line, status, headers, text))
    }

    /// `POST /devices`: one bulk registry call of at most [`BULK_MAX_DEVICES`] operations
    /// (IoT Hub's `ExportImportDevice` objects). Returns IoT Hub's
    /// `BulkRegistryOperationResult` whether every operation succeeded (200) or some failed
    /// (400 with the same body, each failure listed); a 429 is waited out (its
    /// `Retry-After`, else 1, 2, 4, ... s) up to [`BULK_THROTTLE_RETRIES`] times.
    pub async fn bulk_registry(&self, operations: &[Value]) -> Result<Value, ServiceError> {
        let body = Value::Array(operations.to_vec());
        let mut retries = 0;
        loop {
            let url = self.url("/devices", &[]);
            let (request_line, status, headers, text) = self
                .exchange(Method::POST, url, Some(&body), &[], None)
                .await?;
            if status == StatusCode::TOO_MANY_REQUESTS && retries < BULK_THROTTLE_RETRIES {
                let wait = headers
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(1 << retries);
                retries += 1;
                tracing::info!(
                    wait_secs = wait,
                    "bulk registry call throttled (429): waiting"
                );
                tokio::time::sleep(Duration::from_secs(wait.min(60))).await;
                continue;
            }
            if status.is_success() || status == StatusCode::BAD_REQUEST {
                if let Ok(result) = serde_json::from_str::<Value>(&text) {
                    if result.get("isSuccessful").is_some() {
                        return Ok(result);
                    }
                }
            }
            if !status.is_success() {
                return Err(hub_error(status, &headers, &text));
            }
            return parse_answer(&request_line, &text);
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&'static str, String)],
    ) -> Result<Value, ServiceError> {
        let url = self.url(path, &[]);
        Ok(self.send(method, url, body, headers, None).await?.0)
    }

    /// `PUT /devices/{id}` without `If-Match`: registers a device with keys the hub generates.
    pub async fn create_device(&self, id: &str, enabled: bool) -> Result<Value, ServiceError> {
        check_id(id)?;
        let body = json!({
            "deviceId": id,
            "status": if enabled { "enabled" } else { "disabled" },
            "authentication": {
                "type": "sas",
                "symmetricKey": {"primaryKey": null, "secondaryKey": null},
            },
            "capabilities": {"iotEdge": false},
        });
        self.call(Method::PUT, &device_path(id), Some(&body), &[])
            .await
    }

    /// `PUT /devices/{id}` of an X.509 device: `selfSigned` with `primary` (and optionally
    /// `secondary`) thumbprints, SHA-1 or SHA-256 hex; `certificateAuthority` when `primary` is
    /// `None`. The body is the one azure-iot-hub's `create_device_with_x509` and
    /// `create_device_with_certificate_authority` send.
    pub async fn create_x509_device(
        &self,
        id: &str,
        enabled: bool,
        primary: Option<&str>,
        secondary: Option<&str>,
    ) -> Result<Value, ServiceError> {
        check_id(id)?;
        let authentication = match primary {
            Some(primary) => json!({
                "type": "selfSigned",
                "x509Thumbprint": {"primaryThumbprint": primary, "secondaryThumbprint": secondary},
            }),
            None => json!({"type": "certificateAuthority"}),
        };
        let body = json!({
            "deviceId": id,
            "status": if enabled { "enabled" } else { "disabled" },
            "authentication": authentication,
            "capabilities": {"iotEdge": false},
        });
        self.call(Method::PUT, &device_path(id), Some(&body), &[])
            .await
    }

    /// `GET /simdevice/certificates`: the CA certificates the local hub trusts for X.509
    /// devices (a simdevice extension: Azure manages them through its management API).
    pub async fn list_certificates(&self) -> Result<Value, ServiceError> {
        self.call(Method::GET, "/simdevice/certificates", None, &[])
            .await
    }

    /// `GET /simdevice/certificates/{name}`.
    pub async fn get_certificate(&self, name: &str) -> Result<Value, ServiceError> {
        self.call(Method::GET, &certificate_path(name), None, &[])
            .await
    }

    /// `PUT /simdevice/certificates/{name}`: trust the CA certificate `pem`.
    pub async fn add_certificate(&self, name: &str, pem: &str) -> Result<Value, ServiceError> {
        let body = json!({ "certificate": pem });
        self.call(Method::PUT, &certificate_path(name), Some(&body), &[])
            .await
    }

    /// `POST /simdevice/certificates/{name}/generate`: the hub creates a CA and keeps its key.
    pub async fn generate_certificate(&self, name: &str) -> Result<Value, ServiceError> {
        let path = format!("{}/generate", certificate_path(name));
        self.call(Method::POST, &path, None, &[]).await
    }

    /// `DELETE /simdevice/certificates/{name}`.
    pub async fn delete_certificate(&self, name: &str) -> Result<(), ServiceError> {
        self.call(Method::DELETE, &certificate_path(name), None, &[])
            .await
            .map(|_| ())
    }

    /// `POST /simdevice/device-certificates`: a device certificate (CN = `device`) and its
    /// private key, signed by the hub's CA `ca` or self-signed, valid for `days` (negative:
    /// already expired). The answer carries the key: it is the caller's to keep private.
    pub async fn issue_certificate(
        &self,
        device: &str,
        ca: Option<&str>,
        days: i64,
    ) -> Result<Value, ServiceError> {
        check_id(device)?;
        let body = json!({ "deviceId": device, "ca": ca, "days": days });
        self.call(
            Method::POST,
            "/simdevice/device-certificates",
            Some(&body),
            &[],
        )
        .await
    }

    /// `GET /devices/{id}`.
    pub async fn get_device(&self, id: &str) -> Result<Value, ServiceError> {
        check_id(id)?;
        self.call(Method::GET, &device_path(id), None, &[]).await
    }

    /// `GET /devices?top=N`: up to `top` device identities.
    pub async fn list_devices(&self, top: usize) -> Result<Value, ServiceError> {
        let url = self.url("/devices", &[("top", top.to_string())]);
        Ok(self.send(Method::GET, url, None, &[], None).await?.0)
    }

    /// `DELETE /devices/{id}` with `If-Match` of `etag`, or `"*"` for any version.
    pub async fn delete_device(&self, id: &str, etag: Option<&str>) -> Result<(), ServiceError> {
        check_id(id)?;
        self.call(
            Method::DELETE,
            &device_path(id),
            None,
            &[(IF_MATCH.as_str(), if_match_value(etag))],
        )
        .await?;
        Ok(())
    }

    /// Enables or disables a device: reads it, then writes it back with the new status and
    /// `If-Match` of the etag it read, so a concurrent change is not overwritten silently.
    pub async fn set_device_status(&self, id: &str, enabled: bool) -> Result<Value, ServiceError> {
        let mut device = self.get_device(id).await?;
        let etag = device
            .get("etag")
            .and_then(Value::as_str)
            .map(str::to_string);
        let Some(fields) = device.as_object_mut() else {
            return Err(ServiceError::UnexpectedAnswer {
                request: format!("GET {}", device_path(id)),
                expected: "a device object",
            });
        };
        fields.insert(
            "status".into(),
            json!(if enabled { "enabled" } else { "disabled" }),
        );
        self.call(
            Method::PUT,
            &device_path(id),
            Some(&device),
            &[(IF_MATCH.as_str(), if_match_value(etag.as_deref()))],
        )
        .await
    }

    /// `GET /twins/{id}`.
    pub async fn get_twin(&self, id: &str) -> Result<Value, ServiceError> {
        check_id(id)?;
        self.call(Method::GET, &twin_path(id), None, &[]).await
    }

    /// `PATCH /twins/{id}` with `patch` (`{"tags":..,"properties":{"desired":..}}`): tags and
    /// desired properties are merged, `null` removes. `etag` None means any version.
    pub async fn update_twin(
        &self,
        id: &str,
        patch: &Value,
        etag: Option<&str>,
    ) -> Result<Value, ServiceError> {
        check_id(id)?;
        if !patch.is_object() {
            return Err(ServiceError::TwinPatchNotObject);
        }
        self.call(
            Method::PATCH,
            &twin_path(id),
            Some(patch),
            &[(IF_MATCH.as_str(), if_match_value(etag))],
        )
        .await
    }

    /// `POST /twins/{id}/methods`: calls a direct method and returns `{"status":..,"payload":..}`.
    /// `response_timeout` defaults to 30 s; `connect_timeout` (how long the hub waits for the
    /// device to come online) to 0.
    pub async fn invoke_method(
        &self,
        id: &str,
        method_name: &str,
        payload: Value,
        response_timeout: Option<u64>,
        connect_timeout: Option<u64>,
    ) -> Result<Value, ServiceError> {
        check_id(id)?;
        let invocation = MethodInvocation {
            method_name: method_name.to_string(),
            payload,
            response_timeout_in_seconds: response_timeout,
            connect_timeout_in_seconds: connect_timeout,
        };
        invocation.validate().map_err(ServiceError::InvalidMethod)?;
        let mut body = Map::new();
        body.insert("methodName".into(), json!(invocation.method_name));
        body.insert("payload".into(), invocation.payload);
        body.insert(
            "responseTimeoutInSeconds".into(),
            json!(response_timeout.unwrap_or(DEFAULT_RESPONSE_TIMEOUT_SECS)),
        );
        if let Some(connect) = connect_timeout {
            body.insert("connectTimeoutInSeconds".into(), json!(connect));
        }
        // The hub may take both timeouts before it answers.
        let wait = Duration::from_secs(
            response_timeout.unwrap_or(DEFAULT_RESPONSE_TIMEOUT_SECS)
                + connect_timeout.unwrap_or(0),
        ) + REQUEST_TIMEOUT;
        let url = self.url(&format!("{}/methods", twin_path(id)), &[]);
        Ok(self
            .send(
                Method::POST,
                url,
                Some(&Value::Object(body)),
                &[],
                Some(wait),
            )
            .await?
            .0)
    }

    /// `POST /devices/query`, following `x-ms-continuation` until the hub leaves it out; returns
    /// every row of every page.
    pub async fn query(&self, sql: &str) -> Result<Vec<Value>, ServiceError> {
        if sql.trim().is_empty() {
            return Err(ServiceError::EmptyQuery);
        }
        let body = json!({ "query": sql });
        let mut rows = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let headers: Vec<(&'static str, String)> = continuation
                .take()
                .map(|token| ("x-ms-continuation", token))
                .into_iter()
                .collect();
            let url = self.url("/devices/query", &[]);
            let (page, response_headers) = self
                .send(Method::POST, url, Some(&body), &headers, None)
                .await?;
            match page {
                Value::Array(items) => rows.extend(items),
                _ => {
                    return Err(ServiceError::UnexpectedAnswer {
                        request: "POST /devices/query".to_string(),
                        expected: "a JSON array",
                    })
                }
            }
            continuation = response_headers
                .get("x-ms-continuation")
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(str::to_string);
            if continuation.is_none() {
                return Ok(rows);
            }
        }
    }

    /// `GET /simdevice/events`: the telemetry the local hub accepted recently, oldest first,
    /// optionally for one device, after a sequence number, at most `limit` events. This is a
    /// simdevice extension: Azure IoT Hub serves telemetry through its Event Hubs-compatible
    /// endpoint instead and answers 404 here.
    pub async fn recent_events(
        &self,
        device: Option<&str>,
        after: Option<u64>,
        limit: Option<usize>,
    ) -> Result<Value, ServiceError> {
        let mut params = Vec::new();
        if let Some(device) = device {
            params.push(("deviceId", device.to_string()));
        }
        if let Some(after) = after {
            params.push(("after", after.to_string()));
        }
        if let Some(limit) = limit {
            params.push(("limit", limit.to_string()));
        }
        let url = self.url("/simdevice/events", &params);
        match self.send(Method::GET, url, None, &[], None).await {
            Ok((value, _)) => Ok(value),
            Err(ServiceError::Hub {
                status: 404,
                name,
                code,
                message,
            }) => {
                let hint = "GET /simdevice/events is a simdevice extension that only the local \
                            hub serves; on Azure IoT Hub read telemetry from its Event \
                            Hubs-compatible endpoint";
                let message = if message.is_empty() {
                    hint.to_string()
                } else {
                    format!("{message} ({hint})")
                };
                Err(ServiceError::Hub {
                    status: 404,
                    name,
                    code,
                    message,
                })
            }
            Err(other) => Err(other),
        }
    }
}

/// The Device Provisioning Service's enrollments (api-version 2021-10-01), for a client made
/// with a DPS service connection string (`provisioningserviceowner`): `collection` is
/// `enrollmentGroups` or `enrollments`.
impl ServiceClient {
    fn dps_url(&self, path: &str) -> String {
        format!(
            "{}{path}?api-version={}",
            self.base_url,
            crate::protocol::dps::SERVICE_API_VERSION
        )
    }

    /// `PUT /{collection}/{id}`: creates or replaces an enrollment; `etag` guards a replace.
    pub async fn dps_put(
        &self,
        collection: &str,
        id: &str,
        body: &Value,
        etag: Option<&str>,
    ) -> Result<Value, ServiceError> {
        check_id(id)?;
        let url = self.dps_url(&format!("/{collection}/{}", enc(id)));
        let headers: Vec<(&'static str, String)> = etag
            .map(|e| (IF_MATCH.as_str(), if_match_value(Some(e))))
            .into_iter()
            .collect();
        Ok(self
            .send(Method::PUT, url, Some(body), &headers, None)
            .await?
            .0)
    }

    /// `GET /{collection}/{id}`.
    pub async fn dps_get(&self, collection: &str, id: &str) -> Result<Value, ServiceError> {
        check_id(id)?;
        let url = self.dps_url(&format!("/{collection}/{}", enc(id)));
        Ok(self.send(Method::GET, url, None, &[], None).await?.0)
    }

    /// `DELETE /{collection}/{id}`, with `If-Match` of `etag` or `"*"`.
    pub async fn dps_delete(
        &self,
        collection: &str,
        id: &str,
        etag: Option<&str>,
    ) -> Result<(), ServiceError> {
        check_id(id)?;
        let url = self.dps_url(&format!("/{collection}/{}", enc(id)));
        let headers = [(IF_MATCH.as_str(), if_match_value(etag))];
        self.send(Method::DELETE, url, None, &headers, None).await?;
        Ok(())
    }

    /// `POST /{collection}/query` with the query `*`: every enrollment.
    pub async fn dps_list(&self, collection: &str) -> Result<Value, ServiceError> {
        let url = self.dps_url(&format!("/{collection}/query"));
        let body = serde_json::json!({"query": "*"});
        Ok(self
            .send(Method::POST, url, Some(&body), &[], None)
            .await?
            .0)
    }
}

fn certificate_path(name: &str) -> String {
    format!("/simdevice/certificates/{}", enc(name))
}

fn device_path(id: &str) -> String {
    format!("/devices/{}", enc(id))
}

fn twin_path(id: &str) -> String {
    format!("/twins/{}", enc(id))
}

fn check_id(id: &str) -> Result<(), ServiceError> {
    if id.is_empty() {
        return Err(ServiceError::EmptyDeviceId);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c2VjcmV0LWtleS1ieXRlcy1mb3ItdGVzdGluZw==";

    fn client() -> ServiceClient {
        let cs: ServiceConnectionString = format!(
            "HostName=h.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey={KEY}"
        )
        .parse()
        .unwrap();
        ServiceClient::new(&cs, None).unwrap()
    }

    #[test]
    fn reads_the_local_hub_error_shape() {
        let body = r#"{"Message":"ErrorCode:DeviceNotFound;Device d9 could not be found.","ExceptionMessage":"ErrorCode:404001;Tracking ID:x","errorCode":404001}"#;
        let error = parse_hub_error(404, Some("DeviceNotFound"), body);
        assert_eq!(error.code(), Some(404001));
        assert_eq!(
            error.to_string(),
            "DeviceNotFound (404001): Device d9 could not be found."
        );
    }

    #[test]
    fn reads_azure_shapes_without_a_numeric_code() {
        // Azure's registry errors carry the name only; the number comes from the name.
        let body = r#"{"Message":"ErrorCode:DeviceAlreadyExists;A device with ID 'd1' is already registered.","ExceptionMessage":"Tracking ID:abc-G:1-TimeStamp:01/01/2024 00:00:00"}"#;
        let error = parse_hub_error(409, Some("DeviceAlreadyExists"), body);
        assert_eq!(error.code(), Some(409001));
        assert_eq!(
            error.to_string(),
            "DeviceAlreadyExists (409001): A device with ID 'd1' is already registered."
        );
        // Direct-method errors: a flat object with a number and a message.
        let body = r#"{"errorCode":404103,"trackingId":"t","message":"Timed out waiting for device to connect.","info":{},"timestampUtc":"2024-01-01T00:00:00Z"}"#;
        let error = parse_hub_error(404, None, body);
        assert_eq!(
            error.to_string(),
            "DeviceNotOnline (404103): Timed out waiting for device to connect."
        );
        // JSON inside the Message string.
        let body = r#"{"Message":"{\"errorCode\":401002,\"trackingId\":\"t\",\"message\":\"IotHubUnauthorizedAccess\",\"timestampUtc\":\"x\"}","ExceptionMessage":""}"#;
        let error = parse_hub_error(401, Some("IotHubUnauthorizedAccess"), body);
        assert_eq!(error.code(), Some(401002));
        assert_eq!(error.status(), Some(401));
        assert!(error
            .to_string()
            .starts_with("IotHubUnauthorizedAccess (401002)"));
    }

    #[test]
    fn unknown_codes_and_plain_bodies_still_say_something() {
        let error = parse_hub_error(400, Some("SomethingNew"), "");
        assert_eq!(error.to_string(), "SomethingNew (HTTP 400)");
        let error = parse_hub_error(502, None, "<html>Bad Gateway</html>");
        assert_eq!(
            error.to_string(),
            "HTTP 502 Bad Gateway: <html>Bad Gateway</html>"
        );
        let long = "x".repeat(2000);
        let error = parse_hub_error(500, None, &long);
        assert!(error.to_string().len() < 600);
    }

    #[test]
    fn if_match_is_always_quoted() {
        assert_eq!(if_match_value(None), "\"*\"");
        assert_eq!(if_match_value(Some("*")), "\"*\"");
        assert_eq!(if_match_value(Some("AAAAAAAAAAE=")), "\"AAAAAAAAAAE=\"");
        assert_eq!(if_match_value(Some("\"AAAAAAAAAAE=\"")), "\"AAAAAAAAAAE=\"");
    }

    #[test]
    fn token_is_reused_then_renewed_before_expiry() {
        let client = client();
        // Forget the token `new` made at the real time.
        *client.token.lock().unwrap() = None;
        let start = 1_700_000_000;
        let first = client.authorization(start).unwrap();
        assert!(first.contains("skn=iothubowner"));
        assert!(first.contains(&format!("se={}", start + TOKEN_LIFETIME_SECS)));
        // Still well within its life: the same token.
        assert_eq!(client.authorization(start + 1000).unwrap(), first);
        // Within the renewal margin: a new token with a later expiry.
        let later = start + TOKEN_LIFETIME_SECS - TOKEN_RENEW_MARGIN_SECS;
        let renewed = client.authorization(later).unwrap();
        assert_ne!(renewed, first);
        assert!(renewed.contains(&format!("se={}", later + TOKEN_LIFETIME_SECS)));
    }

    #[test]
    fn urls_encode_ids_and_end_with_the_api_version() {
        let client = client();
        assert_eq!(
            client.url(&device_path("a b/c"), &[]),
            "https://h.azure-devices.net/devices/a%20b%2Fc?api-version=2021-04-12"
        );
        assert_eq!(
            client.url("/simdevice/events", &[("deviceId", "d 1".into())]),
            "https://h.azure-devices.net/simdevice/events?deviceId=d%201&api-version=2021-04-12"
        );
    }

    #[test]
    fn debug_hides_the_key() {
        let text = format!("{:?}", client());
        assert!(!text.contains(KEY), "{text}");
    }

    #[test]
    fn a_key_that_is_not_base64_is_a_config_error() {
        let cs = ServiceConnectionString {
            host_name: "h".into(),
            shared_access_key_name: "p".into(),
            shared_access_key: "not base64!".into(),
        };
        let error = ServiceClient::new(&cs, None).unwrap_err();
        assert!(error.is_usage());
        assert!(matches!(error, ServiceError::Token(_)), "{error}");
        let source = std::error::Error::source(&error).expect("the SAS error");
        assert_eq!(
            source.to_string(),
            "the shared access key is not valid base64"
        );
        assert!(!error.to_string().contains("not base64!"));
    }

    #[test]
    fn an_extra_ca_without_a_usable_certificate_is_refused_with_its_cause() {
        let cs: ServiceConnectionString = format!(
            "HostName=h.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey={KEY}"
        )
        .parse()
        .unwrap();
        let error = ServiceClient::new(&cs, Some("not PEM at all")).unwrap_err();
        assert!(matches!(error, ServiceError::CaEmpty), "{error}");
        assert!(error.is_usage());
        // PEM armour around bytes that are no certificate: rustls says why.
        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let error = ServiceClient::new(&cs, Some(garbage)).unwrap_err();
        assert!(matches!(error, ServiceError::CaUnusable(_)), "{error}");
        assert_eq!(error.to_string(), "an extra CA certificate is not usable");
        assert!(std::error::Error::source(&error).is_some());
        assert!(error.is_usage());
    }

    #[test]
    fn refusals_before_sending_are_usage_errors() {
        for error in [
            ServiceError::EmptyDeviceId,
            ServiceError::EmptyQuery,
            ServiceError::TwinPatchNotObject,
            ServiceError::InvalidMethod(MethodError::EmptyName),
        ] {
            assert!(error.is_usage(), "{error}");
        }
        assert!(!parse_hub_error(401, None, "").is_usage());
    }
}
