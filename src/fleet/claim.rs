//! Fleet-wide per-job locks, and the markers finished jobs leave for late copies of them.
//!
//! A claim is an exclusive, auto-delete queue named after the job. Declaring it succeeds for
//! one connection only (RabbitMQ answers 405 RESOURCE_LOCKED to the others), and it vanishes
//! with that connection, so a worker that dies releases its claims without help.
//!
//! A done marker is a durable queue named after the job, holding the job's final event, that
//! expires unused after [`DONE_MARKER_EXPIRY_MS`]. Only runs that handed their job over leave
//! one: they are the ones whose copies can still arrive after the outcome.

use std::sync::Arc;

use lapin::Channel;
use lapin::options::{
    BasicGetOptions, BasicRejectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::Mutex;
use tracing::debug;
use uuid::Uuid;

use super::error::reply_code;
use super::link::Session;
use super::outbox::{Message, Outbox};
use super::{BrokerError, Link, Names};
use crate::events::Event;

/// How long a done marker outlives its last use. Copies of a job circulate at most a park
/// delay after the run that handed it over ended; a day is plenty.
pub const DONE_MARKER_EXPIRY_MS: i64 = 24 * 3600 * 1000;

/// What [`Claims::take`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This worker holds the claim now (or held it already).
    Taken,
    /// Another live worker runs the job.
    HeldElsewhere,
    /// Not asked for: a first delivery runs without one until it needs one.
    Unneeded,
}

/// Claims and markers, on a channel of their own: a refused declaration closes the channel it
/// was made on, and must not take the publish or consume channels with it.
pub struct Claims {
    link: Link,
    outbox: Outbox,
    channel: Mutex<Option<(u64, Channel)>>,
}

impl Claims {
    pub fn new(link: Link, outbox: Outbox) -> Arc<Self> {
        Arc::new(Self {
            link,
            outbox,
            channel: Mutex::new(None),
        })
    }

    fn names(&self) -> &Names {
        self.link.names()
    }

    /// Takes the claim on `job` for this worker's connection.
    pub async fn take(&self, job: Uuid) -> Result<Claim, BrokerError> {
        let name = self.names().claim(job);
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        let mut slot = self.channel.lock().await;
        let ch = open(&self.link, &mut slot).await?;
        match ch
            .queue_declare(name.as_str().into(), options, FieldTable::default())
            .await
        {
            Ok(_) => Ok(Claim::Taken),
            Err(e) if reply_code(&e) == Some(405) => {
                *slot = None;
                Ok(Claim::HeldElsewhere)
            }
            Err(source) => {
                *slot = None;
                Err(BrokerError::DeclareQueue { name, source })
            }
        }
    }

    /// Releases the claim on `job`. A claim made on an earlier connection is gone already.
    pub async fn release(&self, job: Uuid) {
        let name = self.names().claim(job);
        let mut slot = self.channel.lock().await;
        let Ok(ch) = open(&self.link, &mut slot).await else {
            return;
        };
        let result = ch
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
        if let Err(e) = result {
            debug!(job_id = %job, error = %e, "claim release failed; it goes with the connection");
            *slot = None;
        }
    }

    /// Leaves `event` as the done marker of `job`.
    pub async fn leave_done_marker(&self, job: Uuid, event: Message) -> Result<(), BrokerError> {
        let name = self.names().done(job);
        {
            let mut slot = self.channel.lock().await;
            let ch = open(&self.link, &mut slot).await?;
            let options = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            let result = ch
                .queue_declare(name.as_str().into(), options, done_marker_args())
                .await;
            if let Err(source) = result {
                *slot = None;
                return Err(BrokerError::DeclareQueue { name, source });
            }
        }
        // Through the default exchange, straight into the marker queue.
        let marker = Message {
            exchange: String::new(),
            routing_key: name,
            mandatory: true,
            ..event
        };
        self.outbox.confirmed(marker).await
    }

    /// The final event a finished run of `job` left behind, if any.
    pub async fn done_marker(&self, job: Uuid) -> Result<Option<Event>, BrokerError> {
        let name = self.names().done(job);
        let mut slot = self.channel.lock().await;
        let ch = open(&self.link, &mut slot).await?;
        let got = match ch
            .basic_get(name.as_str().into(), BasicGetOptions::default())
            .await
        {
            Ok(got) => got,
            // 404: no marker. The refusal closed the channel; the next call opens another.
            Err(e) if reply_code(&e) == Some(404) => {
                *slot = None;
                return Ok(None);
            }
            Err(source) => {
                *slot = None;
                return Err(BrokerError::Get {
                    queue: name,
                    source,
                });
            }
        };
        let Some(got) = got else { return Ok(None) };
        // Put it back for the next late copy.
        let requeue = BasicRejectOptions { requeue: true };
        got.delivery
            .acker
            .reject(requeue)
            .await
            .map_err(BrokerError::Ack)?;
        Ok(serde_json::from_slice(&got.delivery.data).ok())
    }
}

fn done_marker_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-expires".into(),
        AMQPValue::LongLongInt(DONE_MARKER_EXPIRY_MS),
    );
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    args
}

/// The claims channel of the current session, opened on first use.
async fn open(link: &Link, slot: &mut Option<(u64, Channel)>) -> Result<Channel, BrokerError> {
    let session: Arc<Session> = link.current().ok_or(BrokerError::ConnectionLost)?;
    if let Some((generation, ch)) = slot.as_ref()
        && *generation == session.generation
        && ch.status().connected()
    {
        return Ok(ch.clone());
    }
    let ch = session.channel().await?;
    *slot = Some((session.generation, ch.clone()));
    Ok(ch)
}
