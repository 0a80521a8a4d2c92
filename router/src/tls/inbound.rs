//! What the peer may send after the handshake, and how often: rustls's rules (0.23.46,
//! `ConnectionCore::process_more_input`, `CommonState::process_alert`, the servers'
//! `ExpectTraffic` states) for what an opened record holds.
//!
//! - Application data, possibly empty; at most 32 empty records in a row (of any type).
//! - Alerts: close_notify ends the stream; at most 4 warnings per connection, and in TLS 1.3
//!   only user_canceled may be a warning; a level other than warning or fatal is refused.
//! - Handshake messages, possibly split across records or several in one record, but never
//!   interleaved with other records and never over 64 KiB (nor their records over 64 KiB of
//!   rustls's buffer): TLS 1.3 KeyUpdates (last in their record, at most 32 without data between
//!   them), TLS 1.2 ClientHellos (refused once with the warning no_renegotiation, then fatal).
//!   Anything else is unexpected_message, once rustls has seen all of it and found it well
//!   formed. For a message within one record rustls's own parser decides, through
//!   `rustls::internal::msgs::message::Message`, which rustls does not promise to keep (the
//!   lock file pins rustls; an update that changes it fails the build or the differential
//!   tests, both wanted). A split one is not kept, so only its type can decide
//!   ([`RecordError::UnparsedHandshake`] where the type is not enough).
//!
//! A split handshake message is not buffered: its header (4 bytes) and the count of body bytes
//! still to come are enough to follow it, and to fail exactly where rustls does, including
//! where rustls's own buffer (in which it keeps the records of handshake messages) is full.

use std::ops::Range;

use rustls::crypto::cipher::InboundPlainMessage;
use rustls::internal::msgs::message::Message;
use rustls::{AlertDescription, ContentType, ProtocolVersion};

use super::record::{
    Opened, RecordError, RecordLayer, Version, ALERT_LEVEL_FATAL, ALERT_LEVEL_WARNING,
    CONTENT_ALERT, CONTENT_APPLICATION_DATA, CONTENT_CHANGE_CIPHER_SPEC, CONTENT_HANDSHAKE,
    HANDSHAKE_KEY_UPDATE, KEY_UPDATE_NOT_REQUESTED, KEY_UPDATE_REQUESTED,
};

/// rustls's limit on consecutive empty records (BoringSSL's `kMaxEmptyRecords`).
const MAX_EMPTY_RECORDS: u8 = 32;
/// rustls's limit on warning alerts per connection (BoringSSL's `kMaxWarningAlerts`).
const MAX_WARNING_ALERTS: u8 = 4;
/// rustls's limit on KeyUpdates between two application data records (`kMaxKeyUpdates`).
const MAX_KEY_UPDATES: u8 = 32;
/// rustls refuses a second renegotiation attempt.
const MAX_RENEGOTIATIONS: u8 = 1;
/// rustls's limit on a handshake message's length, and on its buffer while a split one waits.
const MAX_HANDSHAKE_BYTES: usize = 0xffff;
/// rustls's buffer otherwise: one record of the largest size it takes.
const MAX_WIRE_BYTES: usize = super::record::MAX_RECORD_LEN + 1;
const HANDSHAKE_HEADER_LEN: usize = 4;

const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const ALERT_CLOSE_NOTIFY: u8 = 0;
const ALERT_USER_CANCELED: u8 = 90;

/// The peer's side of a connection after the handshake.
#[derive(Debug)]
pub(crate) struct Inbound {
    /// close_notify arrived: nothing after it is read.
    pub(crate) closed: bool,
    empty_records: u8,
    warnings_left: u8,
    key_updates_left: u8,
    renegotiations_left: u8,
    handshake: Reassembly,
}

impl Default for Inbound {
    fn default() -> Self {
        Inbound {
            closed: false,
            empty_records: 0,
            warnings_left: MAX_WARNING_ALERTS,
            key_updates_left: MAX_KEY_UPDATES,
            renegotiations_left: MAX_RENEGOTIATIONS,
            handshake: Reassembly::default(),
        }
    }
}

impl Inbound {
    /// True while a handshake message is split across records.
    pub(crate) fn handshake_pending(&self) -> bool {
        self.handshake.pending()
    }

    /// How many of `available` bytes rustls's buffer would hold: what it still keeps of
    /// handshake records (see [`Reassembly::kept`]) counts against its size, 64 KiB while a
    /// split handshake message waits, one largest record otherwise.
    pub(crate) fn visible(&self, available: usize) -> usize {
        let size = match self.handshake.pending() {
            true => MAX_HANDSHAKE_BYTES,
            false => MAX_WIRE_BYTES,
        };
        available.min(size.saturating_sub(self.handshake.kept as usize))
    }

    /// Counts warning alerts the peer sent during the handshake: rustls's limit is per
    /// connection.
    pub(crate) fn handshake_warnings(&mut self, count: u8) {
        self.warnings_left = self.warnings_left.saturating_sub(count);
    }
}

/// A handshake message split across records: its header so far and the body bytes to come.
/// Small integers: every session keeps one (a length is at most 64 KiB, `kept` at most 64 KiB
/// and one record).
#[derive(Debug, Default, Clone, Copy)]
struct Reassembly {
    header: [u8; HANDSHAKE_HEADER_LEN],
    /// Header bytes seen (0: no message pending).
    header_len: u8,
    body_left: u32,
    /// The first byte of the body (a KeyUpdate's request).
    first_body: Option<u8>,
    /// The legacy version of the record the message began in (TLS 1.2 parses by it).
    version: [u8; 2],
    /// Bytes of handshake records rustls still keeps in its buffer (processed in place, not
    /// discarded): it frees them only once it has handed out a handshake message with no other
    /// fragment left, so they pile up while a split message waits, and a record of empty
    /// handshake content stays for good until then.
    kept: u32,
}

impl Reassembly {
    fn pending(&self) -> bool {
        self.header_len > 0
    }
}

/// A handshake message completed in one record.
struct Complete<'a> {
    typ: u8,
    size: usize,
    first_body: Option<u8>,
    /// The whole message, when it lies within this record.
    whole: Option<&'a [u8]>,
    version: [u8; 2],
    /// Nothing follows it in its record: rustls's deframer is then "aligned".
    last: bool,
}

/// Follows the handshake messages of one record's content from `state`, calling `each` for
/// every message it completes, in order. Fails, like rustls's deframer, on a header announcing
/// more than 64 KiB.
fn walk<'a>(
    state: &mut Reassembly,
    content: &'a [u8],
    version: [u8; 2],
    mut each: impl FnMut(Complete<'a>) -> Result<(), RecordError>,
) -> Result<(), RecordError> {
    let mut at = 0;
    while at < content.len() {
        let start = at;
        let begins_here = !state.pending();
        if begins_here {
            state.version = version;
        }
        let header_len = usize::from(state.header_len);
        if header_len < HANDSHAKE_HEADER_LEN {
            let take = (HANDSHAKE_HEADER_LEN - header_len).min(content.len() - at);
            state.header[header_len..header_len + take].copy_from_slice(&content[at..at + take]);
            state.header_len += take as u8;
            at += take;
            if usize::from(state.header_len) < HANDSHAKE_HEADER_LEN {
                break;
            }
            let [_, a, b, c] = state.header;
            state.body_left = u32::from_be_bytes([0, a, b, c]);
            if state.body_left as usize > MAX_HANDSHAKE_BYTES {
                return Err(RecordError::HandshakeTooLarge);
            }
            state.first_body = None;
        }
        let take = (state.body_left as usize).min(content.len() - at);
        if take > 0 && state.first_body.is_none() {
            state.first_body = Some(content[at]);
        }
        at += take;
        state.body_left -= take as u32;
        if state.body_left > 0 {
            break;
        }
        let [typ, a, b, c] = state.header;
        let complete = Complete {
            typ,
            size: u32::from_be_bytes([0, a, b, c]) as usize,
            first_body: state.first_body,
            whole: begins_here.then(|| &content[start..at]),
            version: state.version,
            last: at == content.len(),
        };
        state.header_len = 0;
        each(complete)?;
    }
    Ok(())
}

impl RecordLayer {
    /// What an opened record's content means, and what it changes: rustls's checks in its
    /// order. `content` is the plaintext's range in `record`.
    #[inline]
    pub(super) fn received(
        &mut self,
        content_type: u8,
        header_version: [u8; 2],
        record: &[u8],
        content: Range<usize>,
    ) -> Result<Opened, RecordError> {
        let inbound = &mut self.inbound;
        // The hot path: application data, with no handshake message waiting for its rest.
        if content_type == CONTENT_APPLICATION_DATA
            && !inbound.handshake.pending()
            && !content.is_empty()
        {
            inbound.empty_records = 0;
            inbound.key_updates_left = MAX_KEY_UPDATES;
            return Ok(Opened::Data(content));
        }
        self.received_other(content_type, header_version, record, content)
    }

    #[cold]
    fn received_other(
        &mut self,
        content_type: u8,
        header_version: [u8; 2],
        record: &[u8],
        content: Range<usize>,
    ) -> Result<Opened, RecordError> {
        let inbound = &mut self.inbound;
        if inbound.handshake.pending() && content_type != CONTENT_HANDSHAKE {
            return Err(RecordError::Interleaved);
        }
        if content.is_empty() {
            if inbound.empty_records == MAX_EMPTY_RECORDS {
                return Err(RecordError::TooManyEmptyRecords);
            }
            inbound.empty_records += 1;
        } else {
            inbound.empty_records = 0;
        }
        match content_type {
            CONTENT_APPLICATION_DATA => {
                inbound.key_updates_left = MAX_KEY_UPDATES;
                Ok(Opened::Data(content))
            }
            CONTENT_ALERT => self.alert(&record[content]),
            CONTENT_HANDSHAKE => {
                self.handshake(&record[content], header_version, record.len())?;
                Ok(Opened::Nothing)
            }
            CONTENT_CHANGE_CIPHER_SPEC => match record[content] {
                [1] => Err(RecordError::Unexpected(
                    "change_cipher_spec after the handshake",
                )),
                _ => Err(RecordError::Decode("change_cipher_spec")),
            },
            _ => Err(RecordError::Decode("unknown content type")),
        }
    }

    fn alert(&mut self, alert: &[u8]) -> Result<Opened, RecordError> {
        let &[level, description] = alert else {
            return Err(RecordError::Decode("alert"));
        };
        if level != ALERT_LEVEL_WARNING && level != ALERT_LEVEL_FATAL {
            return Err(RecordError::AlertLevel(level));
        }
        // close_notify at either level: rustls looks at the description only.
        if description == ALERT_CLOSE_NOTIFY {
            self.inbound.closed = true;
            return Ok(Opened::Closed);
        }
        if level == ALERT_LEVEL_FATAL {
            return Err(RecordError::Alert(description));
        }
        if self.inbound.warnings_left == 0 {
            return Err(RecordError::TooManyWarnings);
        }
        self.inbound.warnings_left -= 1;
        if self.version == Version::Tls13 && description != ALERT_USER_CANCELED {
            return Err(RecordError::WarningAlert(description));
        }
        Ok(Opened::Nothing)
    }

    /// A record of handshake content: every header in it is checked first (as rustls's
    /// deframer takes in a whole record before it hands out its messages), then each message
    /// it completes is handled in order.
    fn handshake(
        &mut self,
        content: &[u8],
        version: [u8; 2],
        record_len: usize,
    ) -> Result<(), RecordError> {
        let before = self.inbound.handshake;
        walk(&mut before.clone(), content, version, |_| Ok(()))?;
        let mut state = before;
        let mut completed = false;
        walk(&mut state, content, version, |message| {
            completed = true;
            self.handshake_message(message)
        })?;
        state.kept = match state.pending() || !completed {
            // At most 64 KiB and a record (rustls's buffer): a u32 holds it.
            true => before.kept + record_len as u32,
            false => 0,
        };
        self.inbound.handshake = state;
        Ok(())
    }

    fn handshake_message(&mut self, message: Complete<'_>) -> Result<(), RecordError> {
        if self.version == Version::Tls13 && message.typ == HANDSHAKE_KEY_UPDATE {
            return self.key_update(&message);
        }
        check_parses(&message, self.version)?;
        if self.version == Version::Tls12 && message.typ == HANDSHAKE_CLIENT_HELLO {
            // Renegotiation: refused with a warning once, then fatal (rustls checks this before
            // the message reaches its state machine).
            let inbound = &mut self.inbound;
            if inbound.renegotiations_left == 0 {
                return Err(RecordError::TooManyRenegotiations);
            }
            inbound.renegotiations_left -= 1;
            self.owed.no_renegotiation = true;
            return Ok(());
        }
        Err(RecordError::Unexpected(
            "handshake message after the handshake",
        ))
    }

    /// A TLS 1.3 KeyUpdate (RFC 8446 4.6.3): our next receiving key, and our own KeyUpdate
    /// owed if the peer asked for one (one answer however often it asks before we send).
    fn key_update(&mut self, message: &Complete<'_>) -> Result<(), RecordError> {
        let request = match (message.size, message.first_body) {
            (1, Some(request)) => request,
            _ => {
                return Err(RecordError::HandshakeDecode {
                    typ: HANDSHAKE_KEY_UPDATE,
                    alert: AlertDescription::DecodeError,
                })
            }
        };
        // Changing keys with handshake data after the KeyUpdate in the same record would
        // protect one message's fragments under two keys.
        if !message.last {
            return Err(RecordError::Unexpected("KeyUpdate not last in its record"));
        }
        let inbound = &mut self.inbound;
        if inbound.key_updates_left == 0 {
            return Err(RecordError::TooManyKeyUpdates);
        }
        inbound.key_updates_left -= 1;
        match request {
            KEY_UPDATE_NOT_REQUESTED => {}
            KEY_UPDATE_REQUESTED => self.owed.key_update = true,
            other => return Err(RecordError::KeyUpdateRequest(other)),
        }
        self.rx = self
            .source
            .traffic_secrets()?
            .client
            .update(self.algorithm)?;
        Ok(())
    }
}

/// Whether rustls's parser takes `message` (its answer to one that does not: the alert for the
/// parse error). Within one record rustls itself is asked; a message split across records is
/// not kept, so only the types whose verdict does not depend on their contents are decided.
fn check_parses(message: &Complete<'_>, version: Version) -> Result<(), RecordError> {
    let refused = |alert| {
        Err(RecordError::HandshakeDecode {
            typ: message.typ,
            alert,
        })
    };
    if let Some(whole) = message.whole {
        let version = match version {
            Version::Tls13 => ProtocolVersion::TLSv1_3,
            Version::Tls12 => ProtocolVersion::from(u16::from_be_bytes(message.version)),
        };
        let plain = InboundPlainMessage {
            typ: ContentType::Handshake,
            version,
            payload: whole,
        };
        return match Message::try_from(plain) {
            Ok(_) => Ok(()),
            Err(error) => refused(AlertDescription::from(error)),
        };
    }
    match message.typ {
        // Bodies rustls takes whatever they hold: HelloRequest (an unknown message when not
        // empty), HelloVerifyRequest, ClientKeyExchange, Finished, CertificateURL.
        0 | 3 | 16 | 20 | 21 => Ok(()),
        // Messages that must be empty: EndOfEarlyData, ServerHelloDone.
        5 | 14 if message.size == 0 => Ok(()),
        5 | 14 => refused(AlertDescription::DecodeError),
        HANDSHAKE_KEY_UPDATE if message.size == 1 => Ok(()),
        HANDSHAKE_KEY_UPDATE => refused(AlertDescription::DecodeError),
        // Never on the wire: HelloRetryRequest's own type, message_hash.
        6 | 254 => refused(AlertDescription::DecodeError),
        // Parsed field by field: ClientHello, ServerHello, NewSessionTicket,
        // EncryptedExtensions, Certificate, ServerKeyExchange, CertificateRequest,
        // CertificateVerify, CertificateStatus, CompressedCertificate.
        1 | 2 | 4 | 8 | 11 | 12 | 13 | 15 | 22 | 25 => {
            Err(RecordError::UnparsedHandshake(message.typ))
        }
        // Types rustls does not know are kept as opaque payloads.
        _ => Ok(()),
    }
}
