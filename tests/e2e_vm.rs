//! Real VMs end to end: a real libvirtd in a network namespace, a guest that boots from an
//! overlay on a base image, a DHCP lease, an SSH login and a finish script.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::fleet_vm::sha256_of;
use common::vm_jobs::{assert_gone, deprovision, final_event, job, key, run, ssh, ty};
use common::vmenv::VmEnv;
use serde_json::{Value, json};

#[test]
fn key_login_runs_the_finish_script_on_a_booted_guest() {
    let guard = VmEnv::acquire();
    let env = &guard.env;
    let base_before = sha256_of(env.get("BASE_PATH"));
    let script = "#!/bin/sh\necho finished > /root/finished\nuname -r\necho to-stderr >&2\n";
    let job = job(env, "e2e-key", env.get("NETWORK"), key(env), script);

    let events = run(env, &job);

    let last = final_event(&events);
    assert_eq!(ty(last), "dev.hatchery.job.succeeded", "{last:#}");
    let data = &last["data"];
    let ip = data["ip"].as_str().unwrap();
    assert!(ip.starts_with("10.77."), "{ip}");
    assert_eq!(data["finish"]["exit_code"], 0);
    assert!(
        data["finish"]["stdout_tail"]
            .as_str()
            .unwrap()
            .contains(env.get("KERNEL_VERSION"))
    );
    assert_eq!(data["finish"]["stderr_tail"], "to-stderr\n");
    assert!(
        data["host_key_fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("SHA256:")
    );
    let mac = data["macs"][0].as_str().unwrap();

    // Independently of hatchery: the domain runs from an overlay backed by the base.
    let xml = env.virsh(&["dumpxml", "e2e-key"]);
    assert!(xml.contains(mac), "{xml}");
    let overlay = data["overlay"].as_str().unwrap();
    let vol = env.virsh(&["vol-dumpxml", overlay]);
    assert!(
        vol.contains(&format!("<path>{}</path>", env.get("BASE_PATH"))),
        "{vol}"
    );
    assert_eq!(
        sha256_of(env.get("BASE_PATH")),
        base_before,
        "the base was modified"
    );

    // The script ran, and neither it nor its output is left on the guest.
    assert_eq!(ssh(env, ip, "cat /root/finished").trim(), "finished");
    let leftovers = ssh(
        env,
        ip,
        "ls -d /var/tmp/hatchery-* 2>/dev/null | grep -v '\\.exit$'",
    );
    assert_eq!(
        leftovers.trim(),
        "",
        "the job's directory is still on the guest"
    );

    let gone = deprovision(env, "e2e-key");
    assert_eq!(ty(final_event(&gone)), "dev.hatchery.job.succeeded");
    assert_gone(env, "e2e-key");
    assert_eq!(sha256_of(env.get("BASE_PATH")), base_before);
}

#[test]
fn password_login_with_a_pinned_host_key_and_a_wrong_one() {
    let guard = VmEnv::acquire();
    let env = &guard.env;
    let blob = hatchery_blob(env.get("SSH_HOST_KEY_ED25519"));
    let right = hatchery::guest::host_key_fingerprint(&blob);
    let credential = json!({ "password": env.get("SSH_PASSWORD"), "host_key": right });
    let job_ok = job(
        env,
        "e2e-pw",
        env.get("NETWORK"),
        credential,
        "touch /root/ran",
    );

    let events = run(env, &job_ok);
    let last = final_event(&events);
    assert_eq!(ty(last), "dev.hatchery.job.succeeded", "{last:#}");
    assert_eq!(last["data"]["host_key_fingerprint"], right);
    let text = events.iter().map(Value::to_string).collect::<String>();
    assert!(
        !text.contains(env.get("SSH_PASSWORD")),
        "the password is in an event"
    );
    deprovision(env, "e2e-pw");

    // A wrong pin fails before the script runs; the rollback removes the guest with it.
    let wrong = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";
    let credential = json!({ "password": env.get("SSH_PASSWORD"), "host_key": wrong });
    let job_bad = job(
        env,
        "e2e-pin",
        env.get("NETWORK"),
        credential,
        "touch /root/ran",
    );
    let events = run(env, &job_bad);
    let last = final_event(&events);
    assert_eq!(ty(last), "dev.hatchery.job.failed", "{last:#}");
    assert_eq!(last["data"]["failure"]["class"], "host_key_mismatch");
    assert!(
        last["data"].get("finish").is_none(),
        "nothing ran: {last:#}"
    );
    assert_gone(env, "e2e-pin");
}

#[test]
fn a_failing_script_fails_the_job_and_leaves_nothing() {
    let guard = VmEnv::acquire();
    let env = &guard.env;
    let job = job(
        env,
        "e2e-fail",
        env.get("NETWORK"),
        key(env),
        "echo broken >&2; exit 3",
    );

    let events = run(env, &job);

    let last = final_event(&events);
    assert_eq!(ty(last), "dev.hatchery.job.failed", "{last:#}");
    let data = &last["data"];
    assert_eq!(data["failure"]["stage"], "finish");
    assert_eq!(data["failure"]["class"], "script_failed");
    assert_eq!(data["finish"]["exit_code"], 3);
    assert_eq!(data["finish"]["stderr_tail"], "broken\n");
    assert_eq!(data["rolled_back"], true);
    assert_gone(env, "e2e-fail");
}

#[test]
fn a_guest_without_a_lease_times_out_and_is_rolled_back() {
    let guard = VmEnv::acquire();
    let env = &guard.env;
    let mut job = job(
        env,
        "e2e-nolease",
        env.get("NETWORK_NODHCP"),
        key(env),
        "true",
    );
    job["provision"]["timeouts"]["address_secs"] = json!(15);

    let events = run(env, &job);

    let last = final_event(&events);
    assert_eq!(ty(last), "dev.hatchery.job.failed", "{last:#}");
    assert_eq!(last["data"]["failure"]["stage"], "address");
    assert_eq!(last["data"]["failure"]["class"], "no_address");
    assert_eq!(last["data"]["rolled_back"], true);
    assert_gone(env, "e2e-nolease");
}

#[test]
fn four_jobs_at_once_all_succeed() {
    let guard = VmEnv::acquire();
    let env = &guard.env;
    let names: Vec<String> = (1..=4).map(|i| format!("e2e-four-{i}")).collect();
    let jobs: Vec<Value> = (names.iter())
        .map(|n| job(env, n, env.get("NETWORK"), key(env), "hostname"))
        .collect();

    let outcomes: Vec<Vec<Value>> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs.iter().map(|j| s.spawn(|| run(env, j))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    for (name, events) in names.iter().zip(&outcomes) {
        let last = final_event(events);
        assert_eq!(ty(last), "dev.hatchery.job.succeeded", "{name}: {last:#}");
    }
    let ips: std::collections::HashSet<&str> = outcomes
        .iter()
        .map(|e| final_event(e)["data"]["ip"].as_str().unwrap())
        .collect();
    assert_eq!(ips.len(), 4, "each guest has its own address");
    for name in &names {
        deprovision(env, name);
        assert_gone(env, name);
    }
}

/// Decodes a host key blob given as base64 (as in `known_hosts`).
fn hatchery_blob(base64: &str) -> Vec<u8> {
    let out = Command::new("sh")
        .args(["-c", &format!("printf %s '{base64}' | base64 -d")])
        .output()
        .unwrap();
    out.stdout
}
