//! Counters, gauges and histograms fed by the events a worker publishes, so that what is
//! counted and what is reported cannot drift apart.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::events::{Event, EventData, EventKind, EventSink};

/// Upper bounds of the stage duration histogram, in seconds.
const BUCKETS: [f64; 13] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

#[derive(Debug, Default)]
pub struct Metrics {
    broker_connected: AtomicBool,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: BTreeMap<&'static str, u64>,
    rejected: BTreeMap<String, u64>,
    retries: BTreeMap<(String, String), u64>,
    in_flight: BTreeMap<String, i64>,
    stages: BTreeMap<String, Histogram>,
}

#[derive(Debug, Default, Clone)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, n) in BUCKETS.iter().zip(self.buckets.iter_mut()) {
            if seconds <= *bound {
                *n += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

impl Metrics {
    pub fn set_broker_connected(&self, connected: bool) {
        self.broker_connected.store(connected, Ordering::Relaxed);
    }

    pub fn broker_connected(&self) -> bool {
        self.broker_connected.load(Ordering::Relaxed)
    }

    /// Counts what `event` reports. Label values come from bounded sets: stage and error class
    /// enums, outcomes, rejection reasons, and the worker's configured hypervisors.
    pub fn observe(&self, event: &Event) {
        let Some(kind) = event.kind() else { return };
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match (&event.data, kind) {
            (EventData::Started(start), EventKind::JobStarted) => {
                *m.in_flight.entry(start.hypervisor.clone()).or_default() += 1;
            }
            (EventData::Stage(report), EventKind::StageSucceeded) => {
                let seconds = report.duration_ms.unwrap_or(0) as f64 / 1000.0;
                m.stages
                    .entry(report.stage.to_string())
                    .or_default()
                    .observe(seconds);
            }
            (EventData::Stage(report), EventKind::StageRetrying) => {
                let class = report
                    .error
                    .as_ref()
                    .map_or("unknown", |e| e.class.as_str());
                let key = (report.stage.to_string(), class.to_owned());
                *m.retries.entry(key).or_default() += 1;
            }
            (EventData::Result(result), kind) if kind.is_final() => {
                *m.in_flight.entry(result.hypervisor.clone()).or_default() -= 1;
                let outcome = kind.routing_key().trim_start_matches("job.");
                let outcome = match outcome {
                    "succeeded" => "succeeded",
                    "cancelled" => "cancelled",
                    _ => "failed",
                };
                *m.jobs.entry(outcome).or_default() += 1;
            }
            (EventData::Rejected(rejection), EventKind::JobRejected) => {
                *m.rejected.entry(rejection.reason.clone()).or_default() += 1;
                *m.jobs.entry("rejected").or_default() += 1;
            }
            _ => {}
        }
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let mut head = |name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            "hatchery_jobs_total",
            "counter",
            "Jobs that reached a final outcome.",
        );
        head(
            "hatchery_jobs_rejected_total",
            "counter",
            "Messages rejected, by reason.",
        );
        head(
            "hatchery_stage_retries_total",
            "counter",
            "Stage retries, by stage and error class.",
        );
        head(
            "hatchery_jobs_in_flight",
            "gauge",
            "Jobs running now, by hypervisor.",
        );
        head(
            "hatchery_broker_connected",
            "gauge",
            "1 while the broker connection is up.",
        );
        head(
            "hatchery_stage_duration_seconds",
            "histogram",
            "Successful stage attempts.",
        );

        for (outcome, n) in &m.jobs {
            let _ = writeln!(out, "hatchery_jobs_total{{outcome=\"{outcome}\"}} {n}");
        }
        for (reason, n) in &m.rejected {
            let _ = writeln!(
                out,
                "hatchery_jobs_rejected_total{{reason=\"{}\"}} {n}",
                esc(reason)
            );
        }
        for ((stage, class), n) in &m.retries {
            let _ = writeln!(
                out,
                "hatchery_stage_retries_total{{stage=\"{stage}\",class=\"{class}\"}} {n}"
            );
        }
        for (hv, n) in &m.in_flight {
            let _ = writeln!(
                out,
                "hatchery_jobs_in_flight{{hypervisor=\"{}\"}} {n}",
                esc(hv)
            );
        }
        let up = u8::from(self.broker_connected());
        let _ = writeln!(out, "hatchery_broker_connected {up}");
        for (stage, h) in &m.stages {
            let name = "hatchery_stage_duration_seconds";
            for (bound, n) in BUCKETS.iter().zip(h.buckets) {
                let _ = writeln!(out, "{name}_bucket{{stage=\"{stage}\",le=\"{bound}\"}} {n}");
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{stage=\"{stage}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "{name}_sum{{stage=\"{stage}\"}} {}", h.sum);
            let _ = writeln!(out, "{name}_count{{stage=\"{stage}\"}} {}", h.count);
        }
        out
    }
}

/// Escapes a label value as the exposition format requires.
fn esc(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A sink that counts every event on its way to the real one.
pub struct ObservedSink<'a> {
    pub inner: &'a dyn EventSink,
    pub metrics: &'a Metrics,
}

impl EventSink for ObservedSink<'_> {
    fn emit<'a>(&'a self, event: Event) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        self.metrics.observe(&event);
        self.inner.emit(event)
    }
}
