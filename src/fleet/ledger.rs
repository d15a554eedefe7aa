//! What this worker runs and has recently finished, by job id. A second copy of a job (a
//! redelivery after a lost connection, a hand-over copy, a duplicate submit) meets its first
//! here and is settled with the first one's outcome instead of running again.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use lapin::Acker;
use lapin::BasicProperties;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::events::Event;

/// How many finished jobs the worker remembers for late copies; older ones fall back to the
/// fleet-wide done markers and to libvirt.
const FINISHED_KEPT: usize = 10_000;

/// One delivery of a job that this worker has not settled yet.
pub struct Held {
    pub acker: Acker,
    /// The session it came on; only that session can acknowledge it.
    pub generation: u64,
    pub received: Instant,
}

/// A job this worker is running, and every delivery of it waiting for the outcome.
pub struct Run {
    pub cancel: CancellationToken,
    /// The first delivery's properties and body, to publish a hand-over copy from.
    pub props: BasicProperties,
    pub body: Arc<Vec<u8>>,
    pub attempt: u32,
    deliveries: Mutex<Vec<Held>>,
    /// Raised when a delivery is attached, so the run re-reads its hand-over deadline.
    pub attached: Notify,
    /// The final event, once the broker confirmed it: from then on the job is done, whatever
    /// happens to its deliveries.
    outcome: Mutex<Option<Event>>,
    /// Whether this worker holds the job's fleet-wide claim.
    pub claimed: AtomicBool,
}

impl Run {
    pub fn attach(&self, held: Held) {
        lock(&self.deliveries).push(held);
        self.attached.notify_one();
    }

    pub fn set_outcome(&self, event: Event) {
        *lock(&self.outcome) = Some(event);
    }

    pub fn outcome(&self) -> Option<Event> {
        lock(&self.outcome).clone()
    }

    pub fn take_deliveries(&self) -> Vec<Held> {
        std::mem::take(&mut *lock(&self.deliveries))
    }

    pub fn put_back(&self, mut held: Vec<Held>) {
        lock(&self.deliveries).append(&mut held);
    }

    /// When the oldest delivery still open must be settled, at the latest.
    pub fn oldest_open(&self) -> Option<Instant> {
        lock(&self.deliveries)
            .iter()
            .filter(|d| d.acker.usable())
            .map(|d| d.received)
            .min()
    }
}

/// A job's outcome as this worker published it.
#[derive(Clone)]
pub struct Finished {
    pub event: Event,
    pub batch_size: Option<u32>,
}

#[allow(
    clippy::large_enum_variant,
    reason = "one per job, a few thousand at most"
)]
pub enum Entry {
    Running(Arc<Run>),
    Finished(Finished),
}

/// What [`Ledger::begin`] found.
#[allow(
    clippy::large_enum_variant,
    reason = "one per job, a few thousand at most"
)]
pub enum Begin {
    /// Nothing known: the caller now runs the job.
    New(Arc<Run>),
    Running(Arc<Run>),
    Finished(Finished),
}

#[derive(Default)]
pub struct Ledger {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    entries: HashMap<Uuid, Entry>,
    finished: VecDeque<Uuid>,
}

impl Ledger {
    /// Registers a run of `id` unless one is known; atomically, so two copies arriving together
    /// cannot both start it.
    pub fn begin(
        &self,
        id: Uuid,
        held: Held,
        props: BasicProperties,
        body: Arc<Vec<u8>>,
        attempt: u32,
    ) -> Begin {
        let mut state = lock(&self.state);
        match state.entries.get(&id) {
            Some(Entry::Running(run)) => {
                run.attach(held);
                return Begin::Running(Arc::clone(run));
            }
            Some(Entry::Finished(f)) => {
                // The caller settles this delivery itself.
                drop(held);
                return Begin::Finished(f.clone());
            }
            None => {}
        }
        let run = Arc::new(Run {
            cancel: CancellationToken::new(),
            props,
            body,
            attempt,
            deliveries: Mutex::new(vec![held]),
            attached: Notify::new(),
            outcome: Mutex::new(None),
            claimed: AtomicBool::new(false),
        });
        state.entries.insert(id, Entry::Running(Arc::clone(&run)));
        Begin::New(run)
    }

    /// Records the outcome and returns the deliveries to settle with it.
    pub fn finish(&self, id: Uuid, finished: Finished) -> Vec<Held> {
        let mut state = lock(&self.state);
        let held = match state.entries.insert(id, Entry::Finished(finished)) {
            Some(Entry::Running(run)) => run.take_deliveries(),
            _ => Vec::new(),
        };
        state.finished.push_back(id);
        while state.finished.len() > FINISHED_KEPT {
            if let Some(old) = state.finished.pop_front()
                && matches!(state.entries.get(&old), Some(Entry::Finished(_)))
            {
                state.entries.remove(&old);
            }
        }
        held
    }

    /// Forgets a run that did not start (its claim is held elsewhere); returns its deliveries.
    pub fn abandon(&self, id: Uuid) -> Vec<Held> {
        let mut state = lock(&self.state);
        match state.entries.remove(&id) {
            Some(Entry::Running(run)) => run.take_deliveries(),
            Some(finished) => {
                state.entries.insert(id, finished);
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    /// Interrupts the run of `id`, if this worker has one. Returns whether it had.
    pub fn cancel(&self, id: Uuid) -> bool {
        match lock(&self.state).entries.get(&id) {
            Some(Entry::Running(run)) => {
                run.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    /// The jobs running now.
    pub fn running(&self) -> Vec<(Uuid, Arc<Run>)> {
        let state = lock(&self.state);
        let runs = state.entries.iter().filter_map(|(id, e)| match e {
            Entry::Running(run) => Some((*id, Arc::clone(run))),
            Entry::Finished(_) => None,
        });
        runs.collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; it is still consistent enough
    // to settle deliveries with.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
