//! The client side: rustls's unbuffered client runs the handshake; then a sealer of our own,
//! with the keys rustls hands over, writes whatever records a scenario asks for (any content
//! type, padding, header, additional data or sequence number), following its own KeyUpdates
//! with the next keys from rustls's kernel connection.

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::ServerName;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::SupportedCipherSuite;

use super::provider::{client_config, SERVER_NAME};
use crate::tls::keys::split_extracted;
use crate::tls::record::{CONTENT_HANDSHAKE, HANDSHAKE_KEY_UPDATE, HEADER_LEN, TAG_LEN};

/// A client in its handshake.
pub struct Client {
    conn: UnbufferedClientConnection,
    incoming: Vec<u8>,
    done: bool,
}

impl Client {
    /// A client offering `suite` only.
    pub fn new(suite: SupportedCipherSuite) -> Result<Client, rustls::Error> {
        let name = ServerName::try_from(SERVER_NAME)
            .map_err(|_| rustls::Error::General("server name".into()))?;
        Ok(Client {
            conn: UnbufferedClientConnection::new(client_config(suite), name)?,
            incoming: Vec::new(),
            done: false,
        })
    }

    /// True once the client has sent its Finished and may send data.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Takes what the server sent; returns the client's next flight.
    pub fn advance(&mut self, from_server: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.incoming.extend_from_slice(from_server);
        let mut flight = Vec::new();
        loop {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let blocked = match state? {
                ConnectionState::EncodeTlsData(mut encode) => {
                    encode_into(|buf| encode.encode(buf), &mut flight)?;
                    false
                }
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    false
                }
                ConnectionState::BlockedHandshake => true,
                ConnectionState::WriteTraffic(_) => {
                    self.done = true;
                    true
                }
                _ => return Err(rustls::Error::General("unexpected client state".into())),
            };
            self.incoming.drain(..discard);
            if blocked {
                return Ok(flight);
            }
        }
    }

    /// The client's sending keys, once its handshake is done.
    pub fn into_sealer(self) -> Result<Sealer, rustls::Error> {
        let tls13 = self.conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
        let (keys, kernel) = self.conn.dangerous_into_kernel_connection()?;
        let (algorithm, key, iv) =
            split_extracted(&keys.tx.1).map_err(|e| rustls::Error::General(e.to_string()))?;
        let explicit_nonce = !tls13 && *algorithm != aead::CHACHA20_POLY1305;
        let (_, rx_key, rx_iv) =
            split_extracted(&keys.rx.1).map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(Sealer {
            tls13,
            explicit_nonce,
            key: sealing_key(algorithm, key)?,
            iv,
            seq: keys.tx.0,
            rx: (sealing_key(algorithm, rx_key)?, rx_iv, keys.rx.0),
            kernel,
            handshake: Tracker::default(),
        })
    }
}

fn sealing_key(
    algorithm: &'static aead::Algorithm,
    key: &[u8],
) -> Result<LessSafeKey, rustls::Error> {
    UnboundKey::new(algorithm, key)
        .map(LessSafeKey::new)
        .map_err(|_| rustls::Error::General("client key".into()))
}

/// How to seal one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSpec {
    /// The type in the record header (TLS 1.2: also the authenticated type).
    pub outer: u8,
    /// The legacy version in the record header.
    pub version: u16,
    /// TLS 1.3: the content type inside, after the content (none: zeros only follow it).
    pub inner: Option<u8>,
    /// TLS 1.3: zero padding after the inner content type.
    pub pad: usize,
    /// TLS 1.3: authenticate the header as sent, not the one every record should have.
    pub wire_aad: bool,
}

impl RecordSpec {
    /// A well-formed record of `content_type`, as rustls's client would send it.
    pub fn plain(content_type: u8) -> RecordSpec {
        RecordSpec {
            outer: content_type,
            version: 0x0303,
            inner: Some(content_type),
            pad: 0,
            wire_aad: false,
        }
    }
}

/// The client's sending direction after the handshake.
pub struct Sealer {
    tls13: bool,
    explicit_nonce: bool,
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
    /// The receiving direction: key, nonce base, sequence number.
    rx: (LessSafeKey, [u8; NONCE_LEN], u64),
    kernel: KernelConnection<ClientConnectionData>,
    handshake: Tracker,
}

impl Sealer {
    /// True for TLS 1.3.
    pub fn tls13(&self) -> bool {
        self.tls13
    }

    /// Moves the sequence number (a replay, a gap).
    pub fn skip(&mut self, delta: i8) {
        self.seq = self.seq.wrapping_add_signed(i64::from(delta));
    }

    /// `content` as one record; `None` if it cannot be encoded (over 64 KiB). After a record
    /// that completes KeyUpdate messages (TLS 1.3), the next records use the next keys.
    pub fn seal(&mut self, spec: &RecordSpec, content: &[u8]) -> Option<Vec<u8>> {
        let mut plaintext = content.to_vec();
        let (aad, explicit) = if self.tls13 {
            plaintext.extend(spec.inner);
            plaintext.resize(plaintext.len() + spec.pad, 0);
            let len = u16::try_from(plaintext.len() + TAG_LEN).ok()?;
            let aad = match spec.wire_aad {
                true => header(spec.outer, spec.version, len),
                false => header(0x17, 0x0303, len),
            };
            (aad.to_vec(), 0)
        } else {
            let explicit = if self.explicit_nonce { 8 } else { 0 };
            let mut aad = self.seq.to_be_bytes().to_vec();
            aad.push(spec.outer);
            aad.extend(spec.version.to_be_bytes());
            aad.extend(u16::try_from(content.len()).ok()?.to_be_bytes());
            (aad, explicit)
        };
        let len = u16::try_from(explicit + plaintext.len() + TAG_LEN).ok()?;
        let mut record = header(spec.outer, spec.version, len).to_vec();
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        if explicit > 0 {
            // As rustls does: the explicit part is the sequence-derived nonce's tail.
            record.extend_from_slice(&nonce[NONCE_LEN - explicit..]);
        }
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..]),
                &mut plaintext,
            )
            .ok()?;
        record.extend_from_slice(&plaintext);
        debug_assert_eq!(record.len(), HEADER_LEN + usize::from(len));
        self.seq = self.seq.wrapping_add(1);
        if self.tls13 && spec.inner == Some(CONTENT_HANDSHAKE) {
            for _ in 0..self.handshake.key_updates_in(content) {
                self.next_keys().ok()?;
            }
        }
        Some(record)
    }

    /// Opens the server's records in `wire` as the client would: each record's content type
    /// and content, following the server's KeyUpdates. Fails on a record that does not open.
    pub fn open(&mut self, mut wire: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, String> {
        let mut opened = Vec::new();
        while !wire.is_empty() {
            let header: [u8; HEADER_LEN] = wire
                .get(..HEADER_LEN)
                .and_then(|h| h.try_into().ok())
                .ok_or("truncated record header")?;
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            let body = wire
                .get(HEADER_LEN..HEADER_LEN + len)
                .ok_or("truncated record")?;
            wire = &wire[HEADER_LEN + len..];
            let (key, iv, seq) = &mut self.rx;
            let mut nonce = *iv;
            for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
                *n ^= s;
            }
            let mut body = body.to_vec();
            let (content_type, content) = if self.tls13 {
                let plain = key
                    .open_in_place(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(header),
                        &mut body,
                    )
                    .map_err(|_| format!("server record {} does not open", opened.len()))?;
                let at = plain
                    .iter()
                    .rposition(|&b| b != 0)
                    .ok_or("no content type")?;
                (plain[at], plain[..at].to_vec())
            } else {
                let explicit = if self.explicit_nonce { 8 } else { 0 };
                if explicit > 0 {
                    nonce[4..].copy_from_slice(body.get(..8).ok_or("short record")?);
                }
                let plain_len = body
                    .len()
                    .checked_sub(explicit + TAG_LEN)
                    .ok_or("short record")?;
                let mut aad = seq.to_be_bytes().to_vec();
                aad.extend_from_slice(&header[..3]);
                aad.extend((plain_len as u16).to_be_bytes());
                let plain = key
                    .open_in_place(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(&aad[..]),
                        &mut body[explicit..],
                    )
                    .map_err(|_| format!("server record {} does not open", opened.len()))?;
                (header[0], plain.to_vec())
            };
            *seq += 1;
            if self.tls13 && content_type == CONTENT_HANDSHAKE && content.first() == Some(&24) {
                let (seq, secrets) = self.kernel.update_rx_secret().map_err(|e| e.to_string())?;
                let (algorithm, key, iv) = split_extracted(&secrets).map_err(|e| e.to_string())?;
                self.rx = (
                    sealing_key(algorithm, key).map_err(|e| e.to_string())?,
                    iv,
                    seq,
                );
            }
            opened.push((content_type, content));
        }
        Ok(opened)
    }

    /// The next generation of the client's keys, from rustls.
    fn next_keys(&mut self) -> Result<(), rustls::Error> {
        let (seq, secrets) = self.kernel.update_tx_secret()?;
        let (algorithm, key, iv) =
            split_extracted(&secrets).map_err(|e| rustls::Error::General(e.to_string()))?;
        self.key = sealing_key(algorithm, key)?;
        (self.iv, self.seq) = (iv, seq);
        Ok(())
    }
}

fn header(content_type: u8, version: u16, len: u16) -> [u8; HEADER_LEN] {
    let [v0, v1] = version.to_be_bytes();
    let [l0, l1] = len.to_be_bytes();
    [content_type, v0, v1, l0, l1]
}

/// Follows the handshake messages the client sends, to know when it has sent a KeyUpdate.
#[derive(Default)]
struct Tracker {
    header: Vec<u8>,
    body_left: usize,
}

impl Tracker {
    /// How many KeyUpdate messages `content` completes.
    fn key_updates_in(&mut self, mut content: &[u8]) -> usize {
        let mut count = 0;
        while !content.is_empty() {
            if self.header.len() < 4 {
                let take = (4 - self.header.len()).min(content.len());
                self.header.extend_from_slice(&content[..take]);
                content = &content[take..];
                if self.header.len() < 4 {
                    break;
                }
                self.body_left = usize::from(self.header[1]) << 16
                    | usize::from(self.header[2]) << 8
                    | usize::from(self.header[3]);
            }
            let take = self.body_left.min(content.len());
            content = &content[take..];
            self.body_left -= take;
            if self.body_left == 0 {
                count += usize::from(self.header[0] == HANDSHAKE_KEY_UPDATE);
                self.header.clear();
            }
        }
        count
    }
}

/// Runs an encoder into `out`, growing it as rustls asks.
fn encode_into(
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
    out: &mut Vec<u8>,
) -> Result<(), rustls::Error> {
    let start = out.len();
    let mut room = 4096;
    loop {
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(need)) if need.required_size > room => {
                room = need.required_size;
            }
            Err(_) => {
                out.truncate(start);
                return Err(rustls::Error::General("client encode".into()));
            }
        }
    }
}
