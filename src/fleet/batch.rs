//! Counts the final events of batch jobs fleet-wide and publishes one `batch.completed` per
//! batch.
//!
//! Every worker consumes the batches queue, but the queue has a single active consumer, so
//! one worker counts at a time and the others stand by. The counter keeps each batch's events
//! unacknowledged until the batch completes: its state lives in the queue, not in memory. When
//! the counting worker dies, the broker hands the unacknowledged events to the next consumer,
//! which rebuilds the counts from them. A job's duplicate final events count once (by job).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tracing::{debug, info, warn};

use super::message::{self, HEADER_BATCH_SIZE};
use super::outbox::Outbox;
use super::{BrokerError, Link};
use crate::events::{BatchSummary, Event, EventData, EventKind, Publisher};

/// Unacknowledged events the counter may hold: the sum of the sizes of open batches it can
/// count at once.
const PREFETCH: u16 = 10_000;

/// Completed batches remembered, so that a late duplicate does not open the batch again.
const COMPLETED_KEPT: usize = 10_000;

#[derive(Default)]
struct Tally {
    size: u32,
    outcomes: HashMap<String, EventKind>,
    held: Vec<Acker>,
}

impl Tally {
    fn summary(&self, batch_id: &str) -> BatchSummary {
        let count = |kind| self.outcomes.values().filter(|k| **k == kind).count() as u32;
        BatchSummary {
            batch_id: batch_id.to_owned(),
            size: self.size,
            succeeded: count(EventKind::JobSucceeded),
            failed: count(EventKind::JobFailed),
            cancelled: count(EventKind::JobCancelled),
            rejected: count(EventKind::JobRejected),
        }
    }
}

/// Runs the counter for as long as the process lives.
pub async fn count(link: Link, outbox: Outbox, publisher: Publisher) {
    let mut completed = Completed::default();
    while let Some(session) = link.session().await {
        if let Err(e) = consume(&link, &session, &outbox, &publisher, &mut completed).await {
            debug!(error = %crate::pipeline::chain(&e), "batch counter interrupted");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn consume(
    link: &Link,
    session: &super::link::Session,
    outbox: &Outbox,
    publisher: &Publisher,
    completed: &mut Completed,
) -> Result<(), BrokerError> {
    let names = link.names();
    let queue = &names.batches_queue;
    let ch = session.channel().await?;
    ch.basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .map_err(|source| BrokerError::Qos {
            count: PREFETCH,
            source,
        })?;
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| BrokerError::Consume {
            queue: queue.clone(),
            source,
        })?;

    // Counts start empty on each channel: whatever an earlier channel held, the broker
    // delivers again.
    let mut open: HashMap<String, Tally> = HashMap::new();
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.map_err(|source| BrokerError::Consume {
            queue: queue.clone(),
            source,
        })?;
        let size = message::header_u32(&delivery.properties, HEADER_BATCH_SIZE);
        let event = serde_json::from_slice::<Event>(&delivery.data).ok();
        let counted = event
            .as_ref()
            .and_then(|e| Some((e.batchid.clone()?, e.kind()?, e)));
        let (Some(size), Some((batch, kind, event))) = (size, counted) else {
            // Not a batch job's final event: nothing to count.
            ack(&delivery.acker).await;
            continue;
        };
        if !kind.is_final() || completed.contains(&batch) {
            ack(&delivery.acker).await;
            continue;
        }

        let tally = open.entry(batch.clone()).or_default();
        tally.size = size;
        tally.outcomes.insert(event.subject.clone(), kind);
        tally.held.push(delivery.acker);
        if tally.outcomes.len() < tally.size as usize {
            continue;
        }

        // Complete: announce it, and only then let go of the events it was counted from.
        let Some(tally) = open.remove(&batch) else {
            continue;
        };
        let summary = tally.summary(&batch);
        info!(
            batch_id = %batch,
            succeeded = summary.succeeded,
            failed = summary.failed,
            cancelled = summary.cancelled,
            rejected = summary.rejected,
            "batch completed"
        );
        let data = EventData::Batch(summary);
        let done = publisher.event(EventKind::BatchCompleted, &batch, Some(&batch), "", data);
        outbox
            .confirmed(message::event(&names.events_exchange, &done, None))
            .await?;
        for acker in &tally.held {
            ack(acker).await;
        }
        completed.insert(batch);
    }
    Ok(())
}

async fn ack(acker: &Acker) {
    match acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        // The channel is gone; the broker delivers the event again and it is counted again.
        Ok(false) => debug!("batch event not acknowledged: its channel is closed"),
        Err(e) => warn!(error = %e, "cannot acknowledge a batch event"),
    }
}

#[derive(Default)]
struct Completed {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl Completed {
    fn contains(&self, batch: &str) -> bool {
        self.set.contains(batch)
    }

    fn insert(&mut self, batch: String) {
        if self.set.insert(batch.clone()) {
            self.order.push_back(batch);
        }
        while self.order.len() > COMPLETED_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}
