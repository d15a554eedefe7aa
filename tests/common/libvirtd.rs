//! A private `libvirtd` whose read-write socket belongs to a group, the way a hypervisor is set
//! up for a worker that runs without root: `unix_sock_group`, `unix_sock_rw_perms = "0770"`,
//! and no further authentication on the socket.
//!
//! It runs in a mount namespace of its own, where /run, /etc/libvirt, /var/lib/libvirt,
//! /var/cache/libvirt and /var/log/libvirt are directories of a temporary directory, and in a
//! network namespace with only loopback: nothing of the host's libvirt is read or changed.
//! Clients reach it through the socket, whose path is outside both namespaces.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::wait_until;

pub struct PrivateLibvirtd {
    pub dir: TempDir,
    /// The read-write socket, owned by root and `group`, mode 0770.
    pub socket: PathBuf,
    child: Child,
}

impl PrivateLibvirtd {
    /// Starts libvirtd with its sockets owned by `group`. Needs root, like any libvirtd.
    pub fn start(group: &str) -> Self {
        Self::start_in(TempDir::new().unwrap(), group)
    }

    /// Where the read-write socket of a daemon started in `dir` will be, known before it runs.
    pub fn socket_in(dir: &Path) -> PathBuf {
        dir.join("run/libvirt-sock")
    }

    /// Like [`PrivateLibvirtd::start`], in a directory chosen beforehand.
    pub fn start_in(dir: TempDir, group: &str) -> Self {
        let root = dir.path();
        for sub in ["etc", "run", "lib", "cache", "log"] {
            std::fs::create_dir(root.join(sub)).unwrap();
        }
        // Others must reach the socket through these directories; the socket's own mode
        // decides who may connect.
        for d in [root.to_owned(), root.join("run")] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let conf = format!(
            "unix_sock_group = \"{group}\"\n\
             unix_sock_ro_perms = \"0770\"\n\
             unix_sock_rw_perms = \"0770\"\n\
             auth_unix_ro = \"none\"\n\
             auth_unix_rw = \"none\"\n"
        );
        std::fs::write(root.join("etc/libvirtd.conf"), conf).unwrap();

        let binds = [
            ("run", "/run/libvirt"),
            ("etc", "/etc/libvirt"),
            ("lib", "/var/lib/libvirt"),
            ("cache", "/var/cache/libvirt"),
            ("log", "/var/log/libvirt"),
        ];
        let mut script = String::from("mount -t tmpfs tmpfs /run\nmkdir /run/libvirt\n");
        for (sub, target) in binds {
            script.push_str(&format!(
                "mount --bind '{}' {target}\n",
                root.join(sub).display()
            ));
        }
        // `exec` all the way down: the child's pid is libvirtd's, so killing it stops the daemon.
        script.push_str("exec libvirtd --pid-file /run/libvirt/libvirtd.pid\n");
        let child = Command::new("unshare")
            .args(["--mount", "--net", "--propagation", "private", "sh", "-ec"])
            .arg(script)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(root.join("libvirtd.stderr")).unwrap())
            .spawn()
            .expect("unshare runs");

        let socket = Self::socket_in(root);
        let daemon = Self { dir, socket, child };
        let up = || {
            Command::new("virsh")
                .args(["-q", "-c", &daemon.uri("test", "/default"), "version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        assert!(
            wait_until(Duration::from_secs(30), up),
            "libvirtd did not start: {}",
            daemon.stderr()
        );
        daemon
    }

    /// A URI for `driver` (`test`, `qemu`) and `path` through this daemon's socket.
    pub fn uri(&self, driver: &str, path: &str) -> String {
        format!("{driver}+unix://{path}?socket={}", self.socket.display())
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("libvirtd.stderr")).unwrap_or_default()
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PrivateLibvirtd {
    /// SIGTERM, as a service manager would stop it; SIGKILL if it has not gone in 10 s.
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let child = &mut self.child;
        if !wait_until(Duration::from_secs(10), || {
            child.try_wait().ok().flatten().is_some()
        }) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
