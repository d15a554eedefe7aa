//! Stage 1: a qcow2 overlay volume whose backing store is the job's base image.

use std::io::Read;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tracing::{debug, info};
use virt::storage_vol::StorageVol;

use super::{JobRun, OverlayFacts, Refusal, Stage, StageError, StageKind, blocking};
use crate::hypervisor::inspect::{self, VolumeFacts};
use crate::hypervisor::{Op, xml};
use crate::job::BaseLocation;
use crate::settings::{CachedDigest, Settings};

pub struct Overlay;

const GIB: u64 = 1024 * 1024 * 1024;

/// The base image as libvirt sees it, and the pool it lives in.
struct Base {
    pool: String,
    facts: VolumeFacts,
}

impl Stage for Overlay {
    const KIND: StageKind = StageKind::Overlay;

    async fn run(cx: &mut JobRun) -> Result<(), StageError> {
        let base = resolve_base(cx).await?;
        check_base(&base)?;
        let base_sha256 = match &cx.spec().vm.base.sha256 {
            Some(pinned) => Some(verify_digest(cx, &base.facts.path, pinned).await?),
            None => None,
        };

        let vm = &cx.spec().vm;
        let capacity = vm
            .disk_gib
            .map_or(base.facts.capacity_bytes, |gib| gib * GIB);
        if capacity < base.facts.capacity_bytes {
            return Err(Refusal::CapacityBelowBase {
                requested: capacity,
                base: base.facts.capacity_bytes,
            }
            .into());
        }

        let pool = vm.pool.clone().unwrap_or_else(|| base.pool.clone());
        let name = cx.overlay_name();
        let existing = find_volume(cx, &pool, &name).await?;
        let facts = match existing {
            Some(facts) if facts.backing_path.as_deref() == Some(base.facts.path.as_str()) => {
                debug!(volume = %name, "overlay already exists; adopting it");
                facts
            }
            Some(_) => return Err(Refusal::VolumeTaken { volume: name }.into()),
            None => create(cx, &pool, &name, capacity, &base.facts).await?,
        };

        info!(volume = %name, pool = %pool, path = %facts.path, "overlay ready");
        cx.facts.overlay = Some(OverlayFacts {
            pool,
            volume: name,
            path: facts.path,
            base_path: base.facts.path,
            base_sha256,
        });
        Ok(())
    }

    async fn undo(cx: &JobRun) -> Result<(), StageError> {
        let pool = match &cx.facts.overlay {
            Some(overlay) => overlay.pool.clone(),
            None => match &cx.spec().vm.pool {
                Some(pool) => pool.clone(),
                None => match resolve_base(cx).await {
                    Ok(base) => base.pool,
                    // Without its base no overlay was ever made: nothing to undo.
                    Err(StageError::Refused(
                        Refusal::BaseMissing { .. } | Refusal::BaseNotInPool { .. },
                    )) => return Ok(()),
                    Err(e) => return Err(e),
                },
            },
        };
        delete_volume(cx, &pool, &cx.overlay_name()).await
    }

    fn default_timeout(settings: &Settings) -> Duration {
        settings.timeouts.overlay
    }
}

/// Deletes `name` from `pool` if it is there.
pub async fn delete_volume(cx: &JobRun, pool: &str, name: &str) -> Result<(), StageError> {
    let (p, v) = (pool.to_owned(), name.to_owned());
    let op = Op::DeleteVolume {
        volume: name.to_owned(),
    };
    let deleted = cx
        .hv
        .call(op, move |conn| {
            let pool = match conn.lookup_storage_pool_by_name(&p) {
                Ok(pool) => pool,
                Err(e) if is_missing(&e) => return Ok(false),
                Err(e) => return Err(e),
            };
            match pool.lookup_storage_vol_by_name(&v) {
                Ok(vol) => vol.delete(0).map(|()| true),
                Err(e) if is_missing(&e) => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await?;
    if deleted {
        info!(volume = %name, pool = %pool, "overlay deleted");
    }
    Ok(())
}

fn is_missing(e: &virt::error::Error) -> bool {
    matches!(
        Result::from(e.code()),
        Ok(virt::error::ErrorNumber::NoStorageVolume | virt::error::ErrorNumber::NoStoragePool)
    )
}

async fn resolve_base(cx: &JobRun) -> Result<Base, StageError> {
    match cx.spec().vm.base.location.clone() {
        BaseLocation::Volume { pool, volume } => {
            let op = Op::LookupVolume {
                pool: pool.clone(),
                volume: volume.clone(),
            };
            let (p, v) = (pool.clone(), volume.clone());
            let found = cx
                .hv
                .call(op, move |conn| {
                    let pool = conn.lookup_storage_pool_by_name(&p)?;
                    pool.lookup_storage_vol_by_name(&v)?.xml_desc(0)
                })
                .await;
            let xml = match found {
                Ok(xml) => xml,
                Err(e) if e.is_not_found() => {
                    return Err(Refusal::BaseMissing { pool, volume }.into());
                }
                Err(e) => return Err(e.into()),
            };
            Ok(Base {
                pool,
                facts: inspect::volume(&xml)?,
            })
        }
        BaseLocation::Path { path } => {
            let op = Op::LookupVolumeByPath { path: path.clone() };
            let p = path.clone();
            let found = cx
                .hv
                .call(op, move |conn| {
                    let vol = conn.lookup_storage_vol_by_path(&p)?;
                    let pool = vol.lookup_storage_pool()?.name()?;
                    Ok((pool, vol.xml_desc(0)?))
                })
                .await;
            let (pool, xml) = match found {
                Ok(found) => found,
                Err(e) if e.is_not_found() => return Err(Refusal::BaseNotInPool { path }.into()),
                Err(e) => return Err(e.into()),
            };
            Ok(Base {
                pool,
                facts: inspect::volume(&xml)?,
            })
        }
    }
}

/// A base must be self-contained: an overlay on an overlay would leave a chain hatchery does
/// not control.
fn check_base(base: &Base) -> Result<(), Refusal> {
    if base.facts.backing_path.is_some() {
        return Err(Refusal::BaseHasBackingFile {
            path: base.facts.path.clone(),
        });
    }
    if base.facts.has_data_file {
        return Err(Refusal::BaseHasDataFile {
            path: base.facts.path.clone(),
        });
    }
    Ok(())
}

async fn find_volume(
    cx: &JobRun,
    pool: &str,
    name: &str,
) -> Result<Option<VolumeFacts>, StageError> {
    let (p, v) = (pool.to_owned(), name.to_owned());
    let op = Op::LookupVolume {
        pool: pool.to_owned(),
        volume: name.to_owned(),
    };
    let xml = cx
        .hv
        .call(op, move |conn| {
            let pool = conn.lookup_storage_pool_by_name(&p)?;
            match pool.lookup_storage_vol_by_name(&v) {
                Ok(vol) => vol.xml_desc(0).map(Some),
                Err(e) if is_missing(&e) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await?;
    Ok(xml.as_deref().map(inspect::volume).transpose()?)
}

async fn create(
    cx: &JobRun,
    pool: &str,
    name: &str,
    capacity: u64,
    base: &VolumeFacts,
) -> Result<VolumeFacts, StageError> {
    let doc = xml::overlay_volume(name, capacity, &base.path, &base.format);
    let lock = cx.hv.pool_lock(pool);
    let _serialised = lock.lock().await;

    let p = pool.to_owned();
    let op = Op::CreateVolume {
        pool: pool.to_owned(),
        volume: name.to_owned(),
    };
    let xml = cx
        .hv
        .call(op, move |conn| {
            let pool = conn.lookup_storage_pool_by_name(&p)?;
            StorageVol::create_xml(&pool, &doc, 0)?.xml_desc(0)
        })
        .await?;
    Ok(inspect::volume(&xml)?)
}

/// Checks the base's content against the job's pinned digest. Digests are cached by path,
/// size and modification time, so a large base is hashed once, not once per job.
async fn verify_digest(cx: &JobRun, path: &str, pinned: &str) -> Result<String, StageError> {
    let settings = std::sync::Arc::clone(&cx.settings);
    let owned = path.to_owned();
    let actual = blocking(move || cached_sha256(&settings, &owned)).await?;
    let expected = pinned.to_ascii_lowercase();
    if actual != expected {
        return Err(Refusal::BaseModified {
            path: path.to_owned(),
            expected,
            actual,
        }
        .into());
    }
    Ok(actual)
}

fn cached_sha256(settings: &Settings, path: &str) -> Result<String, StageError> {
    let read_err = |source| StageError::ReadBase {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    let mtime = meta.modified().map_err(read_err)?;

    let cache = |s: &Settings| {
        s.digests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(path)
            .cloned()
    };
    if let Some(hit) = cache(settings).filter(|c| c.size == meta.len() && c.mtime == mtime) {
        return Ok(hit.sha256);
    }

    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let sha256 = hex::encode(hasher.finalize());
    let entry = CachedDigest {
        size: meta.len(),
        mtime,
        sha256: sha256.clone(),
    };
    settings
        .digests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(path.to_owned(), entry);
    Ok(sha256)
}
