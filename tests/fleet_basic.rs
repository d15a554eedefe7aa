//! The worker on a real broker: many jobs, malformed messages, duplicates, batches.
#![allow(
    clippy::unwrap_used,
    reason = "tests fail loudly on the first surprise"
)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use hatchery::events::{EventData, EventKind};

use common::fleet::Fleet;
use common::wait_until;

#[test]
fn two_hundred_jobs_through_one_worker_each_end_in_one_final_event() {
    let fleet = Fleet::new();
    let _worker = fleet.worker("w1", &["--concurrency", "32"]);
    let ids: Vec<String> = (0..200)
        .map(|i| {
            let job = fleet.job(&format!("vm-{i:03}"));
            fleet.submit(&job);
            job["id"].as_str().unwrap().to_owned()
        })
        .collect();

    assert!(wait_until(Duration::from_secs(120), || fleet
        .finals()
        .len()
        == 200));
    // Give a stray duplicate the chance to show up before counting.
    assert!(wait_until(Duration::from_secs(5), || fleet
        .queue_len(&fleet.names.jobs_queue)
        == Some(0)));
    let finals = fleet.finals();
    for id in &ids {
        let events = &finals[id];
        assert_eq!(events.len(), 1, "job {id}: {events:?}");
        assert_eq!(
            events[0].kind(),
            Some(EventKind::JobSucceeded),
            "{events:?}"
        );
    }
}

#[test]
fn malformed_messages_are_rejected_and_dead_lettered_and_the_worker_carries_on() {
    let fleet = Fleet::new();
    let mut worker = fleet.worker("w1", &[]);
    let mut invalid = fleet.job("bad");
    invalid["provision"]["vm"]["vcpus"] = serde_json::json!(0);
    let huge = vec![b' '; 300 * 1024];
    fleet.publish(b"this is not json");
    fleet.submit(&invalid);
    fleet.publish(&huge);
    let good = fleet.job("good");
    fleet.submit(&good);

    let rejected = || {
        fleet
            .events()
            .into_iter()
            .filter(|e| e.kind() == Some(EventKind::JobRejected))
            .collect::<Vec<_>>()
    };
    assert!(wait_until(Duration::from_secs(30), || rejected().len() == 3));
    let reasons: HashSet<String> = rejected()
        .iter()
        .map(|e| match &e.data {
            EventData::Rejected(r) => r.reason.clone(),
            other => panic!("rejected event with {other:?}"),
        })
        .collect();
    assert_eq!(
        reasons,
        HashSet::from(["not_json", "invalid", "too_large"].map(String::from))
    );
    let invalid_event = rejected()
        .into_iter()
        .find(|e| e.subject == invalid["id"].as_str().unwrap())
        .unwrap();
    let EventData::Rejected(r) = &invalid_event.data else {
        unreachable!()
    };
    assert!(
        !r.problems.is_empty(),
        "the invalid job's problems are listed"
    );

    assert!(wait_until(Duration::from_secs(10), || fleet
        .queue_len(&fleet.names.dead_queue)
        == Some(3)));
    let mut dead: Vec<String> = fleet
        .drain_dead()
        .into_iter()
        .map(|(_, reason)| reason)
        .collect();
    dead.sort();
    assert_eq!(dead, ["invalid", "not_json", "too_large"]);

    let good_id = good["id"].as_str().unwrap();
    assert!(wait_until(Duration::from_secs(30), || fleet
        .count(EventKind::JobSucceeded, good_id)
        == 1));
    assert!(
        worker.child.try_wait().unwrap().is_none(),
        "the worker lives"
    );
}

#[test]
fn a_job_delivered_twice_makes_one_domain_and_one_outcome() {
    let fleet = Fleet::new();
    let job = fleet.job("twice");
    let id = job["id"].as_str().unwrap().to_owned();
    // Two copies at once: the second waits for the first one's run.
    fleet.submit(&job);
    fleet.submit(&job);
    let _worker = fleet.worker("w1", &[]);
    let finals = || fleet.finals().get(&id).map_or(0, Vec::len);
    assert!(wait_until(Duration::from_secs(30), || finals() >= 1));
    assert!(wait_until(Duration::from_secs(10), || fleet
        .queue_len(&fleet.names.jobs_queue)
        == Some(0)));

    // A third copy after the outcome: the same final event again, not a second run.
    let before = finals();
    fleet.submit(&job);
    assert!(wait_until(Duration::from_secs(30), || finals() == before + 1));
    let events = &fleet.finals()[&id];
    assert!(
        events.iter().all(|e| e.id == events[0].id),
        "one outcome: {events:?}"
    );
    assert_eq!(events[0].kind(), Some(EventKind::JobSucceeded));
    assert_eq!(
        fleet.count(EventKind::JobStarted, &id),
        1,
        "the job ran once"
    );
    assert!(wait_until(Duration::from_secs(10), || fleet
        .queue_len(&fleet.names.jobs_queue)
        == Some(0)));
}

#[test]
fn submit_wait_follows_a_batch_to_its_single_completion_event() {
    let fleet = Fleet::new();
    let _w1 = fleet.worker("w1", &[]);
    let _w2 = fleet.worker("w2", &[]);
    let mut files = Vec::new();
    for i in 0..6 {
        let path = fleet.dir.path().join(format!("job{i}.json"));
        std::fs::write(
            &path,
            serde_json::to_vec(&fleet.job(&format!("b-{i}"))).unwrap(),
        )
        .unwrap();
        files.push(path.display().to_string());
    }
    let mut args = vec![
        "submit",
        "--batch-id",
        "batch-one",
        "--wait",
        "--timeout",
        "60s",
    ];
    args.extend(files.iter().map(String::as_str));
    let out = fleet.hatchery(&args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "submit failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("batch batch-one: 6 succeeded, 0 failed, 0 cancelled, 0 rejected"),
        "{stdout}"
    );

    let completions = || {
        let events = fleet.events();
        events
            .into_iter()
            .filter(|e| e.kind() == Some(EventKind::BatchCompleted))
            .collect::<Vec<_>>()
    };
    assert!(wait_until(Duration::from_secs(10), || completions().len() == 1));
    let EventData::Batch(summary) = &completions()[0].data else {
        panic!("batch event without summary")
    };
    assert_eq!((summary.size, summary.succeeded), (6, 6));
}

#[test]
fn a_failing_batch_makes_submit_wait_exit_non_zero() {
    let fleet = Fleet::new();
    let _worker = fleet.worker("w1", &[]);
    let mut bad = fleet.job("nobase");
    bad["provision"]["vm"]["base"]["volume"] = serde_json::json!("missing.qcow2");
    let good = fleet.job("fine");
    let stdin = format!("{}\n{}\n", bad, good);
    let mut child = fleet
        .hatchery(&["submit", "--batch", "--wait", "--timeout", "60s", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(": 1 succeeded, 1 failed, 0 cancelled, 0 rejected"),
        "{stdout}"
    );
}
