//! hatchery needs no root: `run` and `check` work as `nobody`, a libvirtd whose socket belongs
//! to a group serves a member of that group and refuses everyone else, and a worker's own user
//! reaches a hypervisor over `qemu+ssh`-style URIs once its known_hosts vouches for it.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use common::fleet::Fleet;
use common::libvirtd::PrivateLibvirtd;
use common::sshd::{KEY_USER, Mode, Sshd};
use common::testdriver::{BASE, NET, POOL, TestHost};

/// `nobody`'s uid and gid on Debian.
const NOBODY: u32 = 65534;
/// The group Debian's libvirt packages make for users allowed on the system socket.
const LIBVIRT_GROUP: &str = "libvirt";

/// The effective uid of this test process.
fn euid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// `program ARGS` as `nobody` with only the supplementary `groups`, no capabilities, no home
/// and nothing of this process's environment but PATH. Without root to switch users, the
/// tests are unprivileged already and run the program as they are.
fn as_nobody(groups: &[&str], program: &str, args: &[&str]) -> Output {
    let mut cmd = if euid() == 0 {
        let mut c = Command::new("setpriv");
        c.args([&format!("--reuid={NOBODY}"), &format!("--regid={NOBODY}")]);
        if groups.is_empty() {
            c.arg("--clear-groups");
        } else {
            c.arg(format!("--groups={}", groups.join(",")));
        }
        c.args(["--inh-caps=-all", "--", program]);
        c
    } else {
        Command::new(program)
    };
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/nonexistent")
        .env("RUST_LOG", "warn")
        .current_dir("/");
    cmd.output().unwrap()
}

fn hatchery_as_nobody(groups: &[&str], args: &[&str]) -> Output {
    as_nobody(groups, env!("CARGO_BIN_EXE_hatchery"), args)
}

/// Makes `dir` and what is in it readable by anyone, as a worker's files would be to its user.
fn open_up(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let mode = if path.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

/// Writes `config` where `nobody` can read it.
fn config_file(fleet: &Fleet, config: &str) -> String {
    let path = fleet.dir.path().join("unprivileged.toml");
    std::fs::write(&path, config).unwrap();
    open_up(fleet.dir.path());
    path.to_str().unwrap().to_owned()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn run_and_check_work_as_nobody() {
    // The wrapper really drops root: uid, gid and groups are nobody's alone.
    let id = as_nobody(&[], "id", &[]);
    let id = text(&id.stdout);
    assert!(id.starts_with(&format!("uid={NOBODY}(")), "{id}");
    assert!(!id.contains("uid=0") && !id.contains("(root)"), "{id}");

    // The demo job on the test driver, from the repository's files.
    let repo = env!("CARGO_MANIFEST_DIR");
    let host = format!("test://{repo}/jobs/demo-host.xml");
    let job = format!("{repo}/jobs/demo.json");
    let out = hatchery_as_nobody(&[], &["run", &job, "--connect", &host]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let last = stdout.lines().last().unwrap();
    assert!(last.contains("\"dev.hatchery.job.succeeded\""), "{last}");

    // `check` with a configuration naming a broker, a hypervisor, its pool, network and base.
    let fleet = Fleet::new();
    let host = TestHost::new();
    open_up(host.dir.path());
    let config = config_file(
        &fleet,
        &format!(
            "[broker]\nprefix = \"{}\"\n\
             [hypervisors.fake]\nuri = \"{}\"\npool = \"{POOL}\"\nnetwork = \"{NET}\"\n\
             bases = [\"{BASE}\"]\n",
            fleet.prefix, host.uri
        ),
    );
    let out = hatchery_as_nobody(&[], &["check", "--config", &config]);
    let report = text(&out.stdout);
    assert!(out.status.success(), "{report}\n{}", text(&out.stderr));
    assert!(report.contains("checks passed"), "{report}");
}

#[test]
fn a_group_owned_libvirt_socket_admits_its_members_only() {
    assert_eq!(
        euid(),
        0,
        "starting a libvirtd of its own needs root, as in CI"
    );
    let group = std::fs::read_to_string("/etc/group").unwrap();
    let gid: u32 = group
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{LIBVIRT_GROUP}:x:")))
        .and_then(|rest| rest.split(':').next()?.parse().ok())
        .expect("a libvirt group (libvirt-daemon-system makes it)");

    let daemon = PrivateLibvirtd::start(LIBVIRT_GROUP);
    let meta = std::fs::metadata(&daemon.socket).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (0, gid),
        "socket owned by root:libvirt"
    );
    assert_eq!(meta.mode() & 0o777, 0o770);

    // test:///default served by the daemon has a pool and a network of these names.
    let fleet = Fleet::new();
    let config = config_file(
        &fleet,
        &format!(
            "[broker]\nprefix = \"{}\"\n\
             [hypervisors.grouped]\nuri = \"{}\"\npool = \"default-pool\"\nnetwork = \"default\"\n",
            fleet.prefix,
            daemon.uri("test", "/default")
        ),
    );
    let rows = |report: &str, check: &str| -> Vec<String> {
        let rows = report.lines().filter(|l| l.starts_with(check));
        rows.map(str::to_owned).collect()
    };

    // A member of the group: every check passes, through the socket.
    let out = hatchery_as_nobody(&[LIBVIRT_GROUP], &["check", "--config", &config]);
    let report = text(&out.stdout);
    assert!(out.status.success(), "{report}\n{}", daemon.stderr());
    let hypervisor = rows(&report, "hypervisor");
    assert_eq!(hypervisor.len(), 1, "{report}");
    assert!(hypervisor[0].contains("libvirt "), "{report}");
    assert_eq!(rows(&report, "pool").len(), 1, "{report}");

    // Anyone else: the socket's mode refuses the connection, and the report says so.
    let out = hatchery_as_nobody(&[], &["check", "--config", &config]);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let hypervisor = rows(&report, "hypervisor");
    assert!(
        hypervisor[0].contains("FAILED") && hypervisor[0].contains("Permission denied"),
        "{report}"
    );
    assert!(
        rows(&report, "broker")[0].contains("connected"),
        "only libvirt refused: {report}"
    );
}

/// The worker's own account in the remote-hypervisor test: a home with `~/.ssh`, as the
/// systemd unit's `hatchery` user has.
const WORKER_USER: &str = "hatchery-worker";

/// Creates [`WORKER_USER`] (once; it stays, like the SSH tests' users) and gives it a fresh
/// `~/.ssh` holding `private_key` as `id_ed25519` and `known_hosts` as its known hosts.
/// Returns the key's path.
fn worker_ssh_dir(private_key: &str, known_hosts: &str) -> String {
    let status = Command::new("useradd")
        .args(["--create-home", "--shell", "/bin/sh", WORKER_USER])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    // 9: the user exists already, from an earlier run.
    assert!(status.success() || status.code() == Some(9), "{status}");
    let ssh = Path::new("/home").join(WORKER_USER).join(".ssh");
    let _ = std::fs::remove_dir_all(&ssh);
    std::fs::create_dir_all(&ssh).unwrap();
    let key = ssh.join("id_ed25519");
    std::fs::write(&key, private_key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(ssh.join("known_hosts"), known_hosts).unwrap();
    let owner = format!("{WORKER_USER}:{WORKER_USER}");
    let chown = Command::new("chown")
        .args(["-R", &owner])
        .arg(&ssh)
        .status();
    assert!(chown.unwrap().success());
    key.to_str().unwrap().to_owned()
}

/// `hatchery ARGS` as [`WORKER_USER`], with its groups and home and nothing else of ours.
fn hatchery_as_worker(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={WORKER_USER}"),
            &format!("--regid={WORKER_USER}"),
            "--init-groups",
            "--inh-caps=-all",
            "--",
            env!("CARGO_BIN_EXE_hatchery"),
        ])
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", format!("/home/{WORKER_USER}"))
        .env("RUST_LOG", "warn")
        .current_dir("/")
        .output()
        .unwrap()
}

#[test]
fn a_remote_hypervisor_over_ssh_needs_its_host_key_in_known_hosts() {
    assert_eq!(euid(), 0, "a libvirtd and an sshd of its own need root");
    // The hypervisor: libvirtd with a libvirt-group socket, and an sshd whose login user is
    // in that group, as docs/security.md asks of a remote hypervisor.
    let daemon = PrivateLibvirtd::start(LIBVIRT_GROUP);
    let sshd = Sshd::start_with(Mode::KeyOnly);
    let joined = Command::new("usermod")
        .args(["--append", "--groups", LIBVIRT_GROUP, KEY_USER])
        .status();
    assert!(joined.unwrap().success());

    // The worker: its own user, its key authorised on the hypervisor, the hypervisor's host
    // key in its known_hosts.
    let key = common::sshd::generate_key("ed25519", "");
    sshd.authorize(&key.public);
    let key_file = worker_ssh_dir(&key.private, &sshd.known_hosts_line());
    // `netcat` proxying: the far end talks to the socket the URI names, where this test's
    // daemon listens, instead of the machine's default one.
    let uri = format!(
        "test+ssh://{KEY_USER}@127.0.0.1:{}/default?socket={}&proxy=netcat&keyfile={key_file}",
        sshd.addr().port(),
        daemon.socket.display()
    );
    let fleet = Fleet::new();
    let config = config_file(
        &fleet,
        &format!(
            "[broker]\nprefix = \"{}\"\n\
             [hypervisors.remote]\nuri = \"{uri}\"\npool = \"default-pool\"\nnetwork = \"default\"\n",
            fleet.prefix
        ),
    );
    let hypervisor_row = |report: &str| {
        let row = report.lines().find(|l| l.starts_with("hypervisor"));
        row.unwrap_or_default().to_owned()
    };

    let out = hatchery_as_worker(&["check", "--config", &config]);
    let report = text(&out.stdout);
    let context = format!("{report}\n{}\n{}", text(&out.stderr), sshd.log());
    assert!(out.status.success(), "{context}");
    assert!(hypervisor_row(&report).contains("libvirt "), "{context}");
    assert!(sshd.log().contains("Accepted publickey"), "{context}");

    // Without the hypervisor's key in known_hosts, ssh has nobody to ask and refuses.
    worker_ssh_dir(&key.private, "");
    let out = hatchery_as_worker(&["check", "--config", &config]);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let row = hypervisor_row(&report);
    assert!(
        row.contains("FAILED") && row.contains("Host key verification failed"),
        "{report}"
    );
}
