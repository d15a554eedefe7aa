//! What happens to one delivery: rejected, settled with an outcome already known, parked
//! while another worker runs the job, dropped as cancelled, or run.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lapin::Acker;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use super::BrokerError;
use super::Link;
use super::claim::{Claim, Claims};
use super::control::Cancellations;
use super::ledger::{Begin, Finished, Held, Ledger, Run};
use super::message::{self, HEADER_ATTEMPTS, HEADER_CONTINUATION, HEADER_REASON};
use super::names::JOB_ROUTING_KEY;
use super::outbox::Outbox;
use super::worker::WorkerConfig;
use crate::events::{Event, EventData, EventKind, EventSink, JobResult, Rejection};
use crate::job::{self, BatchRef, Job, RejectedJob, Work};
use crate::pipeline::Pipeline;

pub struct Intake {
    pub link: Link,
    pub outbox: Outbox,
    pub pipeline: Arc<Pipeline>,
    pub ledger: Arc<Ledger>,
    pub claims: Arc<Claims>,
    pub cancels: Arc<Cancellations>,
    pub config: WorkerConfig,
}

impl Intake {
    /// Settles one delivery of the jobs queue; every path ends acknowledged or handed back.
    pub async fn handle(self: Arc<Self>, d: Delivery, generation: u64) {
        let job = match job::parse(&d.data, &self.config.limits) {
            Ok(job) => job,
            Err(rejected) => return self.reject(&d, &rejected).await,
        };
        // A job naming a hypervisor goes to that hypervisor's queue, whose consumer keeps to its
        // limit. Jobs giving a URI run from the shared queue.
        let shared = d.routing_key.as_str() == JOB_ROUTING_KEY;
        if shared && !job.hypervisor.contains("://") && self.forward(&d, &job.hypervisor).await {
            return;
        }
        let id = job.id;
        let attempt = message::attempt(&d.properties);
        // Copies that may have a history: redeliveries and hand-over copies.
        let second_look = d.redelivered || message::has_header(&d.properties, HEADER_CONTINUATION);
        let held = Held {
            acker: d.acker.clone(),
            generation,
            received: Instant::now(),
        };
        let body = Arc::new(d.data);

        let run = match self.ledger.begin(id, held, d.properties, body, attempt) {
            Begin::New(run) => run,
            Begin::Running(_) => {
                debug!(job_id = %id, "copy of a running job; it settles with the run");
                return;
            }
            Begin::Finished(f) => {
                info!(job_id = %id, "copy of a finished job; publishing its outcome again");
                if self.publish_final(&f).await {
                    settle(&id, &d.acker).await;
                }
                return;
            }
        };

        // Only one live worker runs a job; the others park their copy for later. A first
        // delivery skips the claim: nobody else can have started it, and the common path
        // stays free of extra round trips. Its run claims the job before any hand-over.
        let claim = if second_look {
            self.claims.take(id).await
        } else {
            Ok(Claim::Unneeded)
        };
        match claim {
            Ok(Claim::Taken) => run.claimed.store(true, Ordering::SeqCst),
            Ok(Claim::Unneeded) => {}
            Ok(Claim::HeldElsewhere) => return self.park(id, &run).await,
            Err(e) => {
                warn!(job_id = %id, error = %crate::pipeline::chain(&e), "cannot claim job; returning it");
                for held in self.ledger.abandon(id) {
                    hand_back(&id, &held.acker).await;
                }
                return;
            }
        }

        // A copy arriving after its run finished elsewhere repeats that run's outcome.
        if second_look {
            match self.claims.done_marker(id).await {
                Ok(Some(event)) => {
                    info!(job_id = %id, "job finished elsewhere; publishing its outcome again");
                    let batch_size = job.batch.as_ref().map(|b| b.size);
                    return self
                        .conclude(id, &run, Finished { event, batch_size }, true, false)
                        .await;
                }
                Ok(None) => {}
                Err(e) => debug!(job_id = %id, error = %e, "cannot read done marker"),
            }
        }

        if self.cancels.contains(id) {
            info!(job_id = %id, "job cancelled before it started; dropping it");
            let finished = self.cancelled_before_start(&job, attempt);
            return self.conclude(id, &run, finished, true, false).await;
        }
        self.run(job, run, attempt).await;
    }

    /// Runs the pipeline, handing the job over to a fresh copy whenever a delivery of it
    /// nears the broker's ack timeout.
    async fn run(&self, job: Job, run: Arc<Run>, attempt: u32) {
        let id = job.id;
        let batch_size = job.batch.as_ref().map(|b| b.size);
        let sink = JobSink {
            outbox: self.outbox.clone(),
            exchange: self.link.names().events_exchange.clone(),
            batch_size,
            run: Arc::clone(&run),
        };
        let pipeline = self.pipeline.run(job, attempt, run.cancel.clone(), &sink);
        tokio::pin!(pipeline);

        let mut handed_over = false;
        loop {
            let due = run.oldest_open().map(|t| t + self.config.hand_over_after());
            let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
            tokio::select! {
                _ = &mut pipeline => break,
                () = tokio::time::sleep_until(due.unwrap_or(far)), if due.is_some() => {
                    handed_over |= self.hand_over(id, &run).await;
                }
                () = run.attached.notified() => {}
            }
        }

        let last = run.outcome();
        let Some(event) = last else {
            // The pipeline always ends with a final event; without one, let another try.
            error!(job_id = %id, "run ended without a final event; returning the job");
            for held in self.ledger.abandon(id) {
                hand_back(&id, &held.acker).await;
            }
            if run.claimed.load(Ordering::SeqCst) {
                self.claims.release(id).await;
            }
            return;
        };
        // The sink published the final event already, with a confirm.
        let finished = Finished { event, batch_size };
        self.conclude(id, &run, finished, false, handed_over).await;
    }

    /// Publishes a copy of the job (marked as a continuation) and acknowledges the deliveries
    /// held so far, before the broker's ack timeout closes the channel under them.
    async fn hand_over(&self, id: Uuid, run: &Run) -> bool {
        // The copy may reach another worker at once: it must find the job claimed.
        if !run.claimed.load(Ordering::SeqCst) {
            match self.claims.take(id).await {
                Ok(Claim::Taken) => run.claimed.store(true, Ordering::SeqCst),
                Ok(_) => warn!(job_id = %id, "another worker claimed this running job"),
                Err(e) => {
                    warn!(job_id = %id, error = %e, "cannot claim job; hand-over postponed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    return false;
                }
            }
        }
        let held = run.take_deliveries();
        let extra = [
            (HEADER_CONTINUATION, message::text(&self.config.name)),
            (HEADER_ATTEMPTS, message::number(run.attempt)),
        ];
        let jobs = &self.link.names().jobs_exchange;
        let copy = message::copy(jobs, &run.props, &run.body, &extra);
        if let Err(e) = self.outbox.confirmed(copy).await {
            warn!(job_id = %id, error = %e, "cannot hand job over; keeping its delivery");
            run.put_back(held);
            tokio::time::sleep(Duration::from_secs(1)).await;
            return false;
        }
        info!(job_id = %id, "job nears the ack timeout; handed over to a fresh copy");
        for h in held {
            settle(&id, &h.acker).await;
        }
        true
    }

    /// Records the outcome, settles every delivery of the job, and releases its claim.
    async fn conclude(
        &self,
        id: Uuid,
        run: &Run,
        finished: Finished,
        publish: bool,
        leave_marker: bool,
    ) {
        if publish && !self.publish_final(&finished).await {
            // Closing: the deliveries go back to the queue with the connection.
            return;
        }
        if leave_marker {
            let names = self.link.names();
            let msg = message::event(&names.events_exchange, &finished.event, finished.batch_size);
            if let Err(e) = self.claims.leave_done_marker(id, msg).await {
                warn!(job_id = %id, error = %e, "cannot leave done marker");
            }
        }
        for held in self.ledger.finish(id, finished) {
            settle(&id, &held.acker).await;
        }
        if run.claimed.load(Ordering::SeqCst) {
            self.claims.release(id).await;
        }
    }

    /// Publishes a final event (again) and waits for the broker's confirm.
    async fn publish_final(&self, f: &Finished) -> bool {
        let exchange = &self.link.names().events_exchange;
        match self
            .outbox
            .confirmed(message::event(exchange, &f.event, f.batch_size))
            .await
        {
            Ok(()) => true,
            Err(e) => {
                warn!(subject = %f.event.subject, error = %e, "final event not published");
                false
            }
        }
    }

    /// Sends the job's copies to the delay queue, from which they return to the jobs queue.
    async fn park(&self, id: Uuid, run: &Run) {
        let held = self.ledger.abandon(id);
        let delay = self.config.park_delay.as_millis().to_string();
        let mut copy = message::copy(
            &self.link.names().delay_exchange,
            &run.props,
            &run.body,
            &[],
        );
        copy.props = copy.props.with_expiration(delay.as_str().into());
        if let Err(e) = self.outbox.confirmed(copy).await {
            warn!(job_id = %id, error = %e, "cannot park job; returning it");
            for h in held {
                hand_back(&id, &h.acker).await;
            }
            return;
        }
        info!(job_id = %id, delay_ms = self.config.park_delay.as_millis() as u64, "job runs on another worker; parked");
        for h in held {
            settle(&id, &h.acker).await;
        }
    }

    /// A message that is no job: a `job.rejected` event, then the dead queue with the reason.
    /// Moves a delivery to the queue of hypervisor `name`. `false` when no worker serves that
    /// hypervisor (its queue does not exist): the job then runs here and is rejected for naming
    /// an unknown hypervisor.
    async fn forward(&self, d: &Delivery, name: &str) -> bool {
        let names = self.link.names();
        let mut msg = message::copy(&names.jobs_exchange, &d.properties, &d.data, &[]);
        msg.routing_key = super::names::hypervisor_key(name);
        match self.outbox.confirmed(msg).await {
            Ok(()) => {
                debug!(hypervisor = %name, "job moved to its hypervisor's queue");
                settle(&name, &d.acker).await;
                true
            }
            Err(BrokerError::Unroutable { .. }) => false,
            Err(e) => {
                warn!(hypervisor = %name, error = %crate::pipeline::chain(&e), "cannot move job; returning it");
                hand_back(&name, &d.acker).await;
                true
            }
        }
    }

    async fn reject(&self, d: &Delivery, rejected: &RejectedJob) {
        let names = self.link.names();
        let small = d.data.len() <= self.config.limits.message_bytes;
        let (subject, batch) = identify(&d.data, small);
        let reason = rejected.reason();
        warn!(subject = %subject, reason, error = %rejected, "message rejected");

        let data = EventData::Rejected(Rejection {
            reason: reason.to_owned(),
            message: rejected.to_string(),
            problems: rejected.problems().to_vec(),
        });
        let batch_id = batch.as_ref().map(|b| b.id.as_str());
        let event =
            self.pipeline
                .publisher
                .event(EventKind::JobRejected, &subject, batch_id, "", data);
        let finished = Finished {
            event,
            batch_size: batch.as_ref().map(|b| b.size),
        };
        if !self.publish_final(&finished).await {
            return;
        }
        let extra = [(HEADER_REASON, message::text(reason))];
        let dead = message::copy(&names.dead_exchange, &d.properties, &d.data, &extra);
        if let Err(e) = self.outbox.confirmed(dead).await {
            warn!(subject = %subject, error = %e, "cannot dead-letter message; returning it");
            return hand_back(&subject, &d.acker).await;
        }
        settle(&subject, &d.acker).await;
    }

    /// The final event of a job dropped because it was cancelled before any run started.
    fn cancelled_before_start(&self, job: &Job, attempt: u32) -> Finished {
        let hypervisor = self.pipeline.settings.resolve_hypervisor(&job.hypervisor);
        let action = match job.work {
            Work::Provision(_) => "provision",
            Work::Deprovision(_) => "deprovision",
        };
        let result = JobResult {
            job_id: job.id,
            action: action.to_owned(),
            vm: job.vm_name().to_owned(),
            hypervisor: hypervisor.unwrap_or(&job.hypervisor).to_owned(),
            attempt,
            domain_uuid: None,
            macs: Vec::new(),
            ip: None,
            ssh_port: None,
            host_key_fingerprint: None,
            overlay: None,
            finish: None,
            stages: Vec::new(),
            failure: None,
            rolled_back: None,
            already_absent: false,
        };
        let batch = job.batch.as_ref();
        let data = EventData::Result(Box::new(result));
        let subject = job.id.to_string();
        let publisher = &self.pipeline.publisher;
        let event = publisher.event(
            EventKind::JobCancelled,
            &subject,
            batch.map(|b| b.id.as_str()),
            "",
            data,
        );
        Finished {
            event,
            batch_size: batch.map(|b| b.size),
        }
    }
}

/// Sends a job's events to the events exchange: progress without waiting, the final event
/// only once the broker confirmed it.
struct JobSink {
    outbox: Outbox,
    exchange: String,
    batch_size: Option<u32>,
    run: Arc<Run>,
}

impl EventSink for JobSink {
    fn emit<'a>(
        &'a self,
        event: Event,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let msg = message::event(&self.exchange, &event, self.batch_size);
            if !event.kind().is_some_and(|k| k.is_final()) {
                self.outbox.post(msg);
                return;
            }
            // On a task of its own: should the run be dropped at the end of a stop's grace
            // period, the outcome still gets confirmed and recorded, and the job is not
            // handed back after it was published.
            let (outbox, run) = (self.outbox.clone(), Arc::clone(&self.run));
            let confirm = tokio::spawn(async move {
                match outbox.confirmed(msg).await {
                    Ok(()) => run.set_outcome(event),
                    Err(e) => warn!(error = %e, "final event not confirmed"),
                }
            });
            let _ = confirm.await;
        })
    }
}

/// The subject and batch a rejected message's event carries: the job id and batch when the
/// message says them, or else a digest of the message.
fn identify(body: &[u8], readable: bool) -> (String, Option<BatchRef>) {
    let value = readable
        .then(|| serde_json::from_slice::<serde_json::Value>(body).ok())
        .flatten();
    let id = value
        .as_ref()
        .and_then(|v| v.get("id")?.as_str()?.parse::<Uuid>().ok());
    let batch = value
        .as_ref()
        .and_then(|v| serde_json::from_value(v.get("batch")?.clone()).ok());
    let subject = match id {
        Some(id) => id.to_string(),
        None => format!("sha256:{}", hex::encode(Sha256::digest(body))),
    };
    (subject, batch)
}

async fn settle(subject: &(dyn std::fmt::Display + Sync), acker: &Acker) {
    match acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        // Its channel closed: the broker requeued it, and the copy will meet the ledger.
        Ok(false) => debug!(subject = %subject, "delivery not acknowledged: channel gone"),
        Err(e) => warn!(subject = %subject, error = %e, "cannot acknowledge delivery"),
    }
}

async fn hand_back(subject: &(dyn std::fmt::Display + Sync), acker: &Acker) {
    let requeue = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    match acker.nack(requeue).await {
        Ok(true) => {}
        Ok(false) => debug!(subject = %subject, "delivery not returned: channel gone"),
        Err(e) => warn!(subject = %subject, error = %e, "cannot return delivery"),
    }
}
