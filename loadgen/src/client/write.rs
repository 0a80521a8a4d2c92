//! Writers for the frontend messages the router's codec does not write: the extended query
//! protocol (Parse, Bind, Execute) and PasswordMessage.
//! <https://www.postgresql.org/docs/current/protocol-message-formats.html>
//!
//! Like the router's writers they append to a reused buffer and patch the length at the end.
//! Statements here take no parameters, and results are requested in text format.

/// Parse (F).
const PARSE: u8 = b'P';
/// Bind (F).
const BIND: u8 = b'B';
/// Execute (F).
const EXECUTE: u8 = b'E';
/// PasswordMessage (F).
const PASSWORD_MESSAGE: u8 = b'p';

/// Parse (F): prepare `sql` as statement `name` (empty: the unnamed statement), with no
/// parameter types given.
pub fn parse(buf: &mut Vec<u8>, name: &str, sql: &str) {
    frame(buf, PARSE, |buf| {
        put_cstr(buf, name);
        put_cstr(buf, sql);
        buf.extend_from_slice(&0u16.to_be_bytes());
    });
}

/// Bind (F): bind statement `statement` to portal `portal` with no parameters, all results
/// in text format.
pub fn bind(buf: &mut Vec<u8>, portal: &str, statement: &str) {
    frame(buf, BIND, |buf| {
        put_cstr(buf, portal);
        put_cstr(buf, statement);
        // Parameter format codes, parameter values, result format codes: none of each.
        buf.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    });
}

/// Execute (F): run `portal` to completion (no row limit).
pub fn execute(buf: &mut Vec<u8>, portal: &str) {
    frame(buf, EXECUTE, |buf| {
        put_cstr(buf, portal);
        buf.extend_from_slice(&0u32.to_be_bytes());
    });
}

/// PasswordMessage (F) with a cleartext password.
pub fn password_message(buf: &mut Vec<u8>, password: &str) {
    frame(buf, PASSWORD_MESSAGE, |buf| put_cstr(buf, password));
}

fn frame(buf: &mut Vec<u8>, tag: u8, fill: impl FnOnce(&mut Vec<u8>)) {
    buf.push(tag);
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    fill(buf);
    // Statements come from the command line or a query file; a message past 2 GiB would be
    // refused by any server, so saturating keeps the frame invalid rather than wrapped.
    let len = i32::try_from(buf.len() - start).unwrap_or(i32::MAX);
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// A C string, cut at an interior NUL (which would end the field early on the wire).
fn put_cstr(buf: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    buf.extend_from_slice(&bytes[..end]);
    buf.push(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_fixture() {
        let mut buf = Vec::new();
        parse(&mut buf, "lg0", "SELECT 1");
        assert_eq!(buf, b"P\x00\x00\x00\x13lg0\0SELECT 1\0\x00\x00");
    }

    #[test]
    fn bind_execute_fixtures() {
        let mut buf = Vec::new();
        bind(&mut buf, "", "lg0");
        assert_eq!(buf, b"B\x00\x00\x00\x0f\0lg0\0\x00\x00\x00\x00\x00\x00");
        buf.clear();
        execute(&mut buf, "");
        assert_eq!(buf, b"E\x00\x00\x00\x09\0\x00\x00\x00\x00");
    }

    #[test]
    fn password_fixture_and_appending() {
        let mut buf = b"x".to_vec();
        password_message(&mut buf, "pw\0ignored");
        assert_eq!(buf, b"xp\x00\x00\x00\x07pw\0");
    }

    #[test]
    fn frames_scan_with_the_router_codec() {
        use branchgate::protocol::frame::Frames;
        let mut buf = Vec::new();
        parse(&mut buf, "s", "SELECT 1");
        bind(&mut buf, "", "s");
        execute(&mut buf, "");
        let tags: Vec<u8> = Frames::new(&buf, 1024)
            .map(|f| f.expect("valid frame").0.tag)
            .collect();
        assert_eq!(tags, b"PBE");
    }
}
