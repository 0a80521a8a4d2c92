//! TLS records after the handshake: record protection in place in the caller's buffers.
//!
//! rustls runs the handshake; then its kernel-connection API hands over the keys and sequence
//! numbers (the interface kTLS uses), and each record is opened and sealed here, in place, with
//! aws-lc-rs's AEADs: a session keeps no TLS buffers of its own and allocates nothing per
//! record. Record formats follow RFC 8446 section 5 (TLS 1.3) and RFC 5288 / RFC 7905 (TLS 1.2
//! AES-GCM, ChaCha20-Poly1305).
//!
//! This layer is exactly as strict as rustls's own `ServerConnection` is after its handshake
//! (rustls 0.23.46; `tls::differential` checks it against rustls record by record): the same
//! record headers are refused, the same additional data authenticated, the same messages
//! accepted (`tls::inbound`), the same alert sent for each failure
//! ([`RecordError::alert`]), and the same limits kept on what a peer may repeat.
//!
//! TLS 1.3 key updates (RFC 8446 7.2) are derived here from the application traffic secrets
//! rustls reports through its key log; [`super::ServerHandshake`] checks that they derive the
//! very keys rustls handed over, so both sides of every key update start from the same step.

use std::ops::Range;

use aws_lc_rs::aead::{self, Aad, Nonce, NONCE_LEN};
use rustls::{AlertDescription, ExtractedSecrets, ProtocolVersion, SupportedCipherSuite};

use super::inbound::Inbound;
use super::keys::Keys;
pub use super::keys::{TrafficSecret, TrafficSecrets};

/// Bytes of a record header: content type, legacy version, length.
pub const HEADER_LEN: usize = 5;
/// Largest plaintext a record carries (2^14).
pub const MAX_PLAINTEXT: usize = 0x4000;
/// rustls's deframer refuses a record whose header announces this many bytes or more
/// (2^14 + 2048, for either version: a TLS 1.3 record of more than 2^14 + 256 bytes is refused
/// only once it is known to decrypt).
const RECORD_PAYLOAD_LIMIT: usize = MAX_PLAINTEXT + 2048;
/// Largest record a peer may send.
pub const MAX_RECORD_LEN: usize = HEADER_LEN + RECORD_PAYLOAD_LIMIT - 1;
/// Room to leave after a plaintext for [`RecordLayer::seal`]: TLS 1.3's content type and a tag.
pub const MAX_SEAL_TRAILER: usize = 1 + TAG_LEN;
/// Room to leave before a plaintext for [`RecordLayer::seal`]: header and TLS 1.2's explicit nonce.
pub const MAX_SEAL_HEADER: usize = HEADER_LEN + GCM_EXPLICIT_NONCE_LEN;
/// Room the control records [`RecordLayer::seal_control`] and the alerts need.
pub const CONTROL_RECORD_ROOM: usize = 64;

pub(crate) const TAG_LEN: usize = 16;
const GCM_EXPLICIT_NONCE_LEN: usize = 8;
/// The legacy record version every record we send carries (TLS 1.2).
const LEGACY_VERSION: [u8; 2] = [0x03, 0x03];

pub(crate) const CONTENT_CHANGE_CIPHER_SPEC: u8 = 0x14;
pub(crate) const CONTENT_ALERT: u8 = 0x15;
pub(crate) const CONTENT_HANDSHAKE: u8 = 0x16;
pub(crate) const CONTENT_APPLICATION_DATA: u8 = 0x17;
/// Heartbeat: the last content type rustls's deframer lets through (and then refuses).
const CONTENT_HEARTBEAT: u8 = 0x18;

pub(crate) const ALERT_LEVEL_WARNING: u8 = 1;
pub(crate) const ALERT_LEVEL_FATAL: u8 = 2;
const ALERT_CLOSE_NOTIFY: u8 = 0;
const ALERT_NO_RENEGOTIATION: u8 = 100;

pub(crate) const HANDSHAKE_KEY_UPDATE: u8 = 24;
pub(crate) const KEY_UPDATE_NOT_REQUESTED: u8 = 0;
pub(crate) const KEY_UPDATE_REQUESTED: u8 = 1;
/// A KeyUpdate message: handshake header (type, 24-bit length 1) and the request byte.
const KEY_UPDATE_LEN: usize = 5;

/// rustls's soft limit on a key's sequence numbers: it seals nothing but alerts beyond it.
const SEQ_SOFT_LIMIT: u64 = 0xffff_ffff_ffff_0000;
/// rustls's hard limit: nothing is sealed at or beyond it, not even an alert.
const SEQ_HARD_LIMIT: u64 = 0xffff_ffff_ffff_fffe;
/// TLS 1.2 cannot rekey: application data stops this many records before the confidentiality
/// limit, so that a FATAL ErrorResponse and a close_notify can still be sealed
/// ([`RecordLayer::seal_final`], [`RecordLayer::seal_close_notify`]).
pub(crate) const TLS12_FINAL_RECORDS: u64 = 2;

/// Why a record could not be processed, or could not be sealed. Each ends the connection;
/// [`RecordError::alert`] is the alert rustls sends for it (`super::fatal_alert_into` seals it).
/// None reaches the client as an ErrorResponse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// A record header rustls's deframer refuses: an unknown content type, a version other
    /// than 3.x, an empty record other than application data, or a length of 2^14 + 2048 or
    /// more (decode_error).
    #[error("malformed record header: {0}")]
    BadHeader(&'static str),
    /// The record does not authenticate under the current key and sequence number
    /// (bad_record_mac).
    #[error("record failed to decrypt")]
    Decrypt,
    /// The plaintext is longer than 2^14 bytes, or a TLS 1.3 inner plaintext longer than
    /// 2^14 + 1 bytes with its padding (record_overflow).
    #[error("record overflow")]
    Overflow,
    /// A TLS 1.3 inner plaintext of zeros only: no content type (rustls sends no alert).
    #[error("record without a content type")]
    NoContentType,
    /// A message that does not decode: an alert that is not two bytes, a change_cipher_spec
    /// other than `1`, a content type rustls does not know (decode_error).
    #[error("malformed message: {0}")]
    Decode(&'static str),
    /// rustls's parser refused a handshake message; the alert it maps the error to
    /// (decode_error, illegal_parameter or unsupported_extension).
    #[error("malformed handshake message (type {typ})")]
    HandshakeDecode {
        /// The handshake message type.
        typ: u8,
        /// The alert rustls sends.
        alert: AlertDescription,
    },
    /// A message the connection does not allow here: any handshake message but a TLS 1.3
    /// KeyUpdate or a TLS 1.2 ClientHello, a KeyUpdate with more handshake data after it in
    /// its record, change_cipher_spec after the handshake (unexpected_message).
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
    /// A handshake message spanning several records whose type leaves rustls's answer to its
    /// contents (a ClientHello, a Certificate, ...), which this layer does not keep. Treated as
    /// unexpected_message, where rustls may answer decode_error (or, for a well-formed TLS 1.2
    /// ClientHello, refuse the renegotiation with a warning and go on).
    #[error("unexpected handshake message (type {0}) spanning records")]
    UnparsedHandshake(u8),
    /// An alert whose level is neither warning nor fatal (illegal_parameter).
    #[error("alert with level {0}")]
    AlertLevel(u8),
    /// A TLS 1.3 warning alert other than close_notify and user_canceled (decode_error).
    #[error("TLS 1.3 warning alert {0}")]
    WarningAlert(u8),
    /// A KeyUpdate whose request is neither 0 nor 1 (illegal_parameter).
    #[error("KeyUpdate request {0}")]
    KeyUpdateRequest(u8),
    /// The peer sent a fatal alert (no alert is sent back).
    #[error("peer sent alert {0}")]
    Alert(u8),
    /// A record that is not a handshake message arrived while a handshake message was split
    /// across records (no alert).
    #[error("record interleaved with a split handshake message")]
    Interleaved,
    /// A handshake message announcing more than 64 KiB (no alert).
    #[error("handshake message too large")]
    HandshakeTooLarge,
    /// A handshake message split across records took more than rustls's 64 KiB of buffer
    /// (no alert).
    #[error("split handshake message exceeds 64 KiB of records")]
    HandshakeBufferFull,
    /// More than 32 empty records in a row (no alert).
    #[error("too many empty records")]
    TooManyEmptyRecords,
    /// More than 4 warning alerts on one connection (no alert).
    #[error("too many warning alerts")]
    TooManyWarnings,
    /// More than 32 KeyUpdates without application data between them (no alert).
    #[error("too many key updates")]
    TooManyKeyUpdates,
    /// A second TLS 1.2 renegotiation attempt (no alert; the first got no_renegotiation).
    #[error("too many renegotiation requests")]
    TooManyRenegotiations,
    /// A sequence number or the cipher's confidentiality limit ran out. When sealing TLS 1.2
    /// data this is rustls's soft limit, where it sends close_notify.
    #[error("record sequence exhausted")]
    Exhausted,
    /// A TLS 1.3 key could not be derived (cannot happen for the supported hashes).
    #[error("key derivation failed")]
    KeyDerivation,
    /// rustls negotiated a cipher this layer does not implement.
    #[error("unsupported traffic secrets")]
    UnsupportedCipher,
}

impl RecordError {
    /// The alert rustls sends when it fails this way (none: it closes without one).
    pub fn alert(&self) -> Option<AlertDescription> {
        use AlertDescription as A;
        Some(match self {
            RecordError::BadHeader(_) | RecordError::Decode(_) | RecordError::WarningAlert(_) => {
                A::DecodeError
            }
            RecordError::Decrypt => A::BadRecordMac,
            RecordError::Overflow => A::RecordOverflow,
            RecordError::HandshakeDecode { alert, .. } => *alert,
            RecordError::Unexpected(_) | RecordError::UnparsedHandshake(_) => A::UnexpectedMessage,
            RecordError::AlertLevel(_) | RecordError::KeyUpdateRequest(_) => A::IllegalParameter,
            RecordError::NoContentType
            | RecordError::Alert(_)
            | RecordError::Interleaved
            | RecordError::HandshakeTooLarge
            | RecordError::HandshakeBufferFull
            | RecordError::TooManyEmptyRecords
            | RecordError::TooManyWarnings
            | RecordError::TooManyKeyUpdates
            | RecordError::TooManyRenegotiations
            | RecordError::Exhausted
            | RecordError::KeyDerivation
            | RecordError::UnsupportedCipher => return None,
        })
    }
}

/// What an opened record held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// Application data, at this range of the record buffer (possibly empty).
    Data(Range<usize>),
    /// The peer sent close_notify: no more data follows, and no later record is opened.
    Closed,
    /// A record that carried no data for the application (a KeyUpdate, a warning alert).
    Nothing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Version {
    Tls12,
    Tls13,
}

/// The additional data of a TLS 1.2 record: sequence number, type, version, plaintext length.
fn tls12_aad(seq: u64, content_type: u8, version: [u8; 2], len: usize) -> [u8; 13] {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = content_type;
    aad[9..11].copy_from_slice(&version);
    aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
    aad
}

fn write_header(buf: &mut [u8], content_type: u8, len: usize) {
    buf[0] = content_type;
    buf[1..3].copy_from_slice(&LEGACY_VERSION);
    buf[3..5].copy_from_slice(&(len as u16).to_be_bytes());
}

/// The header checks of rustls's deframer (`read_opaque_message_header`), in its order and as
/// soon as it has the bytes for each: the content type from the first byte, the version from
/// the third, the length from the fifth. Returns the length once all five are there. Legacy
/// versions are not compared with the negotiated one: rustls takes any 3.x, and also the named
/// versions SSLv2 and DTLS (TLS 1.2 authenticates the version as sent).
pub(crate) fn check_header(header: &[u8]) -> Result<Option<usize>, RecordError> {
    let Some(&content_type) = header.first() else {
        return Ok(None);
    };
    if !(CONTENT_CHANGE_CIPHER_SPEC..=CONTENT_HEARTBEAT).contains(&content_type) {
        return Err(RecordError::BadHeader("unknown content type"));
    }
    let Some(&[major, minor]) = header.get(1..3) else {
        return Ok(None);
    };
    let version = u16::from_be_bytes([major, minor]);
    if major != 0x03 && !matches!(version, 0x0002 | 0xfeff | 0xfefd | 0xfefc) {
        return Err(RecordError::BadHeader("unknown protocol version"));
    }
    let Some(&[high, low]) = header.get(3..5) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([high, low]));
    if len == 0 && content_type != CONTENT_APPLICATION_DATA {
        return Err(RecordError::BadHeader("empty record"));
    }
    if len >= RECORD_PAYLOAD_LIMIT {
        return Err(RecordError::BadHeader("record too long"));
    }
    Ok(Some(len))
}

/// Record protection for one established connection, both directions.
pub struct RecordLayer {
    pub(super) version: Version,
    /// TLS 1.2 AES-GCM carries an explicit nonce in every record.
    explicit_nonce: bool,
    pub(super) rx: Keys,
    tx: Keys,
    /// Records one sending key may seal (rustls's soft limit, or the confidentiality limit of
    /// the cipher if lower).
    tx_limit: u64,
    /// The AEAD of both directions.
    pub(super) algorithm: &'static aead::Algorithm,
    /// TLS 1.3 only: where key updates are derived from.
    pub(super) secrets: Option<Box<TrafficSecrets>>,
    /// What the peer has sent so far that later records are checked against.
    pub(super) inbound: Inbound,
    /// Records owed to the peer before our next one.
    pub(super) owed: Owed,
    /// A close_notify or a fatal alert went out: rustls sends neither again.
    closure_sent: bool,
}

/// Control records the peer is owed, sealed before whatever we send next, as rustls queues
/// them: a KeyUpdate answering the peer's request (TLS 1.3), the warning no_renegotiation
/// answering a TLS 1.2 ClientHello.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Owed {
    pub(crate) key_update: bool,
    pub(crate) no_renegotiation: bool,
    /// Not owed but wanted: our own KeyUpdate ([`RecordLayer::refresh_traffic_keys`]).
    pub(crate) refresh: bool,
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
    /// suite it negotiated, and (TLS 1.3) the traffic secrets from its key log, which must be
    /// those the extracted keys were derived from (`ServerHandshake` checks that they are).
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
        let (rx, algorithm) = Keys::extracted(keys.rx.0, &keys.rx.1)?;
        let (tx, tx_algorithm) = Keys::extracted(keys.tx.0, &keys.tx.1)?;
        if algorithm != tx_algorithm {
            return Err(RecordError::UnsupportedCipher);
        }
        Self::from_keys(version, suite, algorithm, rx, tx, secrets)
    }

    /// A TLS 1.3 record layer whose keys are derived from `secrets` (generation as given), at
    /// sequence numbers 0.
    pub(crate) fn from_traffic_secrets(
        suite: SupportedCipherSuite,
        algorithm: &'static aead::Algorithm,
        secrets: TrafficSecrets,
    ) -> Result<RecordLayer, RecordError> {
        let rx = secrets.client.keys(algorithm)?;
        let tx = secrets.server.keys(algorithm)?;
        Self::from_keys(Version::Tls13, suite, algorithm, rx, tx, Some(secrets))
    }

    fn from_keys(
        version: Version,
        suite: SupportedCipherSuite,
        algorithm: &'static aead::Algorithm,
        rx: Keys,
        tx: Keys,
        secrets: Option<TrafficSecrets>,
    ) -> Result<RecordLayer, RecordError> {
        let confidentiality_limit = match suite {
            SupportedCipherSuite::Tls13(suite) => suite.common.confidentiality_limit,
            SupportedCipherSuite::Tls12(suite) => suite.common.confidentiality_limit,
        };
        let secrets = match version {
            Version::Tls13 => Some(Box::new(secrets.ok_or(RecordError::KeyDerivation)?)),
            Version::Tls12 => None,
        };
        // Compared by id: aws-lc-rs's algorithms are constants, with no one address.
        let chacha = *algorithm == aead::CHACHA20_POLY1305;
        Ok(RecordLayer {
            version,
            explicit_nonce: version == Version::Tls12 && !chacha,
            rx,
            tx,
            tx_limit: confidentiality_limit.min(SEQ_SOFT_LIMIT),
            algorithm,
            secrets,
            inbound: Inbound::default(),
            owed: Owed::default(),
            closure_sent: false,
        })
    }

    /// The negotiated protocol version.
    pub fn protocol_version(&self) -> ProtocolVersion {
        match self.version {
            Version::Tls12 => ProtocolVersion::TLSv1_2,
            Version::Tls13 => ProtocolVersion::TLSv1_3,
        }
    }

    /// True once the peer's close_notify has been opened: later records are not.
    pub fn peer_closed(&self) -> bool {
        self.inbound.closed
    }

    /// The length of the whole record at the start of `buf`, or `None` if it has not all
    /// arrived yet (or the peer has closed: nothing after its close_notify is read). Fails as
    /// soon as the header is known to be bad, as rustls does.
    pub fn record_len(&self, buf: &[u8]) -> Result<Option<usize>, RecordError> {
        if self.inbound.closed {
            return Ok(None);
        }
        // What rustls's buffer would hold of `buf`: a split handshake message keeps its records
        // in there, up to 64 KiB; beyond that, more bytes are an error rather than a wait.
        let visible = self.inbound.visible(buf.len());
        let total = check_header(&buf[..visible.min(HEADER_LEN)])?.map(|len| HEADER_LEN + len);
        match total {
            Some(total) if total <= visible => Ok(Some(total)),
            _ if buf.len() > visible => Err(RecordError::HandshakeBufferFull),
            _ => Ok(None),
        }
    }

    /// Opens the one whole record `record` (as measured by [`RecordLayer::record_len`]) in place.
    pub fn open(&mut self, record: &mut [u8]) -> Result<Opened, RecordError> {
        if self.inbound.closed {
            return Ok(Opened::Closed);
        }
        let Some(header) = record.get(..HEADER_LEN) else {
            return Err(RecordError::BadHeader("truncated record"));
        };
        let outer_type = header[0];
        let header_version = [header[1], header[2]];
        if check_header(header)?.map(|len| len + HEADER_LEN) != Some(record.len()) {
            return Err(RecordError::BadHeader("record length"));
        }
        // change_cipher_spec is never encrypted, except that rustls decrypts every record while
        // a split handshake message waits for its next fragment.
        let (content_type, content) =
            if outer_type == CONTENT_CHANGE_CIPHER_SPEC && !self.inbound.handshake_pending() {
                (outer_type, HEADER_LEN..record.len())
            } else {
                match self.version {
                    Version::Tls13 => self.open_tls13(record)?,
                    Version::Tls12 => self.open_tls12(outer_type, header_version, record)?,
                }
            };
        self.received(content_type, header_version, record, content)
    }

    fn open_tls13(&mut self, record: &mut [u8]) -> Result<(u8, Range<usize>), RecordError> {
        let body = &mut record[HEADER_LEN..];
        if body.len() < TAG_LEN {
            return Err(RecordError::Decrypt);
        }
        // rustls authenticates the header every TLS 1.3 record should have, not the one it
        // came with: the outer type and version are not checked beyond the deframer's rules.
        let len = (body.len() as u16).to_be_bytes();
        let aad = [CONTENT_APPLICATION_DATA, 0x03, 0x03, len[0], len[1]];
        let nonce = Nonce::assume_unique_for_key(self.rx.xor_nonce());
        let plain = self
            .rx
            .key
            .open_in_place(nonce, Aad::from(aad), body)
            .map_err(|_| RecordError::Decrypt)?;
        if plain.len() > MAX_PLAINTEXT + 1 {
            return Err(RecordError::Overflow);
        }
        // The inner plaintext ends in the real content type, then zero padding.
        let type_at = plain
            .iter()
            .rposition(|&b| b != 0)
            .ok_or(RecordError::NoContentType)?;
        let content_type = plain[type_at];
        if content_type == CONTENT_CHANGE_CIPHER_SPEC {
            return Err(RecordError::Unexpected("encrypted change_cipher_spec"));
        }
        if type_at > MAX_PLAINTEXT {
            return Err(RecordError::Overflow);
        }
        self.rx.seq = self.rx.seq.checked_add(1).ok_or(RecordError::Exhausted)?;
        Ok((content_type, HEADER_LEN..HEADER_LEN + type_at))
    }

    fn open_tls12(
        &mut self,
        outer_type: u8,
        header_version: [u8; 2],
        record: &mut [u8],
    ) -> Result<(u8, Range<usize>), RecordError> {
        let body = &mut record[HEADER_LEN..];
        let explicit = if self.explicit_nonce {
            GCM_EXPLICIT_NONCE_LEN
        } else {
            0
        };
        if body.len() < explicit + TAG_LEN {
            return Err(RecordError::Decrypt);
        }
        let plain_len = body.len() - explicit - TAG_LEN;
        let nonce = if self.explicit_nonce {
            let mut nonce = [0u8; NONCE_LEN];
            nonce[..4].copy_from_slice(&self.rx.iv[..4]);
            nonce[4..].copy_from_slice(&body[..GCM_EXPLICIT_NONCE_LEN]);
            nonce
        } else {
            self.rx.xor_nonce()
        };
        // TLS 1.2 authenticates the type and version the record came with.
        let aad = Aad::from(tls12_aad(
            self.rx.seq,
            outer_type,
            header_version,
            plain_len,
        ));
        self.rx
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                aad,
                &mut body[explicit..],
            )
            .map_err(|_| RecordError::Decrypt)?;
        if plain_len > MAX_PLAINTEXT {
            return Err(RecordError::Overflow);
        }
        self.rx.seq = self.rx.seq.checked_add(1).ok_or(RecordError::Exhausted)?;
        let start = HEADER_LEN + explicit;
        Ok((outer_type, start..start + plain_len))
    }

    /// Lowers the confidentiality limit, so tests can reach it.
    #[cfg(any(test, feature = "differential"))]
    pub fn set_tx_limit(&mut self, limit: u64) {
        self.tx_limit = limit;
    }

    /// The next sequence number of each direction: (receive, send).
    pub fn sequence_numbers(&self) -> (u64, u64) {
        (self.rx.seq, self.tx.seq)
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

    fn record_len_for(&self, plaintext: usize) -> usize {
        self.seal_header_len() + plaintext + self.seal_trailer_len()
    }

    /// Room [`RecordLayer::seal_control`] may need: the largest control record this version
    /// can owe (a KeyUpdate, or a warning alert).
    pub fn control_room(&self) -> usize {
        match self.version {
            Version::Tls13 => self.record_len_for(KEY_UPDATE_LEN),
            Version::Tls12 => self.record_len_for(2),
        }
    }

    /// Length of what [`RecordLayer::seal_control`] would write now (0: nothing is due).
    pub fn control_len(&self) -> usize {
        match (self.owed.no_renegotiation, self.key_update_due()) {
            (true, _) => self.record_len_for(2),
            (false, true) => self.record_len_for(KEY_UPDATE_LEN),
            (false, false) => 0,
        }
    }

    /// True if the peer is owed a record for what it sent (a KeyUpdate it asked for, a
    /// renegotiation refusal): rustls would have it ready to send at once.
    pub fn owes_control(&self) -> bool {
        self.owed.no_renegotiation || self.owed.key_update
    }

    /// True if a control record must go out before the next data record: a KeyUpdate the peer
    /// asked for or our key's limit calls for (TLS 1.3), or the answer to a renegotiation
    /// attempt (TLS 1.2). Call [`RecordLayer::seal_control`] then.
    pub fn control_due(&self) -> bool {
        self.owed.no_renegotiation || self.key_update_due()
    }

    /// TLS 1.3: the peer asked for a KeyUpdate, or, as rustls does, the next data record would
    /// take the last sequence number the key allows (the KeyUpdate takes it instead).
    fn key_update_due(&self) -> bool {
        self.version == Version::Tls13
            && (self.owed.key_update
                || self.owed.refresh
                || (self.tx.seq > 0 && self.tx.seq + 1 >= self.tx_limit))
    }

    /// TLS 1.3: sends a KeyUpdate asking the peer for one too before the next data record, as
    /// rustls's `refresh_traffic_keys` does. (TLS 1.2 cannot rekey: nothing happens.)
    pub fn refresh_traffic_keys(&mut self) {
        self.owed.refresh = self.version == Version::Tls13;
    }

    /// Writes the control records that are due ([`RecordLayer::control_due`]) at the start of
    /// `buf` (at least [`RecordLayer::control_room`] bytes); returns their length.
    pub fn seal_control(&mut self, buf: &mut [u8]) -> Result<usize, RecordError> {
        let mut at = self.seal_owed(buf)?;
        if self.key_update_due() {
            at += self.seal_key_update(&mut buf[at..])?;
        }
        Ok(at)
    }

    /// The records rustls would have queued when it read what the peer sent, ahead of
    /// anything it sends next (a data record, an alert): the warning no_renegotiation, or the
    /// KeyUpdate the peer asked for. (TLS 1.2 owes the one, TLS 1.3 the other.)
    fn seal_owed(&mut self, buf: &mut [u8]) -> Result<usize, RecordError> {
        if self.owed.no_renegotiation {
            let len = self.seal_alert(buf, ALERT_LEVEL_WARNING, ALERT_NO_RENEGOTIATION)?;
            self.owed.no_renegotiation = false;
            return Ok(len);
        }
        if self.owed.key_update {
            return self.seal_key_update(buf);
        }
        Ok(0)
    }

    /// A KeyUpdate under the current key, then the switch to the next key. Answering the peer
    /// needs no answer; a key at its limit asks the peer to rekey too, as rustls does.
    fn seal_key_update(&mut self, buf: &mut [u8]) -> Result<usize, RecordError> {
        let request = match self.owed.key_update {
            true => KEY_UPDATE_NOT_REQUESTED,
            false => KEY_UPDATE_REQUESTED,
        };
        let at = self.seal_header_len();
        buf[at..at + KEY_UPDATE_LEN].copy_from_slice(&[HANDSHAKE_KEY_UPDATE, 0, 0, 1, request]);
        let len = self.seal_record(buf, CONTENT_HANDSHAKE, KEY_UPDATE_LEN, SEQ_HARD_LIMIT)?;
        let secrets = self.secrets.as_mut().ok_or(RecordError::KeyDerivation)?;
        self.tx = secrets.server.update(self.algorithm)?;
        (self.owed.key_update, self.owed.refresh) = (false, false);
        Ok(len)
    }

    /// Seals application data in place: `buf[seal_header_len()..][..len]` is the plaintext
    /// (at most [`MAX_PLAINTEXT`]), and `buf` has [`RecordLayer::seal_trailer_len`] bytes of room
    /// after it. Writes the header and trailer; returns the record's length. Control records
    /// that are due must go first ([`RecordLayer::control_due`]).
    pub fn seal(&mut self, buf: &mut [u8], len: usize) -> Result<usize, RecordError> {
        let limit = match self.version {
            Version::Tls13 => self.tx_limit,
            Version::Tls12 => self.tx_limit.saturating_sub(TLS12_FINAL_RECORDS),
        };
        self.seal_record(buf, CONTENT_APPLICATION_DATA, len, limit)
    }

    /// As [`RecordLayer::seal`], for the last application data of a connection (its FATAL
    /// ErrorResponse): TLS 1.2 keeps its last records for this and a close_notify.
    pub fn seal_final(&mut self, buf: &mut [u8], len: usize) -> Result<usize, RecordError> {
        let limit = match self.version {
            Version::Tls13 => self.tx_limit,
            Version::Tls12 => self.tx_limit.saturating_sub(1),
        };
        self.seal_record(buf, CONTENT_APPLICATION_DATA, len, limit)
    }

    /// Writes a close_notify alert record at the start of `buf` (at least
    /// [`CONTROL_RECORD_ROOM`] bytes), after any record the peer is owed, as rustls does;
    /// returns the length written. Writes nothing if a close_notify or a fatal alert went out
    /// before (rustls sends neither twice). Works at the record limit, as alerts do in rustls.
    pub fn seal_close_notify(&mut self, buf: &mut [u8]) -> Result<usize, RecordError> {
        if self.closure_sent {
            return Ok(0);
        }
        let at = self.seal_owed(buf)?;
        let len = self.seal_alert(&mut buf[at..], ALERT_LEVEL_WARNING, ALERT_CLOSE_NOTIFY)?;
        self.closure_sent = true;
        Ok(at + len)
    }

    /// Writes what rustls sends when it fails with `error` at the start of `buf` (at least
    /// [`CONTROL_RECORD_ROOM`] bytes); returns the length written. That is the alert for the
    /// error (for TLS 1.2's exhausted sending key, the close_notify rustls sends at its limit),
    /// after the records the peer is owed; with no alert, only a renegotiation refusal rustls
    /// had already sealed.
    pub fn seal_failure(&mut self, error: &RecordError, buf: &mut [u8]) -> usize {
        let alert = match (error, error.alert()) {
            (RecordError::Exhausted, _) if self.version == Version::Tls12 => {
                (!self.closure_sent).then_some((ALERT_LEVEL_WARNING, ALERT_CLOSE_NOTIFY))
            }
            (_, Some(alert)) => Some((ALERT_LEVEL_FATAL, u8::from(alert))),
            (_, None) => None,
        };
        let Some((level, description)) = alert else {
            if !self.owed.no_renegotiation {
                return 0;
            }
            let sealed = self.seal_alert(buf, ALERT_LEVEL_WARNING, ALERT_NO_RENEGOTIATION);
            self.owed.no_renegotiation = false;
            return sealed.unwrap_or(0);
        };
        let Ok(at) = self.seal_owed(buf) else {
            return 0;
        };
        match self.seal_alert(&mut buf[at..], level, description) {
            Ok(len) => {
                self.closure_sent = true;
                at + len
            }
            Err(_) => at,
        }
    }

    /// A fatal alert the handshake ends with (internal_error when the keys are out of step).
    pub(crate) fn seal_fatal(&mut self, alert: AlertDescription, buf: &mut [u8]) -> usize {
        let sealed = self.seal_alert(buf, ALERT_LEVEL_FATAL, u8::from(alert));
        self.closure_sent = true;
        sealed.unwrap_or(0)
    }

    /// An alert record; alerts are sealed up to rustls's hard limit, past the key's soft one.
    fn seal_alert(
        &mut self,
        buf: &mut [u8],
        level: u8,
        description: u8,
    ) -> Result<usize, RecordError> {
        let at = self.seal_header_len();
        buf[at..at + 2].copy_from_slice(&[level, description]);
        self.seal_record(buf, CONTENT_ALERT, 2, SEQ_HARD_LIMIT)
    }

    /// Seals `buf[seal_header_len()..][..len]` as a record of `content_type`, if the sequence
    /// number is below `limit`.
    fn seal_record(
        &mut self,
        buf: &mut [u8],
        content_type: u8,
        len: usize,
        limit: u64,
    ) -> Result<usize, RecordError> {
        debug_assert!(len <= MAX_PLAINTEXT);
        if self.tx.seq >= limit.min(SEQ_HARD_LIMIT) {
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
                aad = tls12_aad(seq, content_type, LEGACY_VERSION, len);
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
        self.tx.seq += 1;
        Ok(total)
    }
}
