//! The worker: consumes the jobs queue with manual acknowledgements, runs each job as a task,
//! and stops cleanly on a signal.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::Channel;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::claim::{Claim, Claims};
use super::control::{self, Cancellations};
use super::intake::Intake;
use super::ledger::Ledger;
use super::link::Session;
use super::{BrokerError, Link, Outbox, batch};
use crate::job::Limits;
use crate::pipeline::Pipeline;

/// How a worker behaves, validated.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Jobs run at once; also the prefetch count.
    pub concurrency: u16,
    /// How long jobs in flight may take to finish after a stop signal.
    pub grace: Duration,
    /// The broker's consumer ack timeout. A run still going at 80% of it hands its job over
    /// to a fresh copy, so the broker never closes the channel under it.
    pub ack_timeout: Duration,
    /// How long a copy of a job that another worker runs waits before it is looked at again.
    pub park_delay: Duration,
    pub limits: Limits,
    /// This worker's name, in logs, events' `source`, and hand-over headers.
    pub name: String,
    /// Configured hypervisors this worker serves, with the most jobs each may run at once
    /// across the fleet; each has its own queue.
    pub hypervisors: Vec<(String, u16)>,
}

impl WorkerConfig {
    /// When an open delivery must be handed over.
    pub fn hand_over_after(&self) -> Duration {
        self.ack_timeout.mul_f64(0.8)
    }
}

/// Runs a worker until `stop` is cancelled, then drains it.
pub async fn run(link: Link, pipeline: Pipeline, config: WorkerConfig, stop: CancellationToken) {
    let outbox = Outbox::start(link.clone());
    let ledger = Arc::new(Ledger::default());
    let cancels = Arc::new(Cancellations::default());
    let claims = Claims::new(link.clone(), outbox.clone());

    // Side duties: the cancellation log and the batch counter.
    let (caught_up, mut replayed) = watch::channel(false);
    let follow = control::follow(
        link.clone(),
        outbox.clone(),
        cancels.clone(),
        ledger.clone(),
        caught_up,
    );
    tokio::spawn(follow);
    tokio::spawn(batch::count(
        link.clone(),
        outbox.clone(),
        pipeline.publisher.clone(),
    ));

    // Jobs cancelled before this worker started must be known before it takes any job.
    let replay = tokio::time::timeout(Duration::from_secs(15), replayed.wait_for(|r| *r));
    tokio::select! {
        r = replay => if r.is_err() {
            warn!("cancellation log not replayed in time; taking jobs anyway");
        },
        () = stop.cancelled() => {}
    }

    let intake = Arc::new(Intake {
        link: link.clone(),
        outbox: outbox.clone(),
        pipeline: Arc::new(pipeline),
        ledger: ledger.clone(),
        claims: claims.clone(),
        cancels,
        config: config.clone(),
    });
    let tasks = Tasks {
        tracker: TaskTracker::new(),
        abort: CancellationToken::new(),
    };
    // One consumer for the shared queue, one per served hypervisor. Their channels stay open
    // through the drain: closing one would return the deliveries of the jobs still finishing.
    let mut sources = vec![Source {
        hypervisor: None,
        prefetch: config.concurrency,
    }];
    for (name, limit) in &config.hypervisors {
        sources.push(Source {
            hypervisor: Some(name.clone()),
            prefetch: *limit,
        });
    }
    let consumers = sources
        .iter()
        .map(|source| consume(&link, &intake, &tasks, source, &stop));
    let channels = futures_util::future::join_all(consumers).await;

    drain(&intake, &tasks, config.grace).await;
    for ch in channels.into_iter().flatten() {
        let _ = ch.close(200, "worker stopping".into()).await;
    }
    if !outbox.flush(Duration::from_secs(10)).await {
        warn!("some events were not confirmed before exit");
    }
    link.close().await;
}

/// A queue this worker takes jobs from.
struct Source {
    /// `None` for the shared jobs queue; a configured hypervisor's name for its own queue.
    hypervisor: Option<String>,
    prefetch: u16,
}

/// Takes deliveries until `stop`, on each session in turn.
async fn consume(
    link: &Link,
    intake: &Arc<Intake>,
    tasks: &Tasks,
    source: &Source,
    stop: &CancellationToken,
) -> Option<Channel> {
    let mut last_generation = 0;
    loop {
        let session = tokio::select! {
            s = link.session() => s?,
            () = stop.cancelled() => return None,
        };
        if session.generation != last_generation && last_generation != 0 {
            // Claims died with the old connection: take them again for the runs going on.
            reclaim(intake).await;
        }
        last_generation = session.generation;

        match consume_session(&session, intake, tasks, source, stop).await {
            Ok(ch) => return Some(ch),
            Err(e) => {
                warn!(error = %crate::pipeline::chain(&e), "job consumer interrupted; resuming");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Consumes on one channel. Returns `Ok` on stop, an error when the channel or connection ends.
async fn consume_session(
    session: &Arc<Session>,
    intake: &Arc<Intake>,
    tasks: &Tasks,
    source: &Source,
    stop: &CancellationToken,
) -> Result<Channel, BrokerError> {
    let names = intake.link.names();
    let ch = session.channel().await?;
    let queue = match &source.hypervisor {
        None => {
            // The hypervisors' queues exist before the first job is moved to one of them.
            for (name, _) in &intake.config.hypervisors {
                super::topology::declare_hypervisor(&ch, names, name).await?;
            }
            names.jobs_queue.clone()
        }
        Some(name) => {
            super::topology::declare_hypervisor(&ch, names, name).await?;
            names.hypervisor_queue(name)
        }
    };
    let count = source.prefetch;
    ch.basic_qos(count, BasicQosOptions::default())
        .await
        .map_err(|source| BrokerError::Qos { count, source })?;
    let options = BasicConsumeOptions::default();
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            options,
            FieldTable::default(),
        )
        .await
        .map_err(|source| BrokerError::Consume {
            queue: queue.clone(),
            source,
        })?;
    info!(queue = %queue, prefetch = count, "taking jobs");

    loop {
        tokio::select! {
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let intake = Arc::clone(intake);
                    let abort = tasks.abort.clone();
                    let handle = intake.handle(delivery, session.generation);
                    tasks.tracker.spawn(async move {
                        tokio::select! {
                            () = handle => {}
                            () = abort.cancelled() => {}
                        }
                    });
                }
                Some(Err(source)) => return Err(BrokerError::Consume { queue, source }),
                None => return Err(BrokerError::ConnectionLost),
            },
            () = stop.cancelled() => {
                // No more deliveries; those held stay ours until settled or handed back.
                let tag = consumer.tag();
                if let Err(e) = ch.basic_cancel(tag, BasicCancelOptions::default()).await {
                    warn!(error = %e, "cannot cancel the job consumer");
                }
                return Ok(ch);
            }
        }
    }
}

/// The delivery tasks, and the switch that drops them all at once when the grace period ends.
struct Tasks {
    tracker: TaskTracker,
    abort: CancellationToken,
}

/// Takes the claims of the runs in progress again on a new connection.
async fn reclaim(intake: &Intake) {
    let claimed = intake
        .ledger
        .running()
        .into_iter()
        .filter(|(_, run)| run.claimed.load(std::sync::atomic::Ordering::SeqCst));
    for (id, _run) in claimed {
        match intake.claims.take(id).await {
            Ok(Claim::Taken | Claim::Unneeded) => {}
            // Another worker got a redelivered copy while this one was away. Both runs
            // converge on the same domain (the stages adopt what the job id owns).
            Ok(Claim::HeldElsewhere) => {
                warn!(job_id = %id, "job claimed by another worker meanwhile")
            }
            Err(e) => warn!(job_id = %id, error = %e, "cannot claim job again"),
        }
    }
}

/// Lets the jobs in flight finish within `grace`, then hands the rest back to the queue.
async fn drain(intake: &Intake, tasks: &Tasks, grace: Duration) {
    tasks.tracker.close();
    let running = intake.ledger.running().len();
    if running > 0 {
        info!(
            running,
            grace_ms = grace.as_millis() as u64,
            "stopping: letting jobs finish"
        );
    }
    if tokio::time::timeout(grace, tasks.tracker.wait())
        .await
        .is_ok()
    {
        return;
    }
    // Stop the runs where they are, without rollback: the job goes on elsewhere, and a run
    // finishing after its job was handed back would publish a second outcome.
    tasks.abort.cancel();
    tasks.tracker.wait().await;
    // Outcomes already published are worth their confirms: those jobs are done.
    intake.outbox.flush(Duration::from_secs(5)).await;
    let left = intake.ledger.running();
    warn!(
        returned = left.len(),
        "grace period over; handing unfinished jobs back"
    );
    for (id, run) in left {
        // A run whose outcome the broker has is done: its deliveries are settled, not returned.
        let done = run.outcome().is_some();
        for held in run.take_deliveries() {
            let result = if done {
                held.acker.ack(BasicAckOptions::default()).await
            } else {
                // Back to the queue: the next worker resumes from what libvirt shows.
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                };
                held.acker.nack(requeue).await
            };
            match result {
                Ok(true) if done => info!(job_id = %id, "finished job acknowledged"),
                Ok(true) => info!(job_id = %id, "job handed back"),
                Ok(false) => info!(job_id = %id, "job's channel closed; the broker requeued it"),
                Err(e) => warn!(job_id = %id, error = %e, "cannot settle job; the broker will"),
            }
        }
    }
}
