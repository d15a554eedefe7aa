//! How a stage fails, and the bounded classes those failures are counted and reported by.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::guest::SshError;
use crate::hypervisor::LibvirtError;
use crate::hypervisor::inspect::InspectError;
use crate::hypervisor::metadata::MetadataError;

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error(transparent)]
    Inspect(#[from] InspectError),
    #[error("domain carries unreadable hatchery metadata")]
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("could not read base image `{path}`")]
    ReadBase {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not read key `{name}` from the worker's key directory")]
    ReadKey {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no address for MAC {mac} within {after:?}")]
    NoAddress { mac: String, after: Duration },
    #[error("finish script exited with status {code}")]
    ScriptFailed { code: i32 },
    #[error("stage did not finish within {0:?}")]
    Timeout(Duration),
    #[error("job was cancelled")]
    Cancelled,
    /// An earlier run failed, recorded why in the domain, and died rolling back.
    #[error(
        "an earlier run of this job failed{} and began rolling back; this run finished the rollback",
        earlier.as_ref().map(|f| format!(" ({}: {})", f.class.as_str(), f.message)).unwrap_or_default()
    )]
    Interrupted {
        earlier: Option<crate::events::Failure>,
    },
}

/// A job hatchery will not carry out as asked; retrying cannot help.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("disk capacity {requested} bytes is below the base image's {base} bytes")]
    CapacityBelowBase { requested: u64, base: u64 },
    #[error("base image `{path}` has a backing file of its own")]
    BaseHasBackingFile { path: String },
    #[error("base image `{path}` has an external data file")]
    BaseHasDataFile { path: String },
    #[error("base image `{path}` has sha256 {actual}, not the pinned {expected}")]
    BaseModified {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("base image `{path}` is not in a storage pool of this hypervisor")]
    BaseNotInPool { path: String },
    #[error("base image `{volume}` is not in storage pool `{pool}` of this hypervisor")]
    BaseMissing { pool: String, volume: String },
    #[error("volume `{volume}` exists but is not this job's overlay of the base")]
    VolumeTaken { volume: String },
    #[error("domain `{name}` exists and belongs to another job or to nobody")]
    DomainTaken { name: String },
    #[error("domain `{name}` was not made by hatchery; refusing to touch it")]
    NotHatcherys { name: String },
    #[error("lease lookup needs NIC 0 on a libvirt network, not a bridge")]
    LeaseNeedsNetwork,
    #[error("hypervisor `{uri}` is libvirt's test driver, whose address {ip} is made up")]
    MadeUpAddress { uri: String, ip: std::net::IpAddr },
    #[error("unknown hypervisor `{0}`: not a libvirt URI nor a configured name")]
    UnknownHypervisor(String),
    #[error("hypervisor `{0}` is libvirt's test driver, which this worker does not take from jobs")]
    TestDriverDisabled(String),
    #[error("key `{0}` is neither in the worker's key directory nor in its environment")]
    UnknownKey(String),
}

/// The kind of a failure, a small fixed set fit for metric labels and orchestrators' decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// libvirt could not be reached or was busy; retried.
    LibvirtUnavailable,
    /// libvirt refused the call.
    Libvirt,
    /// sshd did not answer, or the connection dropped; retried.
    SshUnavailable,
    /// sshd answered but rejected the credentials.
    SshAuth,
    HostKeyMismatch,
    Ssh,
    ScriptFailed,
    ScriptTimeout,
    NoAddress,
    Timeout,
    Refused,
    Cancelled,
    /// A failure an earlier, crashed run already decided; only its rollback was left.
    Interrupted,
    Internal,
}

impl ErrorClass {
    /// The class [`ErrorClass::as_str`] names, as the wire format spells it.
    pub fn parse(text: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::from(text)).ok()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::LibvirtUnavailable => "libvirt_unavailable",
            ErrorClass::Libvirt => "libvirt",
            ErrorClass::SshUnavailable => "ssh_unavailable",
            ErrorClass::SshAuth => "ssh_auth",
            ErrorClass::HostKeyMismatch => "host_key_mismatch",
            ErrorClass::Ssh => "ssh",
            ErrorClass::ScriptFailed => "script_failed",
            ErrorClass::ScriptTimeout => "script_timeout",
            ErrorClass::NoAddress => "no_address",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Refused => "refused",
            ErrorClass::Cancelled => "cancelled",
            ErrorClass::Interrupted => "interrupted",
            ErrorClass::Internal => "internal",
        }
    }
}

impl StageError {
    pub fn class(&self) -> ErrorClass {
        match self {
            StageError::Libvirt(e) if e.is_transient() => ErrorClass::LibvirtUnavailable,
            StageError::Libvirt(_) => ErrorClass::Libvirt,
            StageError::Ssh(e) => ssh_class(e),
            StageError::Inspect(_) | StageError::Metadata(_) => ErrorClass::Internal,
            StageError::Refused(_) | StageError::ReadBase { .. } | StageError::ReadKey { .. } => {
                ErrorClass::Refused
            }
            StageError::NoAddress { .. } => ErrorClass::NoAddress,
            StageError::ScriptFailed { .. } => ErrorClass::ScriptFailed,
            StageError::Timeout(_) => ErrorClass::Timeout,
            StageError::Cancelled => ErrorClass::Cancelled,
            // A cancelled run's rollback is reported as a cancellation again: the same final
            // event, under the same id.
            StageError::Interrupted { earlier: Some(f) } if f.class == ErrorClass::Cancelled => {
                ErrorClass::Cancelled
            }
            StageError::Interrupted { .. } => ErrorClass::Interrupted,
        }
    }

    /// Whether the hypervisor could not be reached: no attempt at the stage's work was made.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, StageError::Libvirt(e) if e.is_unreachable())
    }

    /// Whether another attempt of the same stage may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StageError::Libvirt(e) => e.is_transient(),
            StageError::Ssh(e) => e.is_transient(),
            _ => false,
        }
    }
}

fn ssh_class(e: &SshError) -> ErrorClass {
    match e {
        SshError::HostKeyMismatch { .. } => ErrorClass::HostKeyMismatch,
        SshError::Authenticate { .. } | SshError::NoUsableAuthMethod { .. } => ErrorClass::SshAuth,
        SshError::ScriptTimedOut { .. } => ErrorClass::ScriptTimeout,
        SshError::Cancelled => ErrorClass::Cancelled,
        SshError::SshdNotReady { .. } => ErrorClass::SshUnavailable,
        e if e.is_transient() => ErrorClass::SshUnavailable,
        _ => ErrorClass::Ssh,
    }
}
