//! The reconciler: finds what hatchery made that no live job owns any more, and removes it when
//! told to. Anything without hatchery's marks is never touched.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tracing::{info, warn};
use uuid::Uuid;
use virt::sys;

use crate::hypervisor::metadata::{self, JobMetadata, JobState};
use crate::hypervisor::{Hypervisor, LibvirtError, Op, inspect};
use crate::stages::domain::now_secs;

/// Something hatchery made that no job will clean up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Orphan {
    pub kind: OrphanKind,
    pub name: String,
    /// The pool, for volumes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<Uuid>,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OrphanKind {
    Domain,
    Volume,
}

/// A domain hatchery made, with its record.
struct Marked {
    name: String,
    meta: JobMetadata,
}

/// Lists the orphans on `hv`. A domain is one when its job began a rollback that never
/// finished, or when no worker has touched its record for `older_than` while the job was
/// still running. An overlay volume (hatchery's `<vm>-<job id>.qcow2` naming, with a backing
/// store) is one when no domain refers to it and it is older than `older_than`.
pub async fn find(hv: &Arc<Hypervisor>, older_than: Duration) -> Result<Vec<Orphan>, LibvirtError> {
    let marked = marked_domains(hv).await?;
    let cutoff = now_secs() - older_than.as_secs() as i64;
    let stale = |m: &JobMetadata| m.updated_at.unwrap_or(0) <= cutoff;

    let mut orphans = Vec::new();
    for d in &marked {
        let reason = match d.meta.state {
            JobState::RollingBack if stale(&d.meta) => "rollback never finished",
            JobState::RolledBack if stale(&d.meta) => "rolled back; its outcome never published",
            JobState::Running if stale(&d.meta) => "abandoned: no worker updated it",
            _ => continue,
        };
        orphans.push(Orphan {
            kind: OrphanKind::Domain,
            name: d.name.clone(),
            pool: None,
            job_id: Some(d.meta.job_id),
            reason,
        });
        // Its overlay goes with it, unless a finished rollback deleted it already.
        if d.meta.state == JobState::RolledBack {
            continue;
        }
        orphans.push(Orphan {
            kind: OrphanKind::Volume,
            name: d.meta.overlay_volume.clone(),
            pool: Some(d.meta.overlay_pool.clone()),
            job_id: Some(d.meta.job_id),
            reason: "overlay of an orphaned domain",
        });
    }

    let referenced: HashSet<(String, String)> = (marked.iter())
        .map(|d| (d.meta.overlay_pool.clone(), d.meta.overlay_volume.clone()))
        .collect();
    for (pool, volume, facts) in overlay_volumes(hv).await? {
        let age_known = facts
            .mtime
            .as_deref()
            .and_then(|m| m.split('.').next()?.parse().ok());
        let old = age_known.is_some_and(|mtime: i64| mtime <= cutoff) || older_than.is_zero();
        if referenced.contains(&(pool.clone(), volume.clone())) || !old {
            continue;
        }
        orphans.push(Orphan {
            kind: OrphanKind::Volume,
            job_id: job_id_of(&volume),
            name: volume,
            pool: Some(pool),
            reason: "overlay that no domain uses",
        });
    }
    Ok(orphans)
}

/// Removes `orphans`: domains are destroyed and undefined, volumes deleted. Each is checked
/// again just before, so that a job that came back to life in between keeps its VM.
pub async fn remove(
    hv: &Arc<Hypervisor>,
    orphans: &[Orphan],
    older_than: Duration,
) -> Result<usize, LibvirtError> {
    let confirmed = find(hv, older_than).await?;
    let mut removed = 0;
    for orphan in orphans.iter().filter(|o| confirmed.contains(o)) {
        let result = match orphan.kind {
            OrphanKind::Domain => remove_domain(hv, &orphan.name).await,
            OrphanKind::Volume => {
                let pool = orphan.pool.clone().unwrap_or_default();
                remove_volume(hv, &pool, &orphan.name).await
            }
        };
        match result {
            Ok(()) => {
                info!(kind = ?orphan.kind, name = %orphan.name, "orphan removed");
                removed += 1;
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => warn!(name = %orphan.name, error = %e, "could not remove orphan"),
        }
    }
    Ok(removed)
}

async fn marked_domains(hv: &Arc<Hypervisor>) -> Result<Vec<Marked>, LibvirtError> {
    let found = hv
        .call(Op::ListDomains, |conn| {
            let mut out = Vec::new();
            for dom in conn.list_all_domains(0)? {
                let kind = sys::VIR_DOMAIN_METADATA_ELEMENT as i32;
                // Domains without hatchery's namespace are not ours: skip them.
                if let Ok(xml) = dom.metadata(kind, Some(metadata::NAMESPACE), 0) {
                    out.push((dom.name()?, xml));
                }
            }
            Ok(out)
        })
        .await?;
    Ok(found
        .into_iter()
        .filter_map(|(name, xml)| {
            Some(Marked {
                name,
                meta: JobMetadata::parse(&xml).ok()?,
            })
        })
        .collect())
}

/// Every volume named like an overlay of hatchery's that has a backing store.
async fn overlay_volumes(
    hv: &Arc<Hypervisor>,
) -> Result<Vec<(String, String, inspect::VolumeFacts)>, LibvirtError> {
    let listed = hv
        .call(Op::ListPools, |conn| {
            let mut out = Vec::new();
            for pool in conn.list_all_storage_pools(0)? {
                if !pool.is_active().unwrap_or(false) {
                    continue;
                }
                let pool_name = pool.name()?;
                for vol in pool.list_all_volumes(0)? {
                    let name = vol.name()?;
                    if job_id_of(&name).is_some() {
                        out.push((pool_name.clone(), name, vol.xml_desc(0)?));
                    }
                }
            }
            Ok(out)
        })
        .await?;
    Ok(listed
        .into_iter()
        .filter_map(|(pool, name, xml)| Some((pool, name, inspect::volume(&xml).ok()?)))
        .filter(|(_, _, facts)| facts.backing_path.is_some())
        .collect())
}

/// The job id in an overlay's name, `<vm>-<job id>.qcow2`.
fn job_id_of(volume: &str) -> Option<Uuid> {
    let stem = volume.strip_suffix(".qcow2")?;
    let id = stem.get(stem.len().checked_sub(36)?..)?;
    let sep = stem
        .len()
        .checked_sub(37)
        .and_then(|i| stem.as_bytes().get(i));
    if sep != Some(&b'-') {
        return None;
    }
    Uuid::parse_str(id).ok()
}

async fn remove_domain(hv: &Arc<Hypervisor>, name: &str) -> Result<(), LibvirtError> {
    let n = name.to_owned();
    hv.call(
        Op::DestroyDomain {
            name: name.to_owned(),
        },
        move |conn| {
            let dom = conn.lookup_domain_by_name(&n)?;
            if dom.is_active()? {
                dom.destroy()?;
            }
            dom.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_NVRAM)
                .or_else(|_| dom.undefine())
        },
    )
    .await
}

async fn remove_volume(hv: &Arc<Hypervisor>, pool: &str, name: &str) -> Result<(), LibvirtError> {
    let (p, n) = (pool.to_owned(), name.to_owned());
    hv.call(
        Op::DeleteVolume {
            volume: name.to_owned(),
        },
        move |conn| {
            conn.lookup_storage_pool_by_name(&p)?
                .lookup_storage_vol_by_name(&n)?
                .delete(0)
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_overlay_names() {
        let id = Uuid::new_v4();
        assert_eq!(job_id_of(&format!("web-01-{id}.qcow2")), Some(id));
        assert_eq!(job_id_of("debian-12.qcow2"), None);
        assert_eq!(job_id_of(&format!("{id}.qcow2")), None);
    }
}
