//! What a running worker shows about itself: Prometheus metrics derived from the same events it
//! publishes, and health endpoints over a minimal HTTP server.

mod http;
mod metrics;

pub use http::serve;
pub use metrics::{Metrics, ObservedSink};
