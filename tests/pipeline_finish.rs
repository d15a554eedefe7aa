//! The pipeline on libvirt's test driver finishing on a real OpenSSH server on loopback: keys
//! the worker holds, a jump host, and finish scripts retried only when the job asks.
#![allow(clippy::unwrap_used)]

mod common;

use common::jobs;
use common::pipeline::{run, test_settings};
use common::testdriver::TestHost;
use serde_json::json;

use hatchery::events::{EventKind, Publisher};
use hatchery::job::{Job, Work};
use hatchery::pipeline::{Outcome, Pipeline};
use hatchery::settings::Settings;

/// A job that finishes on the test's own sshd at 127.0.0.1 with a key the worker holds.
fn finishing_on(host: &TestHost, name: &str, sshd: &common::sshd::Sshd, key_name: &str) -> Job {
    let mut doc = jobs::provision(&host.uri, name);
    let (ip, port) = (sshd.addr().ip().to_string(), sshd.addr().port());
    doc["provision"]["address"] = json!({ "source": "static", "ip": ip, "port": port });
    doc["provision"]["finish"] = json!({
        "user": common::sshd::KEY_USER,
        "key_name": key_name,
        "script": "echo hello from $(id -un)",
        "host_key": sshd.host_key_fingerprint(),
    });
    jobs::parse(&doc)
}

/// A test-driver host, a real sshd that authorises a fresh key, and a pipeline whose key
/// directory holds that key under `key_name`.
struct KeyedSshd {
    host: TestHost,
    sshd: common::sshd::Sshd,
    key: common::sshd::KeyPair,
    keys: tempfile::TempDir,
    pipeline: Pipeline,
}

impl KeyedSshd {
    fn start(key_name: &str) -> Self {
        let sshd = common::sshd::Sshd::start();
        let key = common::sshd::generate_key("ed25519", "");
        sshd.authorize(&key.public);
        let keys = tempfile::tempdir().unwrap();
        std::fs::write(keys.path().join(key_name), &key.private).unwrap();
        let settings = Settings {
            key_dir: Some(keys.path().to_owned()),
            ..test_settings()
        };
        Self {
            host: TestHost::new(),
            sshd,
            key,
            keys,
            pipeline: Pipeline::new(settings, Publisher::new("test")),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn named_keys_come_from_the_key_directory_or_the_environment() {
    let KeyedSshd {
        host,
        sshd,
        key,
        keys: _keys,
        pipeline: p,
    } = KeyedSshd::start("fleet");

    let (outcome, events) = run(&p, finishing_on(&host, "from-dir", &sshd, "fleet")).await;
    assert_eq!(
        outcome,
        Outcome::Succeeded,
        "{}\n{}",
        events.result(),
        sshd.log()
    );
    let result = events.result();
    assert_eq!(
        result["finish"]["stdout_tail"],
        format!("hello from {}\n", common::sshd::KEY_USER)
    );
    assert_eq!(result["host_key_fingerprint"], sshd.host_key_fingerprint());

    // The same key, held in the environment under a name no file has.
    let var = hatchery::stages::finish::key_env_var("env-only.key");
    assert_eq!(var, "HATCHERY_KEY_ENV_ONLY_KEY");
    // SAFETY: this variable name is used by this test alone, and nothing reads it concurrently
    // before it is set.
    unsafe { std::env::set_var(&var, &key.private) };
    let (outcome, events) = run(&p, finishing_on(&host, "from-env", &sshd, "env-only.key")).await;
    assert_eq!(outcome, Outcome::Succeeded, "{}", events.result());

    let (outcome, events) = run(&p, finishing_on(&host, "unknown-key", &sshd, "nope")).await;
    assert_eq!(outcome, Outcome::Failed);
    assert_eq!(events.result()["failure"]["class"], "refused");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_finish_step_can_hop_through_the_hypervisor() {
    let host = TestHost::new();
    // Two real sshds on loopback: one stands in for the hypervisor, the other for the guest.
    let hypervisor = common::sshd::Sshd::start();
    let guest = common::sshd::Sshd::start();
    let hop_key = common::sshd::generate_key("ed25519", "");
    hypervisor.authorize(&hop_key.public);
    let guest_key = common::sshd::generate_key("ed25519", "");
    guest.authorize(&guest_key.public);

    let files = tempfile::tempdir().unwrap();
    let identity = files.path().join("hop");
    std::fs::write(&identity, &hop_key.private).unwrap();
    std::fs::set_permissions(
        &identity,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let known = files.path().join("known_hosts");
    std::fs::write(&known, hypervisor.known_hosts_line()).unwrap();
    std::fs::write(files.path().join("guest"), &guest_key.private).unwrap();

    let spec = format!(
        "{}@127.0.0.1:{}",
        common::sshd::KEY_USER,
        hypervisor.addr().port()
    );
    let mut jump = hatchery::guest::JumpHost::parse(&spec).unwrap();
    jump.identity = Some(identity);
    jump.known_hosts = Some(known.clone());
    let mut settings = Settings {
        allow_test_driver: true,
        key_dir: Some(files.path().to_owned()),
        ..Settings::default()
    };
    settings.jump_hosts.insert(host.uri.clone(), jump);
    let p = Pipeline::new(settings, Publisher::new("test"));

    let (outcome, events) = run(&p, finishing_on(&host, "hopped", &guest, "guest")).await;
    assert_eq!(
        outcome,
        Outcome::Succeeded,
        "{}\n{}",
        events.result(),
        hypervisor.log()
    );
    assert_eq!(
        events.result()["host_key_fingerprint"],
        guest.host_key_fingerprint()
    );
    assert!(
        hypervisor.log().contains("Accepted publickey"),
        "{}",
        hypervisor.log()
    );

    // A jump host missing from known_hosts is refused, never trusted on first use.
    std::fs::write(&known, "").unwrap();
    let (outcome, events) = run(&p, finishing_on(&host, "unhopped", &guest, "guest")).await;
    assert_eq!(outcome, Outcome::Failed, "{}", events.result());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_script_runs_again_only_when_the_job_asks() {
    let KeyedSshd {
        host,
        sshd,
        keys,
        pipeline: p,
        ..
    } = KeyedSshd::start("k");
    let counter = keys.path().join("runs");
    std::fs::set_permissions(
        keys.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    // Fails on its first run, succeeds on any later one.
    let script = format!(
        "echo run >> {c}; [ \"$(wc -l < {c})\" -ge 2 ]",
        c = counter.display()
    );

    let mut job = finishing_on(&host, "flaky-once", &sshd, "k");
    if let Work::Provision(p) = &mut job.work {
        p.finish.as_mut().unwrap().script = script.clone();
    }
    let (outcome, events) = run(&p, job).await;
    assert_eq!(outcome, Outcome::Failed, "no retry unless asked");
    assert_eq!(events.result()["failure"]["class"], "script_failed");

    std::fs::remove_file(&counter).unwrap();
    let mut doc = jobs::provision(&host.uri, "flaky-twice");
    let (ip, port) = (sshd.addr().ip().to_string(), sshd.addr().port());
    doc["provision"]["address"] = json!({ "source": "static", "ip": ip, "port": port });
    doc["provision"]["finish"] =
        json!({ "user": common::sshd::KEY_USER, "key_name": "k", "script": script });
    doc["provision"]["retry"] =
        json!({ "script_failures": true, "max_attempts": 3, "initial_delay_ms": 10 });
    let (outcome, events) = run(&p, jobs::parse(&doc)).await;
    assert_eq!(outcome, Outcome::Succeeded, "{}", events.result());
    assert!(events.kinds().contains(&EventKind::StageRetrying));
    let finish = &events.result()["stages"][3];
    assert_eq!(
        (finish["stage"].as_str(), finish["attempts"].as_u64()),
        (Some("finish"), Some(2))
    );
    assert_eq!(
        std::fs::read_to_string(&counter).unwrap().lines().count(),
        2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn output_collected_before_a_crash_reaches_the_next_runs_result() {
    let KeyedSshd {
        host,
        sshd,
        keys: _keys,
        pipeline: p,
        ..
    } = KeyedSshd::start("k");
    let job = finishing_on(&host, "collected-once", &sshd, "k");

    let (outcome, first) = run(&p, job.clone()).await;
    assert_eq!(outcome, Outcome::Succeeded, "{}", first.result());
    let stdout = format!("hello from {}\n", common::sshd::KEY_USER);
    assert_eq!(first.result()["finish"]["stdout_tail"], stdout);

    // The worker died before its final event reached the broker, so the job comes again. The
    // guest holds only the exit status now; the rest comes from the domain's record.
    let sink = common::capture::Collect::default();
    let cancel = tokio_util::sync::CancellationToken::new();
    let outcome = p.run(job, 2, cancel, &sink).await;
    assert_eq!(outcome, Outcome::Succeeded, "{}", sink.result());
    let finish = &sink.result()["finish"];
    assert_eq!(finish["resumed"], true, "not run again: {finish}");
    assert_eq!(finish["stdout_tail"], stdout);
    assert_eq!(finish["exit_code"], 0);
}
