//! TLS in front of the test broker: a private certificate authority made with `openssl` in a
//! temporary directory, and `socat` terminating TLS on a free loopback port and relaying to
//! RabbitMQ's plain port, so that hatchery speaks real `amqps://` to a real broker.

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::wait_until;

/// A fresh P-256 key, unencrypted, and a validity of two days.
const NEW_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2";

/// A certificate authority: its certificate (what clients trust) and its key.
pub struct Authority {
    pub cert: PathBuf,
    key: PathBuf,
}

impl Authority {
    /// A new self-signed CA in `dir`, its files named after `name`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        openssl(&format!(
            "req -x509 {NEW_KEY} -subj /CN=hatchery-test-{name} -keyout {} -out {}",
            key.display(),
            cert.display()
        ));
        Self { cert, key }
    }

    /// A server certificate signed by this CA for `names` (`DNS:localhost,IP:127.0.0.1`),
    /// written to `<stem>.pem` and `<stem>.key` in `dir`.
    pub fn issue(&self, dir: &Path, stem: &str, names: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        let csr = dir.join(format!("{stem}.csr"));
        let ext = dir.join(format!("{stem}.ext"));
        std::fs::write(
            &ext,
            format!("subjectAltName={names}\nextendedKeyUsage=serverAuth\n"),
        )
        .unwrap();
        openssl(&format!(
            "req {NEW_KEY} -subj /CN=hatchery-test-broker -keyout {} -out {}",
            key.display(),
            csr.display()
        ));
        openssl(&format!(
            "x509 -req -days 2 -in {} -CA {} -CAkey {} -CAcreateserial -extfile {} -out {}",
            csr.display(),
            self.cert.display(),
            self.key.display(),
            ext.display(),
            cert.display()
        ));
        (cert, key)
    }
}

/// `socat` speaking TLS on a loopback port and plain AMQP to 127.0.0.1:5672; stopped (with
/// the relays it forked) when dropped.
pub struct TlsProxy {
    pub port: u16,
    /// The CA that signed the proxy's certificate.
    pub ca: Authority,
    pub dir: TempDir,
    child: Child,
}

impl TlsProxy {
    /// A proxy whose certificate names `names`, signed by a CA of its own.
    pub fn start(names: &str) -> Self {
        let dir = TempDir::new().unwrap();
        let ca = Authority::new(dir.path(), "ca");
        let (cert, key) = ca.issue(dir.path(), "broker", names);
        let port = free_port();
        let listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,cert={},key={},verify=0,fork,reuseaddr",
            cert.display(),
            key.display()
        );
        let child = Command::new("socat")
            .args([listen.as_str(), "TCP:127.0.0.1:5672"])
            // A group of its own, so that the relays it forks stop with it.
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat runs");
        let up = || TcpStream::connect(("127.0.0.1", port)).is_ok();
        assert!(wait_until(Duration::from_secs(10), up), "socat listens");
        Self {
            port,
            ca,
            dir,
            child,
        }
    }

    /// The broker's URL through the proxy, with `host` as the name to verify.
    pub fn url(&self, host: &str) -> String {
        format!("amqps://guest:guest@{host}:{}/%2f", self.port)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Runs `openssl` with `command` split at whitespace (no argument here contains any).
fn openssl(command: &str) {
    let out = Command::new("openssl")
        .args(command.split_whitespace())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
