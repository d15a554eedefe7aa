//! Hostile job messages: every one is either rejected with a problem naming the field at fault,
//! or accepted intact and then turned into domain and volume XML that hold exactly the
//! elements the builders meant.
#![allow(clippy::unwrap_used)]

mod common;

use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{Map, Value, json};

use common::built_xml::{self, Inputs, as_xml_value};
use hatchery::hypervisor::xml::{KernelXml, NicXml};
use hatchery::job::{self, BaseLocation, Credential, Job, Limits, NicAttach, RejectedJob};

/// A provisioning job using every field, with its base in a pool and a named key.
fn valid_volume() -> Value {
    json!({
        "id": "0b7f0e8e-2a43-4c3c-9d37-3a7f4e0f6c11",
        "batch": { "id": "rack-7", "size": 3 },
        "hypervisor": "qemu+ssh://root@kvm-1.example.com/system",
        "provision": {
            "vm": {
                "name": "web-01",
                "vcpus": 2,
                "memory_mib": 2048,
                "base": {
                    "pool": "default", "volume": "debian-12.qcow2", "sha256": "a".repeat(64)
                },
                "disk_gib": 20,
                "nics": [{ "network": "default", "model": "virtio", "mac": "52:54:00:aa:bb:cc" }],
                "console": { "type": "spice", "listen": "127.0.0.1" },
                "boot": { "kernel": "/var/lib/images/vmlinuz", "cmdline": "console=ttyS0" }
            },
            "address": { "source": "static", "ip": "192.0.2.15", "port": 2222 },
            "finish": {
                "user": "admin", "key_name": "fleet", "script": "#!/bin/sh\ntrue\n",
                "timeout_secs": 900, "sudo": true,
                "host_key": "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"
            },
            "timeouts": { "address_secs": 120 },
            "on_failure": "keep"
        }
    })
}

/// The other half of each one-of: a base by path, a bridge, an initrd, a password.
fn valid_path() -> Value {
    json!({
        "id": "5d1c3a57-9a55-4b8e-8f3e-0c1d2e3f4a5b",
        "hypervisor": "qemu:///system",
        "provision": {
            "vm": {
                "name": "db.02_b",
                "vcpus": 512,
                "memory_mib": 16,
                "domain_type": "qemu",
                "base": { "path": "/srv/images/base+1.qcow2" },
                "pool": "fast",
                "nics": [{ "bridge": "br0", "model": "e1000" }, { "network": "n2" }],
                "boot": { "kernel": "/boot/vmlinuz", "initrd": "/boot/initrd.img" }
            },
            "address": { "source": "lease" },
            "finish": { "user": "root", "password": "pw", "script": "echo hi", "port": 2200 },
            "timeouts": { "overlay_secs": 1, "domain_secs": 86400, "finish_secs": 60 }
        }
    })
}

fn sample(path_variant: bool) -> Value {
    if path_variant {
        valid_path()
    } else {
        valid_volume()
    }
}

/// Fields that hold strings in one sample or the other, or may be added as strings.
const STRING_FIELDS: &[&str] = &[
    "/id",
    "/batch/id",
    "/hypervisor",
    "/provision/vm/name",
    "/provision/vm/domain_type",
    "/provision/vm/base/pool",
    "/provision/vm/base/volume",
    "/provision/vm/base/path",
    "/provision/vm/base/sha256",
    "/provision/vm/pool",
    "/provision/vm/nics/0/network",
    "/provision/vm/nics/0/bridge",
    "/provision/vm/nics/0/model",
    "/provision/vm/nics/0/mac",
    "/provision/vm/console/type",
    "/provision/vm/console/listen",
    "/provision/vm/boot/kernel",
    "/provision/vm/boot/initrd",
    "/provision/vm/boot/cmdline",
    "/provision/address/source",
    "/provision/address/ip",
    "/provision/finish/user",
    "/provision/finish/password",
    "/provision/finish/private_key",
    "/provision/finish/key_name",
    "/provision/finish/script",
    "/provision/finish/host_key",
    "/provision/on_failure",
];

const NUMBER_FIELDS: &[&str] = &[
    "/batch/size",
    "/provision/vm/vcpus",
    "/provision/vm/memory_mib",
    "/provision/vm/disk_gib",
    "/provision/address/port",
    "/provision/finish/timeout_secs",
    "/provision/finish/port",
    "/provision/timeouts/overlay_secs",
    "/provision/timeouts/domain_secs",
    "/provision/timeouts/address_secs",
    "/provision/timeouts/finish_secs",
];

const OBJECT_FIELDS: &[&str] = &[
    "",
    "/batch",
    "/provision",
    "/provision/vm",
    "/provision/vm/base",
    "/provision/vm/nics/0",
    "/provision/vm/console",
    "/provision/vm/boot",
    "/provision/address",
    "/provision/finish",
    "/provision/timeouts",
];

/// Strings that have broken parsers, shells, XML and path handling before.
const HOSTILE_STRINGS: &[&str] = &[
    "",
    " ",
    "<evil/>",
    "x'/><evil/>",
    "\"><evil a=\"",
    "]]>",
    "<!--",
    "&amp;",
    "&xxe;",
    "<!DOCTYPE d [<!ENTITY e SYSTEM 'file:///etc/passwd'>]>",
    "..",
    "../etc/passwd",
    "a/b",
    "/",
    "/etc/../etc/shadow",
    "/a/./b",
    "/a//b",
    "a\0b",
    "\u{7}",
    "line\nbreak",
    "cr\rlf",
    "tab\t",
    "\u{1b}[31m",
    "\u{202e}evil",
    "\u{feff}web",
    "\u{fffe}",
    "\u{ffff}",
    "\u{ff57}\u{ff45}\u{ff42}",
    "web\u{200b}01",
    "\u{e9}t\u{e9}",
    "-rf",
    "$(reboot)",
    "`id`",
    "; rm -rf /",
    "%00",
    "%2e%2e%2f",
    "\\\\server\\share",
    "web-01\n",
    " web-01",
    "web-01 ",
    "qemu:///system?command=/bin/sh",
    "qemu+ext:///system?command=/bin/sh",
    "file:///etc/passwd",
    "QEMU:///system",
    "qemu+ssh://-oProxyCommand=id/system",
    "qemu://",
    "http://x/",
    "test://",
    "::ffff:127.0.0.1",
    "fe80::1%eth0",
    "01.02.03.04",
    "127.1",
    "1.2.3.4/24",
    "[::1]",
    "0.0.0.0",
    "::",
    "1.2.3.4 ",
    "256.1.1.1",
    "52:54:00:AA:BB:CC",
    "01:00:5e:00:00:01",
    "52-54-00-aa-bb-cc",
    "SHA256:",
    "virtio ",
    "kvm\0",
];

fn short_hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(HOSTILE_STRINGS).prop_map(str::to_owned),
        2 => "[A-Za-z0-9][A-Za-z0-9._-]{0,70}",
        1 => "/[A-Za-z0-9/._+-]{0,40}",
        2 => any::<String>(),
        1 => (prop::sample::select(HOSTILE_STRINGS), "[a-z0-9]{1,8}")
            .prop_map(|(h, s)| format!("{s}{h}{s}")),
    ]
}

/// Short hostile strings, and now and then one up to beyond the message size limit.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        9 => short_hostile_string(),
        1 => (1usize..300_000).prop_map(|n| "a".repeat(n)),
    ]
}

fn hostile_number() -> impl Strategy<Value = Value> {
    let edges = [
        -1,
        0,
        1,
        15,
        16,
        512,
        513,
        65_535,
        65_536,
        86_400,
        86_401,
        i64::MIN,
        i64::MAX,
    ];
    let big = [1 << 32, (1 << 32) - 1, u64::MAX, 16_777_216, 16_777_217];
    let floats = [1e300, -1e300, 0.5, 2048.0, 1e3, -0.0, 20.0, 512.0];
    prop_oneof![
        prop::sample::select(edges.to_vec()).prop_map(Value::from),
        prop::sample::select(big.to_vec()).prop_map(Value::from),
        prop::sample::select(floats.to_vec()).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
    ]
}

/// Object keys: the contract's own, so that arbitrary documents reach deep into the schema,
/// and anything else.
fn key() -> impl Strategy<Value = String> {
    const KEYS: &[&str] = &[
        "id",
        "hypervisor",
        "provision",
        "deprovision",
        "batch",
        "vm",
        "name",
        "vcpus",
        "memory_mib",
        "base",
        "pool",
        "volume",
        "path",
        "nics",
        "network",
        "finish",
        "script",
        "user",
        "password",
        "address",
        "source",
        "ip",
    ];
    prop_oneof![
        prop::sample::select(KEYS).prop_map(str::to_owned),
        any::<String>()
    ]
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        hostile_number(),
        hostile_string().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// One change to a valid job.
#[derive(Debug, Clone)]
enum Edit {
    Set(&'static str, Value),
    Remove(&'static str),
    /// Adds a field the contract does not have to the object at the path.
    Extra(&'static str, String, Value),
}

impl Edit {
    /// Applies the edit; false when the sample has no place for it.
    fn apply(&self, doc: &mut Value) -> bool {
        let (parent, key) = match self {
            Edit::Set(p, _) | Edit::Remove(p) => p.rsplit_once('/').unwrap(),
            Edit::Extra(p, k, _) => (*p, k.as_str()),
        };
        match (self, doc.pointer_mut(parent)) {
            (Edit::Remove(_), Some(Value::Object(map))) => map.remove(key).is_some(),
            (Edit::Set(_, v) | Edit::Extra(_, _, v), Some(Value::Object(map))) => {
                if matches!(self, Edit::Extra(..)) && map.contains_key(key) {
                    return false;
                }
                map.insert(key.to_owned(), v.clone());
                true
            }
            (Edit::Set(_, v), Some(Value::Array(items))) => {
                let slot = key.parse::<usize>().ok().and_then(|i| items.get_mut(i));
                slot.map(|s| *s = v.clone()).is_some()
            }
            _ => false,
        }
    }

    /// JSON paths a problem may name for this edit: the field, or the object holding it
    /// (missing, unknown and one-of problems are reported there).
    fn blamed(&self) -> Vec<String> {
        match self {
            Edit::Set(p, _) | Edit::Remove(p) => {
                vec![(*p).to_owned(), p.rsplit_once('/').unwrap().0.to_owned()]
            }
            Edit::Extra(p, _, _) => vec![(*p).to_owned()],
        }
    }
}

fn edit() -> impl Strategy<Value = Edit> {
    let strings = prop::sample::select(STRING_FIELDS);
    let numbers = prop::sample::select(NUMBER_FIELDS);
    let all: Vec<&'static str> = [STRING_FIELDS, NUMBER_FIELDS, &OBJECT_FIELDS[1..]].concat();
    prop_oneof![
        4 => (strings, hostile_string()).prop_map(|(f, s)| Edit::Set(f, Value::from(s))),
        2 => (numbers, hostile_number()).prop_map(|(f, n)| Edit::Set(f, n)),
        2 => (prop::sample::select(all.clone()), any_json()).prop_map(|(f, v)| Edit::Set(f, v)),
        1 => prop::sample::select(all).prop_map(Edit::Remove),
        1 => (prop::sample::select(OBJECT_FIELDS), key(), any_json())
            .prop_map(|(o, k, v)| Edit::Extra(o, k, v)),
    ]
}

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
            let blamed: Vec<String> = edits.iter().flat_map(Edit::blamed).collect();
            assert!(
                problems.iter().any(|p| blamed.contains(&p.path)),
                "no problem names {blamed:?}: {problems:?}"
            );
        }
        Err(other) => panic!("a serialised document is JSON: {other}"),
    }
}

/// An accepted job holds exactly what the message said, and its XML is harmless.
fn assert_accepted_harmless(doc: &Value, job: &Job) {
    let text = |p: &str| doc.pointer(p).and_then(Value::as_str);
    let number = |p: &str| doc.pointer(p).and_then(Value::as_u64);
    assert_eq!(text("/hypervisor"), Some(job.hypervisor.as_str()));
    assert_eq!(text("/batch/id"), job.batch.as_ref().map(|b| b.id.as_str()));
    let Some(p) = job.provision() else {
        assert_eq!(text("/deprovision/name"), Some(job.vm_name()));
        return;
    };

    let vm = &p.vm;
    assert_eq!(text("/provision/vm/name"), Some(vm.name.as_str()));
    assert_eq!(number("/provision/vm/vcpus"), Some(u64::from(vm.vcpus)));
    assert_eq!(number("/provision/vm/memory_mib"), Some(vm.memory_mib));
    assert_eq!(number("/provision/vm/disk_gib"), vm.disk_gib);
    assert_eq!(text("/provision/vm/pool"), vm.pool.as_deref());
    assert_eq!(text("/provision/vm/base/sha256"), vm.base.sha256.as_deref());
    match &vm.base.location {
        BaseLocation::Volume { pool, volume } => {
            assert_eq!(text("/provision/vm/base/pool"), Some(pool.as_str()));
            assert_eq!(text("/provision/vm/base/volume"), Some(volume.as_str()));
        }
        BaseLocation::Path { path } => {
            assert_eq!(text("/provision/vm/base/path"), Some(path.as_str()));
        }
    }
    for (i, nic) in vm.nics.iter().enumerate() {
        let at = |field: &str| text(&format!("/provision/vm/nics/{i}/{field}"));
        match &nic.attach {
            NicAttach::Network { network } => assert_eq!(at("network"), Some(network.as_str())),
            NicAttach::Bridge { bridge } => assert_eq!(at("bridge"), Some(bridge.as_str())),
        }
        assert_eq!(at("model").unwrap_or("virtio"), nic.model);
        assert_eq!(at("mac"), nic.mac.as_deref());
    }
    if let Some(boot) = &vm.boot {
        assert_eq!(
            text("/provision/vm/boot/kernel"),
            Some(boot.kernel.as_str())
        );
        assert_eq!(text("/provision/vm/boot/initrd"), boot.initrd.as_deref());
        assert_eq!(text("/provision/vm/boot/cmdline"), boot.cmdline.as_deref());
    }
    if let Some(finish) = &p.finish {
        assert_eq!(
            text("/provision/finish/script"),
            Some(finish.script.as_str())
        );
        assert_eq!(text("/provision/finish/user"), Some(finish.user.as_str()));
        if let Credential::KeyName(name) = &finish.credential {
            assert_eq!(text("/provision/finish/key_name"), Some(name.as_str()));
        }
    }

    built_xml::assert_harmless(&Inputs::from_job(job));
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
        strings in prop::collection::vec(any::<String>(), 12),
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
        Edit::Set(leak(pointer), value.clone()).apply(&mut doc),
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

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_owned().into_boxed_str())
}

/// Sets `pointer` to `value` and expects the job to be accepted with the value intact.
fn assert_accepted_with(mut doc: Value, pointer: &str, value: Value, limits: &Limits) -> Job {
    assert!(Edit::Set(leak(pointer), value).apply(&mut doc), "{pointer}");
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
            Edit::Set(leak(field), value.clone()).apply(&mut doc);
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
