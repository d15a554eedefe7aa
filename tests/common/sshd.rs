//! A real OpenSSH server on 127.0.0.1 standing in for a guest, with its own host key, config
//! and users; and helpers to log in to it and to inspect what a job leaves on it.
//!
//! Needs root (to run `sshd` and create users) and the `openssh-server`, `openssh-client`
//! (`ssh-keygen`), `passwd` (`useradd`, `chpasswd`), `sudo` and `busybox` packages. Creates,
//! once, the local users [`PASSWORD_USER`] (password login, sudo asking for the password),
//! [`KEY_USER`] (key login, sudo without password) and [`BUSYBOX_USER`] (busybox `sh` as login
//! shell), plus [`BUSYBOX_BIN`]; they stay on the machine, which is meant to be a throwaway CI
//! container.
#![allow(
    dead_code,
    reason = "each test binary uses only some of the shared helpers"
)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use hatchery::guest::{SshAuth, SshTarget};
use hatchery::secret::Secret;
use tempfile::TempDir;
use uuid::Uuid;

/// A non-root user that logs in with [`PASSWORD`] and may sudo after giving it.
pub const PASSWORD_USER: &str = "hatchery-pw";
/// The password of [`PASSWORD_USER`]. Only ever valid on a test machine.
pub const PASSWORD: &str = "correct horse battery staple";
/// A non-root user that logs in with a key and may sudo without a password.
pub const KEY_USER: &str = "hatchery-key";
/// A non-root user whose login shell is busybox `sh`, like on a minimal dropbear+busybox guest.
pub const BUSYBOX_USER: &str = "hatchery-bb";
/// Busybox applet links; the only `PATH` of sessions on a [`Mode::Busybox`] server.
pub const BUSYBOX_BIN: &str = "/var/lib/hatchery-tests/busybox";

const SUDOERS_FILE: &str = "/etc/sudoers.d/hatchery-tests";
/// How long sshd gets to start answering before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Which ways of logging in the server accepts, and what its sessions see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `password` and `publickey`; PAM off.
    PasswordAndKey,
    /// `keyboard-interactive` (through PAM) and `publickey`; no `password` method.
    KeyboardInteractive,
    /// `publickey` only.
    KeyOnly,
    /// Like `PasswordAndKey`, with [`BUSYBOX_BIN`] as the sessions' whole `PATH`: together with
    /// [`BUSYBOX_USER`]'s login shell, every command a session runs is busybox's.
    Busybox,
}

/// A running `sshd -D`, killed when dropped.
pub struct Sshd {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
    host_key_fingerprint: String,
}

impl Sshd {
    /// Starts a server accepting passwords and keys.
    pub fn start() -> Self {
        Self::start_with(Mode::PasswordAndKey)
    }

    pub fn start_with(mode: Mode) -> Self {
        ensure_test_users();
        let dir = tempfile::Builder::new()
            .prefix("hatchery-sshd-")
            .tempdir()
            .unwrap();
        // sshd reads authorized_keys as the logging-in user: they must reach the file.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(dir.path().join("authorized_keys"), "").unwrap();
        let host_key = dir.path().join("host_ed25519");
        run(
            "ssh-keygen",
            &["-q", "-t", "ed25519", "-N", "", "-f", path_str(&host_key)],
        );
        let host_key_fingerprint = fingerprint_of(&host_key.with_extension("pub"));
        // sshd refuses to start without its privilege separation directory.
        fs::create_dir_all("/run/sshd").unwrap();

        // Another test may grab the port between our probe and sshd's bind: try again then.
        let log_path = dir.path().join("sshd.log");
        for _ in 0..10 {
            let port = free_port();
            let config = write_config(dir.path(), port, mode);
            let log = fs::File::create(&log_path).unwrap();
            let mut child = Command::new("/usr/sbin/sshd")
                .args(["-D", "-e", "-f", path_str(&config)])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("run /usr/sbin/sshd (package openssh-server)");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            match wait_ready(&mut child, addr, &log_path) {
                Ok(()) => {
                    return Sshd {
                        child,
                        addr,
                        dir,
                        host_key_fingerprint,
                    };
                }
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("sshd did not start:\n{log}"),
            }
        }
        panic!("sshd found no free port in ten tries");
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A `known_hosts` line for this server, as OpenSSH's client expects it.
    pub fn known_hosts_line(&self) -> String {
        let public = fs::read_to_string(self.dir.path().join("host_ed25519.pub")).unwrap();
        let mut parts = public.split_whitespace();
        let (kind, key) = (parts.next().unwrap(), parts.next().unwrap());
        format!("[{}]:{} {kind} {key}\n", self.addr.ip(), self.addr.port())
    }

    /// The host key's fingerprint as `ssh-keygen -l -E sha256` prints it.
    pub fn host_key_fingerprint(&self) -> &str {
        &self.host_key_fingerprint
    }

    /// Lets the holder of `public_key` (an OpenSSH `.pub` line) log in as any user.
    pub fn authorize(&self, public_key: &str) {
        let path = self.dir.path().join("authorized_keys");
        let mut keys = fs::read_to_string(&path).unwrap();
        keys.push_str(public_key.trim());
        keys.push('\n');
        fs::write(path, keys).unwrap();
    }

    /// A target logging in as [`PASSWORD_USER`] with `password`.
    pub fn password_target(&self, password: &str) -> SshTarget {
        SshTarget {
            addr: self.addr,
            user: PASSWORD_USER.to_owned(),
            auth: SshAuth::Password(Secret::new(password)),
            pinned_host_key: None,
            jump: None,
        }
    }

    /// A target logging in as `user` with a fresh key (see [`generate_key`]) this server
    /// accepts.
    pub fn key_target(&self, user: &str, kind: &str, passphrase: &str) -> SshTarget {
        let key = generate_key(kind, passphrase);
        self.authorize(&key.public);
        SshTarget {
            addr: self.addr,
            user: user.to_owned(),
            auth: SshAuth::PrivateKey {
                key: Secret::new(key.private),
                passphrase: (!passphrase.is_empty()).then(|| Secret::new(passphrase)),
            },
            pinned_host_key: None,
            jump: None,
        }
    }

    /// What sshd logged so far; for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A job id as the loopback guest sees it: its directory and tombstone under /var/tmp, which
/// are removed on drop, and a scratch directory any test user may write to.
pub struct GuestJob {
    pub id: Uuid,
    scratch: TempDir,
}

impl GuestJob {
    pub fn new() -> Self {
        let scratch = tempfile::tempdir().unwrap();
        fs::set_permissions(scratch.path(), fs::Permissions::from_mode(0o777)).unwrap();
        Self {
            id: Uuid::new_v4(),
            scratch,
        }
    }

    /// The job's directory on the guest.
    pub fn dir(&self) -> PathBuf {
        PathBuf::from(format!("/var/tmp/hatchery-{}", self.id))
    }

    /// What stays on the guest after collection: the exit status.
    pub fn tombstone(&self) -> PathBuf {
        PathBuf::from(format!("/var/tmp/hatchery-{}.exit", self.id))
    }

    /// A path in the scratch directory, outside the job's directory.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }
}

impl Drop for GuestJob {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(self.dir());
        let _ = fs::remove_file(self.tombstone());
    }
}

/// Whether process `pid` is gone, or a zombie that nobody reaped (PID 1 in a container may not).
pub fn is_dead(pid: &str) -> bool {
    match fs::read_to_string(format!("/proc/{}/stat", pid.trim())) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// A key pair made by `ssh-keygen`, as file contents.
pub struct KeyPair {
    pub private: String,
    pub public: String,
}

/// Generates a key pair: `kind` is `ed25519` or `rsa`; an empty passphrase leaves it clear.
pub fn generate_key(kind: &str, passphrase: &str) -> KeyPair {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    let mut args = vec!["-q", "-t", kind, "-N", passphrase, "-C", "hatchery-test"];
    if kind == "rsa" {
        args.extend(["-b", "3072"]);
    }
    args.extend(["-f", path_str(&path)]);
    run("ssh-keygen", &args);
    KeyPair {
        private: fs::read_to_string(&path).unwrap(),
        public: fs::read_to_string(path.with_extension("pub")).unwrap(),
    }
}

/// The fingerprint of a key that no server here uses; a wrong pin.
pub fn fingerprint_of_new_key() -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    run(
        "ssh-keygen",
        &["-q", "-t", "ed25519", "-N", "", "-f", path_str(&path)],
    );
    fingerprint_of(&path.with_extension("pub"))
}

/// Creates the test users and their sudo rules, once per test binary; tolerates other test
/// binaries having done it already.
pub fn ensure_test_users() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The busybox user's shell must exist before the user is made.
        fs::create_dir_all(BUSYBOX_BIN).unwrap();
        run("busybox", &["--install", "-s", BUSYBOX_BIN]);
        let busybox_sh = format!("{BUSYBOX_BIN}/sh");
        let users = [
            (PASSWORD_USER, "/bin/sh"),
            (KEY_USER, "/bin/sh"),
            (BUSYBOX_USER, &busybox_sh),
        ];
        for (user, shell) in users {
            let status = Command::new("useradd")
                .args(["--create-home", "--shell", shell, user])
                .stderr(Stdio::null())
                .status()
                .expect("run useradd (package passwd)");
            // 9: the user exists already, from an earlier run.
            assert!(
                status.success() || status.code() == Some(9),
                "useradd {user}: {status}"
            );
        }
        let mut chpasswd = Command::new("chpasswd")
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let line = format!("{PASSWORD_USER}:{PASSWORD}\n");
        std::io::Write::write_all(chpasswd.stdin.as_mut().unwrap(), line.as_bytes()).unwrap();
        drop(chpasswd.stdin.take());
        assert!(chpasswd.wait().unwrap().success(), "chpasswd failed");
        // Key users need a usable (not locked) account, but never log in by password.
        for user in [KEY_USER, BUSYBOX_USER] {
            run("usermod", &["--password", "*", user]);
        }

        assert!(
            Path::new("/usr/bin/sudo").exists(),
            "tests need sudo: apt-get install sudo"
        );
        let rules =
            format!("{PASSWORD_USER} ALL=(ALL:ALL) ALL\n{KEY_USER} ALL=(ALL:ALL) NOPASSWD: ALL\n");
        let staging = format!("{SUDOERS_FILE}.{}", std::process::id());
        fs::write(&staging, rules).unwrap();
        fs::set_permissions(&staging, fs::Permissions::from_mode(0o440)).unwrap();
        fs::rename(&staging, SUDOERS_FILE).unwrap();
    });
}

fn write_config(dir: &Path, port: u16, mode: Mode) -> PathBuf {
    let (pam, password, kbd) = match mode {
        Mode::PasswordAndKey | Mode::Busybox => ("no", "yes", "no"),
        Mode::KeyboardInteractive => ("yes", "no", "yes"),
        Mode::KeyOnly => ("no", "no", "no"),
    };
    let path = match mode {
        Mode::Busybox => format!("SetEnv PATH={BUSYBOX_BIN}\n"),
        _ => String::new(),
    };
    let dir_str = path_str(dir);
    let config = format!(
        "ListenAddress 127.0.0.1:{port}\n\
         HostKey {dir_str}/host_ed25519\n\
         PidFile none\n\
         UsePAM {pam}\n\
         PasswordAuthentication {password}\n\
         KbdInteractiveAuthentication {kbd}\n\
         PubkeyAuthentication yes\n\
         AuthorizedKeysFile {dir_str}/authorized_keys\n\
         StrictModes no\n\
         PermitRootLogin yes\n\
         LogLevel VERBOSE\n\
         Subsystem sftp internal-sftp\n\
         {path}"
    );
    let path = dir.join("sshd_config");
    fs::write(&path, config).unwrap();
    path
}

/// A port the kernel just handed out and that is free again; good enough with a retry.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether a server on `addr` greets with an SSH banner within a couple of seconds.
pub fn answers_with_banner(addr: SocketAddr) -> bool {
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("SSH-")
}

/// Waits for the banner. On failure stops the child and returns its log.
fn wait_ready(child: &mut Child, addr: SocketAddr, log: &Path) -> Result<(), String> {
    let read_log = || fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Err(read_log());
        }
        if answers_with_banner(addr) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(format!(
        "no banner within {START_TIMEOUT:?}\n{}",
        read_log()
    ))
}

fn fingerprint_of(public_key: &Path) -> String {
    let output = run(
        "ssh-keygen",
        &["-l", "-E", "sha256", "-f", path_str(public_key)],
    );
    // "256 SHA256:... comment (ED25519)"
    output.split_whitespace().nth(1).unwrap().to_owned()
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}
