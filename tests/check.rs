//! `hatchery check` against the real RabbitMQ and libvirt's test driver.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::testdriver::{BASE, NET, POOL, TestHost};
use hatchery::fleet::{Names, link, topology};

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

    let conn = link::connect("amqp://guest:guest@127.0.0.1:5672/%2f", "check test")
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    topology::declare(&channel, &Names::new(&prefix))
        .await
        .unwrap();

    let (code, report) = check(&config);
    assert_eq!(code, 0, "{report}");
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
    common::fleet::delete_topology(&prefix).await.unwrap();
}
