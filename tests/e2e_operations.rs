//! Operating a real hypervisor: `hatchery gc` on planted orphans, `hatchery check` on a real
//! libvirtd, and a worker outside the guests' network reaching them through a jump host.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::ns_sshd::NamespacedSshd;
use common::vm_jobs::{assert_gone, deprovision, job, key, ty};
use common::vmenv::VmEnv;
use serde_json::Value;
use uuid::Uuid;

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
