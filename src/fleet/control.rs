//! Cancellation requests: a durable stream that every worker reads from the start of its
//! retention, so a job cancelled before any worker took it is still dropped when it arrives,
//! and a job running anywhere is interrupted by the worker that runs it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::ledger::Ledger;
use super::outbox::{Message, Outbox};
use super::{BrokerError, Link, Names};

/// One entry of the cancellation stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlMessage {
    /// Stop the job: drop it if it has not started, interrupt it if it runs.
    Cancel { job_id: Uuid },
    /// Written by a worker at start; seeing its own tells it the replay has caught up.
    Marker { id: Uuid },
}

impl ControlMessage {
    pub fn to_message(&self, names: &Names) -> Message {
        // Plain data; serialising cannot fail.
        let body = serde_json::to_vec(self).unwrap_or_default();
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        // The default exchange routes by queue name, straight into the stream.
        let routing_key = names.cancellations.clone();
        Message {
            exchange: String::new(),
            routing_key,
            body,
            props,
            mandatory: true,
        }
    }
}

/// The job ids cancelled within the stream's retention, as this worker has read them.
#[derive(Default)]
pub struct Cancellations {
    ids: Mutex<HashSet<Uuid>>,
}

impl Cancellations {
    pub fn contains(&self, id: Uuid) -> bool {
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
    }

    fn insert(&self, id: Uuid) -> bool {
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id)
    }
}

/// Reads the stream for as long as the process lives, on every session. `caught_up` turns
/// true once the requests made before this worker started are known.
pub async fn follow(
    link: Link,
    outbox: Outbox,
    cancels: Arc<Cancellations>,
    ledger: Arc<Ledger>,
    caught_up: watch::Sender<bool>,
) {
    let marker = Uuid::new_v4();
    outbox.post(ControlMessage::Marker { id: marker }.to_message(link.names()));
    while let Some(session) = link.session().await {
        if let Err(e) = read(&link, &session, &cancels, &ledger, marker, &caught_up).await {
            debug!(error = %crate::pipeline::chain(&e), "cancellation stream interrupted");
        }
        // Whatever ended the read, give the link a moment before trying again.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn read(
    link: &Link,
    session: &super::link::Session,
    cancels: &Cancellations,
    ledger: &Ledger,
    marker: Uuid,
    caught_up: &watch::Sender<bool>,
) -> Result<(), BrokerError> {
    let queue = &link.names().cancellations;
    let ch = session.channel().await?;
    // Streams need a prefetch; acknowledgements only return credit.
    ch.basic_qos(500, BasicQosOptions::default())
        .await
        .map_err(|source| BrokerError::Qos { count: 500, source })?;
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString(LongString::from("first")),
    );
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .map_err(|source| BrokerError::Consume {
            queue: queue.clone(),
            source,
        })?;

    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.map_err(|source| BrokerError::Consume {
            queue: queue.clone(),
            source,
        })?;
        match serde_json::from_slice::<ControlMessage>(&delivery.data) {
            Ok(ControlMessage::Cancel { job_id }) => {
                if cancels.insert(job_id) && ledger.cancel(job_id) {
                    info!(job_id = %job_id, "cancelling running job");
                }
            }
            Ok(ControlMessage::Marker { id }) if id == marker => {
                caught_up.send_replace(true);
            }
            Ok(ControlMessage::Marker { .. }) => {}
            Err(e) => warn!(error = %e, "ignoring unreadable cancellation request"),
        }
        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
    }
    Ok(())
}
