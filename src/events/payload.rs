//! The `data` of each event type.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::job::Problem;
use crate::stages::{ErrorClass, StageKind};

/// What an event carries; which variant follows from the event's type.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EventData {
    Result(Box<JobResult>),
    Stage(StageReport),
    Rejected(Rejection),
    Batch(BatchSummary),
    Started(JobStart),
}

/// `job.started`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobStart {
    pub job_id: Uuid,
    pub action: String,
    pub vm: String,
    pub hypervisor: String,
    pub attempt: u32,
}

/// `stage.started`, `stage.succeeded`, `stage.retrying`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageReport {
    pub job_id: Uuid,
    pub stage: StageKind,
    /// The attempt of this stage within this run of the job, from 1.
    pub attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub duration_ms: Option<u64>,
    /// Why the attempt failed, for `stage.retrying`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<Failure>,
    /// How long until the next attempt, for `stage.retrying`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub delay_ms: Option<u64>,
}

/// Why a stage or a job failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    pub stage: StageKind,
    pub class: ErrorClass,
    /// The error and its causes, outermost first, joined by ": ".
    pub message: String,
}

/// The final event of a job that ran: `job.succeeded`, `job.failed` or `job.cancelled`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobResult {
    pub job_id: Uuid,
    pub action: String,
    pub vm: String,
    pub hypervisor: String,
    /// How many times this job was started, this time included.
    pub attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub domain_uuid: Option<Uuid>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub macs: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ssh_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub host_key_fingerprint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub overlay: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub finish: Option<FinishReport>,
    pub stages: Vec<StageTiming>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub failure: Option<Failure>,
    /// For a failed job: whether its domain and overlay were removed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rolled_back: Option<bool>,
    /// For a deprovisioning job: the domain was already gone.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub already_absent: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageTiming {
    pub stage: StageKind,
    pub duration_ms: u64,
    pub attempts: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinishReport {
    pub exit_code: i32,
    pub stdout_tail: String,
    pub stderr_tail: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub resumed: bool,
}

/// `job.rejected`: a message that is not a job hatchery will run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rejection {
    /// `too_large`, `not_json`, `invalid`, `unknown_hypervisor`, ...
    pub reason: String,
    pub message: String,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub problems: Vec<Problem>,
}

/// `batch.completed`: every job of the batch is final.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSummary {
    pub batch_id: String,
    pub size: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub cancelled: u32,
    pub rejected: u32,
}
