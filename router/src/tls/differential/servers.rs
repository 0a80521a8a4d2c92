//! The two servers under comparison, fed the same bytes: rustls's buffered `ServerConnection`
//! (read_tls as much as its buffer takes, process, drain the plaintext), and the router's
//! `ServerHandshake` then `RecordLayer` (a pool-sized read buffer, `open_into`).

use std::io::{ErrorKind, Read, Write};
use std::sync::Arc;

use rustls::{ServerConfig, ServerConnection};

use crate::buf::{ReadBuf, POOL_BUFFER_BYTES};
use crate::tls::{
    close_notify_into, fatal_alert_into, open_into, seal_into, RecordError, RecordLayer,
    ServerHandshake, TlsError, Want,
};

/// Why a server stopped.
#[derive(Debug)]
pub enum Failure {
    /// rustls's connection failed.
    Rustls(rustls::Error),
    /// rustls's `read_tls` refused more bytes (its buffer is full).
    RustlsBufferFull,
    /// Our handshake failed.
    Handshake(TlsError),
    /// Our record layer failed.
    Record(RecordError),
}

/// What a server did with what it was sent.
#[derive(Debug, Default)]
pub struct Observed {
    /// Application data delivered.
    pub plaintext: Vec<u8>,
    /// close_notify seen.
    pub closed: bool,
    /// Everything sent after the handshake (or during it, for bytes sent with the Finished).
    pub sent: Vec<u8>,
    /// Why it stopped, if it did.
    pub failure: Option<Failure>,
}

/// rustls's own server.
pub struct RustlsServer {
    conn: ServerConnection,
    pub observed: Observed,
}

impl RustlsServer {
    pub fn new(config: Arc<ServerConfig>) -> Result<RustlsServer, rustls::Error> {
        Ok(RustlsServer {
            conn: ServerConnection::new(config)?,
            observed: Observed::default(),
        })
    }

    /// Feeds `bytes` as a peer's write would arrive: as much as `read_tls` takes at a time,
    /// each followed by `process_new_packets`.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.observed.failure.is_none() && !self.observed.closed {
            match self.conn.read_tls(&mut bytes) {
                // Nothing more is read after close_notify.
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => {
                    self.observed.failure = Some(Failure::RustlsBufferFull);
                    break;
                }
            }
            let processed = self.conn.process_new_packets();
            self.drain();
            match processed {
                Ok(state) => self.observed.closed = state.peer_has_closed(),
                Err(error) => self.observed.failure = Some(Failure::Rustls(error)),
            }
        }
    }

    /// Moves delivered plaintext and sent records out of the connection.
    fn drain(&mut self) {
        let mut chunk = [0u8; 4096];
        loop {
            match self.conn.reader().read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => self.observed.plaintext.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
        }
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut self.observed.sent).is_err() {
                break;
            }
        }
    }

    /// True once the handshake is over.
    pub fn connected(&self) -> bool {
        !self.conn.is_handshaking()
    }

    /// Takes the bytes sent so far (the handshake flights).
    pub fn take_sent(&mut self) -> Vec<u8> {
        self.drain();
        std::mem::take(&mut self.observed.sent)
    }

    /// Sends application data a record's worth at a time, taking the records out in between:
    /// rustls cuts a write at its 64 KiB of pending records, which would move the record
    /// boundaries away from those of `seal_into`.
    pub fn send(&mut self, data: &[u8]) {
        for chunk in data.chunks(crate::tls::MAX_PLAINTEXT) {
            let written = self.conn.writer().write_all(chunk);
            self.drain();
            if written.is_err() {
                return;
            }
        }
    }

    /// Sends close_notify.
    pub fn close(&mut self) {
        self.conn.send_close_notify();
        self.drain();
    }
}

/// The router's server.
pub struct OurServer {
    handshake: Option<ServerHandshake>,
    records: Option<RecordLayer>,
    raw: ReadBuf,
    plain: ReadBuf,
    out: Vec<u8>,
    pub observed: Observed,
}

impl OurServer {
    pub fn new(config: Arc<ServerConfig>) -> Result<OurServer, TlsError> {
        Ok(OurServer {
            handshake: Some(ServerHandshake::new(config)?),
            records: None,
            raw: ReadBuf::new(POOL_BUFFER_BYTES),
            plain: ReadBuf::new(POOL_BUFFER_BYTES),
            out: Vec::new(),
            observed: Observed::default(),
        })
    }

    /// True once the handshake is over.
    pub fn connected(&self) -> bool {
        self.records.is_some()
    }

    /// The record layer, once the handshake is over.
    pub fn records_mut(&mut self) -> Option<&mut RecordLayer> {
        self.records.as_mut()
    }

    /// Feeds `bytes` through a read buffer the size of the router's: as much as it holds at a
    /// time, then the handshake or the record layer takes what it can.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        loop {
            if self.observed.failure.is_some() || self.observed.closed {
                return;
            }
            let spare = self.raw.spare_mut();
            let n = bytes.len().min(spare.len());
            spare[..n].copy_from_slice(&bytes[..n]);
            self.raw.commit(n);
            bytes = &bytes[n..];
            self.pump();
            if bytes.is_empty() {
                return;
            }
            if n == 0 && self.raw.spare_mut().is_empty() {
                panic!("differential: our read buffer is full without a whole record");
            }
        }
    }

    fn pump(&mut self) {
        if let Some(handshake) = self.handshake.as_mut() {
            loop {
                match handshake.advance(&mut self.raw, &mut self.out) {
                    Ok(Want::Write) => self.observed.sent.append(&mut self.out),
                    Ok(Want::Read) => {
                        self.observed.sent.append(&mut self.out);
                        return;
                    }
                    Ok(Want::Done) => {
                        self.observed.sent.append(&mut self.out);
                        break;
                    }
                    Err(error) => {
                        self.observed.sent.append(&mut self.out);
                        self.observed.failure = Some(Failure::Handshake(error));
                        return;
                    }
                }
            }
            let finished = self.handshake.take().map(ServerHandshake::finish);
            match finished {
                Some(Ok((records, _))) => self.records = Some(records),
                Some(Err(error)) => {
                    self.observed.failure = Some(Failure::Handshake(error));
                    return;
                }
                None => return,
            }
        }
        let Some(records) = self.records.as_mut() else {
            return;
        };
        let opened = open_into(records, &mut self.raw, &mut self.plain);
        self.observed.plaintext.extend_from_slice(self.plain.data());
        self.plain.clear();
        // rustls sends a renegotiation refusal as soon as it reads the ClientHello (a KeyUpdate
        // it owes waits for its next record): so does the relay (and the KeyUpdate too).
        if records.protocol_version() == rustls::ProtocolVersion::TLSv1_2 && records.owes_control()
        {
            let start = self.observed.sent.len();
            self.observed.sent.resize(start + records.control_room(), 0);
            let sealed = records.seal_control(&mut self.observed.sent[start..]);
            self.observed
                .sent
                .truncate(start + *sealed.as_ref().unwrap_or(&0));
        }
        match opened {
            Ok(true) => {}
            Ok(false) => self.observed.closed = true,
            Err(TlsError::Record(error)) => {
                fatal_alert_into(records, &error, &mut self.observed.sent);
                self.observed.failure = Some(Failure::Record(error));
            }
            Err(error) => self.observed.failure = Some(Failure::Handshake(error)),
        }
    }

    /// Takes the bytes sent so far (the handshake flights).
    pub fn take_sent(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.observed.sent)
    }

    /// Sends application data.
    pub fn send(&mut self, data: &[u8]) {
        if let Some(records) = self.records.as_mut() {
            if let Err(error) = seal_into(records, data, &mut self.observed.sent) {
                self.observed.failure = Some(Failure::Record(error));
            }
        }
    }

    /// Sends close_notify.
    pub fn close(&mut self) {
        if let Some(records) = self.records.as_mut() {
            if let Err(error) = close_notify_into(records, &mut self.observed.sent) {
                self.observed.failure = Some(Failure::Record(error));
            }
        }
    }
}
