//! A job as the hub keeps it: its type and status, the stored record, one row per device, and
//! the JSON the API answers for it. Plain data and the small rules that belong to it (what
//! counts as waiting or unfinished, how a row fails); no store, no lock, no task.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::hub::error::IotHubError;
use crate::protocol::error_code::ErrorCode;
use crate::protocol::method::MethodInvocation;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum JobType {
    ScheduleDeviceMethod,
    ScheduleUpdateTwin,
}

impl JobType {
    pub(super) fn parse(text: &str) -> Option<JobType> {
        match text {
            "scheduleDeviceMethod" => Some(JobType::ScheduleDeviceMethod),
            "scheduleUpdateTwin" => Some(JobType::ScheduleUpdateTwin),
            _ => None,
        }
    }

    pub(super) fn as_str(self) -> &'static str {
        match self {
            JobType::ScheduleDeviceMethod => "scheduleDeviceMethod",
            JobType::ScheduleUpdateTwin => "scheduleUpdateTwin",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum JobStatus {
    Queued,
    Scheduled,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Scheduled => "scheduled",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub(super) fn is_waiting(self) -> bool {
        matches!(self, JobStatus::Queued | JobStatus::Scheduled)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DeviceJobStatus {
    Pending,
    Running,
    Completed,
    Failed,
    Canceled,
}

impl DeviceJobStatus {
    pub(super) fn is_unfinished(self) -> bool {
        matches!(self, DeviceJobStatus::Pending | DeviceJobStatus::Running)
    }
}

/// A job as stored and as returned (plus `deviceJobStatistics`, computed from the rows).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct JobRecord {
    pub(super) job_id: String,
    #[serde(rename = "type")]
    pub(super) kind: JobType,
    pub(super) query_condition: String,
    pub(super) created_time: String,
    pub(super) start_time: String,
    pub(super) end_time: Option<String>,
    pub(super) max_execution_time_in_seconds: u64,
    pub(super) status: JobStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) cloud_to_device_method: Option<MethodInvocation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) update_twin: Option<Value>,
    pub(super) failure_reason: Option<String>,
    pub(super) status_message: Option<String>,
}

/// The error of a failed device row (IoT Hub's `DeviceJobError`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DeviceJobError {
    pub code: String,
    pub description: String,
}

/// One device's progress in one job: a row of `SELECT * FROM devices.jobs`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct DeviceJobRow {
    pub(super) device_id: String,
    pub(super) job_id: String,
    pub(super) job_type: JobType,
    pub(super) status: DeviceJobStatus,
    pub(super) start_time_utc: Option<String>,
    pub(super) end_time_utc: Option<String>,
    pub(super) created_date_time_utc: String,
    pub(super) last_updated_date_time_utc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) outcome: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<DeviceJobError>,
}

impl DeviceJobRow {
    pub(super) fn fail(&mut self, now: &str, code: &str, description: String) {
        self.status = DeviceJobStatus::Failed;
        self.end_time_utc = Some(now.to_string());
        self.last_updated_date_time_utc = now.to_string();
        self.error = Some(DeviceJobError {
            code: code.to_string(),
            description,
        });
    }
}

pub(super) struct Entry {
    pub(super) record: JobRecord,
    /// `record.start_time`, parsed.
    pub(super) start_at: DateTime<Utc>,
    pub(super) rows: BTreeMap<String, DeviceJobRow>,
}

impl Entry {
    pub(super) fn to_response(&self) -> Value {
        let mut value = serde_json::to_value(&self.record).unwrap_or_else(|_| json!({}));
        let count = |status| {
            self.rows
                .values()
                .filter(|row| row.status == status)
                .count()
        };
        if let Some(object) = value.as_object_mut() {
            object.insert(
                "deviceJobStatistics".into(),
                json!({
                    "deviceCount": self.rows.len(),
                    "failedCount": count(DeviceJobStatus::Failed),
                    "succeededCount": count(DeviceJobStatus::Completed),
                    "runningCount": count(DeviceJobStatus::Running),
                    "pendingCount": count(DeviceJobStatus::Pending),
                }),
            );
        }
        value
    }
}

/// What a runner does on each device.
#[derive(Clone)]
pub(super) enum Action {
    Method(MethodInvocation),
    Twin { patch: Value, etag: Option<String> },
}

/// A job that has just started: what to do, and to which devices.
pub(super) struct Run {
    pub(super) job_id: String,
    pub(super) action: Action,
    pub(super) devices: Vec<String>,
    pub(super) max_execution: Duration,
}

pub(super) fn format_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub(super) fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

pub(super) fn job_not_found(id: &str) -> IotHubError {
    IotHubError::new(ErrorCode::JobNotFound, format!("Job {id} not found."))
}
