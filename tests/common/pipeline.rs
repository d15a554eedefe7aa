//! The pipeline as the test-driver tests run it: a worker's settings, one job run to its end
//! with its events kept, and what libvirt holds afterwards.

use hatchery::events::{Event, Publisher};
use hatchery::hypervisor::Op;
use hatchery::job::Job;
use hatchery::pipeline::{Outcome, Pipeline};
use hatchery::settings::Settings;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::capture::Collect;
use super::testdriver::POOL;

/// The settings of a worker that takes test-driver URIs from jobs, as these tests' jobs give.
pub fn test_settings() -> Settings {
    Settings {
        allow_test_driver: true,
        ..Settings::default()
    }
}

pub fn pipeline() -> Pipeline {
    Pipeline::new(test_settings(), Publisher::new("test"))
}

pub async fn run(p: &Pipeline, job: Job) -> (Outcome, Collect) {
    let sink = Collect::default();
    let outcome = p.run(job, 1, CancellationToken::new(), &sink).await;
    (outcome, sink)
}

/// Names of the domains and of the volumes in the pool, as libvirt lists them.
pub async fn inventory(p: &Pipeline, uri: &str) -> (Vec<String>, Vec<String>) {
    let hv = p.hypervisors.get(uri);
    hv.call(Op::ListDomains, |conn| {
        let domains = conn
            .list_all_domains(0)?
            .iter()
            .map(|d| d.name())
            .collect::<Result<_, _>>()?;
        let volumes = conn.lookup_storage_pool_by_name(POOL)?.list_volumes()?;
        Ok((domains, volumes))
    })
    .await
    .expect("inventory")
}

pub async fn domain_xml(p: &Pipeline, uri: &str, name: &str) -> String {
    let (hv, n) = (p.hypervisors.get(uri), name.to_owned());
    hv.call(Op::ReadDomain { name: name.into() }, move |c| {
        c.lookup_domain_by_name(&n)?.xml_desc(0)
    })
    .await
    .expect("domain xml")
}

pub fn validate_event(event: &Event) {
    let schema: Value =
        serde_json::from_str(include_str!("../../schemas/event.schema.json")).unwrap();
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap();
    let value = serde_json::to_value(event).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "event does not match its schema: {errors:?}\n{value:#}"
    );
}
