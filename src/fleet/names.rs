//! The names of every exchange and queue the fleet uses, derived from one prefix.

use uuid::Uuid;

/// Exchange and queue names. Everything derives from a prefix, so two fleets (or two tests)
/// sharing a broker never see each other's messages; the main names can be overridden one by one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// Direct exchange jobs are published to, with routing key [`JOB_ROUTING_KEY`].
    pub jobs_exchange: String,
    /// Durable quorum queue the workers consume.
    pub jobs_queue: String,
    /// Fanout exchange for messages that are not jobs hatchery will run.
    pub dead_exchange: String,
    pub dead_queue: String,
    /// Topic exchange for CloudEvents, routed by `EventKind::routing_key`.
    pub events_exchange: String,
    /// Where a job whose claim another worker holds waits before it returns to the jobs queue.
    pub delay_exchange: String,
    pub delay_queue: String,
    /// Final events of batch jobs, counted by one elected worker.
    pub batches_queue: String,
    /// Stream of cancellation requests that every worker reads from its start.
    pub cancellations: String,
    /// What every name above starts with, unless set one by one.
    pub prefix: String,
}

/// The routing key jobs travel with on the jobs exchange.
pub const JOB_ROUTING_KEY: &str = "job";

/// The routing key of jobs for configured hypervisor `name`.
pub fn hypervisor_key(name: &str) -> String {
    format!("hv.{name}")
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        let n = |suffix: &str| format!("{prefix}.{suffix}");
        Self {
            jobs_exchange: n("jobs"),
            jobs_queue: n("jobs"),
            dead_exchange: n("dead"),
            dead_queue: n("dead"),
            events_exchange: n("events"),
            delay_exchange: n("delay"),
            delay_queue: n("delay"),
            batches_queue: n("batches"),
            cancellations: n("cancellations"),
            prefix: prefix.to_owned(),
        }
    }

    /// The exclusive queue whose existence says that a live worker runs `job`.
    pub fn claim(&self, job: Uuid) -> String {
        format!("{}.claim.{job}", self.prefix)
    }

    /// The queue of the jobs for configured hypervisor `name`, whose one active consumer takes
    /// at most the hypervisor's limit at a time.
    pub fn hypervisor_queue(&self, name: &str) -> String {
        format!("{}.jobs.{name}", self.prefix)
    }

    /// The durable queue holding the final event of `job`, left for late copies of it.
    pub fn done(&self, job: Uuid) -> String {
        format!("{}.done.{job}", self.prefix)
    }
}

impl Default for Names {
    fn default() -> Self {
        Self::new(super::DEFAULT_PREFIX)
    }
}
