//! Scheduled jobs (`/jobs/v2`): a direct method or a twin update run at a given time on every
//! device that a query condition matches, with one row of progress per device.
//!
//! The rooms: `model` (a job and its device rows, as stored and as answered), `request` (the
//! checks a `PUT /jobs/v2/{id}` body passes before it becomes a job), `state` ([`Jobs`], every
//! job in memory and in the store) and `scheduler` ([`run_scheduler`], the task that starts jobs
//! when they are due and works through their devices). None of them touches a socket.
//!
//! [`Jobs`] holds every job and its device rows in memory and in the store (tables `jobs` and
//! `job_devices`); each change is written before it is visible, under one lock. [`run_scheduler`]
//! is one task of the hub: it sleeps until the next job is due (or a job is created), then starts
//! a runner task per due job. A runner picks the devices the condition matches *at that moment*,
//! writes them as `pending` rows, and works through them at most [`RUN_CONCURRENCY`] at a time,
//! through `methods::invoke` or `twins::update` (with the job's etag as `If-Match`), so a job
//! obeys exactly the rules of the single-device REST calls.
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

mod model;
mod request;
mod scheduler;
mod state;

pub use model::{DeviceJobError, DeviceJobStatus, JobStatus, JobType};
pub use request::{JobRequest, DEFAULT_MAX_EXECUTION_SECS};
pub use scheduler::{run_scheduler, RUN_CONCURRENCY};
pub use state::Jobs;
