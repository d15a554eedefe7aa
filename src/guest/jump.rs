//! Reaching a guest through its hypervisor as an SSH jump host, for workers that cannot route to
//! the hypervisor's guest networks: OpenSSH's `ssh -W` carries the connection, the way a
//! `ProxyCommand` would, and libssh2 speaks to the guest over it end to end.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The host to hop through, and what `ssh` needs to log in to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JumpHost {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    /// The private key for the jump host; `ssh`'s own defaults when absent.
    pub identity: Option<PathBuf>,
    /// The `known_hosts` file that must list the jump host; `ssh`'s own when absent. Unknown
    /// jump hosts are refused, never trusted on first use.
    pub known_hosts: Option<PathBuf>,
}

impl JumpHost {
    /// Parses `[user@]host[:port]`.
    pub fn parse(spec: &str) -> Option<Self> {
        let (user, rest) = match spec.split_once('@') {
            Some((user, rest)) => (Some(user.to_owned()), rest),
            None => (None, spec),
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => (host, Some(port.parse().ok()?)),
            None => (rest, None),
        };
        let safe = |s: &str| {
            !s.is_empty()
                && !s.starts_with('-')
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        if !safe(host) || !user.as_deref().is_none_or(safe) {
            return None;
        }
        Some(Self {
            user,
            host: host.to_owned(),
            port,
            identity: None,
            known_hosts: None,
        })
    }

    /// The jump host of a `qemu+ssh://[user@]host[:port]/...` URI: the hypervisor itself.
    pub fn from_libvirt_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("qemu+ssh://")?;
        let authority = rest.split(['/', '?']).next()?;
        Self::parse(authority)
    }
}

/// A running `ssh -W` and our end of the socket it forwards. Dropping it ends the hop.
pub(crate) struct Tunnel {
    pub stream: UnixStream,
    child: Child,
}

impl Tunnel {
    /// Starts `ssh -W target` through `jump`. The child's stdin and stdout are both the other
    /// end of a socket pair, so the forwarded bytes need no copying thread.
    pub fn open(jump: &JumpHost, target: SocketAddr, timeout: Duration) -> io::Result<Self> {
        let (ours, theirs) = UnixStream::pair()?;
        let mut cmd = Command::new("ssh");
        let forward = match target {
            SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
            SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        };
        cmd.args([
            "-W",
            &forward,
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
        ])
        .args([
            "-o",
            &format!("ConnectTimeout={}", timeout.as_secs().max(1)),
        ])
        .args(["-o", "ServerAliveInterval=15", "-o", "LogLevel=ERROR"]);
        if let Some(port) = jump.port {
            cmd.args(["-p", &port.to_string()]);
        }
        if let Some(identity) = &jump.identity {
            cmd.arg("-i")
                .arg(identity)
                .args(["-o", "IdentitiesOnly=yes"]);
        }
        if let Some(known) = &jump.known_hosts {
            cmd.arg("-o")
                .arg(format!("UserKnownHostsFile={}", known.display()));
        }
        let destination = match &jump.user {
            Some(user) => format!("{user}@{}", jump.host),
            None => jump.host.clone(),
        };
        // `--` ends the options: the destination can never be read as one.
        cmd.arg("--").arg(destination);

        let child = cmd
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs.try_clone()?)))
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stderr(Stdio::piped())
            .spawn()?;
        Ok(Self {
            stream: ours,
            child,
        })
    }

    /// Reads lines from the far end until one starts with `SSH-`: the guest's sshd answered
    /// through the hop. `Ok(false)` when the hop closed first because the guest's port did not
    /// answer; a `PermissionDenied` error when the jump host itself refused us, which waiting
    /// longer cannot mend.
    pub fn banner(&mut self, timeout: Duration) -> io::Result<bool> {
        let found = self.read_banner(timeout)?;
        if !found {
            self.refused()?;
        }
        Ok(found)
    }

    /// Fails when `ssh` reported that the jump host refused its key or its login.
    fn refused(&mut self) -> io::Result<()> {
        let _ = self.child.wait();
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        let permanent = [
            "Host key verification failed",
            "Permission denied",
            "Could not resolve",
        ];
        match permanent.iter().find(|m| stderr.contains(*m)) {
            Some(m) => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("jump host: {m}"),
            )),
            None => Ok(()),
        }
    }

    fn read_banner(&mut self, timeout: Duration) -> io::Result<bool> {
        self.stream.set_read_timeout(Some(timeout))?;
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while seen.len() < 8 * 1024 {
            if self.stream.read(&mut byte)? == 0 {
                return Ok(false);
            }
            seen.push(byte[0]);
            if byte[0] == b'\n' {
                let line_start = seen[..seen.len() - 1].iter().rposition(|b| *b == b'\n');
                let line = &seen[line_start.map_or(0, |i| i + 1)..];
                if line.starts_with(b"SSH-") {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_jump_specs_and_refuses_option_lookalikes() {
        let j = JumpHost::parse("root@kvm-1.example.com:2222").expect("valid");
        assert_eq!(
            (j.user.as_deref(), j.host.as_str(), j.port),
            (Some("root"), "kvm-1.example.com", Some(2222))
        );
        assert_eq!(JumpHost::parse("kvm-2").expect("valid").user, None);
        assert!(JumpHost::parse("-oProxyCommand=x").is_none());
        assert!(JumpHost::parse("root@host;reboot").is_none());
        let from_uri = JumpHost::from_libvirt_uri("qemu+ssh://ops@kvm-3/system?keyfile=/k");
        assert_eq!(from_uri.expect("ssh uri").host, "kvm-3");
        assert!(JumpHost::from_libvirt_uri("qemu:///system").is_none());
    }
}
