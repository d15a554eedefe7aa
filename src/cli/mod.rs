//! The `hatchery` command line: one file per subcommand.
//!
//! The only module that writes to stdout: its subcommands' output is their interface.
#![allow(clippy::print_stdout)]

mod bench;
mod cancel;
mod check;
mod events;
mod gc;
mod run;
mod submit;
mod validate;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(name = "hatchery", version, about = "Provision libvirt VMs from jobs")]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one job in this process, without a broker: progress on stderr, events on stdout.
    Run(run::RunArgs),
    /// Check the broker, hypervisors, pools, networks, base images and secrets a worker needs.
    Check(ConfigArgs),
    /// Find what hatchery made that no job owns any more; remove it with --apply.
    Gc(gc::GcArgs),
    /// Check job files against the contract and print every problem with its JSON path.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Take jobs from RabbitMQ and publish their events, until SIGTERM or SIGINT.
    Worker(worker::WorkerArgs),
    /// Publish jobs to the fleet; with --wait, follow them until each is final.
    Submit(submit::SubmitArgs),
    /// Cancel a job, whether a worker runs it or it still waits in the queue.
    Cancel(cancel::CancelArgs),
    /// Print the fleet's events as they happen.
    Events(events::EventsArgs),
    /// Measure a worker on the test driver: jobs/s, event latency, memory.
    Bench(bench::BenchArgs),
}

/// Where the worker's configuration comes from: a TOML file, `HATCHERY__*` variables, then
/// `--set` flags, each overriding the one before.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// The configuration file (TOML).
    #[arg(long, env = "HATCHERY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Overrides one key, e.g. `--set broker.url=amqps://mq.example.com` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

impl ConfigArgs {
    pub fn load(&self) -> anyhow::Result<crate::config::Config> {
        let config =
            crate::config::Config::load(self.config.as_deref(), std::env::vars(), &self.sets)?;
        Ok(config)
    }
}

/// Logs go to stderr; `RUST_LOG` refines the level (`info` by default).
pub fn init_logging(cli: &Cli) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

pub fn main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::main(args),
        Command::Gc(args) => gc::main(args),
        Command::Check(args) => check::main(args),
        Command::Validate { files } => Ok(validate::main(&files)),
        Command::Worker(args) => worker::main(args),
        Command::Submit(args) => submit::main(args),
        Command::Cancel(args) => cancel::main(args),
        Command::Events(args) => events::main(args),
        Command::Bench(args) => bench::main(args),
    }
}
