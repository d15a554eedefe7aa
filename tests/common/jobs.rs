//! Job documents for tests, built as JSON so they pass through the real parser.

use serde_json::{Value, json};
use uuid::Uuid;

use hatchery::job::{self, Job, Limits};

use super::testdriver::{BASE, NET, POOL};

/// A provisioning job on a test host, without a finish step.
pub fn provision(uri: &str, name: &str) -> Value {
    json!({
        "id": Uuid::new_v4(),
        "hypervisor": uri,
        "provision": {
            "vm": {
                "name": name,
                "vcpus": 1,
                "memory_mib": 256,
                "domain_type": "qemu",
                "base": { "pool": POOL, "volume": BASE },
                "nics": [{ "network": NET }]
            },
            "timeouts": { "address_secs": 5 }
        }
    })
}

pub fn deprovision(uri: &str, name: &str) -> Value {
    json!({ "id": Uuid::new_v4(), "hypervisor": uri, "deprovision": { "name": name } })
}

/// Parses `doc` as a worker would, panicking with every problem if it is not a valid job.
pub fn parse(doc: &Value) -> Job {
    job::parse_value(doc, &Limits::default()).unwrap_or_else(|e| panic!("invalid job: {e}"))
}
