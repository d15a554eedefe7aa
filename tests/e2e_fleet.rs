//! Real VMs through RabbitMQ: jobs published in the root namespace, taken by `hatchery worker`
//! inside the real-VM namespace, followed through their events, and checked with virsh and ssh.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use hatchery::events::{EventData, EventKind};

use common::fleet_vm::{VmFleet, one_at_a_time, result, sha256_of};

/// Long enough for a few TCG guests booting at once on a busy two-core machine.
const FINAL: Duration = Duration::from_secs(300);

#[test]
fn a_job_from_the_queue_boots_a_guest_finishes_it_and_deprovisioning_removes_it() {
    let _turn = one_at_a_time();
    let f = VmFleet::new();
    let env = f.env();
    assert_eq!(sha256_of(env.get("BASE_PATH")), env.get("BASE_SHA256"));
    let worker = f.worker("w1", &[]);
    let name = "fleet-one";
    let script = "#!/bin/sh\necho finished > /root/finished\nuname -r\necho to-stderr >&2\n";
    let job = f.job(name, script);
    let id = job["id"].as_str().unwrap().to_owned();

    let out = f.submit_and_wait(std::slice::from_ref(&job), &[]);

    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", worker.log());
    assert!(stdout.contains(&format!("{id} job.succeeded")), "{stdout}");
    let last = f.wait_final(&id, FINAL).unwrap();
    assert_eq!(last.kind(), Some(EventKind::JobSucceeded), "{last:?}");
    let r = result(&last);
    let ip = r.ip.as_deref().unwrap();
    assert!(ip.starts_with("10.77."), "{ip}");
    let finish = r.finish.as_ref().unwrap();
    assert_eq!(finish.exit_code, 0);
    assert!(
        finish.stdout_tail.contains(env.get("KERNEL_VERSION")),
        "{finish:?}"
    );
    assert_eq!(finish.stderr_tail, "to-stderr\n");
    assert!(!finish.resumed, "nothing to resume on a first run");
    let fingerprint = r.host_key_fingerprint.as_deref().unwrap();
    assert!(
        known_host_fingerprints(env.get("SSH_KNOWN_HOSTS")).contains(&fingerprint.to_owned()),
        "{fingerprint} is none of the guest's host keys"
    );
    let stages: Vec<_> = r.stages.iter().map(|s| s.stage.as_str()).collect();
    assert_eq!(stages, ["overlay", "domain", "address", "finish"]);

    // Independently of hatchery: libvirt runs the domain from the job's overlay, the overlay is
    // backed by the untouched base, and the DHCP server leased the reported address to the MAC.
    let mac = &r.macs[0];
    assert_eq!(f.domain_state(name), "running");
    assert!(env.virsh(&["domiflist", name]).contains(mac.as_str()));
    let overlay = r.overlay.as_deref().unwrap();
    let disks = env.virsh(&["domblklist", name, "--details"]);
    assert!(disks.contains(overlay), "{disks}");
    let vol = env.virsh(&["vol-dumpxml", overlay]);
    let backing = format!("<path>{}</path>", env.get("BASE_PATH"));
    assert!(
        vol.contains("<backingStore>") && vol.contains(&backing),
        "{vol}"
    );
    assert_eq!(sha256_of(env.get("BASE_PATH")), env.get("BASE_SHA256"));
    assert_eq!(f.lease(mac).as_deref(), Some(ip));

    // The script ran; neither it nor its output is left on the guest.
    assert_eq!(f.ssh(ip, "cat /root/finished").trim(), "finished");
    let left = f.ssh(
        ip,
        "ls -d /var/tmp/hatchery-* 2>/dev/null | grep -v '\\.exit$'",
    );
    assert_eq!(left.trim(), "", "the job's directory is still on the guest");

    // The worker logged the console where it was told to.
    let console = format!("{}/{name}-serial.log", env.get("CONSOLE_DIR"));
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(text.contains(env.get("SSHD_MARKER")), "{console}: {text}");

    let gone = f.deprovision(name, FINAL);
    assert_eq!(result(&gone).action, "deprovision");
    assert_eq!(f.finals(&id).len(), 1, "one final event per job");
    assert_eq!(sha256_of(env.get("BASE_PATH")), env.get("BASE_SHA256"));
    f.assert_clean();
}

#[test]
fn four_jobs_at_once_through_one_worker_as_a_batch() {
    let _turn = one_at_a_time();
    let f = VmFleet::new();
    let worker = f.worker("w1", &["--concurrency", "4"]);
    let names: Vec<String> = (1..=4).map(|i| format!("fleet-four-{i}")).collect();
    let jobs: Vec<_> = names.iter().map(|n| f.job(n, "hostname")).collect();
    let ids: Vec<String> = jobs
        .iter()
        .map(|j| j["id"].as_str().unwrap().into())
        .collect();

    let out = f.submit_and_wait(&jobs, &["--batch"]);

    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", worker.log());
    assert!(stdout.contains("4 succeeded, 0 failed"), "{stdout}");
    let mut ips = HashSet::new();
    for (id, name) in ids.iter().zip(&names) {
        let finals = f.finals(id);
        assert_eq!(finals.len(), 1, "{finals:?}");
        let r = result(&finals[0]);
        assert_eq!(finals[0].kind(), Some(EventKind::JobSucceeded), "{r:?}");
        assert_eq!(r.finish.as_ref().unwrap().stdout_tail.trim(), name.as_str());
        ips.insert(r.ip.clone().unwrap());
    }
    assert_eq!(ips.len(), 4, "each guest has its own address");

    // The four ran side by side: every job had started before the first one ended.
    let events = f.fleet.events();
    let first_final = (events.iter())
        .position(|e| e.kind().is_some_and(EventKind::is_final))
        .unwrap();
    let started_before: HashSet<_> = (events[..first_final].iter())
        .filter(|e| e.kind() == Some(EventKind::JobStarted))
        .map(|e| e.subject.clone())
        .collect();
    assert_eq!(started_before.len(), 4, "{started_before:?}");
    let summary = events.iter().find_map(|e| match &e.data {
        EventData::Batch(b) if e.kind() == Some(EventKind::BatchCompleted) => Some(b.clone()),
        _ => None,
    });
    let summary = summary.unwrap();
    assert_eq!((summary.size, summary.succeeded), (4, 4), "{summary:?}");

    let removals: Vec<_> = names.iter().map(|n| f.deprovision_job(n)).collect();
    let out = f.submit_and_wait(&removals, &["--batch"]);
    assert!(out.status.success(), "{}", worker.log());
    f.assert_clean();
}

/// The SHA-256 fingerprints of the host keys in a known_hosts file, by `ssh-keygen`.
fn known_host_fingerprints(file: &str) -> Vec<String> {
    let out = Command::new("ssh-keygen")
        .args(["-l", "-f", file])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let fields = text.lines().filter_map(|l| l.split_whitespace().nth(1));
    fields.map(str::to_owned).collect()
}
