//! `hatchery events`: tails the events exchange, as readable lines or JSON lines.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;

use super::worker::BrokerArgs;
use crate::events::{Event, EventData, EventKind};
use crate::fleet::topology;

#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The worker's configuration, for its `broker` table; the flags above win over it.
    #[command(flatten)]
    pub config: super::ConfigArgs,
    /// Print each event as one line of JSON.
    #[arg(long)]
    pub json: bool,
    /// Only events about this job.
    #[arg(long)]
    pub job: Option<String>,
    /// Only events of this batch.
    #[arg(long)]
    pub batch: Option<String>,
    /// Only these types (`job.succeeded`, `stage.retrying`, ...); the broker filters them.
    #[arg(long = "type", value_parser = parse_kind)]
    pub types: Vec<EventKind>,
}

fn parse_kind(text: &str) -> Result<EventKind, String> {
    EventKind::ALL
        .into_iter()
        .find(|k| k.routing_key() == text)
        .ok_or_else(|| {
            let known: Vec<_> = EventKind::ALL.iter().map(|k| k.routing_key()).collect();
            format!("`{text}` is none of {}", known.join(", "))
        })
}

pub fn main(args: EventsArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(tail(args))
}

async fn tail(args: EventsArgs) -> anyhow::Result<ExitCode> {
    let broker = args.broker.clone().or_from(&args.config.load()?.broker);
    let names = broker.names();
    let conn = broker.endpoint().connect("hatchery events").await?;
    let ch = conn
        .create_channel()
        .await
        .context("cannot open a channel")?;
    topology::declare(&ch, &names).await?;
    let queue = topology::private_queue(&ch).await?;
    // Bind only what is asked for, so the broker drops the rest.
    let keys: Vec<&str> = if args.types.is_empty() {
        vec!["#"]
    } else {
        args.types.iter().map(|k| k.routing_key()).collect()
    };
    for key in keys {
        topology::bind(&ch, &queue, &names.events_exchange, key).await?;
    }
    let options = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            options,
            FieldTable::default(),
        )
        .await
        .context("cannot consume events")?;

    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.context("event stream failed")?;
        let Ok(event) = serde_json::from_slice::<Event>(&delivery.data) else {
            continue;
        };
        if args.job.as_ref().is_some_and(|j| *j != event.subject)
            || args
                .batch
                .as_ref()
                .is_some_and(|b| Some(b) != event.batchid.as_ref())
        {
            continue;
        }
        let line = if args.json {
            String::from_utf8_lossy(&delivery.data).into_owned()
        } else {
            readable(&event)
        };
        let mut out = std::io::stdout().lock();
        // A closed stdout (the reader left) ends the command quietly.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `<time> <type> <subject> <details>`.
fn readable(event: &Event) -> String {
    let kind = event.kind().map_or("unknown", |k| k.routing_key());
    let details = match &event.data {
        EventData::Result(r) => {
            let mut d = format!("vm={} attempt={}", r.vm, r.attempt);
            if let Some(ip) = &r.ip {
                d.push_str(&format!(" ip={ip}"));
            }
            if let Some(f) = &r.failure {
                d.push_str(&format!(" stage={} error={}", f.stage, f.message));
            }
            d
        }
        EventData::Stage(s) => {
            let mut d = format!("stage={} attempt={}", s.stage, s.attempt);
            if let Some(e) = &s.error {
                d.push_str(&format!(" error={}", e.message));
            }
            d
        }
        EventData::Rejected(r) => format!("reason={} {}", r.reason, r.message),
        EventData::Batch(b) => format!(
            "size={} succeeded={} failed={} cancelled={} rejected={}",
            b.size, b.succeeded, b.failed, b.cancelled, b.rejected
        ),
        EventData::Started(s) => format!("vm={} attempt={}", s.vm, s.attempt),
    };
    let batch = event
        .batchid
        .as_ref()
        .map(|b| format!(" batch={b}"))
        .unwrap_or_default();
    format!("{} {kind} {}{batch} {details}", event.time, event.subject)
}
