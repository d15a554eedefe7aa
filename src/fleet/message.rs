//! How jobs and events look on the wire: properties, and the headers hatchery adds.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use super::names::JOB_ROUTING_KEY;
use super::outbox::Message;
use crate::events::{CONTENT_TYPE, Event};

/// Why a message went to the dead queue: `not_json`, `too_large`, `invalid`.
pub const HEADER_REASON: &str = "x-hatchery-reason";
/// On a copy of a job that a worker published to hand over a run that outlived the broker's
/// ack timeout; the value is the worker's name.
pub const HEADER_CONTINUATION: &str = "x-hatchery-continuation";
/// How many runs of the job started before this copy was published.
pub const HEADER_ATTEMPTS: &str = "x-hatchery-attempts";
/// On final events of batch jobs: the size of the batch, for the batch counter.
pub const HEADER_BATCH_SIZE: &str = "x-hatchery-batch-size";
/// Set by quorum queues on a redelivery: how many times the message was delivered before.
pub const HEADER_DELIVERY_COUNT: &str = "x-delivery-count";

/// Persistent, in AMQP's `delivery_mode` terms.
const PERSISTENT: u8 = 2;

/// An event as published to the events exchange: CloudEvents structured mode, routed by type,
/// with the event id as message id.
pub fn event(exchange: &str, event: &Event, batch_size: Option<u32>) -> Message {
    let routing_key = event
        .kind()
        .map_or("unknown", |k| k.routing_key())
        .to_owned();
    // Events are plain data; serialising them cannot fail.
    let body = serde_json::to_vec(event).unwrap_or_default();
    let mut props = BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_message_id(event.id.to_string().into())
        .with_type(event.ty.as_str().into())
        .with_delivery_mode(PERSISTENT);
    if let Some(size) = batch_size {
        let mut headers = FieldTable::default();
        headers.insert(
            HEADER_BATCH_SIZE.into(),
            AMQPValue::LongLongInt(i64::from(size)),
        );
        props = props.with_headers(headers);
    }
    Message {
        exchange: exchange.to_owned(),
        routing_key,
        body,
        props,
        mandatory: false,
    }
}

/// A job as `hatchery submit` publishes it.
pub fn job(exchange: &str, id: &str, body: Vec<u8>) -> Message {
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(id.into())
        .with_delivery_mode(PERSISTENT);
    let routing_key = JOB_ROUTING_KEY.to_owned();
    Message {
        exchange: exchange.to_owned(),
        routing_key,
        body,
        props,
        mandatory: true,
    }
}

/// A copy of a delivered message for `exchange`, keeping its properties and headers (less the
/// broker's own bookkeeping) and adding `extra`.
pub fn copy(
    exchange: &str,
    props: &BasicProperties,
    body: &[u8],
    extra: &[(&str, AMQPValue)],
) -> Message {
    let mut headers = FieldTable::default();
    if let Some(old) = props.headers() {
        for (k, v) in old.inner() {
            if !matches!(k.as_str(), "x-death" | HEADER_DELIVERY_COUNT) {
                headers.insert(k.clone(), v.clone());
            }
        }
    }
    for (k, v) in extra {
        headers.insert(ShortString::from(*k), v.clone());
    }
    let props = props
        .clone()
        .with_headers(headers)
        .with_delivery_mode(PERSISTENT);
    Message {
        exchange: exchange.to_owned(),
        routing_key: JOB_ROUTING_KEY.to_owned(),
        body: body.to_vec(),
        props,
        mandatory: true,
    }
}

pub fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

pub fn number(n: u32) -> AMQPValue {
    AMQPValue::LongLongInt(i64::from(n))
}

/// An integer header, whichever integer type the sender chose.
pub fn header_u32(props: &BasicProperties, name: &str) -> Option<u32> {
    let value = props.headers().as_ref()?.inner().get(name)?;
    let n: i64 = match *value {
        AMQPValue::ShortShortInt(v) => v.into(),
        AMQPValue::ShortShortUInt(v) => v.into(),
        AMQPValue::ShortInt(v) => v.into(),
        AMQPValue::ShortUInt(v) => v.into(),
        AMQPValue::LongInt(v) => v.into(),
        AMQPValue::LongUInt(v) => v.into(),
        AMQPValue::LongLongInt(v) => v,
        _ => return None,
    };
    u32::try_from(n).ok()
}

pub fn has_header(props: &BasicProperties, name: &str) -> bool {
    props
        .headers()
        .as_ref()
        .is_some_and(|h| h.inner().contains_key(name))
}

/// The pipeline's `attempt` for a delivery: runs started before this copy was published,
/// plus earlier deliveries of this copy, plus this one.
pub fn attempt(props: &BasicProperties) -> u32 {
    let before = header_u32(props, HEADER_ATTEMPTS).unwrap_or(0);
    let delivered = header_u32(props, HEADER_DELIVERY_COUNT).unwrap_or(0);
    before.saturating_add(delivered).saturating_add(1)
}
