//! Scheduled jobs (`/jobs/v2`): a direct method or a twin update run at a given time on every
//! device that a query condition matches, with one row of progress per device.
//!
//! [`Jobs`] holds every job and its device rows in memory and in the store (tables `jobs` and
//! `job_devices`); each change is written before it is visible, under one lock. [`run_scheduler`]
//! is one task of the hub: it sleeps until the next job is due (or a job is created), then starts
//! a runner task per due job. A runner picks the devices the condition matches *at that moment*,
//! writes them as `pending` rows, and works through them at most [`RUN_CONCURRENCY`] at a time,
//! through `methods::invoke` or `twins::update` (with the job's etag as `If-Match`), so a job
//! obeys exactly the rules of the single-device REST calls. It never touches a socket.
//!
//! Rules worth knowing:
//! - As on IoT Hub, a job whose devices failed still ends `completed`; the failures are counted
//!   in `deviceJobStatistics.failedCount` and explained in each row's `error`. A method job's row
//!   is `completed` whenever the device answered, whatever status it chose.
//! - When `maxExecutionTimeInSeconds` (default 3600, counted from the start) runs out, the calls
//!   in flight are dropped, every unfinished row becomes `failed` and the job ends `failed`.
//! - Cancelling turns the `pending` rows `canceled` (sic, as IoT Hub spells device rows) and the
//!   job `cancelled`; calls already in flight finish and record their outcome.
//! - A restart keeps queued and scheduled jobs (a start time that passed while the hub was down
//!   starts the job at once). A job that was `running` when the hub stopped is NOT resumed: it is
//!   marked `failed`, and so are its unfinished rows. Re-running would call a method twice on
//!   devices whose call was in flight, and methods need not be idempotent.
//! - Jobs are never purged (IoT Hub keeps them 30 days).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::error::IotHubError;
use super::query::{parse_condition, Condition};
use super::registry::now_iso;
use super::store::Store;
use super::{methods, twins, HubState};
use crate::protocol::error_code::ErrorCode;
use crate::protocol::method::{
    MethodInvocation, DEFAULT_CONNECT_TIMEOUT_SECS, DEFAULT_RESPONSE_TIMEOUT_SECS,
};
use crate::protocol::twin::{self, Section};

/// Devices one job works on at the same time.
pub const RUN_CONCURRENCY: usize = 16;
/// `maxExecutionTimeInSeconds` when the request leaves it out.
pub const DEFAULT_MAX_EXECUTION_SECS: u64 = 3600;
/// IoT Hub's job id rule: up to 64 ASCII letters, digits and dashes.
const MAX_JOB_ID_CHARS: usize = 64;
/// The scheduler looks again at least this often, so a clock change cannot stall it for long.
const MAX_SCHEDULER_SLEEP: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum JobType {
    ScheduleDeviceMethod,
    ScheduleUpdateTwin,
}

impl JobType {
    fn parse(text: &str) -> Option<JobType> {
        match text {
            "scheduleDeviceMethod" => Some(JobType::ScheduleDeviceMethod),
            "scheduleUpdateTwin" => Some(JobType::ScheduleUpdateTwin),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
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
    fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Scheduled => "scheduled",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    fn is_waiting(self) -> bool {
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
    fn is_unfinished(self) -> bool {
        matches!(self, DeviceJobStatus::Pending | DeviceJobStatus::Running)
    }
}

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

/// A job as stored and as returned (plus `deviceJobStatistics`, computed from the rows).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobRecord {
    job_id: String,
    #[serde(rename = "type")]
    kind: JobType,
    query_condition: String,
    created_time: String,
    start_time: String,
    end_time: Option<String>,
    max_execution_time_in_seconds: u64,
    status: JobStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cloud_to_device_method: Option<MethodInvocation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    update_twin: Option<Value>,
    failure_reason: Option<String>,
    status_message: Option<String>,
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
struct DeviceJobRow {
    device_id: String,
    job_id: String,
    job_type: JobType,
    status: DeviceJobStatus,
    start_time_utc: Option<String>,
    end_time_utc: Option<String>,
    created_date_time_utc: String,
    last_updated_date_time_utc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outcome: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<DeviceJobError>,
}

impl DeviceJobRow {
    fn fail(&mut self, now: &str, code: &str, description: String) {
        self.status = DeviceJobStatus::Failed;
        self.end_time_utc = Some(now.to_string());
        self.last_updated_date_time_utc = now.to_string();
        self.error = Some(DeviceJobError {
            code: code.to_string(),
            description,
        });
    }
}

struct Entry {
    record: JobRecord,
    /// `record.start_time`, parsed.
    start_at: DateTime<Utc>,
    rows: BTreeMap<String, DeviceJobRow>,
}

impl Entry {
    fn to_response(&self) -> Value {
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
enum Action {
    Method(MethodInvocation),
    Twin { patch: Value, etag: Option<String> },
}

/// A job that has just started: what to do, and to which devices.
struct Run {
    job_id: String,
    action: Action,
    devices: Vec<String>,
    max_execution: Duration,
}

/// Every job of the hub.
pub struct Jobs {
    store: Arc<Store>,
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Wakes the scheduler: a job was created.
    changed: Notify,
}

fn format_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn job_not_found(id: &str) -> IotHubError {
    IotHubError::new(ErrorCode::JobNotFound, format!("Job {id} not found."))
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
fn check_update_twin(update: &Value) -> Result<(Value, Option<String>), IotHubError> {
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

impl Jobs {
    /// Loads the stored jobs. A job that was running when the hub stopped is marked failed
    /// (see the module notes), and written back so.
    pub fn load(store: Arc<Store>) -> Result<Jobs, IotHubError> {
        let mut entries = BTreeMap::new();
        for (id, doc) in store.load_jobs()? {
            let record: JobRecord = serde_json::from_str(&doc).map_err(|e| {
                IotHubError::internal(format!("stored job {id} cannot be read: {e}"))
            })?;
            let start_at = parse_time(&record.start_time).unwrap_or_else(Utc::now);
            entries.insert(
                id,
                Entry {
                    record,
                    start_at,
                    rows: BTreeMap::new(),
                },
            );
        }
        for (job_id, device_id, doc) in store.load_job_devices()? {
            let row: DeviceJobRow = serde_json::from_str(&doc).map_err(|e| {
                IotHubError::internal(format!(
                    "stored row of job {job_id}, device {device_id} cannot be read: {e}"
                ))
            })?;
            if let Some(entry) = entries.get_mut(&job_id) {
                entry.rows.insert(device_id, row);
            }
        }
        let jobs = Jobs {
            store,
            entries: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
        };
        let now = now_iso();
        for entry in entries.values_mut() {
            if entry.record.status != JobStatus::Running {
                continue;
            }
            tracing::warn!(job = %entry.record.job_id, "job was running when the hub stopped; marked failed");
            entry.record.status = JobStatus::Failed;
            entry.record.end_time = Some(now.clone());
            entry.record.failure_reason =
                Some("the hub stopped while the job was running; it was not resumed".into());
            let mut changed_rows = Vec::new();
            for row in entry.rows.values_mut() {
                if row.status.is_unfinished() {
                    row.fail(
                        &now,
                        "JobInterrupted",
                        "the hub stopped before this device's part of the job finished".into(),
                    );
                    changed_rows.push(row.clone());
                }
            }
            jobs.persist(&entry.record, &changed_rows)?;
        }
        *jobs.lock() = entries;
        Ok(jobs)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a job document and some of its rows in one transaction.
    fn persist(&self, record: &JobRecord, rows: &[DeviceJobRow]) -> Result<(), IotHubError> {
        let encode =
            |e: serde_json::Error| IotHubError::internal(format!("cannot encode job: {e}"));
        let doc = serde_json::to_string(record).map_err(encode)?;
        let rows = rows
            .iter()
            .map(|row| {
                Ok((
                    row.device_id.clone(),
                    serde_json::to_string(row).map_err(encode)?,
                ))
            })
            .collect::<Result<Vec<_>, IotHubError>>()?;
        self.store
            .put_job_with_devices(&record.job_id, Some(&doc), &rows)?;
        Ok(())
    }

    /// Writes rows only.
    fn persist_rows(&self, job_id: &str, rows: &[&DeviceJobRow]) -> Result<(), IotHubError> {
        let rows = rows
            .iter()
            .map(|row| {
                serde_json::to_string(row)
                    .map(|doc| (row.device_id.clone(), doc))
                    .map_err(|e| IotHubError::internal(format!("cannot encode job row: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.store.put_job_with_devices(job_id, None, &rows)?;
        Ok(())
    }

    /// `PUT /jobs/v2/{id}`: checks and stores a new job; 409104 when the id is taken.
    pub fn create(&self, id: &str, request: JobRequest) -> Result<Value, IotHubError> {
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
        let now = Utc::now();
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

        let mut entries = self.lock();
        if entries.contains_key(id) {
            return Err(IotHubError::new(
                ErrorCode::JobAlreadyExists,
                format!("A job with id {id} already exists."),
            ));
        }
        self.persist(&record, &[])?;
        let entry = Entry {
            record,
            start_at,
            rows: BTreeMap::new(),
        };
        let response = entry.to_response();
        entries.insert(id.to_string(), entry);
        drop(entries);
        tracing::info!(job = id, kind = kind.as_str(), "job created");
        self.changed.notify_one();
        Ok(response)
    }

    /// `GET /jobs/v2/{id}`.
    pub fn get(&self, id: &str) -> Result<Value, IotHubError> {
        self.lock()
            .get(id)
            .map(Entry::to_response)
            .ok_or_else(|| job_not_found(id))
    }

    /// `POST /jobs/v2/{id}/cancel`: a job that has not ended is cancelled and its pending rows
    /// canceled; a job that has ended is returned as it is.
    pub fn cancel(&self, id: &str) -> Result<Value, IotHubError> {
        let mut entries = self.lock();
        let entry = entries.get_mut(id).ok_or_else(|| job_not_found(id))?;
        let status = entry.record.status;
        if !(status.is_waiting() || status == JobStatus::Running) {
            return Ok(entry.to_response());
        }
        let now = now_iso();
        let mut record = entry.record.clone();
        record.status = JobStatus::Cancelled;
        record.end_time = Some(now.clone());
        let mut rows = Vec::new();
        for row in entry.rows.values() {
            if row.status == DeviceJobStatus::Pending {
                let mut row = row.clone();
                row.status = DeviceJobStatus::Canceled;
                row.end_time_utc = Some(now.clone());
                row.last_updated_date_time_utc = now.clone();
                rows.push(row);
            }
        }
        self.persist(&record, &rows)?;
        entry.record = record;
        for row in rows {
            entry.rows.insert(row.device_id.clone(), row);
        }
        tracing::info!(job = id, "job cancelled");
        Ok(entry.to_response())
    }

    /// `GET /jobs/v2/query`: every job of that type and status (either filter optional), in
    /// order of creation.
    pub fn list(&self, job_type: Option<&str>, job_status: Option<&str>) -> Vec<Value> {
        let entries = self.lock();
        let mut matching: Vec<&Entry> = entries
            .values()
            .filter(|e| job_type.is_none_or(|t| t == e.record.kind.as_str()))
            .filter(|e| job_status.is_none_or(|s| s == e.record.status.as_str()))
            .collect();
        matching.sort_by(|a, b| {
            (&a.record.created_time, &a.record.job_id)
                .cmp(&(&b.record.created_time, &b.record.job_id))
        });
        matching.into_iter().map(Entry::to_response).collect()
    }

    /// The rows of `FROM devices.jobs`, by job (in order of creation), then device id.
    pub fn device_rows(&self) -> Vec<Value> {
        let entries = self.lock();
        let mut jobs: Vec<&Entry> = entries.values().collect();
        jobs.sort_by(|a, b| {
            (&a.record.created_time, &a.record.job_id)
                .cmp(&(&b.record.created_time, &b.record.job_id))
        });
        jobs.iter()
            .flat_map(|entry| entry.rows.values())
            .filter_map(|row| serde_json::to_value(row).ok())
            .collect()
    }

    /// Ids of the waiting jobs due at `now`, and the time the next one is due.
    fn due(&self, now: DateTime<Utc>) -> (Vec<String>, Option<DateTime<Utc>>) {
        let entries = self.lock();
        let mut due = Vec::new();
        let mut next: Option<DateTime<Utc>> = None;
        for (id, entry) in entries.iter() {
            if !entry.record.status.is_waiting() {
                continue;
            }
            if entry.start_at <= now {
                due.push(id.clone());
            } else {
                next = Some(next.map_or(entry.start_at, |n| n.min(entry.start_at)));
            }
        }
        (due, next)
    }

    /// Starts a waiting job: matches the condition against `twins` and writes a pending row per
    /// device. None when the job is no longer waiting (cancelled meanwhile).
    fn start(&self, id: &str, twins: &[Value]) -> Result<Option<Run>, IotHubError> {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(id) else {
            return Ok(None);
        };
        if !entry.record.status.is_waiting() {
            return Ok(None);
        }
        let now = now_iso();
        let mut record = entry.record.clone();
        record.status = JobStatus::Running;
        let condition: Condition = match parse_condition(&record.query_condition) {
            Ok(condition) => condition,
            Err(e) => {
                // Checked at creation, so only a stored job from another version gets here.
                record.status = JobStatus::Failed;
                record.end_time = Some(now);
                record.failure_reason = Some(format!("queryCondition: {e}"));
                self.persist(&record, &[])?;
                entry.record = record;
                return Ok(None);
            }
        };
        let devices: Vec<String> = twins
            .iter()
            .filter(|twin| condition.matches(twin))
            .filter_map(|twin| twin.get("deviceId").and_then(Value::as_str))
            .map(str::to_string)
            .collect();
        let rows: Vec<DeviceJobRow> = devices
            .iter()
            .map(|device_id| DeviceJobRow {
                device_id: device_id.clone(),
                job_id: id.to_string(),
                job_type: record.kind,
                status: DeviceJobStatus::Pending,
                start_time_utc: None,
                end_time_utc: None,
                created_date_time_utc: now.clone(),
                last_updated_date_time_utc: now.clone(),
                outcome: None,
                error: None,
            })
            .collect();
        self.persist(&record, &rows)?;
        let action = match (&record.cloud_to_device_method, &record.update_twin) {
            (Some(method), _) => Action::Method(method.clone()),
            (None, Some(update)) => {
                let (patch, etag) = check_update_twin(update)?;
                Action::Twin { patch, etag }
            }
            (None, None) => {
                return Err(IotHubError::internal(format!(
                    "job {id} has neither a method nor a twin update"
                )))
            }
        };
        let run = Run {
            job_id: id.to_string(),
            action,
            devices,
            max_execution: Duration::from_secs(record.max_execution_time_in_seconds),
        };
        entry.record = record;
        entry.rows = rows
            .into_iter()
            .map(|row| (row.device_id.clone(), row))
            .collect();
        tracing::info!(job = id, devices = run.devices.len(), "job started");
        Ok(Some(run))
    }

    /// Marks a pending row running. False when the job stopped running (cancelled) or the row
    /// is no longer pending: the runner then skips the device.
    fn device_started(&self, job_id: &str, device_id: &str) -> bool {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(job_id) else {
            return false;
        };
        if entry.record.status != JobStatus::Running {
            return false;
        }
        let Some(row) = entry.rows.get_mut(device_id) else {
            return false;
        };
        if row.status != DeviceJobStatus::Pending {
            return false;
        }
        let now = now_iso();
        let mut updated = row.clone();
        updated.status = DeviceJobStatus::Running;
        updated.start_time_utc = Some(now.clone());
        updated.last_updated_date_time_utc = now;
        if let Err(error) = self.persist_rows(job_id, &[&updated]) {
            tracing::warn!(job = job_id, device = device_id, %error, "job row not saved");
        }
        *row = updated;
        true
    }

    /// Records how one device's part ended.
    fn device_finished(
        &self,
        job_id: &str,
        device_id: &str,
        result: Result<Option<Value>, (IotHubError, Option<Value>)>,
    ) {
        let mut entries = self.lock();
        let Some(row) = entries
            .get_mut(job_id)
            .and_then(|entry| entry.rows.get_mut(device_id))
        else {
            return;
        };
        if row.status != DeviceJobStatus::Running {
            return;
        }
        let now = now_iso();
        let mut updated = row.clone();
        match result {
            Ok(outcome) => {
                updated.status = DeviceJobStatus::Completed;
                updated.end_time_utc = Some(now.clone());
                updated.last_updated_date_time_utc = now;
                updated.outcome = outcome;
            }
            Err((error, outcome)) => {
                updated.fail(&now, error.code.name(), error.message);
                updated.outcome = outcome;
            }
        }
        if let Err(error) = self.persist_rows(job_id, &[&updated]) {
            tracing::warn!(job = job_id, device = device_id, %error, "job row not saved");
        }
        *row = updated;
    }

    /// Ends a running job: `completed`, or `failed` when its time ran out. Rows still unfinished
    /// fail. A job cancelled meanwhile stays cancelled.
    fn finish(&self, job_id: &str, timed_out: bool) {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(job_id) else {
            return;
        };
        let now = now_iso();
        let mut record = entry.record.clone();
        let (code, description) = if timed_out {
            (
                "JobTimedOut",
                format!(
                    "the job's maxExecutionTimeInSeconds ({}) ran out before this device was done",
                    record.max_execution_time_in_seconds
                ),
            )
        } else {
            (
                "JobRunFailed",
                "the job ended before this device was done".to_string(),
            )
        };
        let mut rows = Vec::new();
        for row in entry.rows.values() {
            if row.status.is_unfinished() {
                let mut row = row.clone();
                row.fail(&now, code, description.clone());
                rows.push(row);
            }
        }
        if record.status == JobStatus::Running {
            record.end_time = Some(now);
            if timed_out {
                record.status = JobStatus::Failed;
                record.failure_reason = Some(format!(
                    "maxExecutionTimeInSeconds ({}) ran out with {} device(s) unfinished",
                    record.max_execution_time_in_seconds,
                    rows.len()
                ));
            } else {
                record.status = JobStatus::Completed;
            }
        }
        if let Err(error) = self.persist(&record, &rows) {
            tracing::warn!(job = job_id, %error, "job end not saved");
        }
        tracing::info!(job = job_id, status = record.status.as_str(), "job ended");
        entry.record = record;
        for row in rows {
            entry.rows.insert(row.device_id.clone(), row);
        }
    }
}

/// The hub's job scheduler task: starts each job when it is due, until shutdown.
pub async fn run_scheduler(state: Arc<HubState>, shutdown: CancellationToken, tasks: TaskTracker) {
    loop {
        // Registered before looking, so a job created meanwhile wakes us.
        let changed = state.jobs.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();

        let now = Utc::now();
        let (due, next) = state.jobs.due(now);
        if !due.is_empty() {
            let twins = state.registry.twin_documents();
            for id in due {
                match state.jobs.start(&id, &twins) {
                    Ok(Some(run)) => {
                        tasks.spawn(run_job(state.clone(), run, shutdown.clone()));
                    }
                    Ok(None) => {}
                    Err(error) => tracing::warn!(job = %id, %error, "job could not start"),
                }
            }
        }
        let sleep = next
            .and_then(|at| (at - now).to_std().ok())
            .unwrap_or(MAX_SCHEDULER_SLEEP)
            .min(MAX_SCHEDULER_SLEEP);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = &mut changed => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

/// Works through one job's devices, [`RUN_CONCURRENCY`] at a time.
async fn run_job(state: Arc<HubState>, run: Run, shutdown: CancellationToken) {
    let deadline = tokio::time::Instant::now() + run.max_execution;
    let jobs = &state.jobs;
    let mut queue = run.devices.iter();
    let mut in_flight = JoinSet::new();
    let mut launching = true;
    let timed_out = loop {
        while launching && in_flight.len() < RUN_CONCURRENCY {
            let Some(device_id) = queue.next() else {
                launching = false;
                break;
            };
            if !jobs.device_started(&run.job_id, device_id) {
                // Cancelled: nothing more starts; calls in flight finish.
                launching = jobs
                    .lock()
                    .get(&run.job_id)
                    .is_some_and(|e| e.record.status == JobStatus::Running);
                continue;
            }
            let state = state.clone();
            let action = run.action.clone();
            let device_id = device_id.clone();
            in_flight.spawn(async move {
                let result = run_on_device(&state, &device_id, action).await;
                (device_id, result)
            });
        }
        if in_flight.is_empty() {
            break false;
        }
        tokio::select! {
            // The job stays `running` in the store; the next start marks it failed.
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(deadline) => break true,
            joined = in_flight.join_next() => match joined {
                Some(Ok((device_id, result))) => {
                    jobs.device_finished(&run.job_id, &device_id, result);
                }
                // A panicked device task: its row is failed when the job finishes.
                Some(Err(error)) => tracing::warn!(job = %run.job_id, %error, "job device task failed"),
                None => {}
            },
        }
    };
    in_flight.abort_all();
    jobs.finish(&run.job_id, timed_out);
}

/// One device's part of a job: Ok(outcome) or the error with the outcome to record.
async fn run_on_device(
    state: &HubState,
    device_id: &str,
    action: Action,
) -> Result<Option<Value>, (IotHubError, Option<Value>)> {
    match action {
        Action::Method(invocation) => match methods::invoke(state, device_id, invocation).await {
            Ok(result) => Ok(Some(json!({
                "deviceMethodResponse": {"status": result.status, "payload": result.payload}
            }))),
            Err(error) => {
                // The outcome carries the numeric code, as the REST call would report it.
                let outcome = json!({
                    "deviceMethodResponse": {"status": error.code.code(), "payload": null}
                });
                Err((error, Some(outcome)))
            }
        },
        Action::Twin { patch, etag } => twins::update(state, device_id, &patch, etag.as_deref())
            .map(|_| None)
            .map_err(|error| (error, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jobs() -> (tempfile::TempDir, Jobs) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(Store::open(&dir.path().join("hub.db")).expect("store"));
        let jobs = Jobs::load(store).expect("jobs load");
        (dir, jobs)
    }

    fn method_request(condition: &str) -> JobRequest {
        JobRequest {
            kind: Some("scheduleDeviceMethod".into()),
            cloud_to_device_method: Some(MethodInvocation {
                method_name: "lockDoor".into(),
                payload: json!({"lockTime": "10m"}),
                response_timeout_in_seconds: None,
                connect_timeout_in_seconds: None,
            }),
            query_condition: Some(condition.into()),
            ..JobRequest::default()
        }
    }

    #[test]
    fn create_fills_defaults_and_refuses_bad_requests() {
        let (_dir, jobs) = jobs();
        let job = jobs
            .create("j-1", method_request("deviceId IN ['a']"))
            .expect("created");
        assert_eq!(job["status"], "queued");
        assert_eq!(job["maxExecutionTimeInSeconds"], 3600);
        assert_eq!(job["cloudToDeviceMethod"]["responseTimeoutInSeconds"], 30);
        assert_eq!(job["endTime"], Value::Null);
        assert_eq!(job["deviceJobStatistics"]["deviceCount"], 0);
        assert!(parse_time(job["createdTime"].as_str().unwrap()).is_some());

        let code = |r: Result<Value, IotHubError>| r.expect_err("refused").code;
        assert_eq!(
            code(jobs.create("j-1", method_request("deviceId = 'a'"))),
            ErrorCode::JobAlreadyExists
        );
        assert_eq!(
            code(jobs.create("j-2", method_request("deviceId IN ["))),
            ErrorCode::ArgumentInvalid
        );
        assert_eq!(
            code(jobs.create("bad id", method_request("deviceId = 'a'"))),
            ErrorCode::ArgumentInvalid
        );
        let mut no_method = method_request("deviceId = 'a'");
        no_method.cloud_to_device_method = None;
        assert_eq!(
            code(jobs.create("j-3", no_method)),
            ErrorCode::ArgumentInvalid
        );
        let mut bad_type = method_request("deviceId = 'a'");
        bad_type.kind = Some("export".into());
        assert_eq!(
            code(jobs.create("j-4", bad_type)),
            ErrorCode::ArgumentInvalid
        );
        let twin_without_patch = JobRequest {
            kind: Some("scheduleUpdateTwin".into()),
            update_twin: Some(json!({"etag": "*"})),
            query_condition: Some("deviceId = 'a'".into()),
            ..JobRequest::default()
        };
        assert_eq!(
            code(jobs.create("j-5", twin_without_patch)),
            ErrorCode::ArgumentInvalid
        );
    }

    #[test]
    fn a_future_start_is_scheduled_and_cancel_ends_it() {
        let (_dir, jobs) = jobs();
        let mut request = method_request("deviceId = 'a'");
        request.start_time = Some(format_time(Utc::now() + chrono::Duration::hours(1)));
        let job = jobs.create("later", request).expect("created");
        assert_eq!(job["status"], "scheduled");
        let (due, next) = jobs.due(Utc::now());
        assert!(due.is_empty());
        assert!(next.is_some());
        let job = jobs.cancel("later").expect("cancelled");
        assert_eq!(job["status"], "cancelled");
        assert!(job["endTime"].is_string());
        assert_eq!(
            jobs.due(Utc::now() + chrono::Duration::hours(2)).0,
            Vec::<String>::new()
        );
        assert_eq!(
            jobs.cancel("nope").expect_err("unknown").code,
            ErrorCode::JobNotFound
        );
    }

    #[test]
    fn start_matches_devices_and_finish_counts_rows() {
        let (_dir, jobs) = jobs();
        jobs.create("j", method_request("deviceId IN ['a', 'b']"))
            .expect("created");
        let twins = vec![
            json!({"deviceId": "a"}),
            json!({"deviceId": "b"}),
            json!({"deviceId": "c"}),
        ];
        let run = jobs
            .start("j", &twins)
            .expect("starts")
            .expect("was waiting");
        assert_eq!(run.devices, ["a", "b"]);
        assert!(
            jobs.start("j", &twins).expect("no error").is_none(),
            "starts once"
        );
        assert!(jobs.device_started("j", "a"));
        jobs.device_finished(
            "j",
            "a",
            Ok(Some(json!({"deviceMethodResponse": {"status": 200}}))),
        );
        jobs.finish("j", false);
        let job = jobs.get("j").expect("exists");
        assert_eq!(job["status"], "completed");
        assert_eq!(
            job["deviceJobStatistics"],
            json!({"deviceCount": 2, "failedCount": 1, "succeededCount": 1,
                   "runningCount": 0, "pendingCount": 0})
        );
        let rows = jobs.device_rows();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["status"], "completed");
        assert_eq!(rows[1]["status"], "failed");
        assert_eq!(rows[1]["error"]["code"], "JobRunFailed");
    }
}
