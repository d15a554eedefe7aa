//! The worker under faults: a lost connection, a broker restart, a stop signal mid-batch.
//!
//! The broker restart disturbs every connection on the broker, so this file's tests take
//! turns (one lock), and other test files must tolerate reconnecting workers.
#![allow(
    clippy::unwrap_used,
    reason = "tests fail loudly on the first surprise"
)]

mod common;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use hatchery::events::{EventData, EventKind};

use common::fleet::{Fleet, rabbitmqctl};
use common::wait_until;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Submits `n` jobs and returns their ids.
fn submit_jobs(fleet: &Fleet, n: usize, prefix: &str) -> Vec<String> {
    (0..n)
        .map(|i| {
            let job = fleet.job(&format!("{prefix}-{i:03}"));
            fleet.submit(&job);
            job["id"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// Every job succeeded; copies of a final event are the same event, with one domain per job.
fn assert_all_succeeded_once(fleet: &Fleet, ids: &[String]) {
    let finals = fleet.finals();
    for id in ids {
        let events = finals
            .get(id)
            .unwrap_or_else(|| panic!("job {id} has no final event"));
        assert!(
            events
                .iter()
                .all(|e| e.kind() == Some(EventKind::JobSucceeded)),
            "{events:?}"
        );
        assert!(
            events.iter().all(|e| e.id == events[0].id),
            "one outcome per job: {events:?}"
        );
        let domains: Vec<_> = events
            .iter()
            .map(|e| match &e.data {
                EventData::Result(r) => r.domain_uuid,
                _ => None,
            })
            .collect();
        assert!(
            domains.iter().all(|d| d.is_some() && *d == domains[0]),
            "one domain: {domains:?}"
        );
    }
}

fn all_final(fleet: &Fleet, ids: &[String]) -> bool {
    let finals = fleet.finals();
    ids.iter().all(|id| finals.contains_key(id))
}

/// How many jobs have started, by the `job.started` events seen so far.
fn started(fleet: &Fleet) -> usize {
    let events = fleet.events();
    let mut seen: HashMap<String, ()> = HashMap::new();
    for e in events
        .iter()
        .filter(|e| e.kind() == Some(EventKind::JobStarted))
    {
        seen.insert(e.subject.clone(), ());
    }
    seen.len()
}

#[test]
fn a_connection_closed_mid_batch_loses_no_job() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let fleet = Fleet::new();
    let worker = fleet.worker("w1", &["--concurrency", "8"]);
    let ids = submit_jobs(&fleet, 120, "cc");

    assert!(wait_until(Duration::from_secs(60), || started(&fleet) >= 20));
    worker.close_connection();

    assert!(
        wait_until(Duration::from_secs(120), || all_final(&fleet, &ids)),
        "{}",
        worker.log()
    );
    assert_all_succeeded_once(&fleet, &ids);
    assert!(worker.log().contains("reconnecting"), "the worker noticed");
    assert!(wait_until(Duration::from_secs(10), || fleet
        .queue_len(&fleet.names.jobs_queue)
        == Some(0)));
}

#[test]
fn a_broker_restart_mid_batch_loses_no_job() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let fleet = Fleet::new();
    let worker = fleet.worker("w1", &["--concurrency", "8"]);
    let ids = submit_jobs(&fleet, 120, "br");

    assert!(wait_until(Duration::from_secs(60), || started(&fleet) >= 20));
    rabbitmqctl(&["stop_app"]);
    std::thread::sleep(Duration::from_secs(2));
    rabbitmqctl(&["start_app"]);

    assert!(
        wait_until(Duration::from_secs(180), || all_final(&fleet, &ids)),
        "{}",
        worker.log()
    );
    assert_all_succeeded_once(&fleet, &ids);
    assert!(wait_until(Duration::from_secs(10), || fleet
        .queue_len(&fleet.names.jobs_queue)
        == Some(0)));
}

#[test]
fn sigterm_mid_batch_hands_unfinished_jobs_to_the_next_worker() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let fleet = Fleet::new();
    // A grace period of zero hands back whatever runs at the signal.
    let mut first = fleet.worker("w1", &["--concurrency", "16", "--grace", "0s"]);
    let ids = submit_jobs(&fleet, 150, "st");

    assert!(wait_until(Duration::from_secs(60), || started(&fleet) >= 20));
    first.signal("TERM");
    let status = first
        .wait_exit(Duration::from_secs(30))
        .expect("the worker exits");
    assert!(status.success(), "{}", first.log());
    let done_by_first = fleet.finals().len();
    assert!(
        done_by_first < ids.len(),
        "the test stopped the worker mid-batch"
    );

    let second = fleet.worker("w2", &[]);
    assert!(
        wait_until(Duration::from_secs(120), || all_final(&fleet, &ids)),
        "{}",
        second.log()
    );
    assert_all_succeeded_once(&fleet, &ids);
}

#[test]
fn sigterm_lets_jobs_in_flight_finish_within_the_grace_period() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let fleet = Fleet::new();
    let mut worker = fleet.worker("w1", &["--concurrency", "4", "--grace", "60s"]);
    let ids = submit_jobs(&fleet, 40, "gr");

    assert!(wait_until(Duration::from_secs(60), || started(&fleet) >= 4));
    worker.signal("TERM");
    let status = worker
        .wait_exit(Duration::from_secs(60))
        .expect("the worker exits");
    assert!(status.success(), "{}", worker.log());

    // Whatever started, finished; nothing was handed back, the rest is still queued.
    let settled = || {
        let finals = fleet.finals();
        let events = fleet.events();
        let mut started = events
            .iter()
            .filter(|e| e.kind() == Some(EventKind::JobStarted));
        let queued = fleet.queue_len(&fleet.names.jobs_queue).unwrap_or(0) as usize;
        started.all(|e| finals.contains_key(&e.subject)) && queued + finals.len() == ids.len()
    };
    assert!(
        wait_until(Duration::from_secs(10), settled),
        "{}",
        worker.log()
    );
}
