//! The worker's configuration: a TOML file, then environment variables, then `--set` flags,
//! each overriding the one before; validated into typed settings with errors naming the key.
//!
//! Every key can be overridden the same way: `broker.url` is `HATCHERY__BROKER__URL` in the
//! environment and `--set broker.url=...` on the command line. Hypervisors are a table keyed by
//! name, so `hypervisors.kvm-1.concurrency` addresses one of them.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::guest::JumpHost;
use crate::job::{DomainType, Limits};
use crate::retry::RetryPolicy;
use crate::settings::{DefaultTimeouts, Settings};

/// The environment variable prefix; `__` separates the parts of a key.
pub const ENV_PREFIX: &str = "HATCHERY__";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub worker: WorkerConfig,
    pub broker: BrokerConfig,
    pub events: EventsConfig,
    pub hypervisors: BTreeMap<String, HypervisorConfig>,
    pub secrets: SecretsConfig,
    pub timeouts: TimeoutsConfig,
    pub retry: RetryConfig,
    pub limits: LimitsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Names the worker in events' `source`; the host name when empty.
    pub name: String,
    pub concurrency: u16,
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
    /// Where `/metrics`, `/healthz` and `/readyz` listen; off when absent.
    pub metrics_listen: Option<SocketAddr>,
    pub console_listen: IpAddr,
    /// Directory on hypervisors for guests' serial console logs.
    pub serial_log_dir: Option<String>,
    /// How often the worker looks for orphans on its hypervisors; off when absent.
    #[serde(with = "humantime_serde::option")]
    pub reconcile_every: Option<Duration>,
    /// Whether that check removes what it finds, rather than only reporting it.
    pub reconcile_apply: bool,
    /// Whether jobs may give `test:` URIs (libvirt's test driver, for trials and tests).
    pub allow_test_driver: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    pub url: String,
    /// CA bundle for `amqps://` brokers whose certificate a public CA did not sign.
    pub tls_ca: Option<PathBuf>,
    /// Prefix of every exchange and queue name.
    pub prefix: String,
    /// RabbitMQ's consumer ack timeout, which jobs longer than it must be designed around.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    pub prefix: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HypervisorConfig {
    pub uri: String,
    #[serde(default)]
    pub domain_type: Option<DomainType>,
    #[serde(default)]
    pub pool: Option<String>,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub console_listen: Option<IpAddr>,
    /// Most jobs this hypervisor runs at once, across the whole fleet.
    #[serde(default = "default_hypervisor_concurrency")]
    pub concurrency: u16,
    /// Reach guests through an SSH jump host, `[user@]host[:port]`, or `"auto"` for the user
    /// and host of a `qemu+ssh://` URI: for workers that cannot route to guest networks.
    #[serde(default)]
    pub jump_host: Option<String>,
    /// The private key `ssh` logs in to the jump host with.
    #[serde(default)]
    pub jump_identity: Option<PathBuf>,
    /// The `known_hosts` file listing the jump host.
    #[serde(default)]
    pub jump_known_hosts: Option<PathBuf>,
    /// Base image volumes in `pool` that `hatchery check` makes sure are there.
    #[serde(default)]
    pub bases: Vec<String>,
}

impl HypervisorConfig {
    /// The jump host guests of this hypervisor are reached through, if any.
    pub fn jump(&self) -> Option<JumpHost> {
        let spec = self.jump_host.as_deref()?;
        let mut jump = match spec {
            "auto" => JumpHost::from_libvirt_uri(&self.uri)?,
            spec => JumpHost::parse(spec)?,
        };
        jump.identity.clone_from(&self.jump_identity);
        jump.known_hosts.clone_from(&self.jump_known_hosts);
        Some(jump)
    }
}

fn default_hypervisor_concurrency() -> u16 {
    4
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// Private keys that jobs name with `key_name`.
    pub key_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    #[serde(with = "humantime_serde")]
    pub overlay: Duration,
    #[serde(with = "humantime_serde")]
    pub domain: Duration,
    #[serde(with = "humantime_serde")]
    pub address: Duration,
    #[serde(with = "humantime_serde")]
    pub finish_connect: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub max_elapsed: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub message_bytes: usize,
    pub script_bytes: usize,
    pub nics: usize,
    pub output_tail_bytes: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            concurrency: 16,
            grace_period: Duration::from_secs(60),
            metrics_listen: None,
            console_listen: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            serial_log_dir: None,
            reconcile_every: None,
            reconcile_apply: false,
            allow_test_driver: false,
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: crate::fleet::DEFAULT_AMQP_URL.to_owned(),
            tls_ca: None,
            prefix: crate::fleet::DEFAULT_PREFIX.to_owned(),
            ack_timeout: Duration::from_secs(30 * 60),
        }
    }
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            prefix: crate::events::DEFAULT_PREFIX.to_owned(),
        }
    }
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        let t = Settings::default().timeouts;
        Self {
            overlay: t.overlay,
            domain: t.domain,
            address: t.address,
            finish_connect: t.finish_connect,
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        let r = RetryPolicy::default();
        Self {
            initial_delay: r.initial_delay,
            max_delay: r.max_delay,
            max_attempts: r.max_attempts,
            max_elapsed: r.max_elapsed,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let l = Limits::default();
        Self {
            message_bytes: l.message_bytes,
            script_bytes: l.script_bytes,
            nics: l.nics,
            output_tail_bytes: l.output_tail_bytes,
        }
    }
}

/// A configuration that cannot be used, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config is not valid TOML or has a wrong key or type")]
    Parse(#[source] toml::de::Error),
    #[error("`{key}` = {value:?} (from {origin}) is not valid TOML")]
    Override {
        key: String,
        value: String,
        origin: String,
    },
    #[error("`{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

impl Config {
    /// Reads `file` (if any), applies `HATCHERY__*` variables from `env`, then `sets`
    /// (`key=value`), and validates the result.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        sets: &[String],
    ) -> Result<Self, ConfigError> {
        let text = match file {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        let mut doc: toml::Table = toml::from_str(&text).map_err(ConfigError::Parse)?;

        for (name, value) in env {
            if let Some(key) = name.strip_prefix(ENV_PREFIX) {
                let key = key.to_ascii_lowercase().replace("__", ".");
                set(&mut doc, &key, &value, &name)?;
            }
        }
        for pair in sets {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(ConfigError::Invalid {
                    key: pair.clone(),
                    problem: "--set takes key=value".to_owned(),
                });
            };
            set(&mut doc, key.trim(), value, "--set")?;
        }

        let config: Config = doc.try_into().map_err(ConfigError::Parse)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, problem: &str| {
            Err(ConfigError::Invalid {
                key: key.to_owned(),
                problem: problem.to_owned(),
            })
        };
        if self.worker.concurrency == 0 {
            return bad("worker.concurrency", "must be at least 1");
        }
        if !(self.broker.url.starts_with("amqp://") || self.broker.url.starts_with("amqps://")) {
            return bad("broker.url", "must start with amqp:// or amqps://");
        }
        if self.broker.ack_timeout < Duration::from_secs(10) {
            return bad("broker.ack_timeout", "must be at least 10s");
        }
        let r = &self.retry;
        if r.max_attempts == 0 {
            return bad("retry.max_attempts", "must be at least 1");
        }
        if r.max_delay < r.initial_delay {
            return bad("retry.max_delay", "must not be below retry.initial_delay");
        }
        let t = &self.timeouts;
        for (key, d) in [
            ("timeouts.overlay", t.overlay),
            ("timeouts.domain", t.domain),
            ("timeouts.address", t.address),
            ("timeouts.finish_connect", t.finish_connect),
        ] {
            if d.is_zero() {
                return bad(key, "must be above zero");
            }
        }
        if self.limits.message_bytes < 1024 {
            return bad("limits.message_bytes", "must be at least 1024");
        }
        for (name, hv) in &self.hypervisors {
            let key = format!("hypervisors.{name}");
            if !hv.uri.contains("://") {
                return bad(&format!("{key}.uri"), "must be a libvirt URI");
            }
            if hv.concurrency == 0 {
                return bad(&format!("{key}.concurrency"), "must be at least 1");
            }
            if hv.jump_host.is_some() && hv.jump().is_none() {
                return bad(
                    &format!("{key}.jump_host"),
                    "must be [user@]host[:port], or \"auto\" with a qemu+ssh:// uri",
                );
            }
        }
        Ok(())
    }

    /// The settings jobs run with on this worker.
    pub fn settings(&self) -> Settings {
        let hypervisors: HashMap<String, String> = self
            .hypervisors
            .iter()
            .map(|(name, hv)| (name.clone(), hv.uri.clone()))
            .collect();
        let jump_hosts = (self.hypervisors.values())
            .filter_map(|hv| Some((hv.uri.clone(), hv.jump()?)))
            .collect();
        Settings {
            console_listen: self.worker.console_listen,
            hypervisors,
            jump_hosts,
            allow_test_driver: self.worker.allow_test_driver,
            key_dir: self.secrets.key_dir.clone(),
            serial_log_dir: self.worker.serial_log_dir.clone(),
            limits: Limits {
                message_bytes: self.limits.message_bytes,
                script_bytes: self.limits.script_bytes,
                nics: self.limits.nics,
                output_tail_bytes: self.limits.output_tail_bytes,
            },
            retry: RetryPolicy {
                initial_delay: self.retry.initial_delay,
                max_delay: self.retry.max_delay,
                max_attempts: self.retry.max_attempts,
                max_elapsed: self.retry.max_elapsed,
            },
            timeouts: DefaultTimeouts {
                overlay: self.timeouts.overlay,
                domain: self.timeouts.domain,
                address: self.timeouts.address,
                finish_connect: self.timeouts.finish_connect,
            },
            ..Settings::default()
        }
    }
}

/// Sets dotted `key` in `doc` to `raw`, read as TOML when it parses as a value and as a plain
/// string otherwise (so `broker.url=amqp://...` needs no quotes).
fn set(doc: &mut toml::Table, key: &str, raw: &str, origin: &str) -> Result<(), ConfigError> {
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));

    let parts: Vec<&str> = key.split('.').collect();
    let (last, path) = parts.split_last().expect("split always yields one part");
    let mut table = doc;
    for part in path {
        let entry = table
            .entry((*part).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| ConfigError::Override {
            key: key.to_owned(),
            value: raw.to_owned(),
            origin: origin.to_owned(),
        })?;
    }
    table.insert((*last).to_owned(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: &str, env: &[(&str, &str)], sets: &[&str]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("hatchery.toml");
        std::fs::write(&path, file).expect("write config");
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
        let sets: Vec<String> = sets.iter().map(|s| (*s).to_owned()).collect();
        Config::load(Some(&path), env, &sets)
    }

    #[test]
    fn file_then_environment_then_flags() {
        let file = "[broker]\nurl = \"amqp://file\"\n[worker]\nconcurrency = 2\n\
                    [hypervisors.kvm-1]\nuri = \"qemu:///system\"\n";
        let config = load(
            file,
            &[
                ("HATCHERY__WORKER__CONCURRENCY", "5"),
                ("HATCHERY__BROKER__URL", "amqp://env"),
            ],
            &["broker.url=amqp://flag", "hypervisors.kvm-1.concurrency=9"],
        )
        .expect("valid");
        assert_eq!(config.worker.concurrency, 5);
        assert_eq!(config.broker.url, "amqp://flag");
        assert_eq!(config.hypervisors["kvm-1"].concurrency, 9);
        assert_eq!(config.settings().hypervisors["kvm-1"], "qemu:///system");
    }

    #[test]
    fn the_example_file_is_valid() {
        let text = include_str!("../hatchery.example.toml");
        let config = load(text, &[], &[]).expect("the example parses and validates");
        assert_eq!(config.hypervisors.len(), 2);
        let jump = config.hypervisors["kvm-1"].jump().expect("auto jump host");
        assert_eq!(
            (jump.user.as_deref(), jump.host.as_str()),
            (Some("hatchery"), "kvm-1.example.com")
        );
    }

    #[test]
    fn errors_name_the_key() {
        let err = load("[retry]\nmax_attempts = 0\n", &[], &[]).expect_err("invalid");
        assert!(err.to_string().contains("retry.max_attempts"), "{err}");
        let err = load("[worker]\nconcurency = 3\n", &[], &[]).expect_err("typo");
        let chain = format!("{err}: {}", std::error::Error::source(&err).expect("cause"));
        assert!(chain.contains("concurency"), "{chain}");
        let err = load("", &[("HATCHERY__TIMEOUTS__ADDRESS", "0s")], &[]).expect_err("zero");
        assert!(err.to_string().contains("timeouts.address"), "{err}");
    }
}
