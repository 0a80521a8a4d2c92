//! Messages the client sends (F) that the router decodes, and the frontend type bytes.
//!
//! Everything not decoded here is forwarded as a raw frame.

use super::reader::{DecodeError, Reader};

/// Bind (F).
pub const BIND: u8 = b'B';
/// Close (F).
pub const CLOSE: u8 = b'C';
/// CopyData (F & B).
pub const COPY_DATA: u8 = b'd';
/// CopyDone (F & B).
pub const COPY_DONE: u8 = b'c';
/// CopyFail (F).
pub const COPY_FAIL: u8 = b'f';
/// Describe (F).
pub const DESCRIBE: u8 = b'D';
/// Execute (F).
pub const EXECUTE: u8 = b'E';
/// Flush (F).
pub const FLUSH: u8 = b'H';
/// FunctionCall (F).
pub const FUNCTION_CALL: u8 = b'F';
/// Parse (F).
pub const PARSE: u8 = b'P';
/// PasswordMessage, SASLInitialResponse, SASLResponse and GSSResponse (F) all share this byte;
/// which one it is follows from the authentication exchange in progress.
pub const PASSWORD_MESSAGE: u8 = b'p';
/// Query (F).
pub const QUERY: u8 = b'Q';
/// Sync (F).
pub const SYNC: u8 = b'S';
/// Terminate (F).
pub const TERMINATE: u8 = b'X';

/// Whether a server takes a message of type `tag` once the session is under way (PostgreSQL's
/// `SocketBackend`): any other type ends the session with FATAL 08P01 "invalid frontend
/// message type N" ([`invalid_type_message`]).
pub fn is_session_message(tag: u8) -> bool {
    matches!(
        tag,
        QUERY
            | FUNCTION_CALL
            | TERMINATE
            | BIND
            | CLOSE
            | DESCRIBE
            | EXECUTE
            | FLUSH
            | PARSE
            | SYNC
            | COPY_DATA
            | COPY_DONE
            | COPY_FAIL
    )
}

/// PostgreSQL's message for a message type it does not take during a session.
pub fn invalid_type_message(tag: u8) -> String {
    format!("invalid frontend message type {tag}")
}

/// SASLInitialResponse (F): the chosen mechanism and the client-first-message.
///
/// The next client message, SASLResponse (F), has no structure of its own: its body (after the
/// type byte and length) is the mechanism data verbatim, so it needs no parser.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaslInitialResponse<'a> {
    /// SASL mechanism name, e.g. `SCRAM-SHA-256`.
    pub mechanism: &'a str,
    /// Initial response; empty when the client sent length -1 (no data).
    pub data: &'a [u8],
}

impl<'a> SaslInitialResponse<'a> {
    /// Parses the body of a `p` message sent in answer to AuthenticationSASL.
    pub fn parse(body: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let mechanism = r.cstr_utf8()?;
        let data = r.len_prefixed()?.unwrap_or_default();
        r.finish()?;
        Ok(Self { mechanism, data })
    }
}

/// PasswordMessage (F): a cleartext password, answering AuthenticationCleartextPassword.
pub fn password(body: &[u8]) -> Result<&[u8], DecodeError> {
    let mut r = Reader::new(body);
    let password = r.cstr()?;
    r.finish()?;
    Ok(password)
}

/// Query (F): the SQL text of a simple query.
pub fn query(body: &[u8]) -> Result<&str, DecodeError> {
    let mut r = Reader::new(body);
    let sql = r.cstr_utf8()?;
    r.finish()?;
    Ok(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_initial_response_fixture() {
        let body = b"SCRAM-SHA-256\0\x00\x00\x00\x25n,,n=,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa";
        let m = SaslInitialResponse::parse(body).expect("valid");
        assert_eq!(m.mechanism, "SCRAM-SHA-256");
        assert_eq!(m.data, b"n,,n=,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa");
    }

    #[test]
    fn sasl_initial_response_errors() {
        // Declares 32 bytes of data but carries 37.
        let trailing = b"SCRAM-SHA-256\0\x00\x00\x00\x20n,,n=,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa";
        assert_eq!(
            SaslInitialResponse::parse(trailing),
            Err(DecodeError::TrailingBytes)
        );
        let no_data = b"SCRAM-SHA-256\0\xff\xff\xff\xff";
        assert_eq!(
            SaslInitialResponse::parse(no_data).map(|m| m.data),
            Ok(&b""[..])
        );
        let negative = b"SCRAM-SHA-256\0\xff\xff\xff\xfe";
        assert_eq!(
            SaslInitialResponse::parse(negative),
            Err(DecodeError::InvalidLength(-2))
        );
        let short = b"SCRAM-SHA-256\0\x00\x00\x00\x09n,,";
        assert_eq!(
            SaslInitialResponse::parse(short),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            SaslInitialResponse::parse(b"SCRAM"),
            Err(DecodeError::MissingNul)
        );
        assert_eq!(
            SaslInitialResponse::parse(b"SCRAM\0\x00\x00"),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn password_and_query() {
        assert_eq!(password(b"pscale_pw_x\0"), Ok(&b"pscale_pw_x"[..]));
        assert_eq!(password(b"pw"), Err(DecodeError::MissingNul));
        assert_eq!(query(b"SELECT 1\0"), Ok("SELECT 1"));
        assert_eq!(query(b"SELECT 1\0\0"), Err(DecodeError::TrailingBytes));
    }
}
