//! The job contract: the JSON Schema and the Rust types accept and refuse the same documents.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use hatchery::job::{self, Job, Limits};

fn schema_errors(doc: &Value) -> Vec<String> {
    let schema: Value = serde_json::from_str(job::JOB_SCHEMA).unwrap();
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap();
    validator
        .iter_errors(doc)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// The Rust side alone: deserialisation, then the semantic rules.
fn type_errors(doc: &Value) -> Vec<String> {
    match serde_json::from_value::<Job>(doc.clone()) {
        Err(e) => vec![e.to_string()],
        Ok(job) => job::validate(&job, &Limits::default())
            .iter()
            .map(|p| p.to_string())
            .collect(),
    }
}

fn example_jobs() -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs");
    let mut jobs = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let doc = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            jobs.push((path.display().to_string(), doc));
        }
    }
    assert!(!jobs.is_empty(), "jobs/ holds example jobs");
    jobs
}

#[test]
fn every_example_job_passes_schema_and_types() {
    for (name, doc) in example_jobs() {
        assert_eq!(
            schema_errors(&doc),
            Vec::<String>::new(),
            "{name} against the schema"
        );
        assert_eq!(
            type_errors(&doc),
            Vec::<String>::new(),
            "{name} against the types"
        );
    }
}

/// A valid job to break one field at a time.
fn valid() -> Value {
    json!({
        "id": "0b7f0e8e-2a43-4c3c-9d37-3a7f4e0f6c11",
        "batch": { "id": "rack-7", "size": 3 },
        "hypervisor": "qemu+ssh://root@kvm-1.example.com/system",
        "provision": {
            "vm": {
                "name": "web-01",
                "vcpus": 2,
                "memory_mib": 2048,
                "base": { "pool": "default", "volume": "debian-12.qcow2", "sha256": "a".repeat(64) },
                "disk_gib": 20,
                "nics": [{ "network": "default", "model": "virtio", "mac": "52:54:00:aa:bb:cc" }],
                "console": { "type": "spice", "listen": "127.0.0.1" },
                "boot": { "kernel": "/var/lib/images/vmlinuz", "cmdline": "console=ttyS0" }
            },
            "address": { "source": "static", "ip": "192.0.2.15", "port": 2222 },
            "finish": {
                "user": "admin", "key_name": "fleet", "script": "#!/bin/sh\ntrue\n",
                "timeout_secs": 900, "sudo": true,
                "host_key": "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"
            },
            "timeouts": { "address_secs": 120 },
            "on_failure": "keep"
        }
    })
}

/// Each case: what is broken, and the JSON path the schema must name.
fn invalid_cases() -> Vec<(&'static str, Value, &'static str)> {
    let mut cases = Vec::new();
    let mut case = |what, path, edit: &dyn Fn(&mut Value)| {
        let mut doc = valid();
        edit(&mut doc);
        cases.push((what, doc, path));
    };
    case("XML in the VM name", "/provision/vm/name", &|d| {
        d["provision"]["vm"]["name"] = json!("x'/><evil/>")
    });
    case("id not a UUID", "/id", &|d| d["id"] = json!("not-a-uuid"));
    case("both provision and deprovision", "", &|d| {
        d["deprovision"] = json!({ "name": "web-01" })
    });
    case("unknown top-level field", "", &|d| d["priority"] = json!(1));
    case("unknown VM field", "/provision/vm", &|d| {
        d["provision"]["vm"]["gpu"] = json!(true)
    });
    case("zero vCPUs", "/provision/vm/vcpus", &|d| {
        d["provision"]["vm"]["vcpus"] = json!(0)
    });
    case("negative memory", "/provision/vm/memory_mib", &|d| {
        d["provision"]["vm"]["memory_mib"] = json!(-1)
    });
    case("volume with a slash", "/provision/vm/base/volume", &|d| {
        d["provision"]["vm"]["base"]["volume"] = json!("../etc/passwd")
    });
    case("relative base path", "/provision/vm/base/path", &|d| {
        d["provision"]["vm"]["base"] = json!({ "path": "images/base.qcow2" })
    });
    case(
        "dot-dot in kernel path",
        "/provision/vm/boot/kernel",
        &|d| d["provision"]["vm"]["boot"]["kernel"] = json!("/var/../etc/shadow"),
    );
    case("short digest", "/provision/vm/base/sha256", &|d| {
        d["provision"]["vm"]["base"]["sha256"] = json!("abc")
    });
    case("no NICs", "/provision/vm/nics", &|d| {
        d["provision"]["vm"]["nics"] = json!([])
    });
    case("multicast MAC", "/provision/vm/nics/0/mac", &|d| {
        d["provision"]["vm"]["nics"][0]["mac"] = json!("01:00:5e:00:00:01")
    });
    case("network and bridge", "/provision/vm/nics/0", &|d| {
        d["provision"]["vm"]["nics"][0]["bridge"] = json!("br0")
    });
    case(
        "bridge name too long",
        "/provision/vm/nics/0/bridge",
        &|d| d["provision"]["vm"]["nics"][0] = json!({ "bridge": "a-very-long-bridge-name" }),
    );
    case("unknown NIC model", "/provision/vm/nics/0/model", &|d| {
        d["provision"]["vm"]["nics"][0]["model"] = json!("<model/>")
    });
    case(
        "console listen not an IP",
        "/provision/vm/console/listen",
        &|d| d["provision"]["vm"]["console"]["listen"] = json!("0.0.0.0'/>"),
    );
    case(
        "control character in cmdline",
        "/provision/vm/boot/cmdline",
        &|d| d["provision"]["vm"]["boot"]["cmdline"] = json!("quiet\u{7}"),
    );
    case("two credentials", "/provision/finish", &|d| {
        d["provision"]["finish"]["password"] = json!("hunter2")
    });
    case("empty script", "/provision/finish/script", &|d| {
        d["provision"]["finish"]["script"] = json!("")
    });
    case("bad host key", "/provision/finish/host_key", &|d| {
        d["provision"]["finish"]["host_key"] = json!("MD5:aa:bb")
    });
    case("zero timeout", "/provision/timeouts/address_secs", &|d| {
        d["provision"]["timeouts"]["address_secs"] = json!(0)
    });
    case("odd URI scheme", "/hypervisor", &|d| {
        d["hypervisor"] = json!("file:///etc/passwd")
    });
    case("static address without ip", "/provision/address", &|d| {
        d["provision"]["address"] = json!({ "source": "static" })
    });
    case("unknown on_failure", "/provision/on_failure", &|d| {
        d["provision"]["on_failure"] = json!("explode")
    });
    cases
}

#[test]
fn the_valid_sample_is_valid() {
    assert_eq!(schema_errors(&valid()), Vec::<String>::new());
    assert_eq!(type_errors(&valid()), Vec::<String>::new());
}

#[test]
fn invalid_samples_are_refused_by_schema_and_types_alike() {
    for (what, doc, path) in invalid_cases() {
        let schema = schema_errors(&doc);
        assert!(
            schema.iter().any(|e| e.starts_with(&format!("{path}:"))),
            "{what}: the schema does not name {path}: {schema:?}"
        );
        assert!(!type_errors(&doc).is_empty(), "{what}: the types accept it");
        assert!(
            job::parse_value(&doc, &Limits::default()).is_err(),
            "{what}: parse accepts it"
        );
    }
}

#[test]
fn schema_errors_never_echo_a_password() {
    let mut doc = valid();
    doc["provision"]["finish"]["password"] = json!("hunter2-secret");
    let rejected = job::parse_value(&doc, &Limits::default()).unwrap_err();
    assert!(
        !rejected.to_string().contains("hunter2-secret"),
        "{rejected}"
    );
}

#[test]
fn validate_names_the_field_of_a_hostile_name_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let mut doc = valid();
    doc["provision"]["vm"]["name"] = json!("x'/><evil/>");
    doc["provision"]["vcpus_typo"] = json!(2);
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, doc.to_string()).unwrap();
    let good = dir.path().join("good.json");
    std::fs::write(&good, valid().to_string()).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_hatchery"))
        .arg("validate")
        .args([&good, &bad])
        .output()
        .unwrap();

    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("good.json: ok"), "{stdout}");
    assert!(stdout.contains("bad.json: /provision/vm/name:"), "{stdout}");
    assert!(
        stdout.contains("bad.json: /provision:"),
        "every problem, not just the first: {stdout}"
    );
}

#[test]
fn oversized_messages_are_refused_before_parsing() {
    let limits = Limits {
        message_bytes: 100,
        ..Limits::default()
    };
    let rejected = job::parse(valid().to_string().as_bytes(), &limits).unwrap_err();
    assert_eq!(rejected.reason(), "too_large");
    assert_eq!(
        job::parse(b"{not json", &Limits::default())
            .unwrap_err()
            .reason(),
        "not_json"
    );
}
