//! A pooled client whose backend went away mid-transaction: what it is owed, and the aborted
//! transaction block it finds on its next backend.

use crate::protocol::backend as be;
use crate::protocol::frame::HEADER_BYTES;
use crate::protocol::sqlstate::SqlState;
use crate::protocol::write::{self, Severity};

use super::transaction::Transaction;
use super::End;

/// What a client whose backend went away mid-transaction gets: the error and ReadyForQuery its
/// outstanding request is owed, and, if a transaction block was open, an aborted transaction
/// the router re-creates on its next backend (so its COMMIT cannot succeed there: it must roll
/// back, as after any error). A client owed more than one answer, or in a COPY, is closed.
pub(super) fn lost(tx: &Transaction, unsolicited: Option<Vec<u8>>, writing: bool) -> End {
    let in_block = tx.status() != b'I';
    let owed = tx.owed_ready();
    if writing || tx.in_copy() || owed > 1 || (owed == 0 && !in_block) {
        return End::Fatal(SqlState::CONNECTION_FAILURE, LOST_BACKEND);
    }
    let error = unsolicited.unwrap_or_else(|| {
        let mut error = Vec::new();
        write::error_response(
            &mut error,
            Severity::Error,
            SqlState::CONNECTION_FAILURE,
            LOST_BACKEND,
        );
        error
    });
    if owed == 1 {
        // The answer now: the error (unless the backend's reached the client already), then
        // ReadyForQuery.
        let mut now = Vec::new();
        if !tx.errored() {
            now.extend_from_slice(&error);
        }
        write::ready_for_query(&mut now, if in_block { b'E' } else { b'I' });
        return End::Lost(Lost {
            now,
            in_block,
            error: None,
        });
    }
    // Idle in a transaction block: the error answers the client's next message.
    End::Lost(Lost {
        now: Vec::new(),
        in_block,
        error: Some(error.into_boxed_slice()),
    })
}

/// A backend lost under a client that goes on.
#[derive(Debug)]
pub(super) struct Lost {
    /// What the client is sent at once.
    pub(super) now: Vec<u8>,
    /// A transaction block was open: it is re-created, aborted, on the next backend.
    pub(super) in_block: bool,
    /// The error the client's next message gets (it was idle when the backend went).
    pub(super) error: Option<Box<[u8]>>,
}

/// The first messages of a client's next transaction after it lost its backend in a
/// transaction block: the backend is put in an aborted transaction block, and the client's
/// first message is refused with the error it is owed, if any.
#[derive(Debug, Default)]
pub(super) struct Aborted {
    pub(super) error: Option<Box<[u8]>>,
}

/// An ErrorResponse the backend sent unasked (its FATAL before it goes away), as an ERROR:
/// the client's connection goes on.
pub(super) fn as_error(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len());
    out.push(be::ERROR_RESPONSE);
    out.extend_from_slice(&[0; 4]);
    let mut r =
        crate::protocol::reader::Reader::new(message.get(HEADER_BYTES..).unwrap_or_default());
    while let Ok(field) = r.u8() {
        if field == 0 {
            break;
        }
        let Ok(value) = r.cstr() else { break };
        out.push(field);
        if matches!(field, b'S' | b'V') && matches!(value, b"FATAL" | b"PANIC") {
            out.extend_from_slice(b"ERROR");
        } else {
            out.extend_from_slice(value);
        }
        out.push(0);
    }
    out.push(0);
    let len = (out.len() - 1) as u32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out
}

/// What a client whose backend failed mid-transaction is told (PgBouncer's words, which
/// applications match, then ours).
pub(super) const LOST_BACKEND: &str =
    "server conn crashed? (the connection to the branch's server was lost)";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::backend::ErrorFields;
    use crate::protocol::frontend as fe;

    fn fields(message: &[u8]) -> (String, String, String) {
        let fields = ErrorFields::parse(&message[HEADER_BYTES..]).expect("an ErrorResponse");
        (
            fields.severity.to_owned(),
            fields.code.to_owned(),
            fields.message.to_owned(),
        )
    }

    #[test]
    fn a_fatal_sent_unasked_reaches_the_client_as_an_error() {
        let mut fatal = Vec::new();
        write::error_response(
            &mut fatal,
            Severity::Fatal,
            SqlState::ADMIN_SHUTDOWN,
            "terminating connection due to administrator command",
        );
        let error = as_error(&fatal);
        assert_eq!(
            fields(&error),
            (
                "ERROR".to_owned(),
                "57P01".to_owned(),
                "terminating connection due to administrator command".to_owned()
            )
        );
        assert_eq!(error.len(), fatal.len(), "FATAL and ERROR are as long");
    }

    #[test]
    fn a_lost_backend_owes_the_client_what_it_waits_for() {
        // Idle in a transaction block: the error waits for the client's next message.
        let mut tx = Transaction::default();
        tx.client(fe::QUERY, 0);
        tx.backend(be::COMMAND_COMPLETE, b"").expect("in turn");
        tx.backend(be::READY_FOR_QUERY, b"T").expect("in turn");
        match lost(&tx, None, false) {
            End::Lost(Lost {
                now,
                in_block: true,
                error: Some(error),
            }) => {
                assert!(now.is_empty());
                assert_eq!(fields(&error).1, "08006");
            }
            other => panic!("{other:?}"),
        }
        // A query under way in the block: its error (the backend's, already sent) and a
        // ReadyForQuery saying the block failed.
        tx.client(fe::QUERY, 0);
        tx.backend(be::ERROR_RESPONSE, b"").expect("in turn");
        match lost(&tx, None, false) {
            End::Lost(Lost {
                now,
                in_block: true,
                error: None,
            }) => assert_eq!(now, [b'Z', 0, 0, 0, 5, b'E']),
            other => panic!("{other:?}"),
        }
        // Two answers owed (a pipeline): the client is closed.
        let mut tx = Transaction::default();
        for tag in [fe::SYNC, fe::SYNC] {
            tx.client(tag, 0);
        }
        assert!(matches!(lost(&tx, None, false), End::Fatal(..)));
        // A query outside a block: the error, then ReadyForQuery idle.
        let mut tx = Transaction::default();
        tx.client(fe::QUERY, 0);
        match lost(&tx, None, false) {
            End::Lost(Lost {
                now,
                in_block: false,
                ..
            }) => {
                assert_eq!(now[0], b'E');
                assert!(now.ends_with(&[b'Z', 0, 0, 0, 5, b'I']));
            }
            other => panic!("{other:?}"),
        }
    }
}
