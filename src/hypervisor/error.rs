//! Failures of calls into libvirt, each tagged with the operation that failed.

use std::fmt;

use virt::error::{ErrorDomain, ErrorNumber};

/// A libvirt call that failed. `op` says which; the cause is libvirt's own error.
#[derive(Debug, thiserror::Error)]
#[error("could not {op}")]
pub struct LibvirtError {
    pub op: Op,
    #[source]
    pub source: virt::error::Error,
}

/// The libvirt operations hatchery performs; the closed set of things that can fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Connect { uri: String },
    LookupPool { pool: String },
    LookupVolume { pool: String, volume: String },
    LookupVolumeByPath { path: String },
    ReadVolume { volume: String },
    CreateVolume { pool: String, volume: String },
    DeleteVolume { volume: String },
    LookupDomain { name: String },
    ReadDomain { name: String },
    DefineDomain { name: String },
    StartDomain { name: String },
    DestroyDomain { name: String },
    UndefineDomain { name: String },
    WriteMetadata { name: String },
    ReadAddresses { name: String },
    ReadLeases { network: String },
    ListDomains,
    ListPools,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Connect { uri } => write!(f, "connect to {uri}"),
            Op::LookupPool { pool } => write!(f, "find storage pool `{pool}`"),
            Op::LookupVolume { pool, volume } => write!(f, "find volume `{volume}` in `{pool}`"),
            Op::LookupVolumeByPath { path } => write!(f, "find a volume at `{path}`"),
            Op::ReadVolume { volume } => write!(f, "read volume `{volume}`"),
            Op::CreateVolume { pool, volume } => write!(f, "create volume `{volume}` in `{pool}`"),
            Op::DeleteVolume { volume } => write!(f, "delete volume `{volume}`"),
            Op::LookupDomain { name } => write!(f, "find domain `{name}`"),
            Op::ReadDomain { name } => write!(f, "read domain `{name}`"),
            Op::DefineDomain { name } => write!(f, "define domain `{name}`"),
            Op::StartDomain { name } => write!(f, "start domain `{name}`"),
            Op::DestroyDomain { name } => write!(f, "destroy domain `{name}`"),
            Op::UndefineDomain { name } => write!(f, "undefine domain `{name}`"),
            Op::WriteMetadata { name } => write!(f, "write metadata of domain `{name}`"),
            Op::ReadAddresses { name } => write!(f, "read addresses of domain `{name}`"),
            Op::ReadLeases { network } => write!(f, "read DHCP leases of network `{network}`"),
            Op::ListDomains => f.write_str("list domains"),
            Op::ListPools => f.write_str("list storage pools"),
        }
    }
}

impl LibvirtError {
    pub fn new(op: Op, source: virt::error::Error) -> Self {
        Self { op, source }
    }

    fn code(&self) -> Option<ErrorNumber> {
        Result::from(self.source.code()).ok()
    }

    /// Whether the object the call looked for does not exist (as opposed to a failing call).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.code(),
            Some(
                ErrorNumber::NoDomain
                    | ErrorNumber::NoStorageVolume
                    | ErrorNumber::NoStoragePool
                    | ErrorNumber::NoNetwork
                    | ErrorNumber::NoDomainMetadata
            )
        )
    }

    /// Whether trying again later may succeed: the daemon went away, a call timed out, or the
    /// object is busy with another job.
    pub fn is_transient(&self) -> bool {
        let connection_lost = matches!(Result::from(self.source.domain()), Ok(ErrorDomain::Rpc))
            || matches!(
                self.code(),
                Some(
                    ErrorNumber::NoConnect
                        | ErrorNumber::Rpc
                        | ErrorNumber::SystemError
                        | ErrorNumber::OperationTimeout
                        | ErrorNumber::AgentUnresponsive
                )
            );
        let busy = self.source.message().contains("asynchronous jobs running")
            || self.source.message().contains("in use by");
        connection_lost || busy
    }

    /// Whether the hypervisor could not be reached at all (its daemon down or restarting), as
    /// opposed to a call that reached it and failed.
    pub fn is_unreachable(&self) -> bool {
        // A socket the worker may not open is a configuration to fix, not a daemon to await.
        let refused = self.source.message().contains("Permission denied");
        matches!(self.op, Op::Connect { .. }) && self.is_transient() && !refused
    }

    /// Whether libvirt does not implement the call for this hypervisor (the test driver, say).
    pub fn is_unsupported(&self) -> bool {
        matches!(self.code(), Some(ErrorNumber::NoSupport))
    }
}
