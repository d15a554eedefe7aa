//! Jobs that come back after a crash on libvirt's test driver: rollbacks cut short or finished
//! without their outcome published, a hypervisor whose daemon is not up yet, and the reconciler
//! that finds what no job owns.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::capture::Collect;
use common::jobs;
use common::libvirtd::PrivateLibvirtd;
use common::pipeline::{inventory, pipeline, run};
use common::testdriver::{BASE, TestHost};
use tokio_util::sync::CancellationToken;

use hatchery::events::{EventKind, Failure};
use hatchery::hypervisor::metadata::JobState;
use hatchery::pipeline::{Outcome, Pipeline};
use hatchery::reconcile;
use hatchery::stages::domain::{self, Domain};
use hatchery::stages::overlay::Overlay;
use hatchery::stages::{ErrorClass, JobRun, Stage, StageKind};

/// A job whose overlay and domain stages ran, as a worker that died right after would leave
/// it, and the run context that made them.
async fn half_made(p: &Pipeline, uri: &str, name: &str) -> (Arc<hatchery::job::Job>, JobRun) {
    let job = Arc::new(jobs::parse(&jobs::provision(uri, name)));
    let hv = p.hypervisors.get(uri);
    let mut cx = JobRun::new(Arc::clone(&job), hv, Arc::clone(&p.settings), 1);
    cx.deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    Overlay::run(&mut cx).await.unwrap();
    Domain::run(&mut cx).await.unwrap();
    (job, cx)
}

/// A job a worker rolled back and then died with, before the broker had its outcome.
async fn rolled_back_unpublished(
    p: &Pipeline,
    uri: &str,
    name: &str,
) -> (Arc<hatchery::job::Job>, JobRun) {
    let (job, cx) = half_made(p, uri, name).await;
    hatchery::stages::rollback::run(&cx, StageKind::Domain)
        .await
        .unwrap();
    (job, cx)
}

/// Delivers `job` again, as its second attempt after the first worker died.
async fn redeliver(p: &Pipeline, job: &hatchery::job::Job) -> (Outcome, Collect) {
    let sink = Collect::default();
    let outcome = p.run(job.clone(), 2, CancellationToken::new(), &sink).await;
    (outcome, sink)
}

#[tokio::test]
async fn a_rollback_cut_short_by_a_crash_is_finished_on_redelivery() {
    let host = TestHost::new();
    let p = pipeline();
    let job = Arc::new(jobs::parse(&jobs::provision(&host.uri, "half-undone")));

    // A worker made the overlay and the domain, failed, began rolling back, and died.
    let mut cx = JobRun::new(
        Arc::clone(&job),
        p.hypervisors.get(&host.uri),
        Arc::clone(&p.settings),
        1,
    );
    cx.deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    Overlay::run(&mut cx).await.unwrap();
    Domain::run(&mut cx).await.unwrap();
    let mut meta = domain::read_metadata(&cx, "half-undone")
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    meta.state = JobState::RollingBack;
    meta.failure = Some(Failure {
        stage: StageKind::Finish,
        class: ErrorClass::ScriptFailed,
        message: "finish script exited with status 7".into(),
    });
    domain::write_metadata(&cx, "half-undone", &meta)
        .await
        .unwrap();

    let (outcome, sink) = redeliver(&p, &job).await;

    assert_eq!(outcome, Outcome::Failed);
    let result = sink.result();
    assert_eq!(result["failure"]["class"], "interrupted");
    assert_eq!(result["failure"]["stage"], "finish");
    let message = result["failure"]["message"].as_str().unwrap();
    assert!(message.contains("exited with status 7"), "{message}");
    assert_eq!(result["rolled_back"], true);
    assert!(
        !sink.kinds().contains(&EventKind::StageStarted),
        "no stage ran again"
    );
    let (domains, volumes) = inventory(&p, &host.uri).await;
    assert!(domains.is_empty(), "{domains:?}");
    assert_eq!(volumes, vec![BASE.to_owned()]);
}

#[tokio::test]
async fn a_cancellation_cut_short_by_a_crash_is_reported_as_a_cancellation_again() {
    let host = TestHost::new();
    let p = pipeline();
    let (job, cx) = half_made(&p, &host.uri, "cancel-undone").await;
    let name = "cancel-undone";
    let mut meta = domain::read_metadata(&cx, name).await.unwrap().unwrap();
    let meta = meta.as_mut().unwrap();
    meta.state = JobState::RollingBack;
    meta.failure = Some(Failure {
        stage: StageKind::Address,
        class: ErrorClass::Cancelled,
        message: "job was cancelled".into(),
    });
    domain::write_metadata(&cx, name, meta).await.unwrap();

    let (outcome, sink) = redeliver(&p, &job).await;

    // The same kind of final event as the first run's, so the same event id.
    assert_eq!(outcome, Outcome::Cancelled);
    assert_eq!(sink.result()["failure"]["class"], "cancelled");
    assert!(inventory(&p, &host.uri).await.0.is_empty());
}

#[tokio::test]
async fn a_finished_rollback_whose_outcome_was_lost_is_reported_again_and_frees_the_name() {
    let host = TestHost::new();
    let p = pipeline();
    let (_, cx) = rolled_back_unpublished(&p, &host.uri, "undone").await;

    // The guest is stopped and the overlay gone; the definition keeps the record.
    let (domains, volumes) = inventory(&p, &host.uri).await;
    assert_eq!(domains, vec!["undone".to_owned()]);
    assert_eq!(volumes, vec![BASE.to_owned()]);
    let meta = domain::read_metadata(&cx, "undone").await.unwrap();
    assert_eq!(meta.unwrap().unwrap().state, JobState::RolledBack);

    // Another job may take the name at once: the definition is only a record.
    let (outcome, _) = run(&p, jobs::parse(&jobs::provision(&host.uri, "undone"))).await;
    assert_eq!(outcome, Outcome::Succeeded);
    let (domains, _) = inventory(&p, &host.uri).await;
    assert_eq!(domains, vec!["undone".to_owned()]);
}

#[tokio::test]
async fn a_redelivery_after_a_finished_rollback_reports_it_without_running_the_job() {
    let host = TestHost::new();
    let p = pipeline();
    let (job, _) = rolled_back_unpublished(&p, &host.uri, "undone-once").await;

    let (outcome, sink) = redeliver(&p, &job).await;

    assert_eq!(outcome, Outcome::Failed);
    let result = sink.result();
    assert_eq!(result["failure"]["class"], "interrupted");
    assert_eq!(result["rolled_back"], true);
    assert!(
        !sink.kinds().contains(&EventKind::StageStarted),
        "no stage ran again"
    );
    let (domains, volumes) = inventory(&p, &host.uri).await;
    assert!(
        domains.is_empty(),
        "the record went once the outcome was out: {domains:?}"
    );
    assert_eq!(volumes, vec![BASE.to_owned()]);
}

#[tokio::test]
async fn the_reconciler_finds_only_what_no_job_owns() {
    let host = TestHost::new();
    let p = pipeline();
    let hv = p.hypervisors.get(&host.uri);

    // A healthy VM, a kept failure, and an abandoned half-made one.
    let (ok, _) = run(&p, jobs::parse(&jobs::provision(&host.uri, "healthy"))).await;
    assert_eq!(ok, Outcome::Succeeded);
    let (_, cx) = half_made(&p, &host.uri, "abandoned").await;
    let mut meta = domain::read_metadata(&cx, "abandoned")
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    meta.updated_at = Some(1_000);
    domain::write_metadata(&cx, "abandoned", &meta)
        .await
        .unwrap();

    let day = std::time::Duration::from_secs(86_400);
    let orphans = reconcile::find(&hv, day).await.unwrap();
    let names: Vec<&str> = orphans.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(orphans.len(), 2, "{orphans:?}");
    assert_eq!(names[0], "abandoned");
    assert!(names[1].starts_with("abandoned-"), "its overlay: {names:?}");

    assert_eq!(reconcile::remove(&hv, &orphans, day).await.unwrap(), 2);
    let (domains, volumes) = inventory(&p, &host.uri).await;
    assert_eq!(domains, vec!["healthy".to_owned()]);
    assert_eq!(
        volumes.len(),
        2,
        "the base and the healthy VM's overlay: {volumes:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hypervisor_coming_up_late_costs_time_not_attempts() {
    // A daemon that starts two seconds after the job, as after a libvirtd restart.
    let dir = tempfile::TempDir::new().unwrap();
    let socket = PrivateLibvirtd::socket_in(dir.path());
    let daemon = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(2));
        PrivateLibvirtd::start_in(dir, "root")
    });
    // A URI with parameters comes from the worker's configuration, never from a job.
    let uri = format!("test+unix:///default?socket={}", socket.display());
    let mut settings = common::pipeline::test_settings();
    settings.hypervisors.insert("late-host".into(), uri);
    let p = Pipeline::new(settings, hatchery::events::Publisher::new("test"));
    let mut doc = jobs::provision("late-host", "late");
    // Two attempts 100 ms apart would be spent long before the daemon answers.
    doc["provision"]["retry"] = serde_json::json!({
        "max_attempts": 2, "initial_delay_ms": 100, "max_delay_secs": 1, "max_elapsed_secs": 60
    });

    let (outcome, events) = run(&p, jobs::parse(&doc)).await;
    let _daemon = daemon.join().unwrap();

    // The daemon's test driver has no such base: the stage ran, and failed for that reason.
    assert_eq!(outcome, Outcome::Failed);
    let failure = &events.result()["failure"];
    assert_eq!(failure["class"], "refused", "{failure}");
    assert!(
        failure["message"]
            .as_str()
            .unwrap()
            .contains("is not in storage pool"),
        "{failure}"
    );
    let retries = events
        .kinds()
        .iter()
        .filter(|k| **k == EventKind::StageRetrying)
        .count();
    assert!(retries > 2, "{retries} retries while the daemon was down");
}
