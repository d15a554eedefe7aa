//! Hostile job messages: every one is either rejected with a problem naming the field at fault,
//! or accepted intact and then turned into domain and volume XML that hold exactly the
//! elements the builders meant.
#![allow(clippy::unwrap_used)]

mod common;

use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{Value, json};

use common::built_xml::{self, Inputs};
use common::hostile::{
    Edit, any_json, assert_accepted_harmless, edit, sample, short_hostile_string, valid_path,
    valid_volume,
};
use hatchery::hypervisor::xml::{KernelXml, NicXml};
use hatchery::job::{self, BatchRef, Job, Limits, NicAttach, RejectedJob};

/// Parses `doc` from its bytes, as a worker reads a message.
fn parse(doc: &Value) -> Result<Job, RejectedJob> {
    job::parse(&serde_json::to_vec(doc).unwrap(), &Limits::default())
}

/// The whole claim for one edited document.
fn check_edited(doc: &Value, edits: &[Edit]) {
    match parse(doc) {
        Ok(job) => assert_accepted_harmless(doc, &job),
        Err(RejectedJob::TooLarge { size, limit }) => assert!(size > limit),
        Err(RejectedJob::Invalid(problems)) => {
            let named = |path: &str| edits.iter().any(|e| e.blames(path));
            let fields: Vec<&str> = edits.iter().map(Edit::field).collect();
            assert!(
                problems.iter().any(|p| named(&p.path)),
                "no problem names {fields:?}: {problems:?}"
            );
        }
        Err(other) => panic!("a serialised document is JSON: {other}"),
    }
}

fn cases(n: u32) -> Config {
    Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn one_hostile_edit_is_refused_at_its_field_or_harmless(
        path_variant in any::<bool>(),
        edit in edit(),
    ) {
        let mut doc = sample(path_variant);
        prop_assume!(edit.apply(&mut doc));
        check_edited(&doc, &[edit]);
    }

    #[test]
    fn several_hostile_edits_are_refused_at_one_of_their_fields_or_harmless(
        path_variant in any::<bool>(),
        edits in prop::collection::vec(edit(), 2..5),
    ) {
        let mut doc = sample(path_variant);
        let applied: Vec<Edit> = edits.into_iter().filter(|e| e.apply(&mut doc)).collect();
        prop_assume!(!applied.is_empty());
        check_edited(&doc, &applied);
    }

    #[test]
    fn arbitrary_json_is_refused_at_a_path_it_has_or_harmless(doc in any_json()) {
        match parse(&doc) {
            Ok(job) => assert_accepted_harmless(&doc, &job),
            Err(RejectedJob::Invalid(problems)) => {
                prop_assert!(!problems.is_empty());
                for p in &problems {
                    prop_assert!(doc.pointer(&p.path).is_some(), "{p} is not in {doc}");
                }
            }
            Err(RejectedJob::TooLarge { size, limit }) => prop_assert!(size > limit),
            Err(other) => panic!("a serialised document is JSON: {other}"),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_never_pass_unchecked(
        path_variant in any::<bool>(),
        at in any::<prop::sample::Index>(),
        junk in prop::collection::vec(any::<u8>(), 1..16),
    ) {
        let mut bytes = serde_json::to_vec(&sample(path_variant)).unwrap();
        let at = at.index(bytes.len());
        bytes.splice(at..at, junk);
        match job::parse(&bytes, &Limits::default()) {
            Ok(job) => {
                let doc: Value = serde_json::from_slice(&bytes).unwrap();
                assert_accepted_harmless(&doc, &job);
            }
            Err(rejected) => prop_assert!(
                ["not_json", "invalid"].contains(&rejected.reason()),
                "{rejected}"
            ),
        }
    }

    /// Below validation: whatever strings reach the builders, the documents keep their shape
    /// and carry the strings as values.
    #[test]
    fn the_xml_builders_keep_any_string_a_value(
        strings in prop::collection::vec(any::<String>(), 14),
        hostile in prop::collection::vec(short_hostile_string(), 4),
        bridge in any::<bool>(),
    ) {
        let job = job::parse_value(&valid_volume(), &Limits::default()).unwrap();
        let mut inputs = Inputs::from_job(&job);
        let pick = |i: usize| format!("{}{}", strings[i], hostile[i % hostile.len()]);
        inputs.name = pick(0);
        inputs.overlay_pool = pick(1);
        inputs.overlay_volume = pick(2);
        inputs.overlay_path = pick(3);
        inputs.base_path = pick(4);
        let attach = if bridge {
            NicAttach::Bridge { bridge: pick(5) }
        } else {
            NicAttach::Network { network: pick(5) }
        };
        inputs.nics = vec![NicXml { attach, model: pick(6), mac: pick(7) }];
        inputs.kernel = Some(KernelXml {
            kernel: pick(8),
            initrd: Some(pick(9)),
            cmdline: Some(pick(10)),
        });
        inputs.serial_log = Some(pick(11));
        inputs.batch = Some(BatchRef { id: pick(12), size: 3 });
        inputs.base_sha256 = Some(pick(13));
        built_xml::assert_harmless(&inputs);
    }
}

#[test]
fn both_samples_are_valid_and_harmless() {
    for doc in [valid_volume(), valid_path()] {
        let job = parse(&doc).unwrap_or_else(|e| panic!("{e}"));
        assert_accepted_harmless(&doc, &job);
    }
}

/// A value `depth` levels deep: `[[[...]]]`, or `{"a":{"a":...}}`.
fn nested(depth: usize, object: bool) -> String {
    let (open, close) = if object { ("{\"a\":", "}") } else { ("[", "]") };
    format!("{}1{}", open.repeat(depth), close.repeat(depth))
}

#[test]
fn ten_thousand_nested_values_are_refused_without_exhausting_the_stack() {
    for object in [false, true] {
        let deep = nested(10_000, object);
        let inside = valid_volume().to_string().replacen("\"web-01\"", &deep, 1);
        for message in [deep, inside] {
            let rejected = job::parse(message.as_bytes(), &Limits::default()).unwrap_err();
            let RejectedJob::NotJson(why) = &rejected else {
                panic!("expected not_json, got {rejected:?}");
            };
            assert!(why.contains("recursion limit"), "{why}");
        }
    }

    // Just under serde_json's limit of 128 the value parses, and the schema refuses it
    // where it stands without descending into it.
    let shallow = valid_volume()
        .to_string()
        .replacen("\"web-01\"", &nested(120, false), 1);
    let rejected = job::parse(shallow.as_bytes(), &Limits::default()).unwrap_err();
    assert!(
        rejected
            .problems()
            .iter()
            .any(|p| p.path == "/provision/vm/name"),
        "{rejected}"
    );
}

#[test]
fn bytes_that_are_not_utf8_are_not_json_and_are_not_echoed() {
    let marker = "Hidden-Marker-7f3a";
    let mut doc = valid_path();
    doc["provision"]["finish"]["password"] = json!(marker);
    let text = doc.to_string();
    for bad in [&b"\xff\xfe"[..], b"\xc0\xaf", b"\xed\xa0\x80", b"\x80"] {
        let mut bytes = text.clone().into_bytes();
        let at = text.find(marker).unwrap() + 6;
        bytes.splice(at..at, bad.iter().copied());
        let rejected = job::parse(&bytes, &Limits::default()).unwrap_err();
        assert_eq!(rejected.reason(), "not_json", "{bad:?}: {rejected}");
        let shown = format!("{rejected} {rejected:?}");
        assert!(!shown.contains("Hidden"), "{shown}");
    }

    // An escaped lone surrogate is valid JSON syntax but no Unicode string.
    let lone = text.replace(marker, "\\ud800x");
    let rejected = job::parse(lone.as_bytes(), &Limits::default()).unwrap_err();
    assert_eq!(rejected.reason(), "not_json", "{rejected}");
}
