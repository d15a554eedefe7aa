//! Hostile job messages: every one is either rejected with a problem naming the field at fault,
//! or accepted intact and then turned into domain and volume XML that hold exactly the
//! elements the builders meant.
#![allow(clippy::unwrap_used)]

mod common;

use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{Value, json};

use common::built_xml::{self, Inputs, as_xml_value};
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

/// Sets `pointer` in a valid job to `value`, expecting a rejection naming `pointer`.
fn assert_refused_at(mut doc: Value, pointer: &str, value: Value, limits: &Limits) {
    assert!(
        Edit::Set(pointer.to_owned(), value.clone()).apply(&mut doc),
        "{pointer}"
    );
    let bytes = serde_json::to_vec(&doc).unwrap();
    match job::parse(&bytes, limits) {
        Err(RejectedJob::Invalid(problems)) => assert!(
            problems.iter().any(|p| p.path == pointer),
            "{pointer} = {value}: {problems:?}"
        ),
        other => panic!("{pointer} = {value}: expected invalid, got {other:?}"),
    }
}

/// Sets `pointer` to `value` and expects the job to be accepted with the value intact.
fn assert_accepted_with(mut doc: Value, pointer: &str, value: Value, limits: &Limits) -> Job {
    assert!(
        Edit::Set(pointer.to_owned(), value).apply(&mut doc),
        "{pointer}"
    );
    let bytes = serde_json::to_vec(&doc).unwrap();
    let job = job::parse(&bytes, limits).unwrap_or_else(|e| panic!("{pointer}: {e}"));
    assert_accepted_harmless(&doc, &job);
    job
}

#[test]
fn names_and_paths_with_metacharacters_are_refused_at_their_field() {
    let limits = Limits::default();
    let name_fields = [
        "/provision/vm/name",
        "/provision/vm/base/pool",
        "/provision/vm/base/volume",
        "/provision/vm/pool",
        "/provision/vm/nics/0/network",
        "/batch/id",
        "/provision/finish/key_name",
    ];
    let bad_names = [
        "x'/><evil/>",
        "a<b",
        "a&b",
        "a\"b",
        "..",
        "a..b",
        "../etc/passwd",
        "a/b",
        "/abs",
        ".hidden",
        "-flag",
        "",
        "a\0b",
        "a\nb",
        "a b",
        "\u{e9}t\u{e9}",
        "web\u{200b}01",
    ];
    for field in name_fields {
        for bad in bad_names {
            assert_refused_at(valid_volume(), field, json!(bad), &limits);
        }
    }

    let path_fields = ["/provision/vm/boot/kernel", "/provision/vm/boot/initrd"];
    let bad_paths = [
        "relative/path",
        "/var/../etc/shadow",
        "/..",
        "/a/..",
        "/a b",
        "/a'b",
        "/a<b>",
        "/a\0",
        "/a\n",
        "/a;b",
        "/$(id)",
        "",
    ];
    for field in path_fields {
        for bad in bad_paths {
            assert_refused_at(valid_volume(), field, json!(bad), &limits);
        }
    }
    for bad in bad_paths {
        assert_refused_at(valid_path(), "/provision/vm/base/path", json!(bad), &limits);
    }
    for bad in ["quiet\u{7}", "a\nb", "\0", "\u{e9}"] {
        assert_refused_at(
            valid_volume(),
            "/provision/vm/boot/cmdline",
            json!(bad),
            &limits,
        );
    }
    assert_refused_at(
        valid_volume(),
        "/provision/finish/script",
        json!("a\0b"),
        &limits,
    );

    // Harmless oddities stay as they are.
    let job = assert_accepted_with(
        valid_volume(),
        "/provision/vm/name",
        json!("a.b_c-D9"),
        &limits,
    );
    assert_eq!(job.vm_name(), "a.b_c-D9");
    let script = "#!/bin/sh\nprintf '<evil/>&\\a\\033[0m' \"$(id)\"\n\u{7}\t\r\n";
    assert_accepted_with(
        valid_volume(),
        "/provision/finish/script",
        json!(script),
        &limits,
    );
}

#[test]
fn hypervisor_uris_are_limited_to_libvirt_schemes_without_parameters() {
    let limits = Limits::default();
    for bad in [
        "file:///etc/passwd",
        "http://example.com/",
        "qemu+ext:///system?command=/bin/sh",
        "QEMU:///system",
        "javascript:alert(1)",
        "qemu:///system ",
        "qemu:///sys tem",
        "qemu:///system\n",
        "qemu:// /system",
        // libvirt takes the ssh binary, the socket, the key file and host key checking from
        // these parameters: a job must not choose them.
        "qemu+ssh://kvm-1/system?command=/tmp/evil",
        "qemu+ssh://kvm-1/system?no_verify=1",
        "qemu+ssh://kvm-1/system?keyfile=/root/.ssh/id_rsa",
        "qemu+unix:///system?socket=/tmp/evil.sock",
        "qemu+ssh://kvm-1/system?netcat=evil",
        // A password there would be in every log line and event naming the hypervisor.
        "qemu+ssh://root:hunter2@kvm-1/system",
        "qemu+tls://a:b@kvm-1:16514/system",
    ] {
        assert_refused_at(valid_volume(), "/hypervisor", json!(bad), &limits);
    }
    for good in [
        "qemu:///system",
        "qemu+ssh://root@kvm-1:2222/system",
        "rack-42",
    ] {
        assert_accepted_with(valid_volume(), "/hypervisor", json!(good), &limits);
    }
}

#[test]
fn negative_fractional_and_enormous_numbers_are_refused_at_their_field() {
    let limits = Limits::default();
    let cases: &[(&str, &[Value])] = &[
        (
            "/provision/vm/vcpus",
            &[
                json!(-1),
                json!(0),
                json!(513),
                json!(1u64 << 32),
                json!(2.5),
            ],
        ),
        (
            "/provision/vm/memory_mib",
            &[
                json!(-1),
                json!(15),
                json!(16_777_217),
                json!(u64::MAX),
                json!(1e300),
                json!(-1e300),
            ],
        ),
        (
            "/provision/vm/disk_gib",
            &[json!(0), json!(65_537), json!(i64::MIN), json!(20.5)],
        ),
        ("/batch/size", &[json!(0), json!(-3), json!(1u64 << 32)]),
        (
            "/provision/address/port",
            &[json!(0), json!(65_536), json!(-22)],
        ),
        (
            "/provision/finish/timeout_secs",
            &[json!(0), json!(86_401), json!(u64::MAX)],
        ),
        (
            "/provision/timeouts/address_secs",
            &[json!(0), json!(86_401), json!(-1)],
        ),
    ];
    for (field, values) in cases {
        for value in *values {
            let mut doc = valid_volume();
            let blamed = [*field, field.rsplit_once('/').unwrap().0];
            Edit::Set(field.to_string(), value.clone()).apply(&mut doc);
            let rejected = parse(&doc).unwrap_err();
            assert!(
                rejected
                    .problems()
                    .iter()
                    .any(|p| blamed.contains(&p.path.as_str())),
                "{field} = {value}: {rejected}"
            );
        }
    }

    // Whole numbers written as decimals are still not integers to the types.
    for (field, value) in [
        ("/provision/vm/memory_mib", json!(2048.0)),
        ("/provision/vm/vcpus", json!(2.0)),
        ("/provision/vm/disk_gib", json!(2e1)),
        ("/batch/size", json!(3.0)),
    ] {
        assert_refused_at(valid_volume(), field, value, &limits);
    }
}

#[test]
fn a_message_over_the_size_limit_is_refused_and_one_at_it_is_whole() {
    let mut doc = valid_volume();
    doc["provision"]["finish"]["script"] = json!("");
    let base_len = serde_json::to_vec(&doc).unwrap().len();
    let limits = Limits {
        message_bytes: 4096,
        ..Limits::default()
    };
    let script = "x".repeat(limits.message_bytes - base_len);
    doc["provision"]["finish"]["script"] = json!(script);
    let bytes = serde_json::to_vec(&doc).unwrap();
    assert_eq!(bytes.len(), limits.message_bytes);

    let job = job::parse(&bytes, &limits).unwrap();
    assert_eq!(
        job.provision().unwrap().finish.as_ref().unwrap().script,
        script
    );

    doc["provision"]["finish"]["script"] = json!(format!("{script}x"));
    let bytes = serde_json::to_vec(&doc).unwrap();
    let rejected = job::parse(&bytes, &limits).unwrap_err();
    assert_eq!(
        rejected,
        RejectedJob::TooLarge {
            size: limits.message_bytes + 1,
            limit: limits.message_bytes
        }
    );
}

#[test]
fn a_script_over_its_limit_is_refused_and_one_at_it_is_whole() {
    let limits = Limits {
        script_bytes: 1000,
        ..Limits::default()
    };
    let field = "/provision/finish/script";
    // Multi-byte characters: the limit counts bytes, and a cut would split one.
    let at_limit = "\u{e9}".repeat(500);
    let job = assert_accepted_with(valid_volume(), field, json!(at_limit), &limits);
    assert_eq!(
        job.provision().unwrap().finish.as_ref().unwrap().script,
        at_limit
    );

    assert_refused_at(
        valid_volume(),
        field,
        json!(format!("{at_limit}x")),
        &limits,
    );
    let huge = "y".repeat(Limits::default().script_bytes + 1);
    assert_refused_at(valid_volume(), field, json!(huge), &Limits::default());
}

#[test]
fn more_nics_than_the_limit_are_refused_never_dropped() {
    let nic = |i: usize| json!({ "network": format!("net{i}") });
    let limits = Limits {
        nics: 3,
        ..Limits::default()
    };
    let three: Vec<Value> = (0..3).map(nic).collect();
    let job = assert_accepted_with(valid_volume(), "/provision/vm/nics", json!(three), &limits);
    assert_eq!(job.provision().unwrap().vm.nics.len(), 3);

    let four: Vec<Value> = (0..4).map(nic).collect();
    assert_refused_at(valid_volume(), "/provision/vm/nics", json!(four), &limits);
    let many: Vec<Value> = (0..10_000).map(nic).collect();
    assert_refused_at(
        valid_volume(),
        "/provision/vm/nics",
        json!(many),
        &Limits::default(),
    );
    assert_refused_at(valid_volume(), "/provision/vm/nics", json!([]), &limits);
}

#[test]
fn names_one_byte_over_their_length_limit_are_refused_never_cut() {
    let limits = Limits::default();
    let fields = [
        ("/provision/vm/name", 63),
        ("/provision/vm/base/pool", 63),
        ("/provision/vm/base/volume", 255),
        ("/provision/vm/pool", 63),
        ("/provision/vm/nics/0/network", 63),
        ("/batch/id", 128),
        ("/provision/finish/key_name", 128),
        ("/provision/finish/user", 32),
        ("/provision/vm/boot/cmdline", 1024),
    ];
    for (field, max) in fields {
        assert_accepted_with(valid_volume(), field, json!("a".repeat(max)), &limits);
        assert_refused_at(valid_volume(), field, json!("a".repeat(max + 1)), &limits);
    }

    let bridge = |name: String| json!([{ "bridge": name }]);
    let nics = "/provision/vm/nics";
    assert_accepted_with(valid_volume(), nics, bridge("b".repeat(15)), &limits);
    let mut doc = valid_volume();
    doc["provision"]["vm"]["nics"] = bridge("b".repeat(16));
    assert_refused_at(
        doc,
        "/provision/vm/nics/0/bridge",
        json!("b".repeat(16)),
        &limits,
    );

    let path = |len: usize| json!(format!("/{}", "p".repeat(len - 1)));
    assert_accepted_with(
        valid_volume(),
        "/provision/vm/boot/kernel",
        path(4096),
        &limits,
    );
    assert_refused_at(
        valid_volume(),
        "/provision/vm/boot/kernel",
        path(4097),
        &limits,
    );

    let uri = |len: usize| json!(format!("qemu:///{}", "s".repeat(len - 8)));
    assert_accepted_with(valid_volume(), "/hypervisor", uri(1024), &limits);
    assert_refused_at(valid_volume(), "/hypervisor", uri(1025), &limits);

    let deprovision = json!({ "id": "0b7f0e8e-2a43-4c3c-9d37-3a7f4e0f6c11",
        "hypervisor": "qemu:///system", "deprovision": { "name": "a".repeat(63) } });
    assert_eq!(parse(&deprovision).unwrap().vm_name(), "a".repeat(63));
    assert_refused_at(
        deprovision,
        "/deprovision/name",
        json!("a".repeat(64)),
        &limits,
    );
}

#[test]
fn control_characters_never_reach_the_xml_as_themselves() {
    // Validation stops them first; the builders still keep the document well-formed.
    let job = parse(&valid_volume()).unwrap();
    let mut inputs = Inputs::from_job(&job);
    inputs.name = "nul\0bell\u{7}esc\u{1b}del\u{7f}cr\rlf\ntab\t".to_owned();
    built_xml::assert_harmless(&inputs);
    assert_eq!(
        as_xml_value(&inputs.name),
        "nul\u{fffd}bell\u{fffd}esc\u{fffd}del\u{7f}cr\rlf\ntab\t"
    );
}
