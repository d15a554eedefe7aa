//! Access to libvirt hypervisors: one shared connection per URI, and blocking calls kept off the
//! async runtime's worker threads.

mod error;
pub mod inspect;
pub mod leases;
pub mod metadata;
pub mod xml;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Once};

use tracing::debug;
use virt::connect::Connect;

pub use error::{LibvirtError, Op};

/// Whether `uri` names libvirt's test driver, by any transport: `test:///default`,
/// `test+unix:///default?socket=...`, `test+ssh://host/default`.
pub fn is_test_driver(uri: &str) -> bool {
    let scheme = uri.split_once(':').map_or(uri, |(scheme, _)| scheme);
    scheme == "test" || scheme.starts_with("test+")
}

/// One libvirt hypervisor, reached through one connection that every job on it shares.
///
/// The connection is opened on first use and opened again after libvirt reports it dead, so a
/// restarted libvirtd costs the jobs in flight one transient error each, not the worker.
#[derive(Debug)]
pub struct Hypervisor {
    uri: String,
    conn: Mutex<Option<Connect>>,
    /// One lock per storage pool: libvirt refuses a second volume job on a pool that is busy.
    pool_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// One lock per domain whose metadata a task of this worker is reading and rewriting.
    metadata_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Hypervisor {
    pub fn new(uri: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            conn: Mutex::new(None),
            pool_locks: Mutex::default(),
            metadata_locks: Mutex::default(),
        }
    }

    /// The lock that serialises volume creation in `pool` among this worker's jobs.
    pub fn pool_lock(&self, pool: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .pool_locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(locks.entry(pool.to_owned()).or_default())
    }

    /// The lock that serialises read-modify-write updates of `domain`'s metadata among this
    /// worker's tasks (a job's stages and its heartbeat), so none undoes another's change.
    pub async fn metadata_lock(&self, domain: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self
                .metadata_locks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // Domain names come and go with jobs: forget the locks nobody holds or waits for.
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
            Arc::clone(locks.entry(domain.to_owned()).or_default())
        };
        lock.lock_owned().await
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Whether this is libvirt's test driver, whose guests and their addresses are made up.
    pub fn is_test_driver(&self) -> bool {
        is_test_driver(&self.uri)
    }

    /// Runs `f` against the connection on tokio's blocking pool. `op` names the call in the
    /// error when it fails.
    pub async fn call<T, F>(self: &Arc<Self>, op: Op, f: F) -> Result<T, LibvirtError>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T, virt::error::Error> + Send + 'static,
    {
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.call_blocking(op, f))
            .await
            .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()))
    }

    /// The blocking form of [`Hypervisor::call`], for code that already runs on a blocking thread.
    pub fn call_blocking<T>(
        &self,
        op: Op,
        f: impl FnOnce(&Connect) -> Result<T, virt::error::Error>,
    ) -> Result<T, LibvirtError> {
        let conn = self.connection()?;
        let result = f(&conn);
        if result.is_err() && !conn.is_alive().unwrap_or(false) {
            // Forget the dead connection; the next call opens a fresh one.
            debug!(uri = %self.uri, "libvirt connection lost");
            self.forget();
        }
        result.map_err(|e| LibvirtError::new(op, e))
    }

    fn connection(&self) -> Result<Connect, LibvirtError> {
        silence_libvirt_stderr();
        let mut slot = self
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let conn = Connect::open(Some(&self.uri)).map_err(|e| {
            LibvirtError::new(
                Op::Connect {
                    uri: self.uri.clone(),
                },
                e,
            )
        })?;
        // Keepalive lets libvirt notice a dead daemon within seconds instead of hanging.
        let _ = conn.set_keep_alive(5, 3);
        debug!(uri = %self.uri, "libvirt connection opened");
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Drops the cached connection. Should another thread have replaced it already, the cost is
    /// one extra reconnect, never a wrong answer.
    fn forget(&self) {
        *self
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    }
}

/// libvirt prints every error to stderr unless told otherwise; hatchery reports them itself.
fn silence_libvirt_stderr() {
    static ONCE: Once = Once::new();
    ONCE.call_once(virt::error::clear_error_callback);
}

/// The hypervisors a worker talks to, by URI, each with its shared connection.
#[derive(Debug, Default)]
pub struct Hypervisors {
    by_uri: Mutex<HashMap<String, Arc<Hypervisor>>>,
}

impl Hypervisors {
    pub fn get(&self, uri: &str) -> Arc<Hypervisor> {
        let mut map = self
            .by_uri
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(
            map.entry(uri.to_owned())
                .or_insert_with(|| Arc::new(Hypervisor::new(uri))),
        )
    }
}
