//! The finish protocol: upload, start detached, wait, collect, clean up, at most once per job.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::error::Step;
use super::remote::{self, JobDir, JobState, Privilege, Stream};
use super::session::GuestSession;
use super::wait::pause;
use super::{FinishOutcome, FinishScript, SshAuth, SshError, SshTarget};

/// First pause between polls of a running script, and the longest one: short scripts
/// report quickly, an hour-long Puppet run does not open a channel five times a second.
const FIRST_POLL: Duration = Duration::from_millis(200);
const MAX_POLL: Duration = Duration::from_secs(2);
/// Probe and size answers are one short line.
const STATUS_LIMIT: usize = 256;

pub(super) fn run(
    target: &SshTarget,
    script: &FinishScript,
    cancel: &CancellationToken,
) -> Result<FinishOutcome, SshError> {
    let dir = JobDir::new(script.job_id);
    let guest = connect(target, cancel)?;
    let probe = probe(&guest, &dir)?;
    let privilege = privilege(target, script, probe.uid);
    tracing::debug!(job_id = %script.job_id, dir = dir.path(), state = ?probe.state, "finish directory probed");

    // Start only what no earlier attempt started; anything else is resumed.
    let resumed = match probe.state {
        JobState::Absent | JobState::Unstarted => {
            start(&guest, &dir, target, script, privilege, cancel)?;
            false
        }
        JobState::Starting | JobState::Running | JobState::Finished(_) => true,
        JobState::Collected(exit_code) => {
            return Ok(collected_earlier(&guest, exit_code));
        }
        JobState::Lost => {
            discard(&guest, &dir, script);
            return Err(SshError::ScriptLost);
        }
    };

    let exit_code = wait(&guest, &dir, target, script, privilege, cancel)?;
    let outcome = collect(&guest, &dir, script, exit_code, resumed)?;

    // The result is in hand: a failed cleanup is worth a warning, not the job.
    if let Err(error) = guest.exec_ok(Step::Cleanup, &dir.retire(), &[], STATUS_LIMIT) {
        tracing::warn!(job_id = %script.job_id, error = %error, "finish directory left on guest");
    }
    tracing::debug!(job_id = %script.job_id, exit_code, resumed, "finish script collected");
    Ok(outcome)
}

pub(super) fn launch(
    target: &SshTarget,
    script: &FinishScript,
    cancel: &CancellationToken,
) -> Result<(), SshError> {
    let dir = JobDir::new(script.job_id);
    let guest = connect(target, cancel)?;
    let probe = probe(&guest, &dir)?;
    if matches!(probe.state, JobState::Absent | JobState::Unstarted) {
        let privilege = privilege(target, script, probe.uid);
        start(&guest, &dir, target, script, privilege, cancel)?;
    }
    Ok(())
}

fn connect(target: &SshTarget, cancel: &CancellationToken) -> Result<GuestSession, SshError> {
    if cancel.is_cancelled() {
        return Err(SshError::Cancelled);
    }
    GuestSession::open(target)
}

fn probe(guest: &GuestSession, dir: &JobDir) -> Result<remote::Probe, SshError> {
    let stdout = guest.exec_ok(Step::Probe, &dir.probe(), &[], STATUS_LIMIT)?;
    let output = String::from_utf8_lossy(&stdout);
    remote::parse_probe(&output).ok_or_else(|| SshError::MalformedStatus {
        step: Step::Probe,
        output: output.into_owned(),
    })
}

/// Root needs no sudo; otherwise sudo's way of getting a password follows the login's.
fn privilege(target: &SshTarget, script: &FinishScript, uid: u32) -> Privilege {
    match (&target.auth, script.sudo && uid != 0) {
        (_, false) => Privilege::AsLoginUser,
        (SshAuth::Password(_), true) => Privilege::SudoPassword,
        (SshAuth::PrivateKey { .. }, true) => Privilege::SudoNoPassword,
    }
}

/// What `sudo -S` reads before running the command; nothing otherwise. The password only
/// travels inside the encrypted channel and is never written to the guest's disk.
fn sudo_stdin(target: &SshTarget, privilege: Privilege) -> Vec<u8> {
    match (&target.auth, privilege) {
        (SshAuth::Password(password), Privilege::SudoPassword) => {
            format!("{}\n", password.expose()).into_bytes()
        }
        _ => Vec::new(),
    }
}

fn start(
    guest: &GuestSession,
    dir: &JobDir,
    target: &SshTarget,
    script: &FinishScript,
    privilege: Privilege,
    cancel: &CancellationToken,
) -> Result<(), SshError> {
    // Upload as the login user (the directory is theirs), and re-upload an unstarted one: the
    // earlier upload may have been cut short.
    let body = script.body.as_bytes();
    guest.exec_ok(Step::Upload, &dir.upload(body.len()), body, STATUS_LIMIT)?;

    // Last point where giving up leaves nothing running behind.
    if cancel.is_cancelled() {
        discard(guest, dir, script);
        return Err(SshError::Cancelled);
    }

    let command = privilege.wrap(&dir.start(&remote::interpreter(script.body)));
    guest.exec_ok(
        Step::Start,
        &command,
        &sudo_stdin(target, privilege),
        STATUS_LIMIT,
    )?;
    tracing::debug!(job_id = %script.job_id, ?privilege, "finish script started");
    Ok(())
}

/// Polls until the script records its exit status. Kills it on timeout and cancellation.
fn wait(
    guest: &GuestSession,
    dir: &JobDir,
    target: &SshTarget,
    script: &FinishScript,
    privilege: Privilege,
    cancel: &CancellationToken,
) -> Result<i32, SshError> {
    let deadline = Instant::now() + script.timeout;
    let mut interval = FIRST_POLL;
    loop {
        let state = probe(guest, dir)?.state;
        tracing::trace!(job_id = %script.job_id, ?state, "finish script polled");
        match state {
            JobState::Finished(exit_code) => return Ok(exit_code),
            JobState::Starting | JobState::Running => {}
            JobState::Lost => {
                discard(guest, dir, script);
                return Err(SshError::ScriptLost);
            }
            // Someone else removed or collected the directory under our feet.
            JobState::Absent | JobState::Unstarted | JobState::Collected(_) => {
                let output = format!("{state:?}");
                return Err(SshError::MalformedStatus {
                    step: Step::Probe,
                    output,
                });
            }
        }

        if Instant::now() >= deadline {
            stop(guest, dir, target, script, privilege);
            return Err(SshError::ScriptTimedOut {
                timeout: script.timeout,
            });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if !pause(interval.min(left), cancel) {
            stop(guest, dir, target, script, privilege);
            return Err(SshError::Cancelled);
        }
        interval = (interval * 3 / 2).min(MAX_POLL);
    }
}

/// Kills the script's process group and removes its directory. Best effort: the caller is
/// already reporting the reason for stopping, which matters more than a failed kill.
fn stop(
    guest: &GuestSession,
    dir: &JobDir,
    target: &SshTarget,
    script: &FinishScript,
    privilege: Privilege,
) {
    let command = privilege.wrap(&dir.kill());
    let stdin = sudo_stdin(target, privilege);
    if let Err(error) = guest.exec_ok(Step::Kill, &command, &stdin, STATUS_LIMIT) {
        tracing::warn!(job_id = %script.job_id, error = %error, "could not stop finish script");
    }
    discard(guest, dir, script);
}

/// Removes the job directory, logging rather than failing.
fn discard(guest: &GuestSession, dir: &JobDir, script: &FinishScript) {
    if let Err(error) = guest.exec_ok(Step::Cleanup, &dir.discard(), &[], STATUS_LIMIT) {
        tracing::warn!(job_id = %script.job_id, error = %error, "finish directory left on guest");
    }
}

fn collect(
    guest: &GuestSession,
    dir: &JobDir,
    script: &FinishScript,
    exit_code: i32,
    resumed: bool,
) -> Result<FinishOutcome, SshError> {
    let sizes = guest.exec_ok(Step::Collect, &dir.sizes(), &[], STATUS_LIMIT)?;
    let sizes = String::from_utf8_lossy(&sizes);
    let (stdout_size, stderr_size) =
        remote::parse_sizes(&sizes).ok_or_else(|| SshError::MalformedStatus {
            step: Step::Collect,
            output: sizes.clone().into_owned(),
        })?;

    let limit = script.tail_bytes;
    let stdout = guest.exec_ok(Step::Collect, &dir.tail(Stream::Stdout, limit), &[], limit)?;
    let stderr = guest.exec_ok(Step::Collect, &dir.tail(Stream::Stderr, limit), &[], limit)?;
    let stdout_truncated = stdout_size > limit as u64;
    let stderr_truncated = stderr_size > limit as u64;

    Ok(FinishOutcome {
        exit_code,
        stdout_tail: decode_tail(&stdout, stdout_truncated),
        stderr_tail: decode_tail(&stderr, stderr_truncated),
        stdout_truncated,
        stderr_truncated,
        host_key_fingerprint: guest.fingerprint().to_owned(),
        resumed,
    })
}

/// The outcome when only the tombstone is left: the status, but no output to show.
fn collected_earlier(guest: &GuestSession, exit_code: i32) -> FinishOutcome {
    FinishOutcome {
        exit_code,
        stdout_tail: String::new(),
        stderr_tail: String::new(),
        stdout_truncated: false,
        stderr_truncated: false,
        host_key_fingerprint: guest.fingerprint().to_owned(),
        resumed: true,
    }
}

/// Text of a captured tail. A cut tail may start inside a multi-byte character; drop those
/// continuation bytes rather than show a replacement character for them.
fn decode_tail(bytes: &[u8], truncated: bool) -> String {
    let skip = if truncated {
        bytes
            .iter()
            .take(3)
            .take_while(|&&b| b & 0xc0 == 0x80)
            .count()
    } else {
        0
    };
    String::from_utf8_lossy(&bytes[skip..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_tails_lose_partial_characters_only() {
        let text = "é ok".as_bytes();
        assert_eq!(decode_tail(&text[1..], true), " ok");
        assert_eq!(decode_tail(text, true), "é ok");
        assert_eq!(decode_tail(&text[1..], false), "\u{fffd} ok");
    }
}
