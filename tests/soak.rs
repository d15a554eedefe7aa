//! A long run of one worker on the real broker: ten thousand messages no worker may run, mixed
//! with a hundred jobs on the test driver. Every bad message is rejected with its reason and
//! dead-lettered, every job succeeds, and the worker neither restarts nor keeps growing.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hatchery::events::{Event, EventData, EventKind};
use hatchery::job::Limits;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use common::fleet::Fleet;
use common::junk::{self, Bad, Kind};
use common::load::{self, rss_kib};
use common::wait_until;

const BAD: usize = 10_000;
const GOOD: usize = 100;
/// The junk is the same on every run, so a failure can be reproduced.
const SEED: u64 = 0x0005_0a4e_d0b5;
/// Messages published per round of confirms.
const BATCH: usize = 500;
/// The memory baseline is taken once the worker has settled this many messages.
const WARM_UP: usize = 1_000;

/// One look at the worker: when, how many messages had a final event, and its memory.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    settled: usize,
    rss_kib: u64,
}

#[test]
fn ten_thousand_bad_messages_and_a_hundred_jobs_leave_one_worker_steady() {
    let started = Instant::now();
    let fleet = Fleet::new();
    let template = fleet.job("template");
    let bad = junk::generate(BAD, &template, SEED);
    let good: Vec<serde_json::Value> = (0..GOOD)
        .map(|i| fleet.job(&format!("soak-{i:03}")))
        .collect();
    let good_bodies: Vec<Vec<u8>> = good
        .iter()
        .map(|j| serde_json::to_vec(j).unwrap())
        .collect();
    eprintln!("generated in {:?}: {}", started.elapsed(), census(&bad));

    // A good job after every hundred bad messages.
    let mut order: Vec<&[u8]> = Vec::with_capacity(BAD + GOOD);
    for (i, b) in bad.iter().enumerate() {
        order.push(&b.body);
        if i % (BAD / GOOD) == BAD / GOOD - 1 {
            order.push(&good_bodies[i / (BAD / GOOD)]);
        }
    }

    // Many deliveries in flight at once, as on a busy worker.
    let mut worker = fleet.worker("soak", &["--concurrency", "64"]);
    let pid = worker.pid();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_conn, ch) = rt.block_on(load::confirm_channel());
    let final_count = rt.block_on(load::count_finals(&fleet.names));
    let settled = || final_count.load(Ordering::Relaxed);
    let stop_sampling = AtomicBool::new(false);

    let samples = std::thread::scope(|s| {
        let sampler = s.spawn(|| sample(settled, pid, started, &stop_sampling));
        let exchange = &fleet.names.jobs_exchange;
        rt.block_on(load::publish_batches(&ch, exchange, &order, BATCH));
        eprintln!(
            "published {} messages at {:?}",
            order.len(),
            started.elapsed()
        );

        let finished = wait_until(Duration::from_secs(150), || settled() >= BAD + GOOD);
        stop_sampling.store(true, Ordering::Relaxed);
        let samples = sampler.join().unwrap();
        assert!(finished, "not all settled: {}", worker.log());
        samples
    });
    report(&samples, started);

    // The jobs all succeeded, once each, and nothing else ran or failed.
    let recorded = || {
        let events = fleet.events();
        let finals = events
            .iter()
            .filter(|e| e.kind().is_some_and(EventKind::is_final));
        finals.count() >= BAD + GOOD
    };
    assert!(wait_until(Duration::from_secs(30), recorded));
    let events = fleet.events();
    let finals = fleet.finals();
    for job in &good {
        let id = job["id"].as_str().unwrap();
        let kinds: Vec<_> = finals[id].iter().map(Event::kind).collect();
        assert_eq!(kinds, [Some(EventKind::JobSucceeded)], "job {id}");
    }
    let count = |kind| events.iter().filter(|e| e.kind() == Some(kind)).count();
    assert_eq!(count(EventKind::JobSucceeded), GOOD);
    assert_eq!(count(EventKind::JobFailed), 0);
    assert_eq!(count(EventKind::JobStarted), GOOD, "only the jobs ran");

    // Every bad message became exactly one `job.rejected` with the parser's reason.
    let expected: HashMap<String, &Bad> = bad.iter().map(|b| (subject_of(&b.body), b)).collect();
    assert_eq!(expected.len(), BAD, "subjects are distinct");
    let mut seen = HashSet::new();
    for e in events
        .iter()
        .filter(|e| e.kind() == Some(EventKind::JobRejected))
    {
        let EventData::Rejected(r) = &e.data else {
            panic!("job.rejected without a rejection: {e:?}")
        };
        let b = expected
            .get(&e.subject)
            .unwrap_or_else(|| panic!("rejection of an unknown message: {e:?}"));
        assert_eq!(r.reason, b.reason, "{:?} message {}", b.kind, e.subject);
        assert!(!r.message.is_empty(), "{e:?}");
        if r.reason == "invalid" {
            assert!(
                !r.problems.is_empty(),
                "an invalid job's problems are listed: {e:?}"
            );
        }
        assert!(
            seen.insert(e.subject.clone()),
            "{} rejected twice",
            e.subject
        );
    }
    assert_eq!(seen.len(), BAD);
    eprintln!("events checked at {:?}", started.elapsed());

    // ... and lies in the dead queue, byte for byte, with the same reason.
    assert_eq!(fleet.queue_len(&fleet.names.dead_queue), Some(BAD as u32));
    let dead = rt.block_on(load::take_all(
        &ch,
        &fleet.names.dead_queue,
        BAD,
        Duration::from_secs(10),
    ));
    assert_eq!(dead.len(), BAD);
    let by_body: HashMap<&[u8], &Bad> = bad.iter().map(|b| (b.body.as_slice(), b)).collect();
    let mut dead_bodies = HashSet::new();
    for (body, reason) in &dead {
        let b = by_body
            .get(body.as_slice())
            .unwrap_or_else(|| panic!("unknown dead letter of {} bytes", body.len()));
        assert_eq!(*reason, b.reason, "dead letter of kind {:?}", b.kind);
        dead_bodies.insert(body.as_slice());
    }
    assert_eq!(
        dead_bodies.len(),
        BAD,
        "each bad message dead-lettered once"
    );
    assert_eq!(fleet.queue_len(&fleet.names.jobs_queue), Some(0));
    eprintln!("dead letters checked at {:?}", started.elapsed());

    // One process, one connection, all along.
    assert!(
        worker.child.try_wait().unwrap().is_none(),
        "{}",
        worker.log()
    );
    let log = worker.log();
    assert_eq!(log.matches("worker starting").count(), 1, "{log}");
    assert!(!log.contains("connection lost"), "{log}");

    // The memory after all of it is close to the memory after the first thousand.
    let baseline = samples.iter().find(|s| s.settled >= WARM_UP).unwrap();
    let last = samples.last().unwrap();
    let allowed = baseline.rss_kib * 3 / 2 + 4 * 1024;
    assert!(
        last.rss_kib <= allowed,
        "worker grew from {} KiB after {} messages to {} KiB after {} (allowed {allowed} KiB)",
        baseline.rss_kib,
        baseline.settled,
        last.rss_kib,
        last.settled
    );

    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}: {}",
        worker.log()
    );
    eprintln!("soak done in {:?}", started.elapsed());
}

/// Samples the worker every quarter second until `stop`, then once more.
fn sample(
    settled: impl Fn() -> usize,
    pid: u32,
    started: Instant,
    stop: &AtomicBool,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    loop {
        let last = stop.load(Ordering::Relaxed);
        samples.push(Sample {
            at: started.elapsed(),
            settled: settled(),
            rss_kib: rss_kib(pid),
        });
        if last {
            return samples;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The subject of a rejected message's event: the job id it carries, or the digest of it.
fn subject_of(body: &[u8]) -> String {
    let readable = body.len() <= Limits::default().message_bytes;
    let id = readable
        .then(|| serde_json::from_slice::<serde_json::Value>(body).ok())
        .flatten()
        .and_then(|v| v.get("id")?.as_str()?.parse::<Uuid>().ok());
    match id {
        Some(id) => id.to_string(),
        None => format!("sha256:{}", hex::encode(Sha256::digest(body))),
    }
}

/// How many messages of each kind and reason.
fn census(bad: &[Bad]) -> String {
    let mut counts: HashMap<(Kind, &str), usize> = HashMap::new();
    for b in bad {
        *counts.entry((b.kind, b.reason)).or_default() += 1;
    }
    let mut lines: Vec<String> = counts
        .into_iter()
        .map(|((kind, reason), n)| format!("{kind:?}/{reason}={n}"))
        .collect();
    lines.sort();
    lines.join(" ")
}

fn report(samples: &[Sample], started: Instant) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let step = (samples.len() / 12).max(1);
    for s in samples.iter().step_by(step).chain(samples.last()) {
        eprintln!(
            "  t={:>6.1}s settled={:>5} rss={:>6.1} MiB",
            s.at.as_secs_f64(),
            s.settled,
            mib(s.rss_kib)
        );
    }
    let peak = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    eprintln!(
        "{} samples, peak {:.1} MiB, settled all at {:?}",
        samples.len(),
        mib(peak),
        started.elapsed()
    );
}
