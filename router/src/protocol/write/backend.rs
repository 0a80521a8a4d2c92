//! Writers for messages the router sends to clients (B).

use super::{frame, patch_i32, put_cstr, put_u32, Severity};
use crate::protocol::backend::{self, auth_code};
use crate::protocol::sqlstate::SqlState;

/// ErrorResponse (B) with severity, code and message.
pub fn error_response(buf: &mut Vec<u8>, severity: Severity, code: SqlState, message: &str) {
    error_response_full(buf, severity, code, message, None, None);
}

/// ErrorResponse (B) with optional detail and hint.
pub fn error_response_full(
    buf: &mut Vec<u8>,
    severity: Severity,
    code: SqlState,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) {
    error_response_with_code(buf, severity, code.as_str(), message, detail, hint);
}

/// ErrorResponse (B) with a SQLSTATE the router did not choose (a server's, passed on).
pub fn error_response_with_code(
    buf: &mut Vec<u8>,
    severity: Severity,
    code: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) {
    frame(buf, backend::ERROR_RESPONSE, |buf| {
        let fields = [
            (b'S', Some(severity.as_str())),
            (b'V', Some(severity.as_str())),
            (b'C', Some(code)),
            (b'M', Some(message)),
            (b'D', detail),
            (b'H', hint),
        ];
        for (field, value) in fields {
            if let Some(value) = value {
                buf.push(field);
                put_cstr(buf, value);
            }
        }
        buf.push(0);
    });
}

/// ErrorResponse (B) as PostgreSQL raises it in `routine` of its source `file`: the fields
/// drivers read to tell one error from another (asyncpg, pgjdbc and postgres.js tell a stale
/// plan by its routine), in PostgreSQL's order. Not the line: it differs between releases.
pub fn error_response_from(
    buf: &mut Vec<u8>,
    code: SqlState,
    message: &str,
    file: &str,
    routine: &str,
) {
    let severity = Severity::Error.as_str();
    frame(buf, backend::ERROR_RESPONSE, |buf| {
        for (field, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code.as_str()),
            (b'M', message),
            (b'F', file),
            (b'R', routine),
        ] {
            buf.push(field);
            put_cstr(buf, value);
        }
        buf.push(0);
    });
}

/// NoticeResponse (B) with severity NOTICE.
pub fn notice_response(buf: &mut Vec<u8>, code: SqlState, message: &str) {
    frame(buf, backend::NOTICE_RESPONSE, |buf| {
        for (field, value) in [
            (b'S', "NOTICE"),
            (b'V', "NOTICE"),
            (b'C', code.as_str()),
            (b'M', message),
        ] {
            buf.push(field);
            put_cstr(buf, value);
        }
        buf.push(0);
    });
}

fn authentication(buf: &mut Vec<u8>, code: u32, data: &[u8]) {
    frame(buf, backend::AUTHENTICATION, |buf| {
        put_u32(buf, code);
        buf.extend_from_slice(data);
    });
}

/// AuthenticationOk (B).
pub fn auth_ok(buf: &mut Vec<u8>) {
    authentication(buf, auth_code::OK, &[]);
}

/// AuthenticationSASL (B) offering `mechanisms`.
pub fn auth_sasl(buf: &mut Vec<u8>, mechanisms: &[&str]) {
    frame(buf, backend::AUTHENTICATION, |buf| {
        put_u32(buf, auth_code::SASL);
        for mechanism in mechanisms {
            put_cstr(buf, mechanism);
        }
        buf.push(0);
    });
}

/// AuthenticationSASLContinue (B) carrying the server-first-message.
pub fn auth_sasl_continue(buf: &mut Vec<u8>, data: &[u8]) {
    authentication(buf, auth_code::SASL_CONTINUE, data);
}

/// AuthenticationSASLFinal (B) carrying the server-final-message.
pub fn auth_sasl_final(buf: &mut Vec<u8>, data: &[u8]) {
    authentication(buf, auth_code::SASL_FINAL, data);
}

/// ParameterStatus (B).
pub fn parameter_status(buf: &mut Vec<u8>, name: &str, value: &str) {
    frame(buf, backend::PARAMETER_STATUS, |buf| {
        put_cstr(buf, name);
        put_cstr(buf, value);
    });
}

/// BackendKeyData (B), protocol 3.0.
pub fn backend_key_data(buf: &mut Vec<u8>, pid: u32, secret: u32) {
    frame(buf, backend::BACKEND_KEY_DATA, |buf| {
        put_u32(buf, pid);
        put_u32(buf, secret);
    });
}

/// ReadyForQuery (B); `status` is a [`backend::TransactionStatus`] or its byte.
pub fn ready_for_query(buf: &mut Vec<u8>, status: impl Into<u8>) {
    frame(buf, backend::READY_FOR_QUERY, |buf| buf.push(status.into()));
}

/// NegotiateProtocolVersion (B): the newest protocol version we speak for the client's major
/// version, as a whole version number (`3 << 16 | minor`, which is what PostgreSQL sends and
/// libpq checks; the protocol documentation calls it the "minor version"), and the `_pq_.*`
/// options we do not recognise.
pub fn negotiate_protocol_version<'s>(
    buf: &mut Vec<u8>,
    newest_version: u32,
    unsupported: impl IntoIterator<Item = &'s str>,
) {
    frame(buf, backend::NEGOTIATE_PROTOCOL_VERSION, |buf| {
        put_u32(buf, newest_version);
        let count_at = buf.len();
        put_u32(buf, 0);
        let mut count = 0;
        for name in unsupported {
            put_cstr(buf, name);
            count += 1;
        }
        patch_i32(buf, count_at, count);
    });
}

#[cfg(test)]
mod tests {
    use super::super::tests::one_frame;
    use super::*;
    use crate::protocol::backend::{
        Authentication, BackendKeyData, ErrorFields, NegotiateProtocolVersion, ParameterStatus,
        TransactionStatus,
    };
    use crate::protocol::startup::PROTOCOL_3_0;

    #[test]
    fn error_response_fixture_and_round_trip() {
        let mut buf = Vec::new();
        error_response(
            &mut buf,
            Severity::Fatal,
            SqlState::INVALID_PASSWORD,
            "bad pass\0word",
        );
        let want = b"E\x00\x00\x00\x24SFATAL\0VFATAL\0C28P01\0Mbad pass\0\0";
        assert_eq!(buf, want);
        buf.clear();
        error_response_full(
            &mut buf,
            Severity::Error,
            SqlState::QUERY_CANCELED,
            "m",
            Some("d"),
            Some("h"),
        );
        let e = ErrorFields::parse(one_frame(&buf, b'E')).expect("parses");
        let want = ErrorFields {
            severity: "ERROR",
            code: "57014",
            message: "m",
            detail: Some("d"),
            hint: Some("h"),
        };
        assert_eq!(e, want);
        assert_eq!(Severity::Panic.as_str(), "PANIC");
    }

    #[test]
    fn authentication_round_trips() {
        let mut buf = Vec::new();
        auth_ok(&mut buf);
        assert_eq!(buf, b"R\x00\x00\x00\x08\x00\x00\x00\x00");
        buf.clear();
        auth_sasl(&mut buf, &["SCRAM-SHA-256"]);
        assert_eq!(buf, b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\0\0");
        let Ok(Authentication::Sasl { mechanisms }) = Authentication::parse(one_frame(&buf, b'R'))
        else {
            panic!("not AuthenticationSASL");
        };
        assert_eq!(
            backend::sasl_mechanisms(mechanisms).collect::<Vec<_>>(),
            ["SCRAM-SHA-256"]
        );
        buf.clear();
        auth_sasl_continue(&mut buf, b"r=x,s=y,i=4096");
        let want = Authentication::SaslContinue(b"r=x,s=y,i=4096");
        assert_eq!(Authentication::parse(one_frame(&buf, b'R')), Ok(want));
        buf.clear();
        auth_sasl_final(&mut buf, b"v=z");
        assert_eq!(
            Authentication::parse(one_frame(&buf, b'R')),
            Ok(Authentication::SaslFinal(b"v=z"))
        );
    }

    #[test]
    fn session_setup_messages_round_trip() {
        let mut buf = Vec::new();
        parameter_status(&mut buf, "server_version", "15.8");
        let want = ParameterStatus {
            name: "server_version",
            value: "15.8",
        };
        assert_eq!(ParameterStatus::parse(one_frame(&buf, b'S')), Ok(want));
        buf.clear();
        backend_key_data(&mut buf, 7, 0xdead_beef);
        assert_eq!(buf, b"K\x00\x00\x00\x0c\x00\x00\x00\x07\xde\xad\xbe\xef");
        assert_eq!(
            BackendKeyData::parse(one_frame(&buf, b'K')),
            Ok(BackendKeyData {
                pid: 7,
                secret: 0xdead_beef
            })
        );
        buf.clear();
        ready_for_query(&mut buf, b'I');
        ready_for_query(&mut buf, TransactionStatus::Failed);
        assert_eq!(buf, b"Z\x00\x00\x00\x05IZ\x00\x00\x00\x05E");
        buf.clear();
        negotiate_protocol_version(&mut buf, PROTOCOL_3_0, ["_pq_.a", "_pq_.b"]);
        let v = NegotiateProtocolVersion::parse(one_frame(&buf, b'v')).expect("parses");
        assert_eq!(
            (v.newest_version, v.unsupported().collect::<Vec<_>>()),
            (PROTOCOL_3_0, vec!["_pq_.a", "_pq_.b"])
        );
        buf.clear();
        negotiate_protocol_version(&mut buf, PROTOCOL_3_0, []);
        assert_eq!(buf, b"v\x00\x00\x00\x0c\x00\x03\x00\x00\x00\x00\x00\x00");
    }
}
