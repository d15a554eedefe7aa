//! Runs one job through its stages, with retries, rollback and events. Knows nothing of where
//! the job came from: `hatchery run` and the broker fleet both call [`Pipeline::run`].

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, field, info, info_span, warn};

use crate::events::{
    EventData, EventKind, EventSink, Failure, FinishReport, JobResult, JobStart, Publisher,
    Rejection, StageReport, StageTiming,
};
use crate::hypervisor::Hypervisors;
use crate::hypervisor::metadata::{JobMetadata, JobState};
use crate::job::{Credential, Job, OnFailure, Work};
use crate::observe::{Metrics, ObservedSink};
use crate::settings::Settings;
use crate::stages::address::Address;
use crate::stages::domain::{self, Domain};
use crate::stages::finish::Finish;
use crate::stages::overlay::Overlay;
use crate::stages::teardown::Teardown;
use crate::stages::{ErrorClass, JobRun, Refusal, Stage, StageError, StageKind, rollback};

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

/// Extra time a stage gets beyond its own deadline before the pipeline abandons it.
const STAGE_GRACE: Duration = Duration::from_secs(30);

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
        if let Some(failed) = interrupted_rollback(&cx).await {
            let (outcome, failure, rolled_back) = self.fail(&cx, failed).await;
            let result = self.result(&cx, action, &uri, Vec::new(), failure, rolled_back);
            let data = EventData::Result(result);
            sink.emit(
                self.publisher
                    .event(outcome.event_kind(), &subject, batch, "", data),
            )
            .await;
            return outcome;
        }

        // While the job runs, its record in the domain stays fresh, so the reconciler can tell
        // a slow job from an abandoned one.
        let heartbeat = tokio::spawn(heartbeat(JobRun::new(
            Arc::clone(&job),
            Arc::clone(&cx.hv),
            Arc::clone(&self.settings),
            attempt,
        )));

        let mut timings = Vec::new();
        let stages: &[StageKind] = match job.work {
            Work::Provision(_) => &StageKind::PROVISION,
            Work::Deprovision(_) => &[StageKind::Teardown],
        };
        let mut failure = None;
        for &stage in stages {
            match self.stage_with_retries(stage, &mut cx, sink).await {
                Ok(timing) => timings.push(timing),
                Err(f) => {
                    failure = Some(f);
                    break;
                }
            }
            if matches!(stage, StageKind::Address | StageKind::Finish) {
                update_metadata(&cx, |meta| {
                    meta.stage = Some(stage);
                    if stage == StageKind::Finish {
                        meta.state = JobState::Succeeded;
                    }
                })
                .await;
            }
        }

        heartbeat.abort();
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
        outcome
    }

    /// The libvirt URI a job's `hypervisor` stands for, or why the job cannot have it.
    fn resolve(&self, hypervisor: &str) -> Result<String, (Refusal, &'static str)> {
        let Some(uri) = self.settings.resolve_hypervisor(hypervisor) else {
            let refusal = Refusal::UnknownHypervisor(hypervisor.to_owned());
            return Err((refusal, "unknown_hypervisor"));
        };
        // A test driver URI names a file on the worker; only its operator may allow that.
        if hypervisor.starts_with("test:") && !self.settings.allow_test_driver {
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
        if f.stage == StageKind::Teardown || (keep && !cancelled) {
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

    /// Runs one stage, retrying transient failures under the retry policy.
    async fn stage_with_retries(
        &self,
        stage: StageKind,
        cx: &mut JobRun,
        sink: &dyn EventSink,
    ) -> Result<StageTiming, StageFailure> {
        let subject = cx.job.id.to_string();
        let batch = cx.job.batch.clone().map(|b| b.id);
        let (job_id, run) = (cx.job.id, cx.attempt);
        let emit = |kind, attempt: u32, data| {
            let key = format!("{stage}/{run}/{attempt}");
            self.publisher
                .event(kind, &subject, batch.as_deref(), &key, data)
        };
        let report = |attempt, duration_ms, error, delay_ms| StageReport {
            job_id,
            stage,
            attempt,
            duration_ms,
            error,
            delay_ms,
        };

        let (timeout, backstop) = self.timeouts(stage, cx);
        let job_retry = cx.job.provision().and_then(|p| p.retry.clone());
        let policy = self.settings.retry.with_overrides(job_retry.as_ref());
        let retry_scripts = job_retry.is_some_and(|r| r.script_failures);
        let mut delays = policy.delays();
        let first = Instant::now();
        let mut attempt = 1;
        loop {
            let span = info_span!("stage", stage = %stage, stage_attempt = attempt);
            let data = EventData::Stage(report(attempt, None, None, None));
            sink.emit(emit(EventKind::StageStarted, attempt, data))
                .await;
            info!(parent: &span, "stage started");

            let began = Instant::now();
            cx.deadline = tokio::time::Instant::now() + timeout;
            let cancel = cx.cancel.clone();
            let result = tokio::select! {
                r = tokio::time::timeout(backstop, dispatch(stage, cx)).instrument(span.clone()) => {
                    r.unwrap_or(Err(StageError::Timeout(timeout)))
                }
                () = cancel.cancelled() => Err(StageError::Cancelled),
            };
            let took = began.elapsed();

            let error = match result {
                Ok(()) => {
                    info!(parent: &span, duration_ms = took.as_millis() as u64, "stage succeeded");
                    let data = EventData::Stage(report(attempt, Some(ms(took)), None, None));
                    sink.emit(emit(EventKind::StageSucceeded, attempt, data))
                        .await;
                    let total = ms(first.elapsed());
                    return Ok(StageTiming {
                        stage,
                        duration_ms: total,
                        attempts: attempt,
                    });
                }
                Err(error) => error,
            };

            // Retry only what may pass next time, and only within the policy's budget.
            // A failed script is retried only when the job asks; its next run starts afresh.
            let script_failed = matches!(error, StageError::ScriptFailed { .. });
            let retriable = error.is_transient() || (retry_scripts && script_failed);
            let delay = (retriable && first.elapsed() < policy.max_elapsed)
                .then(|| delays.next())
                .flatten();
            if delay.is_some() && script_failed {
                cx.script_run += 1;
            }
            let Some(delay) = delay else {
                return Err(StageFailure { stage, error });
            };
            let class = error.class();
            warn!(
                parent: &span,
                error = %chain(&error),
                class = class.as_str(),
                delay_ms = ms(delay),
                "stage failed; retrying"
            );
            let failure = Failure {
                stage,
                class,
                message: chain(&error),
            };
            let data = EventData::Stage(report(
                attempt,
                Some(ms(took)),
                Some(failure),
                Some(ms(delay)),
            ));
            sink.emit(emit(EventKind::StageRetrying, attempt, data))
                .await;
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cx.cancel.cancelled() => {
                    return Err(StageFailure { stage, error: StageError::Cancelled });
                }
            }
            attempt += 1;
        }
    }

    /// The stage's own deadline, and the later one at which the pipeline stops waiting for it.
    fn timeouts(&self, stage: StageKind, cx: &JobRun) -> (Duration, Duration) {
        let t = cx
            .job
            .provision()
            .map(|p| p.timeouts.clone())
            .unwrap_or_default();
        let s = &self.settings;
        let secs = |v: Option<u64>| v.map(Duration::from_secs);
        let timeout = match stage {
            StageKind::Overlay => secs(t.overlay_secs).unwrap_or(Overlay::default_timeout(s)),
            StageKind::Domain => secs(t.domain_secs).unwrap_or(Domain::default_timeout(s)),
            StageKind::Address => secs(t.address_secs).unwrap_or(Address::default_timeout(s)),
            StageKind::Finish => secs(t.finish_secs).unwrap_or(Finish::default_timeout(s)),
            StageKind::Teardown => Teardown::default_timeout(s),
        };
        // The finish script's own timeout comes on top of logging in.
        let script = (stage == StageKind::Finish)
            .then(|| {
                cx.job
                    .provision()
                    .and_then(|p| p.finish.as_ref())
                    .map(|f| f.timeout())
            })
            .flatten()
            .unwrap_or_default();
        (timeout, timeout + script + STAGE_GRACE)
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
        let secrets = job_secrets(&cx.job);
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
        Ok(Some(Some(meta))) if meta.job_id == cx.job.id && meta.state == JobState::RollingBack => {
            warn!("resuming an interrupted rollback");
            let stage = meta.failed_stage.unwrap_or(StageKind::Finish);
            Some(StageFailure {
                stage,
                error: StageError::Interrupted,
            })
        }
        _ => None,
    }
}

async fn dispatch(stage: StageKind, cx: &mut JobRun) -> Result<(), StageError> {
    match stage {
        StageKind::Overlay => Overlay::run(cx).await,
        StageKind::Domain => Domain::run(cx).await,
        StageKind::Address => Address::run(cx).await,
        StageKind::Finish => Finish::run(cx).await,
        StageKind::Teardown => Teardown::run(cx).await,
    }
}

/// Updates hatchery's metadata in the job's domain, if the domain exists and is the job's.
/// Best effort: stages find their own artefacts on a re-run; the record serves resumed
/// rollbacks, operators and the reconciler.
async fn update_metadata(cx: &JobRun, change: impl FnOnce(&mut JobMetadata)) {
    let name = cx.job.vm_name();
    let result = match domain::read_metadata(cx, name).await {
        Ok(Some(Some(mut meta))) if meta.job_id == cx.job.id => {
            change(&mut meta);
            meta.updated_at = Some(domain::now_secs());
            domain::write_metadata(cx, name, &meta).await
        }
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
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

fn job_secrets(job: &Job) -> Vec<String> {
    let finish = job.provision().and_then(|p| p.finish.as_ref());
    match finish.map(|f| &f.credential) {
        Some(Credential::Password(s)) | Some(Credential::PrivateKey(s)) => {
            vec![s.expose().to_owned()]
        }
        _ => Vec::new(),
    }
}

/// Shortest piece of a secret worth hiding on its own; shorter ones would blank ordinary text.
const MIN_SECRET_PIECE: usize = 6;

/// Removes the job's own secrets from text the guest produced, should its script print them:
/// whole, line by line (a key printed in part), and a piece left at the start of a tail that
/// was cut in the middle of one.
fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_owned();
    for secret in secrets {
        let lines = secret
            .lines()
            .map(str::trim)
            .filter(|l| l.len() >= MIN_SECRET_PIECE);
        for piece in std::iter::once(secret.as_str()).chain(lines) {
            if piece.len() >= MIN_SECRET_PIECE.min(secret.len()) && !piece.is_empty() {
                out = out.replace(piece, "[redacted]");
            }
        }
        // The tail keeps the last bytes, so a secret can only be cut at the tail's start.
        let longest = (MIN_SECRET_PIECE..secret.len()).rev().find(|&n| {
            secret.is_char_boundary(secret.len() - n)
                && out.starts_with(&secret[secret.len() - n..])
        });
        if let Some(n) = longest {
            out.replace_range(..n, "[redacted]");
        }
    }
    out
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_covers_whole_secrets_single_lines_and_cut_tails() {
        let password = "correct-horse-battery".to_owned();
        let key =
            "-----BEGIN KEY-----\nAAAALINEONEAAAA\nBBBBLINETWOBBBB\n-----END KEY-----".to_owned();
        let secrets = [password, key];

        assert_eq!(
            redact("pw correct-horse-battery!", &secrets),
            "pw [redacted]!"
        );
        assert_eq!(redact("x BBBBLINETWOBBBB y", &secrets), "x [redacted] y");
        assert_eq!(
            redact("horse-battery and more", &secrets),
            "[redacted] and more"
        );
        assert_eq!(redact("nothing to hide", &secrets), "nothing to hide");
    }
}
