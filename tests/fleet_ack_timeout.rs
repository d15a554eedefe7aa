//! A job that outlives the broker's consumer ack timeout is neither lost nor run twice.
//!
//! The test lowers RabbitMQ's `consumer_timeout` to 60 s for channels opened meanwhile (the
//! setting is global), and restores the default when it ends, even on failure.
#![allow(
    clippy::unwrap_used,
    reason = "tests fail loudly on the first surprise"
)]

mod common;

use std::time::Duration;

use hatchery::events::EventKind;

use common::fleet::{Fleet, rabbitmqctl, waiting_job};
use common::wait_until;

/// Lowers the broker's consumer timeout while it lives.
struct ConsumerTimeout;

impl ConsumerTimeout {
    fn set(ms: u64) -> Self {
        rabbitmqctl(&[
            "eval",
            &format!("application:set_env(rabbit, consumer_timeout, {ms})."),
        ]);
        Self
    }
}

impl Drop for ConsumerTimeout {
    fn drop(&mut self) {
        rabbitmqctl(&[
            "eval",
            "application:set_env(rabbit, consumer_timeout, 1800000).",
        ]);
    }
}

#[test]
fn a_job_outliving_the_ack_timeout_runs_once_and_ends_once() {
    let _timeout = ConsumerTimeout::set(60_000);
    let fleet = Fleet::new();
    let flags = ["--ack-timeout", "60s", "--park-delay", "5s"];
    let w1 = fleet.worker("w1", &flags);
    // A second worker receives hand-over copies too, and must park them, not run them.
    let w2 = fleet.worker("w2", &flags);
    // 80 s of waiting for SSH: past the 60 s timeout, then a failure.
    let job = waiting_job(&fleet, "long", 80);
    let id = job["id"].as_str().unwrap().to_owned();
    fleet.submit(&job);

    let finals = || fleet.finals().get(&id).cloned().unwrap_or_default();
    let logs = || format!("w1:\n{}\nw2:\n{}", w1.log(), w2.log());
    assert!(
        wait_until(Duration::from_secs(150), || !finals().is_empty()),
        "{}",
        logs()
    );
    // Let a hand-over copy still on its way settle.
    assert!(wait_until(Duration::from_secs(30), || {
        fleet.queue_len(&fleet.names.jobs_queue) == Some(0)
            && fleet.queue_len(&fleet.names.delay_queue) == Some(0)
    }));

    let events = finals();
    assert!(
        events.iter().all(|e| e.id == events[0].id),
        "one outcome: {events:?}"
    );
    assert_eq!(
        events[0].kind(),
        Some(EventKind::JobFailed),
        "the SSH wait timed out"
    );
    assert_eq!(
        fleet.count(EventKind::JobStarted, &id),
        1,
        "one run: {}",
        logs()
    );
    assert!(logs().contains("handed over"), "{}", logs());
    assert!(
        !logs().contains("job consumer interrupted"),
        "the broker closed no channel: {}",
        logs()
    );
}
