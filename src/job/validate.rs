//! The rules a job must meet beyond its shape. Every string that reaches libvirt's XML or a
//! guest's shell is checked here, with the same rules the schema states as patterns.

use super::{
    AddressSource, BaseLocation, Credential, Job, Limits, NicAttach, Problem, Provision, Work,
};

/// Upper bound on every stage timeout: a day.
const MAX_TIMEOUT_SECS: u64 = 86_400;

/// NIC models libvirt's QEMU driver accepts for a guest NIC.
const NIC_MODELS: &[&str] = &["virtio", "e1000", "e1000e", "rtl8139", "ne2k_pci", "pcnet"];

/// libvirt URI schemes hatchery connects through.
const URI_SCHEMES: &[&str] = &[
    "qemu",
    "qemu+ssh",
    "qemu+tcp",
    "qemu+tls",
    "qemu+unix",
    "qemu+libssh2",
    "test",
];

/// Returns every problem with `job`; an empty list means the job is acceptable.
pub fn validate(job: &Job, limits: &Limits) -> Vec<Problem> {
    let mut v = Checker {
        problems: Vec::new(),
    };

    v.hypervisor("/hypervisor", &job.hypervisor);
    if let Some(batch) = &job.batch {
        v.name("/batch/id", &batch.id, 128);
        if batch.size == 0 {
            v.fail("/batch/size", "must be at least 1");
        }
    }
    match &job.work {
        Work::Provision(p) => v.provision(p, limits),
        Work::Deprovision(d) => v.name("/deprovision/name", &d.name, 63),
    }
    v.problems
}

struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn fail(&mut self, path: &str, message: impl Into<String>) {
        self.problems.push(Problem::new(path, message));
    }

    fn provision(&mut self, p: &Provision, limits: &Limits) {
        let vm = &p.vm;
        self.name("/provision/vm/name", &vm.name, 63);
        self.range("/provision/vm/vcpus", vm.vcpus.into(), 1, 512);
        self.range(
            "/provision/vm/memory_mib",
            vm.memory_mib,
            16,
            16 * 1024 * 1024,
        );
        if let Some(gib) = vm.disk_gib {
            self.range("/provision/vm/disk_gib", gib, 1, 64 * 1024);
        }
        if let Some(pool) = &vm.pool {
            self.name("/provision/vm/pool", pool, 63);
        }

        match &vm.base.location {
            BaseLocation::Volume { pool, volume } => {
                self.name("/provision/vm/base/pool", pool, 63);
                self.name("/provision/vm/base/volume", volume, 255);
            }
            BaseLocation::Path { path } => self.path("/provision/vm/base/path", path),
        }
        if let Some(digest) = &vm.base.sha256 {
            let hex = digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit());
            if !hex {
                self.fail("/provision/vm/base/sha256", "must be 64 hexadecimal digits");
            }
        }

        if vm.nics.is_empty() || vm.nics.len() > limits.nics {
            self.fail(
                "/provision/vm/nics",
                format!("must hold 1 to {} NICs", limits.nics),
            );
        }
        for (i, nic) in vm.nics.iter().enumerate() {
            let at = format!("/provision/vm/nics/{i}");
            match &nic.attach {
                NicAttach::Network { network } => self.name(&format!("{at}/network"), network, 63),
                NicAttach::Bridge { bridge } => self.name(&format!("{at}/bridge"), bridge, 15),
            }
            if !NIC_MODELS.contains(&nic.model.as_str()) {
                self.fail(
                    &format!("{at}/model"),
                    format!("must be one of {NIC_MODELS:?}"),
                );
            }
            if let Some(mac) = &nic.mac {
                self.mac(&format!("{at}/mac"), mac);
            }
        }

        if let Some(boot) = &vm.boot {
            self.path("/provision/vm/boot/kernel", &boot.kernel);
            if let Some(initrd) = &boot.initrd {
                self.path("/provision/vm/boot/initrd", initrd);
            }
            if let Some(cmdline) = &boot.cmdline {
                let printable = cmdline.chars().all(|c| c.is_ascii_graphic() || c == ' ');
                if !printable || cmdline.len() > 1024 {
                    self.fail(
                        "/provision/vm/boot/cmdline",
                        "must be printable ASCII, at most 1024 bytes",
                    );
                }
            }
        }

        if let AddressSource::Static { port: 0, .. } = p.address {
            self.fail("/provision/address/port", "must not be 0");
        }
        if let Some(finish) = &p.finish {
            self.finish(finish, limits);
        }

        if let Some(r) = &p.retry {
            let checks = [
                ("max_attempts", r.max_attempts.map(u64::from), 1, 20),
                ("initial_delay_ms", r.initial_delay_ms, 1, 60_000),
                ("max_delay_secs", r.max_delay_secs, 1, 3_600),
                ("max_elapsed_secs", r.max_elapsed_secs, 1, MAX_TIMEOUT_SECS),
            ];
            for (key, value, min, max) in checks {
                if let Some(v) = value {
                    self.range(&format!("/provision/retry/{key}"), v, min, max);
                }
            }
        }

        let t = &p.timeouts;
        for (key, value) in [
            ("overlay_secs", t.overlay_secs),
            ("domain_secs", t.domain_secs),
            ("address_secs", t.address_secs),
            ("finish_secs", t.finish_secs),
        ] {
            if let Some(secs) = value {
                self.range(
                    &format!("/provision/timeouts/{key}"),
                    secs,
                    1,
                    MAX_TIMEOUT_SECS,
                );
            }
        }
    }

    fn finish(&mut self, f: &super::FinishSpec, limits: &Limits) {
        let user_ok = !f.user.is_empty()
            && f.user.len() <= 32
            && f.user
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            && !f.user.starts_with('-');
        if !user_ok {
            self.fail(
                "/provision/finish/user",
                "must be 1 to 32 of [A-Za-z0-9._-], not led by -",
            );
        }
        if f.script.is_empty() {
            self.fail("/provision/finish/script", "must not be empty");
        }
        if f.script.len() > limits.script_bytes {
            self.fail(
                "/provision/finish/script",
                format!(
                    "is {} bytes, above the limit of {}",
                    f.script.len(),
                    limits.script_bytes
                ),
            );
        }
        if f.script.contains('\0') {
            self.fail("/provision/finish/script", "must not contain NUL");
        }
        self.range(
            "/provision/finish/timeout_secs",
            f.timeout_secs,
            1,
            MAX_TIMEOUT_SECS,
        );
        if f.port == Some(0) {
            self.fail("/provision/finish/port", "must not be 0");
        }
        if let Some(key) = &f.host_key {
            let body = key.strip_prefix("SHA256:").unwrap_or("");
            let ok = body.len() == 43
                && body
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
            if !ok {
                self.fail(
                    "/provision/finish/host_key",
                    "must be an OpenSSH SHA256: fingerprint",
                );
            }
        }
        match &f.credential {
            Credential::Password(p) if p.is_empty() => {
                self.fail("/provision/finish/password", "must not be empty");
            }
            Credential::PrivateKey(k) if k.is_empty() => {
                self.fail("/provision/finish/private_key", "must not be empty");
            }
            Credential::KeyName(name) => self.name("/provision/finish/key_name", name, 128),
            _ => {}
        }
    }

    /// A name that becomes an XML value, a file name or a libvirt object name: a letter or digit,
    /// then letters, digits, `.`, `_` or `-`; never `..`.
    fn name(&mut self, path: &str, value: &str, max: usize) {
        let first_ok = value
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric());
        let rest_ok = value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if value.is_empty() || value.len() > max || !first_ok || !rest_ok || value.contains("..") {
            self.fail(
                path,
                format!(
                    "must be 1 to {max} of [A-Za-z0-9._-], start with a letter or digit, \
                     and not contain '..'"
                ),
            );
        }
    }

    /// An absolute path on the hypervisor, without `..` or characters a shell or XML would treat
    /// specially.
    fn path(&mut self, path: &str, value: &str) {
        let chars_ok = value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._+-".contains(&b));
        let no_dotdot = value.split('/').all(|segment| segment != "..");
        if !value.starts_with('/') || value.len() > 4096 || !chars_ok || !no_dotdot {
            self.fail(
                path,
                "must be an absolute path of [A-Za-z0-9/._+-] without '..'",
            );
        }
    }

    fn mac(&mut self, path: &str, value: &str) {
        let octets: Vec<&str> = value.split(':').collect();
        let shape = octets.len() == 6
            && octets
                .iter()
                .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
        let unicast = shape && u8::from_str_radix(octets[0], 16).is_ok_and(|b| b & 1 == 0);
        if !unicast {
            self.fail(
                path,
                "must be a unicast MAC address such as 52:54:00:12:34:56",
            );
        }
    }

    fn range(&mut self, path: &str, value: u64, min: u64, max: u64) {
        if value < min || value > max {
            self.fail(path, format!("must be between {min} and {max}"));
        }
    }

    fn hypervisor(&mut self, path: &str, value: &str) {
        let Some((scheme, rest)) = value.split_once("://") else {
            // Not a URI: the name of a hypervisor in the worker's configuration.
            return self.name(path, value, 63);
        };
        if !URI_SCHEMES.contains(&scheme) {
            self.fail(path, format!("URI scheme must be one of {URI_SCHEMES:?}"));
        }
        let printable = rest.bytes().all(|b| b.is_ascii_graphic()) && value.len() <= 1024;
        if !printable {
            self.fail(
                path,
                "URI must be printable ASCII without spaces, at most 1024 bytes",
            );
        }
        // libvirt reads the ssh binary (`command`), host key checking (`no_verify`), key files
        // and sockets on the worker from URI parameters; only the worker's own configuration
        // may set those.
        if rest.contains('?') {
            self.fail(
                path,
                "URI must not carry parameters; name a configured hypervisor instead",
            );
        }
        // `user:password@host` would put the password in every log line and event that
        // names the hypervisor.
        let authority = rest.split('/').next().unwrap_or("");
        if authority
            .rsplit_once('@')
            .is_some_and(|(user, _)| user.contains(':'))
        {
            self.fail(path, "URI must not carry a password");
        }
    }
}
