//! `hatchery submit FILE...`: publishes jobs with confirms, optionally as one batch, and with
//! `--wait` follows their events until every job is final.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection};
use uuid::Uuid;

use super::worker::{BrokerArgs, parse_duration};
use crate::events::{Event, EventData, EventKind};
use crate::fleet::{Names, message, topology};
use crate::job::{self, Limits};

#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The worker's configuration, for its `broker` table; the flags above win over it.
    #[command(flatten)]
    pub config: super::ConfigArgs,
    /// Job files; `-` reads JSON lines (one job per line) from stdin.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Submit the jobs as one batch (sets `batch.id` and `batch.size` on each).
    #[arg(long)]
    pub batch: bool,
    /// The batch id; a new UUID by default. Implies `--batch`.
    #[arg(long)]
    pub batch_id: Option<String>,
    /// Follow the jobs' events until each is final; exit non-zero unless all succeeded.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// A short-lived command's connection: a channel in confirm mode, topology declared.
pub async fn open(broker: &BrokerArgs, what: &str) -> anyhow::Result<(Connection, Channel, Names)> {
    let names = broker.names();
    let conn = broker
        .endpoint()
        .connect(&format!("hatchery {what}"))
        .await?;
    let ch = conn
        .create_channel()
        .await
        .context("cannot open a channel")?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .context("cannot enable confirms")?;
    topology::declare(&ch, &names).await?;
    Ok((conn, ch, names))
}

/// Publishes `msg` on `ch` and waits for the broker's confirm.
pub async fn publish(ch: &Channel, msg: &crate::fleet::outbox::Message) -> anyhow::Result<()> {
    let options = BasicPublishOptions {
        mandatory: msg.mandatory,
        ..Default::default()
    };
    let confirm = ch
        .basic_publish(
            msg.exchange.as_str().into(),
            msg.routing_key.as_str().into(),
            options,
            &msg.body,
            msg.props.clone(),
        )
        .await
        .context("cannot publish")?
        .await
        .context("no confirm from the broker")?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => bail!("no queue is bound to `{}`", msg.exchange),
        Confirmation::Nack(_) => bail!("the broker refused the message"),
    }
}

pub fn main(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let mut jobs = read_jobs(&args.files)?;
    let batch = (args.batch || args.batch_id.is_some()).then(|| {
        args.batch_id
            .clone()
            .unwrap_or_else(|| Uuid::new_v4().to_string())
    });
    if let Some(id) = &batch {
        let size = jobs.len();
        for (_, value) in &mut jobs {
            value["batch"] = serde_json::json!({ "id": id, "size": size });
        }
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(submit(args, jobs, batch))
}

async fn submit(
    args: SubmitArgs,
    jobs: Vec<(Uuid, serde_json::Value)>,
    batch: Option<String>,
) -> anyhow::Result<ExitCode> {
    let broker = args.broker.clone().or_from(&args.config.load()?.broker);
    let (conn, ch, names) = open(&broker, "submit").await?;

    // Listen before publishing, so that no event of a fast job is missed.
    let events = if args.wait {
        Some(
            listen(&conn, &names, |k| {
                k.is_final() || k == EventKind::BatchCompleted
            })
            .await?,
        )
    } else {
        None
    };

    for (id, value) in &jobs {
        let body = serde_json::to_vec(value).context("cannot serialise a job")?;
        publish(
            &ch,
            &message::job(&names.jobs_exchange, &id.to_string(), body),
        )
        .await?;
        if events.is_none() {
            writeln!(std::io::stdout().lock(), "{id}")?;
        }
    }
    eprintln!(
        "submitted {} job(s){}",
        jobs.len(),
        batch
            .as_ref()
            .map(|b| format!(" as batch {b}"))
            .unwrap_or_default()
    );

    let code = match events {
        None => ExitCode::SUCCESS,
        Some(consumer) => {
            let ids: HashSet<Uuid> = jobs.iter().map(|(id, _)| *id).collect();
            let follow = follow(consumer, ids, batch);
            match tokio::time::timeout(args.timeout, follow).await {
                Ok(code) => code?,
                Err(_) => bail!("jobs not final after {:?}", args.timeout),
            }
        }
    };
    let _ = conn.close(200, "done".into()).await;
    Ok(code)
}

/// A private queue bound to the events whose kinds pass `wanted`, consumed without acks.
pub(super) async fn listen(
    conn: &Connection,
    names: &Names,
    wanted: impl Fn(EventKind) -> bool,
) -> anyhow::Result<lapin::Consumer> {
    let ch = conn
        .create_channel()
        .await
        .context("cannot open a channel")?;
    let queue = topology::private_queue(&ch).await?;
    for kind in EventKind::ALL.into_iter().filter(|k| wanted(*k)) {
        topology::bind(&ch, &queue, &names.events_exchange, kind.routing_key()).await?;
    }
    let options = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            options,
            FieldTable::default(),
        )
        .await;
    consumer.context("cannot consume events")
}

/// Follows events until every job is final (and the batch completed), with a progress bar.
async fn follow(
    mut consumer: lapin::Consumer,
    ids: HashSet<Uuid>,
    batch: Option<String>,
) -> anyhow::Result<ExitCode> {
    let bar = indicatif::ProgressBar::new(ids.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} final {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut outcomes: HashMap<Uuid, EventKind> = HashMap::new();
    let mut summary = None;
    while outcomes.len() < ids.len() || (batch.is_some() && summary.is_none()) {
        let Some(delivery) = consumer.next().await else {
            bail!("event stream ended")
        };
        let delivery = delivery.context("event stream failed")?;
        let Ok(event) = serde_json::from_slice::<Event>(&delivery.data) else {
            continue;
        };
        match (event.kind(), &event.data) {
            (Some(EventKind::BatchCompleted), EventData::Batch(s))
                if Some(&s.batch_id) == batch.as_ref() =>
            {
                summary = Some(s.clone());
            }
            (Some(kind), _) if kind.is_final() => {
                let Ok(id) = event.subject.parse::<Uuid>() else {
                    continue;
                };
                if ids.contains(&id) && outcomes.insert(id, kind).is_none() {
                    bar.inc(1);
                    bar.set_message(failed_text(&outcomes));
                }
            }
            _ => {}
        }
    }
    bar.finish_and_clear();

    let mut out = std::io::stdout().lock();
    let mut sorted: Vec<_> = outcomes.iter().collect();
    sorted.sort_by_key(|(id, _)| **id);
    for (id, kind) in sorted {
        writeln!(out, "{id} {}", kind.routing_key())?;
    }
    let count = |k| outcomes.values().filter(|v| **v == k).count();
    let (ok, failed) = (count(EventKind::JobSucceeded), count(EventKind::JobFailed));
    let (cancelled, rejected) = (
        count(EventKind::JobCancelled),
        count(EventKind::JobRejected),
    );
    let label = batch
        .map(|b| format!("batch {b}"))
        .unwrap_or_else(|| "jobs".to_owned());
    writeln!(
        out,
        "{label}: {ok} succeeded, {failed} failed, {cancelled} cancelled, {rejected} rejected"
    )?;
    Ok(if ok == ids.len() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn failed_text(outcomes: &HashMap<Uuid, EventKind>) -> String {
    let bad = outcomes
        .values()
        .filter(|k| **k != EventKind::JobSucceeded)
        .count();
    if bad == 0 {
        String::new()
    } else {
        format!("({bad} not succeeded)")
    }
}

/// Reads and checks every job before anything is published.
fn read_jobs(files: &[PathBuf]) -> anyhow::Result<Vec<(Uuid, serde_json::Value)>> {
    let mut texts = Vec::new();
    for file in files {
        if file.as_os_str() == "-" {
            for (n, line) in std::io::stdin().lock().lines().enumerate() {
                let line = line.context("cannot read stdin")?;
                if !line.trim().is_empty() {
                    texts.push((format!("stdin line {}", n + 1), line));
                }
            }
        } else {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            texts.push((file.display().to_string(), text));
        }
    }
    let mut jobs = Vec::new();
    for (origin, text) in texts {
        let parsed = job::parse(text.as_bytes(), &Limits::default());
        let job = parsed
            .map_err(|rejected| anyhow::anyhow!("{origin} is not a valid job: {rejected}"))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).context("cannot re-read a job")?;
        jobs.push((job.id, value));
    }
    Ok(jobs)
}
