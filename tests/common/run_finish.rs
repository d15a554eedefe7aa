//! Running a finish script on the tests' own sshd, as the finish stage does.

use std::fs;
use std::path::Path;
use std::time::Duration;

use hatchery::guest::{FinishOutcome, FinishScript, SshError, SshTarget, run_finish};
use tokio_util::sync::CancellationToken;

use super::sshd::GuestJob as Job;

/// A script's timeout, long enough for any of the tests' scripts.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// The finish script `body` of `job`, run as the login user with a 64 KiB tail.
pub fn script<'a>(job: &Job, body: &'a str) -> FinishScript<'a> {
    FinishScript {
        job_id: job.id,
        body,
        timeout: TIMEOUT,
        sudo: false,
        tail_bytes: 64 * 1024,
    }
}

/// Runs `script` on `target` to its end, never cancelled.
pub fn run(target: &SshTarget, script: &FinishScript) -> Result<FinishOutcome, SshError> {
    run_finish(target, script, &CancellationToken::new())
}

/// The file's text, or nothing when it is absent.
pub fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}
