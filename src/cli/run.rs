//! `hatchery run JOB.json`: one job, in this process, no broker.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::events::{JsonLinesSink, Publisher};
use crate::job::{self, Limits};
use crate::pipeline::{Outcome, Pipeline};
use crate::settings::Settings;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The job file (JSON).
    pub job: PathBuf,
    /// Run against this libvirt URI instead of the job's hypervisor.
    #[arg(long)]
    pub connect: Option<String>,
    /// Where consoles listen unless the job says otherwise.
    #[arg(long, default_value = "0.0.0.0")]
    pub console_listen: std::net::IpAddr,
    /// Directory of private keys that jobs may name with `key_name`.
    #[arg(long)]
    pub key_dir: Option<PathBuf>,
    /// Directory on the hypervisor where guests' serial consoles are logged.
    #[arg(long)]
    pub serial_log_dir: Option<String>,
}

pub fn main(args: RunArgs) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(&args.job)
        .with_context(|| format!("cannot read job file {}", args.job.display()))?;
    let mut job = match job::parse(&bytes, &Limits::default()) {
        Ok(job) => job,
        Err(rejected) => {
            anyhow::bail!("{} is not a valid job: {rejected}", args.job.display());
        }
    };
    if let Some(uri) = args.connect {
        job.hypervisor = uri;
    }

    let settings = Settings {
        console_listen: args.console_listen,
        key_dir: args.key_dir,
        serial_log_dir: args.serial_log_dir,
        // `run` is a local tool: its user chose the job file and the hypervisor.
        allow_test_driver: true,
        ..Settings::default()
    };
    let pipeline = Pipeline::new(settings, Publisher::new(&hostname()));
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;

    // Ctrl-C cancels the job, which then rolls back like any other failure.
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    let outcome = runtime.block_on(async move {
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                on_signal.cancel();
            }
        });
        pipeline.run(job, 1, cancel, &JsonLinesSink::stdout()).await
    });
    Ok(match outcome {
        Outcome::Succeeded => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

/// The name this process publishes events under.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned())
}
