//! Jobs for the real-VM environment run through `hatchery run` inside its namespace, and what
//! the tests check afterwards on the guest and in libvirt.

use serde_json::{Value, json};
use uuid::Uuid;

use super::vmenv::VmEnv;

pub fn job(env: &VmEnv, name: &str, network: &str, credential: Value, script: &str) -> Value {
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

pub fn key(env: &VmEnv) -> Value {
    json!({ "private_key": std::fs::read_to_string(env.get("SSH_KEY")).unwrap() })
}

/// Runs one job with `hatchery run` inside the namespace; returns its events.
pub fn run(env: &VmEnv, job: &Value) -> Vec<Value> {
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

pub fn final_event(events: &[Value]) -> &Value {
    events.last().unwrap()
}

pub fn ty(event: &Value) -> &str {
    event["type"].as_str().unwrap()
}

/// Logs in to the guest at `ip` with the test key from inside the namespace and runs `command`.
pub fn ssh(env: &VmEnv, ip: &str, command: &str) -> String {
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

pub fn deprovision(env: &VmEnv, name: &str) -> Vec<Value> {
    let job = json!({
        "id": Uuid::new_v4(),
        "hypervisor": "e2e",
        "deprovision": { "name": name }
    });
    run(env, &job)
}

pub fn assert_gone(env: &VmEnv, name: &str) {
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
