//! Failures of SSH access to a guest, one variant per operation that can fail.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use ssh2::ErrorCode;

/// libssh2 error codes (from `libssh2.h`) that mean the connection, not the request, failed.
const SOCKET_NONE: i32 = -1;
const BANNER_RECV: i32 = -2;
const BANNER_SEND: i32 = -3;
const SOCKET_SEND: i32 = -7;
const KEY_EXCHANGE_FAILURE: i32 = -8;
pub(crate) const TIMEOUT: i32 = -9;
const SOCKET_DISCONNECT: i32 = -13;
const SOCKET_TIMEOUT: i32 = -30;
pub(crate) const SOCKET_RECV: i32 = -43;
/// Credentials the server refused.
pub(crate) const AUTHENTICATION_FAILED: i32 = -18;

/// The remote commands of the finish protocol; names the step in errors and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Probe,
    Upload,
    Start,
    Collect,
    Cleanup,
    Kill,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Probe => "probe the job directory",
            Step::Upload => "upload the finish script",
            Step::Start => "start the finish script",
            Step::Collect => "collect the finish script's output",
            Step::Cleanup => "remove the job directory",
            Step::Kill => "stop the finish script",
        })
    }
}

/// How a remote command ended, as the SSH server reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteExit {
    Status(i32),
    Signal(String),
}

impl fmt::Display for RemoteExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RemoteExit::Status(code) => write!(f, "status {code}"),
            RemoteExit::Signal(name) => write!(f, "signal {name}"),
        }
    }
}

/// Everything that can go wrong between hatchery and a guest's SSH server.
///
/// No variant carries a password, key or passphrase; `stderr` fields hold only what hatchery's
/// own helper commands printed, never the finish script's output.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("no ssh server answered at {addr} within {waited:?}")]
    SshdNotReady {
        addr: SocketAddr,
        waited: Duration,
        /// The last reason a probe failed, when it was an I/O error.
        #[source]
        last: Option<io::Error>,
    },

    #[error("could not connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error("ssh handshake with {addr} failed")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: ssh2::Error,
    },

    #[error("ssh server at {addr} sent no host key")]
    NoHostKey { addr: SocketAddr },

    #[error("host key of {addr} is {actual}, expected {expected}")]
    HostKeyMismatch {
        addr: SocketAddr,
        expected: String,
        actual: String,
    },

    #[error("could not list the authentication methods offered to {user}")]
    AuthMethods {
        user: String,
        #[source]
        source: ssh2::Error,
    },

    #[error(
        "server offers no authentication method hatchery can use for {user} (offers `{offered}`)"
    )]
    NoUsableAuthMethod { user: String, offered: String },

    #[error("authentication as {user} failed")]
    Authenticate {
        user: String,
        #[source]
        source: ssh2::Error,
    },

    #[error("could not {step} on the guest")]
    Channel {
        step: Step,
        #[source]
        source: ssh2::Error,
    },

    #[error("could not {step} on the guest: command ended with {exit}: {stderr}")]
    CommandFailed {
        step: Step,
        exit: RemoteExit,
        stderr: String,
    },

    #[error("could not {step} on the guest: malformed answer {output:?}")]
    MalformedStatus { step: Step, output: String },

    #[error("finish script still running after {timeout:?}; it was killed")]
    ScriptTimedOut { timeout: Duration },

    #[error("finish script stopped without recording an exit status")]
    ScriptLost,

    #[error("job directory changed under a running finish script (now {found})")]
    JobDirectoryChanged { found: String },

    #[error("cancelled")]
    Cancelled,
}

impl SshError {
    /// Whether trying again later may succeed.
    ///
    /// Transient: the network or the guest's sshd was not (or no longer) there, since a guest
    /// may still be booting and the finish protocol resumes where it stopped. Not transient:
    /// anything the server or the guest answered on purpose (a rejected login, a wrong host
    /// key, a failing helper command), a script timeout, and cancellation, which the caller
    /// handles itself. `SshdNotReady` is final because its deadline was the retry budget.
    pub fn is_transient(&self) -> bool {
        match self {
            SshError::Connect { source, .. } => io_is_transient(source),
            SshError::Handshake { source, .. }
            | SshError::AuthMethods { source, .. }
            | SshError::Authenticate { source, .. }
            | SshError::Channel { source, .. } => ssh2_is_transient(source),
            SshError::SshdNotReady { .. }
            | SshError::NoHostKey { .. }
            | SshError::HostKeyMismatch { .. }
            | SshError::NoUsableAuthMethod { .. }
            | SshError::CommandFailed { .. }
            | SshError::MalformedStatus { .. }
            | SshError::ScriptTimedOut { .. }
            | SshError::ScriptLost
            | SshError::JobDirectoryChanged { .. }
            | SshError::Cancelled => false,
        }
    }
}

/// TCP failures that a booting guest or a busy network produce.
pub(crate) fn io_is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::TimedOut
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::NotConnected
    )
}

/// libssh2 failures of the transport rather than refusals by the server.
fn ssh2_is_transient(error: &ssh2::Error) -> bool {
    matches!(
        error.code(),
        ErrorCode::Session(
            SOCKET_NONE
                | BANNER_RECV
                | BANNER_SEND
                | SOCKET_SEND
                | KEY_EXCHANGE_FAILURE
                | TIMEOUT
                | SOCKET_DISCONNECT
                | SOCKET_TIMEOUT
                | SOCKET_RECV
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 22))
    }

    fn ssh2_error(code: i32) -> ssh2::Error {
        ssh2::Error::new(ErrorCode::Session(code), "test")
    }

    #[test]
    fn network_failures_are_transient() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert!(
            SshError::Connect {
                addr: addr(),
                source: refused
            }
            .is_transient()
        );

        let reset = ssh2_error(SOCKET_DISCONNECT);
        assert!(
            SshError::Handshake {
                addr: addr(),
                source: reset
            }
            .is_transient()
        );

        let dropped = ssh2_error(SOCKET_RECV);
        assert!(
            SshError::Channel {
                step: Step::Probe,
                source: dropped
            }
            .is_transient()
        );
    }

    #[test]
    fn refusals_and_final_states_are_not_transient() {
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert!(
            !SshError::Connect {
                addr: addr(),
                source: denied
            }
            .is_transient()
        );

        let rejected = ssh2_error(AUTHENTICATION_FAILED);
        let user = "root".to_owned();
        assert!(
            !SshError::Authenticate {
                user,
                source: rejected
            }
            .is_transient()
        );

        let mismatch = SshError::HostKeyMismatch {
            addr: addr(),
            expected: "SHA256:a".into(),
            actual: "SHA256:b".into(),
        };
        assert!(!mismatch.is_transient());
        let timeout = Duration::from_secs(1);
        assert!(!SshError::ScriptTimedOut { timeout }.is_transient());
        assert!(!SshError::Cancelled.is_transient());
    }

    #[test]
    fn messages_are_lowercase_without_final_period() {
        let errors = [
            SshError::ScriptLost,
            SshError::Cancelled,
            SshError::CommandFailed {
                step: Step::Start,
                exit: RemoteExit::Status(1),
                stderr: "sudo: a password is required".into(),
            },
        ];
        for error in errors {
            let message = error.to_string();
            assert!(message.starts_with(|c: char| c.is_lowercase()), "{message}");
            assert!(!message.ends_with('.'), "{message}");
        }
    }
}
