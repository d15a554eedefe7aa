//! The one broker connection a process keeps: opened with backoff, watched, and opened again
//! when it dies. Everything else asks the link for the current [`Session`] and reports a
//! session it found broken.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{BrokerError, Names, redact_url, topology};

/// One live connection and the channel events and jobs are published on.
pub struct Session {
    /// Counts connections; a delivery is acknowledged only on the session it came from.
    pub generation: u64,
    pub conn: Connection,
    /// In confirm mode: every publish is answered by the broker.
    pub publish: Channel,
}

impl Session {
    /// A new channel on this connection.
    pub async fn channel(&self) -> Result<Channel, BrokerError> {
        self.conn
            .create_channel()
            .await
            .map_err(BrokerError::OpenChannel)
    }

    pub fn is_alive(&self) -> bool {
        self.conn.status().connected()
    }
}

/// Shared handle on the process's broker connection.
#[derive(Clone)]
pub struct Link {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    names: Names,
    connection_name: String,
    current: watch::Sender<Option<Arc<Session>>>,
    /// Raised by whoever finds the current session broken.
    broken: Notify,
    broken_generation: AtomicU64,
    closing: CancellationToken,
}

/// How often the supervisor looks at the connection's state besides listening for errors.
const STATUS_POLL: Duration = Duration::from_secs(1);

impl Link {
    /// Starts keeping a connection to `url`, declaring the topology on each new one.
    pub fn start(url: &str, names: Names, connection_name: &str) -> Self {
        let (current, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            url: url.to_owned(),
            names,
            connection_name: connection_name.to_owned(),
            current,
            broken: Notify::new(),
            broken_generation: AtomicU64::new(0),
            closing: CancellationToken::new(),
        });
        tokio::spawn(supervise(Arc::clone(&inner)));
        Self { inner }
    }

    pub fn names(&self) -> &Names {
        &self.inner.names
    }

    /// The live session, waiting for one while the broker is away. `None` once the link is
    /// closing.
    pub async fn session(&self) -> Option<Arc<Session>> {
        let mut rx = self.inner.current.subscribe();
        tokio::select! {
            r = rx.wait_for(|s| s.as_ref().is_some_and(|s| s.is_alive())) => {
                r.ok().and_then(|s| s.clone())
            }
            () = self.inner.closing.cancelled() => None,
        }
    }

    /// The session now, if there is a live one.
    pub fn current(&self) -> Option<Arc<Session>> {
        self.inner.current.borrow().clone().filter(|s| s.is_alive())
    }

    /// Follows session changes: each new session, and `None` while there is none.
    pub fn watch(&self) -> watch::Receiver<Option<Arc<Session>>> {
        self.inner.current.subscribe()
    }

    /// Says that session `generation` failed an operation in a way that needs a new one.
    pub fn report_broken(&self, generation: u64) {
        self.inner
            .broken_generation
            .fetch_max(generation, Ordering::SeqCst);
        self.inner.broken.notify_one();
    }

    /// Closes the connection for good.
    pub async fn close(&self) {
        self.inner.closing.cancel();
        let session = self.inner.current.send_replace(None);
        if let Some(s) = session {
            let _ = s.conn.close(200, "worker stopping".into()).await;
        }
    }
}

/// Connects, hands the session out, waits for it to die, and starts over.
async fn supervise(inner: Arc<Inner>) {
    let mut generation = 0;
    loop {
        generation += 1;
        let Some(session) = connect_with_backoff(&inner, generation).await else {
            return;
        };
        let session = Arc::new(session);
        info!(generation, "connected to the broker");
        inner.current.send_replace(Some(Arc::clone(&session)));

        watch_session(&inner, &session).await;
        inner.current.send_replace(None);
        if inner.closing.is_cancelled() {
            return;
        }
        warn!(generation, "broker connection lost; reconnecting");
        // Closing a half-dead connection can hang; do not wait for it.
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                session.conn.close(320, "reconnecting".into()),
            )
            .await;
        });
    }
}

/// Returns once the session is unusable or the link is closing.
async fn watch_session(inner: &Inner, session: &Session) {
    let mut events = session.conn.events_listener();
    let mut poll = tokio::time::interval(STATUS_POLL);
    loop {
        tokio::select! {
            event = events.next() => match event {
                // A channel's error (a refused claim, a missing marker) leaves the
                // connection up; only connection errors end the session.
                Some(lapin::Event::Error(e)) if e.is_amqp_soft_error() => {
                    debug!(error = %e, "channel error");
                }
                Some(lapin::Event::Error(e)) => {
                    warn!(error = %e, "broker connection failed");
                    return;
                }
                Some(_) => {}
                None => return,
            },
            () = inner.broken.notified() => {
                if inner.broken_generation.load(Ordering::SeqCst) >= session.generation {
                    return;
                }
            }
            _ = poll.tick() => {
                if !session.is_alive() {
                    return;
                }
            }
            () = inner.closing.cancelled() => return,
        }
    }
}

async fn connect_with_backoff(inner: &Inner, generation: u64) -> Option<Session> {
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        match open_session(&inner.url, &inner.names, &inner.connection_name, generation).await {
            Ok(session) => return Some(session),
            Err(e) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                warn!(
                    error = %crate::pipeline::chain(&e),
                    delay_ms = delay.as_millis() as u64,
                    "cannot reach the broker; retrying"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = inner.closing.cancelled() => return None,
                }
            }
        }
    }
}

async fn open_session(
    url: &str,
    names: &Names,
    connection_name: &str,
    generation: u64,
) -> Result<Session, BrokerError> {
    let conn = connect(url, connection_name).await?;
    let setup = conn
        .create_channel()
        .await
        .map_err(BrokerError::OpenChannel)?;
    topology::declare(&setup, names).await?;
    let _ = setup.close(200, "topology declared".into()).await;

    let publish = conn
        .create_channel()
        .await
        .map_err(BrokerError::OpenChannel)?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(BrokerError::ConfirmSelect)?;
    debug!(generation, "publish channel in confirm mode");
    Ok(Session {
        generation,
        conn,
        publish,
    })
}

/// One connection attempt, for short-lived commands that report failure instead of waiting.
pub async fn connect(url: &str, connection_name: &str) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(connection_name.into());
    Connection::connect(url, props)
        .await
        .map_err(|source| BrokerError::Connect {
            url: redact_url(url),
            source,
        })
}
