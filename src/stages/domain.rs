//! Stage 2: define the domain on the overlay, with hatchery's metadata inside, and start it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{debug, info, warn};
use virt::sys;

use super::{JobRun, Refusal, Stage, StageError, StageKind};
use crate::hypervisor::metadata::{self, JobMetadata, JobState};
use crate::hypervisor::xml::{self, DomainSpec, KernelXml, NicXml};
use crate::hypervisor::{Op, inspect};
use crate::job::ConsoleKind;
use crate::settings::Settings;

pub struct Domain;

impl Stage for Domain {
    const KIND: StageKind = StageKind::Domain;

    async fn run(cx: &mut JobRun) -> Result<(), StageError> {
        let name = cx.job.vm_name().to_owned();
        // The record is read here and written back below; the heartbeat must not interleave.
        let _record = cx.hv.metadata_lock(&name).await;
        let found = read_metadata(cx, &name).await?;

        let mut meta = match found {
            Some(Some(meta)) if meta.job_id == cx.job.id => {
                debug!(domain = %name, "domain already defined by this job; adopting it");
                meta
            }
            // What an earlier job rolled back is only a record awaiting its job's outcome:
            // the name is free again.
            Some(Some(meta)) if meta.state == JobState::RolledBack => {
                debug!(domain = %name, earlier_job = %meta.job_id, "replacing a rolled-back definition");
                undefine(cx, &name).await?;
                define(cx, &name).await?
            }
            Some(_) => return Err(Refusal::DomainTaken { name }.into()),
            None => define(cx, &name).await?,
        };

        // Start it unless an earlier attempt already did; record when, so that the address
        // stage can tell this boot's lease from a stale one. The time is written before the
        // start: a worker dying while the domain starts leaves a running guest, and the run
        // that takes over must not judge that boot's lease older than the boot.
        let started = if is_active(cx, &name).await? {
            false
        } else {
            meta.started_at = Some(now_secs());
            meta.updated_at = meta.started_at;
            write_metadata(cx, &name, &meta).await?;
            start(cx, &name).await?
        };
        if meta.started_at.is_none() {
            meta.started_at = Some(now_secs());
        }
        meta.attempt = cx.attempt;
        meta.stage = Some(StageKind::Domain);
        meta.updated_at = Some(now_secs());
        write_metadata(cx, &name, &meta).await?;

        let n = name.clone();
        let op = Op::ReadDomain { name: name.clone() };
        let (uuid, xml) = cx
            .hv
            .call(op, move |conn| {
                let dom = conn.lookup_domain_by_name(&n)?;
                Ok((dom.uuid()?, dom.xml_desc(0)?))
            })
            .await?;
        let facts = inspect::domain(&xml)?;

        info!(domain = %name, domain_uuid = %uuid, started, "domain running");
        tracing::Span::current().record("domain_uuid", tracing::field::display(uuid));
        cx.facts.domain_name = Some(name);
        cx.facts.domain_uuid = Some(uuid);
        cx.facts.macs = facts.macs;
        cx.facts.started_at = meta.started_at;
        Ok(())
    }

    /// Stops the guest. The definition stays, holding the job's record, until the job's
    /// outcome is published ([`forget`]): a worker dying before that leaves the next run a
    /// finished rollback to report rather than a job to run again.
    async fn undo(cx: &JobRun) -> Result<(), StageError> {
        let name = cx.job.vm_name().to_owned();
        match read_metadata(cx, &name).await? {
            Some(Some(meta)) if meta.job_id == cx.job.id => destroy(cx, &name).await,
            Some(_) => {
                warn!(domain = %name, "domain belongs to another job; rollback leaves it alone");
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn default_timeout(settings: &Settings) -> Duration {
        settings.timeouts.domain
    }
}

/// Reads hatchery's metadata from domain `name`: `None` when there is no such domain,
/// `Some(None)` when it exists but is not hatchery's.
pub async fn read_metadata(
    cx: &JobRun,
    name: &str,
) -> Result<Option<Option<JobMetadata>>, StageError> {
    let n = name.to_owned();
    let op = Op::ReadDomain {
        name: name.to_owned(),
    };
    let raw = cx
        .hv
        .call(op, move |conn| {
            let dom = match conn.lookup_domain_by_name(&n) {
                Ok(dom) => dom,
                Err(e) if is_no_domain(&e) => return Ok(None),
                Err(e) => return Err(e),
            };
            let kind = sys::VIR_DOMAIN_METADATA_ELEMENT as i32;
            match dom.metadata(kind, Some(metadata::NAMESPACE), 0) {
                Ok(xml) => Ok(Some(Some(xml))),
                Err(e) if is_no_metadata(&e) => Ok(Some(None)),
                Err(e) => Err(e),
            }
        })
        .await?;
    Ok(match raw {
        None => None,
        Some(None) => Some(None),
        Some(Some(xml)) => Some(Some(JobMetadata::parse(&xml)?)),
    })
}

/// Replaces hatchery's metadata on domain `name`, in its persistent config and, when it runs,
/// its live state.
pub async fn write_metadata(cx: &JobRun, name: &str, meta: &JobMetadata) -> Result<(), StageError> {
    let (n, doc) = (name.to_owned(), meta.to_xml());
    let op = Op::WriteMetadata {
        name: name.to_owned(),
    };
    cx.hv
        .call(op, move |conn| {
            let dom = conn.lookup_domain_by_name(&n)?;
            let mut flags = sys::VIR_DOMAIN_AFFECT_CONFIG;
            if dom.is_active()? {
                flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
            }
            let kind = sys::VIR_DOMAIN_METADATA_ELEMENT as i32;
            let (key, uri) = (Some(metadata::PREFIX), Some(metadata::NAMESPACE));
            dom.set_metadata(kind, Some(&doc), key, uri, flags)
        })
        .await?;
    Ok(())
}

/// Removes the definition a finished rollback left, once the job's outcome is published.
pub async fn forget(cx: &JobRun) -> Result<(), StageError> {
    let name = cx.job.vm_name();
    let _record = cx.hv.metadata_lock(name).await;
    match read_metadata(cx, name).await? {
        Some(Some(meta)) if meta.job_id == cx.job.id && meta.state == JobState::RolledBack => {
            undefine(cx, name).await
        }
        _ => Ok(()),
    }
}

/// Changes the job's own record in its domain, holding this worker's lock on that record.
/// Returns `false`, changing nothing, when the domain is gone or not this job's.
pub async fn update_metadata(
    cx: &JobRun,
    change: impl FnOnce(&mut JobMetadata),
) -> Result<bool, StageError> {
    let name = cx.job.vm_name();
    let _record = cx.hv.metadata_lock(name).await;
    match read_metadata(cx, name).await? {
        Some(Some(mut meta)) if meta.job_id == cx.job.id => {
            change(&mut meta);
            meta.updated_at = Some(now_secs());
            write_metadata(cx, name, &meta).await?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

async fn define(cx: &JobRun, name: &str) -> Result<JobMetadata, StageError> {
    let overlay = cx
        .facts
        .overlay
        .clone()
        .expect("the overlay stage runs before this one");
    let vm = &cx.spec().vm;
    let meta = JobMetadata {
        job_id: cx.job.id,
        batch: cx.job.batch.clone(),
        attempt: cx.attempt,
        stage: Some(StageKind::Overlay),
        base_sha256: overlay.base_sha256.clone(),
        overlay_pool: overlay.pool.clone(),
        overlay_volume: overlay.volume.clone(),
        started_at: None,
        state: JobState::Running,
        failure: None,
        updated_at: Some(now_secs()),
        finish: None,
    };

    let console = vm.console.as_ref();
    let spec = DomainSpec {
        name: name.to_owned(),
        domain_type: vm.domain_type,
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        disk_path: overlay.path.clone(),
        nics: (vm.nics.iter().enumerate())
            .map(|(i, nic)| NicXml {
                attach: nic.attach.clone(),
                model: nic.model.clone(),
                mac: cx.mac(i),
            })
            .collect(),
        console: console.map_or(ConsoleKind::Vnc, |c| c.kind),
        console_listen: console
            .and_then(|c| c.listen)
            .unwrap_or(cx.settings.console_listen),
        kernel: vm.boot.as_ref().map(|b| KernelXml {
            kernel: b.kernel.clone(),
            initrd: b.initrd.clone(),
            cmdline: b.cmdline.clone(),
        }),
        serial_log: cx
            .settings
            .serial_log_dir
            .as_ref()
            .map(|d| format!("{d}/{name}-serial.log")),
        metadata: meta.to_element(),
    };

    let doc = xml::domain(&spec);
    let op = Op::DefineDomain {
        name: name.to_owned(),
    };
    cx.hv
        .call(op, move |conn| conn.define_domain_xml(&doc).map(|_| ()))
        .await?;
    info!(domain = %name, "domain defined");
    Ok(meta)
}

/// Whether domain `name` runs.
async fn is_active(cx: &JobRun, name: &str) -> Result<bool, StageError> {
    let n = name.to_owned();
    let op = Op::ReadDomain {
        name: name.to_owned(),
    };
    let active = cx
        .hv
        .call(op, move |conn| conn.lookup_domain_by_name(&n)?.is_active())
        .await?;
    Ok(active)
}

/// Starts domain `name`; `false` when it was running already.
async fn start(cx: &JobRun, name: &str) -> Result<bool, StageError> {
    let n = name.to_owned();
    let op = Op::StartDomain {
        name: name.to_owned(),
    };
    let started = cx
        .hv
        .call(op, move |conn| {
            let dom = conn.lookup_domain_by_name(&n)?;
            if dom.is_active()? {
                return Ok(false);
            }
            dom.create().map(|_| true)
        })
        .await?;
    Ok(started)
}

/// Destroys and undefines domain `name`. The caller has checked that it is this job's.
pub async fn remove(cx: &JobRun, name: &str) -> Result<(), StageError> {
    destroy(cx, name).await?;
    undefine(cx, name).await
}

/// Stops domain `name` if it runs.
pub async fn destroy(cx: &JobRun, name: &str) -> Result<(), StageError> {
    let n = name.to_owned();
    let op = Op::DestroyDomain {
        name: name.to_owned(),
    };
    let destroyed = cx
        .hv
        .call(op, move |conn| {
            let dom = conn.lookup_domain_by_name(&n)?;
            if !dom.is_active()? {
                return Ok(false);
            }
            dom.destroy().map(|()| true)
        })
        .await;
    match destroyed {
        Ok(true) => info!(domain = %name, "domain destroyed"),
        Ok(false) => {}
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Removes domain `name`'s definition, if it is still there.
pub async fn undefine(cx: &JobRun, name: &str) -> Result<(), StageError> {
    let n = name.to_owned();
    let op = Op::UndefineDomain {
        name: name.to_owned(),
    };
    let undefined = cx.hv.call(op, move |conn| {
        let dom = conn.lookup_domain_by_name(&n)?;
        // NVRAM goes too where the driver supports the flag; the test driver does not.
        dom.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_NVRAM)
            .or_else(|_| dom.undefine())
    });
    match undefined.await {
        Ok(()) => info!(domain = %name, "domain undefined"),
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

fn is_no_domain(e: &virt::error::Error) -> bool {
    matches!(
        Result::from(e.code()),
        Ok(virt::error::ErrorNumber::NoDomain)
    )
}

fn is_no_metadata(e: &virt::error::Error) -> bool {
    matches!(
        Result::from(e.code()),
        Ok(virt::error::ErrorNumber::NoDomainMetadata)
    )
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
