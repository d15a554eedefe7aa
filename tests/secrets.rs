//! Secrets never leak. Jobs carrying a recognisable password or an inline private key run
//! through success and every failure path the test driver and a real sshd on loopback can
//! produce; nothing they leave behind contains the password or any line of the key: logs at
//! TRACE level, events, `Debug` of the job and of the stage's error, the domain XML, rejection
//! messages, `hatchery validate`'s output, and files on the "guest" (this machine).
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use common::capture::{Collect, init_logs, logs};
use common::jobs;
use common::secret_user::{self, SECRET_USER};
use common::sshd::{self, KEY_USER, KeyPair, Sshd};
use common::testdriver::TestHost;
use hatchery::events::Publisher;
use hatchery::hypervisor::Op;
use hatchery::job::{self, AddressSource, Job, Limits, RejectedJob};
use hatchery::pipeline::{self, Outcome, Pipeline};
use hatchery::retry::RetryPolicy;
use hatchery::settings::Settings;
use hatchery::stages::finish::Finish;
use hatchery::stages::{JobRun, Stage};

/// The secrets every test hands out, the same for the whole process.
struct Secrets {
    /// [`SECRET_USER`]'s real password.
    password: &'static str,
    /// A password sshd rejects, just as recognisable.
    wrong_password: String,
    /// An ed25519 key sshd accepts once a test authorises it.
    key: KeyPair,
}

fn secrets() -> &'static Secrets {
    static SECRETS: OnceLock<Secrets> = OnceLock::new();
    SECRETS.get_or_init(|| Secrets {
        password: secret_user::password(),
        wrong_password: format!("S3cr3t-pw-{}", Uuid::new_v4()),
        key: sshd::generate_key("ed25519", ""),
    })
}

impl Secrets {
    /// What must appear nowhere: both passwords and every line of the key's body.
    fn needles(&self) -> Vec<&str> {
        let body = self.key.private.lines();
        let body = body.filter(|l| !l.starts_with("-----") && !l.trim().is_empty());
        [self.password, self.wrong_password.as_str()]
            .into_iter()
            .chain(body)
            .collect()
    }
}

fn assert_nothing_leaked(what: &str, text: &str) {
    for (i, needle) in secrets().needles().into_iter().enumerate() {
        if let Some(at) = text.find(needle) {
            let before = &text[text.floor_char_boundary(at.saturating_sub(200))..at];
            panic!("{what}: secret #{i} appears after:\n{before}");
        }
    }
}

fn pipeline() -> Pipeline {
    let settings = Settings {
        allow_test_driver: true,
        retry: RetryPolicy {
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            max_attempts: 3,
            max_elapsed: Duration::from_secs(10),
        },
        ..Settings::default()
    };
    Pipeline::new(settings, Publisher::new("secrets-test"))
}

/// A job on `host` whose finish step logs in at `addr`, and keeps the VM when it fails so
/// that its domain XML can be read.
fn job_doc(host: &TestHost, name: &str, addr: SocketAddr, finish: Value) -> Value {
    let mut doc = jobs::provision(&host.uri, name);
    doc["provision"]["address"] =
        json!({ "source": "static", "ip": "127.0.0.1", "port": addr.port() });
    doc["provision"]["finish"] = finish;
    doc["provision"]["timeouts"]["finish_secs"] = json!(20);
    doc["provision"]["on_failure"] = json!("keep");
    doc
}

fn password_finish(password: &str, script: &str) -> Value {
    json!({ "user": SECRET_USER, "password": password, "script": script, "sudo": true })
}

fn key_finish(script: &str) -> Value {
    json!({ "user": KEY_USER, "private_key": secrets().key.private, "script": script, "sudo": true })
}

/// How one job ended, and the final event's data.
struct Ran {
    outcome: Outcome,
    result: Value,
    /// The finish output kept in the domain's record, decoded.
    recorded: String,
}

/// Runs `doc` through the pipeline, then its finish stage once more on its own (under another
/// job id) to hold the stage's error, and searches everything both left behind.
async fn run(doc: &Value) -> Ran {
    init_logs();
    let job = jobs::parse(doc);
    let mut trail = format!("{job:?}\n");
    let p = pipeline();

    let sink = Collect::default();
    let outcome = p.run(job.clone(), 1, CancellationToken::new(), &sink).await;
    let events = sink.events();
    trail += &format!("{}\n{events:?}\n", serde_json::to_string(&events).unwrap());

    // With `on_failure: keep` the domain outlives failures too.
    let xml = domain_xml(&p, &job.hypervisor, job.vm_name()).await;
    let xml = xml.unwrap_or_else(|| panic!("no domain `{}`", job.vm_name()));
    let recorded = recorded_output(&xml);
    trail += &recorded;
    trail += &xml;

    let again = Job {
        id: Uuid::new_v4(),
        ..job.clone()
    };
    let stage = finish_stage(&p, again.clone()).await;
    if let Err(error) = &stage {
        trail += &format!("{error:?}\n{error}\n{}\n", pipeline::chain(error));
    }

    for id in [job.id, again.id] {
        trail += &guest_leftovers(id);
    }
    trail += &logs();
    assert!(
        trail.contains(&format!("job_id={}", job.id)),
        "the log capture missed the job"
    );
    assert_nothing_leaked("after the job", &trail);

    Ran {
        outcome,
        result: sink.result(),
        recorded,
    }
}

/// The finish output the domain's record keeps, decoded: it is stored hex-encoded, where a
/// plain search would miss a secret.
fn recorded_output(xml: &str) -> String {
    let mut decoded = String::new();
    for tag in ["stdout", "stderr"] {
        let (open, close) = (format!("<hatchery:{tag}>"), format!("</hatchery:{tag}>"));
        for piece in xml.split(&open).skip(1) {
            let hex_text = piece.split(&close).next().unwrap_or_default();
            let bytes = hex::decode(hex_text.trim()).expect("the record's output is hex");
            decoded += &String::from_utf8_lossy(&bytes);
            decoded.push('\n');
        }
    }
    decoded
}

async fn domain_xml(p: &Pipeline, uri: &str, name: &str) -> Option<String> {
    let (hv, n) = (p.hypervisors.get(uri), name.to_owned());
    let op = Op::ReadDomain { name: name.into() };
    let xml = hv.call(op, move |c| c.lookup_domain_by_name(&n)?.xml_desc(0));
    xml.await.ok()
}

/// The finish stage alone, at the job's static address.
async fn finish_stage(p: &Pipeline, job: Job) -> Result<(), hatchery::stages::StageError> {
    let hv = p.hypervisors.get(&job.hypervisor);
    let mut cx = JobRun::new(Arc::new(job), hv, Arc::clone(&p.settings), 1);
    let AddressSource::Static { ip, port } = cx.spec().address else {
        panic!("these jobs give their address");
    };
    cx.facts.address = Some(SocketAddr::new(ip, port));
    cx.deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    Finish::run(&mut cx).await
}

/// Asserts the job's directory is gone from the guest, and returns (then removes) the exit
/// code file the finish protocol leaves instead.
fn guest_leftovers(id: Uuid) -> String {
    let dir = PathBuf::from(format!("/var/tmp/hatchery-{id}"));
    assert!(!dir.exists(), "{} left on the guest", dir.display());
    let tombstone = dir.with_extension("exit");
    let text = std::fs::read_to_string(&tombstone).unwrap_or_default();
    let _ = std::fs::remove_file(tombstone);
    text
}

fn closed_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test]
async fn a_password_login_with_sudo_leaks_nothing() {
    let (host, sshd) = (TestHost::new(), Sshd::start());
    let finish = password_finish(secrets().password, "id -u");
    let ran = run(&job_doc(&host, "pw-ok", sshd.addr(), finish)).await;

    assert_eq!(ran.outcome, Outcome::Succeeded, "{}", ran.result);
    assert_eq!(
        ran.result["finish"]["stdout_tail"], "0\n",
        "ran through sudo"
    );
    // The capture sees the blocking threads that SSH runs on, too.
    assert!(logs().contains("ssh session authenticated"));
}

#[tokio::test]
async fn a_key_login_leaks_nothing() {
    let (host, sshd) = (TestHost::new(), Sshd::start());
    sshd.authorize(&secrets().key.public);
    let ran = run(&job_doc(&host, "key-ok", sshd.addr(), key_finish("id -u"))).await;

    assert_eq!(ran.outcome, Outcome::Succeeded, "{}", ran.result);
    assert_eq!(ran.result["finish"]["stdout_tail"], "0\n");
}

#[tokio::test]
async fn a_rejected_password_leaks_nothing() {
    let (host, sshd) = (TestHost::new(), Sshd::start());
    let finish = password_finish(&secrets().wrong_password, "true");
    let ran = run(&job_doc(&host, "pw-wrong", sshd.addr(), finish)).await;

    assert_eq!(ran.outcome, Outcome::Failed);
    assert_eq!(ran.result["failure"]["class"], "ssh_auth", "{}", ran.result);
}

#[tokio::test]
async fn a_wrong_host_key_is_refused_before_the_password_is_sent() {
    let (host, sshd) = (TestHost::new(), Sshd::start());
    let mut finish = password_finish(secrets().password, "true");
    finish["host_key"] = json!(sshd::fingerprint_of_new_key());
    let ran = run(&job_doc(&host, "pinned", sshd.addr(), finish)).await;

    assert_eq!(ran.outcome, Outcome::Failed);
    assert_eq!(
        ran.result["failure"]["class"], "host_key_mismatch",
        "{}",
        ran.result
    );
    // sshd names the user only once a login is attempted.
    assert!(!sshd.log().contains(SECRET_USER), "{}", sshd.log());
}

#[tokio::test]
async fn a_failing_script_leaks_nothing() {
    let (host, sshd) = (TestHost::new(), Sshd::start());
    let finish = password_finish(secrets().password, "echo failing >&2; exit 3");
    let ran = run(&job_doc(&host, "exit-3", sshd.addr(), finish)).await;

    assert_eq!(ran.outcome, Outcome::Failed);
    assert_eq!(
        ran.result["failure"]["class"], "script_failed",
        "{}",
        ran.result
    );
    assert_eq!(ran.result["finish"]["exit_code"], 3);
}

#[tokio::test]
async fn a_script_timeout_leaks_nothing() {
    let (host, sshd) = (TestHost::new(), Sshd::start());
    let mut finish = password_finish(secrets().password, "sleep 60");
    finish["timeout_secs"] = json!(1);
    let ran = run(&job_doc(&host, "slow", sshd.addr(), finish)).await;

    assert_eq!(ran.outcome, Outcome::Failed);
    assert_eq!(
        ran.result["failure"]["class"], "script_timeout",
        "{}",
        ran.result
    );
}

#[tokio::test]
async fn an_sshd_that_never_answers_leaks_nothing() {
    let host = TestHost::new();
    let finish = password_finish(secrets().password, "true");
    let mut doc = job_doc(&host, "closed", closed_port(), finish);
    doc["provision"]["timeouts"]["finish_secs"] = json!(1);
    let ran = run(&doc).await;

    assert_eq!(ran.outcome, Outcome::Failed);
    assert_eq!(
        ran.result["failure"]["class"], "ssh_unavailable",
        "{}",
        ran.result
    );
}

#[tokio::test]
async fn a_script_printing_the_password_is_redacted() {
    let (host, sshd) = (TestHost::new(), Sshd::start());
    // Assembled on the guest, so that the job itself never holds the whole password.
    let (head, tail) = secrets().password.split_at(5);
    let script = format!("printf '%s%s\\n' '{head}' '{tail}'; printf '%s%s' '{head}' '{tail}' >&2");
    let ran = run(&job_doc(
        &host,
        "echo-pw",
        sshd.addr(),
        password_finish(secrets().password, &script),
    ))
    .await;

    assert_eq!(ran.outcome, Outcome::Succeeded, "{}", ran.result);
    assert_eq!(ran.result["finish"]["stdout_tail"], "[redacted]\n");
    assert_eq!(ran.result["finish"]["stderr_tail"], "[redacted]");
    assert_eq!(
        ran.recorded, "[redacted]\n\n[redacted]\n",
        "the domain's record"
    );
}

#[tokio::test]
async fn a_script_printing_the_private_key_is_redacted() {
    let (host, sshd) = (TestHost::new(), Sshd::start());
    sshd.authorize(&secrets().key.public);
    // A copy the login user can read, as a guest might keep one.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = dir.path().join("key");
    std::fs::write(&copy, &secrets().key.private).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).unwrap();

    let script = format!("cat {}", copy.display());
    let ran = run(&job_doc(
        &host,
        "echo-key",
        sshd.addr(),
        key_finish(&script),
    ))
    .await;

    assert_eq!(ran.outcome, Outcome::Succeeded, "{}", ran.result);
    assert_eq!(ran.result["finish"]["stdout_tail"], "[redacted]");
}

/// Valid jobs broken in ways that leave a password inside.
fn rejected_docs() -> Vec<(&'static str, Vec<u8>)> {
    let host = TestHost::new();
    let password = secrets().password;
    let base = || {
        job_doc(
            &host,
            "rejected",
            closed_port(),
            password_finish(password, "true"),
        )
    };
    let mut cases = Vec::new();
    let mut case = |what, edit: &dyn Fn(&mut Value)| {
        let mut doc = base();
        edit(&mut doc);
        cases.push((what, serde_json::to_vec(&doc).unwrap()));
    };

    case("bad name", &|d| {
        d["provision"]["vm"]["name"] = json!("x'/><evil/>")
    });
    case("two credentials", &|d| {
        d["provision"]["finish"]["private_key"] = json!(password)
    });
    case("password as the user", &|d| {
        d["provision"]["finish"]["user"] = json!(password)
    });
    case("misspelt field", &|d| {
        d["provision"]["finish"]["passwd"] = json!(password);
        d["provision"]["finish"]
            .as_object_mut()
            .unwrap()
            .remove("password");
    });
    case("password as an address", &|d| {
        d["provision"]["address"]["ip"] = json!(password)
    });
    case("password in the URI", &|d| {
        d["hypervisor"] = json!(format!("qemu+ssh://root:{password}@kvm-1/system"));
    });
    case("password as the script timeout", &|d| {
        d["provision"]["finish"]["timeout_secs"] = json!(password);
    });
    case("empty script", &|d| {
        d["provision"]["finish"]["script"] = json!("")
    });

    let valid = serde_json::to_vec(&base()).unwrap();
    let at = valid
        .windows(password.len())
        .position(|w| w == password.as_bytes())
        .unwrap();
    let mut not_utf8 = valid.clone();
    not_utf8.splice(at + 4..at + 4, [0xff, 0xfe]);
    cases.push(("bytes that are not UTF-8", not_utf8));
    let mut cut = valid.clone();
    cut.truncate(at + password.len() + 1);
    cases.push(("cut short after the password", cut));
    let mut padded = valid;
    padded.extend(std::iter::repeat_n(b' ', Limits::default().message_bytes));
    cases.push(("too large", padded));
    cases
}

#[test]
fn jobs_rejected_at_parse_never_echo_the_password() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    for (what, bytes) in rejected_docs() {
        let rejected = job::parse(&bytes, &Limits::default()).unwrap_err();
        let shown = format!("{rejected}\n{rejected:?}\n{:?}", rejected.problems());
        assert_nothing_leaked(what, &shown);
        if let RejectedJob::Invalid(problems) = &rejected {
            assert!(!problems.is_empty(), "{what}");
        }

        let path = dir.path().join("job.json");
        std::fs::write(&path, &bytes).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_hatchery"))
            .arg("validate")
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{what}: validate accepted it");
        let printed = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        assert_nothing_leaked(what, &printed);
    }
    assert_nothing_leaked("logs", &logs());
}
