//! The deprovisioning stage: remove a VM hatchery made, and its overlay, never its base.

use std::time::Duration;

use tracing::info;

use super::{JobRun, Refusal, Stage, StageError, StageKind, domain, overlay};
use crate::settings::Settings;

pub struct Teardown;

impl Stage for Teardown {
    const KIND: StageKind = StageKind::Teardown;

    async fn run(cx: &mut JobRun) -> Result<(), StageError> {
        let name = cx.job.vm_name().to_owned();
        let meta = match domain::read_metadata(cx, &name).await? {
            Some(Some(meta)) => meta,
            Some(None) => return Err(Refusal::NotHatcherys { name }.into()),
            None => {
                // Gone already: removed by an earlier delivery of this job, or by an operator.
                info!(domain = %name, "domain already absent");
                cx.facts.already_absent = true;
                return Ok(());
            }
        };

        // The definition goes last: while it exists, a redelivered job can still find the
        // overlay through its metadata.
        domain::destroy(cx, &name).await?;
        overlay::delete_volume(cx, &meta.overlay_pool, &meta.overlay_volume).await?;
        domain::undefine(cx, &name).await?;
        cx.facts.domain_name = Some(name);
        Ok(())
    }

    async fn undo(_cx: &JobRun) -> Result<(), StageError> {
        // Nothing to put back: a half-done teardown is finished by running it again.
        Ok(())
    }

    fn default_timeout(settings: &Settings) -> Duration {
        settings.timeouts.domain
    }
}
