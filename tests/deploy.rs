//! The deployment files: the compose file is accepted by docker-compose and describes the fleet
//! it promises, and the jobs it submits are valid.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn compose(args: &[&str]) -> String {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("compose/compose.yaml");
    let out = Command::new("docker-compose")
        .arg("-f")
        .arg(&file)
        .args(args)
        .output()
        .expect("docker-compose is installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "docker-compose {args:?} refused the compose file:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn docker_compose_accepts_the_fleet_and_it_has_a_broker_two_workers_and_a_submitter() {
    let mut services: Vec<String> = compose(&["config", "--services"])
        .lines()
        .map(str::to_owned)
        .collect();
    services.sort();
    assert_eq!(services, ["rabbitmq", "submit", "worker-1", "worker-2"]);

    let config = compose(&["config"]);
    assert!(config.contains("rabbitmq:4.1-management"), "{config}");
    assert!(
        config.contains("- worker"),
        "the workers run `hatchery worker`: {config}"
    );
    assert!(config.contains("- submit"), "{config}");
}

#[test]
fn the_jobs_the_compose_fleet_submits_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("compose/demo");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty());

    let out = Command::new(env!("CARGO_BIN_EXE_hatchery"))
        .arg("validate")
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
