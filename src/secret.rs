//! A wrapper for passwords and private keys that never prints its contents, and their removal
//! from text that came back from a guest.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// A secret string: a password, a private key, a passphrase.
///
/// `Debug` and `Display` print a fixed placeholder, and there is deliberately no `Serialize`, so
/// a secret cannot reach a log line, an event or an error message by accident. Code that needs
/// the value calls [`Secret::expose`] at the one place it hands it to libssh2.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret's value. Call it only where the value leaves hatchery for its real consumer.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

/// Shortest piece of a secret worth hiding on its own; shorter ones would blank ordinary text.
const MIN_SECRET_PIECE: usize = 6;

/// Replaces `secrets` in `text` (what a guest printed, say) with `[redacted]`: whole, line by
/// line (a key printed in part), and a piece left at the start of a tail that was cut in the
/// middle of one.
pub fn redact(text: &str, secrets: &[&Secret]) -> String {
    let mut out = text.to_owned();
    for secret in secrets.iter().map(|s| s.expose()) {
        let lines = secret
            .lines()
            .map(str::trim)
            .filter(|l| l.len() >= MIN_SECRET_PIECE);
        for piece in std::iter::once(secret).chain(lines) {
            if piece.len() >= MIN_SECRET_PIECE.min(secret.len()) && !piece.is_empty() {
                out = out.replace(piece, "[redacted]");
            }
        }
        // The tail keeps the last bytes, so a secret can only be cut at the tail's start.
        let longest = (MIN_SECRET_PIECE..secret.len()).rev().find(|&n| {
            secret.is_char_boundary(secret.len() - n)
                && out.starts_with(&secret[secret.len() - n..])
        });
        if let Some(n) = longest {
            out.replace_range(..n, "[redacted]");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let secret = Secret::new("hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert!(!format!("{secret}").contains("hunter2"));
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn redaction_covers_whole_secrets_single_lines_and_cut_tails() {
        let password = Secret::new("correct-horse-battery");
        let key =
            Secret::new("-----BEGIN KEY-----\nAAAALINEONEAAAA\nBBBBLINETWOBBBB\n-----END KEY-----");
        let secrets = [&password, &key];

        assert_eq!(
            redact("pw correct-horse-battery!", &secrets),
            "pw [redacted]!"
        );
        assert_eq!(redact("x BBBBLINETWOBBBB y", &secrets), "x [redacted] y");
        assert_eq!(
            redact("horse-battery and more", &secrets),
            "[redacted] and more"
        );
        assert_eq!(redact("nothing to hide", &secrets), "nothing to hide");
    }
}
