//! Routing across the fleet: jobs naming a hypervisor reach only workers that serve it, and no
//! hypervisor runs more jobs at once than its limit, across all workers together.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::fleet::Fleet;
use common::testdriver::TestHost;
use common::wait_until;
use hatchery::events::{EventData, EventKind};
use serde_json::json;

const WORKERS: usize = 8;
const HYPERVISORS: usize = 40;
const JOBS: usize = 2000;
const LIMIT: usize = 2;

/// The most intervals that overlap at any instant.
fn max_overlap(mut intervals: Vec<(String, String)>) -> usize {
    let mut edges: Vec<(String, i32)> = Vec::new();
    for (start, end) in intervals.drain(..) {
        edges.push((start, 1));
        edges.push((end, -1));
    }
    // RFC 3339 times of one clock sort as strings; an end sorts before a start at the same time.
    edges.sort();
    let (mut now, mut most) = (0, 0);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    most as usize
}

#[test]
fn eight_workers_forty_hypervisors_two_thousand_jobs_within_limits() {
    let fleet = Fleet::new();
    let hosts: Vec<TestHost> = (0..HYPERVISORS).map(|_| TestHost::small()).collect();
    let mut config = String::new();
    for (i, host) in hosts.iter().enumerate() {
        config.push_str(&format!(
            "[hypervisors.hv{i:02}]\nuri = \"{}\"\nconcurrency = {LIMIT}\n",
            host.uri
        ));
    }
    let config_path = fleet.dir.path().join("hatchery.toml");
    std::fs::write(&config_path, config).unwrap();
    let path = config_path.to_str().unwrap();
    let workers: Vec<_> = (0..WORKERS)
        .map(|i| fleet.worker(&format!("w{i}"), &["--config", path, "--concurrency", "8"]))
        .collect();

    let mut jobs = Vec::new();
    for i in 0..JOBS {
        let mut job = fleet.job(&format!("r{i}"));
        job["hypervisor"] = json!(format!("hv{:02}", i % HYPERVISORS));
        jobs.push(job);
    }
    // One that names a hypervisor no worker serves is rejected with a reason.
    let mut stray = fleet.job("stray");
    stray["hypervisor"] = json!("hv-nowhere");
    for job in jobs.iter().chain([&stray]) {
        fleet.submit(job);
    }

    let all_final = || fleet.finals().len() == JOBS + 1;
    assert!(
        wait_until(Duration::from_secs(300), all_final),
        "only {} final",
        fleet.finals().len()
    );

    let events = fleet.events();
    let mut starts: HashMap<String, (String, String)> = HashMap::new();
    let mut intervals: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for e in &events {
        if let (Some(EventKind::JobStarted), EventData::Started(s)) = (e.kind(), &e.data) {
            starts.insert(e.subject.clone(), (s.hypervisor.clone(), e.time.clone()));
        }
    }
    // One outcome per job: a repeat of a final event (after a redelivery) carries the same id.
    for (subject, copies) in fleet.finals() {
        let ids: std::collections::HashSet<_> = copies.iter().map(|e| e.id).collect();
        assert_eq!(
            ids.len(),
            1,
            "job {subject} has {} different final events",
            ids.len()
        );
    }
    let mut succeeded = std::collections::HashSet::new();
    for e in &events {
        match e.kind() {
            // The first copy of the outcome ends the run; repeats are the same event again.
            Some(EventKind::JobSucceeded) if succeeded.insert(e.subject.clone()) => {
                let (hv, start) = starts[&e.subject].clone();
                intervals
                    .entry(hv)
                    .or_default()
                    .push((start, e.time.clone()));
            }
            Some(EventKind::JobSucceeded) => {}
            Some(EventKind::JobRejected) => {
                assert_eq!(e.subject, stray["id"].as_str().unwrap());
                let EventData::Rejected(r) = &e.data else {
                    panic!("rejection without reason")
                };
                assert_eq!(r.reason, "unknown_hypervisor");
            }
            Some(kind) if kind.is_final() => panic!("unexpected outcome {kind:?}: {:?}", e.data),
            _ => {}
        }
    }
    assert_eq!(succeeded.len(), JOBS, "every job completed");
    assert_eq!(intervals.len(), HYPERVISORS);
    let mut peaks = Vec::new();
    for (hv, runs) in intervals {
        let peak = max_overlap(runs);
        assert!(
            peak <= LIMIT,
            "{hv} ran {peak} jobs at once, above its limit of {LIMIT}"
        );
        peaks.push(peak);
    }
    // The limit was reached, so the check above had something to hold back.
    assert!(
        peaks.contains(&LIMIT),
        "no hypervisor ever ran {LIMIT} jobs at once: {peaks:?}"
    );
    eprintln!("peak concurrency per hypervisor: {peaks:?}");
    drop(workers);
}
