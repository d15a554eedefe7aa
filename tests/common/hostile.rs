//! Hostile job documents for property tests: two valid samples that use every field, the
//! fields to break, strategies for the values that break them, and the check that an accepted
//! job holds exactly what its message said and builds harmless XML.

use proptest::prelude::*;
use serde_json::{Map, Value, json};

use super::built_xml::{self, Inputs};
use hatchery::job::{BaseLocation, Credential, Job, NicAttach};

/// A provisioning job using every field, with its base in a pool and a named key.
pub fn valid_volume() -> Value {
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
pub fn valid_path() -> Value {
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

pub fn sample(path_variant: bool) -> Value {
    if path_variant {
        valid_path()
    } else {
        valid_volume()
    }
}

/// Fields that hold strings in one sample or the other, or may be added as strings.
pub const STRING_FIELDS: &[&str] = &[
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

pub const NUMBER_FIELDS: &[&str] = &[
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

pub const OBJECT_FIELDS: &[&str] = &[
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
pub const HOSTILE_STRINGS: &[&str] = &[
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

pub fn short_hostile_string() -> impl Strategy<Value = String> {
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
pub fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        9 => short_hostile_string(),
        1 => (1usize..300_000).prop_map(|n| "a".repeat(n)),
    ]
}

pub fn hostile_number() -> impl Strategy<Value = Value> {
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
pub fn key() -> impl Strategy<Value = String> {
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

pub fn any_json() -> impl Strategy<Value = Value> {
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
pub enum Edit {
    Set(String, Value),
    Remove(String),
    /// Adds a field the contract does not have to the object at the path.
    Extra(String, String, Value),
}

impl Edit {
    /// Applies the edit; false when the sample has no place for it.
    pub fn apply(&self, doc: &mut Value) -> bool {
        let (parent, key) = match self {
            Edit::Set(p, _) | Edit::Remove(p) => p.rsplit_once('/').unwrap(),
            Edit::Extra(p, k, _) => (p.as_str(), k.as_str()),
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

    /// Whether a problem at JSON path `path` names this edit: the field itself or anything
    /// inside the value put there, or the object holding the field (missing, unknown and
    /// one-of problems are reported there).
    pub fn blames(&self, path: &str) -> bool {
        let (field, holder) = match self {
            Edit::Set(p, _) | Edit::Remove(p) => (p.clone(), p.rsplit_once('/').unwrap().0),
            // The key may happen to be one the contract has there, and then names a field.
            Edit::Extra(p, k, _) => {
                let k = k.replace('~', "~0").replace('/', "~1");
                (format!("{p}/{k}"), p.as_str())
            }
        };
        path == holder || path == field || path.starts_with(&format!("{field}/"))
    }

    /// Where this edit happened, for failure messages.
    pub fn field(&self) -> &str {
        match self {
            Edit::Set(p, _) | Edit::Remove(p) | Edit::Extra(p, _, _) => p,
        }
    }
}

pub fn edit() -> impl Strategy<Value = Edit> {
    let strings = prop::sample::select(STRING_FIELDS);
    let numbers = prop::sample::select(NUMBER_FIELDS);
    let all: Vec<&'static str> = [STRING_FIELDS, NUMBER_FIELDS, &OBJECT_FIELDS[1..]].concat();
    prop_oneof![
        4 => (strings, hostile_string()).prop_map(|(f, s)| Edit::Set(f.to_owned(), Value::from(s))),
        2 => (numbers, hostile_number()).prop_map(|(f, n)| Edit::Set(f.to_owned(), n)),
        2 => (prop::sample::select(all.clone()), any_json()).prop_map(|(f, v)| Edit::Set(f.to_owned(), v)),
        1 => prop::sample::select(all).prop_map(|f| Edit::Remove(f.to_owned())),
        1 => (prop::sample::select(OBJECT_FIELDS), key(), any_json())
            .prop_map(|(o, k, v)| Edit::Extra(o.to_owned(), k, v)),
    ]
}

/// An accepted job holds exactly what the message said, and its XML is harmless.
pub fn assert_accepted_harmless(doc: &Value, job: &Job) {
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
