//! `amqps://` to the real broker through a TLS terminator whose certificate a private CA
//! signed: trusted with the CA (`broker.tls_ca`, `--tls-ca`, `HATCHERY_TLS_CA`), refused
//! without it, with an error that says the certificate did not verify.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use hatchery::events::EventKind;

use common::fleet::Fleet;
use common::tls::{Authority, TlsProxy};
use common::wait_until;

/// The names the broker's certificate is made for.
const BROKER_NAMES: &str = "DNS:localhost,IP:127.0.0.1";

/// `hatchery check` with a configuration naming the broker at `url`: exit code and report.
fn check(fleet: &Fleet, url: &str, tls_ca: Option<&Path>) -> (i32, String) {
    let mut config = format!("[broker]\nurl = \"{url}\"\nprefix = \"{}\"\n", fleet.prefix);
    if let Some(ca) = tls_ca {
        config.push_str(&format!("tls_ca = \"{}\"\n", ca.display()));
    }
    let path = fleet.dir.path().join("check.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hatchery"))
        .args(["check", "--config", path.to_str().unwrap()])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
    )
}

/// The report's line about the broker connection.
fn broker_line(report: &str) -> &str {
    report.lines().find(|l| l.starts_with("broker")).unwrap()
}

#[test]
fn check_trusts_the_configured_ca_and_refuses_the_broker_without_it() {
    let fleet = Fleet::new();
    let proxy = TlsProxy::start(BROKER_NAMES);

    // With the CA, the broker and the fleet's topology are reached over TLS.
    for host in ["127.0.0.1", "localhost"] {
        let (code, report) = check(&fleet, &proxy.url(host), Some(&proxy.ca.cert));
        assert_eq!(code, 0, "{report}");
        assert!(broker_line(&report).contains("connected"), "{report}");
        assert!(report.contains("checks passed"), "{report}");
    }

    // Without it, or with a CA that did not sign the certificate, the handshake fails and
    // the report says why.
    let stranger = Authority::new(proxy.dir.path(), "stranger");
    for ca in [None, Some(stranger.cert.as_path())] {
        let (code, report) = check(&fleet, &proxy.url("127.0.0.1"), ca);
        assert_eq!(code, 1, "{report}");
        let line = broker_line(&report);
        assert!(line.contains("FAILED"), "{report}");
        assert!(
            line.contains("certificate") && line.contains("did not verify"),
            "{line}"
        );
        assert!(line.contains("certificate verify failed"), "{line}");
        assert!(
            !line.contains("guest:guest"),
            "the password stays out: {line}"
        );
    }

    // The port speaks only TLS: a plain AMQP client gets nowhere, so the successes above
    // went through the handshake.
    let plain = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let (code, report) = check(&fleet, &plain, None);
    assert_eq!(code, 1, "{report}");
    assert!(broker_line(&report).contains("FAILED"), "{report}");

    // A CA file that is not there, or holds no certificate, is named; the latter is not
    // passed on as an empty trust list.
    let missing = proxy.dir.path().join("missing.pem");
    let (code, report) = check(&fleet, &proxy.url("127.0.0.1"), Some(&missing));
    assert_eq!(code, 1, "{report}");
    let line = broker_line(&report);
    assert!(
        line.contains("cannot read") && line.contains("missing.pem"),
        "{line}"
    );
    let junk = proxy.dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let (code, report) = check(&fleet, &proxy.url("127.0.0.1"), Some(&junk));
    assert_eq!(code, 1, "{report}");
    let line = broker_line(&report);
    assert!(
        line.contains("junk.pem") && line.contains("no PEM certificate"),
        "{line}"
    );
}

#[test]
fn the_host_name_is_verified_even_with_the_right_ca() {
    let fleet = Fleet::new();
    // Signed by the trusted CA, but for another host than the one connected to.
    let proxy = TlsProxy::start("DNS:broker.example.org");
    let (code, report) = check(&fleet, &proxy.url("127.0.0.1"), Some(&proxy.ca.cert));
    assert_eq!(code, 1, "{report}");
    let line = broker_line(&report);
    assert!(line.contains("certificate verify failed"), "{line}");
}

#[test]
fn worker_submit_and_events_run_a_job_over_amqps() {
    let fleet = Fleet::new();
    let proxy = TlsProxy::start(BROKER_NAMES);
    let url = proxy.url("localhost");
    let ca = proxy.ca.cert.to_str().unwrap().to_owned();

    // The worker takes the CA from its configuration, `events` from --tls-ca and `submit`
    // from the environment: the three ways an operator may give it.
    let set_ca = format!("broker.tls_ca={ca}");
    let mut worker = fleet.worker("tls", &["--amqp-url", &url, "--set", &set_ca]);
    let mut events = fleet
        .hatchery(&["events", "--json", "--type", "job.succeeded"])
        .args(["--amqp-url", &url, "--tls-ca", &ca])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = lines_of(events.stdout.take().unwrap());
    // Once connected, `events` binds a server-named queue of its own to the events.
    let wanted = format!("{}\tamq.gen-", fleet.names.events_exchange);
    let listening = || {
        let columns = ["--quiet", "source_name", "destination_name"];
        let bindings = common::fleet::rabbitmqctl(&[&["list_bindings"], &columns[..]].concat());
        bindings.lines().any(|l| l.starts_with(&wanted))
    };
    assert!(wait_until(Duration::from_secs(20), listening));

    let job = fleet.job("over-tls");
    let id = job["id"].as_str().unwrap().to_owned();
    let file = fleet.dir.path().join("job.json");
    std::fs::write(&file, serde_json::to_vec(&job).unwrap()).unwrap();
    let out = fleet
        .hatchery(&["submit", "--wait", "--timeout", "60s"])
        .args(["--amqp-url", &url, file.to_str().unwrap()])
        .env("HATCHERY_TLS_CA", &ca)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {} {}",
        String::from_utf8_lossy(&out.stderr),
        worker.log()
    );
    assert!(stdout.contains(&format!("{id} job.succeeded")), "{stdout}");

    // `events` saw it over TLS, and the plain-AMQP recorder saw the same event on the broker.
    let line = lines.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(
        line.contains(&id) && line.contains("job.succeeded"),
        "{line}"
    );
    let recorded = || fleet.count(EventKind::JobSucceeded, &id) == 1;
    assert!(wait_until(Duration::from_secs(10), recorded));

    let _ = events.kill();
    let _ = events.wait();
    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "{}", worker.log());
}

#[test]
fn submit_without_the_ca_fails_and_names_the_certificate_problem() {
    let fleet = Fleet::new();
    let proxy = TlsProxy::start(BROKER_NAMES);
    let file = fleet.dir.path().join("job.json");
    std::fs::write(&file, serde_json::to_vec(&fleet.job("never")).unwrap()).unwrap();
    let out = fleet
        .hatchery(&["submit", "--amqp-url", &proxy.url("localhost")])
        .arg(&file)
        .env_remove("HATCHERY_TLS_CA")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("did not verify"), "{stderr}");
    assert!(stderr.contains("--tls-ca"), "the remedy is named: {stderr}");
    assert!(stderr.contains("certificate verify failed"), "{stderr}");
    assert_eq!(fleet.queue_len(&fleet.names.jobs_queue), Some(0));
}

/// The lines a child writes, as they come.
fn lines_of(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}
