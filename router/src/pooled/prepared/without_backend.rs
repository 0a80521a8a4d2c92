//! A client's Parse and Close between transactions, answered without a backend.

use std::rc::Rc;

use crate::buf::ReadBuf;
use crate::protocol::backend as be;
use crate::protocol::frame::{self, HEADER_BYTES};
use crate::protocol::frontend as fe;
use crate::protocol::reader::Reader;

use super::client::statement_cost;
use super::*;

/// Statements a pool's backends have accepted (their server names): a client's Parse of one
/// of them between transactions is answered without a backend, since it is known to parse.
/// Bounded: when full it starts over.
#[derive(Debug, Default)]
pub struct KnownGood(std::cell::RefCell<std::collections::HashSet<Box<str>>>);

/// Server names a pool remembers as accepted.
const MAX_KNOWN_GOOD: usize = 10_000;

impl KnownGood {
    /// A backend accepted `statement`.
    pub fn add(&self, statement: &Statement) {
        if statement.server_name().is_empty() {
            return;
        }
        let mut set = self.0.borrow_mut();
        if set.len() >= MAX_KNOWN_GOOD {
            set.clear();
        }
        set.insert(statement.server_name().into());
    }

    fn contains(&self, server_name: &str) -> bool {
        self.0.borrow().contains(server_name)
    }
}

/// Answers, for a client that holds no backend (so is outside any transaction), the batches at
/// the front of `plain` that need none: statement Closes, Flushes, and Parses of statements the
/// pool's backends have accepted before (`known`), up to a Sync; answered with CloseComplete,
/// ParseComplete and ReadyForQuery `I` in `out`, as a server would. Stops at a batch with any
/// other message, leaving it and the rest where they are; true if nothing is left. (Drivers
/// prepare statements with a Parse and a Sync of their own, some of them blocking: pgbench
/// waits for it with every other client stopped, so it must not wait for a backend.)
pub fn answer_idle(
    plain: &mut ReadBuf,
    statements: &mut ClientStatements,
    known: &KnownGood,
    texts: &SharedTexts,
    max: usize,
    out: &mut Vec<u8>,
) -> bool {
    if max == 0 {
        return plain.is_empty();
    }
    loop {
        // A batch is answered only once its Sync is here: until then nothing is consumed.
        let mut at = 0;
        let mut closes = Vec::new();
        let mut parses: Vec<(Box<str>, Rc<Statement>)> = Vec::new();
        let mut pending_bytes = 0;
        let synced = loop {
            let Ok(Some(header)) = frame::check(&plain.data()[at..], plain.capacity()) else {
                break false;
            };
            let body = &plain.data()[at + HEADER_BYTES..at + header.len];
            match header.tag {
                fe::FLUSH => {}
                fe::SYNC => {
                    at += header.len;
                    break true;
                }
                fe::CLOSE if body.first() == Some(&b'S') && body.len() > 2 && parses.is_empty() => {
                    let mut r = Reader::new(&body[1..]);
                    match r.cstr_utf8() {
                        Ok(name) if r.is_empty() => closes.push(Box::<str>::from(name)),
                        _ => break false,
                    }
                }
                fe::PARSE => {
                    let mut r = Reader::new(body);
                    let Ok(name) = r.cstr_utf8() else {
                        break false;
                    };
                    let taken = statements.named.contains_key(name)
                        || parses.iter().any(|(n, _)| **n == *name);
                    if name.is_empty() || taken {
                        break false;
                    }
                    let after_name = r.rest();
                    let server_name = statements.server_name(after_name);
                    if !known.contains(&server_name) {
                        break false;
                    }
                    let statement = statements.statement_named(&server_name, after_name, texts);
                    // Past the client's budget: the backend path refuses it.
                    pending_bytes += statement_cost(name, &statement);
                    if !statements.has_room(parses.len() + 1, pending_bytes) {
                        break false;
                    }
                    parses.push((name.into(), statement));
                }
                _ => break false,
            }
            at += header.len;
        };
        if !synced {
            return plain.is_empty();
        }
        for name in closes {
            statements.remove(&name);
            out.extend_from_slice(&[be::CLOSE_COMPLETE, 0, 0, 0, 4]);
        }
        for (name, statement) in parses {
            statements.insert(name, statement);
            out.extend_from_slice(&[be::PARSE_COMPLETE, 0, 0, 0, 4]);
        }
        out.extend_from_slice(&[be::READY_FOR_QUERY, 0, 0, 0, 5, b'I']);
        plain.consume(at);
    }
}
