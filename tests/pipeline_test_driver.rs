//! The whole pipeline on libvirt's test driver: every stage, re-runs, rollback, refusals.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::capture::Collect;
use common::jobs;
use common::pipeline::{domain_xml, inventory, pipeline, run, validate_event};
use common::testdriver::{BASE, BASE_GIB, FAR_NET, TestHost};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use hatchery::events::{EventData, EventKind, Publisher};
use hatchery::hypervisor::Op;
use hatchery::hypervisor::metadata::JobState;
use hatchery::pipeline::{Outcome, Pipeline};
use hatchery::reconcile;
use hatchery::settings::Settings;
use hatchery::stages::address::Address;
use hatchery::stages::domain::{self, Domain};
use hatchery::stages::finish::Finish;
use hatchery::stages::overlay::Overlay;
use hatchery::stages::{JobRun, Stage, StageKind};

#[tokio::test]
async fn provisions_a_vm_through_every_stage() {
    let host = TestHost::new();
    let p = pipeline();
    let (outcome, events) = run(&p, jobs::parse(&jobs::provision(&host.uri, "web-01"))).await;

    assert_eq!(outcome, Outcome::Succeeded);
    let mut expected = vec![EventKind::JobStarted];
    for _ in 0..4 {
        expected.extend([EventKind::StageStarted, EventKind::StageSucceeded]);
    }
    expected.push(EventKind::JobSucceeded);
    assert_eq!(events.kinds(), expected);
    for event in events.0.lock().unwrap().iter() {
        validate_event(event);
    }

    let result = events.result();
    assert!(result["domain_uuid"].is_string());
    assert_eq!(result["ip"], "127.0.0.2", "the test host's made-up lease");
    assert_eq!(result["stages"].as_array().unwrap().len(), 4);

    let (domains, volumes) = inventory(&p, &host.uri).await;
    assert!(domains.contains(&"web-01".to_owned()));
    assert_eq!(volumes.len(), 2, "the base and one overlay: {volumes:?}");

    // The domain runs from the overlay and carries hatchery's metadata.
    let xml = domain_xml(&p, &host.uri, "web-01").await;
    assert!(xml.contains("https://hatchery.dev/xmlns/job/1"), "{xml}");
    assert!(xml.contains(&format!(
        "web-01-{}.qcow2",
        result["job_id"].as_str().unwrap()
    )));
    assert!(
        xml.contains("listen='0.0.0.0'") || xml.contains("listen=\"0.0.0.0\""),
        "{xml}"
    );
}

#[tokio::test]
async fn rerunning_after_each_stage_reuses_what_exists() {
    for done in 1..=StageKind::PROVISION.len() {
        let host = TestHost::new();
        let p = pipeline();
        let job = Arc::new(jobs::parse(&jobs::provision(&host.uri, "rerun")));

        // A worker that got this far and crashed.
        let mut cx = JobRun::new(
            Arc::clone(&job),
            p.hypervisors.get(&host.uri),
            Arc::clone(&p.settings),
            1,
        );
        cx.deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        for stage in &StageKind::PROVISION[..done] {
            match stage {
                StageKind::Overlay => Overlay::run(&mut cx).await,
                StageKind::Domain => Domain::run(&mut cx).await,
                StageKind::Address => Address::run(&mut cx).await,
                _ => Finish::run(&mut cx).await,
            }
            .unwrap_or_else(|e| panic!("stage {stage} failed: {e}"));
        }
        let uuid_before = cx.facts.domain_uuid;

        let (outcome, events) = run(&p, (*job).clone()).await;
        assert_eq!(
            outcome,
            Outcome::Succeeded,
            "after {done} stages: {:?}",
            events.result()
        );
        let (domains, volumes) = inventory(&p, &host.uri).await;
        assert_eq!(domains, vec!["rerun".to_owned()], "after {done} stages");
        assert_eq!(volumes.len(), 2, "after {done} stages: {volumes:?}");
        if let Some(uuid) = uuid_before {
            assert_eq!(events.result()["domain_uuid"], uuid.to_string());
        }
    }
}

#[tokio::test]
async fn a_failed_finish_rolls_back_domain_and_overlay() {
    let host = TestHost::new();
    let p = pipeline();
    // Nothing listens on this loopback port, so the finish stage can never log in.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut doc = jobs::provision(&host.uri, "doomed");
    doc["provision"]["address"] =
        json!({ "source": "static", "ip": "127.0.0.1", "port": closed.port() });
    doc["provision"]["finish"] =
        json!({ "user": "root", "password": "pw-not-logged", "script": "true" });
    doc["provision"]["timeouts"]["finish_secs"] = json!(1);

    let (outcome, events) = run(&p, jobs::parse(&doc)).await;

    assert_eq!(outcome, Outcome::Failed);
    let result = events.result();
    assert_eq!(result["failure"]["stage"], "finish");
    assert_eq!(result["failure"]["class"], "ssh_unavailable");
    assert_eq!(result["rolled_back"], true);
    let (domains, volumes) = inventory(&p, &host.uri).await;
    assert!(domains.iter().all(|d| d != "doomed"), "{domains:?}");
    assert_eq!(volumes, vec![BASE.to_owned()]);
    validate_event(&events.last());
    let all = serde_json::to_string(&*events.0.lock().unwrap()).unwrap();
    assert!(
        !all.contains("pw-not-logged"),
        "the password leaked into an event"
    );
}

#[tokio::test]
async fn keep_leaves_the_failed_vm_for_inspection() {
    let host = TestHost::new();
    let p = pipeline();
    let mut doc = jobs::provision(&host.uri, "kept");
    doc["provision"]["vm"]["nics"] = json!([{ "network": FAR_NET }]);
    doc["provision"]["finish"] = json!({ "user": "root", "password": "x", "script": "true" });
    doc["provision"]["on_failure"] = json!("keep");

    let (outcome, events) = run(&p, jobs::parse(&doc)).await;

    assert_eq!(outcome, Outcome::Failed);
    assert_eq!(events.result()["rolled_back"], false);
    let (domains, volumes) = inventory(&p, &host.uri).await;
    assert!(domains.contains(&"kept".to_owned()));
    assert_eq!(volumes.len(), 2);

    // The domain says it was kept on purpose, so the reconciler leaves it however old it is.
    let hv = p.hypervisors.get(&host.uri);
    let job = Arc::new(jobs::parse(&doc));
    let cx = JobRun::new(job, Arc::clone(&hv), Arc::clone(&p.settings), 1);
    let meta = domain::read_metadata(&cx, "kept").await.unwrap().unwrap();
    let meta = meta.unwrap();
    assert_eq!(meta.state, JobState::Kept);
    assert_eq!(meta.failure.map(|f| f.stage), Some(StageKind::Finish));
    let orphans = reconcile::find(&hv, std::time::Duration::ZERO)
        .await
        .unwrap();
    assert!(orphans.is_empty(), "{orphans:?}");
}

#[tokio::test]
async fn made_up_addresses_of_the_test_driver_are_never_contacted() {
    let host = TestHost::new();
    let p = pipeline();
    let mut doc = jobs::provision(&host.uri, "far");
    doc["provision"]["vm"]["nics"] = json!([{ "network": FAR_NET }]);
    doc["provision"]["finish"] = json!({ "user": "root", "password": "x", "script": "true" });

    let (outcome, events) = run(&p, jobs::parse(&doc)).await;

    assert_eq!(outcome, Outcome::Failed);
    let failure = &events.result()["failure"];
    assert_eq!(failure["class"], "refused");
    assert!(
        failure["message"].as_str().unwrap().contains("made up"),
        "{failure}"
    );
    assert_eq!(inventory(&p, &host.uri).await.1, vec![BASE.to_owned()]);
}

#[tokio::test]
async fn a_disk_below_the_base_is_refused() {
    let host = TestHost::new();
    let p = pipeline();
    let mut doc = jobs::provision(&host.uri, "small");
    doc["provision"]["vm"]["disk_gib"] = json!(BASE_GIB - 1);

    let (outcome, events) = run(&p, jobs::parse(&doc)).await;

    assert_eq!(outcome, Outcome::Failed);
    let message = events.result()["failure"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("below the base image"), "{message}");
    assert_eq!(inventory(&p, &host.uri).await.1, vec![BASE.to_owned()]);
}

#[tokio::test]
async fn a_base_with_its_own_backing_file_is_refused() {
    let host = TestHost::with_volumes(
        "<volume type='file'><name>chained.qcow2</name><capacity unit='GiB'>1</capacity>
           <target><format type='qcow2'/></target>
           <backingStore><path>/elsewhere/root.qcow2</path><format type='qcow2'/></backingStore>
         </volume>",
    );
    let p = pipeline();
    let mut doc = jobs::provision(&host.uri, "chained");
    doc["provision"]["vm"]["base"]["volume"] = json!("chained.qcow2");

    let (outcome, events) = run(&p, jobs::parse(&doc)).await;

    assert_eq!(outcome, Outcome::Failed);
    let message = events.result()["failure"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("backing file of its own"), "{message}");
}

#[tokio::test]
async fn a_pinned_digest_accepts_the_base_and_refuses_a_modified_one() {
    let host = TestHost::new();
    let base = host.pool_path(BASE);
    std::fs::write(&base, b"pretend this is a qcow2 image").unwrap();
    let digest = "e7b8e4e1aa4cdbf6bba1dd2c9ccd4b4d6c6e0fb24e0e2ef7e1e5d9b0b0c1a2f3";
    let real = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&base).unwrap()))
    };
    let p = pipeline();

    let mut good = jobs::provision(&host.uri, "pinned");
    good["provision"]["vm"]["base"]["sha256"] = json!(real);
    let (outcome, _) = run(&p, jobs::parse(&good)).await;
    assert_eq!(outcome, Outcome::Succeeded);

    let mut bad = jobs::provision(&host.uri, "pinned-bad");
    bad["provision"]["vm"]["base"]["sha256"] = json!(digest);
    let (outcome, events) = run(&p, jobs::parse(&bad)).await;
    assert_eq!(outcome, Outcome::Failed);
    let message = events.result()["failure"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("not the pinned"), "{message}");
}

#[tokio::test]
async fn a_domain_of_another_job_is_neither_adopted_nor_removed() {
    let host = TestHost::new();
    let p = pipeline();
    let (first, _) = run(&p, jobs::parse(&jobs::provision(&host.uri, "taken"))).await;
    assert_eq!(first, Outcome::Succeeded);

    let (second, events) = run(&p, jobs::parse(&jobs::provision(&host.uri, "taken"))).await;

    assert_eq!(second, Outcome::Failed);
    assert!(
        events.result()["failure"]["message"]
            .as_str()
            .unwrap()
            .contains("another job")
    );
    let (domains, volumes) = inventory(&p, &host.uri).await;
    assert!(
        domains.contains(&"taken".to_owned()),
        "the first job's domain survives"
    );
    assert_eq!(
        volumes.len(),
        2,
        "the first job's overlay survives, the second's is gone"
    );
}

#[tokio::test]
async fn deprovision_removes_domain_and_overlay_but_not_the_base() {
    let host = TestHost::new();
    let p = pipeline();
    let (made, _) = run(&p, jobs::parse(&jobs::provision(&host.uri, "gone"))).await;
    assert_eq!(made, Outcome::Succeeded);

    let (outcome, events) = run(&p, jobs::parse(&jobs::deprovision(&host.uri, "gone"))).await;
    assert_eq!(outcome, Outcome::Succeeded, "{:?}", events.result());
    let (domains, volumes) = inventory(&p, &host.uri).await;
    assert!(domains.iter().all(|d| d != "gone"));
    assert_eq!(volumes, vec![BASE.to_owned()]);

    // Again: nothing left to do, and it says so.
    let (again, events) = run(&p, jobs::parse(&jobs::deprovision(&host.uri, "gone"))).await;
    assert_eq!(again, Outcome::Succeeded);
    assert_eq!(events.result()["already_absent"], true);
}

#[tokio::test]
async fn deprovision_refuses_a_domain_hatchery_did_not_make() {
    let host = TestHost::new();
    let p = pipeline();
    // The test driver's default host has no domains; define one the way an operator would.
    let hv = p.hypervisors.get(&host.uri);
    hv.call(
        Op::DefineDomain {
            name: "foreign".into(),
        },
        |c| {
            c.define_domain_xml(
                "<domain type='test'><name>foreign</name><memory>65536</memory>\
             <os><type>hvm</type></os></domain>",
            )
            .map(|_| ())
        },
    )
    .await
    .unwrap();

    let (outcome, events) = run(&p, jobs::parse(&jobs::deprovision(&host.uri, "foreign"))).await;

    assert_eq!(outcome, Outcome::Failed);
    assert!(
        events.result()["failure"]["message"]
            .as_str()
            .unwrap()
            .contains("not made by")
    );
    assert!(
        inventory(&p, &host.uri)
            .await
            .0
            .contains(&"foreign".to_owned())
    );
}

#[tokio::test]
async fn a_test_driver_uri_from_a_job_is_refused_unless_allowed() {
    let host = TestHost::new();
    let p = Pipeline::new(Settings::default(), Publisher::new("test"));
    let (outcome, events) = run(&p, jobs::parse(&jobs::provision(&host.uri, "t"))).await;
    assert_eq!(outcome, Outcome::Rejected);
    let EventData::Rejected(rejection) = &events.last().data else {
        panic!("not a rejection")
    };
    assert_eq!(rejection.reason, "test_driver_disabled");
}

#[tokio::test]
async fn an_unknown_hypervisor_name_is_rejected() {
    let p = pipeline();
    let mut doc = jobs::provision("test:///default", "nowhere");
    doc["hypervisor"] = json!("rack-42");

    let (outcome, events) = run(&p, jobs::parse(&doc)).await;

    assert_eq!(outcome, Outcome::Rejected);
    let event = events.last();
    assert_eq!(event.kind(), Some(EventKind::JobRejected));
    let EventData::Rejected(rejection) = &event.data else {
        panic!("not a rejection")
    };
    assert_eq!(rejection.reason, "unknown_hypervisor");
    validate_event(&event);
}

#[tokio::test]
async fn cancelling_stops_the_job_and_rolls_it_back() {
    let host = TestHost::new();
    let p = pipeline();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut doc = jobs::provision(&host.uri, "cancelled");
    doc["provision"]["address"] =
        json!({ "source": "static", "ip": "127.0.0.1", "port": closed.port() });
    doc["provision"]["finish"] = json!({ "user": "root", "password": "x", "script": "true" });
    let job = jobs::parse(&doc);

    let cancel = CancellationToken::new();
    let sink = Collect::default();
    let canceller = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        canceller.cancel();
    });
    let outcome = p.run(job, 1, cancel, &sink).await;

    assert_eq!(outcome, Outcome::Cancelled);
    assert_eq!(sink.last().kind(), Some(EventKind::JobCancelled));
    assert_eq!(sink.result()["rolled_back"], true);
    assert_eq!(inventory(&p, &host.uri).await.1, vec![BASE.to_owned()]);
}
