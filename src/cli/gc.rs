//! `hatchery gc`: report (and with `--apply`, remove) what hatchery made that no job owns.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::hypervisor::Hypervisor;
use crate::reconcile::{self, OrphanKind};

#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// The libvirt URI to inspect.
    #[arg(long, short = 'c')]
    pub connect: String,
    /// Remove what is found; without it, only report.
    #[arg(long)]
    pub apply: bool,
    /// How long a job's record must have gone untouched before its domain counts as abandoned.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    pub older_than: Duration,
}

pub fn main(args: GcArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let hv = Arc::new(Hypervisor::new(&args.connect));
    runtime.block_on(async {
        let orphans = reconcile::find(&hv, args.older_than)
            .await
            .with_context(|| format!("cannot inspect {}", args.connect))?;
        if orphans.is_empty() {
            println!("no orphans on {}", args.connect);
            return Ok(ExitCode::SUCCESS);
        }
        for o in &orphans {
            let kind = match o.kind {
                OrphanKind::Domain => "domain",
                OrphanKind::Volume => "volume",
            };
            let place = o
                .pool
                .as_deref()
                .map(|p| format!(" in pool {p}"))
                .unwrap_or_default();
            let job = o.job_id.map(|j| format!(" (job {j})")).unwrap_or_default();
            println!("{kind} {}{place}{job}: {}", o.name, o.reason);
        }
        if args.apply {
            let removed = reconcile::remove(&hv, &orphans, args.older_than).await?;
            println!("removed {removed} of {}", orphans.len());
        } else {
            println!(
                "dry run: {} found; run again with --apply to remove them",
                orphans.len()
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}
