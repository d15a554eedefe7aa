//! `hatchery run JOB.json`: one job, in this process, no broker.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::events::{JsonLinesSink, Publisher};
use crate::job;
use crate::pipeline::{Outcome, Pipeline};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The job file (JSON).
    pub job: PathBuf,
    /// Run against this libvirt URI instead of the job's hypervisor.
    #[arg(long)]
    pub connect: Option<String>,
    /// A worker configuration to run with: its hypervisors, jump hosts, secrets, timeouts.
    #[command(flatten)]
    pub config: super::ConfigArgs,
    /// Where consoles listen unless the job or the configuration says otherwise.
    #[arg(long)]
    pub console_listen: Option<std::net::IpAddr>,
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
    let config = args.config.load()?;
    let mut settings = config.settings();
    let mut job = match job::parse(&bytes, &settings.limits) {
        Ok(job) => job,
        Err(rejected) => {
            anyhow::bail!("{} is not a valid job: {rejected}", args.job.display());
        }
    };
    if let Some(uri) = args.connect {
        job.hypervisor = uri;
    }

    // The flags win over the configuration. `run` is a local tool: its user chose the job
    // file and the hypervisor, test driver included.
    settings.allow_test_driver = true;
    if let Some(listen) = args.console_listen {
        settings.console_listen = listen;
    }
    if args.key_dir.is_some() {
        settings.key_dir = args.key_dir;
    }
    if args.serial_log_dir.is_some() {
        settings.serial_log_dir = args.serial_log_dir;
    }
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
