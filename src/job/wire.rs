//! The job's shapes exactly as they travel, before the one-of choices become enums.
//!
//! serde cannot combine `deny_unknown_fields` with flattened enums, so the messages are read
//! into these flat structs first and converted; an unknown field is an error either way.

use uuid::Uuid;

use super::{BaseLocation, BatchRef, Credential, Deprovision, NicAttach, Provision};
use crate::secret::Secret;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Job {
    id: Uuid,
    #[serde(default)]
    batch: Option<BatchRef>,
    hypervisor: String,
    #[serde(default)]
    provision: Option<Box<Provision>>,
    #[serde(default)]
    deprovision: Option<Deprovision>,
}

impl TryFrom<Job> for super::Job {
    type Error = &'static str;

    fn try_from(raw: Job) -> Result<Self, Self::Error> {
        let work = match (raw.provision, raw.deprovision) {
            (Some(p), None) => super::Work::Provision(p),
            (None, Some(d)) => super::Work::Deprovision(d),
            _ => return Err("a job holds exactly one of `provision` and `deprovision`"),
        };
        Ok(Self {
            id: raw.id,
            batch: raw.batch,
            hypervisor: raw.hypervisor,
            work,
        })
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BaseImage {
    #[serde(default)]
    pool: Option<String>,
    #[serde(default)]
    volume: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
}

impl TryFrom<BaseImage> for super::BaseImage {
    type Error = &'static str;

    fn try_from(raw: BaseImage) -> Result<Self, Self::Error> {
        let location = match (raw.pool, raw.volume, raw.path) {
            (Some(pool), Some(volume), None) => BaseLocation::Volume { pool, volume },
            (None, None, Some(path)) => BaseLocation::Path { path },
            _ => return Err("a base image is either `pool` and `volume`, or `path`"),
        };
        Ok(Self {
            location,
            sha256: raw.sha256,
        })
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NicSpec {
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    bridge: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    mac: Option<String>,
}

impl TryFrom<NicSpec> for super::NicSpec {
    type Error = &'static str;

    fn try_from(raw: NicSpec) -> Result<Self, Self::Error> {
        let attach = match (raw.network, raw.bridge) {
            (Some(network), None) => NicAttach::Network { network },
            (None, Some(bridge)) => NicAttach::Bridge { bridge },
            _ => return Err("a NIC names exactly one of `network` and `bridge`"),
        };
        let model = raw.model.unwrap_or_else(|| "virtio".to_owned());
        Ok(Self {
            attach,
            model,
            mac: raw.mac,
        })
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FinishSpec {
    user: String,
    #[serde(default)]
    password: Option<Secret>,
    #[serde(default)]
    private_key: Option<Secret>,
    #[serde(default)]
    key_name: Option<String>,
    script: String,
    #[serde(default)]
    timeout_secs: Option<u64>,
    #[serde(default)]
    sudo: bool,
    #[serde(default)]
    host_key: Option<String>,
    #[serde(default)]
    port: Option<u16>,
}

/// The finish script's time limit when the job gives none.
const DEFAULT_FINISH_TIMEOUT_SECS: u64 = 600;

impl TryFrom<FinishSpec> for super::FinishSpec {
    type Error = &'static str;

    fn try_from(raw: FinishSpec) -> Result<Self, Self::Error> {
        let credential = match (raw.password, raw.private_key, raw.key_name) {
            (Some(p), None, None) => Credential::Password(p),
            (None, Some(k), None) => Credential::PrivateKey(k),
            (None, None, Some(n)) => Credential::KeyName(n),
            _ => {
                return Err("finish takes exactly one of `password`, `private_key`, `key_name`");
            }
        };
        Ok(Self {
            user: raw.user,
            credential,
            script: raw.script,
            timeout_secs: raw.timeout_secs.unwrap_or(DEFAULT_FINISH_TIMEOUT_SECS),
            sudo: raw.sudo,
            host_key: raw.host_key,
            port: raw.port,
        })
    }
}
