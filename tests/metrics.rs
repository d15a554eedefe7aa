//! `/metrics`, `/healthz` and `/readyz` of a worker on the real broker.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::fleet::Fleet;
use common::wait_until;
use hatchery::events::EventKind;

fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    get_in_pieces(addr, path, Duration::ZERO)
}

/// A GET that reaches the server in two segments `pause` apart, split inside the path, as a
/// request may arrive from a client that writes it piecemeal.
fn get_in_pieces(addr: SocketAddr, path: &str, pause: Duration) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_nodelay(true).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    let (first, rest) = request.split_at(4 + path.len() / 2);
    stream.write_all(first.as_bytes()).ok()?;
    std::thread::sleep(pause);
    stream.write_all(rest.as_bytes()).ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1)?.to_owned();
    Some((status, body))
}

#[test]
fn a_worker_exposes_metrics_and_health() {
    let fleet = Fleet::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let listen = format!("worker.metrics_listen=\"{addr}\"");
    let _worker = fleet.worker("metrics", &["--set", &listen]);

    assert!(wait_until(Duration::from_secs(20), || get(addr, "/readyz")
        .is_some_and(|r| r.0 == 200)));
    assert_eq!(get(addr, "/healthz").unwrap().0, 200);

    let jobs: Vec<_> = (0..3).map(|i| fleet.job(&format!("m{i}"))).collect();
    for job in &jobs {
        fleet.submit(job);
    }
    let done = || {
        jobs.iter()
            .all(|j| fleet.count(EventKind::JobSucceeded, j["id"].as_str().unwrap()) == 1)
    };
    assert!(wait_until(Duration::from_secs(30), done));

    let (status, body) = get(addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("hatchery_jobs_total{outcome=\"succeeded\"} 3"),
        "{body}"
    );
    assert!(body.contains("hatchery_broker_connected 1"), "{body}");
    assert!(body.contains(&format!(
        "hatchery_jobs_in_flight{{hypervisor=\"{}\"}} 0",
        fleet.uri
    )));
    assert!(
        body.contains("hatchery_stage_duration_seconds_count{stage=\"domain\"} 3"),
        "{body}"
    );
    assert_eq!(get(addr, "/nope").unwrap().0, 404);
    let pause = Duration::from_millis(100);
    let (status, body) = get_in_pieces(addr, "/healthz", pause).unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "ok\n"),
        "a request in two segments"
    );
}
