//! Crash-safe jobs on real guests: the worker SIGKILLed between stages and inside them, libvirtd
//! and RabbitMQ restarted under a batch, the SSH connection cut while the script runs. Every
//! job must still end with one domain, one overlay, one outcome (however many copies of its
//! final event) and one run of its script, and nothing may be left behind.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use hatchery::events::{Event, EventData, EventKind};
use hatchery::stages::StageKind;

use common::fleet::{WorkerProcess, rabbitmqctl};
use common::fleet_vm::{VmFleet, one_at_a_time, result};
use common::wait_until;

/// Appends a line to a counter file as it starts, then takes long enough to be interrupted.
const COUNTING_SCRIPT: &str = "#!/bin/sh\necho ran >> /root/counter\nsleep 5\necho done\n";

const FINAL: Duration = Duration::from_secs(300);
const STAGE: Duration = Duration::from_secs(120);

/// The worker of the moment, and the dead ones, whose logs explain a failure.
struct Workers<'a> {
    f: &'a VmFleet,
    all: Vec<WorkerProcess>,
    extra: Vec<&'static str>,
}

impl<'a> Workers<'a> {
    /// A first worker on `f`. Copies of a job whose claim has not yet vanished with its dead
    /// worker's connection are parked; a short park delay brings them back soon.
    fn start(f: &'a VmFleet, extra: &[&'static str]) -> Self {
        let mut extra = extra.to_vec();
        extra.extend(["--park-delay", "2s"]);
        let mut w = Self {
            f,
            all: Vec::new(),
            extra,
        };
        w.spawn();
        w
    }

    fn spawn(&mut self) {
        let name = format!("w{}", self.all.len() + 1);
        self.all.push(self.f.worker(&name, &self.extra));
    }

    /// SIGKILLs the current worker and waits until it is gone.
    fn kill(&mut self) {
        let w = self.all.last_mut().unwrap();
        w.signal("KILL");
        assert!(
            w.wait_exit(Duration::from_secs(10)).is_some(),
            "still alive"
        );
    }

    fn kill_and_restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn logs(&self) -> String {
        let each = self
            .all
            .iter()
            .map(|w| format!("--- {}\n{}", w.name, w.log()));
        each.collect()
    }
}

/// A job that ended with exactly one of everything: one outcome (copies of its final event
/// share one id), one domain and one overlay in libvirt, one run of the counting script, and
/// no script directory on the guest. Returns the final event.
fn assert_finished_once(f: &VmFleet, workers: &Workers, id: &str, name: &str) -> Event {
    let last = f.wait_final(id, FINAL);
    let last = last.unwrap_or_else(|| panic!("job {name} not final\n{}", workers.logs()));
    assert_eq!(
        last.kind(),
        Some(EventKind::JobSucceeded),
        "{last:?}\n{}",
        workers.logs()
    );
    // Give a duplicate from a redelivery the time to arrive before counting.
    std::thread::sleep(Duration::from_secs(1));
    let ids: HashSet<_> = f.finals(id).iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), 1, "distinct final events of {name}: {ids:?}");

    let r = result(&last);
    let overlay_prefix = format!("{name}-");
    let overlays: Vec<_> = f
        .volumes()
        .into_iter()
        .filter(|v| v.starts_with(&overlay_prefix))
        .collect();
    assert_eq!(overlays.len(), 1, "{overlays:?}");
    assert!(r.overlay.as_ref().unwrap().ends_with(&overlays[0]), "{r:?}");
    let domains: Vec<_> = f.domains().into_iter().filter(|d| d == name).collect();
    assert_eq!(domains.len(), 1);
    assert_eq!(f.domain_state(name), "running");

    let ip = r.ip.as_deref().unwrap();
    assert_eq!(counter(f, ip), 1, "the script ran more than once");
    let left = f.ssh(ip, &format!("ls -d /var/tmp/hatchery-{id} 2>/dev/null"));
    assert_eq!(left.trim(), "", "the job's directory is still on the guest");
    last
}

/// Lines in the guest's counter file: how many times the counting script started.
fn counter(f: &VmFleet, ip: &str) -> usize {
    let out = f.ssh(ip, "cat /root/counter 2>/dev/null | wc -l");
    out.trim().parse().unwrap_or(0)
}

/// The guest's address from the DHCP server, once it has one.
fn guest_ip(f: &VmFleet, name: &str) -> Option<String> {
    let nics = f.env().virsh(&["domiflist", name]);
    let mac = nics.lines().find_map(|l| l.split_whitespace().nth(4))?;
    f.lease(mac)
}

/// Deprovisions every name through the queue, then checks that only the base is left.
fn clean_up(f: &VmFleet, names: &[&str]) {
    for name in names {
        f.deprovision(name, FINAL);
    }
    f.assert_clean();
}

#[test]
fn a_worker_killed_after_each_stage_leaves_one_guest_and_one_run_of_the_script() {
    let _turn = one_at_a_time();
    let f = VmFleet::new();
    let mut workers = Workers::start(&f, &[]);
    let name = "crash-between";
    let id = f.submit(&f.job(name, COUNTING_SCRIPT));

    // After finish, the kill lands before or after the final event's publication: the next
    // run finds the script collected and reports the outcome again, under the same event id.
    let stages = [
        StageKind::Overlay,
        StageKind::Domain,
        StageKind::Address,
        StageKind::Finish,
    ];
    for stage in stages {
        let passed = f.wait_stage(&id, EventKind::StageSucceeded, stage, 0, STAGE);
        assert!(passed, "{stage} never succeeded\n{}", workers.logs());
        workers.kill_and_restart();
    }

    let last = assert_finished_once(&f, &workers, &id, name);
    assert_eq!(result(&last).finish.as_ref().unwrap().exit_code, 0);
    // Each kill before the outcome handed the job to the next worker, which ran it again.
    let runs = f.fleet.count(EventKind::JobStarted, &id);
    assert!(runs >= 4, "{runs} runs\n{}", workers.logs());
    clean_up(&f, &[name]);
}

#[test]
fn a_worker_killed_inside_each_stage_leaves_one_guest_and_one_run_of_the_script() {
    let _turn = one_at_a_time();
    let f = VmFleet::new();
    let mut workers = Workers::start(&f, &[]);
    let name = "crash-inside";
    let id = f.submit(&f.job(name, COUNTING_SCRIPT));
    let started = |stage| f.wait_stage(&id, EventKind::StageStarted, stage, 0, STAGE);

    // Overlay: while the base's digest is checked and the volume made.
    assert!(started(StageKind::Overlay), "{}", workers.logs());
    workers.kill_and_restart();

    // Address: while the run waits for the guest's first lease, seconds after its start.
    assert!(started(StageKind::Address), "{}", workers.logs());
    workers.kill_and_restart();

    // Finish: while the script sleeps, after it counted itself.
    assert!(started(StageKind::Finish), "{}", workers.logs());
    let ip = guest_ip(&f, name).unwrap();
    let running = wait_until(STAGE, || counter(&f, &ip) > 0);
    assert!(running, "the script never started\n{}", workers.logs());
    workers.kill_and_restart();

    let last = assert_finished_once(&f, &workers, &id, name);
    let finish = result(&last).finish.clone().unwrap();
    assert!(
        finish.resumed,
        "the last run collected, not started: {finish:?}"
    );
    assert_eq!(finish.stdout_tail, "done\n");
    clean_up(&f, &[name]);
}

#[test]
fn a_worker_killed_while_the_domain_starts_is_taken_over_after_the_guest_has_its_lease() {
    let _turn = one_at_a_time();
    let f = VmFleet::new();
    let mut workers = Workers::start(&f, &[]);
    let name = "crash-starting";
    let id = f.submit(&f.job(name, COUNTING_SCRIPT));

    // The domain is defined first, then started, which takes a second or so under TCG.
    let started = f.wait_stage(&id, EventKind::StageStarted, StageKind::Domain, 0, STAGE);
    assert!(started, "{}", workers.logs());
    assert!(wait_until(STAGE, || f.domains().contains(&name.to_owned())));
    workers.kill();

    // The next run comes well after the guest's lease, as after a crashed worker host: that
    // lease is this boot's, however old it looks to the new run.
    if wait_until(Duration::from_secs(5), || f.domain_state(name) == "running") {
        assert!(wait_until(STAGE, || guest_ip(&f, name).is_some()));
        std::thread::sleep(Duration::from_secs(5));
    }
    workers.spawn();

    assert_finished_once(&f, &workers, &id, name);
    clean_up(&f, &[name]);
}

#[test]
fn a_dropped_ssh_connection_while_the_script_runs_is_resumed_not_rerun() {
    let _turn = one_at_a_time();
    let f = VmFleet::new();
    let workers = Workers::start(&f, &[]);
    let name = "ssh-drop";
    let id = f.submit(&f.job(name, COUNTING_SCRIPT));

    let started = f.wait_stage(&id, EventKind::StageStarted, StageKind::Finish, 0, FINAL);
    assert!(started, "{}", workers.logs());
    let ip = guest_ip(&f, name).unwrap();
    assert!(
        wait_until(STAGE, || counter(&f, &ip) > 0),
        "{}",
        workers.logs()
    );
    // Destroys the worker's TCP connections to the guest's sshd, inside the namespace.
    let dst = format!("dst {ip} dport = 22");
    let killed = f.env().exec("ss", &["-K", &dst]);
    assert!(killed.status.success(), "{killed:?}");

    let last = assert_finished_once(&f, &workers, &id, name);
    let finish = result(&last).finish.clone().unwrap();
    assert!(finish.resumed, "{finish:?}");
    assert_eq!(finish.stdout_tail, "done\n");
    let retried = f.stage_events(&id, EventKind::StageRetrying, StageKind::Finish);
    assert!(retried > 0, "the drop went unnoticed\n{}", workers.logs());
    clean_up(&f, &[name]);
}

#[test]
fn a_worker_killed_during_a_rollback_leaves_the_next_run_to_finish_it() {
    let _turn = one_at_a_time();
    let f = VmFleet::new();
    let mut workers = Workers::start(&f, &[]);
    let name = "crash-rollback";
    let id = f.submit(&f.job(name, "#!/bin/sh\necho failing\nexit 3\n"));

    // A failed job writes `rolling-back` into the domain, logs that it rolls back, then
    // destroys the guest, which takes a second or more under TCG: the kill lands in there.
    let rolling_back = || workers.all.last().unwrap().log().contains("rolling back");
    assert!(wait_until(FINAL, rolling_back), "{}", workers.logs());
    workers.kill();
    let namespace = hatchery::hypervisor::metadata::NAMESPACE;
    let record = f.env().virsh(&["metadata", name, namespace]);
    assert!(
        record.contains(">rolling-back<"),
        "the kill came after the rollback: {record}\n{}",
        workers.logs()
    );
    workers.spawn();

    let last = f.wait_final(&id, FINAL);
    let last = last.unwrap_or_else(|| panic!("not final\n{}", workers.logs()));
    assert_eq!(last.kind(), Some(EventKind::JobFailed), "{last:?}");
    let r = result(&last);
    let failure = r.failure.as_ref().unwrap();
    assert_eq!(
        (failure.stage, failure.class),
        (StageKind::Finish, hatchery::stages::ErrorClass::Interrupted),
        "the next run finished the rollback instead of running the job again\n{}",
        workers.logs()
    );
    assert_eq!(r.rolled_back, Some(true));
    assert_eq!(
        f.stage_events(&id, EventKind::StageStarted, StageKind::Overlay),
        1
    );
    f.assert_clean();
}

/// Submits one job per name as a batch, runs `fault` once the first guest is defined and
/// started, then checks that every job finished once and the batch completed. Returns the
/// workers' logs.
fn batch_survives(f: &VmFleet, names: &[&str], fault: impl FnOnce()) -> String {
    let workers = Workers::start(f, &["--concurrency", "3"]);
    let batch = uuid::Uuid::new_v4().to_string();
    let ids: Vec<String> = (names.iter())
        .map(|n| {
            let mut job = f.job(n, COUNTING_SCRIPT);
            job["batch"] = serde_json::json!({ "id": batch, "size": names.len() });
            f.submit(&job)
        })
        .collect();
    let domain_up = || {
        (ids.iter()).any(|id| f.stage_events(id, EventKind::StageSucceeded, StageKind::Domain) > 0)
    };
    assert!(wait_until(STAGE, domain_up), "{}", workers.logs());

    fault();

    for (id, name) in ids.iter().zip(names) {
        assert_finished_once(f, &workers, id, name);
    }
    let completed = || {
        let events = f.fleet.events();
        let mut summaries = events.iter().filter_map(|e| match &e.data {
            EventData::Batch(b) if b.batch_id == batch => Some(b.clone()),
            _ => None,
        });
        summaries.next()
    };
    assert!(
        wait_until(STAGE, || completed().is_some()),
        "{}",
        workers.logs()
    );
    let summary = completed().unwrap();
    assert_eq!(summary.succeeded as usize, names.len(), "{summary:?}");
    clean_up(f, names);
    workers.logs()
}

#[test]
fn libvirtd_restarted_under_a_batch_every_job_succeeds() {
    let _turn = one_at_a_time();
    let f = VmFleet::new();
    batch_survives(&f, &["virtd-1", "virtd-2", "virtd-3"], || {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vm/env.sh");
        let out = Command::new(script)
            .arg("restart-libvirtd")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

#[test]
fn rabbitmq_restarted_under_a_batch_every_job_succeeds() {
    let _turn = one_at_a_time();
    let f = VmFleet::new();
    let logs = batch_survives(&f, &["rabbit-1", "rabbit-2", "rabbit-3"], || {
        rabbitmqctl(&["stop_app"]);
        std::thread::sleep(Duration::from_secs(2));
        rabbitmqctl(&["start_app"]);
    });
    assert!(
        logs.contains("reconnecting"),
        "the worker never lost the broker\n{logs}"
    );
}
