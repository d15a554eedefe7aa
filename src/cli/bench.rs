//! `hatchery bench`: pushes test-driver jobs through one worker child process and reports
//! throughput, publish-to-final-event latency and the worker's memory.
//!
//! Everything runs on libvirt's test driver (no daemon, no VM, no SSH to a guest) and on
//! exchanges and queues of a fresh prefix, deleted at the end.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::Channel;
use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use serde_json::json;
use uuid::Uuid;

use super::submit::publish;
use super::worker::BrokerArgs;
use crate::events::{Event, EventKind};
use crate::fleet::{Names, message};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// AMQP URL of the broker to measure on.
    #[arg(long, env = "HATCHERY_AMQP_URL", default_value = crate::fleet::DEFAULT_AMQP_URL, hide_default_value = true)]
    pub amqp_url: String,
    /// Jobs for the throughput and latency run.
    #[arg(long, default_value_t = 1000)]
    pub jobs: usize,
    /// The worker's concurrency (prefetch) for the throughput run.
    #[arg(long, default_value_t = 64)]
    pub concurrency: u16,
    /// Jobs held in flight at once for the memory measurement; 0 skips it.
    #[arg(long, default_value_t = 500)]
    pub in_flight: u16,
}

/// The worker under measurement, killed when dropped.
struct WorkerChild(Child);

impl Drop for WorkerChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn main(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(bench(args))
}

async fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("hatchery-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("pool")).context("cannot create the bench directory")?;
    let uri = write_node(&dir)?;
    let prefix = format!("bench{}", &Uuid::new_v4().simple().to_string()[..8]);
    let broker = BrokerArgs {
        amqp_url: Some(args.amqp_url.clone()),
        tls_ca: None,
        prefix: Some(prefix.clone()),
        jobs_exchange: None,
        jobs_queue: None,
        events_exchange: None,
        dead_exchange: None,
        dead_queue: None,
    };
    let (conn, ch, names) = super::submit::open(&broker, "bench").await?;
    let wanted = |k: EventKind| k.is_final() || k == EventKind::StageStarted;
    let mut events = super::submit::listen(&conn, &names, wanted).await?;

    let concurrency = args.concurrency.max(args.in_flight);
    let worker = start_worker(&args.amqp_url, &prefix, concurrency)?;
    let pid = worker.0.id();
    wait_for_consumer(&ch, &names).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = memory(pid)?;

    // Throughput and latency: every job published at once, each timed to its final event.
    let mut sent = HashMap::new();
    let began = Instant::now();
    for i in 0..args.jobs {
        let job = job_json(&uri, &format!("bench-{i}"), None);
        let id = job["id"].as_str().unwrap_or_default().to_owned();
        sent.insert(id.clone(), Instant::now());
        publish(
            &ch,
            &message::job(&names.jobs_exchange, &id, serde_json::to_vec(&job)?),
        )
        .await?;
    }
    let mut latencies = Vec::with_capacity(args.jobs);
    let mut failed = 0;
    while latencies.len() < args.jobs {
        let (kind, subject) = next_event(&mut events).await?;
        if let Some(at) = kind.is_final().then(|| sent.remove(&subject)).flatten() {
            latencies.push(at.elapsed());
            failed += usize::from(kind != EventKind::JobSucceeded);
        }
    }
    let elapsed = began.elapsed();
    let after_run = memory(pid)?;

    // Memory with many jobs in flight: each waits for an SSH server that never answers.
    let mut loaded = None;
    if args.in_flight > 0 {
        let mut waiting = std::collections::HashSet::new();
        for i in 0..args.in_flight {
            let job = job_json(&uri, &format!("hold-{i}"), Some(120));
            let id = job["id"].as_str().unwrap_or_default().to_owned();
            waiting.insert(id.clone());
            publish(
                &ch,
                &message::job(&names.jobs_exchange, &id, serde_json::to_vec(&job)?),
            )
            .await?;
        }
        while !waiting.is_empty() {
            let (kind, subject) = next_event(&mut events).await?;
            if kind == EventKind::StageStarted || kind.is_final() {
                waiting.remove(&subject);
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        loaded = Some(memory(pid)?);
    }
    drop(worker);
    cleanup(&ch, &names).await;
    let _ = conn.close(200, "bench done".into()).await;
    let _ = std::fs::remove_dir_all(&dir);

    report(
        &args,
        elapsed,
        &mut latencies,
        failed,
        idle,
        after_run,
        loaded,
    )?;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn report(
    args: &BenchArgs,
    elapsed: Duration,
    latencies: &mut [Duration],
    failed: usize,
    idle: Memory,
    after_run: Memory,
    loaded: Option<Memory>,
) -> anyhow::Result<()> {
    latencies.sort();
    let pct = |p: usize| {
        latencies
            .get(latencies.len().saturating_sub(1) * p / 100)
            .copied()
    };
    let ms = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "jobs: {} ({failed} not succeeded), concurrency {}",
        args.jobs,
        args.concurrency.max(args.in_flight)
    )?;
    writeln!(
        out,
        "throughput: {:.1} jobs/s over {:.2} s",
        args.jobs as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    )?;
    writeln!(
        out,
        "latency publish -> final event: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms",
        ms(pct(50)),
        ms(pct(90)),
        ms(pct(99))
    )?;
    writeln!(out, "worker memory idle: {idle}")?;
    writeln!(out, "worker memory after the run: {after_run}")?;
    if let Some(m) = loaded {
        writeln!(
            out,
            "worker memory with {} jobs in flight: {m}",
            args.in_flight
        )?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Memory {
    rss_mib: f64,
    hwm_mib: f64,
    /// The private part of the RSS; the rest is mostly shared libraries (libvirt, OpenSSL).
    anon_mib: f64,
    threads: f64,
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VmRSS {:.1} MiB (private {:.1} MiB), VmHWM {:.1} MiB, {} threads",
            self.rss_mib, self.anon_mib, self.hwm_mib, self.threads as u64
        )
    }
}

/// VmRSS and VmHWM (peak RSS) of process `pid`.
fn memory(pid: u32) -> anyhow::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("cannot read the worker's /proc status; did it exit?")?;
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name))?;
        // Sizes are in kB; the thread count is a plain number, scaled back by the caller.
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    };
    let fields = (
        field("VmRSS:"),
        field("VmHWM:"),
        field("RssAnon:"),
        field("Threads:"),
    );
    match fields {
        (Some(rss_mib), Some(hwm_mib), Some(anon_mib), Some(threads)) => Ok(Memory {
            rss_mib,
            hwm_mib,
            anon_mib,
            threads: threads * 1024.0,
        }),
        _ => bail!("no VmRSS/VmHWM in /proc/{pid}/status"),
    }
}

fn start_worker(url: &str, prefix: &str, concurrency: u16) -> anyhow::Result<WorkerChild> {
    let exe = std::env::current_exe().context("cannot find the hatchery binary")?;
    let child = Command::new(exe)
        .args([
            "worker",
            "--prefix",
            prefix,
            "--concurrency",
            &concurrency.to_string(),
        ])
        .args(["--grace", "0s", "--name", "bench"])
        .args(["--set", "worker.allow_test_driver=true"])
        .env("HATCHERY_AMQP_URL", url)
        .env("RUST_LOG", "warn,lapin=off")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start the worker")?;
    Ok(WorkerChild(child))
}

/// Waits until the worker consumes the jobs queue.
async fn wait_for_consumer(ch: &Channel, names: &Names) -> anyhow::Result<()> {
    for _ in 0..300 {
        let options = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = ch.queue_declare(
            names.jobs_queue.as_str().into(),
            options,
            FieldTable::default(),
        );
        if q.await
            .context("cannot inspect the jobs queue")?
            .consumer_count()
            > 0
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the worker did not start consuming within 30 s")
}

async fn next_event(events: &mut lapin::Consumer) -> anyhow::Result<(EventKind, String)> {
    loop {
        let delivery = tokio::time::timeout(Duration::from_secs(60), events.next()).await;
        let Ok(Some(delivery)) = delivery else {
            bail!("no event for 60 s; is the worker alive?")
        };
        let delivery = delivery.context("event stream failed")?;
        let Ok(event) = serde_json::from_slice::<Event>(&delivery.data) else {
            continue;
        };
        if let Some(kind) = event.kind() {
            return Ok((kind, event.subject));
        }
    }
}

/// A provisioning job; with `hold`, one that waits that long for SSH on a closed loopback port.
fn job_json(uri: &str, name: &str, hold: Option<u64>) -> serde_json::Value {
    let mut job = json!({
        "id": Uuid::new_v4(),
        "hypervisor": uri,
        "provision": { "vm": {
            "name": name, "vcpus": 1, "memory_mib": 128, "domain_type": "qemu",
            "base": { "pool": "pool", "volume": "base.qcow2" },
            "nics": [{ "network": "loopnet" }]
        } }
    });
    if let Some(secs) = hold {
        let p = &mut job["provision"];
        p["address"] = json!({ "source": "static", "ip": "127.0.0.1", "port": 1 });
        p["finish"] = json!({ "user": "root", "password": "bench-only", "script": "true" });
        p["timeouts"] = json!({ "finish_secs": secs });
    }
    job
}

/// A test-driver host whose leases are loopback addresses and whose base is tiny, so that
/// thousands of overlays fit in the driver's fixed-size pool.
fn write_node(dir: &std::path::Path) -> anyhow::Result<String> {
    let node = format!(
        "<node>
  <network><name>loopnet</name><bridge name='bench0'/>
    <ip address='127.0.0.1' netmask='255.0.0.0'>
      <dhcp><range start='127.0.0.1' end='127.0.0.1'/></dhcp></ip></network>
  <pool type='dir'><name>pool</name><target><path>{}</path></target>
    <volume type='file'><name>base.qcow2</name><capacity unit='MiB'>16</capacity>
      <target><format type='qcow2'/></target></volume></pool>
</node>",
        dir.join("pool").display()
    );
    let path = dir.join("node.xml");
    std::fs::write(&path, node).context("cannot write the test-driver node")?;
    Ok(format!("test://{}", path.display()))
}

async fn cleanup(ch: &Channel, names: &Names) {
    for q in [
        &names.jobs_queue,
        &names.dead_queue,
        &names.delay_queue,
        &names.batches_queue,
        &names.cancellations,
    ] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for x in [
        &names.jobs_exchange,
        &names.dead_exchange,
        &names.events_exchange,
        &names.delay_exchange,
    ] {
        let _ = ch
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}
