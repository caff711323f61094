//! Signed commands: `{"signed":"<command JSON>","sig":"<hex HMAC-SHA256 of that string>"}`.
//!
//! The check is constant-time (hmac's `verify_slice`), and the key never reaches a log:
//! `Debug` is written by hand.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The shared secret of `commands.hmac_key_file`.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(Vec<u8>);

impl SigningKey {
    pub fn new(key: Vec<u8>) -> Self {
        Self(key)
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

fn mac(key: &SigningKey) -> HmacSha256 {
    // HMAC takes keys of any length, so this never fails.
    HmacSha256::new_from_slice(&key.0).expect("HMAC accepts any key length")
}

/// True when `sig_hex` is the HMAC-SHA256 of `message` under `key`.
pub fn verify(key: &SigningKey, message: &[u8], sig_hex: &str) -> bool {
    let Some(sig) = from_hex(sig_hex) else {
        return false;
    };
    let mut m = mac(key);
    m.update(message);
    m.verify_slice(&sig).is_ok()
}

/// The lowercase hex HMAC-SHA256 of `message` (for `servogate cmd` and tests).
pub fn sign_hex(key: &SigningKey, message: &[u8]) -> String {
    let mut m = mac(key);
    m.update(message);
    m.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some((digit(p[0])? * 16 + digit(p[1])?) as u8))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rfc_4231_test_case_2_signs_as_published() {
        // RFC 4231, 4.3 (Test Case 2): key "Jefe", data "what do ya want for nothing?".
        let key = SigningKey::new(b"Jefe".to_vec());
        assert_eq!(
            sign_hex(&key, b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_signature_verifies_in_either_case_and_nothing_else_does() {
        let key = SigningKey::new(b"k".to_vec());
        let sig = sign_hex(&key, b"m");
        assert!(verify(&key, b"m", &sig));
        assert!(verify(&key, b"m", &sig.to_uppercase()));
        assert!(!verify(&key, b"m2", &sig));
        assert!(!verify(&key, b"m", &sig[..62]));
        assert!(!verify(&key, b"m", "zz"));
        assert!(!verify(&SigningKey::new(b"other".to_vec()), b"m", &sig));
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        assert!(!format!("{:?}", SigningKey::new(b"secret".to_vec())).contains("secret"));
    }
}
