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
    keep: &mut dyn FnMut(&FinishOutcome),
) -> Result<FinishOutcome, SshError> {
    let (job, state) = Job::open(target, script, cancel)?;

    // Start only what no earlier attempt started; anything else is resumed.
    let start = match state {
        JobState::Absent | JobState::Unstarted => true,
        JobState::Starting | JobState::Running | JobState::Finished(_) => false,
        JobState::Collected(exit_code) => return Ok(job.collected_elsewhere(exit_code)),
        JobState::Lost => {
            job.discard();
            return Err(SshError::ScriptLost);
        }
    };
    match job.drive(start, keep) {
        Ok(outcome) => Ok(outcome),
        // A concurrent attempt at the same job may have collected and removed the directory
        // under us; its tombstone then holds the answer.
        Err(error) if may_have_lost_a_race(&error) => match job.probe().map(|p| p.state) {
            Ok(JobState::Collected(exit_code)) => Ok(job.collected_elsewhere(exit_code)),
            _ => Err(error),
        },
        Err(error) => Err(error),
    }
}

pub(super) fn launch(
    target: &SshTarget,
    script: &FinishScript,
    cancel: &CancellationToken,
) -> Result<(), SshError> {
    let (job, state) = Job::open(target, script, cancel)?;
    if matches!(state, JobState::Absent | JobState::Unstarted) {
        job.start()?;
    }
    Ok(())
}

/// One attempt at one job's script over one session.
struct Job<'a> {
    guest: GuestSession,
    dir: JobDir,
    target: &'a SshTarget,
    script: &'a FinishScript<'a>,
    privilege: Privilege,
    cancel: &'a CancellationToken,
}

impl<'a> Job<'a> {
    /// Logs in and reads the job's state on the guest.
    fn open(
        target: &'a SshTarget,
        script: &'a FinishScript<'a>,
        cancel: &'a CancellationToken,
    ) -> Result<(Self, JobState), SshError> {
        if cancel.is_cancelled() {
            return Err(SshError::Cancelled);
        }
        let guest = GuestSession::open(target)?;
        let dir = JobDir::new(script.job_id);
        let privilege = Privilege::AsLoginUser;
        let mut job = Self {
            guest,
            dir,
            target,
            script,
            privilege,
            cancel,
        };

        let probe = job.probe()?;
        job.privilege = privilege_for(target, script, probe.uid);
        let (job_id, dir, state) = (script.job_id, job.dir.path(), probe.state);
        tracing::debug!(%job_id, dir, ?state, "finish directory probed");
        Ok((job, probe.state))
    }

    /// Starts the script if asked to, waits for it, collects it, hands the result to `keep`
    /// and retires the directory. The outcome is `resumed` unless this very call started the
    /// script.
    fn drive(
        &self,
        start: bool,
        keep: &mut dyn FnMut(&FinishOutcome),
    ) -> Result<FinishOutcome, SshError> {
        let resumed = !(start && self.start()?);
        let exit_code = self.wait()?;
        let outcome = self.collect(exit_code, resumed)?;
        keep(&outcome);

        // The result is in hand: a failed cleanup is worth a warning, not the job.
        if let Err(error) = self.exec(Step::Cleanup, &self.dir.retire()) {
            let job_id = self.script.job_id;
            tracing::warn!(%job_id, error = %error, "finish directory left on guest");
        }
        tracing::debug!(job_id = %self.script.job_id, exit_code, resumed, "finish script collected");
        Ok(outcome)
    }

    fn probe(&self) -> Result<remote::Probe, SshError> {
        let stdout = self.exec(Step::Probe, &self.dir.probe())?;
        let output = String::from_utf8_lossy(&stdout);
        remote::parse_probe(&output).ok_or_else(|| SshError::MalformedStatus {
            step: Step::Probe,
            output: output.into_owned(),
        })
    }

    /// Uploads and starts the script; `false` when a concurrent attempt had started it first.
    fn start(&self) -> Result<bool, SshError> {
        // Upload as the login user (the directory is theirs), and re-upload an unstarted one:
        // the earlier upload may have been cut short.
        let body = self.script.body.as_bytes();
        let upload = self.dir.upload(body.len());
        let uploaded = self
            .guest
            .exec_ok(Step::Upload, &upload, body, STATUS_LIMIT);
        self.discard_if_refused(uploaded)?;

        // Last point where giving up leaves nothing running behind.
        if self.cancel.is_cancelled() {
            self.discard_unstarted();
            return Err(SshError::Cancelled);
        }

        let command = self.dir.start(&remote::interpreter(self.script.body));
        let command = self.privilege.wrap(&command);
        let answer = self
            .guest
            .exec_ok(Step::Start, &command, &self.sudo_stdin(), STATUS_LIMIT);
        let answer = String::from_utf8_lossy(&self.discard_if_refused(answer)?).into_owned();
        let started = remote::parse_start(&answer).ok_or(SshError::MalformedStatus {
            step: Step::Start,
            output: answer,
        })?;
        let (job_id, privilege) = (self.script.job_id, self.privilege);
        tracing::debug!(%job_id, ?privilege, started, "finish script start requested");
        Ok(started)
    }

    /// Polls until the script records its exit status. Kills it on timeout and cancellation.
    fn wait(&self) -> Result<i32, SshError> {
        let deadline = Instant::now() + self.script.timeout;
        let mut interval = FIRST_POLL;
        loop {
            let state = self.probe()?.state;
            tracing::trace!(job_id = %self.script.job_id, ?state, "finish script polled");
            match state {
                JobState::Finished(exit_code) => return Ok(exit_code),
                JobState::Starting | JobState::Running => {}
                JobState::Lost => {
                    self.discard();
                    return Err(SshError::ScriptLost);
                }
                // Another attempt collected it, or someone removed the directory.
                JobState::Absent | JobState::Unstarted | JobState::Collected(_) => {
                    let found = format!("{state:?}").to_lowercase();
                    return Err(SshError::JobDirectoryChanged { found });
                }
            }

            if Instant::now() >= deadline {
                self.stop();
                return Err(SshError::ScriptTimedOut {
                    timeout: self.script.timeout,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !pause(interval.min(left), self.cancel) {
                self.stop();
                return Err(SshError::Cancelled);
            }
            interval = (interval * 3 / 2).min(MAX_POLL);
        }
    }

    fn collect(&self, exit_code: i32, resumed: bool) -> Result<FinishOutcome, SshError> {
        let sizes = self.exec(Step::Collect, &self.dir.sizes())?;
        let sizes = String::from_utf8_lossy(&sizes);
        let (stdout_size, stderr_size) =
            remote::parse_sizes(&sizes).ok_or_else(|| SshError::MalformedStatus {
                step: Step::Collect,
                output: sizes.clone().into_owned(),
            })?;

        let limit = self.script.tail_bytes;
        let tail = |stream| self.dir.tail(stream, limit);
        let stdout = self
            .guest
            .exec_ok(Step::Collect, &tail(Stream::Stdout), &[], limit)?;
        let stderr = self
            .guest
            .exec_ok(Step::Collect, &tail(Stream::Stderr), &[], limit)?;
        let stdout_truncated = stdout_size > limit as u64;
        let stderr_truncated = stderr_size > limit as u64;

        Ok(FinishOutcome {
            exit_code,
            stdout_tail: decode_tail(&stdout, stdout_truncated),
            stderr_tail: decode_tail(&stderr, stderr_truncated),
            stdout_truncated,
            stderr_truncated,
            host_key_fingerprint: self.guest.fingerprint().to_owned(),
            resumed,
            collected_earlier: false,
        })
    }

    /// The outcome when only the tombstone is left: the status, but no output to show. Any
    /// directory beside the tombstone is a leftover (a failed removal, a racing upload).
    fn collected_elsewhere(&self, exit_code: i32) -> FinishOutcome {
        self.discard();
        tracing::debug!(job_id = %self.script.job_id, exit_code, "finish script collected earlier");
        FinishOutcome {
            exit_code,
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            host_key_fingerprint: self.guest.fingerprint().to_owned(),
            resumed: true,
            collected_earlier: true,
        }
    }

    /// Kills the script's process group and removes its directory. Best effort: the caller
    /// is already reporting the reason for stopping, which matters more than a failed kill.
    fn stop(&self) {
        let kill = self.privilege.wrap(&self.dir.kill());
        if let Err(error) = self
            .guest
            .exec_ok(Step::Kill, &kill, &self.sudo_stdin(), STATUS_LIMIT)
        {
            let job_id = self.script.job_id;
            tracing::warn!(%job_id, error = %error, "could not stop finish script");
        }
        self.discard();
    }

    /// After the guest refused an upload or start, removes what was uploaded (the script may
    /// hold secrets), unless a concurrent attempt did start it.
    fn discard_if_refused(&self, result: Result<Vec<u8>, SshError>) -> Result<Vec<u8>, SshError> {
        match result {
            Ok(stdout) => Ok(stdout),
            Err(error @ SshError::CommandFailed { .. }) => {
                self.discard_unstarted();
                Err(error)
            }
            Err(error) => Err(error),
        }
    }

    fn discard(&self) {
        self.best_effort(&self.dir.discard());
    }

    fn discard_unstarted(&self) {
        self.best_effort(&self.dir.discard_unstarted());
    }

    /// Runs a cleanup command, logging rather than failing.
    fn best_effort(&self, command: &str) {
        if let Err(error) = self.exec(Step::Cleanup, command) {
            let job_id = self.script.job_id;
            tracing::warn!(%job_id, error = %error, "finish directory left on guest");
        }
    }

    /// Runs one of the small helper commands, which need no stdin and print one line.
    fn exec(&self, step: Step, command: &str) -> Result<Vec<u8>, SshError> {
        self.guest.exec_ok(step, command, &[], STATUS_LIMIT)
    }

    /// What `sudo -S` reads before running the command; nothing otherwise. The password only
    /// travels inside the encrypted channel and is never written to the guest's disk.
    fn sudo_stdin(&self) -> Vec<u8> {
        match (&self.target.auth, self.privilege) {
            (SshAuth::Password(password), Privilege::SudoPassword) => {
                format!("{}\n", password.expose()).into_bytes()
            }
            _ => Vec::new(),
        }
    }
}

/// Failures that a concurrent attempt removing the directory would also cause.
fn may_have_lost_a_race(error: &SshError) -> bool {
    matches!(
        error,
        SshError::CommandFailed { .. }
            | SshError::MalformedStatus { .. }
            | SshError::JobDirectoryChanged { .. }
    )
}

/// Root needs no sudo; otherwise sudo's way of getting a password follows the login's.
fn privilege_for(target: &SshTarget, script: &FinishScript, uid: u32) -> Privilege {
    match (&target.auth, script.sudo && uid != 0) {
        (_, false) => Privilege::AsLoginUser,
        (SshAuth::Password(_), true) => Privilege::SudoPassword,
        (SshAuth::PrivateKey { .. }, true) => Privilege::SudoNoPassword,
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
