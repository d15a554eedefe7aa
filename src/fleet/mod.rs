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
//! Only [`worker`] acknowledges deliveries of jobs; stage code never touches AMQP.

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

/// The broker URL when neither flag nor environment gives one.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

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
