//! Real guests through the real broker: `hatchery worker` inside the real-VM namespace, jobs for
//! the test image, and checks made without hatchery (virsh, ssh) after the fact.
//!
//! The worker must run in the namespace, the only place the guests are reachable; it reaches
//! RabbitMQ through the environment's relay. Jobs and events go through the root namespace's
//! broker at 127.0.0.1:5672, recorded by [`Fleet`].
#![allow(
    dead_code,
    reason = "each test binary uses only some of the shared helpers"
)]

use std::fs::File;
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use hatchery::events::{Event, EventData, EventKind, JobResult};
use hatchery::stages::StageKind;

use super::fleet::{Fleet, WorkerProcess};
use super::vmenv::{VmEnv, VmEnvGuard};
use super::wait_until;

/// The name the worker's configuration gives the environment's hypervisor. Jobs name it
/// because the URI carries a socket parameter, which job URIs may not.
pub const HYPERVISOR: &str = "e2e";

/// Real guests cost a core each under TCG: the tests of one binary take turns.
static TURN: Mutex<()> = Mutex::new(());

pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

/// One test's fleet on the real-VM environment.
pub struct VmFleet {
    pub fleet: Fleet,
    pub vm: VmEnvGuard,
    config: std::path::PathBuf,
}

impl VmFleet {
    /// Brings the environment up (or joins it), removes what an earlier failed test left in it,
    /// and writes the worker's configuration.
    pub fn new() -> Self {
        let vm = VmEnv::acquire();
        let fleet = Fleet::new();
        let env = &vm.env;
        // Quoted as TOML strings: the URI has characters a bare value may not.
        let quote = |s: &str| toml::Value::String(s.to_owned()).to_string();
        let key_dir = std::path::Path::new(env.get("SSH_KEY")).parent().unwrap();
        let config = format!(
            "[hypervisors.{HYPERVISOR}]\nuri = {}\n\n[worker]\nserial_log_dir = {}\n\n\
             [secrets]\nkey_dir = {}\n",
            quote(env.get("LIBVIRT_URI")),
            quote(env.get("CONSOLE_DIR")),
            quote(key_dir.to_str().unwrap()),
        );
        let path = fleet.dir.path().join("worker.toml");
        std::fs::write(&path, config).unwrap();

        let this = Self {
            fleet,
            vm,
            config: path,
        };
        this.purge();
        this
    }

    pub fn env(&self) -> &VmEnv {
        &self.vm.env
    }

    /// Starts `hatchery worker` inside the namespace on this fleet's names, with `extra` flags.
    pub fn worker(&self, name: &str, extra: &[&str]) -> WorkerProcess {
        let env = self.env();
        let log = self.fleet.dir.path().join(format!("{name}.log"));
        let filter = std::env::var("HATCHERY_TEST_LOG").unwrap_or_else(|_| "info,lapin=off".into());
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                env.get("NETNS"),
                env!("CARGO_BIN_EXE_hatchery"),
            ])
            .args(["worker", "--name", name, "--prefix", &self.fleet.prefix])
            .args(["--amqp-url", env.get("AMQP_URL")])
            .arg("--config")
            .arg(&self.config)
            .args(extra)
            .env("RUST_LOG", filter)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        WorkerProcess {
            child,
            name: name.to_owned(),
            log,
        }
    }

    /// `hatchery ARGS --prefix <prefix>` in the root namespace, on the root broker.
    pub fn hatchery(&self, args: &[&str]) -> Output {
        self.fleet.hatchery(args).output().unwrap()
    }

    /// A job for a guest of the test image on the DHCP network, logging in with the test key
    /// (named, from the worker's key directory) to run `script`.
    pub fn job(&self, name: &str, script: &str) -> Value {
        let env = self.env();
        let key_name = std::path::Path::new(env.get("SSH_KEY"))
            .file_name()
            .unwrap();
        json!({
            "id": Uuid::new_v4(),
            "hypervisor": HYPERVISOR,
            "provision": {
                "vm": {
                    "name": name,
                    "vcpus": 1,
                    "memory_mib": 256,
                    "domain_type": env.get("DOMAIN_TYPE"),
                    "base": {
                        "pool": env.get("POOL"),
                        "volume": env.get("BASE_VOLUME"),
                        "sha256": env.get("BASE_SHA256")
                    },
                    "disk_gib": 1,
                    "nics": [{ "network": env.get("NETWORK") }],
                    "console": { "type": "vnc", "listen": "127.0.0.1" },
                    "boot": {
                        "kernel": env.get("KERNEL"),
                        "initrd": env.get("INITRD"),
                        "cmdline": format!("{} hatchery.hostname={name}", env.get("CMDLINE"))
                    }
                },
                "address": { "source": "lease" },
                "finish": {
                    "user": env.get("SSH_USER"),
                    "key_name": key_name.to_str().unwrap(),
                    "script": script,
                    "timeout_secs": 60
                },
                "timeouts": { "address_secs": 120, "finish_secs": 120 }
            }
        })
    }

    pub fn deprovision_job(&self, name: &str) -> Value {
        json!({ "id": Uuid::new_v4(), "hypervisor": HYPERVISOR, "deprovision": { "name": name } })
    }

    /// Publishes `job` with `hatchery submit` (a connection of its own, so that it works after
    /// a broker restart too) and returns its id.
    pub fn submit(&self, job: &Value) -> String {
        let id = job["id"].as_str().unwrap().to_owned();
        let path = self.fleet.dir.path().join(format!("job-{id}.json"));
        std::fs::write(&path, job.to_string()).unwrap();
        let out = self.hatchery(&["submit", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "hatchery submit: {stderr}");
        id
    }

    /// Submits `jobs` with `hatchery submit --wait` from the root namespace, with `extra` flags
    /// (`--batch`, say); its output once every job is final.
    pub fn submit_and_wait(&self, jobs: &[Value], extra: &[&str]) -> Output {
        let files: Vec<String> = (jobs.iter().enumerate())
            .map(|(i, job)| {
                let path = self
                    .fleet
                    .dir
                    .path()
                    .join(format!("job-{i}-{}.json", job["id"].as_str().unwrap()));
                std::fs::write(&path, job.to_string()).unwrap();
                path.to_str().unwrap().to_owned()
            })
            .collect();
        let mut args = vec!["submit", "--wait", "--timeout", "10m"];
        args.extend(extra);
        args.extend(files.iter().map(String::as_str));
        self.hatchery(&args)
    }

    /// Every final event recorded for job `id`, copies included.
    pub fn finals(&self, id: &str) -> Vec<Event> {
        self.fleet.finals().remove(id).unwrap_or_default()
    }

    /// The first final event of job `id`, waiting up to `timeout` for it.
    pub fn wait_final(&self, id: &str, timeout: Duration) -> Option<Event> {
        wait_until(timeout, || !self.finals(id).is_empty());
        self.finals(id).into_iter().next()
    }

    /// How many `kind` events of `stage` job `id` has had so far.
    pub fn stage_events(&self, id: &str, kind: EventKind, stage: StageKind) -> usize {
        (self.fleet.events().iter())
            .filter(|e| e.subject == id && e.kind() == Some(kind))
            .filter(|e| matches!(&e.data, EventData::Stage(s) if s.stage == stage))
            .count()
    }

    /// Waits until job `id` has had more than `seen` `kind` events of `stage`.
    pub fn wait_stage(
        &self,
        id: &str,
        kind: EventKind,
        stage: StageKind,
        seen: usize,
        timeout: Duration,
    ) -> bool {
        wait_until(timeout, || self.stage_events(id, kind, stage) > seen)
    }

    /// Names of every domain libvirt knows, running or not.
    pub fn domains(&self) -> Vec<String> {
        lines(&self.env().virsh(&["list", "--all", "--name"]))
    }

    /// Names of every volume in the environment's pool.
    pub fn volumes(&self) -> Vec<String> {
        let env = self.env();
        let list = env.virsh(&["vol-list", env.get("POOL")]);
        let names = list.lines().filter_map(|l| l.split_whitespace().next());
        names.map(str::to_owned).collect()
    }

    /// Nothing is left in libvirt but the base image, and nothing in the jobs queue.
    pub fn assert_clean(&self) {
        // A rolled-back job's definition goes just after its outcome is published.
        wait_until(Duration::from_secs(10), || self.domains().is_empty());
        assert_eq!(self.domains(), Vec::<String>::new(), "domains left behind");
        assert_eq!(
            self.volumes(),
            vec![self.env().get("BASE_VOLUME").to_owned()],
            "volumes left behind"
        );
        let names = &self.fleet.names;
        let hypervisor_queue = names.hypervisor_queue(HYPERVISOR);
        for queue in [&names.jobs_queue, &names.delay_queue, &hypervisor_queue] {
            let empty = || matches!(self.fleet.queue_len(queue), None | Some(0));
            assert!(
                wait_until(Duration::from_secs(10), empty),
                "messages left in {queue}"
            );
        }
    }

    /// Removes every domain and every volume but the base: what a failed test left behind.
    pub fn purge(&self) {
        let env = self.env();
        for name in self.domains() {
            eprintln!("purging domain {name} left by an earlier test");
            env.virsh(&["destroy", &name]);
            env.virsh(&["undefine", &name]);
        }
        for vol in self.volumes() {
            if vol != env.get("BASE_VOLUME") {
                eprintln!("purging volume {vol} left by an earlier test");
                env.virsh(&["vol-delete", "--pool", env.get("POOL"), &vol]);
            }
        }
    }

    /// Runs `command` on the guest at `ip` as the test user, logged in with the test key from
    /// inside the namespace; its stdout.
    pub fn ssh(&self, ip: &str, command: &str) -> String {
        let env = self.env();
        let target = format!("{}@{ip}", env.get("SSH_USER"));
        let out = env.exec(
            "ssh",
            &[
                "-F",
                "/dev/null",
                "-i",
                env.get("SSH_KEY"),
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                &format!("UserKnownHostsFile={}", env.get("SSH_KNOWN_HOSTS")),
                "-o",
                "ConnectTimeout=5",
                "-o",
                "LogLevel=ERROR",
                &target,
                command,
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The address libvirt's DHCP server leased to `mac`, if any.
    pub fn lease(&self, mac: &str) -> Option<String> {
        let env = self.env();
        let list = env.virsh(&["net-dhcp-leases", env.get("NETWORK"), "--mac", mac]);
        let field = list.lines().find_map(|l| l.split_whitespace().nth(4))?;
        Some(field.split('/').next()?.to_owned())
    }

    pub fn domain_state(&self, name: &str) -> String {
        self.env().virsh(&["domstate", name]).trim().to_owned()
    }

    /// Deprovisions `name` through the queue and checks that libvirt no longer has it.
    pub fn deprovision(&self, name: &str, timeout: Duration) -> Event {
        let id = self.submit(&self.deprovision_job(name));
        let last = self
            .wait_final(&id, timeout)
            .unwrap_or_else(|| panic!("no final event for the deprovisioning of {name}"));
        assert_eq!(last.kind(), Some(EventKind::JobSucceeded), "{last:?}");
        assert!(
            !self.domains().contains(&name.to_owned()),
            "{name} still defined"
        );
        let prefix = format!("{name}-");
        assert!(
            !self.volumes().iter().any(|v| v.starts_with(&prefix)),
            "overlay of {name} left"
        );
        last
    }
}

impl Drop for VmFleet {
    /// Removes the hypervisor's jobs queue, which the fleet's own clean-up does not know.
    fn drop(&mut self) {
        let queue = self.fleet.names.hypervisor_queue(HYPERVISOR);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _ = rt.block_on(async {
            let props = lapin::ConnectionProperties::default();
            let conn = lapin::Connection::connect(super::fleet::URL, props).await?;
            let ch = conn.create_channel().await?;
            let options = lapin::options::QueueDeleteOptions::default();
            ch.queue_delete(queue.as_str().into(), options).await?;
            conn.close(200, "".into()).await
        });
    }
}

/// The result a final event carries; panics on any other event.
pub fn result(event: &Event) -> &JobResult {
    match &event.data {
        EventData::Result(r) => r,
        other => panic!("not a job result: {other:?}"),
    }
}

/// A file's SHA-256, as `sha256sum` prints it.
pub fn sha256_of(path: &str) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().next().unwrap().to_owned()
}

fn lines(text: &str) -> Vec<String> {
    let trimmed = text.lines().map(str::trim).filter(|l| !l.is_empty());
    trimmed.map(str::to_owned).collect()
}
