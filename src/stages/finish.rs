//! Stage 4: log in to the guest over SSH, run the job's finish script once, collect its result.

use std::net::SocketAddr;
use std::time::Duration;

use tracing::info;

use super::{JobRun, Refusal, Stage, StageError, StageKind, blocking};
use crate::guest::{self, FinishScript, SshAuth, SshTarget};
use crate::job::{Credential, FinishSpec};
use crate::secret::Secret;
use crate::settings::Settings;

pub struct Finish;

impl Stage for Finish {
    const KIND: StageKind = StageKind::Finish;

    async fn run(cx: &mut JobRun) -> Result<(), StageError> {
        let Some(spec) = cx.spec().finish.clone() else {
            return Ok(());
        };
        let addr = cx
            .facts
            .address
            .expect("the address stage runs before this one");
        refuse_made_up_address(cx, addr)?;

        let target = SshTarget {
            addr,
            user: spec.user.clone(),
            auth: credential(cx, &spec)?,
            pinned_host_key: spec.host_key.clone(),
            jump: cx.settings.jump_hosts.get(cx.hv.uri()).cloned(),
        };
        // The guest keeps one run per id: a rerun the job asked for gets an id of its own.
        let job_id = match cx.script_run {
            0 => cx.job.id,
            n => uuid::Uuid::new_v5(&cx.job.id, format!("script-run-{n}").as_bytes()),
        };
        let tail_bytes = cx.settings.limits.output_tail_bytes;
        let sudo = spec.sudo && spec.user != "root";
        let deadline = cx.deadline.into_std();
        let cancel = cx.cancel.clone();

        // Waiting for a booting guest holds no thread; through a jump host each probe is an
        // `ssh` process, so that wait runs with the session below.
        if target.jump.is_none() {
            guest::wait_for_sshd_async(addr, cx.deadline, &cancel).await?;
        }

        // ssh2 blocks, so the session runs on the blocking pool; cancellation reaches it
        // through the token, which its polling loops check.
        let outcome = blocking(move || {
            if target.jump.is_some() {
                guest::wait_for_sshd_via(addr, target.jump.as_ref(), deadline, &cancel)?;
            }
            let script = FinishScript {
                job_id,
                body: &spec.script,
                timeout: spec.timeout(),
                sudo,
                tail_bytes,
            };
            guest::run_finish(&target, &script, &cancel)
        })
        .await?;

        // FIXME: a worker that dies after collecting the result but before the final event is
        // published leaves only the exit status on the guest; the redelivered job then reports
        // that status with empty output tails.
        let code = outcome.exit_code;
        info!(
            exit_code = code,
            host_key = %outcome.host_key_fingerprint,
            resumed = outcome.resumed,
            "finish script done"
        );
        cx.facts.finish = Some(outcome);
        if code != 0 {
            return Err(StageError::ScriptFailed { code });
        }
        Ok(())
    }

    async fn undo(_cx: &JobRun) -> Result<(), StageError> {
        // The script's directory is removed by the run itself; the guest goes with the domain.
        Ok(())
    }

    fn default_timeout(settings: &Settings) -> Duration {
        settings.timeouts.finish_connect
    }
}

/// libvirt's test driver invents guest addresses from its network's range. Connecting to one
/// would reach whatever host really has it, so only loopback ones (a test's own sshd) are used.
fn refuse_made_up_address(cx: &JobRun, addr: SocketAddr) -> Result<(), Refusal> {
    let test_driver = cx.hv.is_test_driver();
    let given = matches!(cx.spec().address, crate::job::AddressSource::Static { .. });
    if test_driver && !given && !addr.ip().is_loopback() {
        return Err(Refusal::MadeUpAddress {
            uri: cx.hv.uri().to_owned(),
            ip: addr.ip(),
        });
    }
    Ok(())
}

fn credential(cx: &JobRun, spec: &FinishSpec) -> Result<SshAuth, StageError> {
    Ok(match &spec.credential {
        Credential::Password(p) => SshAuth::Password(p.clone()),
        Credential::PrivateKey(k) => SshAuth::PrivateKey {
            key: k.clone(),
            passphrase: None,
        },
        Credential::KeyName(name) => SshAuth::PrivateKey {
            key: named_key(cx, name)?,
            passphrase: None,
        },
    })
}

/// The environment variable a named key may come from: `HATCHERY_KEY_` and the name in upper
/// case with `.` and `-` as `_` (`fleet-ed25519` is `HATCHERY_KEY_FLEET_ED25519`).
pub fn key_env_var(name: &str) -> String {
    let tail: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("HATCHERY_KEY_{tail}")
}

/// A private key the worker holds: a file in its key directory, else an environment variable.
fn named_key(cx: &JobRun, name: &str) -> Result<Secret, StageError> {
    if let Some(dir) = &cx.settings.key_dir {
        // Validation keeps `name` to [A-Za-z0-9._-] without "..", so it stays in `dir`.
        match std::fs::read_to_string(dir.join(name)) {
            Ok(text) => return Ok(Secret::new(text)),
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(StageError::ReadKey {
                    name: name.to_owned(),
                    source: e,
                });
            }
            Err(_) => {}
        }
    }
    match std::env::var(key_env_var(name)) {
        Ok(text) => Ok(Secret::new(text)),
        Err(_) => Err(Refusal::UnknownKey(name.to_owned()).into()),
    }
}
