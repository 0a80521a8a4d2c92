//! The server side of the TLS handshake, on rustls's unbuffered API: rustls reads the client's
//! records straight from our buffer and writes its own into another, so the handshake needs no
//! buffers inside rustls. When it is done, [`ServerHandshake::finish`] hands the traffic secrets
//! to a [`RecordLayer`].
//!
//! Sans I/O: [`ServerHandshake::advance`] says what it wants next ([`Want`]); the caller moves
//! the bytes ([`super::accept`] over a socket, tests in memory).

use std::sync::Arc;

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::ServerConfig;

use super::record::{RecordLayer, TrafficSecrets};
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
    conn: UnbufferedServerConnection,
    /// What rustls's hooks told us so far.
    noted: Noted,
    peer_closed: bool,
}

impl std::fmt::Debug for ServerHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandshake")
            .field("sni", &self.noted.sni)
            .finish_non_exhaustive()
    }
}

/// What one rustls step asked for, once its borrows of the buffers are over.
enum Step {
    Again,
    Want(Want),
    Failed(rustls::Error),
}

impl ServerHandshake {
    /// A handshake for `config` (built by [`super::server_config`]: secret extraction enabled).
    pub fn new(config: Arc<ServerConfig>) -> Result<ServerHandshake, TlsError> {
        Ok(ServerHandshake {
            conn: UnbufferedServerConnection::new(config)?,
            noted: Noted::default(),
            peer_closed: false,
        })
    }

    /// Processes the records in `incoming` (consuming what rustls is done with), appends
    /// what rustls sends to `out`, and appends any application data the client sent right
    /// after its Finished to `early`. On failure the alert rustls chose is already in `out`:
    /// send it before closing.
    pub fn advance(
        &mut self,
        incoming: &mut ReadBuf,
        out: &mut Vec<u8>,
        early: &mut ReadBuf,
    ) -> Result<Want, TlsError> {
        loop {
            match self.step(incoming, out, early)? {
                Step::Again => {}
                Step::Want(want) => return Ok(want),
                Step::Failed(error) => {
                    self.collect_alert(incoming, out);
                    return Err(error.into());
                }
            }
        }
    }

    fn step(
        &mut self,
        incoming: &mut ReadBuf,
        out: &mut Vec<u8>,
        early: &mut ReadBuf,
    ) -> Result<Step, TlsError> {
        let UnbufferedStatus { discard, state } =
            self.conn.process_tls_records(incoming.data_mut());
        self.noted.absorb(take_noted());
        let peer_closed = matches!(state, Ok(ConnectionState::PeerClosed));
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
            Ok(ConnectionState::BlockedHandshake) => Step::Want(Want::Read),
            Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                while let Some(record) = traffic.next_record() {
                    let payload = record?.payload;
                    let spare = early.spare_mut();
                    if payload.len() > spare.len() {
                        return Err(TlsError::EarlyDataTooLong);
                    }
                    spare[..payload.len()].copy_from_slice(payload);
                    early.commit(payload.len());
                }
                Step::Again
            }
            Ok(ConnectionState::WriteTraffic(_)) => Step::Want(Want::Done),
            Ok(ConnectionState::PeerClosed) => Step::Want(Want::Done),
            Ok(ConnectionState::Closed) => return Err(TlsError::Eof),
            // 0-RTT is never offered (no tickets); anything newer is unknown to this code.
            Ok(_) => Step::Failed(rustls::Error::General("unexpected TLS state".into())),
            Err(error) => Step::Failed(error),
        };
        incoming.consume(discard);
        if peer_closed {
            // A client may send its one request and close_notify right after its Finished
            // (a CancelRequest does): the request in `early` is still served.
            if self.conn.is_handshaking() {
                return Err(TlsError::Eof);
            }
            self.peer_closed = true;
        }
        Ok(step)
    }

    /// After a failure rustls still hands out what it queued (the alert last), one chunk per
    /// call and before it would look at `incoming` again: encode it all into `out`. Asking
    /// once more than that would make rustls re-read the bad input and fail again.
    fn collect_alert(&mut self, incoming: &mut ReadBuf, out: &mut Vec<u8>) {
        while self.conn.wants_write() {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(incoming.data_mut());
            let Ok(ConnectionState::EncodeTlsData(mut encode)) = state else {
                break;
            };
            if encode_into(|buf| encode.encode(buf), out).is_err() {
                break;
            }
        }
        self.noted.absorb(take_noted());
    }

    /// The negotiated connection's record layer and what the handshake learned.
    pub fn finish(self) -> Result<(RecordLayer, Handshake), TlsError> {
        let handshake = Handshake {
            sni: self.noted.sni,
            alpn: self.conn.alpn_protocol() == Some(ALPN_POSTGRESQL),
            closed: self.peer_closed,
        };
        let traffic = match (self.noted.client_traffic, self.noted.server_traffic) {
            (Some(client), Some(server)) => Some(TrafficSecrets { client, server }),
            _ => None,
        };
        // The kernel connection is dropped at once: key updates are derived from `traffic`.
        let (keys, kernel) = self.conn.dangerous_into_kernel_connection()?;
        let records = RecordLayer::new(
            keys,
            kernel.protocol_version(),
            kernel.negotiated_cipher_suite(),
            traffic,
        )?;
        Ok((records, handshake))
    }
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
