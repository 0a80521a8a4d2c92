//! The values a client's `SET` gave parameters PostgreSQL does not report (`search_path`,
//! `statement_timeout`, ...), read back from its backend once its transaction is over.
//!
//! PostgreSQL sends no ParameterStatus for them, so the router cannot follow such a `SET` from
//! the backend's messages, and a backend that kept one would hand it to the next client of the
//! pool (PgBouncer's behaviour in transaction mode, PgDog #1299). When a transaction's
//! statements set one (`SET [SESSION] name ...`, seen in simple queries and Parse messages),
//! the router asks the backend for the values with `current_setting` before it lends the
//! backend again: the client keeps them (as its session would on a real server) and the next
//! client of that backend gets its own. One round trip, only after such a transaction.
//!
//! The same round trip checks a client's StartupMessage parameters at its login
//! ([`startup_settings`]): PostgreSQL refuses a login whose `TimeZone` it does not know, and
//! reports the values as it reads them (`iso` is `ISO, MDY`).

use std::time::Duration;

use crate::buf::{write_all_vec, BufPool, ReadBuf};
use crate::protocol::backend as be;
use crate::protocol::frame::{self, HEADER_BYTES};
use crate::protocol::reader::Reader;
use crate::protocol::write;

use super::params;
use super::pool::Backend;

/// How long the backend has to answer.
const READ_BACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the values could not be read: the backend is not lent again.
#[derive(Debug, thiserror::Error)]
pub enum ReadBackError {
    #[error("backend: {0}")]
    Io(#[from] std::io::Error),
    #[error("backend closed")]
    Closed,
    #[error("backend did not answer in time")]
    Timeout,
    #[error("backend's answer is not a row of settings: {0}")]
    Protocol(&'static str),
}

/// The current values of `names` on `backend` (idle, between transactions), in order, after
/// `first` (the router's own statements, if any); `None` for a name the backend has no value
/// for (a `SET` of it failed).
pub(super) async fn current_settings(
    backend: &mut Backend,
    names: &[Box<str>],
    first: &str,
    buffers: &BufPool,
) -> Result<Vec<Option<String>>, ReadBackError> {
    let mut sql = String::from(first);
    sql.push_str("SELECT ");
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str("pg_catalog.current_setting(");
        params::push_literal(&mut sql, name);
        sql.push_str(", true)");
    }
    // The last row: the router's own statements before it answer with rows of their own.
    let mut row = None;
    round_trip(backend, &sql, buffers, |tag, body| {
        if tag == be::DATA_ROW {
            row = Some(body.to_vec());
        }
        Ok(())
    })
    .await?;
    // An error (a name PostgreSQL refuses) leaves no row: nothing is known.
    match row {
        Some(body) => data_row(&body, names.len()),
        None => Ok(vec![None; names.len()]),
    }
}

/// What a backend's session holds, read whole by [`session_audit`].
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct SessionAudit {
    /// Every setting the session gave a value of its own (`pg_settings.source` is `session`:
    /// `SET`, `set_config`) but `transaction_*`, the role (`none` too), and the custom ones
    /// named that exist, with the value `SHOW` gives.
    pub(super) settings: Vec<(Box<str>, Box<str>)>,
    /// SQL-level prepared statements (`PREPARE`).
    pub(super) sql_statements: u64,
    /// Protocol-level prepared statements (the router's).
    pub(super) protocol_statements: u64,
}

/// At most this many settings are read back: more (custom `x.y` settings have no number)
/// fail the read, and the backend is not lent again.
const MAX_AUDITED_SETTINGS: usize = 1024;

/// The session audit's statement: one row per setting, then (named '') the prepared
/// statements' counts, SQL-level and protocol-level.
///
/// `transaction_isolation`, `transaction_read_only` and `transaction_deferrable` keep the
/// source `session` after a `SET TRANSACTION` has ended with its transaction, and no
/// `set_config` takes them back outside a transaction's start (25001, which would fail the
/// whole of the router's setup statement on the next backend): they are not read. The role
/// is always read (`none` too: a client that started with one may have set it back).
const SESSION_AUDIT: &str = "SELECT s.name, pg_catalog.current_setting(s.name) \
     FROM pg_catalog.pg_settings s WHERE s.source = 'session' AND s.name NOT IN \
     ('transaction_isolation', 'transaction_read_only', 'transaction_deferrable') \
     UNION ALL SELECT 'role', pg_catalog.current_setting('role') \
     UNION ALL SELECT '', (SELECT pg_catalog.count(*) FILTER (WHERE from_sql) || ' ' || \
     pg_catalog.count(*) FILTER (WHERE NOT from_sql) FROM pg_catalog.pg_prepared_statements)";

/// Reads `backend`'s whole session (idle, between transactions), after `first` (the router's
/// own statements, if any): what a transaction did that the router could not follow from its
/// text (`SET ROLE`, `set_config`, a query too long to read...).
///
/// `names` are parameters the transaction's statements named (`SET name`): read by name too,
/// as custom parameters (`app.user_id`) are not in `pg_settings`.
pub(super) async fn session_audit(
    backend: &mut Backend,
    names: &[Box<str>],
    first: &str,
    buffers: &BufPool,
) -> Result<SessionAudit, ReadBackError> {
    let mut sql = String::from(first);
    sql.push_str(SESSION_AUDIT);
    // By name only the custom ones (`app.x`, with a dot), which pg_settings does not list;
    // the rest are in its rows above, and `current_setting` of a superuser-only one would
    // fail the whole read (a client could have every backend it uses closed that way).
    for name in names.iter().filter(|name| name.contains('.')) {
        sql.push_str(" UNION ALL SELECT ");
        params::push_literal(&mut sql, name);
        sql.push_str(", pg_catalog.current_setting(");
        params::push_literal(&mut sql, name);
        sql.push_str(", true)");
    }
    let mut audit = SessionAudit::default();
    let mut counts = None;
    let mut failed = false;
    round_trip(backend, &sql, buffers, |tag, body| {
        match tag {
            // The rows after the last RowDescription are the audit's (the router's own
            // statements before it may answer with rows of their own).
            be::ROW_DESCRIPTION => {
                audit.settings.clear();
                counts = None;
            }
            // Rows of another width are the router's own statements' before it.
            be::DATA_ROW if body.get(..2) == Some(&[0, 2]) => {
                let mut row = data_row(body, 2)?.into_iter();
                let (Some(Some(name)), Some(value)) = (row.next(), row.next()) else {
                    return Err(ReadBackError::Protocol("session audit row"));
                };
                if name.is_empty() {
                    counts = value;
                } else if audit.settings.len() == MAX_AUDITED_SETTINGS {
                    return Err(ReadBackError::Protocol("too many session settings"));
                } else if let Some(value) = value {
                    // NULL: a name the server does not know (its SET failed).
                    audit.settings.push((name.into(), value.into()));
                }
            }
            be::ERROR_RESPONSE => failed = true,
            _ => {}
        }
        Ok(())
    })
    .await?;
    let counts = counts.filter(|_| !failed);
    let Some((sql_statements, protocol_statements)) = counts
        .as_deref()
        .and_then(|c| c.split_once(' '))
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
    else {
        return Err(ReadBackError::Protocol("session audit counts"));
    };
    audit.sql_statements = sql_statements;
    audit.protocol_statements = protocol_statements;
    Ok(audit)
}

/// What PostgreSQL made of a client's StartupMessage parameters.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum StartupSettings {
    /// Each value as the server now shows it, in the order given.
    Accepted(Vec<Box<str>>),
    /// The server refused the one after those in `applied` (as it shows them): its
    /// ErrorResponse, made FATAL, as PostgreSQL sends it for a StartupMessage (22023
    /// `invalid value for parameter ...`).
    Refused {
        applied: Vec<Box<str>>,
        fatal: Vec<u8>,
    },
}

/// Gives idle `backend` the `settings` (name and value, as a StartupMessage gives them) and
/// reads back what the server made of each, in one round trip.
pub(super) async fn startup_settings(
    backend: &mut Backend,
    settings: &[(&str, &str)],
    buffers: &BufPool,
) -> Result<StartupSettings, ReadBackError> {
    let mut sql = String::new();
    for (name, value) in settings {
        params::push_set(&mut sql, name, value);
    }
    let mut values: Vec<Box<str>> = Vec::with_capacity(settings.len());
    let mut refused = None;
    round_trip(backend, &sql, buffers, |tag, body| {
        match tag {
            be::DATA_ROW => {
                let value = data_row(body, 1)?.pop().flatten().unwrap_or_default();
                values.push(value.into());
            }
            be::ERROR_RESPONSE if refused.is_none() => refused = Some(as_fatal(body)?),
            _ => {}
        }
        Ok(())
    })
    .await?;
    match refused {
        Some(fatal) => Ok(StartupSettings::Refused {
            applied: values,
            fatal,
        }),
        None if values.len() == settings.len() => Ok(StartupSettings::Accepted(values)),
        None => Err(ReadBackError::Protocol("set_config rows")),
    }
}

/// The whole ErrorResponse with `body`, its severity FATAL: what PostgreSQL sends when it
/// refuses a StartupMessage's parameter (the same code, message, detail and hint it gives
/// `set_config`).
fn as_fatal(body: &[u8]) -> Result<Vec<u8>, ReadBackError> {
    const MALFORMED: ReadBackError = ReadBackError::Protocol("ErrorResponse");
    let mut r = Reader::new(body);
    let mut fields = Vec::with_capacity(body.len() + 8);
    loop {
        let field = r.u8().map_err(|_| MALFORMED)?;
        if field == 0 {
            break;
        }
        let value = r.cstr().map_err(|_| MALFORMED)?;
        fields.push(field);
        match field {
            b'S' | b'V' => fields.extend_from_slice(b"FATAL"),
            _ => fields.extend_from_slice(value),
        }
        fields.push(0);
    }
    fields.push(0);
    let mut out = Vec::with_capacity(HEADER_BYTES + fields.len());
    out.push(be::ERROR_RESPONSE);
    out.extend_from_slice(&((4 + fields.len()) as u32).to_be_bytes());
    out.extend_from_slice(&fields);
    Ok(out)
}

/// Sends `sql` (a simple query) to idle `backend` and hands each message of the answer to
/// `visit` (its type and body), up to and including the ReadyForQuery that ends it, all within
/// [`READ_BACK_TIMEOUT`].
async fn round_trip(
    backend: &mut Backend,
    sql: &str,
    buffers: &BufPool,
    mut visit: impl FnMut(u8, &[u8]) -> Result<(), ReadBackError>,
) -> Result<(), ReadBackError> {
    let mut out = Vec::with_capacity(HEADER_BYTES + sql.len() + 1);
    write::query(&mut out, sql);
    let mut buf = ReadBuf::from_storage(buffers.take());
    let read = monoio::time::timeout(READ_BACK_TIMEOUT, async {
        write_all_vec(&mut backend.wr, &mut out).await?;
        loop {
            while let Some((tag, len)) = whole_message(buf.data(), buf.capacity())? {
                visit(tag, &buf.data()[HEADER_BYTES..len])?;
                if tag == be::READY_FOR_QUERY {
                    return Ok(());
                }
                buf.consume(len);
            }
            if buf.fill_from(&mut backend.rd).await? == 0 {
                return Err(ReadBackError::Closed);
            }
        }
    })
    .await
    .unwrap_or(Err(ReadBackError::Timeout));
    buf.release(buffers);
    read
}

/// The tag and length of the whole message at the start of `data`, if it is all there; one
/// longer than `max` bytes (more than the buffer holds) is refused.
fn whole_message(data: &[u8], max: usize) -> Result<Option<(u8, usize)>, ReadBackError> {
    match frame::check(data, max) {
        Ok(header) => Ok(header.map(|h| (h.tag, h.len))),
        Err(_) => Err(ReadBackError::Protocol("message length")),
    }
}

/// A DataRow of `columns` text values.
fn data_row(body: &[u8], columns: usize) -> Result<Vec<Option<String>>, ReadBackError> {
    let mut r = Reader::new(body);
    let count = r.u16().map_err(|_| ReadBackError::Protocol("DataRow"))? as usize;
    if count != columns {
        return Err(ReadBackError::Protocol("DataRow columns"));
    }
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        let len = r.i32().map_err(|_| ReadBackError::Protocol("DataRow"))?;
        if len < 0 {
            values.push(None);
            continue;
        }
        let bytes = r
            .take(len as usize)
            .map_err(|_| ReadBackError::Protocol("DataRow"))?;
        let text =
            std::str::from_utf8(bytes).map_err(|_| ReadBackError::Protocol("DataRow text"))?;
        values.push(Some(text.to_owned()));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_row_of_settings() {
        let mut body = Vec::new();
        body.extend_from_slice(&3u16.to_be_bytes());
        for value in [Some("app, public"), None, Some("")] {
            match value {
                Some(v) => {
                    body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    body.extend_from_slice(v.as_bytes());
                }
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        assert_eq!(
            data_row(&body, 3).expect("well-formed"),
            [Some("app, public".to_owned()), None, Some(String::new())]
        );
        assert!(data_row(&body, 2).is_err());
        assert!(data_row(&body[..body.len() - 3], 3).is_err());
    }

    #[test]
    fn a_refusal_is_made_fatal_with_every_other_field_kept() {
        let body = b"SERROR\0VERROR\0C22023\0Minvalid value for parameter \"TimeZone\": \"x\"\0\
            Fguc.c\0L7000\0\0";
        let fatal = as_fatal(body).expect("well-formed");
        let expected =
            b"SFATAL\0VFATAL\0C22023\0Minvalid value for parameter \"TimeZone\": \"x\"\0\
            Fguc.c\0L7000\0\0";
        assert_eq!(fatal[0], b'E');
        assert_eq!(
            u32::from_be_bytes([fatal[1], fatal[2], fatal[3], fatal[4]]) as usize,
            fatal.len() - 1
        );
        assert_eq!(&fatal[HEADER_BYTES..], expected);
        assert!(as_fatal(b"SERROR\0C22").is_err(), "unterminated");
    }

    #[test]
    fn whole_messages_only() {
        let message = [b'Z', 0, 0, 0, 5, b'I'];
        assert_eq!(whole_message(&message, 64).expect("fine"), Some((b'Z', 6)));
        assert_eq!(whole_message(&message[..5], 64).expect("fine"), None);
        assert!(whole_message(&[b'Z', 0, 0, 0, 3], 64).is_err());
        assert!(whole_message(&message, 5).is_err());
    }
}
