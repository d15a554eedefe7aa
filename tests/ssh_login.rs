//! Logging in to a real OpenSSH server on loopback before a finish script runs: passwords,
//! keyboard-interactive, ed25519, RSA and passphrase-protected keys, and pinned host keys.
#![allow(clippy::unwrap_used)]

mod common;

use hatchery::guest::SshError;

use common::run_finish::{read, run, script};
use common::sshd::{self, GuestJob as Job, Mode, PASSWORD, PASSWORD_USER, Sshd};

#[test]
fn password_login_runs_script_and_removes_its_directory() {
    let sshd = Sshd::start();
    let job = Job::new();
    let body = "echo out; echo err >&2; id -un; echo \"job $HATCHERY_JOB_ID\"";

    let outcome = run(&sshd.password_target(PASSWORD), &script(&job, body)).unwrap();

    assert_eq!(outcome.exit_code, 0);
    let expected = format!("out\n{PASSWORD_USER}\njob {}\n", job.id);
    assert_eq!(outcome.stdout_tail, expected);
    assert_eq!(outcome.stderr_tail, "err\n");
    assert!(!outcome.stdout_truncated && !outcome.stderr_truncated);
    assert!(!outcome.resumed);
    assert_eq!(outcome.host_key_fingerprint, sshd.host_key_fingerprint());
    assert!(!job.dir().exists(), "job directory left behind");
    assert_eq!(read(&job.tombstone()).trim(), "0");
}

#[test]
fn ed25519_key_login_runs_script_as_root() {
    let sshd = Sshd::start();
    let job = Job::new();
    let target = sshd.key_target("root", "ed25519", "");

    let outcome = run(&target, &script(&job, "id -u")).unwrap();

    assert_eq!(
        (outcome.exit_code, outcome.stdout_tail.as_str()),
        (0, "0\n")
    );
}

#[test]
fn rsa_key_login_runs_script() {
    let sshd = Sshd::start();
    let job = Job::new();
    let target = sshd.key_target("root", "rsa", "");

    let outcome = run(&target, &script(&job, "echo rsa")).unwrap();

    assert_eq!(
        (outcome.exit_code, outcome.stdout_tail.as_str()),
        (0, "rsa\n")
    );
}

#[test]
fn passphrase_protected_key_logs_in() {
    let sshd = Sshd::start();
    let job = Job::new();
    let target = sshd.key_target("root", "ed25519", "open sesame");

    let outcome = run(&target, &script(&job, "echo unlocked")).unwrap();

    assert_eq!(outcome.stdout_tail, "unlocked\n");
}

#[test]
fn wrong_password_is_rejected_without_showing_it() {
    let sshd = Sshd::start();
    let job = Job::new();
    let wrong = "not-the-password-4711";

    let error = run(&sshd.password_target(wrong), &script(&job, "true")).unwrap_err();

    assert!(matches!(error, SshError::Authenticate { .. }), "{error:?}");
    assert!(!error.is_transient());
    let mut text = format!("{error:?}");
    let mut cause: Option<&dyn std::error::Error> = Some(&error);
    while let Some(error) = cause {
        text.push_str(&error.to_string());
        cause = error.source();
    }
    assert!(!text.contains(wrong), "password leaked into {text}");
    assert!(!job.dir().exists());
}

#[test]
fn keyboard_interactive_only_server_accepts_the_password() {
    let sshd = Sshd::start_with(Mode::KeyboardInteractive);
    let job = Job::new();

    let outcome = run(&sshd.password_target(PASSWORD), &script(&job, "echo kbd"));

    let outcome = outcome.unwrap_or_else(|error| panic!("{error:?}\n{}", sshd.log()));
    assert_eq!(outcome.stdout_tail, "kbd\n");
    // sshd logs the accepted method before it runs any command for the session.
    assert!(
        sshd.log().contains("Accepted keyboard-interactive"),
        "{}",
        sshd.log()
    );
}

#[test]
fn password_for_a_key_only_server_is_refused_up_front() {
    let sshd = Sshd::start_with(Mode::KeyOnly);
    let job = Job::new();

    let error = run(&sshd.password_target(PASSWORD), &script(&job, "true")).unwrap_err();

    match &error {
        SshError::NoUsableAuthMethod { offered, .. } => assert_eq!(offered, "publickey"),
        other => panic!("expected no usable method, got {other:?}"),
    }
    assert!(!error.is_transient());
}

#[test]
fn matching_pinned_host_key_is_accepted() {
    let sshd = Sshd::start();
    let job = Job::new();
    let mut target = sshd.key_target("root", "ed25519", "");
    target.pinned_host_key = Some(sshd.host_key_fingerprint().to_owned());

    let outcome = run(&target, &script(&job, "true")).unwrap();

    assert_eq!(outcome.host_key_fingerprint, sshd.host_key_fingerprint());
}

#[test]
fn wrong_pinned_host_key_stops_before_anything_runs() {
    let sshd = Sshd::start();
    let job = Job::new();
    let mut target = sshd.key_target("root", "ed25519", "");
    let other = sshd::fingerprint_of_new_key();
    target.pinned_host_key = Some(other.clone());
    let marker = job.scratch("ran");
    let body = format!("touch {}", marker.display());

    let error = run(&target, &script(&job, &body)).unwrap_err();

    match &error {
        SshError::HostKeyMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, &other);
            assert_eq!(actual, sshd.host_key_fingerprint());
        }
        other => panic!("expected a host key mismatch, got {other:?}"),
    }
    assert!(!error.is_transient());
    assert!(
        !marker.exists(),
        "the script ran despite the wrong host key"
    );
    assert!(
        !job.dir().exists() && !job.tombstone().exists(),
        "something was uploaded"
    );
}
