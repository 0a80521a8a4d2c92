//! The load generator's own PostgreSQL client (no libpq), on monoio.
//!
//! - [`transport`]: TCP (optionally from a chosen source address), plain or TLS.
//! - [`tls`]: rustls client configuration and TLS over owned-buffer I/O.
//! - [`startup`]: SSLRequest or direct SSL, StartupMessage, SCRAM-SHA-256, up to ReadyForQuery,
//!   with the time of each phase.
//! - [`query`]: simple, extended and prepared queries.
//! - [`stage`]: connections held part of the way through setup (before authentication).
//!
//! Frames are read into one reused buffer per connection. Results are not kept: rows and other
//! large messages are skipped as they stream past, so any result size works with a small buffer.

pub mod query;
pub mod stage;
pub mod startup;
pub mod tls;
pub mod transport;

use std::io;

use branchgate::auth::ScramError;
use branchgate::buf::ReadBuf;
use branchgate::protocol::backend::{self as msg, ErrorFields};
use branchgate::protocol::frame::{self, FrameError, FrameHeader};

pub use stage::{open_to, Held, Stage};
pub use startup::{connect, ConnectOptions, Timings};
pub use transport::Transport;

/// Plaintext read buffer per connection; larger messages that we need whole are refused.
pub const READ_BUFFER_BYTES: usize = 8 * 1024;

/// Why a connection failed. Errors the server reports about one query are not here: they are
/// a [`query::Outcome`], and the connection goes on.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TCP connection could not be made.
    #[error("connect: {0}")]
    Connect(io::Error),
    /// A socket error after connecting.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// TLS failed (handshake, certificate, record).
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The server answered SSLRequest with `N`: it does not do TLS.
    #[error("server refused TLS (use sslmode=disable for a plaintext server)")]
    TlsRefused,
    /// Direct SSL, but the server did not choose ALPN `postgresql` (libpq 17 refuses too).
    #[error("server did not negotiate ALPN 'postgresql' (direct SSL needs it; a server without ALPN wants sslnegotiation=postgres)")]
    NoAlpn,
    /// Direct SSL, and the server hung up on the ClientHello without a TLS answer.
    #[error(
        "server closed the connection on the TLS ClientHello: it does not accept direct SSL \
             (PostgreSQL 16 and older do not); use sslnegotiation=postgres"
    )]
    DirectSslRefused,
    /// The server closed the connection unexpectedly.
    #[error("server closed the connection")]
    Closed,
    /// The server sent an ErrorResponse during startup (bad password, unknown database...).
    #[error("server error {code}: {message}")]
    Server {
        /// SQLSTATE.
        code: String,
        /// Primary message.
        message: String,
    },
    /// A statement could not be prepared (`CODE: message`).
    #[error("prepare failed: {0}")]
    Prepare(String),
    /// The server sent something that is not valid PostgreSQL protocol here.
    #[error("protocol: {0}")]
    Protocol(&'static str),
    /// The server asked for an authentication method this client does not implement.
    #[error("unsupported authentication method (request code {0})")]
    UnsupportedAuth(u32),
    /// The server wants a password and the URL has none.
    #[error("server asks for a password and the target URL has none")]
    NoPassword,
    /// SCRAM failed (wrong server signature, malformed message).
    #[error("SCRAM: {0}")]
    Scram(#[from] ScramError),
    /// Asked to stop at the server's authentication request, but the server let the client
    /// in without one (`trust`): there is no such stage to hold.
    #[error(
        "server authenticated without asking for a password: no authentication request to stop at"
    )]
    NoAuthRequest,
    /// A stage that only exists with TLS (`hello`, `tls`) asked of a plaintext target.
    #[error("stage '{0}' needs TLS (sslmode=require or verify-full)")]
    StageNeedsTls(stage::Stage),
    /// The operation did not finish within `--timeout`.
    #[error("timed out")]
    Timeout,
}

impl ClientError {
    /// The error of an ErrorResponse body.
    #[cold]
    fn server(body: &[u8]) -> ClientError {
        match ErrorFields::parse(body) {
            Ok(fields) => ClientError::Server {
                code: fields.code.to_owned(),
                message: fields.message.to_owned(),
            },
            Err(_) => ClientError::Protocol("malformed ErrorResponse"),
        }
    }
}

/// Whether a message is needed whole; the others may be skipped when larger than the buffer.
fn needed_whole(tag: u8) -> bool {
    matches!(
        tag,
        msg::AUTHENTICATION
            | msg::ERROR_RESPONSE
            | msg::READY_FOR_QUERY
            | msg::BACKEND_KEY_DATA
            | msg::NEGOTIATE_PROTOCOL_VERSION
    )
}

/// A message from the server: whole in the buffer, or already skipped because it was larger
/// than the buffer and not needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// At the front of [`Conn::frame_body`]; call [`Conn::consume`] when done with it.
    Whole(FrameHeader),
    /// Skipped (its tag only).
    Skipped(u8),
}

/// An open connection to a server, after startup.
#[derive(Debug)]
pub struct Conn {
    transport: Transport,
    rbuf: ReadBuf,
    wbuf: Vec<u8>,
}

impl Conn {
    fn new(transport: Transport) -> Conn {
        Conn {
            transport,
            rbuf: ReadBuf::new(READ_BUFFER_BYTES),
            wbuf: Vec::with_capacity(256),
        }
    }

    /// Sends the bytes in the connection's write buffer and clears it.
    async fn flush(&mut self) -> Result<(), ClientError> {
        self.transport.write_all(&mut self.wbuf).await?;
        self.wbuf.clear();
        Ok(())
    }

    /// The next message from the server. Not cancel-safe.
    pub async fn next(&mut self) -> Result<Incoming, ClientError> {
        loop {
            match frame::check(self.rbuf.data(), self.rbuf.capacity()) {
                Ok(Some(header)) => return Ok(Incoming::Whole(header)),
                Ok(None) => {}
                Err(FrameError::TooLarge { tag, len, .. }) if !needed_whole(tag) => {
                    self.skip(len).await?;
                    return Ok(Incoming::Skipped(tag));
                }
                Err(FrameError::TooLarge { .. }) => {
                    return Err(ClientError::Protocol("message too large"))
                }
                Err(FrameError::LengthTooSmall { .. }) => {
                    return Err(ClientError::Protocol("invalid message length"))
                }
            }
            self.fill().await?;
        }
    }

    /// Reads and drops `len` bytes, starting with what is buffered.
    async fn skip(&mut self, mut len: usize) -> Result<(), ClientError> {
        loop {
            let n = len.min(self.rbuf.len());
            self.rbuf.consume(n);
            len -= n;
            if len == 0 {
                return Ok(());
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<(), ClientError> {
        // A full buffer would read as end of stream; `next` never lets it fill up.
        if self.rbuf.spare_mut().is_empty() {
            return Err(ClientError::Protocol("message too large"));
        }
        if self.transport.read(&mut self.rbuf).await? == 0 {
            return Err(ClientError::Closed);
        }
        Ok(())
    }

    /// The body of the whole frame at the front of the buffer.
    pub fn frame_body(&self, header: FrameHeader) -> &[u8] {
        frame::body(self.rbuf.data(), header)
    }

    /// Drops the frame at the front of the buffer.
    pub fn consume(&mut self, header: FrameHeader) {
        self.rbuf.consume(header.len);
    }

    /// Sends Terminate and closes (best effort: the connection is going away anyway).
    pub async fn terminate(mut self) {
        self.wbuf.clear();
        branchgate::protocol::write::terminate(&mut self.wbuf);
        if self.flush().await.is_ok() {
            self.transport.close().await;
        }
    }

    /// Frees the read buffers of a connection that is only held open (idle mode). It can still
    /// be terminated, but not read from.
    pub fn shrink(&mut self) {
        self.rbuf = ReadBuf::new(0);
        self.wbuf = Vec::new();
        self.transport.shrink();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_small_control_messages_must_fit() {
        for tag in [b'R', b'E', b'Z', b'K', b'v'] {
            assert!(needed_whole(tag), "{}", tag as char);
        }
        for tag in [b'D', b'T', b'C', b'N', b'S', b'1', b'2'] {
            assert!(!needed_whole(tag), "{}", tag as char);
        }
    }

    #[test]
    fn server_error_fields() {
        let body = b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed\0\0";
        let error = ClientError::server(body);
        assert_eq!(
            error.to_string(),
            "server error 28P01: password authentication failed"
        );
        assert!(matches!(
            ClientError::server(b"x"),
            ClientError::Protocol(_)
        ));
    }
}
