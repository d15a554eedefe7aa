//! Where events go: stdout as JSON lines for `hatchery run`, the broker for the fleet.

use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::Mutex;

use super::Event;

/// Receives a job's events in order. The pipeline awaits each one; a sink that publishes to a
/// broker returns only once the broker has the event (or keeps it to publish later).
pub trait EventSink: Send + Sync {
    fn emit<'a>(&'a self, event: Event) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
}

/// Writes each event as one line of JSON to a writer, stdout by default.
pub struct JsonLinesSink<W: Write + Send> {
    out: Mutex<W>,
}

impl JsonLinesSink<std::io::Stdout> {
    pub fn stdout() -> Self {
        Self {
            out: Mutex::new(std::io::stdout()),
        }
    }
}

impl<W: Write + Send> JsonLinesSink<W> {
    pub fn new(out: W) -> Self {
        Self {
            out: Mutex::new(out),
        }
    }

    pub fn into_inner(self) -> W {
        self.out
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<W: Write + Send> EventSink for JsonLinesSink<W> {
    fn emit<'a>(&'a self, event: Event) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let mut line = serde_json::to_vec(&event).expect("events always serialise");
            line.push(b'\n');
            let mut out = self
                .out
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // A closed stdout (a pipe whose reader left) must not stop the job; the events
            // are also in the log.
            let _ = out.write_all(&line).and_then(|()| out.flush());
        })
    }
}
