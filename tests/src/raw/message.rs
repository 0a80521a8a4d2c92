//! Frontend messages as bytes, built by hand so tests can also build wrong ones.

use super::{CANCEL_REQUEST_CODE, PROTOCOL_3_0};

/// An untagged startup packet: length, then `code`, then `body`.
pub fn untagged(code: u32, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(8 + body.len()).expect("small packet");
    [&len.to_be_bytes()[..], &code.to_be_bytes(), body].concat()
}

/// SSLRequest or GSSENCRequest.
pub fn request(code: u32) -> Vec<u8> {
    untagged(code, &[])
}

/// CancelRequest for backend `pid` with `secret`.
pub fn cancel_request(pid: u32, secret: u32) -> Vec<u8> {
    untagged(
        CANCEL_REQUEST_CODE,
        &[pid.to_be_bytes(), secret.to_be_bytes()].concat(),
    )
}

/// StartupMessage with protocol `version` and `params`.
pub fn startup_message(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in params {
        for text in [name, value] {
            body.extend_from_slice(text.as_bytes());
            body.push(0);
        }
    }
    body.push(0);
    untagged(version, &body)
}

/// StartupMessage (3.0) for `user` in database `postgres`.
pub fn startup_for(user: &str) -> Vec<u8> {
    startup_message(PROTOCOL_3_0, &[("user", user), ("database", "postgres")])
}

/// A tagged frontend message.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(4 + body.len()).expect("small message");
    [&[tag][..], &len.to_be_bytes(), body].concat()
}

/// SASLInitialResponse choosing `mechanism`, with `data`.
pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Vec<u8> {
    let len = u32::try_from(data.len()).expect("small data");
    let body = [mechanism.as_bytes(), &[0], &len.to_be_bytes(), data].concat();
    message(b'p', &body)
}

/// Query (simple protocol).
pub fn query(sql: &str) -> Vec<u8> {
    message(b'Q', &[sql.as_bytes(), &[0]].concat())
}
