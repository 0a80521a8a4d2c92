//! The client's connection while it is at the front door: its socket, TLS once it is up, and
//! buffers that it holds only while there are bytes in them.
//!
//! A connection that has not authenticated is an unknown party's, so it is kept cheap: the read
//! buffers are borrowed from the worker's pool only once the socket is readable, and given back
//! as soon as they are empty; the output buffers are freed after each flush.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use monoio::io::AsyncWriteRent;
use monoio::net::TcpStream;
use zeroize::Zeroizing;

use crate::buf::{read_into, write_all_vec, BufPool, ReadBuf};
use crate::error::SessionError;
use crate::protocol::frame::{self, FrameHeader};
use crate::tls::{self, Handshake, RecordError, RecordLayer, ServerHandshake, TlsError, Want};

/// How long the last bytes of a connection (a FATAL error, close_notify, an alert) may take to
/// reach a client that does not read them, and how long the router then waits for the client to
/// close before it drops the socket.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Bytes of a departing client read (and dropped) while waiting for it to close.
const CLOSE_DRAIN_BYTES: usize = 64 * 1024;

/// Output capacity kept across flushes; more is freed, since a connection at the front door
/// waits most of its time.
const KEEP_OUT_CAPACITY: usize = 256;

/// The client's connection from its first byte until it is authenticated.
pub struct ClientConn<'w> {
    tcp: TcpStream,
    pool: &'w BufPool,
    /// Bytes from the socket: plaintext before TLS, ciphertext after.
    raw: ReadBuf,
    /// Opened data from the client's records.
    plain: ReadBuf,
    /// Messages to send (plaintext, sealed on flush once TLS is up).
    out: Vec<u8>,
    /// Records to send (and the handshake's flights).
    tls_out: Vec<u8>,
    records: Option<Box<RecordLayer>>,
    handshake: Handshake,
}

/// What a connection hands over once the front door is done with it.
pub struct Parts {
    /// The socket.
    pub tcp: TcpStream,
    /// Record protection, both directions.
    pub records: Box<RecordLayer>,
    /// What the TLS handshake learned (SNI).
    pub handshake: Handshake,
    /// Ciphertext the client sent past its last opened record (normally none).
    pub cipher: Vec<u8>,
    /// Opened data not consumed yet: messages the client pipelined (normally none).
    pub plain: Vec<u8>,
}

/// An authenticated connection on its way to another worker ([`crate::handoff`]): everything a
/// [`ClientConn`] held, owned, with its socket out of the runtime that accepted it.
pub struct Moving {
    /// The socket, registered with no runtime.
    tcp: std::net::TcpStream,
    records: Box<RecordLayer>,
    handshake: Handshake,
    /// Ciphertext read past the last opened record.
    cipher: Vec<u8>,
    /// Opened bytes not consumed yet (wiped when dropped: it is the client's plaintext).
    plain: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Moving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Moving")
            .field("fd", &self.tcp.as_raw_fd())
            .field("cipher", &self.cipher.len())
            .field("plain", &self.plain.len())
            .finish_non_exhaustive()
    }
}

/// Why a connection could not move between workers.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// TLS is not up, or bytes are still waiting to be sent: the connection is not at a point
    /// where another worker can take it.
    #[error("the connection is not settled (no TLS, or unsent bytes)")]
    Unsettled,
    /// The socket could not be taken out of its runtime (no descriptor left for the copy).
    #[error("cannot take the socket out of its runtime: {0}")]
    Detach(std::io::Error),
    /// The socket could not be registered with the new worker's runtime.
    #[error("cannot register the socket with the worker's runtime: {0}")]
    Attach(std::io::Error),
    /// Buffered bytes larger than the new worker's buffers (which are the same size: a bug).
    #[error("buffered bytes larger than a buffer")]
    TooLong,
}

impl<'w> ClientConn<'w> {
    /// A connection that holds no buffer yet.
    pub fn new(tcp: TcpStream, pool: &'w BufPool) -> Self {
        Self {
            tcp,
            pool,
            raw: ReadBuf::detached(),
            plain: ReadBuf::detached(),
            out: Vec::new(),
            tls_out: Vec::new(),
            records: None,
            handshake: Handshake::default(),
        }
    }

    /// True once TLS is established.
    pub fn has_tls(&self) -> bool {
        self.records.is_some()
    }

    /// What the TLS handshake learned (SNI, ALPN).
    pub fn handshake(&self) -> &Handshake {
        &self.handshake
    }

    /// The socket's unread bytes before TLS (plaintext).
    pub fn raw(&self) -> &ReadBuf {
        &self.raw
    }

    /// Marks `n` bytes at the front of [`ClientConn::raw`] as used.
    pub fn consume_raw(&mut self, n: usize) {
        self.raw.consume(n);
        self.raw.detach(self.pool);
    }

    /// Drops every unread plaintext byte (what a client pipelined after an encryption request).
    pub fn discard_raw(&mut self) {
        self.raw.clear();
        self.raw.detach(self.pool);
    }

    /// Opened data from the client.
    pub fn plain(&self) -> &[u8] {
        self.plain.data()
    }

    /// Marks `n` bytes of opened data as used.
    pub fn consume_plain(&mut self, n: usize) {
        self.plain.consume(n);
        self.plain.detach(self.pool);
    }

    /// Messages waiting to be sent: write more into it, then [`ClientConn::flush`].
    pub fn out(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Reads once from the socket into `raw`, borrowing a buffer only once there are bytes to
    /// read. Returns 0 at end of stream.
    pub async fn fill_raw(&mut self) -> Result<usize, SessionError> {
        if self.raw.is_empty() {
            self.raw.detach(self.pool);
            self.tcp.readable(false).await?;
        }
        self.raw.attach(self.pool);
        let n = self.raw.fill_from(&mut self.tcp).await?;
        if n == 0 {
            self.raw.detach(self.pool);
        }
        Ok(n)
    }

    /// Sends everything in `out` (as TLS records once TLS is up).
    pub async fn flush(&mut self) -> Result<(), SessionError> {
        match &mut self.records {
            Some(records) => {
                tls::seal_into(records, &self.out, &mut self.tls_out).map_err(TlsError::from)?;
                self.out.clear();
                write_all_vec(&mut self.tcp, &mut self.tls_out).await?;
            }
            None => write_all_vec(&mut self.tcp, &mut self.out).await?,
        }
        shrink(&mut self.out);
        shrink(&mut self.tls_out);
        Ok(())
    }

    /// Runs the TLS handshake: `raw` holds what the client sent so far (the ClientHello's first
    /// bytes for direct SSL). Not cancel-safe (the caller drops the connection on timeout).
    pub async fn accept_tls(
        &mut self,
        config: std::sync::Arc<rustls::ServerConfig>,
    ) -> Result<(), SessionError> {
        // Boxed: rustls's connection state is large, and the future of the whole front door
        // would otherwise keep room for it after the handshake.
        let mut handshake = Box::new(ServerHandshake::new(config)?);
        loop {
            self.raw.attach(self.pool);
            let want = match handshake.advance(&mut self.raw, &mut self.tls_out) {
                Ok(want) => want,
                Err(error) => {
                    // The alert (rustls's, or internal_error for keys out of step) is in
                    // `tls_out`.
                    let _ = write_all_vec(&mut self.tcp, &mut self.tls_out).await;
                    return Err(error.into());
                }
            };
            write_all_vec(&mut self.tcp, &mut self.tls_out).await?;
            // The server's flight (its certificate chain) is not kept while the client answers.
            shrink(&mut self.tls_out);
            match want {
                Want::Write => {}
                Want::Read => {
                    if self.fill_raw().await? == 0 {
                        return Err(TlsError::Eof.into());
                    }
                }
                Want::Done => {
                    let (records, learned) = handshake.finish()?;
                    self.records = Some(Box::new(records));
                    self.handshake = learned;
                    shrink(&mut self.tls_out);
                    // What the client sent after its Finished (a StartupMessage, a KeyUpdate,
                    // close_notify) stays in `raw` for the record layer.
                    self.raw.detach(self.pool);
                    return Ok(());
                }
            }
        }
    }

    /// Reads more opened data into `plain`.
    pub async fn read_more(&mut self) -> Result<(), SessionError> {
        loop {
            let Some(records) = &mut self.records else {
                return Err(SessionError::Protocol("read before TLS"));
            };
            if !self.raw.is_empty() {
                self.plain.attach(self.pool);
                let before = self.plain.len();
                let open = tls::open_into(records, &mut self.raw, &mut self.plain)?;
                let opened = self.plain.len() > before;
                self.plain.detach(self.pool);
                self.raw.detach(self.pool);
                // Data that came before a close_notify is still served (a CancelRequest, say).
                if opened {
                    return Ok(());
                }
                if !open {
                    return Err(SessionError::ClientClosed);
                }
                if records
                    .record_len(self.raw.data())
                    .map_err(TlsError::from)?
                    .is_some()
                {
                    // A whole record is waiting that `plain` has no room for.
                    return Err(SessionError::Protocol("message too long"));
                }
            }
            if self.fill_raw().await? == 0 {
                return Err(SessionError::ClientClosed);
            }
        }
    }

    /// Waits for one whole message in `plain`, at most `max_bytes` long.
    pub async fn read_frame(&mut self, max_bytes: usize) -> Result<FrameHeader, SessionError> {
        loop {
            match frame::check(self.plain.data(), max_bytes) {
                Ok(Some(header)) => return Ok(header),
                Ok(None) => self.read_more().await?,
                Err(_) => return Err(SessionError::Protocol("invalid message length")),
            }
        }
    }

    /// Ends the connection in order: sends what is in `out` (a FATAL error, say), then
    /// close_notify when TLS is up, then waits (bounded) for the client to close, so that its
    /// unread bytes do not make the kernel reset the connection before ours arrive.
    pub async fn close(mut self) {
        let mut last = std::mem::take(&mut self.out);
        if let Some(records) = &mut self.records {
            let mut sealed = std::mem::take(&mut self.tls_out);
            if tls::seal_final_into(records, &last, &mut sealed).is_ok() {
                let _ = tls::close_notify_into(records, &mut sealed);
            }
            last = sealed;
        }
        self.send_last(last).await;
    }

    /// Ends the connection after the client's records broke `error`: sends the alert rustls
    /// would send for it (after any record the client is owed), then closes as [`close`] does.
    ///
    /// [`close`]: ClientConn::close
    pub async fn fail(mut self, error: &RecordError) {
        let mut last = std::mem::take(&mut self.tls_out);
        if let Some(records) = &mut self.records {
            tls::fatal_alert_into(records, error, &mut last);
        }
        self.send_last(last).await;
    }

    async fn send_last(mut self, mut last: Vec<u8>) {
        self.release_buffers();
        let _ = monoio::time::timeout(CLOSE_TIMEOUT, async {
            write_all_vec(&mut self.tcp, &mut last).await?;
            self.tcp.shutdown().await?;
            drain_until_closed(&mut self.tcp).await
        })
        .await;
    }

    /// Closes without a word (the client is gone, or is owed nothing).
    pub fn drop_silently(mut self) {
        self.release_buffers();
    }

    /// Hands the connection over after authentication: the socket, TLS state and the bytes the
    /// client sent beyond what the front door read.
    pub fn into_parts(mut self) -> Option<Parts> {
        let cipher = self.raw.data().to_vec();
        let plain = self.plain.data().to_vec();
        self.release_buffers();
        let records = self.records.take()?;
        Some(Parts {
            tcp: self.tcp,
            records,
            handshake: std::mem::take(&mut self.handshake),
            cipher,
            plain,
        })
    }

    /// Takes the connection out of this worker's runtime for another worker: the socket, the
    /// TLS state (keys and sequence numbers both ways) and the bytes read but not used, copied
    /// out of this worker's buffers. The connection must be settled: TLS up, nothing left to
    /// send. On failure it is given back untouched (boxed: that is the rare way).
    ///
    /// The socket leaves as a duplicate of its descriptor; monoio then closes the original
    /// (the socket lives on in the duplicate). monoio's own `into_raw_fd` would panic if an
    /// operation still held the descriptor; none does here: every read and write of a
    /// [`ClientConn`] is awaited to its end, and the only operations ever dropped in flight
    /// (at a timeout or the drain's end) end the connection instead of letting it get here.
    pub fn into_moving(self) -> Result<Moving, (Box<Self>, MoveError)> {
        if self.records.is_none() || !self.out.is_empty() || !self.tls_out.is_empty() {
            return Err((Box::new(self), MoveError::Unsettled));
        }
        // SAFETY: the descriptor belongs to `self.tcp`, which is alive (and keeps it open)
        // for the whole borrow.
        let borrowed = unsafe { BorrowedFd::borrow_raw(self.tcp.as_raw_fd()) };
        let owned = match borrowed.try_clone_to_owned() {
            Ok(owned) => owned,
            Err(error) => return Err((Box::new(self), MoveError::Detach(error))),
        };
        let mut this = self;
        let cipher = this.raw.data().to_vec();
        let plain = Zeroizing::new(this.plain.data().to_vec());
        this.release_buffers();
        let Some(records) = this.records.take() else {
            return Err((Box::new(this), MoveError::Unsettled));
        };
        let ClientConn { tcp, handshake, .. } = this;
        drop(tcp);
        Ok(Moving {
            tcp: std::net::TcpStream::from(owned),
            records,
            handshake,
            cipher,
            plain,
        })
    }

    /// A connection [`ClientConn::into_moving`] took out of another worker's runtime, in this
    /// worker's (`pool` is its buffers): it goes on where it stopped. On failure the socket is
    /// closed.
    pub fn from_moving(moving: Moving, pool: &'w BufPool) -> Result<Self, MoveError> {
        let Moving {
            tcp,
            records,
            handshake,
            cipher,
            plain,
        } = moving;
        let tcp = TcpStream::from_std(tcp).map_err(MoveError::Attach)?;
        let mut conn = ClientConn::new(tcp, pool);
        conn.records = Some(records);
        conn.handshake = handshake;
        refill(&mut conn.raw, pool, &cipher)?;
        refill(&mut conn.plain, pool, &plain)?;
        Ok(conn)
    }

    fn release_buffers(&mut self) {
        self.raw.clear();
        self.plain.clear();
        self.raw.detach(self.pool);
        self.plain.detach(self.pool);
    }
}

/// Puts `bytes` into an empty, detached `buf`, borrowing a buffer from `pool` only if there are
/// any.
fn refill(buf: &mut ReadBuf, pool: &BufPool, bytes: &[u8]) -> Result<(), MoveError> {
    if bytes.is_empty() {
        return Ok(());
    }
    buf.attach(pool);
    let spare = buf.spare_mut();
    let Some(room) = spare.get_mut(..bytes.len()) else {
        return Err(MoveError::TooLong);
    };
    room.copy_from_slice(bytes);
    buf.commit(bytes.len());
    Ok(())
}

/// Frees an output buffer's allocation when it is more than a small one.
fn shrink(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > KEEP_OUT_CAPACITY {
        *buf = Vec::new();
    }
}

/// Reads and drops what the client still sends until it closes (bounded by
/// [`CLOSE_DRAIN_BYTES`]; the caller bounds the time).
async fn drain_until_closed(tcp: &mut TcpStream) -> std::io::Result<()> {
    let mut buf: Box<[u8]> = vec![0; 512].into_boxed_slice();
    let mut drained = 0;
    while drained < CLOSE_DRAIN_BYTES {
        let len = buf.len();
        match read_into(tcp, &mut buf, 0..len).await? {
            0 => break,
            n => drained += n,
        }
    }
    Ok(())
}
