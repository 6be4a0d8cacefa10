//! The Device Provisioning Service (DPS) over MQTT, as the device SDKs speak it: the CONNECT
//! user name and SAS resource, the request and response topics, and the JSON of a
//! registration request, its operation status and its errors. The local DPS (`hub::dps`) and
//! the agent's registration client (`agent::provision`) both build and parse the wire through
//! these functions.
//!
//! Facts (Microsoft's "Communicate with DPS using the MQTT protocol", azure-iot-device 2.14
//! `provisioning/pipeline`): client id = registration id; user name
//! `{idScope}/registrations/{registrationId}/api-version=2019-03-31` (the Python SDK appends
//! `&ClientVersion=...`); SAS resource `{idScope}/registrations/{registrationId}` with
//! `skn=registration` (Python sends no `skn`); subscribe `$dps/registrations/res/#`; publish
//! `{"registrationId":..,"payload":..}` to `$dps/registrations/PUT/iotdps-register/?$rid={rid}`,
//! poll `$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={op}`;
//! answers on `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]`.
//!
//! Pure: no I/O, no clock.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::protocol::encoding::{dec, enc};

/// The device API version of the DPS MQTT user name.
pub const DEVICE_API_VERSION: &str = "2019-03-31";
/// The DPS service REST API version (enrollments).
pub const SERVICE_API_VERSION: &str = "2021-10-01";
/// The public global device endpoint.
pub const GLOBAL_ENDPOINT: &str = "global.azure-devices-provisioning.net";
/// What a device subscribes to for every answer.
pub const RESPONSE_FILTER: &str = "$dps/registrations/res/#";
/// The `skn` of a device's registration token (optional: the Python SDK sends none).
pub const REGISTRATION_KEY_NAME: &str = "registration";
/// The name of the DPS service policy with every right.
pub const SERVICE_OWNER_POLICY: &str = "provisioningserviceowner";

const REGISTER_PREFIX: &str = "$dps/registrations/PUT/iotdps-register/";
const STATUS_PREFIX: &str = "$dps/registrations/GET/iotdps-get-operationstatus/";
const RESPONSE_PREFIX: &str = "$dps/registrations/res/";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpsWireError {
    #[error("the user name is not {{idScope}}/registrations/{{registrationId}}/...")]
    Username,
    #[error("the SAS resource is not {{idScope}}/registrations/{{registrationId}}")]
    Resource,
    #[error("topic {0:?} is not a DPS request topic")]
    RequestTopic(String),
    #[error("topic {0:?} is not a DPS response topic")]
    ResponseTopic(String),
    #[error("the topic's {0} is missing or not percent-encoded text")]
    TopicField(&'static str),
}

/// The CONNECT user name of a registration.
pub fn username(id_scope: &str, registration_id: &str) -> String {
    format!("{id_scope}/registrations/{registration_id}/api-version={DEVICE_API_VERSION}")
}

/// `(idScope, registrationId)` of a CONNECT user name; the query part is the SDK's business.
pub fn parse_username(username: &str) -> Result<(&str, &str), DpsWireError> {
    let mut parts = username.splitn(4, '/');
    let scope = parts.next().filter(|s| !s.is_empty());
    let keyword = parts.next();
    let registration = parts.next().filter(|s| !s.is_empty());
    match (scope, keyword, registration) {
        (Some(scope), Some("registrations"), Some(registration)) => Ok((scope, registration)),
        _ => Err(DpsWireError::Username),
    }
}

/// The SAS resource of a registration (unencoded).
pub fn sas_resource(id_scope: &str, registration_id: &str) -> String {
    format!("{id_scope}/registrations/{registration_id}")
}

/// `(idScope, registrationId)` of a decoded SAS resource.
pub fn parse_sas_resource(resource: &str) -> Result<(&str, &str), DpsWireError> {
    match resource.split_once("/registrations/") {
        Some((scope, registration))
            if !scope.is_empty() && !registration.is_empty() && !registration.contains('/') =>
        {
            Ok((scope, registration))
        }
        _ => Err(DpsWireError::Resource),
    }
}

pub fn register_topic(rid: &str) -> String {
    format!("{REGISTER_PREFIX}?$rid={}", enc(rid))
}

pub fn status_topic(rid: &str, operation_id: &str) -> String {
    format!(
        "{STATUS_PREFIX}?$rid={}&operationId={}",
        enc(rid),
        enc(operation_id)
    )
}

pub fn response_topic(status: u16, rid: &str, retry_after_s: Option<u64>) -> String {
    let mut topic = format!("{RESPONSE_PREFIX}{status}/?$rid={}", enc(rid));
    if let Some(seconds) = retry_after_s {
        topic.push_str(&format!("&retry-after={seconds}"));
    }
    topic
}

/// What a device asks of DPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DpsRequest {
    Register { rid: String },
    Status { rid: String, operation_id: String },
}

/// One `name=value` of a topic's query, percent-decoded.
fn query_field(query: &str, name: &'static str) -> Result<Option<String>, DpsWireError> {
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == name {
            return dec(value)
                .map(Some)
                .map_err(|_| DpsWireError::TopicField(name));
        }
    }
    Ok(None)
}

fn required(query: &str, name: &'static str) -> Result<String, DpsWireError> {
    query_field(query, name)?.ok_or(DpsWireError::TopicField(name))
}

pub fn parse_request_topic(topic: &str) -> Result<DpsRequest, DpsWireError> {
    if let Some(query) = topic.strip_prefix(REGISTER_PREFIX) {
        let query = query.strip_prefix('?').unwrap_or(query);
        return Ok(DpsRequest::Register {
            rid: required(query, "$rid")?,
        });
    }
    if let Some(query) = topic.strip_prefix(STATUS_PREFIX) {
        let query = query.strip_prefix('?').unwrap_or(query);
        return Ok(DpsRequest::Status {
            rid: required(query, "$rid")?,
            operation_id: required(query, "operationId")?,
        });
    }
    Err(DpsWireError::RequestTopic(topic.to_string()))
}

/// An answer's topic: its status, the request id and the `retry-after` seconds, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpsResponse {
    pub status: u16,
    pub rid: String,
    pub retry_after_s: Option<u64>,
}

pub fn parse_response_topic(topic: &str) -> Result<DpsResponse, DpsWireError> {
    let bad = || DpsWireError::ResponseTopic(topic.to_string());
    let rest = topic.strip_prefix(RESPONSE_PREFIX).ok_or_else(bad)?;
    let (status, query) = rest.split_once("/?").ok_or_else(bad)?;
    let status = status.parse::<u16>().map_err(|_| bad())?;
    let retry_after_s = query_field(query, "retry-after")?.and_then(|s| s.parse().ok());
    Ok(DpsResponse {
        status,
        rid: required(query, "$rid")?,
        retry_after_s,
    })
}

/// The body of a register request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterRequest {
    pub registration_id: String,
    /// Custom data the device passes to the allocation (kept, not interpreted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
}

/// `status` of an operation and of a registration state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RegistrationStatus {
    Unassigned,
    Assigning,
    Assigned,
    Failed,
    Disabled,
}

/// `registrationState` of an operation status: the outcome of a registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationState {
    pub registration_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    pub status: RegistrationStatus,
    /// `initialAssignment`, `deviceDataMigrated`, `deviceDataReset`, `reprovisionedToInitialAssignment`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
}

/// The body of a register or status answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationStatus {
    pub operation_id: String,
    pub status: RegistrationStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<RegistrationState>,
}

/// DPS's error body, on the device side and in the service REST API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DpsErrorBody {
    pub error_code: u32,
    #[serde(default)]
    pub tracking_id: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub timestamp_utc: String,
}

/// DPS error codes this project uses: the HTTP status times 1000 plus a detail, as DPS
/// writes them (401002 is the documented "unauthorized"; the others follow the same scheme).
pub mod error_code {
    pub const BAD_REQUEST: u32 = 400_004;
    pub const UNAUTHORIZED: u32 = 401_002;
    pub const ENROLLMENT_DISABLED: u32 = 401_003;
    pub const NOT_FOUND: u32 = 404_201;
    pub const OPERATION_NOT_FOUND: u32 = 404_203;
    pub const CONFLICT: u32 = 409_201;
    pub const PRECONDITION_FAILED: u32 = 412_002;
    pub const THROTTLED: u32 = 429_001;
    pub const INTERNAL: u32 = 500_001;

    /// The HTTP status of a code (its first three digits).
    pub fn http_status(code: u32) -> u16 {
        u16::try_from(code / 1000).unwrap_or(500)
    }
}

/// An enrollment's `initialTwin` as `{tags, properties: {desired}}`: the parts a new device's
/// twin starts with. Missing parts are empty.
pub fn initial_twin_parts(initial_twin: &Value) -> (Map<String, Value>, Map<String, Value>) {
    let tags = initial_twin
        .get("tags")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let desired = initial_twin
        .pointer("/properties/desired")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    (tags, desired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn user_names_of_the_docs_and_of_the_python_sdk_parse() {
        assert_eq!(
            username("0ne00000001", "dev-1"),
            "0ne00000001/registrations/dev-1/api-version=2019-03-31"
        );
        assert_eq!(
            parse_username("0ne00000001/registrations/dev-1/api-version=2019-03-31"),
            Ok(("0ne00000001", "dev-1"))
        );
        assert_eq!(
            parse_username(
                "0ne00000001/registrations/dev-1/api-version=2019-03-31&ClientVersion=azure-iot-device%2F2.14.0"
            ),
            Ok(("0ne00000001", "dev-1"))
        );
        assert_eq!(
            parse_username("localhost/dev-1/?api-version=2021-04-12"),
            Err(DpsWireError::Username)
        );
        assert_eq!(
            parse_username("0ne/registrations/"),
            Err(DpsWireError::Username)
        );
    }

    #[test]
    fn the_sas_resource_names_scope_and_registration() {
        let resource = sas_resource("0ne00000001", "dev-1");
        assert_eq!(resource, "0ne00000001/registrations/dev-1");
        assert_eq!(parse_sas_resource(&resource), Ok(("0ne00000001", "dev-1")));
        assert_eq!(
            parse_sas_resource("localhost/devices/dev-1"),
            Err(DpsWireError::Resource)
        );
        assert_eq!(
            parse_sas_resource("0ne/registrations/a/b"),
            Err(DpsWireError::Resource)
        );
    }

    #[test]
    fn request_topics_round_trip() {
        assert_eq!(
            register_topic("1"),
            "$dps/registrations/PUT/iotdps-register/?$rid=1"
        );
        assert_eq!(
            parse_request_topic(&register_topic("a b")),
            Ok(DpsRequest::Register { rid: "a b".into() })
        );
        assert_eq!(
            status_topic("7", "4.abc"),
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=7&operationId=4.abc"
        );
        assert_eq!(
            parse_request_topic(&status_topic("7", "4.abc")),
            Ok(DpsRequest::Status {
                rid: "7".into(),
                operation_id: "4.abc".into()
            })
        );
        assert!(matches!(
            parse_request_topic("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=7"),
            Err(DpsWireError::TopicField("operationId"))
        ));
        assert!(matches!(
            parse_request_topic("devices/d/messages/events/"),
            Err(DpsWireError::RequestTopic(_))
        ));
    }

    #[test]
    fn response_topics_carry_status_rid_and_retry_after() {
        let topic = response_topic(202, "3", Some(2));
        assert_eq!(topic, "$dps/registrations/res/202/?$rid=3&retry-after=2");
        assert_eq!(
            parse_response_topic(&topic),
            Ok(DpsResponse {
                status: 202,
                rid: "3".into(),
                retry_after_s: Some(2)
            })
        );
        assert_eq!(
            parse_response_topic("$dps/registrations/res/200/?$rid=3"),
            Ok(DpsResponse {
                status: 200,
                rid: "3".into(),
                retry_after_s: None
            })
        );
        assert!(parse_response_topic("$dps/registrations/res/abc/?$rid=3").is_err());
    }

    #[test]
    fn the_operation_status_json_has_the_service_names() {
        let status = OperationStatus {
            operation_id: "op".into(),
            status: RegistrationStatus::Assigned,
            registration_state: Some(RegistrationState {
                registration_id: "dev-1".into(),
                created_date_time_utc: Some("2026-01-01T00:00:00Z".into()),
                assigned_hub: Some("localhost".into()),
                device_id: Some("dev-1".into()),
                status: RegistrationStatus::Assigned,
                substatus: Some("initialAssignment".into()),
                error_code: None,
                error_message: None,
                last_updated_date_time_utc: Some("2026-01-01T00:00:00Z".into()),
                etag: Some("\"1\"".into()),
                payload: Some(json!({"a": 1})),
            }),
        };
        let text = serde_json::to_value(&status).unwrap();
        assert_eq!(text["operationId"], "op");
        assert_eq!(text["status"], "assigned");
        assert_eq!(text["registrationState"]["assignedHub"], "localhost");
        assert_eq!(text["registrationState"]["deviceId"], "dev-1");
        assert_eq!(
            text["registrationState"]["lastUpdatedDateTimeUtc"],
            "2026-01-01T00:00:00Z"
        );
        assert_eq!(text["registrationState"]["payload"]["a"], 1);
        let back: OperationStatus = serde_json::from_value(text).unwrap();
        assert_eq!(back, status);
        // The Python SDK's register body, sorted keys.
        let request: RegisterRequest =
            serde_json::from_str(r#"{"payload": null, "registrationId": "dev-1"}"#).unwrap();
        assert_eq!(request.registration_id, "dev-1");
    }

    #[test]
    fn error_codes_carry_their_status() {
        assert_eq!(error_code::http_status(error_code::UNAUTHORIZED), 401);
        assert_eq!(error_code::http_status(error_code::NOT_FOUND), 404);
        let body: DpsErrorBody = serde_json::from_value(json!({
            "errorCode": 401002, "trackingId": "t", "message": "Unauthorized",
            "timestampUtc": "2026-01-01T00:00:00Z"
        }))
        .unwrap();
        assert_eq!(body.error_code, 401002);
    }

    #[test]
    fn initial_twin_parts_are_tags_and_desired() {
        let (tags, desired) = initial_twin_parts(&json!({
            "tags": {"site": "a"}, "properties": {"desired": {"interval": 5}}
        }));
        assert_eq!(tags["site"], "a");
        assert_eq!(desired["interval"], 5);
        let (tags, desired) = initial_twin_parts(&json!({}));
        assert!(tags.is_empty() && desired.is_empty());
    }
}
