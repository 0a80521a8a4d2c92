//! Raw PostgreSQL clients for bad-input tests: std `TcpStream`s, wrapped in a sync rustls
//! `StreamOwned` for TLS, either after an SSLRequest or from the first byte (direct SSL, ALPN
//! `postgresql`), speaking messages built byte by byte.
//!
//! [Protocol flow](https://www.postgresql.org/docs/current/protocol-flow.html).

mod extended;
mod message;
mod read;
mod session;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, ClientConnection, StreamOwned};
use rustls_pki_types::ServerName;

pub use extended::{
    bind, bind_binary, bind_execute, close, data_row, describe, error_codes, errors, execute,
    first_column, flush, parameter_description, parameter_status, parse, row_description, sync,
    tags, terminate, RawConn, Reply,
};
pub use message::{
    cancel_request, message, query, request, sasl_initial_response, startup_for, startup_message,
    untagged,
};
pub use read::{
    expect_auth, expect_closed, expect_fatal, expect_sasl, next_message, parse_error, read_message,
    Closing, PgError,
};
pub use session::{
    attribute, login, login_keyed, login_reporting, query_one, scram_first, start_sasl, Login,
};

/// Upper bound for any single read or write: the test router's startup timeout is 3 s, so a read
/// that waits this long means the router neither answered nor closed.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Protocol version 3.0.
pub const PROTOCOL_3_0: u32 = 0x0003_0000;
/// Protocol version 3.2 (PostgreSQL 18).
pub const PROTOCOL_3_2: u32 = 0x0003_0002;
/// A protocol version no server speaks.
pub const PROTOCOL_4_0: u32 = 0x0004_0000;
/// SSLRequest code (80877103).
pub const SSL_REQUEST_CODE: u32 = 0x04D2_162F;
/// GSSENCRequest code (80877104).
pub const GSSENC_REQUEST_CODE: u32 = 0x04D2_1630;
/// CancelRequest code (80877102).
pub const CANCEL_REQUEST_CODE: u32 = 0x04D2_162E;
/// AuthenticationOk.
pub const AUTH_OK: u32 = 0;
/// AuthenticationSASL.
pub const AUTH_SASL: u32 = 10;
/// AuthenticationSASLContinue.
pub const AUTH_SASL_CONTINUE: u32 = 11;
/// AuthenticationSASLFinal.
pub const AUTH_SASL_FINAL: u32 = 12;
/// The one SASL mechanism the router offers.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// How a TLS client starts TLS.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// SSLRequest, `S`, then the handshake.
    SslRequest,
    /// The handshake from the first byte, ALPN `postgresql`.
    Direct,
}

/// Both ways, for tests that cover each.
pub const MODES: [Mode; 2] = [Mode::SslRequest, Mode::Direct];

/// A sync TLS client stream.
pub type Tls = StreamOwned<ClientConnection, TcpStream>;

/// Completes a TLS handshake for `localhost` on `sock`.
pub fn tls_handshake(config: Arc<ClientConfig>, sock: TcpStream) -> io::Result<Tls> {
    let name = ServerName::try_from("localhost").expect("server name");
    let conn = ClientConnection::new(config, name).expect("client connection");
    let mut tls = StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// The first flight of a TLS client for `localhost` (its ClientHello), to send and then never
/// go on: a stalled handshake.
pub fn client_hello(config: Arc<ClientConfig>) -> Vec<u8> {
    let name = ServerName::try_from("localhost").expect("server name");
    let mut conn = ClientConnection::new(config, name).expect("client connection");
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).expect("ClientHello");
    }
    hello
}

/// Sends an SSLRequest and checks the single-byte answer.
pub fn ssl_request_on(sock: &mut TcpStream) {
    sock.write_all(&request(SSL_REQUEST_CODE))
        .expect("send SSLRequest");
    assert_eq!(read_byte(sock), b'S', "SSLRequest answer");
}

/// Reads one byte (the answer to an SSLRequest or GSSENCRequest).
pub fn read_byte(sock: &mut TcpStream) -> u8 {
    let mut byte = [0u8; 1];
    sock.read_exact(&mut byte).expect("read one byte");
    byte[0]
}
/// A TCP connection to `addr` with [`IO_TIMEOUT`] on reads and writes.
pub fn tcp(addr: SocketAddr) -> TcpStream {
    let sock = TcpStream::connect(addr).expect("connect to the router");
    sock.set_read_timeout(Some(IO_TIMEOUT))
        .expect("read timeout");
    sock.set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    sock.set_nodelay(true).expect("nodelay");
    sock
}

/// A TLS connection to `addr`, started the `mode` way, verified with `config`.
pub fn connect_tls(addr: SocketAddr, config: Arc<ClientConfig>, mode: Mode) -> Tls {
    let mut sock = tcp(addr);
    if let Mode::SslRequest = mode {
        ssl_request_on(&mut sock);
    }
    tls_handshake(config, sock).unwrap_or_else(|e| panic!("TLS handshake ({mode:?}): {e}"))
}
