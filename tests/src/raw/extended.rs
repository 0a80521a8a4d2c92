//! The extended query protocol by hand: frontend messages (Parse, Bind, Describe, Execute,
//! Close, Flush, Sync), readers for the replies, and [`RawConn`], a logged-in TLS client that
//! sends exactly the bytes a test builds, for the cases no client library produces on demand.
//!
//! [Extended Query](https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-EXT-QUERY),
//! [message formats](https://www.postgresql.org/docs/current/protocol-message-formats.html).

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;

use super::{
    connect_tls, expect_sasl, login_reporting, message, next_message, parse_error, query,
    read_message, startup_message, Login, Mode, PgError, Tls, IO_TIMEOUT, PROTOCOL_3_0,
};

/// One backend message: its tag and body.
pub type Reply = (u8, Vec<u8>);

/// Parse (F): statement `name` (empty: unnamed) for `sql`, parameter type OIDs (0: unspecified).
pub fn parse(name: &str, sql: &str, param_types: &[u32]) -> Vec<u8> {
    let mut body = [name.as_bytes(), &[0], sql.as_bytes(), &[0]].concat();
    let count = u16::try_from(param_types.len()).expect("few parameters");
    body.extend_from_slice(&count.to_be_bytes());
    for oid in param_types {
        body.extend_from_slice(&oid.to_be_bytes());
    }
    message(b'P', &body)
}

/// Bind (F): portal `portal` for statement `statement`, text parameters (`None`: NULL), text
/// results.
pub fn bind(portal: &str, statement: &str, params: &[Option<&str>]) -> Vec<u8> {
    let mut body = [portal.as_bytes(), &[0], statement.as_bytes(), &[0]].concat();
    // No parameter format codes: all text.
    body.extend_from_slice(&0u16.to_be_bytes());
    let count = u16::try_from(params.len()).expect("few parameters");
    body.extend_from_slice(&count.to_be_bytes());
    for param in params {
        match param {
            Some(text) => {
                let len = i32::try_from(text.len()).expect("small parameter");
                body.extend_from_slice(&len.to_be_bytes());
                body.extend_from_slice(text.as_bytes());
            }
            None => body.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    // No result format codes: all text.
    body.extend_from_slice(&0u16.to_be_bytes());
    message(b'B', &body)
}

/// Bind (F) of the unnamed portal for statement `statement` with parameters in binary (format
/// code 1 for all of them, each value's bytes as given), text results.
pub fn bind_binary(statement: &str, params: &[&[u8]]) -> Vec<u8> {
    let mut body = [&[0][..], statement.as_bytes(), &[0]].concat();
    body.extend_from_slice(&1u16.to_be_bytes());
    body.extend_from_slice(&1u16.to_be_bytes());
    let count = u16::try_from(params.len()).expect("few parameters");
    body.extend_from_slice(&count.to_be_bytes());
    for param in params {
        let len = i32::try_from(param.len()).expect("small parameter");
        body.extend_from_slice(&len.to_be_bytes());
        body.extend_from_slice(param);
    }
    body.extend_from_slice(&0u16.to_be_bytes());
    message(b'B', &body)
}

/// Describe (F) of a statement (`b'S'`) or portal (`b'P'`).
pub fn describe(kind: u8, name: &str) -> Vec<u8> {
    message(b'D', &[&[kind], name.as_bytes(), &[0]].concat())
}

/// Execute (F) of `portal`, all rows (`max_rows` 0) or at most `max_rows`.
pub fn execute(portal: &str, max_rows: u32) -> Vec<u8> {
    message(
        b'E',
        &[portal.as_bytes(), &[0], &max_rows.to_be_bytes()].concat(),
    )
}

/// Close (F) of a statement (`b'S'`) or portal (`b'P'`).
pub fn close(kind: u8, name: &str) -> Vec<u8> {
    message(b'C', &[&[kind], name.as_bytes(), &[0]].concat())
}

/// Sync (F).
pub fn sync() -> Vec<u8> {
    message(b'S', &[])
}

/// Flush (F).
pub fn flush() -> Vec<u8> {
    message(b'H', &[])
}

/// Terminate (F).
pub fn terminate() -> Vec<u8> {
    message(b'X', &[])
}

/// Bind of the unnamed portal with `params`, then Execute of it: one statement run.
pub fn bind_execute(statement: &str, params: &[Option<&str>]) -> Vec<u8> {
    [bind("", statement, params), execute("", 0)].concat()
}

/// The tags of `replies`, space-separated (`"1 2 D C Z"`), for exact comparisons.
pub fn tags(replies: &[Reply]) -> String {
    let tags: Vec<String> = replies
        .iter()
        .map(|(tag, _)| char::from(*tag).to_string())
        .collect();
    tags.join(" ")
}

/// The values of a DataRow (B); `None` is NULL.
pub fn data_row(body: &[u8]) -> Vec<Option<String>> {
    let mut reader = Fields::new(body);
    let count = reader.u16();
    (0..count)
        .map(|_| {
            let len = reader.i32();
            (len >= 0).then(|| {
                let bytes = reader.take(usize::try_from(len).expect("len >= 0"));
                String::from_utf8(bytes.to_vec()).expect("UTF-8 value")
            })
        })
        .collect()
}

/// The (name, type OID) of each field of a RowDescription (B).
pub fn row_description(body: &[u8]) -> Vec<(String, u32)> {
    let mut reader = Fields::new(body);
    let count = reader.u16();
    (0..count)
        .map(|_| {
            let name = reader.cstr();
            let _table = reader.take(6);
            let oid = reader.u32();
            let _rest = reader.take(8);
            (name, oid)
        })
        .collect()
}

/// The parameter type OIDs of a ParameterDescription (B).
pub fn parameter_description(body: &[u8]) -> Vec<u32> {
    let mut reader = Fields::new(body);
    let count = reader.u16();
    (0..count).map(|_| reader.u32()).collect()
}

/// The (name, value) of a ParameterStatus (B).
pub fn parameter_status(body: &[u8]) -> (String, String) {
    let mut reader = Fields::new(body);
    (reader.cstr(), reader.cstr())
}

/// The first column of every DataRow in `replies` (NULL as `"NULL"`).
pub fn first_column(replies: &[Reply]) -> Vec<String> {
    replies
        .iter()
        .filter(|(tag, _)| *tag == b'D')
        .map(|(_, body)| {
            data_row(body)
                .into_iter()
                .next()
                .expect("a column")
                .unwrap_or_else(|| "NULL".into())
        })
        .collect()
}

/// The ErrorResponses among `replies`.
pub fn errors(replies: &[Reply]) -> Vec<PgError> {
    replies
        .iter()
        .filter(|(tag, _)| *tag == b'E')
        .map(|(_, body)| parse_error(body))
        .collect()
}

/// The SQLSTATEs of the ErrorResponses among `replies`.
pub fn error_codes(replies: &[Reply]) -> Vec<String> {
    errors(replies).into_iter().map(|e| e.code).collect()
}

/// A tiny reader over a message body.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn new(body: &'a [u8]) -> Fields<'a> {
        Fields { rest: body }
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        assert!(self.rest.len() >= n, "message body too short");
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        head
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take(2).try_into().expect("2 bytes"))
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take(4).try_into().expect("4 bytes"))
    }

    fn i32(&mut self) -> i32 {
        i32::from_be_bytes(self.take(4).try_into().expect("4 bytes"))
    }

    fn cstr(&mut self) -> String {
        let end = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .expect("NUL-terminated string");
        let text = String::from_utf8(self.take(end).to_vec()).expect("UTF-8 string");
        self.take(1);
        text
    }
}

/// A logged-in client over TLS that writes exactly what the test gives it.
pub struct RawConn {
    tls: Tls,
    /// What the login answered: cancel key and ParameterStatus values.
    pub login: Login,
}

impl RawConn {
    /// Connects to `addr` (TLS the `mode` way), starts up as `user` in database `postgres` with
    /// `extra` startup parameters, and logs in with SCRAM. Panics on any error.
    pub fn connect(
        addr: SocketAddr,
        config: Arc<ClientConfig>,
        mode: Mode,
        user: &str,
        password: &str,
        extra: &[(&str, &str)],
    ) -> RawConn {
        RawConn::try_connect(addr, config, mode, user, password, extra)
            .unwrap_or_else(|e| panic!("login of {user}: {e:?}"))
    }

    /// As [`RawConn::connect`], returning the router's ErrorResponse when the login fails.
    pub fn try_connect(
        addr: SocketAddr,
        config: Arc<ClientConfig>,
        mode: Mode,
        user: &str,
        password: &str,
        extra: &[(&str, &str)],
    ) -> Result<RawConn, PgError> {
        let mut tls = connect_tls(addr, config, mode);
        let mut params = vec![("user", user), ("database", "postgres")];
        params.extend_from_slice(extra);
        tls.write_all(&startup_message(PROTOCOL_3_0, &params))
            .expect("send StartupMessage");
        expect_sasl(&mut tls, user);
        let login = login_reporting(&mut tls, password)?;
        Ok(RawConn { tls, login })
    }

    /// The value of a ParameterStatus the login reported.
    pub fn reported(&self, name: &str) -> Option<&str> {
        self.login
            .params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Writes `messages` in one write.
    pub fn send(&mut self, messages: &[Vec<u8>]) {
        self.tls
            .write_all(&messages.concat())
            .expect("send messages");
    }

    /// The next message; panics on a close or an error.
    pub fn next(&mut self, what: &str) -> Reply {
        next_message(&mut self.tls, what)
    }

    /// The next message, `None` when the router closed the connection (over TLS: with
    /// close_notify).
    pub fn next_or_end(&mut self) -> Option<Reply> {
        read_message(&mut self.tls).expect("read a message or the end")
    }

    /// Messages up to and including the next ReadyForQuery.
    pub fn until_ready(&mut self, what: &str) -> Vec<Reply> {
        let mut replies = Vec::new();
        loop {
            let reply = self.next(what);
            let done = reply.0 == b'Z';
            replies.push(reply);
            if done {
                return replies;
            }
        }
    }

    /// Messages up to and including the `count`th ReadyForQuery from now.
    pub fn until_ready_n(&mut self, count: usize, what: &str) -> Vec<Reply> {
        (0..count).flat_map(|_| self.until_ready(what)).collect()
    }

    /// Sends a simple Query and returns its replies up to ReadyForQuery.
    pub fn simple(&mut self, sql: &str) -> Vec<Reply> {
        self.send(&[query(sql)]);
        self.until_ready(sql)
    }

    /// Runs `sql` (simple protocol), which must succeed with one row, and returns its first
    /// column.
    pub fn value(&mut self, sql: &str) -> String {
        let replies = self.simple(sql);
        let errors = errors(&replies);
        assert!(errors.is_empty(), "{sql}: {errors:?}");
        let values = first_column(&replies);
        assert_eq!(values.len(), 1, "{sql}: {}", tags(&replies));
        values.into_iter().next().expect("one value")
    }

    /// The transaction status of the last message if it is a ReadyForQuery.
    pub fn status(replies: &[Reply]) -> char {
        match replies.last() {
            Some((b'Z', body)) if body.len() == 1 => char::from(body[0]),
            other => panic!("not a ReadyForQuery: {other:?}"),
        }
    }

    /// Panics if any message arrives within `window` (the router is holding this client back).
    pub fn expect_silence(&mut self, window: Duration, what: &str) {
        self.tls
            .sock
            .set_read_timeout(Some(window))
            .expect("short read timeout");
        let outcome = read_message(&mut self.tls);
        self.tls
            .sock
            .set_read_timeout(Some(IO_TIMEOUT))
            .expect("read timeout");
        match outcome {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("{what}: expected silence, reading failed: {e}"),
            Ok(None) => panic!("{what}: expected silence, the connection closed"),
            Ok(Some((tag, body))) => panic!(
                "{what}: expected silence within {window:?}, got {:?} {:?}",
                char::from(tag),
                String::from_utf8_lossy(&body)
            ),
        }
    }

    /// Reads and drops whatever comes until the connection ends (closed, or its TLS stream
    /// cut short); panics if it has not ended within `within`. Returns the bytes read.
    pub fn read_until_closed(&mut self, within: Duration, what: &str) -> usize {
        let deadline = std::time::Instant::now() + within;
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        let ended = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break false;
            }
            self.tls
                .sock
                .set_read_timeout(Some(left))
                .expect("read timeout");
            match self.tls.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => total += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break true,
            }
        };
        self.tls
            .sock
            .set_read_timeout(Some(IO_TIMEOUT))
            .expect("read timeout");
        assert!(
            ended,
            "{what}: still open after {within:?} ({total} bytes read)"
        );
        total
    }

    /// Sets how long a read may block (e.g. longer than a pool timeout under test).
    pub fn set_read_timeout(&mut self, timeout: Duration) {
        self.tls
            .sock
            .set_read_timeout(Some(timeout))
            .expect("read timeout");
    }

    /// Closes the TCP connection at once: no Terminate, no close_notify.
    pub fn drop_abruptly(self) {
        let _ = self.tls.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Sends Terminate and close_notify, then closes.
    pub fn terminate(mut self) {
        self.send(&[terminate()]);
        self.tls.conn.send_close_notify();
        let _ = self.tls.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_messages_match_the_protocol_layout() {
        assert_eq!(
            parse("s1", "select $1", &[23]),
            b"P\0\0\0\x17s1\0select $1\0\0\x01\0\0\0\x17".to_vec()
        );
        assert_eq!(
            bind("", "s1", &[Some("42"), None]),
            b"B\0\0\0\x18\0s1\0\0\0\0\x02\0\0\0\x0242\xff\xff\xff\xff\0\0".to_vec()
        );
        assert_eq!(describe(b'S', "s1"), b"D\0\0\0\x08Ss1\0".to_vec());
        assert_eq!(execute("", 0), b"E\0\0\0\x09\0\0\0\0\0".to_vec());
        assert_eq!(close(b'S', "x"), b"C\0\0\0\x07Sx\0".to_vec());
        assert_eq!(sync(), b"S\0\0\0\x04".to_vec());
        assert_eq!(flush(), b"H\0\0\0\x04".to_vec());
    }

    #[test]
    fn backend_messages_are_read_back() {
        assert_eq!(
            data_row(b"\0\x02\0\0\0\x0242\xff\xff\xff\xff"),
            vec![Some("42".to_owned()), None]
        );
        let field = [b"next\0".as_slice(), &[0; 6], &23u32.to_be_bytes(), &[0; 8]].concat();
        let body = [&1u16.to_be_bytes()[..], &field].concat();
        assert_eq!(row_description(&body), vec![("next".to_owned(), 23)]);
        assert_eq!(
            parameter_description(b"\0\x02\0\0\0\x17\0\0\0\x19"),
            vec![23, 25]
        );
        assert_eq!(
            parameter_status(b"TimeZone\0UTC\0"),
            ("TimeZone".to_owned(), "UTC".to_owned())
        );
        let replies = vec![(b'1', vec![]), (b'Z', b"I".to_vec())];
        assert_eq!(tags(&replies), "1 Z");
        assert_eq!(RawConn::status(&replies), 'I');
    }
}
