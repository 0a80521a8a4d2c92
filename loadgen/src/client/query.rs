//! Queries: simple (Query) or extended (Bind/Execute/Sync on a statement prepared once per
//! connection). Each query is encoded once into a [`Request`] and sent as often as needed, so
//! the hot path allocates nothing.

use branchgate::protocol::backend::{self as msg, ErrorFields};
use branchgate::protocol::write as pgwrite;

use super::{ClientError, Conn, Incoming};

/// How queries are sent (`--protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// Query (F): parse, plan and run every time.
    Simple,
    /// Parse once per connection, then Bind/Execute/Sync.
    Extended,
}

impl Protocol {
    /// The name used on the command line and in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Simple => "simple",
            Protocol::Extended => "extended",
        }
    }
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

    /// Bind/Execute/Sync of the prepared statement `name`, unnamed portal.
    pub fn prepared(name: &str) -> Request {
        let mut buf = Vec::with_capacity(32 + 2 * name.len());
        pgwrite::bind(&mut buf, "", name);
        pgwrite::execute(&mut buf, "");
        pgwrite::sync(&mut buf);
        Request(buf)
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
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
        let prepared = Request::prepared("lg0");
        let mut want = b"B\x00\x00\x00\x0f\0lg0\0\x00\x00\x00\x00\x00\x00".to_vec();
        want.extend_from_slice(b"E\x00\x00\x00\x09\0\x00\x00\x00\x00");
        want.extend_from_slice(b"S\x00\x00\x00\x04");
        assert_eq!(prepared.bytes(), want);
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
