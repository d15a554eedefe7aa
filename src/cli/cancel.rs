//! `hatchery cancel JOB_ID`: asks the fleet to cancel a job, running or not yet taken.

use std::process::ExitCode;

use anyhow::Context;
use uuid::Uuid;

use super::submit::{open, publish};
use super::worker::BrokerArgs;
use crate::fleet::control::ControlMessage;

#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The worker's configuration, for its `broker` table; the flags above win over it.
    #[command(flatten)]
    pub config: super::ConfigArgs,
    /// The job's id.
    pub job_id: Uuid,
}

pub fn main(args: CancelArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let broker = args.broker.clone().or_from(&args.config.load()?.broker);
        let (conn, ch, names) = open(&broker, "cancel").await?;
        // The log every worker reads: the one running the job interrupts it, and any worker
        // that takes it later drops it.
        publish(
            &ch,
            &ControlMessage::Cancel {
                job_id: args.job_id,
            }
            .to_message(&names),
        )
        .await?;
        let _ = conn.close(200, "done".into()).await;
        eprintln!("cancellation of {} requested", args.job_id);
        Ok(ExitCode::SUCCESS)
    })
}
