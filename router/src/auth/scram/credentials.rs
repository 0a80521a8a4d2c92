//! What a SCRAM client proves itself with, and where a password client gets SaltedPassword.

use std::collections::HashMap;
use std::fmt;

use sha2::{Digest, Sha256};

use super::ClientKey;
use crate::auth::verifier::{self, ScramVerifier, KEY_LEN};

/// Entries a [`SaltedPasswordCache`] holds before it starts over.
const MAX_CACHED_SALTED_PASSWORDS: usize = 1024;

/// What the client proves itself with.
#[derive(Clone)]
pub enum ClientCredentials {
    /// A ClientKey recovered by [`super::server_finish`] and the ServerKey of the catalog
    /// verifier: no PBKDF2 is needed, and the server's salt and iteration count are unused.
    Keys {
        /// `HMAC(SaltedPassword, "Client Key")`.
        client_key: [u8; KEY_LEN],
        /// `HMAC(SaltedPassword, "Server Key")`, to check the server's signature.
        server_key: [u8; KEY_LEN],
    },
    /// The password itself (used as raw UTF-8 bytes, see [`crate::auth::verifier`] on SASLprep).
    Password(String),
}

impl ClientCredentials {
    /// The credentials the router uses towards a backend after checking a client against
    /// `verifier` (the backend must hold the same verifier).
    pub fn from_client_key(client_key: ClientKey, verifier: &ScramVerifier) -> Self {
        Self::Keys {
            client_key: client_key.0,
            server_key: verifier.server_key,
        }
    }
}

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Keys { .. } => "ClientCredentials::Keys(<redacted>)",
            Self::Password(_) => "ClientCredentials::Password(<redacted>)",
        })
    }
}

/// Where a password client gets `SaltedPassword`: PBKDF2 each time ([`Pbkdf2`]), or a cache
/// ([`SaltedPasswordCache`], or the caller's own) so that connection storms do not measure
/// PBKDF2.
pub trait SaltedPasswordSource {
    /// `PBKDF2-HMAC-SHA-256(password, salt, iterations)`, computed or remembered.
    fn salted_password(&mut self, password: &str, salt: &[u8], iterations: u32) -> [u8; KEY_LEN];
}

/// Computes PBKDF2 on every login, as a real client does.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pbkdf2;

impl SaltedPasswordSource for Pbkdf2 {
    fn salted_password(&mut self, password: &str, salt: &[u8], iterations: u32) -> [u8; KEY_LEN] {
        verifier::salted_password(password.as_bytes(), salt, iterations)
    }
}

/// Remembers salted passwords by (password, salt, iterations). Keys are SHA-256 digests, so the
/// cache does not hold the passwords themselves (the values are password-equivalent anyway).
#[derive(Default)]
pub struct SaltedPasswordCache {
    entries: HashMap<[u8; KEY_LEN], [u8; KEY_LEN]>,
}

impl SaltedPasswordCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many salted passwords are cached.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl fmt::Debug for SaltedPasswordCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaltedPasswordCache")
            .field("len", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl SaltedPasswordSource for SaltedPasswordCache {
    fn salted_password(&mut self, password: &str, salt: &[u8], iterations: u32) -> [u8; KEY_LEN] {
        // Length prefixes keep (password, salt) pairs from colliding by concatenation.
        let key: [u8; KEY_LEN] = Sha256::new()
            .chain_update((password.len() as u64).to_be_bytes())
            .chain_update(password)
            .chain_update(iterations.to_be_bytes())
            .chain_update(salt)
            .finalize()
            .into();
        if let Some(salted) = self.entries.get(&key) {
            return *salted;
        }
        if self.entries.len() >= MAX_CACHED_SALTED_PASSWORDS {
            self.entries.clear();
        }
        let salted = verifier::salted_password(password.as_bytes(), salt, iterations);
        self.entries.insert(key, salted);
        salted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_matches_pbkdf2_and_keys_by_all_three_inputs() {
        let mut cache = SaltedPasswordCache::new();
        assert!(cache.is_empty());
        assert_eq!(
            cache.salted_password("pw", b"salt", 16),
            Pbkdf2.salted_password("pw", b"salt", 16)
        );
        cache.salted_password("pw", b"salt", 16);
        assert_eq!(cache.len(), 1);
        cache.salted_password("pw", b"salt", 17);
        cache.salted_password("pw", b"salt2", 16);
        cache.salted_password("pws", b"alt", 16);
        assert_eq!(cache.len(), 4);
    }

    #[test]
    fn cache_is_bounded() {
        let mut cache = SaltedPasswordCache::new();
        for i in 0..=MAX_CACHED_SALTED_PASSWORDS {
            cache.salted_password("pw", &i.to_be_bytes(), 1);
        }
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn debug_is_redacted() {
        let password = ClientCredentials::Password("hunter2".into());
        assert!(!format!("{password:?}").contains("hunter2"));
        let keys = ClientCredentials::from_client_key(
            ClientKey([0xab; KEY_LEN]),
            &ScramVerifier::from_password("pw", b"salt", 1),
        );
        assert_eq!(format!("{keys:?}"), "ClientCredentials::Keys(<redacted>)");
    }
}
