//! The worker's own settings that shape how jobs run: defaults a job may override, limits it may
//! not, and the hypervisors it may name.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use crate::guest::JumpHost;
use crate::job::Limits;
use crate::retry::RetryPolicy;

#[derive(Debug)]
pub struct Settings {
    /// Where consoles listen unless the job says otherwise.
    pub console_listen: IpAddr,
    /// Named hypervisors a job may refer to instead of giving a URI.
    pub hypervisors: HashMap<String, String>,
    /// Whether jobs may give `test:` URIs of libvirt's test driver, which read a file of the
    /// worker's choosing; configured hypervisors may always be test drivers.
    pub allow_test_driver: bool,
    /// Hypervisors (by URI) whose guests are reached through an SSH jump host.
    pub jump_hosts: HashMap<String, JumpHost>,
    /// Directory of private keys that jobs may name with `key_name`.
    pub key_dir: Option<PathBuf>,
    /// Directory on the hypervisor for the guests' serial console logs.
    pub serial_log_dir: Option<String>,
    pub limits: Limits,
    pub retry: RetryPolicy,
    pub timeouts: DefaultTimeouts,
    /// How often the address stage asks libvirt for the guest's address.
    pub address_poll: Duration,
    /// How often a running job refreshes its record in the domain's metadata.
    pub heartbeat: Duration,
    /// Base image digests already computed, keyed by path, valid while size and mtime hold.
    pub digests: Mutex<HashMap<String, CachedDigest>>,
}

#[derive(Debug, Clone)]
pub struct DefaultTimeouts {
    pub overlay: Duration,
    pub domain: Duration,
    pub address: Duration,
    /// The SSH stage's limit on top of the script's own timeout: waiting for sshd, logging in.
    pub finish_connect: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedDigest {
    pub size: u64,
    pub mtime: std::time::SystemTime,
    pub sha256: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            console_listen: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            hypervisors: HashMap::new(),
            jump_hosts: HashMap::new(),
            allow_test_driver: false,
            key_dir: None,
            serial_log_dir: None,
            limits: Limits::default(),
            retry: RetryPolicy::default(),
            timeouts: DefaultTimeouts {
                overlay: Duration::from_secs(600),
                domain: Duration::from_secs(120),
                address: Duration::from_secs(300),
                finish_connect: Duration::from_secs(300),
            },
            address_poll: Duration::from_millis(200),
            heartbeat: Duration::from_secs(60),
            digests: Mutex::new(HashMap::new()),
        }
    }
}

impl Settings {
    /// The libvirt URI a job's `hypervisor` field stands for.
    pub fn resolve_hypervisor<'a>(&'a self, name_or_uri: &'a str) -> Option<&'a str> {
        if name_or_uri.contains("://") {
            Some(name_or_uri)
        } else {
            self.hypervisors.get(name_or_uri).map(String::as_str)
        }
    }
}
