//! Reading backend messages and checking the router's answers.

use std::io::{self, ErrorKind, Read};
use std::net::TcpStream;

use super::{Tls, AUTH_SASL};

/// A client stream whose end the tests check: a plaintext one may end with a FIN or a reset,
/// a TLS one only with the server's close_notify (every orderly close of the router's sends
/// one; rustls reports an end without it as `UnexpectedEof`).
pub trait Closing: Read {
    /// Panics unless the server ended the stream properly, sending nothing more.
    fn expect_end(&mut self, what: &str);
}

impl Closing for TcpStream {
    fn expect_end(&mut self, what: &str) {
        let mut buf = [0u8; 512];
        match self.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("{what}: expected a close, got {:?}", &buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof
                        | ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => panic!("{what}: expected a close, got {e} ({:?})", e.kind()),
        }
    }
}

impl Closing for Tls {
    fn expect_end(&mut self, what: &str) {
        let mut buf = [0u8; 512];
        match self.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("{what}: expected close_notify, got {:?}", &buf[..n]),
            Err(e) => panic!("{what}: expected close_notify, got {e} ({:?})", e.kind()),
        }
    }
}

/// One backend message, or `None` on a clean end of stream before its first byte.
pub fn read_message(s: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut tag = [0u8; 1];
    if s.read(&mut tag)? == 0 {
        return Ok(None);
    }
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let len = usize::try_from(i32::from_be_bytes(len)).expect("non-negative length");
    assert!((4..1 << 20).contains(&len), "implausible length {len}");
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body)?;
    Ok(Some((tag[0], body)))
}

/// Like [`read_message`], panicking with `what` on a close or an error.
pub fn next_message(s: &mut impl Read, what: &str) -> (u8, Vec<u8>) {
    match read_message(s) {
        Ok(Some(message)) => message,
        Ok(None) => panic!("{what}: connection closed, a message was expected"),
        Err(e) => panic!("{what}: reading a message failed: {e}"),
    }
}

/// The fields of an ErrorResponse the tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    /// `V` (or `S` when `V` is missing).
    pub severity: String,
    /// `C`, the SQLSTATE.
    pub code: String,
    /// `M`.
    pub message: String,
    /// `D`, if sent.
    pub detail: Option<String>,
}

/// The fields of an ErrorResponse body.
pub fn parse_error(body: &[u8]) -> PgError {
    let mut error = PgError {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
        detail: None,
    };
    let mut fields = body.split(|&b| b == 0);
    while let Some(field) = fields.next().filter(|f| !f.is_empty()) {
        let value = String::from_utf8(field[1..].to_vec()).expect("UTF-8 field");
        match field[0] {
            b'V' => error.severity = value,
            b'S' if error.severity.is_empty() => error.severity = value,
            b'C' => error.code = value,
            b'M' => error.message = value,
            b'D' => error.detail = Some(value),
            _ => {}
        }
    }
    error
}

/// Panics unless the router closes the connection without sending another byte (over TLS:
/// with close_notify).
pub fn expect_closed(s: &mut impl Closing, what: &str) {
    s.expect_end(what);
}

/// Reads a FATAL ErrorResponse with `code`, checks that the connection is then closed (over
/// TLS: with close_notify), and returns the error.
pub fn expect_fatal(s: &mut impl Closing, code: &str, what: &str) -> PgError {
    let (tag, body) = next_message(s, what);
    assert_eq!(
        tag, b'E',
        "{what}: expected ErrorResponse, got {:?}",
        tag as char
    );
    let error = parse_error(&body);
    assert_eq!(
        (error.severity.as_str(), error.code.as_str()),
        ("FATAL", code),
        "{what}: {error:?}"
    );
    expect_closed(s, what);
    error
}

/// Reads an Authentication message of `kind`, returning its data; an ErrorResponse is `Err`.
pub fn expect_auth(s: &mut impl Read, kind: u32, what: &str) -> Result<Vec<u8>, PgError> {
    let (tag, body) = next_message(s, what);
    if tag == b'E' {
        return Err(parse_error(&body));
    }
    assert_eq!(
        tag, b'R',
        "{what}: expected Authentication, got {:?}",
        tag as char
    );
    let (code, data) = body.split_at(4);
    assert_eq!(code, kind.to_be_bytes(), "{what}: authentication kind");
    Ok(data.to_vec())
}

/// Reads AuthenticationSASL and checks it offers exactly SCRAM-SHA-256.
pub fn expect_sasl(s: &mut impl Read, what: &str) {
    let data = expect_auth(s, AUTH_SASL, what).unwrap_or_else(|e| panic!("{what}: {e:?}"));
    assert_eq!(data, b"SCRAM-SHA-256\0\0", "{what}: mechanisms");
}
