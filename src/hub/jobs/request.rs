//! The body of `PUT /jobs/v2/{id}` and the checks it passes before it becomes a job record:
//! the job id, the type and its method or twin update, the query condition, the start time and
//! the execution limit. Pure: every refusal is a 400 (ArgumentInvalid) naming the field.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use super::model::{format_time, parse_time, JobRecord, JobStatus, JobType};
use crate::hub::error::IotHubError;
use crate::hub::query::parse_condition;
use crate::protocol::method::{
    MethodInvocation, DEFAULT_CONNECT_TIMEOUT_SECS, DEFAULT_RESPONSE_TIMEOUT_SECS,
};
use crate::protocol::twin::{self, Section};

/// `maxExecutionTimeInSeconds` when the request leaves it out.
pub const DEFAULT_MAX_EXECUTION_SECS: u64 = 3600;
/// IoT Hub's job id rule: up to 64 ASCII letters, digits and dashes.
const MAX_JOB_ID_CHARS: usize = 64;

/// The body of `PUT /jobs/v2/{id}`. Everything is optional here so that a missing field gets
/// a 400 that names it, not a serde message.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRequest {
    pub job_id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub cloud_to_device_method: Option<MethodInvocation>,
    pub update_twin: Option<Value>,
    pub query_condition: Option<String>,
    pub start_time: Option<String>,
    pub max_execution_time_in_seconds: Option<u64>,
}

fn check_job_id(id: &str) -> Result<(), IotHubError> {
    let valid = !id.is_empty()
        && id.chars().count() <= MAX_JOB_ID_CHARS
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if valid {
        Ok(())
    } else {
        Err(IotHubError::argument(format!(
            "job id {id:?} is invalid: use 1 to {MAX_JOB_ID_CHARS} ASCII letters, digits and dashes"
        )))
    }
}

/// Checks an `updateTwin` document; returns the patch and the etag to use as `If-Match`.
pub(super) fn check_update_twin(update: &Value) -> Result<(Value, Option<String>), IotHubError> {
    let object = update
        .as_object()
        .ok_or_else(|| IotHubError::argument("updateTwin must be a JSON object"))?;
    let tags = object.get("tags").filter(|t| !t.is_null());
    let properties = object.get("properties").filter(|p| !p.is_null());
    let desired = properties
        .and_then(|p| p.get("desired"))
        .filter(|d| !d.is_null());
    if properties
        .and_then(|p| p.get("reported"))
        .and_then(Value::as_object)
        .is_some_and(|r| r.keys().any(|k| !k.starts_with('$')))
    {
        return Err(IotHubError::argument(
            "updateTwin may not set reported properties: they are set by the device only",
        ));
    }
    if tags.is_none() && desired.is_none() {
        return Err(IotHubError::argument(
            "updateTwin must set tags or properties.desired",
        ));
    }
    let invalid = |e: twin::TwinError| IotHubError::argument(format!("updateTwin: {e}"));
    if let Some(tags) = tags {
        twin::validate_patch(Section::Tags, tags).map_err(invalid)?;
    }
    if let Some(desired) = desired {
        twin::validate_patch(Section::Desired, desired).map_err(invalid)?;
    }
    let etag = match object.get("etag") {
        None | Some(Value::Null) => None,
        Some(Value::String(etag)) => Some(etag.clone()),
        Some(_) => return Err(IotHubError::argument("updateTwin.etag must be a string")),
    };
    Ok((update.clone(), etag))
}

/// Checks a job request for the job `id` and turns it into the record to store, with the
/// parsed start time: `scheduled` when it starts after `now`, else `queued`. The defaults of
/// the method's timeouts and of `maxExecutionTimeInSeconds` are filled in.
pub(super) fn check(
    id: &str,
    request: JobRequest,
    now: DateTime<Utc>,
) -> Result<(JobRecord, DateTime<Utc>), IotHubError> {
    check_job_id(id)?;
    if request
        .job_id
        .as_deref()
        .is_some_and(|body_id| body_id != id)
    {
        return Err(IotHubError::argument(
            "jobId in the body differs from the one in the path",
        ));
    }
    let kind_text = request.kind.as_deref().unwrap_or_default();
    let kind = JobType::parse(kind_text).ok_or_else(|| {
        IotHubError::argument(format!(
            "type {kind_text:?} is not supported: use scheduleDeviceMethod or scheduleUpdateTwin"
        ))
    })?;
    let (cloud_to_device_method, update_twin) = match kind {
        JobType::ScheduleDeviceMethod => {
            let mut method = request.cloud_to_device_method.ok_or_else(|| {
                IotHubError::argument("a scheduleDeviceMethod job needs cloudToDeviceMethod")
            })?;
            method
                .validate()
                .map_err(|e| IotHubError::argument(format!("cloudToDeviceMethod: {e}")))?;
            method
                .response_timeout_in_seconds
                .get_or_insert(DEFAULT_RESPONSE_TIMEOUT_SECS);
            method
                .connect_timeout_in_seconds
                .get_or_insert(DEFAULT_CONNECT_TIMEOUT_SECS);
            (Some(method), None)
        }
        JobType::ScheduleUpdateTwin => {
            let update = request.update_twin.ok_or_else(|| {
                IotHubError::argument("a scheduleUpdateTwin job needs updateTwin")
            })?;
            check_update_twin(&update)?;
            (None, Some(update))
        }
    };
    let query_condition = request
        .query_condition
        .filter(|c| !c.trim().is_empty())
        .ok_or_else(|| IotHubError::argument("queryCondition is required"))?;
    parse_condition(&query_condition)
        .map_err(|e| IotHubError::argument(format!("queryCondition: {e}")))?;
    let max_execution = request
        .max_execution_time_in_seconds
        .unwrap_or(DEFAULT_MAX_EXECUTION_SECS);
    if max_execution == 0 {
        return Err(IotHubError::argument(
            "maxExecutionTimeInSeconds must be at least 1",
        ));
    }
    let start_at = match request.start_time.as_deref() {
        None => now,
        Some(text) => parse_time(text).ok_or_else(|| {
            IotHubError::argument(format!("startTime {text:?} is not an ISO-8601 time"))
        })?,
    };
    let record = JobRecord {
        job_id: id.to_string(),
        kind,
        query_condition,
        created_time: format_time(now),
        start_time: format_time(start_at),
        end_time: None,
        max_execution_time_in_seconds: max_execution,
        status: if start_at > now {
            JobStatus::Scheduled
        } else {
            JobStatus::Queued
        },
        cloud_to_device_method,
        update_twin,
        failure_reason: None,
        status_message: None,
    };
    Ok((record, start_at))
}
