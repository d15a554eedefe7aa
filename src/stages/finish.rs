//! Stage 4: log in to the guest over SSH, run the job's finish script once, collect its result.

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;

use tracing::{debug, info, warn};
use uuid::Uuid;

use super::{JobRun, Refusal, Stage, StageError, StageKind, blocking, domain};
use crate::guest::{self, FinishOutcome, FinishScript, SshAuth, SshTarget};
use crate::hypervisor::metadata::FinishRecord;
use crate::job::{Credential, FinishSpec};
use crate::secret::{Secret, redact};
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
        let runtime = tokio::runtime::Handle::current();
        let recorder = JobRun::new(
            Arc::clone(&cx.job),
            Arc::clone(&cx.hv),
            Arc::clone(&cx.settings),
            cx.attempt,
        );

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
            // The guest keeps only the exit status once the output is removed, so the whole
            // result goes into the domain's record first, for a run that takes over later.
            let mut keep = |outcome: &FinishOutcome| {
                runtime.block_on(record(&recorder, job_id, outcome));
            };
            guest::run_finish_keeping(&target, &script, &cancel, &mut keep)
        })
        .await?;
        let outcome = match outcome.collected_earlier {
            true => recall(cx, job_id, outcome).await,
            false => outcome,
        };

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

/// Stores a collected result in the domain's record, without the job's secrets. Best effort:
/// the result is in hand and goes into the job's final event either way.
async fn record(cx: &JobRun, run: Uuid, outcome: &FinishOutcome) {
    let secrets = cx.job.secrets();
    let finish = FinishRecord {
        run,
        exit_code: outcome.exit_code,
        stdout_tail: redact(&outcome.stdout_tail, &secrets),
        stderr_tail: redact(&outcome.stderr_tail, &secrets),
        stdout_truncated: outcome.stdout_truncated,
        stderr_truncated: outcome.stderr_truncated,
        host_key_fingerprint: outcome.host_key_fingerprint.clone(),
    };
    if let Err(e) = domain::update_metadata(cx, |meta| meta.finish = Some(finish)).await {
        warn!(error = %e, "could not record the finish result in the domain");
    }
}

/// Fills in the output an earlier attempt collected and recorded before removing it from the
/// guest. Without such a record only the exit status is known.
async fn recall(cx: &JobRun, run: Uuid, mut outcome: FinishOutcome) -> FinishOutcome {
    let recorded = match domain::read_metadata(cx, cx.job.vm_name()).await {
        Ok(Some(Some(meta))) if meta.job_id == cx.job.id => meta.finish,
        Ok(_) => None,
        Err(e) => {
            warn!(error = %e, "could not read the recorded finish result");
            None
        }
    };
    match recorded {
        Some(r) if r.run == run && r.exit_code == outcome.exit_code => {
            debug!("finish output recalled from the domain's record");
            outcome.stdout_tail = r.stdout_tail;
            outcome.stderr_tail = r.stderr_tail;
            outcome.stdout_truncated = r.stdout_truncated;
            outcome.stderr_truncated = r.stderr_truncated;
        }
        _ => warn!("the finish output was collected earlier and is gone; only its status is known"),
    }
    outcome
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
