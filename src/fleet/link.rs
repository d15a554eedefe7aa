//! The one broker connection a process keeps: opened with backoff, watched, and opened again
//! when it dies. Everything else asks the link for the current [`Session`] and reports a
//! session it found broken. [`Endpoint`] is where the broker is and which CA vouches for it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use lapin::options::ConfirmSelectOptions;
use lapin::tcp::OwnedTLSConfig;
use lapin::{Channel, Connection, ConnectionProperties, DefaultConnectionBuilder};
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
    endpoint: Endpoint,
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
    /// Starts keeping a connection to `endpoint`, declaring the topology on each new one.
    pub fn start(endpoint: Endpoint, names: Names, connection_name: &str) -> Self {
        let (current, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            endpoint,
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
        let name = &inner.connection_name;
        match open_session(&inner.endpoint, &inner.names, name, generation).await {
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
    endpoint: &Endpoint,
    names: &Names,
    connection_name: &str,
    generation: u64,
) -> Result<Session, BrokerError> {
    let conn = endpoint.connect(connection_name).await?;
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

/// Where the broker is, and the certificate authority that vouches for an `amqps://` broker
/// when no CA in the system's store does.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: String,
    /// PEM file of CA certificates trusted besides the system's; unused for `amqp://`.
    pub tls_ca: Option<PathBuf>,
}

impl Endpoint {
    pub fn new(url: &str, tls_ca: Option<PathBuf>) -> Self {
        Self {
            url: url.to_owned(),
            tls_ca,
        }
    }

    /// One connection attempt, for short-lived commands that report failure instead of
    /// waiting. The CA file is read on every attempt, so a replaced one takes effect on the
    /// next reconnection.
    pub async fn connect(&self, connection_name: &str) -> Result<Connection, BrokerError> {
        let tls = match &self.tls_ca {
            Some(path) => trusting(path).await?,
            None => OwnedTLSConfig::default(),
        };
        let props = ConnectionProperties::default().with_connection_name(connection_name.into());
        let failed = |source| {
            let url = redact_url(&self.url);
            if is_certificate_rejected(&source) {
                BrokerError::UntrustedCertificate { url, source }
            } else {
                BrokerError::Connect { url, source }
            }
        };
        DefaultConnectionBuilder::new()
            .map_err(failed)?
            .with_uri_str(with_frame_max(&self.url))
            .with_properties(props)
            .with_tls_config(tls)
            .connect()
            .await
            .map_err(failed)
    }
}

/// The largest AMQP frame hatchery asks the broker for, unless the URL names its own.
///
/// lapin keeps a send and a receive buffer of 32 frames per connection, so RabbitMQ's default
/// of 128 KiB frames keeps 8 MiB resident in every process; 16 KiB frames keep 1 MiB. Jobs
/// and events are a few KiB: only larger messages are split into more frames.
const FRAME_MAX: u32 = 16 * 1024;

fn with_frame_max(url: &str) -> String {
    if url.contains("frame_max=") {
        return url.to_owned();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}frame_max={FRAME_MAX}")
}

/// Whether the TLS handshake failed because the broker's certificate did not verify. The TLS
/// layer under lapin keeps only OpenSSL's text, whose reason string is stable across releases.
fn is_certificate_rejected(error: &lapin::Error) -> bool {
    let mut cause: Option<&dyn std::error::Error> = Some(error);
    while let Some(e) = cause {
        if e.to_string().contains("certificate verify failed") {
            return true;
        }
        cause = e.source();
    }
    false
}

/// A TLS configuration that adds the certificates in `path` to the trusted roots. Server
/// certificates are still verified, host name included.
async fn trusting(path: &Path) -> Result<OwnedTLSConfig, BrokerError> {
    let pem = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| BrokerError::ReadTlsCa {
            path: path.to_owned(),
            source,
        })?;
    // openssl would take a file without certificates as an empty list, and the handshake
    // would then fail with a verification error that hides the real mistake.
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(BrokerError::TlsCaNotPem {
            path: path.to_owned(),
        });
    }
    Ok(OwnedTLSConfig {
        identity: None,
        cert_chain: Some(pem),
    })
}

/// One connection attempt to `url`, trusting the system's certificate authorities only.
pub async fn connect(url: &str, connection_name: &str) -> Result<Connection, BrokerError> {
    Endpoint::new(url, None).connect(connection_name).await
}

#[cfg(test)]
mod tests {
    use super::with_frame_max;

    #[test]
    fn small_frames_are_asked_for_unless_the_url_names_a_size() {
        let plain = "amqp://guest:guest@127.0.0.1:5672/%2f";
        assert_eq!(with_frame_max(plain), format!("{plain}?frame_max=16384"));
        let query = "amqps://mq.example.com/prod?heartbeat=10";
        assert_eq!(with_frame_max(query), format!("{query}&frame_max=16384"));
        let own = "amqp://mq/%2f?frame_max=131072";
        assert_eq!(with_frame_max(own), own);
    }
}
