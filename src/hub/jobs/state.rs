//! [`Jobs`]: every job of the hub and its device rows, in memory and in the store, under one
//! lock. Each change is written to the store before it is visible. The scheduler drives a job
//! through `due`, `start`, `device_started`, `device_finished` and `finish`; the API through
//! `create`, `get`, `cancel`, `list` and `device_rows`. It never runs a method or touches a twin.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::Notify;

use super::model::{
    job_not_found, parse_time, Action, DeviceJobRow, DeviceJobStatus, Entry, JobRecord, JobStatus,
    Run,
};
use super::request::{self, JobRequest};
use crate::hub::error::{IotHubError, LoadError};
use crate::hub::query::{parse_condition, Condition};
use crate::hub::registry::now_iso;
use crate::hub::store::Store;
use crate::protocol::error_code::ErrorCode;

/// Every job of the hub.
pub struct Jobs {
    store: Arc<Store>,
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Wakes the scheduler: a job was created.
    changed: Notify,
}

impl Jobs {
    /// Loads the stored jobs. A job that was running when the hub stopped is marked failed
    /// (see the module notes), and written back so.
    pub fn load(store: Arc<Store>) -> Result<Jobs, LoadError> {
        let mut entries = BTreeMap::new();
        for (id, doc) in store.load_jobs()? {
            let record: JobRecord =
                serde_json::from_str(&doc).map_err(|source| LoadError::Decode {
                    what: format!("job {id}"),
                    source,
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
            let row: DeviceJobRow =
                serde_json::from_str(&doc).map_err(|source| LoadError::Decode {
                    what: format!("row of job {job_id}, device {device_id}"),
                    source,
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
            jobs.persist(&entry.record, &changed_rows)
                .map_err(|source| LoadError::Save {
                    what: format!("job {} as failed", entry.record.job_id),
                    source,
                })?;
        }
        *jobs.lock() = entries;
        Ok(jobs)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notified when a job is created: the scheduler looks again.
    pub(super) fn changed(&self) -> &Notify {
        &self.changed
    }

    /// Whether the job is running now (false once it is cancelled or has ended).
    pub(super) fn is_running(&self, job_id: &str) -> bool {
        self.lock()
            .get(job_id)
            .is_some_and(|e| e.record.status == JobStatus::Running)
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
        let (record, start_at) = request::check(id, request, Utc::now())?;
        let kind = record.kind;

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
    pub(super) fn due(&self, now: DateTime<Utc>) -> (Vec<String>, Option<DateTime<Utc>>) {
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
    pub(super) fn start(&self, id: &str, twins: &[Value]) -> Result<Option<Run>, IotHubError> {
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
                let (patch, etag) = request::check_update_twin(update)?;
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
    pub(super) fn device_started(&self, job_id: &str, device_id: &str) -> bool {
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
    pub(super) fn device_finished(
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
    pub(super) fn finish(&self, job_id: &str, timed_out: bool) {
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::model::format_time;
    use super::*;
    use crate::protocol::method::MethodInvocation;

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
