//! Waiting for a booting guest's sshd to answer with its banner.

use std::io::{self, BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::SshError;
use super::jump::{JumpHost, Tunnel};

/// Pause between probes; a guest that is booting needs seconds, not milliseconds.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Upper bound on one probe's connect and read, so a silent peer cannot eat the deadline.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A probe through a jump host includes logging in to it.
const JUMP_PROBE_TIMEOUT: Duration = Duration::from_secs(10);
const JUMP_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// RFC 4253 lets a server send other lines before its version line; read no more than this.
const MAX_BANNER_BYTES: u64 = 8 * 1024;

/// Probes `addr` until an SSH version line arrives, the deadline passes or `cancel` fires.
pub(super) fn until_banner(
    addr: SocketAddr,
    jump: Option<&JumpHost>,
    deadline: Instant,
    cancel: &CancellationToken,
) -> Result<(), SshError> {
    let started = Instant::now();
    let mut last_error = None;
    loop {
        if cancel.is_cancelled() {
            return Err(SshError::Cancelled);
        }
        let Some(remaining) = deadline.checked_duration_since(Instant::now()) else {
            let waited = started.elapsed();
            return Err(SshError::SshdNotReady {
                addr,
                waited,
                last: last_error,
            });
        };

        let result = match jump {
            None => probe(addr, remaining.min(PROBE_TIMEOUT)),
            Some(jump) => probe_via(jump, addr, remaining.min(JUMP_PROBE_TIMEOUT)),
        };
        match result {
            Ok(true) => {
                tracing::debug!(%addr, waited_ms = started.elapsed().as_millis(), "sshd answers");
                return Ok(());
            }
            Ok(false) => tracing::trace!(%addr, "peer answered without an ssh banner"),
            Err(error) if error.kind() == io::ErrorKind::PermissionDenied && jump.is_some() => {
                // The jump host refused us: no amount of waiting for the guest helps.
                return Err(SshError::Connect {
                    addr,
                    source: error,
                });
            }
            Err(error) => {
                tracing::trace!(%addr, error = %error, "sshd not reachable yet");
                last_error = Some(error);
            }
        }

        // Each probe through a jump host costs a login to it: poll that more gently.
        let interval = if jump.is_some() {
            JUMP_POLL_INTERVAL
        } else {
            POLL_INTERVAL
        };
        if !pause(interval.min(remaining), cancel) {
            return Err(SshError::Cancelled);
        }
    }
}

/// One attempt: connect and read lines until one starts with `SSH-`. `Ok(false)` when the peer
/// closed or sent something else, which happens while port forwarders start before sshd does.
fn probe(addr: SocketAddr, timeout: Duration) -> io::Result<bool> {
    let timeout = timeout.max(Duration::from_millis(1));
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;

    let mut reader = BufReader::new(stream.take(MAX_BANNER_BYTES));
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(false);
        }
        if line.starts_with(b"SSH-") {
            return Ok(true);
        }
    }
}

/// One attempt through `jump`: `ssh -W` to `addr`, then the banner.
fn probe_via(jump: &JumpHost, addr: SocketAddr, timeout: Duration) -> io::Result<bool> {
    Tunnel::open(jump, addr, timeout)?.banner(timeout)
}

/// The async form of [`until_banner`] for direct connections: a job waiting for its guest's
/// sshd holds no thread, so hundreds can wait at once for the memory of a few.
pub(super) async fn until_banner_async(
    addr: SocketAddr,
    deadline: tokio::time::Instant,
    cancel: &CancellationToken,
) -> Result<(), SshError> {
    use tokio::io::AsyncBufReadExt;

    let started = tokio::time::Instant::now();
    let mut last_error = None;
    loop {
        let probe = async {
            use tokio::io::AsyncReadExt as _;
            let stream = tokio::net::TcpStream::connect(addr).await?;
            let mut reader = tokio::io::BufReader::new(stream.take(MAX_BANNER_BYTES));
            let mut line = Vec::new();
            loop {
                line.clear();
                if reader.read_until(b'\n', &mut line).await? == 0 {
                    return Ok::<bool, io::Error>(false);
                }
                if line.starts_with(b"SSH-") {
                    return Ok(true);
                }
            }
        };
        let until = deadline.min(tokio::time::Instant::now() + PROBE_TIMEOUT);
        let result = tokio::select! {
            r = tokio::time::timeout_at(until, probe) => r.unwrap_or_else(|_| {
                Err(io::Error::from(io::ErrorKind::TimedOut))
            }),
            () = cancel.cancelled() => return Err(SshError::Cancelled),
        };
        match result {
            Ok(true) => return Ok(()),
            Ok(false) => tracing::trace!(%addr, "peer answered without an ssh banner"),
            Err(error) => {
                tracing::trace!(%addr, error = %error, "sshd not reachable yet");
                last_error = Some(error);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            let waited = started.elapsed();
            return Err(SshError::SshdNotReady {
                addr,
                waited,
                last: last_error,
            });
        }
        tokio::select! {
            () = tokio::time::sleep(POLL_INTERVAL) => {}
            () = cancel.cancelled() => return Err(SshError::Cancelled),
        }
    }
}

/// Sleeps for `duration` in short slices; `false` when `cancel` fired meanwhile.
pub(super) fn pause(duration: Duration, cancel: &CancellationToken) -> bool {
    const SLICE: Duration = Duration::from_millis(20);
    let until = Instant::now() + duration;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if cancel.is_cancelled() {
            return false;
        }
        std::thread::sleep(left.min(SLICE));
    }
    !cancel.is_cancelled()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    fn serve_once(reply: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let _ = stream.write_all(reply);
        });
        addr
    }

    #[test]
    fn banner_after_other_lines_counts() {
        let addr = serve_once(b"hello\r\nSSH-2.0-Test\r\n");
        assert!(probe(addr, Duration::from_secs(5)).unwrap());
    }

    #[test]
    fn other_protocols_do_not_count() {
        let addr = serve_once(b"220 smtp ready\r\n");
        assert!(!probe(addr, Duration::from_secs(5)).unwrap());
    }

    #[test]
    fn closed_port_runs_into_the_deadline() {
        // Bind then drop, so the port is very likely closed for the duration of the test.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let deadline = Instant::now() + Duration::from_millis(300);
        let error = until_banner(addr, None, deadline, &CancellationToken::new()).unwrap_err();
        assert!(matches!(error, SshError::SshdNotReady { .. }), "{error:?}");
        assert!(!error.is_transient());
    }

    #[test]
    fn cancellation_stops_the_wait() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let cancel = CancellationToken::new();
        cancel.cancel();
        let deadline = Instant::now() + Duration::from_secs(60);
        let error = until_banner(addr, None, deadline, &cancel).unwrap_err();
        assert!(matches!(error, SshError::Cancelled), "{error:?}");
    }
}
