//! An OpenSSH server inside the real-VM namespace, standing in for a hypervisor that a worker
//! outside the namespace uses as its SSH jump host.

use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::sshd::{answers_with_banner, free_port};
use super::vmenv::VmEnv;
use super::wait_until;

/// Where the server listens inside the namespace, which has a loopback of its own.
const INNER_LISTEN: &str = "127.0.0.1:2222";

/// `sshd` inside the namespace, reachable from the root namespace only through a relay from a
/// loopback port to a unix socket (which crosses namespaces) to the server; all killed on drop.
pub struct NamespacedSshd {
    procs: Vec<Child>,
    port: u16,
    dir: TempDir,
}

impl NamespacedSshd {
    /// Starts the server accepting the public key(s) in `authorized`, and the relay to it.
    pub fn start(env: &VmEnv, authorized: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let key = d.join("host_key");
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f", path_str(&key)])
            .status()
            .unwrap();
        assert!(status.success(), "ssh-keygen failed");
        fs::write(d.join("authorized_keys"), authorized).unwrap();
        let config = format!(
            "ListenAddress {INNER_LISTEN}\nHostKey {}\nAuthorizedKeysFile {}\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nPidFile none\nPermitRootLogin prohibit-password\n\
             AllowTcpForwarding yes\n",
            key.display(),
            d.join("authorized_keys").display()
        );
        fs::write(d.join("sshd_config"), config).unwrap();
        // sshd refuses to start without its privilege separation directory.
        fs::create_dir_all("/run/sshd").unwrap();

        let ns = env.get("NETNS");
        let sock = d.join("relay.sock");
        let port = free_port();
        let spawn = |log: &str, args: &[&str]| {
            Command::new(args[0])
                .args(&args[1..])
                .stdout(Stdio::null())
                .stderr(File::create(d.join(log)).unwrap())
                .spawn()
                .unwrap()
        };
        let (cfg, log) = (d.join("sshd_config"), d.join("sshd.log"));
        let (listen, connect) = (
            format!("UNIX-LISTEN:{},fork", sock.display()),
            format!("TCP:{INNER_LISTEN}"),
        );
        let (outer_listen, outer_connect) = (
            format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"),
            format!("UNIX-CONNECT:{}", sock.display()),
        );
        let sshd = [
            "ip",
            "netns",
            "exec",
            ns,
            "/usr/sbin/sshd",
            "-D",
            "-f",
            path_str(&cfg),
            "-E",
            path_str(&log),
        ];
        let procs = vec![
            spawn("sshd.stderr", &sshd),
            spawn(
                "inner-relay.log",
                &["ip", "netns", "exec", ns, "socat", &listen, &connect],
            ),
            spawn("outer-relay.log", &["socat", &outer_listen, &outer_connect]),
        ];

        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let up = wait_until(Duration::from_secs(10), || {
            sock.exists() && answers_with_banner(addr)
        });
        let server = Self { procs, port, dir };
        assert!(up, "the namespaced sshd did not come up:\n{}", server.log());
        server
    }

    /// The `known_hosts` line for the server as the root namespace reaches it.
    pub fn known_hosts(&self) -> String {
        let public = fs::read_to_string(self.dir.path().join("host_key.pub")).unwrap();
        let mut parts = public.split_whitespace();
        let (kind, key) = (parts.next().unwrap(), parts.next().unwrap());
        format!("[127.0.0.1]:{} {kind} {key}\n", self.port)
    }

    /// The loopback port in the root namespace that leads to the server.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for NamespacedSshd {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}
