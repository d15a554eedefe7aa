//! Declares the fleet's exchanges and queues. Every declaration is idempotent, so each worker,
//! `hatchery submit` and the tests declare the whole topology on every connection.
//!
//! Queue arguments are constants: RabbitMQ refuses (406) a second declaration of a queue with
//! different arguments, so nothing configurable may end up in them.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use super::BrokerError;
use super::names::{JOB_ROUTING_KEY, Names};
use crate::events::EventKind;

/// How long the cancellation stream keeps a request: a job cancelled before it was taken must
/// still be in the queue by then, or it runs.
const CANCELLATION_RETENTION: &str = "7D";

/// Declares everything a worker or a publisher of jobs needs.
pub async fn declare(ch: &Channel, names: &Names) -> Result<(), BrokerError> {
    // Exchanges first, so that the bindings below find them.
    exchange(ch, &names.jobs_exchange, ExchangeKind::Direct).await?;
    exchange(ch, &names.dead_exchange, ExchangeKind::Fanout).await?;
    exchange(ch, &names.events_exchange, ExchangeKind::Topic).await?;
    exchange(ch, &names.delay_exchange, ExchangeKind::Fanout).await?;

    // Quorum: a job survives the loss of a broker node; rejects go to the dead exchange.
    let mut args = table(&[("x-queue-type", "quorum")]);
    args.insert(
        "x-dead-letter-exchange".into(),
        string(&names.dead_exchange),
    );
    queue(ch, &names.jobs_queue, args).await?;
    bind(ch, &names.jobs_queue, &names.jobs_exchange, JOB_ROUTING_KEY).await?;

    queue(ch, &names.dead_queue, table(&[("x-queue-type", "quorum")])).await?;
    bind(ch, &names.dead_queue, &names.dead_exchange, "").await?;

    // Parked jobs expire (per-message TTL) back into the jobs exchange. Classic, because
    // quorum queues of RabbitMQ 3.10 ignore per-message TTL.
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        string(&names.jobs_exchange),
    );
    args.insert("x-dead-letter-routing-key".into(), string(JOB_ROUTING_KEY));
    queue(ch, &names.delay_queue, args).await?;
    bind(ch, &names.delay_queue, &names.delay_exchange, "").await?;

    // One consumer at a time counts batches: the others stand by to take over.
    let mut args = table(&[("x-queue-type", "quorum")]);
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    queue(ch, &names.batches_queue, args).await?;
    for kind in EventKind::ALL.into_iter().filter(|k| k.is_final()) {
        bind(
            ch,
            &names.batches_queue,
            &names.events_exchange,
            kind.routing_key(),
        )
        .await?;
    }

    let args = table(&[
        ("x-queue-type", "stream"),
        ("x-max-age", CANCELLATION_RETENTION),
    ]);
    queue(ch, &names.cancellations, args).await?;
    Ok(())
}

/// Declares the queue of configured hypervisor `name`. One consumer at a time (single active
/// consumer) with a prefetch of the hypervisor's limit keeps the fleet within that limit, and
/// when that worker dies the broker hands the queue, and the jobs it held, to another.
pub async fn declare_hypervisor(
    ch: &Channel,
    names: &Names,
    name: &str,
) -> Result<(), BrokerError> {
    let queue_name = names.hypervisor_queue(name);
    let mut args = table(&[("x-queue-type", "quorum")]);
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    args.insert(
        "x-dead-letter-exchange".into(),
        string(&names.dead_exchange),
    );
    queue(ch, &queue_name, args).await?;
    bind(
        ch,
        &queue_name,
        &names.jobs_exchange,
        &super::names::hypervisor_key(name),
    )
    .await
}

async fn exchange(ch: &Channel, name: &str, kind: ExchangeKind) -> Result<(), BrokerError> {
    let options = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(name.into(), kind, options, FieldTable::default())
        .await
        .map_err(|source| BrokerError::DeclareExchange {
            name: name.to_owned(),
            source,
        })
}

async fn queue(ch: &Channel, name: &str, args: FieldTable) -> Result<(), BrokerError> {
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(name.into(), options, args)
        .await
        .map(drop)
        .map_err(|source| BrokerError::DeclareQueue {
            name: name.to_owned(),
            source,
        })
}

/// Binds `queue` to `exchange` with `key`.
pub async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), BrokerError> {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|source| BrokerError::Bind {
        queue: queue.to_owned(),
        exchange: exchange.to_owned(),
        key: key.to_owned(),
        source,
    })
}

/// Declares a server-named, exclusive queue that lives as long as this connection.
pub async fn private_queue(ch: &Channel) -> Result<String, BrokerError> {
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    ch.queue_declare(ShortString::from(""), options, FieldTable::default())
        .await
        .map(|q| q.name().to_string())
        .map_err(|source| BrokerError::DeclareQueue {
            name: "(server-named)".to_owned(),
            source,
        })
}

fn table(pairs: &[(&str, &str)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), string(v));
    }
    t
}

fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}
