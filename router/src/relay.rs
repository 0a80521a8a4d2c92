//! Step 5 of a session: bytes both ways between the client (TLS records) and its backend.
//!
//! Two loops, one per direction, run concurrently in the session's task; neither ever waits on
//! the other, so a client and a backend that both send more than the socket buffers hold cannot
//! deadlock through the router. Every socket operation is an io_uring submission, so a busy
//! worker sends many of them to the kernel in one system call.
//!
//! Each direction borrows one buffer from the worker's pool only while bytes are in flight: it
//! waits for readability without one (an io_uring poll), so an idle session holds no buffer at
//! all. Records are opened and sealed in place in those buffers:
//! - client to backend: ciphertext is read in at the end; each whole record is opened where it
//!   lies and its data moved down to the front, which is what the backend is sent;
//! - backend to client: plaintext is read in behind room for a record header and sealed in
//!   place into one record (after a TLS 1.3 KeyUpdate when one is due). A record the client
//!   is owed for what it sent (the KeyUpdate it asked for) goes out at once, without waiting
//!   for backend data.
//!
//! The buffers hold plaintext: one dropped with its task (rather than given back to the pool)
//! is zeroed first. Given back, it is not: the pool zeroes what it frees (`BufPool`).

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::task::{Poll, Waker};
use std::time::Duration;

use monoio::net::tcp::{TcpOwnedReadHalf, TcpOwnedWriteHalf};
use monoio::net::TcpStream;

use crate::buf::{read_into, wipe, write_from, BufPool};
use crate::error::KillReason;
use crate::tls::{Opened, RecordError, RecordLayer, MAX_PLAINTEXT};
use crate::worker::{SessionHandle, Worker};

/// How long the last bytes (a FATAL error, close_notify) may take to reach a peer that has
/// stopped reading, before the connection is dropped.
pub const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// How a relayed session ended.
#[derive(Debug)]
pub enum End {
    /// The client closed (end of stream or close_notify).
    ClientClosed,
    /// The backend closed its connection.
    BackendClosed,
    /// The client's socket or records failed.
    ClientError(ClientFailure),
    /// The backend's socket failed.
    BackendError(io::Error),
    /// The router ended the session. `clean` is false if a record was on its way to the client
    /// at that moment: nothing more can follow it.
    Killed {
        /// Why.
        reason: KillReason,
        /// No record was half sent.
        clean: bool,
    },
}

/// What went wrong on the client's side of a relay.
#[derive(Debug, thiserror::Error)]
pub enum ClientFailure {
    /// Socket error.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// A bad record, or the session's keys ran out.
    #[error("TLS: {0}")]
    Record(#[from] RecordError),
}

/// Waits until the socket behind `half` is readable, without lending a buffer to the kernel.
async fn readable(half: &TcpOwnedReadHalf) -> io::Result<()> {
    // SAFETY: this is the access pattern of monoio's own split halves, which share the stream
    // through this cell: TcpStream's operations only clone its fd into an io_uring/epoll
    // operation and keep no reference into the stream, and both halves live on this thread.
    // `readable` needs only `&self`.
    let stream: &TcpStream = unsafe { &*half.0.get() };
    stream.readable(false).await
}

/// Client to backend: `buf[sent..plain_end]` is opened data for the backend,
/// `buf[cipher_start..cipher_end]` ciphertext not yet opened (a partial record).
#[derive(Default)]
struct Upstream {
    buf: Box<[u8]>,
    sent: usize,
    plain_end: usize,
    cipher_start: usize,
    cipher_end: usize,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        wipe(&mut self.buf);
    }
}

impl Upstream {
    /// Starts with ciphertext the client sent past its last whole record during startup.
    fn with_cipher(cipher: &[u8], pool: &BufPool) -> Upstream {
        let mut up = Upstream::default();
        if !cipher.is_empty() {
            up.buf = pool.take();
            up.buf[..cipher.len()].copy_from_slice(cipher);
            up.cipher_end = cipher.len();
        }
        up
    }

    fn holds_partial_record(&self) -> bool {
        self.cipher_start < self.cipher_end
    }

    /// Reads ciphertext from the client behind the partial record, if any. `Ok(0)`: closed.
    /// Not cancel-safe (the buffer is with the kernel while the read runs).
    async fn read(&mut self, from: &mut TcpOwnedReadHalf, pool: &BufPool) -> io::Result<usize> {
        if self.buf.is_empty() {
            self.buf = pool.take();
        }
        // All opened data has been sent: keep the partial record at the front.
        self.buf.copy_within(self.cipher_start..self.cipher_end, 0);
        self.cipher_end -= self.cipher_start;
        (self.sent, self.plain_end, self.cipher_start) = (0, 0, 0);
        // A partial record is shorter than a whole one, and the buffer holds a whole one.
        debug_assert!(self.cipher_end < self.buf.len());
        let range = self.cipher_end..self.buf.len();
        let n = read_into(from, &mut self.buf, range).await?;
        self.cipher_end += n;
        Ok(n)
    }

    /// Opens every whole record in place. Returns false if the client sent close_notify.
    fn open(&mut self, records: &mut RecordLayer) -> Result<bool, RecordError> {
        while let Some(len) = records.record_len(&self.buf[self.cipher_start..self.cipher_end])? {
            let record = self.cipher_start..self.cipher_start + len;
            let opened = records.open(&mut self.buf[record.clone()])?;
            self.cipher_start = record.end;
            match opened {
                Opened::Data(data) => {
                    let data = record.start + data.start..record.start + data.end;
                    let len = data.len();
                    self.buf.copy_within(data, self.plain_end);
                    self.plain_end += len;
                }
                Opened::Closed => return Ok(false),
                Opened::Nothing => {}
            }
        }
        Ok(true)
    }

    /// Sends the opened data to the backend. Not cancel-safe.
    async fn write(&mut self, to: &mut TcpOwnedWriteHalf) -> io::Result<()> {
        if self.sent == self.plain_end {
            return Ok(());
        }
        write_from(to, &mut self.buf, self.sent..self.plain_end).await?;
        self.sent = self.plain_end;
        Ok(())
    }

    /// Hands the buffer back to the pool when it holds nothing.
    fn release(&mut self, pool: &BufPool) {
        if self.sent == self.plain_end && !self.holds_partial_record() && !self.buf.is_empty() {
            pool.give(std::mem::take(&mut self.buf));
            *self = Upstream::default();
        }
    }
}

/// Raised by the client-to-backend loop when the client is owed a record for what it sent (a
/// KeyUpdate it asked for, a TLS 1.2 renegotiation refusal), so that the backend-to-client
/// loop, the only one writing to the client, sends it at once, as rustls sends what it queues,
/// rather than with the backend's next data.
#[derive(Default)]
struct ControlOwed {
    raised: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl ControlOwed {
    fn raise(&self) {
        self.raised.set(true);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// Resolves once raised (and lowers it). Cancel-safe.
    async fn wait(&self) {
        poll_fn(|cx| match self.raised.replace(false) {
            true => Poll::Ready(()),
            false => {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

/// Backend to client: `buf[sent..end]` is sealed records for the client.
#[derive(Default)]
struct Downstream {
    buf: Box<[u8]>,
    sent: usize,
    end: usize,
}

impl Drop for Downstream {
    fn drop(&mut self) {
        wipe(&mut self.buf);
    }
}

impl Downstream {
    /// Reads what the backend sent and seals it into one record, after a KeyUpdate if one is
    /// due. Returns false when the backend closed. Not cancel-safe.
    async fn read(
        &mut self,
        from: &mut TcpOwnedReadHalf,
        records: &RefCell<&mut RecordLayer>,
        pool: &BufPool,
    ) -> Result<bool, ReadError> {
        if self.buf.is_empty() {
            self.buf = pool.take();
        }
        // Room in front for a control record the client may be owed by the time the data is
        // sealed (a KeyUpdate it asked for meanwhile), so that it goes out with the data.
        let (room, header, trailer) = {
            let records = records.borrow();
            (
                records.control_room(),
                records.seal_header_len(),
                records.seal_trailer_len(),
            )
        };
        let at = room + header;
        let plain_room = (self.buf.len() - at - trailer).min(MAX_PLAINTEXT);
        let n = read_into(from, &mut self.buf, at..at + plain_room)
            .await
            .map_err(ReadError::Io)?;
        if n == 0 {
            return Ok(false);
        }
        let mut records = records.borrow_mut();
        let control = records.control_len();
        self.sent = room - control;
        if control > 0 {
            records.seal_control(&mut self.buf[self.sent..room])?;
        }
        self.end = room + records.seal(&mut self.buf[room..], n)?;
        Ok(true)
    }

    /// Seals the control records the client is owed, if any are still due (the data may have
    /// taken them along meanwhile). Returns false if there was nothing to send.
    fn seal_control(
        &mut self,
        records: &RefCell<&mut RecordLayer>,
        pool: &BufPool,
    ) -> Result<bool, RecordError> {
        let mut records = records.borrow_mut();
        let len = records.control_len();
        if len == 0 {
            return Ok(false);
        }
        if self.buf.is_empty() {
            self.buf = pool.take();
        }
        records.seal_control(&mut self.buf[..len])?;
        (self.sent, self.end) = (0, len);
        Ok(true)
    }

    /// Sends the sealed records to the client. Not cancel-safe.
    async fn write(&mut self, to: &mut TcpOwnedWriteHalf) -> io::Result<()> {
        write_from(to, &mut self.buf, self.sent..self.end).await?;
        self.sent = self.end;
        Ok(())
    }

    fn release(&mut self, pool: &BufPool) {
        if !self.buf.is_empty() {
            pool.give(std::mem::take(&mut self.buf));
            *self = Downstream::default();
        }
    }
}

/// Why reading from the backend failed.
#[derive(Debug)]
enum ReadError {
    Io(io::Error),
    Record(RecordError),
}

impl From<RecordError> for ReadError {
    fn from(error: RecordError) -> Self {
        ReadError::Record(error)
    }
}

/// The two halves of the client's and of the backend's socket.
pub struct Sockets {
    /// Reading from the client.
    pub client_rd: TcpOwnedReadHalf,
    /// Writing to the client.
    pub client_wr: TcpOwnedWriteHalf,
    /// Reading from the backend.
    pub backend_rd: TcpOwnedReadHalf,
    /// Writing to the backend.
    pub backend_wr: TcpOwnedWriteHalf,
}

/// Relays until one side ends or `kill` fires. `cipher` is ciphertext the client sent past its
/// last whole record during startup (normally none).
/// While the relay waits for the client, `handle.quiet` counts: quiet for a second or more,
/// the expanded TLS keys are shed, and the next record rebuilds its direction's.
pub async fn run(
    sockets: &mut Sockets,
    records: &mut RecordLayer,
    cipher: &[u8],
    handle: &SessionHandle,
    worker: &Worker,
) -> End {
    let (kill, quiet, pool) = (&handle.kill, &handle.quiet, &worker.buffers);
    let Sockets {
        client_rd,
        client_wr,
        backend_rd,
        backend_wr,
    } = sockets;
    let records = RefCell::new(records);
    // True while a write to the client is in flight: a record may be half sent.
    let writing_to_client = Cell::new(false);
    let control_owed = ControlOwed::default();

    let client_to_backend = async {
        let mut up = Upstream::with_cipher(cipher, pool);
        loop {
            if !up.holds_partial_record() {
                up.release(pool);
                quiet.begin(worker.quiet_rounds());
                let readable = readable(client_rd).await;
                quiet.end();
                if let Err(e) = readable {
                    return End::ClientError(e.into());
                }
            }
            match up.read(client_rd, pool).await {
                Ok(0) => return End::ClientClosed,
                Ok(_) => {}
                Err(e) => return End::ClientError(e.into()),
            }
            let open = match up.open(&mut records.borrow_mut()) {
                Ok(open) => open,
                Err(e) => return End::ClientError(e.into()),
            };
            if records.borrow().owes_control() {
                control_owed.raise();
            }
            // Data before a close_notify (a Terminate) still goes to the backend.
            if let Err(e) = up.write(backend_wr).await {
                return End::BackendError(e);
            }
            if !open {
                return End::ClientClosed;
            }
        }
    };
    let backend_to_client = async {
        let mut down = Downstream::default();
        loop {
            down.release(pool);
            // Both are cancel-safe: a readiness poll, and a flag.
            let backend_readable = monoio::select! {
                readable = readable(backend_rd) => Some(readable),
                () = control_owed.wait() => None,
            };
            match backend_readable {
                Some(Err(e)) => return End::BackendError(e),
                Some(Ok(())) => match down.read(backend_rd, &records, pool).await {
                    Ok(true) => {}
                    Ok(false) => return End::BackendClosed,
                    Err(ReadError::Io(e)) => return End::BackendError(e),
                    Err(ReadError::Record(e)) => return End::ClientError(e.into()),
                },
                None => match down.seal_control(&records, pool) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => return End::ClientError(e.into()),
                },
            }
            writing_to_client.set(true);
            let written = down.write(client_wr).await;
            writing_to_client.set(false);
            if let Err(e) = written {
                return End::ClientError(e.into());
            }
        }
    };
    let mut client_to_backend = std::pin::pin!(client_to_backend);
    let mut backend_to_client = std::pin::pin!(backend_to_client);
    loop {
        monoio::select! {
            end = &mut client_to_backend => return end,
            end = &mut backend_to_client => return end,
            reason = kill.wait() => return End::Killed { reason, clean: !writing_to_client.get() },
            () = quiet.due() => {}
        }
        // The client has been quiet for a second or more (a query of the backend's may still
        // run: its answer rebuilds the sending key).
        quiet.end();
        if let Ok(mut records) = records.try_borrow_mut() {
            records.shed_keys();
            tracing::trace!("quiet session shed its TLS keys");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::WIPED;

    /// A relay's buffers go back to the pool as they are when released, and are zeroed when
    /// dropped with their task.
    #[test]
    fn relay_buffers_are_zeroed_when_dropped() {
        let pool = BufPool::default();
        let wiped = || WIPED.with(|wiped| wiped.get());
        let before = wiped();
        let mut up = Upstream::with_cipher(b"partial record", &pool);
        up.cipher_start = up.cipher_end;
        up.release(&pool);
        assert_eq!(wiped(), before, "released to the pool");
        drop(Upstream::with_cipher(b"partial record", &pool));
        let down = Downstream {
            buf: pool.take(),
            ..Downstream::default()
        };
        drop(down);
        drop(Downstream::default());
        assert_eq!(wiped(), before + 2, "dropped with their task");
    }
}
