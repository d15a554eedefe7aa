//! Messages no worker may run, generated in bulk from a seed: text and bytes that are not JSON,
//! bodies that are not UTF-8, oversized bodies, deep nesting, and jobs broken in one field
//! each (bad numbers, hostile names, URIs with parameters or passwords, wrong shapes).
//!
//! Every message is unique, and each carries the reason the real parser gives for rejecting
//! it, so a test can tell exactly which message became which event.

use std::collections::HashSet;

use serde_json::{Value, json};
use uuid::Uuid;

use super::hostile::HOSTILE_STRINGS;
use hatchery::job::{self, Limits};

/// The families of bad messages, each sent in some proportion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Prose, truncated documents, stray brackets.
    NotJson,
    /// Random bytes.
    Binary,
    /// A job whose text holds bytes that are not UTF-8.
    NotUtf8,
    /// Beyond the message size limit.
    Oversized,
    /// Arrays or objects nested far beyond what a job needs.
    DeepNesting,
    /// JSON that is not an object, or an object of the wrong shape.
    WrongShape,
    /// A job with one field out of range, of the wrong type, missing or unknown.
    BadField,
    /// A job with a hostile string in a name or path.
    HostileName,
    /// A job whose hypervisor URI carries parameters, a password or a bad scheme.
    BadUri,
}

/// How often each kind comes, out of the sum of the weights.
const WEIGHTS: &[(Kind, u32)] = &[
    (Kind::NotJson, 24),
    (Kind::Binary, 16),
    (Kind::NotUtf8, 16),
    (Kind::Oversized, 1),
    (Kind::DeepNesting, 12),
    (Kind::WrongShape, 20),
    (Kind::BadField, 60),
    (Kind::HostileName, 30),
    (Kind::BadUri, 20),
];

/// One bad message and what the parser says about it.
pub struct Bad {
    pub kind: Kind,
    pub body: Vec<u8>,
    /// `too_large`, `not_json` or `invalid`, as in the `job.rejected` event.
    pub reason: &'static str,
}

/// `count` distinct messages that `job::parse` rejects, derived from `template` (a valid job)
/// and `seed`. Candidates the parser happens to accept are dropped and replaced.
pub fn generate(count: usize, template: &Value, seed: u64) -> Vec<Bad> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let limits = Limits::default();
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(count);
    let total: u32 = WEIGHTS.iter().map(|(_, w)| w).sum();
    while out.len() < count {
        let mut pick = rng.u32(0..total);
        let kind = WEIGHTS
            .iter()
            .find(|(_, w)| {
                let hit = pick < *w;
                pick = pick.saturating_sub(*w);
                hit
            })
            .map(|(k, _)| *k)
            .unwrap();
        let body = candidate(kind, &mut rng, template, out.len());
        let Err(rejected) = job::parse(&body, &limits) else {
            continue;
        };
        if seen.insert(body.clone()) {
            out.push(Bad {
                kind,
                body,
                reason: rejected.reason(),
            });
        }
    }
    out
}

fn candidate(kind: Kind, rng: &mut fastrand::Rng, template: &Value, n: usize) -> Vec<u8> {
    match kind {
        Kind::NotJson => not_json(rng, template, n),
        Kind::Binary => (0..rng.usize(1..600)).map(|_| rng.u8(..)).collect(),
        Kind::NotUtf8 => {
            let mut doc = fresh(rng, template);
            doc["provision"]["vm"]["name"] = json!(format!("vm-{n}-MARK"));
            let text = serde_json::to_vec(&doc).unwrap();
            let at = text.windows(4).position(|w| w == b"MARK").unwrap();
            let mut body = text;
            // A lone continuation byte, an overlong form, a byte never valid in UTF-8.
            let bad: &[&[u8]] = &[b"\x80", b"\xc0\xaf", b"\xff", b"\xed\xa0\x80"];
            body.splice(at..at + 4, bad[rng.usize(..bad.len())].iter().copied());
            body
        }
        Kind::Oversized => {
            let limit = Limits::default().message_bytes;
            let mut doc = fresh(rng, template);
            let filler = "x".repeat(limit + rng.usize(1..16 * 1024));
            doc["provision"]["finish"] =
                json!({ "user": "root", "password": "pw", "script": filler });
            serde_json::to_vec(&doc).unwrap()
        }
        Kind::DeepNesting => {
            // Within serde_json's limit of 128 levels, then ever further beyond it.
            let depths = [100, 129, 500, 5_000, 40_000];
            let depth = depths[rng.usize(..depths.len())];
            let (open, close) = if rng.bool() {
                ("[", "]")
            } else {
                ("{\"a\":", "}")
            };
            let nested = format!("{}{n}{}", open.repeat(depth), close.repeat(depth));
            if rng.bool() {
                nested.into_bytes()
            } else {
                // Inside a job, where a name belongs.
                let mut doc = fresh(rng, template);
                doc["provision"]["vm"]["name"] = json!("PLACEHOLDER");
                let text = serde_json::to_string(&doc).unwrap();
                text.replace("\"PLACEHOLDER\"", &nested).into_bytes()
            }
        }
        Kind::WrongShape => {
            let shapes = [
                json!(null),
                json!(n),
                json!(format!("job {n}")),
                json!([template.clone(), n]),
                json!({ "id": Uuid::from_u128(rng.u128(..)), "hypervisor": "test:///default" }),
                json!({ "jobs": [template.clone()], "n": n }),
                {
                    // Both provision and deprovision.
                    let mut doc = fresh(rng, template);
                    doc["deprovision"] = json!({ "name": format!("vm-{n}") });
                    doc
                },
            ];
            serde_json::to_vec(&shapes[rng.usize(..shapes.len())]).unwrap()
        }
        Kind::BadField => {
            let mut doc = fresh(rng, template);
            doc["provision"]["vm"]["name"] = json!(format!("vm-{n}"));
            break_one_field(rng, &mut doc);
            serde_json::to_vec(&doc).unwrap()
        }
        Kind::HostileName => {
            let mut doc = fresh(rng, template);
            let hostile = HOSTILE_STRINGS[rng.usize(..HOSTILE_STRINGS.len())];
            let value = match rng.u8(0..3) {
                0 => hostile.to_owned(),
                1 => format!("vm{n}{hostile}"),
                _ => format!("{hostile}{}", "a".repeat(rng.usize(60..300))),
            };
            let fields = [
                "/provision/vm/name",
                "/provision/vm/base/pool",
                "/provision/vm/base/volume",
                "/provision/vm/nics/0/network",
            ];
            let (parent, key) = fields[rng.usize(..fields.len())].rsplit_once('/').unwrap();
            doc.pointer_mut(parent).unwrap()[key] = json!(value);
            serde_json::to_vec(&doc).unwrap()
        }
        Kind::BadUri => {
            let uris = [
                "qemu:///system?command=/bin/sh",
                "qemu+ssh://root@kvm-1/system?keyfile=/root/.ssh/id_rsa",
                "qemu+ssh://root@kvm-1/system?no_verify=1",
                "qemu+ssh://root:hunter2@kvm-1/system",
                "qemu+ext:///system?command=/usr/bin/id",
                "qemu+ssh://kvm-1/system?socket=/run/other",
                "http://kvm-1/",
                "file:///etc/passwd",
                "test:///default?x=1",
            ];
            let mut doc = fresh(rng, template);
            doc["hypervisor"] = json!(uris[rng.usize(..uris.len())]);
            doc["provision"]["vm"]["name"] = json!(format!("vm-{n}"));
            serde_json::to_vec(&doc).unwrap()
        }
    }
}

fn not_json(rng: &mut fastrand::Rng, template: &Value, n: usize) -> Vec<u8> {
    let whole = serde_json::to_string(template).unwrap();
    let text = match rng.u8(0..6) {
        0 => format!("message {n} is not a job at all"),
        1 => format!("{n}{}", &whole[..rng.usize(1..whole.len())]),
        2 => format!("{whole} trailing {n}"),
        3 => format!("{{\"id\": {n}, \"hypervisor\": }}"),
        4 => format!("<job id=\"{n}\"/>"),
        _ => format!("{{'id': '{n}'}}"),
    };
    text.into_bytes()
}

/// The template with an id of its own.
fn fresh(rng: &mut fastrand::Rng, template: &Value) -> Value {
    let mut doc = template.clone();
    doc["id"] = json!(Uuid::from_u128(rng.u128(..)));
    doc
}

/// Breaks exactly one thing in a valid job.
fn break_one_field(rng: &mut fastrand::Rng, doc: &mut Value) {
    let p = &mut doc["provision"];
    match rng.u8(0..24) {
        0 => p["vm"]["vcpus"] = json!(0),
        1 => p["vm"]["vcpus"] = json!(513),
        2 => p["vm"]["vcpus"] = json!("2"),
        3 => p["vm"]["memory_mib"] = json!(-1),
        4 => p["vm"]["memory_mib"] = json!(1.5),
        5 => p["vm"]["memory_mib"] = json!(1e300),
        6 => p["vm"]["nics"] = json!([]),
        7 => p["vm"]["nics"] = json!(vec![json!({ "network": "n" }); 9]),
        8 => p["vm"]["nics"][0]["mac"] = json!("01:00:5e:00:00:01"),
        9 => p["vm"]["base"] = json!({ "pool": "pool" }),
        10 => p["vm"]["base"]["sha256"] = json!("abc"),
        11 => p["address"] = json!({ "source": "static" }),
        12 => p["address"] = json!({ "source": "static", "ip": "256.1.1.1", "port": 22 }),
        13 => p["address"] = json!({ "source": "teleport" }),
        14 => p["finish"] = json!({ "user": "root", "script": "true" }),
        15 => {
            p["finish"] = json!({
                "user": "root", "password": "pw", "private_key": "k", "script": "true"
            })
        }
        16 => {
            p["finish"] =
                json!({ "user": "root", "key_name": "k", "script": "true", "host_key": "MD5:aa" })
        }
        17 => p["on_failure"] = json!("explode"),
        18 => p["timeouts"]["address_secs"] = json!(0),
        19 => p["vm"]["console"] = json!({ "type": "vnc", "listen": "0.0.0.0; reboot" }),
        20 => p["vm"]["boot"] = json!({ "kernel": "vmlinuz" }),
        21 => p["vm"]["surprise"] = json!(true),
        22 => doc["batch"] = json!({ "id": "", "size": 0 }),
        _ => doc["id"] = json!("not-a-uuid"),
    }
}
