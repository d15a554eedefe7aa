//! A private fleet on the real RabbitMQ at 127.0.0.1:5672 for tests: unique exchange and queue
//! names per test, an event recorder that survives broker restarts, and `hatchery worker`
//! child processes.
#![allow(
    dead_code,
    reason = "each test binary uses only some of the shared helpers"
)]

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tempfile::TempDir;
use tokio::runtime::Runtime;

use hatchery::events::{Event, EventKind};
use hatchery::fleet::{Names, topology};

use super::testdriver::{BASE, NET, POOL};
use super::wait_until;

pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// One test's fleet: names, a fake hypervisor, a publisher and a recorder of every event.
pub struct Fleet {
    pub prefix: String,
    pub names: Names,
    /// The fake hypervisor's URI: `test:///.../node.xml`.
    pub uri: String,
    pub dir: TempDir,
    rt: Runtime,
    ch: Channel,
    events: Arc<Mutex<Vec<Event>>>,
}

impl Fleet {
    pub fn new() -> Self {
        ensure_broker();
        let rt = Runtime::new().unwrap();
        let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let names = Names::new(&prefix);
        let ch = rt.block_on(async {
            let conn = Connection::connect(URL, ConnectionProperties::default())
                .await
                .unwrap();
            let ch = conn.create_channel().await.unwrap();
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            topology::declare(&ch, &names).await.unwrap();
            ch
        });
        let events = Arc::new(Mutex::new(Vec::new()));
        rt.spawn(record(
            names.clone(),
            format!("{prefix}.test-recorder"),
            events.clone(),
        ));
        let mut dir = TempDir::new().unwrap();
        // HATCHERY_TEST_KEEP keeps the workers' logs for a look after the test.
        dir.disable_cleanup(std::env::var_os("HATCHERY_TEST_KEEP").is_some());
        eprintln!("fleet {prefix}: logs in {}", dir.path().display());
        let uri = fake_host(dir.path());
        let fleet = Self {
            prefix,
            names,
            uri,
            dir,
            rt,
            ch,
            events,
        };
        // The recorder must be bound before anything is published.
        let queue = format!("{}.test-recorder", fleet.prefix);
        assert!(wait_until(Duration::from_secs(10), || fleet.queue_exists(&queue)));
        fleet
    }

    /// Starts `hatchery worker` on this fleet's names, with `extra` flags.
    pub fn worker(&self, name: &str, extra: &[&str]) -> WorkerProcess {
        let log = self.dir.path().join(format!("{name}.log"));
        let mut cmd = self.hatchery(&["worker", "--name", name]);
        // The fleet tests' jobs give test-driver URIs of their own.
        cmd.args(["--set", "worker.allow_test_driver=true"]);
        cmd.args(extra)
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        let child = cmd.spawn().unwrap();
        WorkerProcess {
            child,
            name: name.to_owned(),
            log,
        }
    }

    /// `hatchery ARGS --prefix <prefix>`, with the test broker's URL.
    pub fn hatchery(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hatchery"));
        cmd.args(args).args(["--prefix", &self.prefix]);
        let filter = std::env::var("HATCHERY_TEST_LOG").unwrap_or_else(|_| "info,lapin=off".into());
        cmd.env("HATCHERY_AMQP_URL", URL)
            .env("RUST_LOG", filter)
            .env("NO_COLOR", "1");
        cmd
    }

    /// Publishes a job (or any bytes) to the jobs exchange, with a confirm.
    pub fn publish(&self, body: &[u8]) {
        self.publish_to(
            &self.names.jobs_exchange,
            "job",
            body,
            BasicProperties::default(),
        );
    }

    pub fn publish_to(&self, exchange: &str, key: &str, body: &[u8], props: BasicProperties) {
        let confirm = self.rt.block_on(async {
            let options = BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            };
            let c = self
                .ch
                .basic_publish(exchange.into(), key.into(), options, body, props);
            c.await.unwrap().await.unwrap()
        });
        assert_eq!(
            confirm,
            lapin::Confirmation::Ack(None),
            "publish to {exchange} not confirmed"
        );
    }

    pub fn submit(&self, job: &serde_json::Value) {
        self.publish(&serde_json::to_vec(job).unwrap());
    }

    /// A provisioning job on this fleet's fake host.
    pub fn job(&self, name: &str) -> serde_json::Value {
        super::jobs::provision(&self.uri, name)
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// Final events by subject, every copy received.
    pub fn finals(&self) -> HashMap<String, Vec<Event>> {
        let mut map: HashMap<String, Vec<Event>> = HashMap::new();
        for e in self
            .events()
            .into_iter()
            .filter(|e| e.kind().is_some_and(EventKind::is_final))
        {
            map.entry(e.subject.clone()).or_default().push(e);
        }
        map
    }

    pub fn count(&self, kind: EventKind, subject: &str) -> usize {
        self.events()
            .iter()
            .filter(|e| e.kind() == Some(kind) && e.subject == subject)
            .count()
    }

    /// Messages ready in `queue`, or `None` when it does not exist.
    pub fn queue_len(&self, queue: &str) -> Option<u32> {
        self.rt.block_on(async {
            let conn = Connection::connect(URL, ConnectionProperties::default())
                .await
                .ok()?;
            let ch = conn.create_channel().await.ok()?;
            let options = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let q = ch
                .queue_declare(queue.into(), options, FieldTable::default())
                .await
                .ok();
            let _ = conn.close(200, "".into()).await;
            q.map(|q| q.message_count())
        })
    }

    pub fn queue_exists(&self, queue: &str) -> bool {
        self.queue_len(queue).is_some()
    }

    /// Takes every message of the dead queue: body and `x-hatchery-reason`.
    pub fn drain_dead(&self) -> Vec<(Vec<u8>, String)> {
        self.rt.block_on(async {
            let mut out = Vec::new();
            let queue = self.names.dead_queue.as_str();
            while let Some(m) = self
                .ch
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                let reason = m.delivery.properties.headers().as_ref().and_then(|h| {
                    match h.inner().get("x-hatchery-reason")? {
                        AMQPValue::LongString(s) => Some(s.to_string()),
                        _ => None,
                    }
                });
                out.push((m.delivery.data.clone(), reason.unwrap_or_default()));
            }
            out
        })
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.rt.block_on(delete_topology(&self.prefix));
    }
}

/// Deletes every queue and exchange whose name starts with `prefix.`: what a test's workers
/// declared, the hypervisors' queues included, so the broker is left as the test found it.
pub async fn delete_topology(prefix: &str) -> lapin::Result<()> {
    let own = format!("{prefix}.");
    let listed = |what: &str| -> Vec<String> {
        let out = Command::new("rabbitmqctl")
            .args(["-q", what, "--no-table-headers", "name"])
            .output();
        let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        (text.unwrap_or_default().lines())
            .map(str::trim)
            .filter(|name| name.starts_with(&own))
            .map(str::to_owned)
            .collect()
    };
    let (queues, exchanges) = (listed("list_queues"), listed("list_exchanges"));

    let conn = Connection::connect(URL, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    for q in &queues {
        let options = QueueDeleteOptions::default();
        let _ = ch.queue_delete(q.as_str().into(), options).await;
    }
    for x in &exchanges {
        let options = ExchangeDeleteOptions::default();
        let _ = ch.exchange_delete(x.as_str().into(), options).await;
    }
    conn.close(200, "".into()).await
}

/// Records every event, on a durable queue so that nothing is lost while the broker restarts.
async fn record(names: Names, queue: String, events: Arc<Mutex<Vec<Event>>>) {
    loop {
        if let Err(e) = record_once(&names, &queue, &events).await {
            eprintln!("event recorder: {e}; reconnecting");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn record_once(names: &Names, queue: &str, events: &Mutex<Vec<Event>>) -> lapin::Result<()> {
    let conn = Connection::connect(URL, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), options, FieldTable::default())
        .await?;
    let _ = topology::bind(&ch, queue, &names.events_exchange, "#").await;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while let Some(d) = consumer.next().await {
        let d = d?;
        if let Ok(e) = serde_json::from_slice::<Event>(&d.data) {
            events.lock().unwrap().push(e);
        }
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}

/// A `hatchery worker` child process, killed when dropped.
pub struct WorkerProcess {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl WorkerProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Closes this worker's broker connection from the broker's side.
    pub fn close_connection(&self) {
        let list = rabbitmqctl(&["list_connections", "pid", "client_properties"]);
        let wanted = format!("hatchery worker {}", self.name);
        let line = list
            .lines()
            .find(|l| l.contains(&wanted))
            .unwrap_or_else(|| panic!("no connection of {wanted} in {list}"));
        let pid = line.split_whitespace().next().unwrap();
        rabbitmqctl(&["close_connection", pid, "closed by a test"]);
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `rabbitmqctl` and returns its stdout, panicking on failure.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts RabbitMQ if nothing answers on 5672.
fn ensure_broker() {
    let up = || std::net::TcpStream::connect("127.0.0.1:5672").is_ok();
    if up() {
        return;
    }
    let _ = Command::new("rabbitmq-server").arg("-detached").status();
    assert!(
        wait_until(Duration::from_secs(60), up),
        "RabbitMQ did not start"
    );
    let _ = Command::new("rabbitmqctl").args(["await_startup"]).status();
}

/// A test-driver node for many jobs: the base is tiny, so that hundreds of overlays fit in the
/// test driver's fixed 100 GiB pool.
fn fake_host(dir: &std::path::Path) -> String {
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    let node = format!(
        "<node>
  <network><name>{NET}</name><bridge name='tloop0'/>
    <ip address='127.0.0.1' netmask='255.0.0.0'>
      <dhcp><range start='127.0.0.1' end='127.0.0.1'/></dhcp></ip></network>
  <pool type='dir'><name>{POOL}</name><target><path>{}</path></target>
    <volume type='file'><name>{BASE}</name><capacity unit='MiB'>16</capacity>
      <target><format type='qcow2'/></target></volume>
  </pool>
</node>",
        pool.display()
    );
    let path = dir.join("node.xml");
    std::fs::write(&path, node).unwrap();
    format!("test://{}", path.display())
}

/// A job that waits for an SSH server on a closed loopback port until `finish_secs`, then fails;
/// long enough to cancel it, or to outlive an ack timeout.
pub fn waiting_job(fleet: &Fleet, name: &str, finish_secs: u64) -> serde_json::Value {
    let mut job = fleet.job(name);
    let p = &mut job["provision"];
    // Port 1 on loopback: nothing listens, nothing outside the machine is reached.
    p["address"] = serde_json::json!({ "source": "static", "ip": "127.0.0.1", "port": 1 });
    p["finish"] =
        serde_json::json!({ "user": "root", "password": "not-a-secret", "script": "true" });
    p["timeouts"] = serde_json::json!({ "finish_secs": finish_secs });
    job
}
