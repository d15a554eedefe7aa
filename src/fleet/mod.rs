//! The broker fleet: workers that take jobs from RabbitMQ and publish what happens to them.
//!
//! # Layout
//!
//! - [`names`]: every exchange and queue name, derived from one prefix.
//! - [`topology`]: declares them, idempotently, with their arguments.
//! - [`link`]: the one connection a process keeps, reopened with backoff when it dies.
//! - [`outbox`]: publishes with confirms, and holds messages until the broker has them.
//! - [`worker`]: the consumer: deliveries in, pipeline runs, acknowledgements out.
//! - [`ledger`]: what this worker runs or has finished, so a copy of a job never runs twice.
//! - [`claim`]: fleet-wide per-job locks and done markers, for jobs that outlive the ack timeout.
//! - [`control`]: the cancellation log every worker reads.
//! - [`batch`]: counts final events fleet-wide and announces finished batches.
//! - [`message`]: how jobs and events look on the wire (headers, properties).
//!
//! Only [`worker`] (through its intake) acknowledges deliveries of jobs; stage code never
//! touches AMQP.
//!
//! # Delivery guarantees
//!
//! At least once, with one outcome per job id:
//!
//! - A delivery is acknowledged only after the job's final event was confirmed by the broker.
//! - A second copy of a job this worker runs waits for the run and is acknowledged with it; a
//!   copy of a job it finished gets the same final event (same id) again. The [`ledger`] keeps
//!   both, in memory.
//! - A lost connection kills the deliveries it carried (the broker requeues them). Runs go
//!   on; the [`outbox`] publishes their events once a new connection is up, and the requeued
//!   copies meet the ledger. On a stop signal, runs get a grace period; then the unfinished
//!   ones are dropped where they are (no rollback) and their deliveries returned to the queue.
//!   A run whose final event the broker already has is never returned.
//! - Runs that outlive the broker's consumer ack timeout hand their job over: at 80% of it
//!   the worker claims the job ([`claim`]), publishes a copy marked as a continuation,
//!   acknowledges the old delivery, and keeps running. A copy reaching another worker finds
//!   the claim held and is parked in the delay queue; a copy reaching this worker waits for
//!   the run. The run leaves a done marker with its final event, so a copy arriving later
//!   repeats the outcome instead of running the job again. A worker that dies releases its
//!   claims with its connection, and the next copy resumes the job from what libvirt shows.
//!
//! FIXME: two workers can run one job at once in two cases: a first delivery and a duplicate
//! publish of the same job, taken by two workers at the same moment (first deliveries skip
//! the claim, to keep the common path cheap), and a redelivery taken by a second worker
//! while the first one's connection is down. The stages adopt what the job id owns, so both
//! runs converge on one domain and publish the same final event id, but both do the work.

pub mod batch;
pub mod claim;
pub mod control;
mod error;
mod intake;
pub mod ledger;
pub mod link;
pub mod message;
pub mod names;
pub mod outbox;
pub mod topology;
pub mod worker;

pub use error::BrokerError;
pub use link::Link;
pub use names::Names;
pub use outbox::Outbox;

/// The broker URL when neither flag, environment nor configuration gives one.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The prefix of every exchange and queue name unless one is given.
pub const DEFAULT_PREFIX: &str = "hatchery";

/// The URL without its password, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_never_reach_the_logs() {
        let url = "amqps://svc:s3cret@broker:5671/%2f";
        assert_eq!(redact_url(url), "amqps://svc:***@broker:5671/%2f");
        assert_eq!(redact_url("amqp://broker"), "amqp://broker");
    }
}
