//! `hatchery cancel`: a running job is interrupted and rolled back; a queued one is dropped.
#![allow(
    clippy::unwrap_used,
    reason = "tests fail loudly on the first surprise"
)]

mod common;

use std::time::Duration;

use hatchery::events::{EventData, EventKind};

use common::fleet::{Fleet, waiting_job};
use common::wait_until;

fn cancel(fleet: &Fleet, id: &str) {
    let out = fleet.hatchery(&["cancel", id]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_running_job_is_cancelled_and_rolled_back() {
    let fleet = Fleet::new();
    let worker = fleet.worker("w1", &[]);
    let job = waiting_job(&fleet, "waits", 300);
    let id = job["id"].as_str().unwrap().to_owned();
    fleet.submit(&job);

    // Cancel while it waits for the guest's SSH server.
    let in_finish = || {
        fleet.events().iter().any(|e| {
            e.kind() == Some(EventKind::StageStarted)
                && e.subject == id
                && matches!(&e.data, EventData::Stage(s) if s.stage.as_str() == "finish")
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), in_finish),
        "{}",
        worker.log()
    );
    cancel(&fleet, &id);

    let finals = || fleet.finals().get(&id).cloned().unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(30), || !finals().is_empty()),
        "{}",
        worker.log()
    );
    let event = &finals()[0];
    assert_eq!(event.kind(), Some(EventKind::JobCancelled));
    let EventData::Result(result) = &event.data else {
        panic!("{event:?}")
    };
    assert_eq!(result.rolled_back, Some(true));
    assert!(wait_until(Duration::from_secs(10), || fleet
        .queue_len(&fleet.names.jobs_queue)
        == Some(0)));
    assert_eq!(finals().len(), 1);
}

#[test]
fn a_job_cancelled_before_any_worker_took_it_is_dropped_when_it_arrives() {
    let fleet = Fleet::new();
    let job = fleet.job("never");
    let id = job["id"].as_str().unwrap().to_owned();
    fleet.submit(&job);
    cancel(&fleet, &id);

    let worker = fleet.worker("w1", &[]);
    let finals = || fleet.finals().get(&id).cloned().unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(30), || !finals().is_empty()),
        "{}",
        worker.log()
    );
    assert_eq!(finals()[0].kind(), Some(EventKind::JobCancelled));
    assert_eq!(
        fleet.count(EventKind::JobStarted, &id),
        0,
        "the job never ran"
    );
    assert!(wait_until(Duration::from_secs(10), || fleet
        .queue_len(&fleet.names.jobs_queue)
        == Some(0)));

    // A job submitted after the cancellation of another runs as usual.
    let other = fleet.job("other");
    fleet.submit(&other);
    let other_id = other["id"].as_str().unwrap();
    assert!(wait_until(Duration::from_secs(30), || fleet
        .count(EventKind::JobSucceeded, other_id)
        == 1));
}
