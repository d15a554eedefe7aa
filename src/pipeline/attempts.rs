//! One stage of a job, attempted until it succeeds, fails for good or runs out of its retry
//! budget, with the deadlines each attempt runs under.

use std::time::{Duration, Instant};

use tracing::{Instrument, info, info_span, warn};

use super::{Pipeline, StageFailure, chain, ms};
use crate::events::{EventData, EventKind, EventSink, Failure, StageReport, StageTiming};
use crate::stages::address::Address;
use crate::stages::domain::Domain;
use crate::stages::finish::Finish;
use crate::stages::overlay::Overlay;
use crate::stages::teardown::Teardown;
use crate::stages::{JobRun, Stage, StageError, StageKind};

/// Extra time a stage gets beyond its own deadline before the pipeline abandons it.
const STAGE_GRACE: Duration = Duration::from_secs(30);

impl Pipeline {
    /// Runs one stage, retrying transient failures under the retry policy.
    pub(super) async fn stage_with_retries(
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
        let mut reconnects = policy.reconnect_delays();
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
            // An unreachable hypervisor (a daemon restarting) costs no attempt: only time.
            let script_failed = matches!(error, StageError::ScriptFailed { .. });
            let retriable = error.is_transient() || (retry_scripts && script_failed);
            let budget = match error.is_unreachable() {
                true => &mut reconnects,
                false => &mut delays,
            };
            let delay = (retriable && first.elapsed() < policy.max_elapsed)
                .then(|| budget.next())
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
