//! The job contract: what an orchestrator asks for, as Rust types that mirror
//! `schemas/job.schema.json`.
//!
//! A message becomes a [`Job`] in two steps: [`parse`] checks it against the embedded JSON
//! Schema and deserialises it, then [`validate`] applies the rules a schema cannot express
//! (capacity against the base, MAC syntax, names that libvirt will see). Both report every
//! problem with the JSON path of the field at fault.

mod limits;
mod parse;
mod validate;
mod wire;

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::secret::Secret;

pub use limits::Limits;
pub use parse::{JOB_SCHEMA, Problem, RejectedJob, parse, parse_value};
pub use validate::validate;

/// One unit of work: provision a VM, or remove one that hatchery provisioned.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "wire::Job")]
pub struct Job {
    /// The idempotency key: the same id never yields two VMs.
    pub id: Uuid,
    pub batch: Option<BatchRef>,
    /// A libvirt URI, or the name of a hypervisor in the worker's configuration.
    pub hypervisor: String,
    pub work: Work,
}

/// What the job does. Exactly one of `provision` and `deprovision` is present in the message.
#[derive(Debug, Clone)]
pub enum Work {
    Provision(Box<Provision>),
    Deprovision(Deprovision),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRef {
    pub id: String,
    /// How many jobs the batch holds, so a consumer can tell when the last one is final.
    pub size: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provision {
    pub vm: VmSpec,
    #[serde(default)]
    pub address: AddressSource,
    #[serde(default)]
    pub finish: Option<FinishSpec>,
    #[serde(default)]
    pub timeouts: StageTimeouts,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Overrides of the worker's retry policy for this job.
    #[serde(default)]
    pub retry: Option<RetrySpec>,
}

/// How this job's stages retry, where it differs from the worker's policy.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default)]
    pub initial_delay_ms: Option<u64>,
    #[serde(default)]
    pub max_delay_secs: Option<u64>,
    #[serde(default)]
    pub max_elapsed_secs: Option<u64>,
    /// Run the finish script again (afresh) when it exits non-zero.
    #[serde(default)]
    pub script_failures: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deprovision {
    /// The domain to remove; it must carry hatchery's metadata.
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    #[serde(default)]
    pub domain_type: DomainType,
    pub base: BaseImage,
    /// The pool the overlay goes to; the base's pool when absent.
    #[serde(default)]
    pub pool: Option<String>,
    /// The overlay's virtual size; the base's size when absent, never below it.
    #[serde(default)]
    pub disk_gib: Option<u64>,
    pub nics: Vec<NicSpec>,
    #[serde(default)]
    pub console: Option<ConsoleSpec>,
    /// Direct kernel boot, for images without a bootloader.
    #[serde(default)]
    pub boot: Option<KernelBoot>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainType {
    #[default]
    Kvm,
    /// Full emulation (TCG), for hosts without hardware virtualisation.
    Qemu,
}

impl DomainType {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainType::Kvm => "kvm",
            DomainType::Qemu => "qemu",
        }
    }
}

/// The read-only image every overlay of it is backed by.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "wire::BaseImage")]
pub struct BaseImage {
    pub location: BaseLocation,
    /// When set, the base's content must hash to this, or the job is refused.
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseLocation {
    Volume { pool: String, volume: String },
    Path { path: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "wire::NicSpec")]
pub struct NicSpec {
    pub attach: NicAttach,
    pub model: String,
    pub mac: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicAttach {
    Network { network: String },
    Bridge { bridge: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSpec {
    #[serde(rename = "type", default)]
    pub kind: ConsoleKind,
    /// Overrides the worker's configured listen address (itself `0.0.0.0` by default).
    #[serde(default)]
    pub listen: Option<IpAddr>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsoleKind {
    #[default]
    Vnc,
    Spice,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelBoot {
    pub kernel: String,
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default)]
    pub cmdline: Option<String>,
}

/// How the worker learns the guest's address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case", deny_unknown_fields)]
pub enum AddressSource {
    /// The DHCP lease libvirt's network handed to the first NIC.
    #[default]
    Lease,
    /// The QEMU guest agent.
    Agent,
    /// The host's ARP table.
    Arp,
    /// An address the orchestrator already knows, because its own DHCP server assigned it.
    Static {
        ip: IpAddr,
        #[serde(default = "default_ssh_port")]
        port: u16,
    },
}

fn default_ssh_port() -> u16 {
    22
}

#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "wire::FinishSpec")]
pub struct FinishSpec {
    pub user: String,
    pub credential: Credential,
    pub script: String,
    pub timeout_secs: u64,
    /// Run the script through sudo; only meaningful when `user` is not root.
    pub sudo: bool,
    /// OpenSSH fingerprint (`SHA256:...`) the guest's host key must match.
    pub host_key: Option<String>,
    /// The SSH port; the address source's port, or 22, when absent.
    pub port: Option<u16>,
}

impl FinishSpec {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

/// How the finish step logs in. Inline secrets work, but naming one the worker holds keeps it
/// out of the queue.
#[derive(Debug, Clone)]
pub enum Credential {
    Password(Secret),
    PrivateKey(Secret),
    /// A private key file in the worker's key directory.
    KeyName(String),
}

/// Per-stage time limits, in seconds; each stage's own default when absent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageTimeouts {
    #[serde(default)]
    pub overlay_secs: Option<u64>,
    #[serde(default)]
    pub domain_secs: Option<u64>,
    #[serde(default)]
    pub address_secs: Option<u64>,
    #[serde(default)]
    pub finish_secs: Option<u64>,
}

/// What happens to the VM when the job fails for good.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Roll back: destroy and undefine the domain, delete the overlay.
    #[default]
    Destroy,
    /// Leave everything for an operator to inspect.
    Keep,
}

impl Job {
    pub fn provision(&self) -> Option<&Provision> {
        match &self.work {
            Work::Provision(p) => Some(p),
            Work::Deprovision(_) => None,
        }
    }

    /// The domain name the job is about, whichever its kind.
    pub fn vm_name(&self) -> &str {
        match &self.work {
            Work::Provision(p) => &p.vm.name,
            Work::Deprovision(d) => &d.name,
        }
    }

    /// The secrets the job carries itself, which its guest's output must not give back.
    pub fn secrets(&self) -> Vec<&Secret> {
        let finish = self.provision().and_then(|p| p.finish.as_ref());
        match finish.map(|f| &f.credential) {
            Some(Credential::Password(s)) | Some(Credential::PrivateKey(s)) => vec![s],
            _ => Vec::new(),
        }
    }
}
