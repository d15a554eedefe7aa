//! The finish script's protocol against a real OpenSSH server on loopback: exit codes, output
//! tails, timeouts, cancellation, resuming, sudo and busybox guests. Logins are `ssh_login.rs`.
//!
//! The "guest" is this machine: sshd runs locally, so the tests can look at the job directory
//! under /var/tmp and at the script's processes directly.
// Helpers outside `#[test]` functions unwrap too: a panic there is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::time::{Duration, Instant};

use hatchery::guest::{self, SshError, run_finish};
use tokio_util::sync::CancellationToken;

use common::run_finish::{TIMEOUT, read, run, script};
use common::sshd::{BUSYBOX_USER, GuestJob as Job, KEY_USER, Mode, PASSWORD};
use common::sshd::{PASSWORD_USER, Sshd, is_dead};
use common::wait_until;

#[test]
fn non_zero_exit_is_an_outcome_with_output() {
    let sshd = Sshd::start();
    let job = Job::new();
    let target = sshd.key_target("root", "ed25519", "");

    let body = "echo partial; echo 'puppet failed' >&2; exit 3";
    let outcome = run(&target, &script(&job, body)).unwrap();

    assert_eq!(outcome.exit_code, 3);
    assert_eq!(outcome.stdout_tail, "partial\n");
    assert_eq!(outcome.stderr_tail, "puppet failed\n");
    assert!(!job.dir().exists());
}

#[test]
fn shebang_line_picks_the_interpreter() {
    let sshd = Sshd::start();
    let job = Job::new();
    let target = sshd.key_target("root", "ed25519", "");

    let body = "#!/bin/sh -eu\necho \"$0\"\nfalse\necho unreachable\n";
    let outcome = run(&target, &script(&job, body)).unwrap();

    assert_eq!(outcome.exit_code, 1, "-e from the #! line was ignored");
    assert!(
        outcome.stdout_tail.ends_with("/script\n"),
        "{:?}",
        outcome.stdout_tail
    );
}

#[test]
fn long_output_keeps_only_the_tail() {
    let sshd = Sshd::start();
    let job = Job::new();
    let target = sshd.key_target("root", "ed25519", "");
    let mut finish = script(&job, "seq 1 100000; echo last line; echo short >&2");
    finish.tail_bytes = 1000;

    let outcome = run(&target, &finish).unwrap();

    assert!(outcome.stdout_truncated);
    assert_eq!(outcome.stdout_tail.len(), 1000);
    assert!(outcome.stdout_tail.ends_with("99999\n100000\nlast line\n"));
    assert!(!outcome.stderr_truncated);
    assert_eq!(outcome.stderr_tail, "short\n");
}

#[test]
fn timeout_kills_the_script_and_its_children() {
    let sshd = Sshd::start();
    let job = Job::new();
    let target = sshd.key_target("root", "ed25519", "");
    let pid_file = job.scratch("sleep.pid");
    let body = format!("sleep 600 &\necho $! > {}\nwait\n", pid_file.display());
    let mut finish = script(&job, &body);
    finish.timeout = Duration::from_secs(1);

    let error = run(&target, &finish).unwrap_err();

    assert!(
        matches!(error, SshError::ScriptTimedOut { .. }),
        "{error:?}"
    );
    assert!(!error.is_transient());
    let pid = read(&pid_file);
    assert!(!pid.is_empty(), "the script never started");
    assert!(
        wait_until(Duration::from_secs(10), || is_dead(&pid)),
        "sleep {pid} survived"
    );
    assert!(!job.dir().exists());
}

#[test]
fn cancellation_kills_a_running_script() {
    let sshd = Sshd::start();
    let job = Job::new();
    let target = sshd.key_target("root", "ed25519", "");
    let pid_file = job.scratch("sleep.pid");
    let body = format!("sleep 600 &\necho $! > {}\nwait\n", pid_file.display());
    let finish = script(&job, &body);
    let cancel = CancellationToken::new();

    let canceller = {
        let cancel = cancel.clone();
        let pid_file = pid_file.clone();
        std::thread::spawn(move || {
            wait_until(TIMEOUT, || !read(&pid_file).is_empty());
            cancel.cancel();
        })
    };
    let error = run_finish(&target, &finish, &cancel).unwrap_err();
    canceller.join().unwrap();

    assert!(matches!(error, SshError::Cancelled), "{error:?}");
    let pid = read(&pid_file);
    assert!(
        wait_until(Duration::from_secs(10), || is_dead(&pid)),
        "sleep {pid} survived"
    );
    assert!(!job.dir().exists());
}

#[test]
fn interrupted_run_is_resumed_and_the_script_runs_once() {
    let sshd = Sshd::start();
    let job = Job::new();
    let target = sshd.key_target("root", "ed25519", "");
    let counter = job.scratch("runs");
    let body = format!(
        "echo run >> {}\nsleep 1\necho done\nexit 7\n",
        counter.display()
    );
    let finish = script(&job, &body);

    // A worker that started the script and died: the next attempt must only collect it.
    guest::launch_finish(&target, &finish, &CancellationToken::new()).unwrap();
    let first = run(&target, &finish).unwrap();

    assert!(first.resumed);
    assert_eq!((first.exit_code, first.stdout_tail.as_str()), (7, "done\n"));
    assert_eq!(read(&counter), "run\n");
    assert!(!job.dir().exists());

    // Redelivered once more after collection: the tombstone still answers, nothing runs.
    let second = run(&target, &finish).unwrap();

    assert!(second.resumed);
    assert_eq!(second.exit_code, 7);
    assert_eq!(second.stdout_tail, "");
    assert_eq!(read(&counter), "run\n");
}

#[test]
fn interrupted_upload_is_started_afresh() {
    let sshd = Sshd::start();
    let job = Job::new();
    let target = sshd.key_target("root", "ed25519", "");
    // What an upload cut short leaves: the directory and part of the script.
    fs::create_dir(job.dir()).unwrap();
    fs::write(job.dir().join("script.tmp"), "echo half").unwrap();

    let outcome = run(&target, &script(&job, "echo whole")).unwrap();

    assert!(!outcome.resumed);
    assert_eq!(outcome.stdout_tail, "whole\n");
}

#[test]
fn script_that_died_without_status_is_reported_lost() {
    let sshd = Sshd::start();
    let job = Job::new();
    let target = sshd.key_target("root", "ed25519", "");
    // What a guest reboot mid-run leaves: started, a pid that is gone, no exit file.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    fs::create_dir_all(job.dir().join("started")).unwrap();
    fs::write(job.dir().join("script"), "echo never").unwrap();
    fs::write(job.dir().join("pid"), format!("{}\n", gone.id())).unwrap();

    let error = run(&target, &script(&job, "echo never")).unwrap_err();

    assert!(matches!(error, SshError::ScriptLost), "{error:?}");
    assert!(!error.is_transient());
}

#[test]
fn sudo_with_password_runs_as_root() {
    let sshd = Sshd::start();
    let job = Job::new();
    // The script, as root, looks for the password where it must not be: in the job
    // directory, in any process's arguments, in its own environment, and on its stdin (`cat`).
    let needle = job.scratch("needle");
    fs::write(&needle, PASSWORD).unwrap();
    let body = format!(
        "id -u\n\
         grep -rlF -f {needle} /var/tmp/hatchery-$HATCHERY_JOB_ID && echo on-disk\n\
         cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\000' ' ' | grep -qF -f {needle} && echo in-args\n\
         tr '\\000' '\\n' </proc/$$/environ | grep -qF -f {needle} && echo in-env\n\
         cat\n\
         exit 0\n",
        needle = needle.display()
    );
    let mut finish = script(&job, &body);
    finish.sudo = true;

    let outcome = run(&sshd.password_target(PASSWORD), &finish).unwrap();

    assert_eq!(outcome.exit_code, 0);
    assert_eq!(
        outcome.stdout_tail, "0\n",
        "the password showed up on the guest"
    );
}

#[test]
fn sudo_with_key_runs_as_root_without_prompting() {
    let sshd = Sshd::start();
    let job = Job::new();
    let mut finish = script(&job, "id -u");
    finish.sudo = true;

    let outcome = run(&sshd.key_target(KEY_USER, "ed25519", ""), &finish).unwrap();

    assert_eq!(
        (outcome.exit_code, outcome.stdout_tail.as_str()),
        (0, "0\n")
    );
}

#[test]
fn refused_sudo_runs_nothing_and_leaves_nothing_behind() {
    let sshd = Sshd::start();
    let job = Job::new();
    // A key login whose sudo rule wants a password: `sudo -n` must refuse, not prompt.
    let target = sshd.key_target(PASSWORD_USER, "ed25519", "");
    let marker = job.scratch("ran");
    let body = format!("touch {}", marker.display());
    let mut finish = script(&job, &body);
    finish.sudo = true;

    let error = run(&target, &finish).unwrap_err();

    match &error {
        SshError::CommandFailed { step, stderr, .. } => {
            assert_eq!(*step, guest::Step::Start);
            assert!(stderr.contains("password"), "{stderr}");
        }
        other => panic!("expected the start to fail, got {other:?}"),
    }
    assert!(!error.is_transient());
    assert!(!marker.exists(), "the script ran without sudo");
    assert!(
        !job.dir().exists(),
        "the uploaded script was left on the guest"
    );
}

#[test]
fn concurrent_attempts_run_the_script_once() {
    let sshd = Sshd::start();
    let job = Job::new();
    let target = sshd.key_target("root", "ed25519", "");
    let counter = job.scratch("runs");
    let body = format!(
        "echo run >> {}\nsleep 1\necho done\nexit 6\n",
        counter.display()
    );
    let finish = script(&job, &body);

    // Two workers holding the same job, as after a redelivery to a second worker while the
    // first still runs.
    let outcomes = std::thread::scope(|scope| {
        let attempts = [(); 2].map(|()| scope.spawn(|| run(&target, &finish)));
        attempts.map(|attempt| attempt.join().unwrap().unwrap())
    });

    assert_eq!(read(&counter), "run\n");
    assert!(
        outcomes.iter().all(|outcome| outcome.exit_code == 6),
        "{outcomes:?}"
    );
    assert!(outcomes.iter().filter(|outcome| !outcome.resumed).count() <= 1);
    assert!(!job.dir().exists());
}

#[test]
fn busybox_guest_runs_resumes_and_collects() {
    let sshd = Sshd::start_with(Mode::Busybox);
    let job = Job::new();
    let target = sshd.key_target(BUSYBOX_USER, "ed25519", "");
    let counter = job.scratch("runs");
    let body = format!(
        "echo run >> {}\nsleep 1\nreadlink /proc/$$/exe\nexit 4\n",
        counter.display()
    );
    let finish = script(&job, &body);

    guest::launch_finish(&target, &finish, &CancellationToken::new()).unwrap();
    let outcome = run(&target, &finish).unwrap();

    assert!(outcome.resumed);
    assert_eq!(outcome.exit_code, 4);
    assert_eq!(
        outcome.stdout_tail, "/usr/bin/busybox\n",
        "not run by busybox sh"
    );
    assert_eq!(read(&counter), "run\n");
    assert!(!job.dir().exists());
}

#[test]
fn busybox_guest_timeout_kills_the_script_and_its_children() {
    let sshd = Sshd::start_with(Mode::Busybox);
    let job = Job::new();
    let target = sshd.key_target(BUSYBOX_USER, "ed25519", "");
    let pid_file = job.scratch("sleep.pid");
    let body = format!("sleep 600 &\necho $! > {}\nwait\n", pid_file.display());
    let mut finish = script(&job, &body);
    finish.timeout = Duration::from_secs(1);

    let error = run(&target, &finish).unwrap_err();

    assert!(
        matches!(error, SshError::ScriptTimedOut { .. }),
        "{error:?}"
    );
    let pid = read(&pid_file);
    assert!(!pid.is_empty(), "the script never started");
    assert!(
        wait_until(Duration::from_secs(10), || is_dead(&pid)),
        "sleep {pid} survived"
    );
    assert!(!job.dir().exists());
}

#[test]
fn wait_for_sshd_sees_the_banner() {
    let sshd = Sshd::start();
    let deadline = Instant::now() + TIMEOUT;

    guest::wait_for_sshd(sshd.addr(), deadline, &CancellationToken::new()).unwrap();
}
