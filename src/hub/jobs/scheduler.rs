//! The hub's job scheduler task and the runner of one job. The scheduler sleeps until the next
//! job is due (or one is created) and starts a runner per due job; a runner works through the
//! job's devices at most [`RUN_CONCURRENCY`] at a time through `methods::invoke` and
//! `twins::update`, the same rules as the single-device REST calls. Progress is recorded in
//! [`Jobs`](super::Jobs) only; this module keeps no state of its own.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::model::{Action, Run};
use crate::hub::accept::Alive;
use crate::hub::error::IotHubError;
use crate::hub::methods;
use crate::hub::twins;
use crate::hub::HubState;

/// Devices one job works on at the same time.
pub const RUN_CONCURRENCY: usize = 16;
/// The scheduler looks again at least this often, so a clock change cannot stall it for long.
const MAX_SCHEDULER_SLEEP: Duration = Duration::from_secs(60);

/// The hub's job scheduler task: starts each job when it is due, until shutdown. `alive` is
/// held for the task's life (the hub's health watches it).
pub async fn run_scheduler(
    state: Arc<HubState>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    alive: Alive,
) {
    loop {
        // Registered before looking, so a job created meanwhile wakes us.
        let changed = state.jobs.changed().notified();
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
            _ = shutdown.cancelled() => {
                alive.stopped();
                return;
            }
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
                launching = jobs.is_running(&run.job_id);
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
