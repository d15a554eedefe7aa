//! Publishes with publisher confirms, and keeps every message until the broker confirmed it,
//! across reconnects. Messages leave in the order they were handed in; a message whose
//! confirm is lost with its connection is published again on the next one (same message id,
//! so consumers can drop the duplicate).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Confirmation};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

use super::{BrokerError, Link};

/// Messages published but not yet confirmed, at most; beyond it the outbox waits for confirms.
const WINDOW: usize = 512;

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Message {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub props: BasicProperties,
    /// Fail the publish when no queue takes the message, rather than lose it silently.
    pub mandatory: bool,
}

type Done = oneshot::Sender<Result<(), BrokerError>>;

struct Pending {
    msg: Message,
    done: Option<Done>,
}

/// Handle on the publishing task; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Pending>,
    unconfirmed: watch::Sender<usize>,
}

impl Outbox {
    pub fn start(link: Link) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (unconfirmed, _) = watch::channel(0);
        tokio::spawn(publish_loop(link, rx, unconfirmed.clone()));
        Self { tx, unconfirmed }
    }

    /// Publishes `msg` eventually, without waiting.
    pub fn post(&self, msg: Message) {
        self.enqueue(Pending { msg, done: None });
    }

    /// Publishes `msg` and returns once the broker confirmed it. Fails only for what another
    /// try cannot fix (an unroutable mandatory message) or when the process is closing.
    pub async fn confirmed(&self, msg: Message) -> Result<(), BrokerError> {
        let (done, rx) = oneshot::channel();
        self.enqueue(Pending {
            msg,
            done: Some(done),
        });
        rx.await.unwrap_or(Err(BrokerError::ConnectionLost))
    }

    /// Waits until every message handed in so far is confirmed, or `limit` passed.
    pub async fn flush(&self, limit: Duration) -> bool {
        let mut rx = self.unconfirmed.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn enqueue(&self, pending: Pending) {
        self.unconfirmed.send_modify(|n| *n += 1);
        if let Err(mpsc::error::SendError(p)) = self.tx.send(pending) {
            // The publishing task is gone: the process is shutting down.
            self.unconfirmed.send_modify(|n| *n -= 1);
            if let Some(done) = p.done {
                let _ = done.send(Err(BrokerError::ConnectionLost));
            }
        }
    }
}

type Confirming = Pin<Box<dyn Future<Output = (Pending, u64, lapin::Result<Confirmation>)> + Send>>;

async fn publish_loop(
    link: Link,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    unconfirmed: watch::Sender<usize>,
) {
    let mut again: VecDeque<Pending> = VecDeque::new();
    let mut confirming: FuturesOrdered<Confirming> = FuturesOrdered::new();
    loop {
        // Take the next message: one to publish again first, then new ones.
        let next = tokio::select! {
            biased;
            Some((pending, generation, result)) = confirming.next(), if !confirming.is_empty() => {
                match settle(&link, pending, generation, result) {
                    Some(retry) => again.push_back(retry),
                    None => unconfirmed.send_modify(|n| *n -= 1),
                }
                continue;
            }
            Some(p) = async { again.pop_front() }, if !again.is_empty() => p,
            p = rx.recv(), if confirming.len() < WINDOW => match p {
                Some(p) => p,
                None if confirming.is_empty() => return,
                None => continue,
            },
        };

        // Wait for a connection; while there is none, everything queues up here.
        let Some(session) = link.session().await else {
            fail(next, BrokerError::ConnectionLost);
            return;
        };
        let m = &next.msg;
        let options = BasicPublishOptions {
            mandatory: m.mandatory,
            ..Default::default()
        };
        let published = session
            .publish
            .basic_publish(
                m.exchange.as_str().into(),
                m.routing_key.as_str().into(),
                options,
                &m.body,
                m.props.clone(),
            )
            .await;
        match published {
            Ok(confirm) => {
                let generation = session.generation;
                confirming.push_back(Box::pin(async move { (next, generation, confirm.await) }));
            }
            Err(e) => {
                debug!(error = %e, "publish failed; will publish again on a new connection");
                link.report_broken(session.generation);
                again.push_front(next);
                // Give the supervisor a moment to notice before asking for a session again.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reports the outcome of one publish; returns the message when it must go out again.
fn settle(
    link: &Link,
    pending: Pending,
    generation: u64,
    result: lapin::Result<Confirmation>,
) -> Option<Pending> {
    match result {
        Ok(Confirmation::Ack(Some(_))) if pending.msg.mandatory => {
            let m = &pending.msg;
            let error = BrokerError::Unroutable {
                exchange: m.exchange.clone(),
                routing_key: m.routing_key.clone(),
            };
            warn!(error = %error, "message returned unroutable");
            fail(pending, error);
            None
        }
        Ok(Confirmation::Ack(_)) | Ok(Confirmation::NotRequested) => {
            if let Some(done) = pending.done {
                let _ = done.send(Ok(()));
            }
            None
        }
        Ok(Confirmation::Nack(_)) => {
            warn!(exchange = %pending.msg.exchange, "broker refused a message; publishing again");
            Some(pending)
        }
        Err(e) => {
            debug!(error = %e, "confirm lost with the connection; publishing again");
            link.report_broken(generation);
            Some(pending)
        }
    }
}

fn fail(pending: Pending, error: BrokerError) {
    if let Some(done) = pending.done {
        let _ = done.send(Err(error));
    }
}
