//! OpenSSH-style `SHA256:` fingerprints of SSH host keys.

use sha2::{Digest, Sha256};

const PREFIX: &str = "SHA256:";
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// The fingerprint `ssh-keygen -l -E sha256` prints for a key: `SHA256:` and the base64 of the
/// SHA-256 of the key blob, without padding. `key_blob` is the key in SSH wire format, as
/// `ssh2::Session::host_key` returns it (the base64-decoded middle field of a `.pub` file).
pub fn host_key_fingerprint(key_blob: &[u8]) -> String {
    let digest = Sha256::digest(key_blob);
    format!("{PREFIX}{}", base64_unpadded(&digest))
}

/// Whether a pinned fingerprint names the same key as one computed here.
///
/// Tolerates `=` padding and surrounding whitespace, which tools and people add when copying
/// fingerprints around; the `SHA256:` prefix is required so an MD5 pin never matches by accident.
pub(crate) fn matches(pinned: &str, actual: &str) -> bool {
    let pinned = pinned.trim().trim_end_matches('=');
    pinned.starts_with(PREFIX) && pinned == actual
}

/// Standard base64 (RFC 4648, section 4) without the `=` padding, as OpenSSH prints digests.
fn base64_unpadded(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        // Pack up to three bytes into the top of a 24-bit group, then emit one character per
        // six bits that carry input.
        let group = chunk.iter().enumerate().fold(0u32, |acc, (i, &byte)| {
            acc | (u32::from(byte) << (16 - 8 * i))
        });
        let chars = chunk.len() + 1;
        for i in 0..chars {
            let index = (group >> (18 - 6 * i)) & 0x3f;
            out.push(char::from(ALPHABET[index as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors_without_padding() {
        let cases = [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, expected) in cases {
            assert_eq!(
                base64_unpadded(input.as_bytes()),
                expected,
                "input {input:?}"
            );
        }
        assert_eq!(base64_unpadded(&[0xfb, 0xff]), "+/8");
    }

    #[test]
    fn fingerprint_matches_ssh_keygen() {
        // An ed25519 public key blob and what `ssh-keygen -l -E sha256` printed for it.
        let blob = hex::decode(
            "0000000b7373682d65643235353139000000202126611f624113225654dbfa7cacd648\
             f9d8d2e2904f42e50e34b2e7e944d80c",
        )
        .unwrap();
        let expected = "SHA256:wG5a4zbMZMAvelZQE1YY3DrsJqQbFzEmamL1/f2zCL0";
        assert_eq!(host_key_fingerprint(&blob), expected);
    }

    #[test]
    fn pins_match_with_padding_but_not_without_prefix() {
        let actual = "SHA256:wG5a4zbMZMAvelZQE1YY3DrsJqQbFzEmamL1/f2zCL0";
        assert!(matches(actual, actual));
        assert!(matches(&format!(" {actual}= "), actual));
        assert!(!matches(
            "wG5a4zbMZMAvelZQE1YY3DrsJqQbFzEmamL1/f2zCL0",
            actual
        ));
        assert!(!matches(
            "SHA256:xG5a4zbMZMAvelZQE1YY3DrsJqQbFzEmamL1/f2zCL0",
            actual
        ));
    }
}
