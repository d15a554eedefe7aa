//! Result events: CloudEvents 1.0 in structured JSON, one type per step of a job's life.
//!
//! The same [`Event`] value is logged, counted and published, so the three cannot disagree.

mod payload;
mod sink;

use serde::Serialize;
use uuid::Uuid;

pub use payload::{
    BatchSummary, EventData, Failure, FinishReport, JobResult, JobStart, Rejection, StageReport,
    StageTiming,
};
pub use sink::{EventSink, JsonLinesSink};

/// The CloudEvents `datacontenttype` of a structured event as a whole.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// The event types prefix unless the worker's configuration gives another.
pub const DEFAULT_PREFIX: &str = "dev.hatchery";

/// UUID namespace under which event ids derive from what they report.
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6b1d_5d1e_8a8e_4c0b_9d0c_1e2f_3a4b_5c6d);

/// Every kind of event hatchery publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    JobStarted,
    StageStarted,
    StageSucceeded,
    StageRetrying,
    JobSucceeded,
    JobFailed,
    JobRejected,
    JobCancelled,
    BatchCompleted,
}

impl EventKind {
    pub const ALL: [EventKind; 9] = [
        EventKind::JobStarted,
        EventKind::StageStarted,
        EventKind::StageSucceeded,
        EventKind::StageRetrying,
        EventKind::JobSucceeded,
        EventKind::JobFailed,
        EventKind::JobRejected,
        EventKind::JobCancelled,
        EventKind::BatchCompleted,
    ];

    /// The `object.action` part of the type, which is also the AMQP routing key.
    pub fn routing_key(self) -> &'static str {
        match self {
            EventKind::JobStarted => "job.started",
            EventKind::StageStarted => "stage.started",
            EventKind::StageSucceeded => "stage.succeeded",
            EventKind::StageRetrying => "stage.retrying",
            EventKind::JobSucceeded => "job.succeeded",
            EventKind::JobFailed => "job.failed",
            EventKind::JobRejected => "job.rejected",
            EventKind::JobCancelled => "job.cancelled",
            EventKind::BatchCompleted => "batch.completed",
        }
    }

    /// Whether this event ends the job: exactly one such event is published per job.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            EventKind::JobSucceeded
                | EventKind::JobFailed
                | EventKind::JobRejected
                | EventKind::JobCancelled
        )
    }

    pub fn from_type(ty: &str) -> Option<EventKind> {
        Self::ALL
            .into_iter()
            .find(|k| ty.ends_with(&format!(".{}", k.routing_key())))
    }
}

/// A CloudEvents 1.0 event in structured mode.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Event {
    pub specversion: String,
    /// Stable for the same (job, kind, stage, attempt): a consumer drops a duplicate by id.
    pub id: Uuid,
    /// The worker that published it, as `hatchery://<worker name>`.
    pub source: String,
    #[serde(rename = "type")]
    pub ty: String,
    /// The job id; the batch id for batch events.
    pub subject: String,
    pub time: String,
    pub datacontenttype: String,
    /// The batch the job belongs to, as a CloudEvents extension attribute.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub batchid: Option<String>,
    pub data: EventData,
}

/// Who publishes events and under which type prefix.
#[derive(Debug, Clone)]
pub struct Publisher {
    pub source: String,
    pub prefix: String,
}

impl Publisher {
    pub fn new(worker: &str) -> Self {
        Self {
            source: format!("hatchery://{worker}"),
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }

    /// Builds an event. `key` distinguishes events of the same kind about the same subject
    /// (stage and attempt); equal inputs give equal ids.
    pub fn event(
        &self,
        kind: EventKind,
        subject: &str,
        batch: Option<&str>,
        key: &str,
        data: EventData,
    ) -> Event {
        let name = format!("{subject}/{}/{key}", kind.routing_key());
        Event {
            specversion: "1.0".to_owned(),
            id: Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes()),
            source: self.source.clone(),
            ty: format!("{}.{}", self.prefix, kind.routing_key()),
            subject: subject.to_owned(),
            time: now_rfc3339(),
            datacontenttype: "application/json".to_owned(),
            batchid: batch.map(str::to_owned),
            data,
        }
    }
}

impl Event {
    pub fn kind(&self) -> Option<EventKind> {
        EventKind::from_type(&self.ty)
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}
