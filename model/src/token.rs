//! Token secrets and their keyed hashes.
//!
//! Secrets are generated with 256 bits of OS randomness, so a keyed SHA-256
//! (HMAC) is all the protection a stored hash needs: there is nothing to
//! brute-force, and a slow password hash would only make every CONNECT cost
//! milliseconds. The key (`hash_key` in the bundle) makes a leaked bundle
//! useless for precomputed lookups across brokers.
//!
//! The HMAC message is the secret exactly as the client sends it (the UTF-8
//! bytes of the password), never a decoded form, so bring-your-own secrets of
//! any shape hash the same way by hand (see `docs/auth-bundle.md`).

use std::fmt;

use base64::Engine;
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::{DecodePaddingMode, general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use thiserror::Error;

/// Random bytes in a generated secret (43 characters of URL-safe base64).
pub const SECRET_BYTES: usize = 32;
/// Random bytes in a generated hash key.
pub const HASH_KEY_BYTES: usize = 32;
/// Shortest hash key a bundle may carry; below this the key adds too little
/// to be worth trusting.
pub const MIN_HASH_KEY_BYTES: usize = 16;
/// Shortest secret [`check_secret`] accepts for bring-your-own secrets. The
/// hash is fast, so a short secret could be guessed from a leaked bundle.
pub const MIN_SECRET_LEN: usize = 16;
/// Length of a secret hash in bytes (SHA-256 output).
pub const HASH_LEN: usize = 32;

/// Standard alphabet, padding optional on input: people paste keys from
/// `base64`, `openssl` and Kubernetes tooling, which disagree on padding.
pub(crate) const B64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KeyError {
    #[error("hash_key is not valid base64")]
    Base64,
    #[error("hash_key is {0} bytes long; at least {MIN_HASH_KEY_BYTES} are required")]
    TooShort(usize),
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SecretError {
    #[error("secret is {0} characters long; at least {MIN_SECRET_LEN} are required")]
    TooShort(usize),
    #[error("secret contains whitespace or control characters")]
    BadCharacter,
}

/// The HMAC key of a bundle. Its `Debug` output is redacted so that it can
/// sit inside structures that get logged.
#[derive(Clone, PartialEq, Eq)]
pub struct HashKey(pub(crate) Vec<u8>);

impl HashKey {
    /// A fresh random key.
    pub fn generate() -> HashKey {
        HashKey(random_bytes(HASH_KEY_BYTES))
    }

    /// Decodes the bundle's `hash_key` (standard base64, padding optional).
    pub fn from_base64(encoded: &str) -> Result<HashKey, KeyError> {
        let bytes = B64_LENIENT
            .decode(encoded.trim())
            .map_err(|_| KeyError::Base64)?;
        if bytes.len() < MIN_HASH_KEY_BYTES {
            return Err(KeyError::TooShort(bytes.len()));
        }
        Ok(HashKey(bytes))
    }

    /// Standard base64 with padding, the form written into bundles.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(&self.0)
    }

    /// HMAC-SHA256 of the secret's bytes.
    pub fn digest(&self, secret: &[u8]) -> [u8; HASH_LEN] {
        // HMAC accepts keys of any length, so this cannot fail; the fallback
        // keeps the code free of panics all the same.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            return [0; HASH_LEN];
        };
        mac.update(secret);
        mac.finalize().into_bytes().into()
    }

    /// The bundle's `secret_hash` for `secret`: base64 of [`HashKey::digest`].
    pub fn hash_secret(&self, secret: &str) -> String {
        STANDARD.encode(self.digest(secret.as_bytes()))
    }

    /// Constant-time check of `secret` against a bundle `secret_hash`.
    /// A malformed hash never verifies.
    pub fn verify(&self, secret: &[u8], secret_hash: &str) -> bool {
        match decode_hash(secret_hash) {
            Some(expected) => self.digest(secret).ct_eq(&expected).into(),
            None => false,
        }
    }
}

impl fmt::Debug for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HashKey(<{} bytes redacted>)", self.0.len())
    }
}

/// A new token secret: [`SECRET_BYTES`] random bytes as URL-safe base64
/// without padding, so it can travel unescaped in a query string
/// (`?access_token=`), an HTTP header and an MQTT password alike.
///
/// # Panics
/// If the operating system cannot provide randomness. Issuing a predictable
/// secret would be worse than failing, and no caller can recover sensibly.
pub fn generate_secret() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes(SECRET_BYTES))
}

/// A new bundle `hash_key` in its base64 form.
///
/// # Panics
/// As [`generate_secret`].
pub fn generate_hash_key() -> String {
    HashKey::generate().to_base64()
}

/// The bundle's `secret_hash` for `secret` under the base64 `hash_key`.
pub fn hash_secret(hash_key: &str, secret: &str) -> Result<String, KeyError> {
    Ok(HashKey::from_base64(hash_key)?.hash_secret(secret))
}

/// Constant-time check of a presented secret against a `secret_hash`.
pub fn verify_secret(hash_key: &str, secret: &[u8], secret_hash: &str) -> Result<bool, KeyError> {
    Ok(HashKey::from_base64(hash_key)?.verify(secret, secret_hash))
}

/// Checks a bring-your-own secret (operator `secretRef`, CLI `--secret`):
/// long enough to be unguessable, and free of characters that would break
/// HTTP headers or query strings or be lost by copy and paste.
pub fn check_secret(secret: &str) -> Result<(), SecretError> {
    let len = secret.chars().count();
    if len < MIN_SECRET_LEN {
        return Err(SecretError::TooShort(len));
    }
    if secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(SecretError::BadCharacter);
    }
    Ok(())
}

/// Decodes a `secret_hash`; `None` unless it is base64 of exactly
/// [`HASH_LEN`] bytes.
pub(crate) fn decode_hash(secret_hash: &str) -> Option<[u8; HASH_LEN]> {
    let bytes = B64_LENIENT.decode(secret_hash.trim()).ok()?;
    bytes.try_into().ok()
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut buf).expect("the operating system's random number generator failed");
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_random_and_url_safe() {
        let a = generate_secret();
        let b = generate_secret();
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert!(check_secret(&a).is_ok());
    }

    #[test]
    fn hash_keys_round_trip() {
        let k = generate_hash_key();
        let key = HashKey::from_base64(&k).unwrap();
        assert_eq!(key.to_base64(), k);
        assert_eq!(
            HashKey::from_base64(k.trim_end_matches('=')).unwrap(),
            key,
            "padding is optional"
        );
        assert_eq!(HashKey::from_base64("!!"), Err(KeyError::Base64));
        assert_eq!(
            HashKey::from_base64("AAAAAAAAAAAAAAAAAAAA"),
            Err(KeyError::TooShort(15))
        );
        assert!(!format!("{key:?}").contains(&k));
    }

    /// Pinned against `openssl dgst -sha256 -mac HMAC`, the recipe given in
    /// docs/auth-bundle.md, so the by-hand method and the code cannot drift.
    #[test]
    fn known_vector() {
        // key = bytes 0..32, secret = "example-secret-0123456789"
        let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let hash = hash_secret(key, "example-secret-0123456789").unwrap();
        assert_eq!(hash, "fspmjThuRpmvhJzO1T91ogOg5IaVSULJ9DZSjqo64J8=");
        assert_eq!(
            verify_secret(key, b"example-secret-0123456789", &hash),
            Ok(true)
        );
        assert_eq!(
            verify_secret(key, b"example-secret-0123456788", &hash),
            Ok(false)
        );
        assert_eq!(
            verify_secret(key, b"example-secret-0123456789", "bm9wZQ"),
            Ok(false),
            "short hashes never verify"
        );
    }

    #[test]
    fn bring_your_own_secret_checks() {
        assert_eq!(check_secret("short"), Err(SecretError::TooShort(5)));
        assert_eq!(
            check_secret("a long secret with spaces"),
            Err(SecretError::BadCharacter)
        );
        assert!(check_secret("correct-horse-battery-staple").is_ok());
    }
}
