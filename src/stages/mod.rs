//! The stages a job runs through, one file each, all with the same shape: [`Stage::run`] makes
//! the stage's artefact or finds the one an earlier attempt made, [`Stage::undo`] removes it.

pub mod address;
pub mod domain;
mod error;
pub mod finish;
pub mod overlay;
pub mod rollback;
pub mod teardown;

use std::future::Future;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::guest::FinishOutcome;
use crate::hypervisor::Hypervisor;
use crate::job::{Job, Provision};
use crate::settings::Settings;

pub use error::{ErrorClass, Refusal, StageError};

/// Every stage a job can be in; the order of the provisioning ones is the order they run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    Overlay,
    Domain,
    Address,
    Finish,
    /// The one stage of a deprovisioning job.
    Teardown,
}

impl StageKind {
    pub const PROVISION: [StageKind; 4] = [
        StageKind::Overlay,
        StageKind::Domain,
        StageKind::Address,
        StageKind::Finish,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StageKind::Overlay => "overlay",
            StageKind::Domain => "domain",
            StageKind::Address => "address",
            StageKind::Finish => "finish",
            StageKind::Teardown => "teardown",
        }
    }
}

impl FromStr for StageKind {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        [
            Self::Overlay,
            Self::Domain,
            Self::Address,
            Self::Finish,
            Self::Teardown,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or(())
    }
}

impl std::fmt::Display for StageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The interface every stage file implements.
pub trait Stage {
    const KIND: StageKind;

    /// Makes the stage's artefact, or adopts the one an earlier attempt of the same job made.
    fn run(cx: &mut JobRun) -> impl Future<Output = Result<(), StageError>> + Send;

    /// Removes what `run` made, if it exists and belongs to this job. Safe to call repeatedly.
    fn undo(cx: &JobRun) -> impl Future<Output = Result<(), StageError>> + Send;

    /// How long one attempt may take when the job does not say.
    fn default_timeout(settings: &Settings) -> Duration;
}

/// One job's run on one worker: its inputs, and the facts the stages have learnt so far.
#[derive(Debug)]
pub struct JobRun {
    pub job: Arc<Job>,
    pub hv: Arc<Hypervisor>,
    pub settings: Arc<Settings>,
    pub cancel: CancellationToken,
    /// How many times this job has been started, this time included.
    pub attempt: u32,
    /// When the running stage must give up; set by the pipeline before each attempt.
    pub deadline: tokio::time::Instant,
    /// How many times the finish script was run afresh after failing, on the job's request.
    pub script_run: u32,
    pub facts: Facts,
}

/// What the stages found out, reported in the job's result.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub overlay: Option<OverlayFacts>,
    pub domain_name: Option<String>,
    pub domain_uuid: Option<Uuid>,
    pub macs: Vec<String>,
    /// When the domain was last started, seconds since the epoch.
    pub started_at: Option<i64>,
    pub address: Option<SocketAddr>,
    pub finish: Option<FinishOutcome>,
    /// Set by deprovisioning when the domain was already gone.
    pub already_absent: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayFacts {
    pub pool: String,
    pub volume: String,
    pub path: String,
    pub base_path: String,
    pub base_sha256: Option<String>,
}

impl JobRun {
    pub fn new(job: Arc<Job>, hv: Arc<Hypervisor>, settings: Arc<Settings>, attempt: u32) -> Self {
        Self {
            job,
            hv,
            settings,
            cancel: CancellationToken::new(),
            attempt,
            deadline: tokio::time::Instant::now(),
            script_run: 0,
            facts: Facts::default(),
        }
    }

    /// The provisioning request. Stages other than teardown only run for provisioning jobs.
    pub fn spec(&self) -> &Provision {
        self.job
            .provision()
            .expect("provisioning stages run only for provisioning jobs")
    }

    /// The overlay volume's name: derived from the job, so a re-run finds the same volume.
    pub fn overlay_name(&self) -> String {
        format!("{}-{}.qcow2", self.job.vm_name(), self.job.id)
    }

    /// The MAC of NIC `index`: the job's own, or one derived from the job id so that a
    /// redelivered job defines the same NICs again.
    pub fn mac(&self, index: usize) -> String {
        if let Some(mac) = self.spec().vm.nics.get(index).and_then(|n| n.mac.as_ref()) {
            return mac.to_ascii_lowercase();
        }
        let seed = Uuid::new_v5(&self.job.id, format!("nic{index}").as_bytes());
        let b = seed.as_bytes();
        // 52:54:00 is QEMU's locally administered prefix, the one libvirt itself uses.
        format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
    }
}

/// Runs `f` on tokio's blocking pool; for ssh2 and file hashing, which block.
pub async fn blocking<T, F>(f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()))
}
