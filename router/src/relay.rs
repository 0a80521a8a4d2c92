//! Step 5 of a session: bytes both ways between the client (TLS records) and its backend.
//!
//! One loop drives both directions from readiness. It moves bytes with non-blocking `recv` and
//! `send` until neither direction can go on, then waits (an io_uring poll, or epoll on the
//! legacy driver) for just the sockets that block it, and for the session's kill signal.
//! Neither direction ever waits on the other, so a client and a backend that both send more
//! than the socket buffers hold cannot deadlock through the router.
//!
//! Each direction has one buffer from the worker's pool, held only while bytes are in flight:
//! an idle session holds no buffer at all. Records are opened and sealed in place there:
//! - client to backend: ciphertext is read in at the end; each whole record is opened where it
//!   lies and its data moved down to the front, which is what the backend is sent;
//! - backend to client: plaintext is read in behind room for a record header and sealed in
//!   place into one record, which is what the client is sent.

use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use monoio::net::TcpStream;

use crate::buf::BufPool;
use crate::error::KillReason;
use crate::tls::record::CONTROL_RECORD_ROOM;
use crate::tls::{RecordError, RecordLayer, MAX_PLAINTEXT};
use crate::worker::Signal;

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
    /// The router ended the session.
    Killed(KillReason),
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

/// Non-blocking `recv`: `Ok(0)` is end of stream, `WouldBlock` means wait for readability.
fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Non-blocking `send` (no SIGPIPE): `WouldBlock` means wait for writability.
fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the whole call.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

fn would_block(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::WouldBlock
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

impl Upstream {
    fn has_plain(&self) -> bool {
        self.sent < self.plain_end
    }

    /// Reads ciphertext from the client (only once all opened data is sent) and opens every
    /// whole record. Returns `Ok(false)` when the client has closed.
    fn read(
        &mut self,
        fd: RawFd,
        records: &mut RecordLayer,
        pool: &BufPool,
    ) -> Result<bool, ReadError> {
        debug_assert!(!self.has_plain());
        if self.buf.is_empty() {
            self.buf = pool.take();
        }
        // Keep the partial record at the front; everything before it has been sent.
        self.buf.copy_within(self.cipher_start..self.cipher_end, 0);
        self.cipher_end -= self.cipher_start;
        (self.sent, self.plain_end, self.cipher_start) = (0, 0, 0);
        let n = recv(fd, &mut self.buf[self.cipher_end..]).map_err(ReadError::Io)?;
        if n == 0 {
            return Ok(false);
        }
        self.cipher_end += n;
        self.open(records)
    }

    fn open(&mut self, records: &mut RecordLayer) -> Result<bool, ReadError> {
        let mut open = true;
        while let Some(len) = records.record_len(&self.buf[self.cipher_start..self.cipher_end])? {
            let record = self.cipher_start..self.cipher_start + len;
            match records.open(&mut self.buf[record.clone()])? {
                crate::tls::Opened::Data(data) => {
                    let data = record.start + data.start..record.start + data.end;
                    let len = data.len();
                    self.buf.copy_within(data, self.plain_end);
                    self.plain_end += len;
                }
                crate::tls::Opened::Closed => open = false,
                crate::tls::Opened::Nothing => {}
            }
            self.cipher_start = record.end;
            if !open {
                break;
            }
        }
        Ok(open)
    }

    /// Sends opened data to the backend.
    fn write(&mut self, fd: RawFd) -> io::Result<()> {
        let n = send(fd, &self.buf[self.sent..self.plain_end])?;
        self.sent += n;
        Ok(())
    }

    /// Hands the buffer back to the pool when it holds nothing.
    fn release(&mut self, pool: &BufPool) {
        if !self.has_plain() && self.cipher_start == self.cipher_end && !self.buf.is_empty() {
            pool.give(std::mem::take(&mut self.buf));
            *self = Upstream::default();
        }
    }
}

/// Why reading from the client failed.
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

/// Backend to client: `buf[sent..end]` is sealed records for the client.
#[derive(Default)]
struct Downstream {
    buf: Box<[u8]>,
    sent: usize,
    end: usize,
}

impl Downstream {
    fn has_records(&self) -> bool {
        self.sent < self.end
    }

    /// Reads from the backend (only once everything sealed is sent) and seals what came as
    /// one record, after a KeyUpdate if one is due. Returns `Ok(false)` when the backend closed.
    fn read(
        &mut self,
        fd: RawFd,
        records: &mut RecordLayer,
        pool: &BufPool,
    ) -> Result<bool, ReadError> {
        debug_assert!(!self.has_records());
        if self.buf.is_empty() {
            self.buf = pool.take();
        }
        (self.sent, self.end) = (0, 0);
        if records.key_update_due() {
            self.end = records.seal_key_update(&mut self.buf[..CONTROL_RECORD_ROOM])?;
        }
        let at = self.end + records.seal_header_len();
        let room = (self.buf.len() - at - records.seal_trailer_len()).min(MAX_PLAINTEXT);
        match recv(fd, &mut self.buf[at..at + room]) {
            Ok(0) => Ok(false),
            Ok(n) => {
                self.end += records.seal(&mut self.buf[self.end..], n)?;
                Ok(true)
            }
            // A KeyUpdate alone still goes out.
            Err(error) if would_block(&error) && self.end > 0 => Ok(true),
            Err(error) => Err(ReadError::Io(error)),
        }
    }

    fn write(&mut self, fd: RawFd) -> io::Result<()> {
        let n = send(fd, &self.buf[self.sent..self.end])?;
        self.sent += n;
        Ok(())
    }

    fn release(&mut self, pool: &BufPool) {
        if !self.has_records() && !self.buf.is_empty() {
            pool.give(std::mem::take(&mut self.buf));
            *self = Downstream::default();
        }
    }
}

/// What is known about a socket's readiness: `true` until a call would block.
#[derive(Clone, Copy)]
struct Ready {
    read: bool,
    write: bool,
}

/// Relays until one side ends or `kill` fires. `cipher` is ciphertext the client sent past its
/// last whole record during startup (normally none).
///
/// Returns the end, and whatever sealed records were still on their way to the client (they go
/// out before any final message).
pub async fn run(
    client: &TcpStream,
    backend: &TcpStream,
    records: &mut RecordLayer,
    cipher: &[u8],
    kill: &Signal<KillReason>,
    pool: &BufPool,
) -> (End, Vec<u8>) {
    let (cfd, bfd) = (client.as_raw_fd(), backend.as_raw_fd());
    let mut up = Upstream::default();
    if !cipher.is_empty() {
        up.buf = pool.take();
        up.buf[..cipher.len()].copy_from_slice(cipher);
        up.cipher_end = cipher.len();
    }
    let mut down = Downstream::default();
    let (mut c, mut b) = (
        Ready {
            read: true,
            write: true,
        },
        Ready {
            read: true,
            write: true,
        },
    );

    // One readiness wait per socket and direction, kept armed across turns of the loop so
    // that a wait is never cancelled and resubmitted.
    let mut client_readable = pin!(None);
    let mut client_writable = pin!(None);
    let mut backend_readable = pin!(None);
    let mut backend_writable = pin!(None);
    let mut killed = pin!(kill.wait());

    let end = 'relay: loop {
        // Move bytes until nothing moves.
        loop {
            let mut moved = false;
            if up.has_plain() && b.write {
                match up.write(bfd) {
                    Ok(()) => moved = true,
                    Err(e) if would_block(&e) => b.write = false,
                    Err(e) => break 'relay End::BackendError(e),
                }
            }
            if !up.has_plain() && c.read {
                match up.read(cfd, records, pool) {
                    Ok(true) => moved = true,
                    Ok(false) => {
                        // Forward what came before the end (a Terminate) on a best-effort basis.
                        if up.has_plain() {
                            let _ = up.write(bfd);
                        }
                        break 'relay End::ClientClosed;
                    }
                    Err(ReadError::Io(e)) if would_block(&e) => c.read = false,
                    Err(ReadError::Io(e)) => break 'relay End::ClientError(e.into()),
                    Err(ReadError::Record(e)) => break 'relay End::ClientError(e.into()),
                }
            }
            if down.has_records() && c.write {
                match down.write(cfd) {
                    Ok(()) => moved = true,
                    Err(e) if would_block(&e) => c.write = false,
                    Err(e) => break 'relay End::ClientError(e.into()),
                }
            }
            if !down.has_records() && b.read {
                match down.read(bfd, records, pool) {
                    Ok(true) => moved = true,
                    Ok(false) => break 'relay End::BackendClosed,
                    Err(ReadError::Io(e)) if would_block(&e) => b.read = false,
                    Err(ReadError::Io(e)) => break 'relay End::BackendError(e),
                    Err(ReadError::Record(e)) => break 'relay End::ClientError(e.into()),
                }
            }
            if !moved {
                break;
            }
        }
        up.release(pool);
        down.release(pool);

        // Wait for whatever blocks progress.
        let want_client_read = !c.read && !up.has_plain();
        let want_backend_write = !b.write && up.has_plain();
        let want_backend_read = !b.read && !down.has_records();
        let want_client_write = !c.write && down.has_records();
        let woken = poll_fn(|cx| {
            let mut woken = false;
            macro_rules! watch {
                ($wanted:expr, $slot:ident, $arm:expr, $flag:expr) => {
                    if $wanted && $slot.is_none() {
                        $slot.set(Some($arm));
                    }
                    if let Some(wait) = $slot.as_mut().as_pin_mut() {
                        // An error shows up again in the next recv/send, with its cause.
                        if wait.poll(cx).is_ready() {
                            $slot.set(None);
                            $flag = true;
                            woken = true;
                        }
                    }
                };
            }
            watch!(
                want_client_read,
                client_readable,
                client.readable(false),
                c.read
            );
            watch!(
                want_client_write,
                client_writable,
                client.writable(false),
                c.write
            );
            watch!(
                want_backend_read,
                backend_readable,
                backend.readable(false),
                b.read
            );
            watch!(
                want_backend_write,
                backend_writable,
                backend.writable(false),
                b.write
            );
            if let Poll::Ready(reason) = killed.as_mut().poll(cx) {
                return Poll::Ready(Err(reason));
            }
            if woken {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        })
        .await;
        if let Err(reason) = woken {
            break End::Killed(reason);
        }
    };
    let pending = if down.has_records() {
        down.buf[down.sent..down.end].to_vec()
    } else {
        Vec::new()
    };
    down.release(pool);
    up.sent = up.plain_end;
    up.cipher_start = up.cipher_end;
    up.release(pool);
    (end, pending)
}
