//! `hatchery worker`: takes jobs from RabbitMQ until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::BrokerConfig;
use crate::events::Publisher;
use crate::fleet::link::Endpoint;
use crate::fleet::worker::{self, WorkerConfig};
use crate::fleet::{DEFAULT_AMQP_URL, DEFAULT_PREFIX, Link, Names};
use crate::pipeline::Pipeline;
use crate::settings::Settings;

/// Where the broker is and what the fleet's exchanges and queues are called.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// AMQP URL (`amqp://` or `amqps://`); `broker.url` in the configuration, else a broker on
    /// 127.0.0.1 as guest.
    #[arg(long, env = "HATCHERY_AMQP_URL")]
    pub amqp_url: Option<String>,
    /// CA certificates (PEM) that vouch for an `amqps://` broker, besides the system's;
    /// `broker.tls_ca` in the configuration.
    #[arg(long, env = "HATCHERY_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Prefix of every exchange and queue name; `broker.prefix` in the configuration, else
    /// `hatchery`.
    #[arg(long, env = "HATCHERY_PREFIX")]
    pub prefix: Option<String>,
    /// Jobs exchange; `<prefix>.jobs` by default.
    #[arg(long, env = "HATCHERY_JOBS_EXCHANGE")]
    pub jobs_exchange: Option<String>,
    /// Jobs queue; `<prefix>.jobs` by default.
    #[arg(long, env = "HATCHERY_JOBS_QUEUE")]
    pub jobs_queue: Option<String>,
    /// Events exchange; `<prefix>.events` by default.
    #[arg(long, env = "HATCHERY_EVENTS_EXCHANGE")]
    pub events_exchange: Option<String>,
    /// Dead-letter exchange; `<prefix>.dead` by default.
    #[arg(long, env = "HATCHERY_DEAD_EXCHANGE")]
    pub dead_exchange: Option<String>,
    /// Dead-letter queue; `<prefix>.dead` by default.
    #[arg(long, env = "HATCHERY_DEAD_QUEUE")]
    pub dead_queue: Option<String>,
}

impl BrokerArgs {
    /// Fills what the flags and their variables left open from the configuration's `broker`
    /// table: the flags win, then the file (with its own variables and `--set`s).
    pub fn or_from(mut self, file: &BrokerConfig) -> Self {
        self.amqp_url.get_or_insert_with(|| file.url.clone());
        self.prefix.get_or_insert_with(|| file.prefix.clone());
        self.tls_ca = self.tls_ca.or_else(|| file.tls_ca.clone());
        self
    }

    pub fn url(&self) -> &str {
        self.amqp_url.as_deref().unwrap_or(DEFAULT_AMQP_URL)
    }

    /// The broker's address, trusting `--tls-ca` if given.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.url(), self.tls_ca.clone())
    }

    pub fn names(&self) -> Names {
        let mut names = Names::new(self.prefix.as_deref().unwrap_or(DEFAULT_PREFIX));
        let set = |slot: &mut String, given: &Option<String>| {
            if let Some(g) = given {
                slot.clone_from(g);
            }
        };
        set(&mut names.jobs_exchange, &self.jobs_exchange);
        set(&mut names.jobs_queue, &self.jobs_queue);
        set(&mut names.events_exchange, &self.events_exchange);
        set(&mut names.dead_exchange, &self.dead_exchange);
        set(&mut names.dead_queue, &self.dead_queue);
        names
    }
}

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Hypervisors, secrets, timeouts, retries, limits, metrics: see `hatchery.example.toml`.
    #[command(flatten)]
    pub config: super::ConfigArgs,
    /// Jobs run at once (the prefetch count); `worker.concurrency`, 16 by default.
    #[arg(long, env = "HATCHERY_CONCURRENCY", value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: Option<u16>,
    /// Time jobs in flight get to finish after SIGTERM before they go back to the queue;
    /// `worker.grace_period`, 60s by default.
    #[arg(long, env = "HATCHERY_GRACE", value_parser = parse_duration)]
    pub grace: Option<Duration>,
    /// The broker's consumer ack timeout, past 80% of which runs are handed over;
    /// `broker.ack_timeout`, 30m by default.
    #[arg(long, env = "HATCHERY_ACK_TIMEOUT", value_parser = parse_duration)]
    pub ack_timeout: Option<Duration>,
    /// How long a job that another worker runs waits before it is looked at again.
    #[arg(long, env = "HATCHERY_PARK_DELAY", default_value = "30s", value_parser = parse_duration)]
    pub park_delay: Duration,
    /// This worker's name in events and logs; `worker.name`, else `<hostname>-<pid>`.
    #[arg(long, env = "HATCHERY_WORKER_NAME")]
    pub name: Option<String>,
    /// Where consoles listen unless the job says otherwise (`worker.console_listen`).
    #[arg(long)]
    pub console_listen: Option<std::net::IpAddr>,
    /// Directory of private keys that jobs may name with `key_name` (`secrets.key_dir`).
    #[arg(long)]
    pub key_dir: Option<PathBuf>,
}

pub fn main(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let file = args.config.load()?;
    let name = (args.name)
        .or_else(|| Some(file.worker.name.clone()).filter(|n| !n.is_empty()))
        .unwrap_or_else(|| format!("{}-{}", super::run::hostname(), std::process::id()));
    let broker = args.broker.or_from(&file.broker);
    let config = WorkerConfig {
        concurrency: args.concurrency.unwrap_or(file.worker.concurrency),
        grace: args.grace.unwrap_or(file.worker.grace_period),
        ack_timeout: args.ack_timeout.unwrap_or(file.broker.ack_timeout),
        park_delay: args.park_delay,
        limits: file.settings().limits,
        name: name.clone(),
        hypervisors: (file.hypervisors.iter())
            .map(|(name, hv)| (name.clone(), hv.concurrency))
            .collect(),
    };
    anyhow::ensure!(
        !config.ack_timeout.is_zero(),
        "--ack-timeout must be above zero"
    );
    // The file, environment and --set give the settings; the dedicated flags win over them.
    let mut settings: Settings = file.settings();
    if let Some(listen) = args.console_listen {
        settings.console_listen = listen;
    }
    if let Some(dir) = args.key_dir {
        settings.key_dir = Some(dir);
    }
    let endpoint = broker.endpoint();
    let mut publisher = Publisher::new(&name);
    publisher.prefix.clone_from(&file.events.prefix);
    let pipeline = Pipeline::new(settings, publisher);
    // Each job holds a blocking thread only while it talks to libvirt or runs its SSH session;
    // the pool needs one per job that can do so at once, plus slack, and no more: idle
    // threads and their allocator arenas are most of a busy worker's memory.
    let hypervisor_slots: usize = config
        .hypervisors
        .iter()
        .map(|(_, n)| usize::from(*n))
        .sum();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(usize::from(config.concurrency) + hypervisor_slots + 16)
        .build()
        .context("cannot start the async runtime")?;

    runtime.block_on(async move {
        let stop = CancellationToken::new();
        tokio::spawn(stop_on_signal(stop.clone()));
        let names = broker.names();
        let url = crate::fleet::redact_url(broker.url());
        info!(worker = %name, %url, prefix = %names.prefix, "worker starting");
        let link = Link::start(endpoint, names, &format!("hatchery worker {name}"));

        // Side duties that only observe: metrics and health, and the orphan check.
        let metrics = Arc::clone(&pipeline.metrics);
        tokio::spawn(watch_broker(
            link.clone(),
            Arc::clone(&metrics),
            stop.clone(),
        ));
        if let Some(addr) = file.worker.metrics_listen {
            let (metrics, stop) = (Arc::clone(&metrics), stop.clone());
            tokio::spawn(async move {
                if let Err(e) = crate::observe::serve(addr, metrics, stop).await {
                    tracing::error!(%addr, error = %e, "metrics endpoint failed");
                }
            });
        }
        if let Some(every) = file.worker.reconcile_every {
            let uris: Vec<String> = file.hypervisors.values().map(|h| h.uri.clone()).collect();
            tokio::spawn(reconcile_loop(
                uris,
                every,
                file.worker.reconcile_apply,
                stop.clone(),
            ));
        }

        worker::run(link, pipeline, config, stop).await;
        info!("worker stopped");
    });
    Ok(ExitCode::SUCCESS)
}

/// Keeps the broker gauge and `/readyz` in step with the connection.
async fn watch_broker(link: Link, metrics: Arc<crate::observe::Metrics>, stop: CancellationToken) {
    let mut sessions = link.watch();
    loop {
        metrics.set_broker_connected(link.current().is_some());
        tokio::select! {
            changed = sessions.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Looks for orphans on the configured hypervisors every `every`; reports them, and removes
/// them when the configuration says so.
async fn reconcile_loop(uris: Vec<String>, every: Duration, apply: bool, stop: CancellationToken) {
    // Long enough that no live job, whose record a heartbeat refreshes every minute, is taken.
    let older_than = Duration::from_secs(15 * 60);
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        for uri in &uris {
            let hv = Arc::new(crate::hypervisor::Hypervisor::new(uri));
            match crate::reconcile::find(&hv, older_than).await {
                Ok(orphans) if orphans.is_empty() => {}
                Ok(orphans) => {
                    for o in &orphans {
                        tracing::warn!(hypervisor = %uri, name = %o.name, reason = o.reason, "orphan found");
                    }
                    if apply {
                        let _ = crate::reconcile::remove(&hv, &orphans, older_than).await;
                    }
                }
                Err(e) => tracing::warn!(hypervisor = %uri, error = %e, "orphan check failed"),
            }
        }
    }
}

/// Cancels `stop` on the first SIGTERM or SIGINT.
async fn stop_on_signal(stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for signals; stop the worker with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!(signal = "SIGTERM", "stopping"),
        _ = int.recv() => info!(signal = "SIGINT", "stopping"),
    }
    stop.cancel();
}

/// `90s`, `500ms`, `30m`, `2h`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 30s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("`{text}`: the unit is one of ms, s, m, h")),
    }
}
