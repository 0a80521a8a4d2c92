//! Queries: simple (Query), extended (the unnamed statement parsed every time) or prepared
//! (Bind/Execute/Sync on a named statement prepared once per connection), the three modes of
//! pgbench's `-M`. Each query is encoded once into a [`Request`] and sent as often as needed,
//! so the hot path allocates nothing.

use branchgate::protocol::backend::{self as msg, ErrorFields};
use branchgate::protocol::write as pgwrite;

use super::{ClientError, Conn, Incoming};

/// Bind (F)'s message type.
const BIND: u8 = b'B';
/// The most parameters one statement may have: the protocol counts them in 16 bits.
pub const MAX_PARAMS: usize = u16::MAX as usize;

/// How queries are sent (`--protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// Query (F): parse, plan and run every time.
    Simple,
    /// Parse of the unnamed statement, Bind, Execute, Sync every time (pgbench `-M extended`,
    /// libpq's `PQexecParams` without its Describe).
    Extended,
    /// A named statement per distinct SQL text, prepared once per connection (Parse, Sync);
    /// then Bind, Execute, Sync (pgbench `-M prepared`).
    Prepared,
}

impl Protocol {
    /// The name used on the command line and in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Simple => "simple",
            Protocol::Extended => "extended",
            Protocol::Prepared => "prepared",
        }
    }
}

/// One statement of the query file: its SQL and the text values of its parameters (`$1`,
/// `$2`, ...; only the extended and prepared protocols send parameters).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    /// The SQL text.
    pub sql: String,
    /// Parameter values in text format, in order.
    pub params: Vec<String>,
}

impl Statement {
    /// A query-file line: the SQL, then optionally a tab before each parameter value.
    pub fn from_line(line: &str) -> Statement {
        let mut fields = line.split('\t');
        let sql = fields.next().unwrap_or_default().trim().to_owned();
        Statement {
            sql,
            params: fields.map(str::to_owned).collect(),
        }
    }

    /// A statement without parameters.
    pub fn plain(sql: &str) -> Statement {
        Statement {
            sql: sql.to_owned(),
            params: Vec::new(),
        }
    }
}

/// The distinct SQL texts of `statements` in first-seen order, and for each statement the
/// index of its text: the prepared protocol prepares each text once per connection, so a file
/// of one parameterised statement with many values is one Parse, as in pgbench.
pub fn distinct_sql(statements: &[Statement]) -> (Vec<&str>, Vec<usize>) {
    let mut texts: Vec<&str> = Vec::new();
    let index = statements
        .iter()
        .map(|s| match texts.iter().position(|t| *t == s.sql) {
            Some(k) => k,
            None => {
                texts.push(&s.sql);
                texts.len() - 1
            }
        })
        .collect();
    (texts, index)
}

/// The encoded messages of one query, ready to send.
#[derive(Clone, Debug)]
pub struct Request(Vec<u8>);

impl Request {
    /// A simple-protocol query.
    pub fn simple(sql: &str) -> Request {
        let mut buf = Vec::with_capacity(sql.len() + 6);
        pgwrite::query(&mut buf, sql);
        Request(buf)
    }

    /// Parse of the unnamed statement, Bind with `params`, Execute, Sync: the whole query in
    /// one batch, so a transaction pooler runs it on one server connection.
    pub fn extended(sql: &str, params: &[String]) -> Request {
        let mut buf = Vec::with_capacity(64 + sql.len() + params_len(params));
        pgwrite::parse(&mut buf, "", sql);
        bind(&mut buf, "", params);
        pgwrite::execute(&mut buf, "");
        pgwrite::sync(&mut buf);
        Request(buf)
    }

    /// Bind/Execute/Sync of the prepared statement `name` with `params`, unnamed portal.
    pub fn prepared(name: &str, params: &[String]) -> Request {
        let mut buf = Vec::with_capacity(32 + 2 * name.len() + params_len(params));
        bind(&mut buf, name, params);
        pgwrite::execute(&mut buf, "");
        pgwrite::sync(&mut buf);
        Request(buf)
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

fn params_len(params: &[String]) -> usize {
    params.iter().map(|p| 4 + p.len()).sum()
}

/// Bind (F): `statement` to the unnamed portal, `params` in text format, results in text.
/// The caller keeps `params.len()` within [`MAX_PARAMS`] (the query file is checked).
fn bind(buf: &mut Vec<u8>, statement: &str, params: &[String]) {
    let start = buf.len();
    buf.push(BIND);
    // The length, patched once the body is written.
    buf.extend_from_slice(&[0; 4]);
    // The unnamed portal, then the statement.
    buf.push(0);
    buf.extend_from_slice(statement.as_bytes());
    buf.push(0);
    // No parameter format codes: all text.
    buf.extend_from_slice(&0u16.to_be_bytes());
    let count = u16::try_from(params.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&count.to_be_bytes());
    for value in &params[..usize::from(count)] {
        let len = i32::try_from(value.len()).unwrap_or(i32::MAX);
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(value.as_bytes());
    }
    // No result format codes: all text.
    buf.extend_from_slice(&0u16.to_be_bytes());
    let len = u32::try_from(buf.len() - start - 1).unwrap_or(u32::MAX);
    buf[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

/// What the server made of one query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It ran; `rows` DataRows came back.
    Done {
        /// Number of DataRow messages.
        rows: u64,
    },
    /// The server answered with an ErrorResponse (`CODE: message`); the connection goes on.
    Failed(String),
}

impl Conn {
    /// Prepares `sql` as the named statement `name` (Parse, Sync).
    pub async fn prepare(&mut self, name: &str, sql: &str) -> Result<(), ClientError> {
        self.wbuf.clear();
        pgwrite::parse(&mut self.wbuf, name, sql);
        pgwrite::sync(&mut self.wbuf);
        self.flush().await?;
        match self.read_results().await? {
            Outcome::Done { .. } => Ok(()),
            Outcome::Failed(message) => Err(ClientError::Prepare(message)),
        }
    }

    /// Prepares and describes each (name, text) of `statements`, one at a time (a Parse, a
    /// Describe and a Sync, then the answer: as asyncpg prepares). Not cancel-safe.
    pub async fn prepare_described(
        &mut self,
        statements: &[(String, String)],
    ) -> Result<(), ClientError> {
        for (name, sql) in statements {
            self.wbuf.clear();
            pgwrite::parse(&mut self.wbuf, name, sql);
            pgwrite::describe(&mut self.wbuf, b'S', name);
            pgwrite::sync(&mut self.wbuf);
            self.flush().await?;
            if let Outcome::Failed(message) = self.read_results().await? {
                return Err(ClientError::Prepare(message));
            }
        }
        Ok(())
    }

    /// Sends `request` and reads the replies up to ReadyForQuery. Not cancel-safe.
    pub async fn run(&mut self, request: &mut Request) -> Result<Outcome, ClientError> {
        self.transport.write_all(&mut request.0).await?;
        self.read_results().await
    }

    async fn read_results(&mut self) -> Result<Outcome, ClientError> {
        let mut rows = 0;
        let mut failed = None;
        loop {
            let (tag, header) = match self.next().await? {
                Incoming::Whole(header) => (header.tag, Some(header)),
                Incoming::Skipped(tag) => (tag, None),
            };
            match tag {
                msg::DATA_ROW => rows += 1,
                msg::READY_FOR_QUERY => {
                    if let Some(header) = header {
                        self.consume(header);
                    }
                    return Ok(match failed {
                        None => Outcome::Done { rows },
                        Some(message) => Outcome::Failed(message),
                    });
                }
                msg::ERROR_RESPONSE if failed.is_none() => {
                    let body = header.map(|h| self.frame_body(h)).unwrap_or_default();
                    failed = Some(error_line(body));
                }
                msg::COPY_IN_RESPONSE | msg::COPY_OUT_RESPONSE | msg::COPY_BOTH_RESPONSE => {
                    return Err(ClientError::Protocol("COPY is not supported"))
                }
                msg::ERROR_RESPONSE
                | msg::PARSE_COMPLETE
                | msg::BIND_COMPLETE
                | msg::CLOSE_COMPLETE
                | msg::COMMAND_COMPLETE
                | msg::ROW_DESCRIPTION
                | msg::EMPTY_QUERY_RESPONSE
                | msg::NO_DATA
                | msg::PORTAL_SUSPENDED
                | msg::PARAMETER_DESCRIPTION
                | msg::NOTICE_RESPONSE
                | msg::NOTIFICATION_RESPONSE
                | msg::PARAMETER_STATUS => {}
                _ => return Err(ClientError::Protocol("unexpected message in query results")),
            }
            if let Some(header) = header {
                self.consume(header);
            }
        }
    }
}

/// `CODE: message` of an ErrorResponse body.
#[cold]
fn error_line(body: &[u8]) -> String {
    match ErrorFields::parse(body) {
        Ok(fields) => format!("{}: {}", fields.code, fields.message),
        Err(_) => "malformed ErrorResponse".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_encoded_once() {
        assert_eq!(
            Request::simple("SELECT 1").bytes(),
            b"Q\x00\x00\x00\x0dSELECT 1\0"
        );
        let prepared = Request::prepared("lg0", &[]);
        let mut want = b"B\x00\x00\x00\x0f\0lg0\0\x00\x00\x00\x00\x00\x00".to_vec();
        want.extend_from_slice(b"E\x00\x00\x00\x09\0\x00\x00\x00\x00");
        want.extend_from_slice(b"S\x00\x00\x00\x04");
        assert_eq!(prepared.bytes(), want);
    }

    #[test]
    fn bind_carries_text_parameters() {
        let prepared = Request::prepared("lg1", &["42".into(), String::new()]);
        // Portal "", statement "lg1", 0 format codes, 2 values ("42", ""), 0 result formats.
        let mut want = b"B\x00\x00\x00\x19\0lg1\0\x00\x00\x00\x02".to_vec();
        want.extend_from_slice(b"\x00\x00\x00\x0242\x00\x00\x00\x00\x00\x00");
        want.extend_from_slice(b"E\x00\x00\x00\x09\0\x00\x00\x00\x00");
        want.extend_from_slice(b"S\x00\x00\x00\x04");
        assert_eq!(prepared.bytes(), want);
    }

    #[test]
    fn extended_parses_the_unnamed_statement_each_time() {
        let request = Request::extended("SELECT $1", &["7".into()]);
        let mut want = b"P\x00\x00\x00\x11\0SELECT $1\0\x00\x00".to_vec();
        want.extend_from_slice(b"B\x00\x00\x00\x11\0\0\x00\x00\x00\x01\x00\x00\x00\x017\x00\x00");
        want.extend_from_slice(b"E\x00\x00\x00\x09\0\x00\x00\x00\x00");
        want.extend_from_slice(b"S\x00\x00\x00\x04");
        assert_eq!(request.bytes(), want);
    }

    #[test]
    fn query_file_lines() {
        assert_eq!(
            Statement::from_line("SELECT 1"),
            Statement::plain("SELECT 1")
        );
        assert_eq!(
            Statement::from_line("SELECT $1, $2 \t5\t a b"),
            Statement {
                sql: "SELECT $1, $2".into(),
                params: vec!["5".into(), " a b".into()],
            }
        );
        assert_eq!(Statement::from_line("SELECT $1\t").params, [""]);
    }

    #[test]
    fn prepared_once_per_distinct_text() {
        let statements = [
            Statement::from_line("SELECT $1\t1"),
            Statement::plain("SELECT 2"),
            Statement::from_line("SELECT $1\t3"),
        ];
        let (texts, index) = distinct_sql(&statements);
        assert_eq!(texts, ["SELECT $1", "SELECT 2"]);
        assert_eq!(index, [0, 1, 0]);
    }

    #[test]
    fn error_lines() {
        assert_eq!(
            error_line(b"SERROR\0C22012\0Mdivision by zero\0\0"),
            "22012: division by zero"
        );
        assert_eq!(error_line(b""), "malformed ErrorResponse");
    }
}
