//! Real VMs end to end: a real libvirtd in a network namespace, a guest that boots from an
//! overlay on a base image, a DHCP lease, an SSH login and a finish script.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::ns_sshd::NamespacedSshd;
use common::vmenv::VmEnv;
use serde_json::{Value, json};
use uuid::Uuid;

/// A job for a guest of the test image, finishing with `script` through `credential`.
fn job(env: &VmEnv, name: &str, network: &str, credential: Value, script: &str) -> Value {
    let mut finish = json!({ "user": env.get("SSH_USER"), "script": script, "timeout_secs": 60 });
    for (k, v) in credential.as_object().unwrap() {
        finish[k] = v.clone();
    }
    json!({
        "id": Uuid::new_v4(),
        // The URI has parameters, which jobs may not carry: `run` gets it with --connect.
        "hypervisor": "e2e",
        "provision": {
            "vm": {
                "name": name,
                "vcpus": 1,
                "memory_mib": 256,
                "domain_type": env.get("DOMAIN_TYPE"),
                "base": {
                    "pool": env.get("POOL"),
                    "volume": env.get("BASE_VOLUME"),
                    "sha256": env.get("BASE_SHA256")
                },
                "disk_gib": 1,
                "nics": [{ "network": network }],
                "console": { "type": "vnc", "listen": "127.0.0.1" },
                "boot": {
                    "kernel": env.get("KERNEL"),
                    "initrd": env.get("INITRD"),
                    "cmdline": format!("{} hatchery.hostname={name}", env.get("CMDLINE"))
                }
            },
            "address": { "source": "lease" },
            "finish": finish,
            "timeouts": { "address_secs": 90, "finish_secs": 90 }
        }
    })
}

fn key(env: &VmEnv) -> Value {
    json!({ "private_key": std::fs::read_to_string(env.get("SSH_KEY")).unwrap() })
}

/// Runs one job with `hatchery run` inside the namespace; returns its events.
fn run(env: &VmEnv, job: &Value) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.json");
    std::fs::write(&file, job.to_string()).unwrap();
    let out = env.exec(
        env!("CARGO_BIN_EXE_hatchery"),
        &[
            "run",
            file.to_str().unwrap(),
            "--connect",
            env.get("LIBVIRT_URI"),
            "--serial-log-dir",
            env.get("CONSOLE_DIR"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let events: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        !events.is_empty(),
        "no events; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    events
}

fn final_event(events: &[Value]) -> &Value {
    events.last().unwrap()
}

fn ty(event: &Value) -> &str {
    event["type"].as_str().unwrap()
}

/// Logs in to the guest at `ip` with the test key from inside the namespace and runs `command`.
fn ssh(env: &VmEnv, ip: &str, command: &str) -> String {
    let target = format!("{}@{ip}", env.get("SSH_USER"));
    let out = env.exec(
        "ssh",
        &[
            "-F",
            "/dev/null",
            "-i",
            env.get("SSH_KEY"),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=5",
            &target,
            command,
        ],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256_of(path: &str) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn deprovision(env: &VmEnv, name: &str) -> Vec<Value> {
    let job = json!({
        "id": Uuid::new_v4(),
        "hypervisor": "e2e",
        "deprovision": { "name": name }
    });
    run(env, &job)
}

fn assert_gone(env: &VmEnv, name: &str) {
    assert!(
        !env.virsh(&["list", "--all", "--name"])
            .lines()
            .any(|l| l.trim() == name)
    );
    let volumes = env.virsh(&["vol-list", env.get("POOL")]);
    assert!(
        !volumes.contains(&format!("{name}-")),
        "overlay of {name} left: {volumes}"
    );
}

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

#[test]
fn gc_removes_a_planted_orphan_and_leaves_other_domains_alone() {
    let guard = VmEnv::acquire();
    let env = &guard.env;
    let pool = env.get("POOL");
    let job_id = Uuid::new_v4();
    let volume = format!("gc-orphan-{job_id}.qcow2");
    let dir = tempfile::tempdir().unwrap();

    // A rollback that never finished: hatchery's record says so, and it is old.
    env.virsh(&[
        "vol-create-as",
        pool,
        &volume,
        "1G",
        "--format",
        "qcow2",
        "--backing-vol",
        env.get("BASE_VOLUME"),
        "--backing-vol-format",
        "qcow2",
    ]);
    let orphan = format!(
        "<domain type='qemu'><name>gc-orphan</name><memory unit='MiB'>64</memory>
           <metadata><hatchery:job xmlns:hatchery='https://hatchery.dev/xmlns/job/1'>
             <hatchery:id>{job_id}</hatchery:id>
             <hatchery:overlay pool='{pool}' volume='{volume}'/>
             <hatchery:state>rolling-back</hatchery:state>
             <hatchery:updated-at>1000</hatchery:updated-at>
           </hatchery:job></metadata>
           <os><type arch='x86_64'>hvm</type></os></domain>"
    );
    let bystander = "<domain type='qemu'><name>gc-bystander</name><memory unit='MiB'>64</memory>
           <os><type arch='x86_64'>hvm</type></os></domain>";
    for (name, xml) in [("orphan", orphan.as_str()), ("bystander", bystander)] {
        let file = dir.path().join(format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();
        env.virsh(&["define", file.to_str().unwrap()]);
    }

    let gc = |apply: bool| {
        let mut args = vec!["gc", "-c", env.get("LIBVIRT_URI")];
        if apply {
            args.push("--apply");
        }
        let out = Command::new(env!("CARGO_BIN_EXE_hatchery"))
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };

    let report = gc(false);
    assert!(report.contains("domain gc-orphan"), "{report}");
    assert!(report.contains(&format!("volume {volume}")), "{report}");
    assert!(!report.contains("gc-bystander"), "{report}");
    assert!(
        env.virsh(&["list", "--all", "--name"])
            .contains("gc-orphan"),
        "dry run removed it"
    );

    let applied = gc(true);
    assert!(applied.contains("removed 2 of 2"), "{applied}");
    let domains = env.virsh(&["list", "--all", "--name"]);
    assert!(!domains.contains("gc-orphan"), "{domains}");
    assert!(domains.contains("gc-bystander"), "{domains}");
    assert!(!env.virsh(&["vol-list", pool]).contains(&volume));
    env.virsh(&["undefine", "gc-bystander"]);
}

#[test]
fn check_reports_the_real_hypervisor_its_pool_network_and_base() {
    let guard = VmEnv::acquire();
    let env = &guard.env;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hatchery.toml");
    let text = format!(
        "[broker]\nprefix = \"e2e-check-{}\"\n[hypervisors.e2e]\nuri = \"{}\"\npool = \"{}\"\n\
         network = \"{}\"\nbases = [\"{}\", \"missing.qcow2\"]\n",
        Uuid::new_v4(),
        env.get("LIBVIRT_URI"),
        env.get("POOL"),
        env.get("NETWORK"),
        env.get("BASE_VOLUME"),
    );
    std::fs::write(&config, text).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_hatchery"))
        .args(["check", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();

    let report = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a missing base fails the check: {report}"
    );
    let row = |check: &str, target: &str| {
        report
            .lines()
            .find(|l| l.starts_with(check) && l.contains(target))
            .unwrap_or("")
            .to_owned()
    };
    assert!(row("hypervisor", "e2e").contains(" ok "), "{report}");
    assert!(row("hypervisor", "e2e").contains("libvirt 9."), "{report}");
    assert!(row("pool", env.get("POOL")).contains(" ok "), "{report}");
    assert!(
        row("network", env.get("NETWORK")).contains(" ok "),
        "{report}"
    );
    assert!(
        row("base", env.get("BASE_VOLUME")).contains(" ok "),
        "{report}"
    );
    assert!(row("base", "missing.qcow2").contains("FAILED"), "{report}");
    assert!(row("broker", "127.0.0.1").contains(" ok "), "{report}");
}

#[test]
fn a_worker_outside_the_namespace_reaches_the_guest_through_the_hypervisor() {
    let guard = VmEnv::acquire();
    let env = &guard.env;
    let public = std::fs::read_to_string(format!("{}.pub", env.get("SSH_KEY"))).unwrap();
    let hop = NamespacedSshd::start(env, &public);
    let dir = tempfile::tempdir().unwrap();
    let known = dir.path().join("known_hosts");
    std::fs::write(&known, hop.known_hosts()).unwrap();
    let config = dir.path().join("hatchery.toml");
    let text = format!(
        "[hypervisors.e2e]\nuri = \"{}\"\njump_host = \"root@127.0.0.1:{}\"\n\
         jump_identity = \"{}\"\njump_known_hosts = \"{}\"\n",
        env.get("LIBVIRT_URI"),
        hop.port(),
        env.get("SSH_KEY"),
        known.display()
    );
    std::fs::write(&config, text).unwrap();
    let job = job(env, "e2e-hop", env.get("NETWORK"), key(env), "echo hopped");
    let file = dir.path().join("job.json");
    std::fs::write(&file, job.to_string()).unwrap();

    // In the root namespace: the guest's address is unreachable from here but for the hop.
    let out = Command::new(env!("CARGO_BIN_EXE_hatchery"))
        .args([
            "run",
            file.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ])
        .output()
        .unwrap();

    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        ty(&last),
        "dev.hatchery.job.succeeded",
        "{last:#}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        hop.log()
    );
    assert_eq!(last["data"]["finish"]["stdout_tail"], "hopped\n");
    assert!(hop.log().contains("Accepted publickey"), "{}", hop.log());
    deprovision(env, "e2e-hop");
    assert_gone(env, "e2e-hop");
}
