//! Undoing a failed job: every stage it reached, in reverse order.

use tracing::{info, warn};

use super::address::Address;
use super::domain::{self, Domain};
use super::finish::Finish;
use super::overlay::Overlay;
use super::{JobRun, Stage, StageError, StageKind};
use crate::hypervisor::metadata::JobState;

/// Undoes the stages up to and including `reached`, the last one the job started, newest first,
/// then marks the domain's record rolled back (the caller removes the definition once the
/// outcome is published). Each undo is safe to repeat, so a rollback cut short by a crash
/// completes when run again.
pub async fn run(cx: &JobRun, reached: StageKind) -> Result<(), StageError> {
    info!(stage = %reached, "rolling back");
    for kind in StageKind::PROVISION
        .into_iter()
        .rev()
        .filter(|k| *k <= reached)
    {
        let undone = match kind {
            StageKind::Finish => Finish::undo(cx).await,
            StageKind::Address => Address::undo(cx).await,
            StageKind::Domain => Domain::undo(cx).await,
            StageKind::Overlay => Overlay::undo(cx).await,
            StageKind::Teardown => Ok(()),
        };
        if let Err(e) = undone {
            warn!(stage = %kind, error = %e, "rollback step failed");
            return Err(e);
        }
    }
    domain::update_metadata(cx, |meta| meta.state = JobState::RolledBack).await?;
    Ok(())
}
