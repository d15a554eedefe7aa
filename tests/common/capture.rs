//! Everything a test process logs and every event a job emits, kept in memory so that tests can
//! search them.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, OnceLock};

use hatchery::events::{Event, EventKind, EventSink};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::FmtSpan;

/// Log output, appended to by every thread of the process.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut buf = self.0.lock().unwrap_or_else(|p| p.into_inner());
        buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Buffer {
    type Writer = Buffer;

    fn make_writer(&'a self) -> Buffer {
        self.clone()
    }
}

static LOGS: OnceLock<Buffer> = OnceLock::new();

/// Installs, once per process, a subscriber taking every event and span at TRACE level.
///
/// Process-wide rather than per test with `set_default`: libvirt and SSH calls run on tokio's
/// blocking threads, which a thread-local subscriber would not see.
pub fn init_logs() {
    LOGS.get_or_init(|| {
        let buffer = Buffer::default();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_span_events(FmtSpan::NEW | FmtSpan::CLOSE)
            .with_writer(buffer.clone())
            .try_init()
            .expect("no other global subscriber in this test binary");
        buffer
    });
}

/// Everything logged in this process so far.
pub fn logs() -> String {
    let buffer = LOGS.get().expect("init_logs() first");
    let bytes = buffer.0.lock().unwrap_or_else(|p| p.into_inner());
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Keeps every event it is given, in order.
#[derive(Default)]
pub struct Collect(pub Mutex<Vec<Event>>);

impl EventSink for Collect {
    fn emit<'a>(
        &'a self,
        event: Event,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        self.0.lock().unwrap().push(event);
        Box::pin(async {})
    }
}

impl Collect {
    pub fn events(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }

    /// The kinds of the events, in order; events of an unknown type are left out.
    pub fn kinds(&self) -> Vec<EventKind> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(Event::kind)
            .collect()
    }

    pub fn last(&self) -> Event {
        self.events().pop().expect("an event")
    }

    /// The final event's data as JSON.
    pub fn result(&self) -> serde_json::Value {
        serde_json::to_value(&self.last().data).unwrap()
    }
}
