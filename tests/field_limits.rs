//! Hostile values at named fields: metacharacters in names and paths, odd URIs, numbers out of
//! range, and every configurable limit. Each is refused at its field, or accepted whole and
//! harmless; nothing is ever cut to fit.
#![allow(clippy::unwrap_used)]

mod common;

use serde_json::{Value, json};

use common::built_xml::{self, Inputs, as_xml_value};
use common::hostile::{Edit, assert_accepted_harmless, valid_path, valid_volume};
use hatchery::job::{self, Job, Limits, RejectedJob};

/// Parses `doc` from its bytes, as a worker reads a message.
fn parse(doc: &Value) -> Result<Job, RejectedJob> {
    job::parse(&serde_json::to_vec(doc).unwrap(), &Limits::default())
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
