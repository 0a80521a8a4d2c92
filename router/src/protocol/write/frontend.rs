//! Writers for messages the router sends to backends (F).

use super::{frame, patch_i32, put_cstr, put_u32, untagged};
use crate::protocol::frontend;
use crate::protocol::startup::{
    CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, PROTOCOL_3_0, SSL_REQUEST_CODE,
};

/// StartupMessage (F) for protocol 3.0. Pairs with an empty name are skipped: an empty name
/// is the list terminator on the wire.
pub fn startup_message<'s>(
    buf: &mut Vec<u8>,
    params: impl IntoIterator<Item = (&'s str, &'s str)>,
) {
    untagged(buf, |buf| {
        put_u32(buf, PROTOCOL_3_0);
        for (name, value) in params.into_iter().filter(|(n, _)| !n.is_empty()) {
            put_cstr(buf, name);
            put_cstr(buf, value);
        }
        buf.push(0);
    });
}

/// SSLRequest (F).
pub fn ssl_request(buf: &mut Vec<u8>) {
    untagged(buf, |buf| put_u32(buf, SSL_REQUEST_CODE));
}

/// GSSENCRequest (F).
pub fn gssenc_request(buf: &mut Vec<u8>) {
    untagged(buf, |buf| put_u32(buf, GSSENC_REQUEST_CODE));
}

/// CancelRequest (F), protocol 3.0.
pub fn cancel_request(buf: &mut Vec<u8>, pid: u32, secret: u32) {
    untagged(buf, |buf| {
        put_u32(buf, CANCEL_REQUEST_CODE);
        put_u32(buf, pid);
        put_u32(buf, secret);
    });
}

/// SASLInitialResponse (F) with the client-first-message.
pub fn sasl_initial_response(buf: &mut Vec<u8>, mechanism: &str, data: &[u8]) {
    frame(buf, frontend::PASSWORD_MESSAGE, |buf| {
        put_cstr(buf, mechanism);
        let len_at = buf.len();
        put_u32(buf, 0);
        buf.extend_from_slice(data);
        patch_i32(buf, len_at, data.len());
    });
}

/// SASLResponse (F) with the client-final-message.
pub fn sasl_response(buf: &mut Vec<u8>, data: &[u8]) {
    frame(buf, frontend::PASSWORD_MESSAGE, |buf| {
        buf.extend_from_slice(data)
    });
}

/// Query (F).
pub fn query(buf: &mut Vec<u8>, sql: &str) {
    frame(buf, frontend::QUERY, |buf| put_cstr(buf, sql));
}

/// Parse (F): prepare `sql` as statement `name` (empty: the unnamed statement), with no
/// parameter types given.
pub fn parse(buf: &mut Vec<u8>, name: &str, sql: &str) {
    frame(buf, frontend::PARSE, |buf| {
        put_cstr(buf, name);
        put_cstr(buf, sql);
        // Number of parameter types: none, the server infers them.
        buf.extend_from_slice(&0u16.to_be_bytes());
    });
}

/// Bind (F): bind statement `statement` to portal `portal` with no parameters, all results in
/// text format.
pub fn bind(buf: &mut Vec<u8>, portal: &str, statement: &str) {
    frame(buf, frontend::BIND, |buf| {
        put_cstr(buf, portal);
        put_cstr(buf, statement);
        // Parameter format codes, parameter values, result format codes: none of each.
        buf.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    });
}

/// Describe (F) of statement (`b'S'`) or portal (`b'P'`) `name`.
pub fn describe(buf: &mut Vec<u8>, kind: u8, name: &str) {
    frame(buf, frontend::DESCRIBE, |buf| {
        buf.push(kind);
        put_cstr(buf, name);
    });
}

/// Execute (F): run `portal` to completion (no row limit).
pub fn execute(buf: &mut Vec<u8>, portal: &str) {
    frame(buf, frontend::EXECUTE, |buf| {
        put_cstr(buf, portal);
        put_u32(buf, 0);
    });
}

/// PasswordMessage (F) with a cleartext password.
pub fn password_message(buf: &mut Vec<u8>, password: &str) {
    frame(buf, frontend::PASSWORD_MESSAGE, |buf| {
        put_cstr(buf, password)
    });
}

/// Sync (F).
pub fn sync(buf: &mut Vec<u8>) {
    frame(buf, frontend::SYNC, |_| {});
}

/// Flush (F).
pub fn flush(buf: &mut Vec<u8>) {
    frame(buf, frontend::FLUSH, |_| {});
}

/// Terminate (F).
pub fn terminate(buf: &mut Vec<u8>) {
    frame(buf, frontend::TERMINATE, |_| {});
}

#[cfg(test)]
mod tests {
    use super::super::tests::one_frame;
    use super::*;
    use crate::protocol::frontend::{self as fe, SaslInitialResponse};
    use crate::protocol::startup::{check_startup, parse_startup, CancelKey, StartupPacket};

    #[test]
    fn startup_packets_round_trip() {
        let mut buf = Vec::new();
        startup_message(
            &mut buf,
            [("user", "app"), ("", "skipped"), ("database", "shop")],
        );
        assert_eq!(
            buf,
            b"\x00\x00\x00\x20\x00\x03\x00\x00user\0app\0database\0shop\0\0"
        );
        assert_eq!(check_startup(&buf), Ok(Some(buf.len())));
        let Ok(StartupPacket::Startup(m)) = parse_startup(&buf) else {
            panic!("not a StartupMessage");
        };
        assert_eq!(
            m.params().collect::<Vec<_>>(),
            [("user", "app"), ("database", "shop")]
        );
        buf.clear();
        ssl_request(&mut buf);
        assert_eq!(buf, b"\x00\x00\x00\x08\x04\xd2\x16\x2f");
        buf.clear();
        gssenc_request(&mut buf);
        assert_eq!(parse_startup(&buf), Ok(StartupPacket::GssEncRequest));
        buf.clear();
        cancel_request(&mut buf, 42, 0x0102_0304);
        let key = CancelKey {
            pid: 42,
            secret: 0x0102_0304,
        };
        assert_eq!(parse_startup(&buf), Ok(StartupPacket::Cancel(key)));
    }

    #[test]
    fn frontend_messages_round_trip() {
        let mut buf = Vec::new();
        sasl_initial_response(&mut buf, "SCRAM-SHA-256", b"n,,n=,r=abc");
        let m = SaslInitialResponse::parse(one_frame(&buf, b'p')).expect("parses");
        assert_eq!(
            (m.mechanism, m.data),
            ("SCRAM-SHA-256", &b"n,,n=,r=abc"[..])
        );
        buf.clear();
        sasl_response(&mut buf, b"c=biws,r=abc,p=xyz");
        assert_eq!(one_frame(&buf, b'p'), b"c=biws,r=abc,p=xyz");
        buf.clear();
        query(&mut buf, "SELECT 1");
        assert_eq!(fe::query(one_frame(&buf, b'Q')), Ok("SELECT 1"));
        buf.clear();
        sync(&mut buf);
        terminate(&mut buf);
        assert_eq!(buf, b"S\x00\x00\x00\x04X\x00\x00\x00\x04");
    }

    #[test]
    fn extended_protocol_fixtures() {
        let mut buf = Vec::new();
        parse(&mut buf, "lg0", "SELECT 1");
        assert_eq!(buf, b"P\x00\x00\x00\x13lg0\0SELECT 1\0\x00\x00");
        buf.clear();
        bind(&mut buf, "", "lg0");
        assert_eq!(buf, b"B\x00\x00\x00\x0f\0lg0\0\x00\x00\x00\x00\x00\x00");
        buf.clear();
        execute(&mut buf, "");
        assert_eq!(buf, b"E\x00\x00\x00\x09\0\x00\x00\x00\x00");
    }

    #[test]
    fn password_message_stops_at_a_nul() {
        let mut buf = b"x".to_vec();
        password_message(&mut buf, "pw\0ignored");
        assert_eq!(buf, b"xp\x00\x00\x00\x07pw\0");
    }

    #[test]
    fn writers_append_to_existing_bytes() {
        let mut buf = b"prefix".to_vec();
        terminate(&mut buf);
        assert_eq!(buf, b"prefixX\x00\x00\x00\x04");
    }
}
