//! TLS records after the handshake: record protection in place in the caller's buffers.
//!
//! rustls runs the handshake; then its kernel-connection API hands over the keys and sequence
//! numbers (the interface kTLS uses), and each record is opened and sealed here, in place, with
//! aws-lc-rs's AEADs: a session keeps no TLS buffers of its own and allocates nothing per
//! record. Record formats follow RFC 8446 section 5 (TLS 1.3) and RFC 5288 / RFC 7905 (TLS 1.2
//! AES-GCM, ChaCha20-Poly1305).
//!
//! TLS 1.3 key updates (RFC 8446 7.2) are derived here too, from the application traffic
//! secrets rustls reports through its key log: keeping rustls's kernel connection for them
//! would cost every session about 800 bytes.
//!
//! Alerts other than close_notify and every handshake message but a TLS 1.3 KeyUpdate end the
//! connection (TLS 1.2 renegotiation is refused by closing, which clients treat as a refusal).

use std::ops::Range;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use aws_lc_rs::hkdf;
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion, SupportedCipherSuite};

/// Bytes of a record header: content type, legacy version, length.
pub const HEADER_LEN: usize = 5;
/// Largest plaintext a record carries (2^14).
pub const MAX_PLAINTEXT: usize = 0x4000;
/// Largest record a peer may send: TLS 1.2 allows 2048 bytes of expansion (TLS 1.3: 256).
pub const MAX_RECORD_LEN: usize = HEADER_LEN + MAX_PLAINTEXT + 2048;
/// Room to leave after a plaintext for [`RecordLayer::seal`]: TLS 1.3's content type and a tag.
pub const MAX_SEAL_TRAILER: usize = 1 + TAG_LEN;
/// Room to leave before a plaintext for [`RecordLayer::seal`]: header and TLS 1.2's explicit nonce.
pub const MAX_SEAL_HEADER: usize = HEADER_LEN + GCM_EXPLICIT_NONCE_LEN;
/// Room a close_notify or KeyUpdate record needs.
pub const CONTROL_RECORD_ROOM: usize = 64;

const TAG_LEN: usize = 16;
const GCM_EXPLICIT_NONCE_LEN: usize = 8;
const MAX_CIPHERTEXT_TLS13: usize = MAX_PLAINTEXT + 256;
const MAX_CIPHERTEXT_TLS12: usize = MAX_PLAINTEXT + 2048;
const LEGACY_VERSION: [u8; 2] = [0x03, 0x03];

const CONTENT_ALERT: u8 = 0x15;
const CONTENT_HANDSHAKE: u8 = 0x16;
const CONTENT_APPLICATION_DATA: u8 = 0x17;

const ALERT_CLOSE_NOTIFY: u8 = 0;
const ALERT_USER_CANCELED: u8 = 90;
const ALERT_LEVEL_WARNING: u8 = 1;

const HANDSHAKE_KEY_UPDATE: u8 = 24;
const KEY_UPDATE_NOT_REQUESTED: u8 = 0;
const KEY_UPDATE_REQUESTED: u8 = 1;
/// A KeyUpdate message: handshake header (type, 24-bit length 1) and the request byte.
const KEY_UPDATE_LEN: usize = 5;

/// Records sent before the confidentiality limit at which a TLS 1.3 session rekeys.
pub(crate) const REKEY_MARGIN: u64 = 1 << 16;

/// Why a record could not be processed. Each ends the connection; none reaches the client as
/// an ErrorResponse (the TLS layer has no way to carry one once records are broken).
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The record header is not a TLS record of the negotiated version.
    #[error("malformed record header")]
    BadHeader,
    /// The record is longer than the protocol allows.
    #[error("record overflow")]
    Overflow,
    /// Authentication of the record failed (bad_record_mac).
    #[error("record failed to decrypt")]
    Decrypt,
    /// A record the protocol does not allow here.
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
    /// The peer sent a fatal alert.
    #[error("peer sent alert {0}")]
    Alert(u8),
    /// The sequence number or the cipher's confidentiality limit ran out.
    #[error("record sequence exhausted")]
    Exhausted,
    /// A TLS 1.3 key update was needed without the traffic secrets to derive it.
    #[error("key update without traffic secrets")]
    KeyUpdate,
    /// rustls negotiated a cipher this layer does not implement.
    #[error("unsupported traffic secrets")]
    UnsupportedCipher,
}

/// What an opened record held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// Application data, at this range of the record buffer (possibly empty).
    Data(Range<usize>),
    /// The peer sent close_notify: no more data follows.
    Closed,
    /// A record that carried no data for the application (a KeyUpdate, a warning alert).
    Nothing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    Tls12,
    Tls13,
}

/// One direction's AEAD key, nonce base and sequence number.
struct Keys {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Keys {
    fn new(
        seq: u64,
        secrets: ConnectionTrafficSecrets,
    ) -> Result<(Keys, &'static aead::Algorithm), RecordError> {
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
        Ok((
            Keys::from_parts(algorithm, key.as_ref(), iv, seq)?,
            algorithm,
        ))
    }

    fn from_parts(
        algorithm: &'static aead::Algorithm,
        key: &[u8],
        iv: [u8; NONCE_LEN],
        seq: u64,
    ) -> Result<Keys, RecordError> {
        let key = UnboundKey::new(algorithm, key).map_err(|_| RecordError::UnsupportedCipher)?;
        Ok(Keys {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The per-record nonce of RFC 8446 5.3 (and of rustls's TLS 1.2 sealing): the base XOR the
    /// sequence number, right-aligned.
    fn xor_nonce(&self) -> [u8; NONCE_LEN] {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }

    fn next_seq(&mut self) -> Result<u64, RecordError> {
        let seq = self.seq;
        self.seq = seq.checked_add(1).ok_or(RecordError::Exhausted)?;
        Ok(seq)
    }
}

/// The additional data of a TLS 1.2 record: sequence number, type, version, plaintext length.
fn tls12_aad(seq: u64, content_type: u8, len: usize) -> [u8; 13] {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = content_type;
    aad[9..11].copy_from_slice(&LEGACY_VERSION);
    aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
    aad
}

/// A TLS 1.3 application traffic secret: the next one, and its keys, are derived from it at a
/// key update (RFC 8446 7.1 and 7.2).
pub struct TrafficSecret {
    secret: [u8; TrafficSecret::MAX_LEN],
    len: usize,
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
            len: secret.len(),
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
        let algorithm = if self.len == Self::MAX_LEN {
            hkdf::HKDF_SHA384
        } else {
            hkdf::HKDF_SHA256
        };
        let prk = hkdf::Prk::new_less_safe(algorithm, &self.secret[..self.len]);
        // struct { uint16 length; opaque label<7..255> = "tls13 " + label; opaque context<0..255> }
        let length = (out.len() as u16).to_be_bytes();
        let label_len = [(b"tls13 ".len() + label.len()) as u8];
        let info: [&[u8]; 5] = [&length, &label_len, b"tls13 ", label, &[0]];
        prk.expand(&info, Len(out.len()))
            .and_then(|okm| okm.fill(out))
            .map_err(|_| RecordError::KeyUpdate)
    }

    /// Moves to the next generation of this secret; returns its keys for `algorithm`.
    fn update(&mut self, algorithm: &'static aead::Algorithm) -> Result<Keys, RecordError> {
        let mut next = [0u8; Self::MAX_LEN];
        self.expand_label(b"traffic upd", &mut next[..self.len])?;
        self.secret = next;
        let mut key = [0u8; 32];
        let key = &mut key[..algorithm.key_len()];
        self.expand_label(b"key", key)?;
        let mut iv = [0u8; NONCE_LEN];
        self.expand_label(b"iv", &mut iv)?;
        Keys::from_parts(algorithm, key, iv, 0)
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
    /// client_application_traffic_secret_0.
    pub client: TrafficSecret,
    /// server_application_traffic_secret_0.
    pub server: TrafficSecret,
}

fn write_header(buf: &mut [u8], content_type: u8, len: usize) {
    buf[0] = content_type;
    buf[1..3].copy_from_slice(&LEGACY_VERSION);
    buf[3..5].copy_from_slice(&(len as u16).to_be_bytes());
}

/// Record protection for one established connection, both directions.
pub struct RecordLayer {
    version: Version,
    /// TLS 1.2 AES-GCM carries an explicit nonce in every record.
    explicit_nonce: bool,
    rx: Keys,
    tx: Keys,
    /// Sent records allowed under one key (the cipher's confidentiality limit).
    tx_limit: u64,
    /// The peer asked us to update our sending key (KeyUpdate with update_requested).
    key_update_requested: bool,
    /// The AEAD of both directions.
    algorithm: &'static aead::Algorithm,
    /// TLS 1.3 only: where key updates are derived from.
    secrets: Option<Box<TrafficSecrets>>,
}

impl std::fmt::Debug for RecordLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordLayer")
            .field("version", &self.version)
            .field("rx_seq", &self.rx.seq)
            .field("tx_seq", &self.tx.seq)
            .finish_non_exhaustive()
    }
}

impl RecordLayer {
    /// Takes over from rustls after the handshake: the keys rustls extracted, the version and
    /// suite it negotiated, and (TLS 1.3) the traffic secrets from its key log.
    pub fn new(
        keys: ExtractedSecrets,
        version: ProtocolVersion,
        suite: SupportedCipherSuite,
        secrets: Option<TrafficSecrets>,
    ) -> Result<RecordLayer, RecordError> {
        let version = match version {
            ProtocolVersion::TLSv1_3 => Version::Tls13,
            ProtocolVersion::TLSv1_2 => Version::Tls12,
            _ => return Err(RecordError::UnsupportedCipher),
        };
        let tx_limit = match suite {
            SupportedCipherSuite::Tls13(suite) => suite.common.confidentiality_limit,
            SupportedCipherSuite::Tls12(suite) => suite.common.confidentiality_limit,
        };
        let secrets = match version {
            Version::Tls13 => Some(Box::new(secrets.ok_or(RecordError::KeyUpdate)?)),
            Version::Tls12 => None,
        };
        let (rx, algorithm) = Keys::new(keys.rx.0, keys.rx.1)?;
        let (tx, _) = Keys::new(keys.tx.0, keys.tx.1)?;
        let chacha = std::ptr::eq(algorithm, &aead::CHACHA20_POLY1305);
        Ok(RecordLayer {
            version,
            explicit_nonce: version == Version::Tls12 && !chacha,
            rx,
            tx,
            tx_limit,
            key_update_requested: false,
            algorithm,
            secrets,
        })
    }

    /// The length of the whole record at the start of `buf`, or `None` if it has not all
    /// arrived yet.
    pub fn record_len(&self, buf: &[u8]) -> Result<Option<usize>, RecordError> {
        let Some(header) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let max = match self.version {
            Version::Tls13 => MAX_CIPHERTEXT_TLS13,
            Version::Tls12 => MAX_CIPHERTEXT_TLS12,
        };
        if header[1] != LEGACY_VERSION[0] {
            return Err(RecordError::BadHeader);
        }
        if len > max {
            return Err(RecordError::Overflow);
        }
        let total = HEADER_LEN + len;
        Ok((buf.len() >= total).then_some(total))
    }

    /// Opens the one whole record `record` (as measured by [`RecordLayer::record_len`]) in place.
    pub fn open(&mut self, record: &mut [u8]) -> Result<Opened, RecordError> {
        if record.len() < HEADER_LEN {
            return Err(RecordError::BadHeader);
        }
        let (header, body) = record.split_at_mut(HEADER_LEN);
        let outer_type = header[0];
        let (content_type, content) = match self.version {
            Version::Tls13 => {
                if outer_type != CONTENT_APPLICATION_DATA {
                    return Err(RecordError::Unexpected(
                        "unprotected record after handshake",
                    ));
                }
                if body.len() < TAG_LEN + 1 {
                    return Err(RecordError::Decrypt);
                }
                let nonce = Nonce::assume_unique_for_key(self.rx.xor_nonce());
                let aad = Aad::from(
                    <[u8; HEADER_LEN]>::try_from(&*header).map_err(|_| RecordError::BadHeader)?,
                );
                let plain = self
                    .rx
                    .key
                    .open_in_place(nonce, aad, body)
                    .map_err(|_| RecordError::Decrypt)?;
                self.rx.next_seq()?;
                // The inner plaintext ends in the real content type, then zero padding.
                let Some(type_at) = plain.iter().rposition(|&b| b != 0) else {
                    return Err(RecordError::Unexpected("record without a content type"));
                };
                if type_at > MAX_PLAINTEXT {
                    return Err(RecordError::Overflow);
                }
                (plain[type_at], HEADER_LEN..HEADER_LEN + type_at)
            }
            Version::Tls12 => {
                let explicit = if self.explicit_nonce {
                    GCM_EXPLICIT_NONCE_LEN
                } else {
                    0
                };
                if body.len() < explicit + TAG_LEN {
                    return Err(RecordError::Decrypt);
                }
                let plain_len = body.len() - explicit - TAG_LEN;
                if plain_len > MAX_PLAINTEXT {
                    return Err(RecordError::Overflow);
                }
                let nonce = if self.explicit_nonce {
                    let mut nonce = [0u8; NONCE_LEN];
                    nonce[..4].copy_from_slice(&self.rx.iv[..4]);
                    nonce[4..].copy_from_slice(&body[..GCM_EXPLICIT_NONCE_LEN]);
                    nonce
                } else {
                    self.rx.xor_nonce()
                };
                let aad = Aad::from(tls12_aad(self.rx.seq, outer_type, plain_len));
                self.rx
                    .key
                    .open_in_place(
                        Nonce::assume_unique_for_key(nonce),
                        aad,
                        &mut body[explicit..],
                    )
                    .map_err(|_| RecordError::Decrypt)?;
                self.rx.next_seq()?;
                let start = HEADER_LEN + explicit;
                (outer_type, start..start + plain_len)
            }
        };
        match content_type {
            CONTENT_APPLICATION_DATA => Ok(Opened::Data(content)),
            CONTENT_ALERT => self.alert(&record[content]),
            CONTENT_HANDSHAKE if self.version == Version::Tls13 => self.handshake(&record[content]),
            CONTENT_HANDSHAKE => Err(RecordError::Unexpected("renegotiation is not supported")),
            _ => Err(RecordError::Unexpected("unknown content type")),
        }
    }

    fn alert(&self, alert: &[u8]) -> Result<Opened, RecordError> {
        let &[level, description] = alert else {
            return Err(RecordError::Unexpected("malformed alert"));
        };
        match description {
            ALERT_CLOSE_NOTIFY => Ok(Opened::Closed),
            ALERT_USER_CANCELED => Ok(Opened::Nothing),
            // TLS 1.2 warnings may be ignored; in TLS 1.3 every other alert is fatal.
            _ if self.version == Version::Tls12 && level == ALERT_LEVEL_WARNING => {
                Ok(Opened::Nothing)
            }
            _ => Err(RecordError::Alert(description)),
        }
    }

    /// Post-handshake messages: only KeyUpdate, whole, and last in its record.
    fn handshake(&mut self, messages: &[u8]) -> Result<Opened, RecordError> {
        match *messages {
            [HANDSHAKE_KEY_UPDATE, 0, 0, 1, request]
                if request == KEY_UPDATE_NOT_REQUESTED || request == KEY_UPDATE_REQUESTED =>
            {
                let secrets = self.secrets.as_mut().ok_or(RecordError::KeyUpdate)?;
                self.rx = secrets.client.update(self.algorithm)?;
                self.key_update_requested |= request == KEY_UPDATE_REQUESTED;
                Ok(Opened::Nothing)
            }
            _ => Err(RecordError::Unexpected(
                "post-handshake message other than KeyUpdate",
            )),
        }
    }

    /// Lowers the confidentiality limit, so tests can reach it.
    #[cfg(test)]
    pub fn set_tx_limit(&mut self, limit: u64) {
        self.tx_limit = limit;
    }

    /// Bytes [`RecordLayer::seal`] needs before the plaintext.
    pub fn seal_header_len(&self) -> usize {
        if self.explicit_nonce {
            HEADER_LEN + GCM_EXPLICIT_NONCE_LEN
        } else {
            HEADER_LEN
        }
    }

    /// Bytes [`RecordLayer::seal`] needs after the plaintext.
    pub fn seal_trailer_len(&self) -> usize {
        match self.version {
            Version::Tls13 => 1 + TAG_LEN,
            Version::Tls12 => TAG_LEN,
        }
    }

    /// Length of the record [`RecordLayer::seal_key_update`] writes (0: TLS 1.2 has none).
    pub fn key_update_record_len(&self) -> usize {
        match self.version {
            Version::Tls13 => self.seal_header_len() + KEY_UPDATE_LEN + self.seal_trailer_len(),
            Version::Tls12 => 0,
        }
    }

    /// True if a KeyUpdate must go out before the next record: the peer asked for one, or our
    /// key nears its confidentiality limit. Call [`RecordLayer::seal_key_update`] then.
    pub fn key_update_due(&self) -> bool {
        self.version == Version::Tls13
            && (self.key_update_requested
                || self.tx.seq >= self.tx_limit.saturating_sub(REKEY_MARGIN))
    }

    /// Seals application data in place: `buf[seal_header_len()..][..len]` is the plaintext
    /// (at most [`MAX_PLAINTEXT`]), and `buf` has [`RecordLayer::seal_trailer_len`] bytes of room
    /// after it. Writes the header and trailer; returns the record's length.
    pub fn seal(&mut self, buf: &mut [u8], len: usize) -> Result<usize, RecordError> {
        self.seal_record(buf, CONTENT_APPLICATION_DATA, len)
    }

    /// Writes a close_notify alert record at the start of `buf` (at least
    /// [`CONTROL_RECORD_ROOM`] bytes); returns its length.
    pub fn seal_close_notify(&mut self, buf: &mut [u8]) -> Result<usize, RecordError> {
        let at = self.seal_header_len();
        buf[at..at + 2].copy_from_slice(&[ALERT_LEVEL_WARNING, ALERT_CLOSE_NOTIFY]);
        self.seal_record(buf, CONTENT_ALERT, 2)
    }

    /// Writes a KeyUpdate record (update_not_requested) at the start of `buf` (at least
    /// [`RecordLayer::key_update_record_len`] bytes) under the current key, then switches to the
    /// next one; returns the record's length.
    pub fn seal_key_update(&mut self, buf: &mut [u8]) -> Result<usize, RecordError> {
        let at = self.seal_header_len();
        buf[at..at + KEY_UPDATE_LEN].copy_from_slice(&[
            HANDSHAKE_KEY_UPDATE,
            0,
            0,
            1,
            KEY_UPDATE_NOT_REQUESTED,
        ]);
        let len = self.seal_record(buf, CONTENT_HANDSHAKE, KEY_UPDATE_LEN)?;
        let secrets = self.secrets.as_mut().ok_or(RecordError::KeyUpdate)?;
        self.tx = secrets.server.update(self.algorithm)?;
        self.key_update_requested = false;
        Ok(len)
    }

    fn seal_record(
        &mut self,
        buf: &mut [u8],
        content_type: u8,
        len: usize,
    ) -> Result<usize, RecordError> {
        debug_assert!(len <= MAX_PLAINTEXT);
        if self.tx.seq >= self.tx_limit {
            return Err(RecordError::Exhausted);
        }
        let header_len = self.seal_header_len();
        let total = header_len + len + self.seal_trailer_len();
        let seq = self.tx.seq;
        let nonce = self.tx.xor_nonce();
        let (header, rest) = buf[..total].split_at_mut(HEADER_LEN);
        // The additional data, and where the plaintext (then the tag) lies in `rest`.
        let mut aad = [0u8; 13];
        let (aad, plain) = match self.version {
            Version::Tls13 => {
                rest[len] = content_type;
                write_header(header, CONTENT_APPLICATION_DATA, len + 1 + TAG_LEN);
                aad[..HEADER_LEN].copy_from_slice(header);
                (&aad[..HEADER_LEN], 0..len + 1)
            }
            Version::Tls12 => {
                let explicit = header_len - HEADER_LEN;
                write_header(header, content_type, total - HEADER_LEN);
                // The explicit nonce (AES-GCM) is the last 8 bytes of the per-record nonce.
                rest[..explicit].copy_from_slice(&nonce[NONCE_LEN - explicit..]);
                aad = tls12_aad(seq, content_type, len);
                (&aad[..], explicit..explicit + len)
            }
        };
        let (plain, tag_space) = rest[plain.start..].split_at_mut(plain.len());
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), plain)
            .map_err(|_| RecordError::Exhausted)?;
        tag_space.copy_from_slice(tag.as_ref());
        self.tx.next_seq()?;
        Ok(total)
    }
}
