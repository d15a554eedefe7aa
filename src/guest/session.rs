//! One authenticated SSH session to a guest, and the remote commands run over it.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use ssh2::{ErrorCode, KeyboardInteractivePrompt, Prompt, Session};

use super::error::{AUTHENTICATION_FAILED, RemoteExit, SOCKET_RECV, Step, TIMEOUT};
use super::fingerprint;
use super::jump::Tunnel;
use super::{SshAuth, SshError, SshTarget};
use crate::secret::Secret;

/// Bound on the TCP connect; a guest that does not answer in this time is not ready.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on every blocking libssh2 call, so a guest that stops answering cannot hang a worker.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Helper commands print little; a guest printing more than this is not speaking our protocol.
const HELPER_STDERR_LIMIT: usize = 4 * 1024;

/// A remote command's result.
#[derive(Debug)]
pub(crate) struct Output {
    pub exit: RemoteExit,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// An authenticated session, with the fingerprint of the host key it was made with.
pub(crate) struct GuestSession {
    session: Session,
    fingerprint: String,
    /// The `ssh -W` carrying the session when it goes through a jump host.
    _tunnel: Option<Tunnel>,
}

impl GuestSession {
    /// Connects, checks the host key, then authenticates: in that order, so a guest with the
    /// wrong key never sees a credential and never gets to run anything.
    pub fn open(target: &SshTarget) -> Result<Self, SshError> {
        let addr = target.addr;
        let mut session = Session::new().map_err(|source| SshError::Handshake { addr, source })?;
        session.set_timeout(u32::try_from(IO_TIMEOUT.as_millis()).unwrap_or(u32::MAX));
        let connect_err = |source| SshError::Connect { addr, source };
        let tunnel = match &target.jump {
            None => {
                let tcp =
                    TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(connect_err)?;
                // Small request/response exchanges; Nagle would only add latency to each poll.
                let _ = tcp.set_nodelay(true);
                session.set_tcp_stream(tcp);
                None
            }
            Some(jump) => {
                let tunnel = Tunnel::open(jump, addr, CONNECT_TIMEOUT).map_err(connect_err)?;
                session.set_tcp_stream(tunnel.stream.try_clone().map_err(connect_err)?);
                Some(tunnel)
            }
        };
        session
            .handshake()
            .map_err(|source| SshError::Handshake { addr, source })?;

        let (key, _) = session.host_key().ok_or(SshError::NoHostKey { addr })?;
        let fingerprint = fingerprint::host_key_fingerprint(key);
        tracing::debug!(%addr, host_key = %fingerprint, "ssh handshake done");
        if let Some(expected) = &target.pinned_host_key
            && !fingerprint::matches(expected, &fingerprint)
        {
            let expected = expected.clone();
            return Err(SshError::HostKeyMismatch {
                addr,
                expected,
                actual: fingerprint,
            });
        }

        authenticate(&session, &target.user, &target.auth)?;
        tracing::debug!(%addr, user = %target.user, "ssh session authenticated");
        Ok(Self {
            session,
            fingerprint,
            _tunnel: tunnel,
        })
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Runs `command`, feeding it `stdin`, and returns its exit and output. At most
    /// `stdout_limit` bytes of stdout are kept; the rest is read and dropped.
    pub fn exec(
        &self,
        step: Step,
        command: &str,
        stdin: &[u8],
        stdout_limit: usize,
    ) -> Result<Output, SshError> {
        let fail = |source| SshError::Channel { step, source };
        let mut channel = self.session.channel_session().map_err(fail)?;
        channel.exec(command).map_err(fail)?;

        // A failed write is not fatal by itself: the command may have ended without reading
        // (sudo needing no password), and commands that need all of stdin check its size.
        if let Err(error) = channel.write_all(stdin).and_then(|()| channel.flush()) {
            tracing::debug!(%step, error = %error, "remote command did not take all of stdin");
        }
        let _ = channel.send_eof();

        // Stdout before stderr: helper commands keep stderr small, so it cannot fill the
        // channel window while stdout is being read.
        let stdout = read_capped(&mut channel, stdout_limit).map_err(|e| self.io_error(step, e))?;
        let stderr = read_capped(&mut channel.stderr(), HELPER_STDERR_LIMIT)
            .map_err(|e| self.io_error(step, e))?;
        channel.wait_close().map_err(fail)?;

        let exit = match channel
            .exit_signal()
            .ok()
            .and_then(|signal| signal.exit_signal)
        {
            Some(name) => RemoteExit::Signal(name),
            None => RemoteExit::Status(channel.exit_status().map_err(fail)?),
        };
        Ok(Output {
            exit,
            stdout,
            stderr,
        })
    }

    /// Like [`exec`](Self::exec), but a non-zero exit is an error. Returns stdout.
    pub fn exec_ok(
        &self,
        step: Step,
        command: &str,
        stdin: &[u8],
        stdout_limit: usize,
    ) -> Result<Vec<u8>, SshError> {
        let output = self.exec(step, command, stdin, stdout_limit)?;
        if output.exit != RemoteExit::Status(0) {
            let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
            return Err(SshError::CommandFailed {
                step,
                exit: output.exit,
                stderr,
            });
        }
        Ok(output.stdout)
    }

    /// `ssh2`'s `Read` turns its errors into `io::Error`s without the libssh2 code; the
    /// session still holds the code, which decides whether the failure is transient.
    fn io_error(&self, step: Step, error: io::Error) -> SshError {
        let source = ssh2::Error::last_session_error(&self.session).unwrap_or_else(|| {
            let code = match error.kind() {
                io::ErrorKind::TimedOut => ErrorCode::Session(TIMEOUT),
                _ => ErrorCode::Session(SOCKET_RECV),
            };
            ssh2::Error::new(code, "channel read failed")
        });
        SshError::Channel { step, source }
    }
}

/// Says goodbye instead of just closing the socket, so sshd logs a clean disconnect.
impl Drop for GuestSession {
    fn drop(&mut self) {
        let _ = self.session.disconnect(None, "hatchery is done", None);
    }
}

/// Password (or keyboard-interactive with the password) or private-key authentication.
fn authenticate(session: &Session, user: &str, auth: &SshAuth) -> Result<(), SshError> {
    let failed = |source| SshError::Authenticate {
        user: user.to_owned(),
        source,
    };
    match auth {
        SshAuth::Password(password) => {
            let offered = session
                .auth_methods(user)
                .map_err(|source| SshError::AuthMethods {
                    user: user.to_owned(),
                    source,
                })?;
            // The "none" method can succeed on its own; nothing left to prove then.
            if session.authenticated() {
                return Ok(());
            }
            let offers = |method| offered.split(',').any(|m| m == method);
            if offers("password") {
                session
                    .userauth_password(user, password.expose())
                    .map_err(failed)?;
            } else if offers("keyboard-interactive") {
                let mut answer = AnswerWithPassword(password);
                session
                    .userauth_keyboard_interactive(user, &mut answer)
                    .map_err(failed)?;
            } else {
                let offered = offered.to_owned();
                return Err(SshError::NoUsableAuthMethod {
                    user: user.to_owned(),
                    offered,
                });
            }
        }
        SshAuth::PrivateKey { key, passphrase } => {
            let passphrase = passphrase.as_ref().map(Secret::expose);
            session
                .userauth_pubkey_memory(user, None, key.expose(), passphrase)
                .map_err(failed)?;
        }
    }

    // libssh2 reports most refusals as errors, but a server may also end the exchange
    // without accepting us; check rather than assume.
    if !session.authenticated() {
        let source = ssh2::Error::new(
            ErrorCode::Session(AUTHENTICATION_FAILED),
            "server did not accept the credentials",
        );
        return Err(failed(source));
    }
    Ok(())
}

/// Answers every keyboard-interactive prompt with the password, as a human would at a
/// `Password:` prompt.
struct AnswerWithPassword<'a>(&'a Secret);

impl KeyboardInteractivePrompt for AnswerWithPassword<'_> {
    fn prompt<'p>(
        &mut self,
        _user: &str,
        _instructions: &str,
        prompts: &[Prompt<'p>],
    ) -> Vec<String> {
        prompts.iter().map(|_| self.0.expose().to_owned()).collect()
    }
}

/// Reads `reader` to its end, keeping the first `limit` bytes.
fn read_capped(reader: &mut impl Read, limit: usize) -> io::Result<Vec<u8>> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(kept);
        }
        let room = limit.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
}
