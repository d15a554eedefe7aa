//! `hatchery check` against the real RabbitMQ and libvirt's test driver.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::testdriver::{BASE, NET, POOL, TestHost};

fn check(config: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hatchery.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hatchery"))
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn reports_every_part_and_fails_on_any_missing_one() {
    let host = TestHost::new();
    let prefix = format!("hatchery-check-{}", uuid::Uuid::new_v4());
    let config = format!(
        "[broker]\nprefix = \"{prefix}\"\n\
         [hypervisors.fake]\nuri = \"{}\"\npool = \"{POOL}\"\nnetwork = \"{NET}\"\n\
         bases = [\"{BASE}\"]\n",
        host.uri
    );

    // Before any worker declared the topology, the check says what is missing.
    let (code, report) = check(&config);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains(&format!("{prefix}.jobs")) && report.contains("FAILED"),
        "{report}"
    );
    assert!(report.contains("libvirt 9."), "{report}");

    // A worker given nothing but the file declares its topology under the file's prefix.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hatchery.toml");
    let worker_config = format!("{config}[worker]\nallow_test_driver = true\nconcurrency = 2\n");
    std::fs::write(&path, worker_config).unwrap();
    let hatchery = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hatchery"));
        cmd.args(args).args(["--config", path.to_str().unwrap()]);
        cmd.env_remove("HATCHERY_AMQP_URL")
            .env_remove("HATCHERY_PREFIX")
            .env("NO_COLOR", "1");
        cmd
    };
    let log = std::fs::File::create(dir.path().join("worker.log")).unwrap();
    let worker = hatchery(&["worker"]).stderr(log).spawn().unwrap();
    let _worker = common::fleet::WorkerProcess {
        child: worker,
        name: "from-config".into(),
        log: dir.path().join("worker.log"),
    };
    let passing = || check(&config).0 == 0;
    assert!(
        common::wait_until(std::time::Duration::from_secs(20), passing),
        "{}\n{}",
        check(&config).1,
        _worker.log()
    );
    let (code, report) = check(&config);
    assert_eq!(code, 0, "{report}");

    // `submit` and the worker meet on the file's names, with no flag saying them.
    let mut job = common::jobs::provision(&host.uri, "from-config");
    job["hypervisor"] = "fake".into();
    let job_file = dir.path().join("job.json");
    std::fs::write(&job_file, job.to_string()).unwrap();
    let out = hatchery(&[
        "submit",
        "--wait",
        "--timeout",
        "60s",
        job_file.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", _worker.log());
    assert!(stdout.contains("job.succeeded"), "{stdout}");
    assert!(
        _worker.log().contains(&format!("prefix={prefix}")),
        "{}",
        _worker.log()
    );
    assert!(
        report.contains("all") && report.contains("checks passed"),
        "{report}"
    );

    // A base image that is not in the pool fails the check and is named.
    let broken = config.replace(&format!("[\"{BASE}\"]"), "[\"absent.qcow2\"]");
    let (code, report) = check(&broken);
    assert_eq!(code, 1);
    assert!(
        report
            .lines()
            .any(|l| l.contains("absent.qcow2") && l.contains("FAILED")),
        "{report}"
    );

    // Leave the broker as we found it.
    drop(_worker);
    common::fleet::delete_topology(&prefix).await.unwrap();
}
