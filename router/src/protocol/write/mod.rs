//! Writers that append one message to a reused `Vec<u8>`.
//!
//! The length field is written as a placeholder and patched once the body is in, so nothing is
//! measured or copied twice. Strings are written up to their first NUL byte: an interior NUL
//! would end the field early on the wire and shift every later field.
//!
//! - `backend`: messages the router sends to clients (B).
//! - `frontend`: messages the router sends to backends (F).

mod backend;
mod frontend;

pub use backend::{
    auth_ok, auth_sasl, auth_sasl_continue, auth_sasl_final, backend_key_data, error_response,
    error_response_from, error_response_full, error_response_with_code, negotiate_protocol_version,
    notice_response, parameter_status, ready_for_query,
};
pub use frontend::{
    bind, cancel_request, describe, execute, flush, gssenc_request, parse, password_message, query,
    sasl_initial_response, sasl_response, ssl_request, startup_message, sync, terminate,
};

/// Severity of an ErrorResponse the router sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the session goes on.
    Error,
    /// The session ends.
    Fatal,
    /// Every session ends (PostgreSQL uses it for crashes; the router for a forced shutdown).
    Panic,
}

impl Severity {
    /// The non-localized severity name, as in the `S` and `V` fields.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "ERROR",
            Self::Fatal => "FATAL",
            Self::Panic => "PANIC",
        }
    }
}

/// Appends `tag`, a length placeholder, the body `fill` writes, then patches the length.
fn frame(buf: &mut Vec<u8>, tag: u8, fill: impl FnOnce(&mut Vec<u8>)) {
    buf.push(tag);
    untagged(buf, fill);
}

/// Like [`frame`] without the type byte, for startup packets.
fn untagged(buf: &mut Vec<u8>, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    fill(buf);
    let len = buf.len() - start;
    patch_i32(buf, start, len);
}

/// Overwrites the four bytes at `at` with `value`, which must fit an Int32.
fn patch_i32(buf: &mut [u8], at: usize, value: usize) {
    // Every message the router writes is bounded by a frame limit far below 2 GiB.
    let value = i32::try_from(value).expect("protocol message length exceeds i32::MAX");
    buf[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

fn put_u32(buf: &mut Vec<u8>, value: u32) {
    buf.extend_from_slice(&value.to_be_bytes());
}

fn put_cstr(buf: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    buf.extend_from_slice(&bytes[..end]);
    buf.push(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::{self, FrameHeader};

    /// Checks that `buf` is exactly one frame with `tag` and returns its body.
    pub(super) fn one_frame(buf: &[u8], tag: u8) -> &[u8] {
        let header = frame::check(buf, usize::MAX)
            .expect("valid")
            .expect("complete");
        assert_eq!(
            header,
            FrameHeader {
                tag,
                len: buf.len()
            }
        );
        frame::body(buf, header)
    }

    #[test]
    fn frames_patch_their_length_and_append() {
        let mut buf = b"prefix".to_vec();
        frame(&mut buf, b'x', |buf| put_u32(buf, 7));
        untagged(&mut buf, |buf| put_cstr(buf, "ab"));
        assert_eq!(
            buf,
            b"prefixx\x00\x00\x00\x08\x00\x00\x00\x07\x00\x00\x00\x07ab\0"
        );
    }

    #[test]
    fn cstr_stops_at_an_interior_nul() {
        let mut buf = Vec::new();
        put_cstr(&mut buf, "a\0b");
        put_cstr(&mut buf, "");
        assert_eq!(buf, b"a\0\0");
    }
}
