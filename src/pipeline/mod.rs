//! Runs one job through its stages, with retries, rollback and events. Knows nothing of where
//! the job came from: `hatchery run` and the broker fleet both call [`Pipeline::run`].

mod attempts;

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, field, info, info_span, warn};

use crate::events::{
    EventData, EventKind, EventSink, Failure, FinishReport, JobResult, JobStart, Publisher,
    Rejection, StageTiming,
};
use crate::hypervisor::Hypervisors;
use crate::hypervisor::metadata::{JobMetadata, JobState};
use crate::job::{Job, OnFailure, Work};
use crate::observe::{Metrics, ObservedSink};
use crate::secret::redact;
use crate::settings::Settings;
use crate::stages::domain;
use crate::stages::{ErrorClass, JobRun, Refusal, StageError, StageKind, rollback};

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    Cancelled,
    /// The job named something this worker cannot serve; nothing was attempted.
    Rejected,
}

impl Outcome {
    pub fn event_kind(self) -> EventKind {
        match self {
            Outcome::Succeeded => EventKind::JobSucceeded,
            Outcome::Failed => EventKind::JobFailed,
            Outcome::Cancelled => EventKind::JobCancelled,
            Outcome::Rejected => EventKind::JobRejected,
        }
    }
}

/// What every job run on this worker shares.
pub struct Pipeline {
    pub hypervisors: Hypervisors,
    pub settings: Arc<Settings>,
    pub publisher: Publisher,
    /// Counts every event the pipeline emits, for `/metrics`.
    pub metrics: Arc<Metrics>,
}

/// A stage that failed for good, with how many attempts it took.
struct StageFailure {
    stage: StageKind,
    error: StageError,
}

impl Pipeline {
    pub fn new(settings: Settings, publisher: Publisher) -> Self {
        Self {
            hypervisors: Hypervisors::default(),
            settings: Arc::new(settings),
            publisher,
            metrics: Arc::default(),
        }
    }

    /// Runs `job` to its final outcome, sending every event to `sink`, the final one last.
    /// `attempt` counts deliveries of this job, this one included.
    pub async fn run(
        &self,
        job: Job,
        attempt: u32,
        cancel: CancellationToken,
        sink: &dyn EventSink,
    ) -> Outcome {
        let span = info_span!(
            "job",
            job_id = %job.id,
            vm = job.vm_name(),
            attempt,
            domain_uuid = field::Empty,
            ip = field::Empty,
        );
        let sink = ObservedSink {
            inner: sink,
            metrics: &self.metrics,
        };
        self.run_in_span(Arc::new(job), attempt, cancel, &sink)
            .instrument(span)
            .await
    }

    async fn run_in_span(
        &self,
        job: Arc<Job>,
        attempt: u32,
        cancel: CancellationToken,
        sink: &dyn EventSink,
    ) -> Outcome {
        let subject = job.id.to_string();
        let batch = job.batch.as_ref().map(|b| b.id.as_str());
        let uri = match self.resolve(&job.hypervisor) {
            Ok(uri) => uri,
            Err((refusal, reason)) => {
                warn!(error = %refusal, "job rejected");
                let data = EventData::Rejected(Rejection {
                    reason: reason.to_owned(),
                    message: refusal.to_string(),
                    problems: Vec::new(),
                });
                let event = self
                    .publisher
                    .event(EventKind::JobRejected, &subject, batch, "", data);
                sink.emit(event).await;
                return Outcome::Rejected;
            }
        };

        let action = match job.work {
            Work::Provision(_) => "provision",
            Work::Deprovision(_) => "deprovision",
        };
        info!(action, hypervisor = %uri, "job started");
        let start = EventData::Started(JobStart {
            job_id: job.id,
            action: action.to_owned(),
            vm: job.vm_name().to_owned(),
            hypervisor: uri.clone(),
            attempt,
        });
        let key = attempt.to_string();
        sink.emit(
            self.publisher
                .event(EventKind::JobStarted, &subject, batch, &key, start),
        )
        .await;

        let hv = self.hypervisors.get(&uri);
        let mut cx = JobRun::new(Arc::clone(&job), hv, Arc::clone(&self.settings), attempt);
        cx.cancel = cancel;

        // A rollback cut short by a crash is finished, not the job started again.
        let (timings, failure) = match interrupted_rollback(&cx).await {
            Some(failed) => (Vec::new(), Some(failed)),
            None => self.run_stages(&mut cx, sink).await,
        };
        let (outcome, failure, rolled_back) = match failure {
            None => (Outcome::Succeeded, None, None),
            Some(f) => self.fail(&cx, f).await,
        };
        let result = self.result(&cx, action, &uri, timings, failure, rolled_back);
        let kind = outcome.event_kind();
        sink.emit(
            self.publisher
                .event(kind, &subject, batch, "", EventData::Result(result)),
        )
        .await;
        forget_rolled_back(&cx, rolled_back).await;
        outcome
    }

    /// Runs the job's stages in order until one fails for good, keeping the domain's record
    /// fresh meanwhile. Returns each finished stage's timing and the failure, if any.
    async fn run_stages(
        &self,
        cx: &mut JobRun,
        sink: &dyn EventSink,
    ) -> (Vec<StageTiming>, Option<StageFailure>) {
        // While the job runs, its record in the domain stays fresh, so the reconciler can tell
        // a slow job from an abandoned one.
        let heartbeat = tokio::spawn(heartbeat(JobRun::new(
            Arc::clone(&cx.job),
            Arc::clone(&cx.hv),
            Arc::clone(&self.settings),
            cx.attempt,
        )));

        let mut timings = Vec::new();
        let stages: &[StageKind] = match cx.job.work {
            Work::Provision(_) => &StageKind::PROVISION,
            Work::Deprovision(_) => &[StageKind::Teardown],
        };
        let mut failure = None;
        for &stage in stages {
            match self.stage_with_retries(stage, cx, sink).await {
                Ok(timing) => timings.push(timing),
                Err(f) => {
                    failure = Some(f);
                    break;
                }
            }
            if matches!(stage, StageKind::Address | StageKind::Finish) {
                update_metadata(cx, |meta| {
                    meta.stage = Some(stage);
                    if stage == StageKind::Finish {
                        meta.state = JobState::Succeeded;
                    }
                })
                .await;
            }
        }
        heartbeat.abort();
        (timings, failure)
    }

    /// The libvirt URI a job's `hypervisor` stands for, or why the job cannot have it.
    fn resolve(&self, hypervisor: &str) -> Result<String, (Refusal, &'static str)> {
        let Some(uri) = self.settings.resolve_hypervisor(hypervisor) else {
            let refusal = Refusal::UnknownHypervisor(hypervisor.to_owned());
            return Err((refusal, "unknown_hypervisor"));
        };
        // A test driver URI names a file on the worker; only its operator may allow that.
        if crate::hypervisor::is_test_driver(hypervisor) && !self.settings.allow_test_driver {
            let refusal = Refusal::TestDriverDisabled(hypervisor.to_owned());
            return Err((refusal, "test_driver_disabled"));
        }
        Ok(uri.to_owned())
    }

    /// Rolls back what a failed job made, unless it asked to keep it, and says how it ended.
    async fn fail(&self, cx: &JobRun, f: StageFailure) -> (Outcome, Option<Failure>, Option<bool>) {
        let cancelled = f.error.class() == ErrorClass::Cancelled;
        let outcome = if cancelled {
            Outcome::Cancelled
        } else {
            Outcome::Failed
        };
        let report = Failure {
            stage: f.stage,
            class: f.error.class(),
            message: chain(&f.error),
        };
        error!(stage = %f.stage, class = report.class.as_str(), error = %report.message, "job failed");

        let keep = cx
            .job
            .provision()
            .is_some_and(|p| p.on_failure == OnFailure::Keep);
        if f.stage == StageKind::Teardown {
            return (outcome, Some(report), Some(false));
        }

        // The domain records the decision before acting on it: a worker dying during the
        // rollback leaves the next run a rollback to finish, and the reconciler a domain to
        // keep or to clear, instead of a job that seems to be still running.
        let state = match keep && !cancelled {
            true => JobState::Kept,
            false => JobState::RollingBack,
        };
        // A run finishing an interrupted rollback keeps the first run's reason.
        let resumed = matches!(f.error, StageError::Interrupted { .. });
        update_metadata(cx, |meta| {
            meta.state = state;
            if !resumed {
                meta.failure = Some(report.clone());
            }
        })
        .await;
        if state == JobState::Kept {
            return (outcome, Some(report), Some(false));
        }
        let rolled_back = match rollback::run(cx, f.stage).await {
            Ok(()) => true,
            Err(e) => {
                error!(error = %chain(&e), "rollback failed; the reconciler will find the leftovers");
                false
            }
        };
        (outcome, Some(report), Some(rolled_back))
    }

    fn result(
        &self,
        cx: &JobRun,
        action: &str,
        uri: &str,
        stages: Vec<StageTiming>,
        failure: Option<Failure>,
        rolled_back: Option<bool>,
    ) -> Box<JobResult> {
        let facts = &cx.facts;
        let secrets = cx.job.secrets();
        let finish = facts.finish.as_ref().map(|f| FinishReport {
            exit_code: f.exit_code,
            stdout_tail: redact(&f.stdout_tail, &secrets),
            stderr_tail: redact(&f.stderr_tail, &secrets),
            stdout_truncated: f.stdout_truncated,
            stderr_truncated: f.stderr_truncated,
            resumed: f.resumed,
        });
        Box::new(JobResult {
            job_id: cx.job.id,
            action: action.to_owned(),
            vm: cx.job.vm_name().to_owned(),
            hypervisor: uri.to_owned(),
            attempt: cx.attempt,
            domain_uuid: facts.domain_uuid,
            macs: facts.macs.clone(),
            ip: facts.address.map(|a| a.ip().to_string()),
            ssh_port: facts.address.map(|a| a.port()),
            host_key_fingerprint: facts
                .finish
                .as_ref()
                .map(|f| f.host_key_fingerprint.clone()),
            overlay: facts.overlay.as_ref().map(|o| o.path.clone()),
            finish,
            stages,
            failure,
            rolled_back,
            already_absent: facts.already_absent,
        })
    }
}

/// Refreshes `updated_at` in the job's domain record every `settings.heartbeat`, until aborted.
async fn heartbeat(cx: JobRun) {
    if cx.job.provision().is_none() {
        return;
    }
    loop {
        tokio::time::sleep(cx.settings.heartbeat).await;
        update_metadata(&cx, |_| {}).await;
    }
}

/// The failure of an earlier run whose rollback did not finish, read from the domain.
async fn interrupted_rollback(cx: &JobRun) -> Option<StageFailure> {
    cx.job.provision()?;
    match domain::read_metadata(cx, cx.job.vm_name()).await {
        Ok(Some(Some(meta)))
            if meta.job_id == cx.job.id
                && matches!(meta.state, JobState::RollingBack | JobState::RolledBack) =>
        {
            warn!("resuming an interrupted rollback");
            let stage = meta.failure.as_ref().map_or(StageKind::Finish, |f| f.stage);
            Some(StageFailure {
                stage,
                error: StageError::Interrupted {
                    earlier: meta.failure,
                },
            })
        }
        _ => None,
    }
}

/// After the outcome of a rolled-back job is out, removes the definition the rollback kept
/// for its record. Best effort: the reconciler clears what is left.
async fn forget_rolled_back(cx: &JobRun, rolled_back: Option<bool>) {
    if rolled_back != Some(true) {
        return;
    }
    if let Err(e) = domain::forget(cx).await {
        warn!(error = %chain(&e), "could not remove the rolled-back domain's definition");
    }
}

/// Updates hatchery's metadata in the job's domain, if the domain exists and is the job's.
/// Best effort: stages find their own artefacts on a re-run; the record serves resumed
/// rollbacks, operators and the reconciler.
async fn update_metadata(cx: &JobRun, change: impl FnOnce(&mut JobMetadata)) {
    if let Err(e) = domain::update_metadata(cx, change).await {
        warn!(error = %chain(&e), "could not update the domain's metadata");
    }
}

/// The error and its causes, outermost first: `could not start domain: ...: ...`.
pub fn chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // `#[error(transparent)]` wrappers repeat their inner message; print it once.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}
