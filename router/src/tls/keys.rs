//! Record protection keys: one direction's AEAD key, nonce base and sequence number, and the
//! TLS 1.3 application traffic secrets key updates are derived from (RFC 8446 7.1 to 7.3).
//!
//! Everything secret here is wiped when dropped: the traffic secrets, AEAD keys and nonce bases
//! by `zeroize`, the expanded AEAD keys by aws-lc, whose contexts are allocated with
//! `OPENSSL_malloc` and cleansed by `OPENSSL_free` when aws-lc-rs frees them.
//!
//! An expanded AES-GCM key (aws-lc's context: the key schedule and GHASH tables) is about 0.6
//! KiB, 20 times the key; an idle connection sheds it ([`Keys::shed`]) and the next record
//! rebuilds it from its [`KeySource`].

use aws_lc_rs::aead::{self, LessSafeKey, UnboundKey, NONCE_LEN};
use aws_lc_rs::hkdf;
use rustls::ConnectionTrafficSecrets;
use zeroize::Zeroize;

use super::record::RecordError;

/// Longest AEAD key of a supported suite (AES-256-GCM, ChaCha20-Poly1305).
const MAX_KEY_LEN: usize = 32;

/// One direction's AEAD key, nonce base and sequence number.
pub(crate) struct Keys {
    /// The key as aws-lc expanded it; `None` once shed, until the next record rebuilds it
    /// from the connection's [`KeySource`].
    expanded: Option<LessSafeKey>,
    pub(crate) iv: [u8; NONCE_LEN],
    pub(crate) seq: u64,
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.iv.zeroize();
    }
}

/// Which way a [`Keys`] protects records, as the server sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    /// What the client sends (its keys: the client traffic secret's).
    Receive,
    /// What the server sends.
    Send,
}

impl Keys {
    pub(crate) fn from_parts(
        algorithm: &'static aead::Algorithm,
        key: &[u8],
        iv: [u8; NONCE_LEN],
        seq: u64,
    ) -> Result<Keys, RecordError> {
        Ok(Keys {
            expanded: Some(expand(algorithm, key)?),
            iv,
            seq,
        })
    }

    /// The expanded key, rebuilt from `source` (the connection's, for `direction`) if it was
    /// shed.
    #[inline]
    pub(crate) fn key(
        &mut self,
        algorithm: &'static aead::Algorithm,
        source: &KeySource,
        direction: Direction,
    ) -> Result<&LessSafeKey, RecordError> {
        match self.expanded {
            Some(ref key) => Ok(key),
            None => self.rebuild(algorithm, source, direction),
        }
    }

    #[cold]
    fn rebuild(
        &mut self,
        algorithm: &'static aead::Algorithm,
        source: &KeySource,
        direction: Direction,
    ) -> Result<&LessSafeKey, RecordError> {
        let mut raw = [0u8; MAX_KEY_LEN];
        let key = raw
            .get_mut(..algorithm.key_len())
            .ok_or(RecordError::UnsupportedCipher)?;
        let expanded = source
            .key(direction, key)
            .and_then(|()| expand(algorithm, key));
        raw.zeroize();
        Ok(self.expanded.insert(expanded?))
    }

    /// Frees the expanded key (aws-lc wipes it); the next record rebuilds it.
    pub(crate) fn shed(&mut self) {
        self.expanded = None;
    }

    /// True while the expanded key is held.
    #[cfg(test)]
    pub(crate) fn expanded(&self) -> bool {
        self.expanded.is_some()
    }

    /// The per-record nonce of RFC 8446 5.3 (and of rustls's TLS 1.2 sealing): the base XOR the
    /// sequence number, right-aligned.
    pub(crate) fn xor_nonce(&self) -> [u8; NONCE_LEN] {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }
}

fn expand(algorithm: &'static aead::Algorithm, key: &[u8]) -> Result<LessSafeKey, RecordError> {
    let key = UnboundKey::new(algorithm, key).map_err(|_| RecordError::UnsupportedCipher)?;
    Ok(LessSafeKey::new(key))
}

/// Where a connection's keys are rebuilt from once shed ([`Keys::shed`]): TLS 1.3's traffic
/// secrets (the current generation's key is derived again; key updates are derived from them
/// too), TLS 1.2's keys themselves.
pub(crate) enum KeySource {
    /// The client's and the server's current application traffic secrets.
    Tls13(TrafficSecrets),
    /// The receiving and the sending key (the first `algorithm.key_len()` bytes of each).
    Tls12 {
        receive: [u8; MAX_KEY_LEN],
        send: [u8; MAX_KEY_LEN],
    },
}

impl Drop for KeySource {
    fn drop(&mut self) {
        if let KeySource::Tls12 { receive, send } = self {
            receive.zeroize();
            send.zeroize();
        }
    }
}

impl KeySource {
    /// TLS 1.2's keys, as rustls extracted them.
    pub(crate) fn tls12(receive: &[u8], send: &[u8]) -> Result<KeySource, RecordError> {
        let copy = |key: &[u8]| {
            let mut out = [0u8; MAX_KEY_LEN];
            out.get_mut(..key.len())
                .ok_or(RecordError::UnsupportedCipher)?
                .copy_from_slice(key);
            Ok(out)
        };
        Ok(KeySource::Tls12 {
            receive: copy(receive)?,
            send: copy(send)?,
        })
    }

    /// Writes `direction`'s current key into `out` (as long as the AEAD's key).
    fn key(&self, direction: Direction, out: &mut [u8]) -> Result<(), RecordError> {
        match (self, direction) {
            (KeySource::Tls13(secrets), Direction::Receive) => {
                secrets.client.expand_label(b"key", out)
            }
            (KeySource::Tls13(secrets), Direction::Send) => {
                secrets.server.expand_label(b"key", out)
            }
            (KeySource::Tls12 { receive: key, .. }, Direction::Receive)
            | (KeySource::Tls12 { send: key, .. }, Direction::Send) => {
                out.copy_from_slice(key.get(..out.len()).ok_or(RecordError::UnsupportedCipher)?);
                Ok(())
            }
        }
    }

    /// TLS 1.3's traffic secrets (TLS 1.2 has none: a key update cannot be derived).
    pub(crate) fn traffic_secrets(&mut self) -> Result<&mut TrafficSecrets, RecordError> {
        match self {
            KeySource::Tls13(secrets) => Ok(secrets),
            KeySource::Tls12 { .. } => Err(RecordError::KeyDerivation),
        }
    }
}

/// The AEAD, key and nonce base of rustls's extracted secrets for one direction.
pub(crate) fn split_extracted(
    secrets: &ConnectionTrafficSecrets,
) -> Result<(&'static aead::Algorithm, &[u8], [u8; NONCE_LEN]), RecordError> {
    let (algorithm, key, iv) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (&aead::CHACHA20_POLY1305, key, iv)
        }
        _ => return Err(RecordError::UnsupportedCipher),
    };
    let iv: [u8; NONCE_LEN] = iv
        .as_ref()
        .try_into()
        .map_err(|_| RecordError::UnsupportedCipher)?;
    Ok((algorithm, key.as_ref(), iv))
}

/// A TLS 1.3 application traffic secret: the next one, and its keys, are derived from it at a
/// key update (RFC 8446 7.1 and 7.2).
pub struct TrafficSecret {
    secret: [u8; TrafficSecret::MAX_LEN],
    /// 32 or 48.
    len: u8,
}

impl Drop for TrafficSecret {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl TrafficSecret {
    /// Long enough for SHA-384, the longest hash of a TLS 1.3 suite.
    const MAX_LEN: usize = 48;

    /// The secret as rustls reports it; its length names the suite's hash (32: SHA-256,
    /// 48: SHA-384).
    pub fn new(secret: &[u8]) -> Option<TrafficSecret> {
        if secret.len() != 32 && secret.len() != Self::MAX_LEN {
            return None;
        }
        let mut copy = [0u8; Self::MAX_LEN];
        copy[..secret.len()].copy_from_slice(secret);
        Some(TrafficSecret {
            secret: copy,
            len: secret.len() as u8,
        })
    }

    /// HKDF-Expand-Label(secret, label, "", out.len()).
    fn expand_label(&self, label: &[u8], out: &mut [u8]) -> Result<(), RecordError> {
        struct Len(usize);
        impl hkdf::KeyType for Len {
            fn len(&self) -> usize {
                self.0
            }
        }
        let len = usize::from(self.len);
        let algorithm = if len == Self::MAX_LEN {
            hkdf::HKDF_SHA384
        } else {
            hkdf::HKDF_SHA256
        };
        let prk = hkdf::Prk::new_less_safe(algorithm, &self.secret[..len]);
        // struct { uint16 length; opaque label<7..255> = "tls13 " + label; opaque context<0..255> }
        let length = (out.len() as u16).to_be_bytes();
        let label_len = [(b"tls13 ".len() + label.len()) as u8];
        let info: [&[u8]; 5] = [&length, &label_len, b"tls13 ", label, &[0]];
        prk.expand(&info, Len(out.len()))
            .and_then(|okm| okm.fill(out))
            .map_err(|_| RecordError::KeyDerivation)
    }

    /// The key and nonce base of this generation (RFC 8446 7.3), for `algorithm`, starting
    /// at sequence number 0.
    pub(crate) fn keys(&self, algorithm: &'static aead::Algorithm) -> Result<Keys, RecordError> {
        let mut key = [0u8; MAX_KEY_LEN];
        let key = &mut key[..algorithm.key_len()];
        let mut iv = [0u8; NONCE_LEN];
        let derived = self
            .expand_label(b"key", key)
            .and_then(|()| self.expand_label(b"iv", &mut iv));
        let keys = derived.and_then(|()| Keys::from_parts(algorithm, key, iv, 0));
        key.zeroize();
        iv.zeroize();
        keys
    }

    /// True if `key` and `iv` are this generation's.
    pub(crate) fn derives(
        &self,
        algorithm: &'static aead::Algorithm,
        key: &[u8],
        iv: &[u8; NONCE_LEN],
    ) -> Result<bool, RecordError> {
        use subtle::ConstantTimeEq;
        let mut ours = [0u8; MAX_KEY_LEN];
        let ours = &mut ours[..algorithm.key_len()];
        let mut our_iv = [0u8; NONCE_LEN];
        let derived = self
            .expand_label(b"key", ours)
            .and_then(|()| self.expand_label(b"iv", &mut our_iv));
        let same = bool::from(ours.ct_eq(key) & our_iv.ct_eq(iv));
        ours.zeroize();
        our_iv.zeroize();
        derived.map(|()| same)
    }

    /// Moves to the next generation of this secret; returns its keys for `algorithm`.
    pub(crate) fn update(
        &mut self,
        algorithm: &'static aead::Algorithm,
    ) -> Result<Keys, RecordError> {
        let mut next = [0u8; Self::MAX_LEN];
        let expanded = self.expand_label(b"traffic upd", &mut next[..usize::from(self.len)]);
        if expanded.is_ok() {
            self.secret.copy_from_slice(&next);
        }
        next.zeroize();
        expanded?;
        self.keys(algorithm)
    }
}

impl std::fmt::Debug for TrafficSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrafficSecret(..)")
    }
}

/// The client's and the server's TLS 1.3 application traffic secrets.
#[derive(Debug)]
pub struct TrafficSecrets {
    /// client_application_traffic_secret_N: the secret of what the record layer receives.
    pub client: TrafficSecret,
    /// server_application_traffic_secret_N: the secret of what the record layer sends.
    pub server: TrafficSecret,
}
