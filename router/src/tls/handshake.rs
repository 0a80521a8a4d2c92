//! The server side of the TLS handshake, on rustls's unbuffered API: rustls reads the client's
//! records straight from our buffer and writes its own into another, so the handshake needs no
//! buffers inside rustls. When it is done, the traffic secrets go to a [`RecordLayer`].
//!
//! rustls never sees a record sent after the client's Finished: it is given one record at a
//! time, and none once the handshake is complete. Whatever the client sent behind its Finished
//! (data, KeyUpdates, close_notify, in the same write or not) stays in the caller's buffer for
//! the record layer, which so starts from the first generation of keys, at the sequence
//! numbers the handshake implies. Had rustls processed a KeyUpdate, it would have moved to the
//! next keys and dropped the reply it queued when the connection was handed over.
//!
//! Sans I/O: [`ServerHandshake::advance`] says what it wants next ([`Want`]); the caller moves
//! the bytes ([`super::accept`] over a socket, tests in memory).

use std::sync::Arc;

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{AlertDescription, ExtractedSecrets, ProtocolVersion, ServerConfig};

use super::keys::split_extracted;
use super::record::{RecordLayer, TrafficSecrets, CONTROL_RECORD_ROOM, HEADER_LEN};
use super::{take_noted, Handshake, Noted, TlsError, ALPN_POSTGRESQL};
use crate::buf::ReadBuf;

/// What the handshake needs from the caller before the next [`ServerHandshake::advance`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Send `out`, then advance again.
    Write,
    /// Send `out` if it holds anything, read more into `incoming`, then advance again.
    Read,
    /// The handshake is complete: send `out` if it holds anything, then call `finish`.
    Done,
}

/// A handshake in progress.
pub struct ServerHandshake {
    /// rustls's connection, until it becomes the record layer.
    conn: Option<UnbufferedServerConnection>,
    /// What rustls's hooks told us so far.
    noted: Noted,
    /// Bytes at the front of `incoming` that rustls was given and has not discarded: what it
    /// keeps of earlier records (processed in place), then the record it is being given.
    offered: usize,
    /// Where the record being given starts and (once its header is in) ends, from the front of
    /// `incoming`; `offered` stops short of the end while the record has not all arrived.
    record_start: usize,
    record_end: Option<usize>,
    /// Alert records given to rustls: all, and those of at most two bytes (which rustls reads
    /// as plaintext alerts before the first record it decrypts).
    alert_records: u8,
    plaintext_alert_records: u8,
    /// The record layer and what the handshake learned, once complete.
    done: Option<(RecordLayer, Handshake)>,
}

impl std::fmt::Debug for ServerHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandshake")
            .field("sni", &self.noted.sni)
            .field("offered", &self.offered)
            .finish_non_exhaustive()
    }
}

/// What one rustls step asked for, once its borrows of the buffers are over.
enum Step {
    Again,
    Want(Want),
    /// rustls is blocked: give it more of the client's records, if there are any.
    Blocked,
    /// The handshake is complete and rustls has nothing left to send.
    Complete,
    Failed(rustls::Error),
}

impl ServerHandshake {
    /// A handshake for `config` (built by [`super::server_config`]: secret extraction enabled).
    pub fn new(config: Arc<ServerConfig>) -> Result<ServerHandshake, TlsError> {
        Ok(ServerHandshake {
            conn: Some(UnbufferedServerConnection::new(config)?),
            noted: Noted::default(),
            offered: 0,
            record_start: 0,
            record_end: Some(0),
            alert_records: 0,
            plaintext_alert_records: 0,
            done: None,
        })
    }

    /// Processes the client's handshake records in `incoming` (consuming what rustls is done
    /// with) and appends what the server sends to `out`. Records after the client's Finished
    /// are left in `incoming`, for the record layer. On failure the alert rustls chose (or
    /// internal_error, see [`TlsError::KeysOutOfStep`]) is already in `out`: send it before
    /// closing.
    pub fn advance(&mut self, incoming: &mut ReadBuf, out: &mut Vec<u8>) -> Result<Want, TlsError> {
        loop {
            if self.done.is_some() {
                return Ok(Want::Done);
            }
            match self.step(incoming, out)? {
                Step::Again => {}
                Step::Want(want) => return Ok(want),
                Step::Blocked => {
                    if !self.offer_next(incoming) {
                        return Ok(Want::Read);
                    }
                }
                Step::Complete => {
                    self.complete(out)?;
                    return Ok(Want::Done);
                }
                Step::Failed(error) => {
                    self.collect_alert(incoming, out);
                    return Err(error.into());
                }
            }
        }
    }

    fn step(&mut self, incoming: &mut ReadBuf, out: &mut Vec<u8>) -> Result<Step, TlsError> {
        let conn = self.conn.as_mut().ok_or(TlsError::Finished)?;
        let UnbufferedStatus { discard, state } =
            conn.process_tls_records(&mut incoming.data_mut()[..self.offered]);
        let step = match state {
            Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                encode_into(|buf| encode.encode(buf), out)?;
                Step::Again
            }
            Ok(ConnectionState::TransmitTlsData(transmit)) => {
                // `out` is sent before rustls is asked for anything else.
                transmit.done();
                Step::Want(Want::Write)
            }
            Ok(ConnectionState::BlockedHandshake) => Step::Blocked,
            // Traffic state with nothing to send. The server sends no data before the client's
            // Finished (no half-RTT data), so this is the end of the handshake.
            Ok(ConnectionState::WriteTraffic(_)) => match conn.is_handshaking() {
                true => Step::Blocked,
                false => Step::Complete,
            },
            Ok(ConnectionState::Closed) => return Err(TlsError::Eof),
            // Application data, a close_notify, early data: rustls is never given a record that
            // could hold them, and 0-RTT is never offered (no tickets).
            Ok(_) => Step::Failed(rustls::Error::General("unexpected TLS state".into())),
            Err(error) => Step::Failed(error),
        };
        // rustls discards whole records only, none after the one it is being given.
        incoming.consume(discard);
        self.offered -= discard;
        self.record_start = self.record_start.saturating_sub(discard);
        self.record_end = self.record_end.map(|end| end - discard);
        self.noted.absorb(take_noted());
        Ok(step)
    }

    /// Gives rustls more of the record it is being given, or the next one; never anything
    /// after the handshake. A record still arriving is given as far as it goes, its header too:
    /// rustls checks each header field as soon as it has it. Returns false if there is nothing
    /// new to give.
    fn offer_next(&mut self, incoming: &ReadBuf) -> bool {
        if self.conn.as_ref().is_none_or(|conn| !conn.is_handshaking()) {
            return false;
        }
        if self.record_end == Some(self.offered) {
            // The last record was given whole, and rustls, blocked, has processed it.
            self.record_start = self.offered;
            self.record_end = None;
        }
        if self.record_end.is_none() {
            // Frame the record by its plain header (rustls itself judges the header).
            if let Some(header) = incoming
                .data()
                .get(self.record_start..self.record_start + HEADER_LEN)
            {
                let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
                if header[0] == super::record::CONTENT_ALERT {
                    self.alert_records = self.alert_records.saturating_add(1);
                    if len <= 2 {
                        self.plaintext_alert_records =
                            self.plaintext_alert_records.saturating_add(1);
                    }
                }
                self.record_end = Some(self.record_start + HEADER_LEN + len);
            }
        }
        let offered = incoming.len().min(self.record_end.unwrap_or(usize::MAX));
        let more = offered > self.offered;
        self.offered = offered;
        more
    }

    /// After a failure rustls still hands out what it queued (the alert last), one chunk per
    /// call and before it would look at `incoming` again: encode it all into `out`. Asking
    /// once more than that would make rustls re-read the bad input and fail again.
    fn collect_alert(&mut self, incoming: &mut ReadBuf, out: &mut Vec<u8>) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        while conn.wants_write() {
            let UnbufferedStatus { state, .. } =
                conn.process_tls_records(&mut incoming.data_mut()[..self.offered]);
            let Ok(ConnectionState::EncodeTlsData(mut encode)) = state else {
                break;
            };
            if encode_into(|buf| encode.encode(buf), out).is_err() {
                break;
            }
        }
        self.noted.absorb(take_noted());
    }

    /// Hands the connection over to a record layer, after checking that the keys and sequence
    /// numbers rustls hands over are those the handshake implies.
    fn complete(&mut self, out: &mut Vec<u8>) -> Result<(), TlsError> {
        let conn = self.conn.take().ok_or(TlsError::Finished)?;
        // rustls refuses handshake data after the client's Finished in its record, so it keeps
        // nothing of it: what follows in `incoming` starts with a whole record.
        if self.offered != 0 {
            return Err(TlsError::KeysOutOfStep(
                "handshake bytes kept past the Finished",
            ));
        }
        let noted = std::mem::take(&mut self.noted);
        let handshake = Handshake {
            sni: noted.sni,
            alpn: conn.alpn_protocol() == Some(ALPN_POSTGRESQL),
        };
        let (keys, kernel) = conn.dangerous_into_kernel_connection()?;
        // Key updates are derived from the noted secrets, checked below; the kernel connection
        // (800 bytes a session) is not kept.
        let (version, suite) = (kernel.protocol_version(), kernel.negotiated_cipher_suite());
        drop(kernel);
        let traffic = match (noted.client_traffic, noted.server_traffic) {
            (Some(client), Some(server)) => Some(TrafficSecrets { client, server }),
            _ => None,
        };
        let mut records = match version {
            ProtocolVersion::TLSv1_3 => tls13_records(keys, suite, traffic, out)?,
            _ => tls12_records(keys, version, suite, out)?,
        };
        let warnings = match version {
            ProtocolVersion::TLSv1_3 => self.plaintext_alert_records,
            _ => self.alert_records,
        };
        records.inbound.handshake_warnings(warnings);
        self.done = Some((records, handshake));
        Ok(())
    }

    /// The negotiated connection's record layer and what the handshake learned, once
    /// [`ServerHandshake::advance`] has returned [`Want::Done`].
    pub fn finish(self) -> Result<(RecordLayer, Handshake), TlsError> {
        self.done
            .ok_or(TlsError::Protocol(rustls::Error::HandshakeNotComplete))
    }
}

/// TLS 1.3: both directions' keys must be those of the first application traffic secrets,
/// both sequence numbers 0 (rustls sent no ticket and saw no record after the Finished).
/// Otherwise internal_error goes to the client under the key it expects, the first server one.
fn tls13_records(
    keys: ExtractedSecrets,
    suite: rustls::SupportedCipherSuite,
    traffic: Option<TrafficSecrets>,
    out: &mut Vec<u8>,
) -> Result<RecordLayer, TlsError> {
    let traffic = traffic.ok_or(TlsError::KeysOutOfStep("no traffic secrets noted"))?;
    let (algorithm, rx_key, rx_iv) = split_extracted(&keys.rx.1)?;
    let (tx_algorithm, tx_key, tx_iv) = split_extracted(&keys.tx.1)?;
    let rx_ok = traffic.client.derives(algorithm, rx_key, &rx_iv)? && keys.rx.0 == 0;
    let tx_ok = *algorithm == *tx_algorithm
        && traffic.server.derives(algorithm, tx_key, &tx_iv)?
        && keys.tx.0 == 0;
    if rx_ok && tx_ok {
        return Ok(RecordLayer::new(
            keys,
            ProtocolVersion::TLSv1_3,
            suite,
            Some(traffic),
        )?);
    }
    let mut records = RecordLayer::from_traffic_secrets(suite, algorithm, traffic)?;
    seal_internal_error(&mut records, out);
    Err(TlsError::KeysOutOfStep(match rx_ok {
        false => "receiving keys differ from the client's first traffic secret",
        true => "sending keys differ from the server's first traffic secret",
    }))
}

/// TLS 1.2: each side's Finished is the one record under the new keys (sequence number 0).
fn tls12_records(
    keys: ExtractedSecrets,
    version: ProtocolVersion,
    suite: rustls::SupportedCipherSuite,
    out: &mut Vec<u8>,
) -> Result<RecordLayer, TlsError> {
    let seqs_ok = keys.rx.0 == 1 && keys.tx.0 == 1;
    let mut records = RecordLayer::new(keys, version, suite, None)?;
    if seqs_ok {
        return Ok(records);
    }
    seal_internal_error(&mut records, out);
    Err(TlsError::KeysOutOfStep(
        "sequence numbers differ from the handshake's",
    ))
}

fn seal_internal_error(records: &mut RecordLayer, out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + CONTROL_RECORD_ROOM, 0);
    let len = records.seal_fatal(AlertDescription::InternalError, &mut out[start..]);
    out.truncate(start + len);
}

/// Runs an encoder into the spare capacity of `out`, growing it as rustls asks.
fn encode_into(
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
    out: &mut Vec<u8>,
) -> Result<(), TlsError> {
    let start = out.len();
    let mut room = 1024;
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
                return Err(TlsError::Encode);
            }
        }
    }
}
