//! Guest access over SSH: wait for sshd, then run the finish script once per job.
//!
//! # Layout
//!
//! - `wait`: poll an address until an SSH banner answers.
//! - `session`: connect, check the host key, authenticate, run one remote command.
//! - `fingerprint`: OpenSSH-style `SHA256:` fingerprints of host keys.
//! - `remote`: the shell text hatchery runs on the guest and the parsing of its answers.
//! - `finish`: the finish protocol built from those commands (upload, start, wait, collect).
//!
//! Everything here blocks (libssh2 does); callers run it on `tokio::task::spawn_blocking`.
//!
//! # The finish protocol
//!
//! Each job owns the directory `/var/tmp/hatchery-<job_id>/` (mode 0700) on the guest. The script
//! is uploaded there and started detached from the SSH session, so a dropped connection or a
//! crashed worker does not stop it; it writes `stdout`, `stderr`, `pid` and finally `exit`. A
//! later attempt with the same job id finds the directory and waits for or collects the run it
//! left behind instead of starting a second one. After collection the directory is removed and
//! only `/var/tmp/hatchery-<job_id>.exit`, holding the exit code, stays behind: if the worker dies
//! before the caller records the result, the redelivered job still does not run the script again.
//! Creating `started/` in the directory is the claim to start the script, so two attempts
//! running at once (a redelivery while the first worker still lives) start it once, and the
//! one that loses the race reads the other's result.
//!
//! Only POSIX `sh` and busybox-level tools are assumed on the guest (`mkdir`, `cat`, `tail -c`,
//! `wc -c`, `tr`, `grep`, `kill`; `setsid` when present), so minimal dropbear+busybox images work.
//! Whether the script still runs is read from Linux's `/proc/<pid>/cmdline`.
//!
//! FIXME: on a guest that mounts `/proc` with `hidepid=`, a login user running the script
//! through sudo cannot see it, so a running script is reported as lost.

mod error;
mod fingerprint;
mod finish;
mod jump;
mod remote;
mod session;
mod wait;

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::secret::Secret;

pub use error::{RemoteExit, SshError, Step};
pub use fingerprint::host_key_fingerprint;
pub use jump::JumpHost;

/// Where and as whom to log in to a guest.
#[derive(Debug, Clone)]
pub struct SshTarget {
    pub addr: SocketAddr,
    pub user: String,
    pub auth: SshAuth,
    /// OpenSSH-style fingerprint `SHA256:<base64 without padding>` that the host key must match.
    pub pinned_host_key: Option<String>,
    /// Reach `addr` through this host (usually the hypervisor) instead of directly.
    pub jump: Option<JumpHost>,
}

/// How to prove who we are. Both variants keep their material in [`Secret`]s.
#[derive(Debug, Clone)]
pub enum SshAuth {
    /// Tried as `password`, or as `keyboard-interactive` when the server offers only that.
    Password(Secret),
    /// An OpenSSH (`-----BEGIN OPENSSH PRIVATE KEY-----`) or PEM private key, as text.
    PrivateKey {
        key: Secret,
        passphrase: Option<Secret>,
    },
}

/// The script a job runs on its guest, and how.
#[derive(Clone)]
pub struct FinishScript<'a> {
    /// Names the job's directory on the guest; the same id never runs the script twice.
    pub job_id: Uuid,
    /// Run with the interpreter of its `#!` line, or with `sh` when it has none.
    pub body: &'a str,
    /// How long to wait for the script, counted from when this call starts waiting. A resumed
    /// run therefore gets a fresh budget: the guest's clock is not trusted across boots.
    pub timeout: Duration,
    /// Run through `sudo` when the login user is not uid 0: `sudo -S` fed the login password
    /// over the channel for password logins, `sudo -n` for key logins.
    pub sudo: bool,
    /// The most bytes of stdout, and of stderr, kept; the last ones are kept.
    pub tail_bytes: usize,
}

/// Shows the body's size only: scripts often carry enrolment tokens or other secrets.
impl fmt::Debug for FinishScript<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FinishScript")
            .field("job_id", &self.job_id)
            .field("body_bytes", &self.body.len())
            .field("timeout", &self.timeout)
            .field("sudo", &self.sudo)
            .field("tail_bytes", &self.tail_bytes)
            .finish()
    }
}

/// What a finished script left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishOutcome {
    /// The script's exit status; `128 + n` when signal `n` ended it. Non-zero is not an error
    /// here: the caller decides what a failed script means for the job.
    pub exit_code: i32,
    pub stdout_tail: String,
    pub stderr_tail: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// The fingerprint of the host key this session saw, pinned or not.
    pub host_key_fingerprint: String,
    /// True when an earlier attempt had started (or finished) the script and this call only
    /// waited for and collected it.
    pub resumed: bool,
    /// An earlier attempt had already collected the script and removed its output from the
    /// guest: the tails are empty and only `exit_code` is known here.
    pub collected_earlier: bool,
}

/// Polls `addr` about every 100 ms until something there answers with an SSH banner.
///
/// Refused, reset and timed-out connections are the normal "not yet" answers while a guest
/// boots. Gives up with [`SshError::SshdNotReady`] at `deadline`, or [`SshError::Cancelled`].
pub fn wait_for_sshd(
    addr: SocketAddr,
    deadline: Instant,
    cancel: &CancellationToken,
) -> Result<(), SshError> {
    wait::until_banner(addr, None, deadline, cancel)
}

/// Like [`wait_for_sshd`], without holding a thread while it waits; direct connections only.
pub async fn wait_for_sshd_async(
    addr: SocketAddr,
    deadline: tokio::time::Instant,
    cancel: &CancellationToken,
) -> Result<(), SshError> {
    wait::until_banner_async(addr, deadline, cancel).await
}

/// Like [`wait_for_sshd`], probing through `jump` when one is given.
pub fn wait_for_sshd_via(
    addr: SocketAddr,
    jump: Option<&JumpHost>,
    deadline: Instant,
    cancel: &CancellationToken,
) -> Result<(), SshError> {
    wait::until_banner(addr, jump, deadline, cancel)
}

/// Logs in to the guest and runs `script` there at most once per job id, returning its result.
///
/// The host key is checked before any credential is sent. When an earlier attempt already
/// started or finished the same job, this waits for and collects that run (`resumed`). On
/// timeout or cancellation the script's process group is killed and its directory removed.
pub fn run_finish(
    target: &SshTarget,
    script: &FinishScript,
    cancel: &CancellationToken,
) -> Result<FinishOutcome, SshError> {
    finish::run(target, script, cancel, &mut |_| {})
}

/// Like [`run_finish`], handing the result to `keep` once it is collected and before the
/// output is removed from the guest, so the caller can store it where a later attempt finds
/// it (the guest itself keeps only the exit status).
pub fn run_finish_keeping(
    target: &SshTarget,
    script: &FinishScript,
    cancel: &CancellationToken,
    keep: &mut dyn FnMut(&FinishOutcome),
) -> Result<FinishOutcome, SshError> {
    finish::run(target, script, cancel, keep)
}

/// Uploads and starts `script` detached, then returns without waiting for it.
///
/// This is the first half of [`run_finish`], which picks the run up by job id. Useful to
/// hand a long script to the guest and collect it later, and in tests to stand in for a
/// worker that crashed right after starting the script. Starting an already started job
/// does nothing.
pub fn launch_finish(
    target: &SshTarget,
    script: &FinishScript,
    cancel: &CancellationToken,
) -> Result<(), SshError> {
    finish::launch(target, script, cancel)
}
