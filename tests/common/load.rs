//! Putting a worker under load: publishing many messages in batches that the broker confirms
//! together, taking every message of a queue at once, and reading a process's resident memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use hatchery::events::EventKind;
use hatchery::fleet::{Names, topology};

use super::fleet::URL;

/// A connection of its own with a channel in confirm mode.
pub async fn confirm_channel() -> (Connection, Channel) {
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (conn, ch)
}

/// Publishes `bodies` to `exchange`, `batch` at a time: the whole batch goes out, then every
/// confirm of it is awaited. Panics on a message the broker refused or could not route.
pub async fn publish_batches(ch: &Channel, exchange: &str, bodies: &[&[u8]], batch: usize) {
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    for chunk in bodies.chunks(batch) {
        let mut pending = Vec::with_capacity(chunk.len());
        for body in chunk {
            let props = BasicProperties::default().with_delivery_mode(2);
            let confirm = ch
                .basic_publish(exchange.into(), "job".into(), options, body, props)
                .await
                .unwrap();
            pending.push(confirm);
        }
        for confirm in pending {
            assert_eq!(confirm.await.unwrap(), Confirmation::Ack(None));
        }
    }
}

/// Takes `count` messages from `queue` (body and `x-hatchery-reason`), or what came within
/// `timeout` of the last one.
pub async fn take_all(
    ch: &Channel,
    queue: &str,
    count: usize,
    timeout: Duration,
) -> Vec<(Vec<u8>, String)> {
    let options = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut consumer = ch
        .basic_consume(queue.into(), "".into(), options, FieldTable::default())
        .await
        .unwrap();
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let Ok(Some(delivery)) = tokio::time::timeout(timeout, consumer.next()).await else {
            break;
        };
        let delivery = delivery.unwrap();
        let headers = delivery.properties.headers().as_ref();
        let reason = headers.and_then(|h| match h.inner().get("x-hatchery-reason")? {
            AMQPValue::LongString(s) => Some(s.to_string()),
            _ => None,
        });
        out.push((delivery.data, reason.unwrap_or_default()));
    }
    out
}

/// Counts the final events of `names`' fleet from now on, without keeping them: cheaper to
/// look at often than a full record of every event.
pub async fn count_finals(names: &Names) -> Arc<AtomicUsize> {
    let (conn, ch) = confirm_channel().await;
    let queue = topology::private_queue(&ch).await.unwrap();
    for kind in EventKind::ALL.into_iter().filter(|k| k.is_final()) {
        topology::bind(&ch, &queue, &names.events_exchange, kind.routing_key())
            .await
            .unwrap();
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
        .unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&count);
    tokio::spawn(async move {
        // The connection lives as long as the count goes on.
        let _conn = conn;
        while let Some(Ok(_)) = consumer.next().await {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    count
}

/// The resident set size of process `pid` in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}
