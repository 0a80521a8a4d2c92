//! The client's extended-protocol messages rewritten for the backend it holds.

use std::cell::Cell;
use std::rc::Rc;

use crate::pooled::query_text::{
    parse_parameter_changes, query_facts, ParameterChange, QueryFacts,
};
use crate::pooled::transaction::{Resets, Synthesized, Transaction};
use crate::protocol::frame::HEADER_BYTES;
use crate::protocol::frontend as fe;
use crate::protocol::reader::Reader;
use crate::protocol::sqlstate::SqlState;
use crate::protocol::write::{self, Severity};

use super::client::statement_cost;
use super::described::differ;
use super::*;

/// What became of a client's Bind or Describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Sent on (a long Bind's rest follows it).
    Passed,
    /// Answered by the router (26000, 0A000): nothing of it goes to the backend.
    Answered,
    /// Not taken yet: the backend was asked for the row shape and parameter types of its plan
    /// of the statement (a Describe and a Flush of the router's own), and the message waits
    /// for the answer ([`Transaction::checking`]); then it is translated again.
    Check,
}

/// What a Bind or Describe of a named statement finds ([`Translator::resolve`]).
pub(super) enum Resolved {
    /// The statement, on the backend with the row shape the client was told (or one the
    /// client was never told).
    Statement(Rc<Statement>),
    /// Answered by the router: 26000 (no such statement) or 0A000 (its row shape changed).
    Refused,
    /// The router does not know what the client was told of the backend's plan (its row shape,
    /// its parameter types): the backend is asked first.
    Check,
}
/// A message the client sent that no PostgreSQL server would take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed {0} message")]
pub struct Malformed(&'static str);

/// What to do with the client's unnamed statement in this transaction.
#[derive(Debug, Default)]
pub struct Transient {
    /// The client parsed its unnamed statement on this backend in this transaction.
    pub unnamed_here: bool,
    /// The portal the client bound last (its name) and the named statement it bound it to: a
    /// Describe of that portal tells the client the statement's row shape (pgjdbc and libpq
    /// describe the portal, not the statement). Portals end with their transaction.
    bound_portal: Vec<u8>,
    bound_statement: Option<Rc<Statement>>,
    /// The statement whose plan the router last replaced on this backend for its parameter
    /// types ([`Translator::ensure`]): not replaced again right after (a check of the new plan
    /// that still told other types would otherwise loop).
    replaced: Option<Rc<Statement>>,
    /// A Parse or simple Query too long to be read whole ([`Translator::long_parse`],
    /// [`Translator::long_query`]), as much of it as has come: taken as a whole one once it
    /// is all here.
    gathered: Option<Gathered>,
}

/// The bytes of long messages one worker gathers at once, all its clients' together
/// ([`MAX_GATHERED_BYTES`] each): past it, a long query or unnamed Parse goes on unread and a
/// long named Parse is refused with 53200 until others are done. (A client gathering holds a
/// backend, so without it the bound would be every backend's 1 MiB.)
pub const MAX_GATHERED_PER_WORKER: usize = 64 * 1024 * 1024;

thread_local! {
    /// This worker's gathered bytes ([`Gathered`]).
    static GATHERED_BYTES: Cell<usize> = const { Cell::new(0) };
}

/// A long message being gathered, counted against [`MAX_GATHERED_PER_WORKER`] while it lives.
#[derive(Debug)]
struct Gathered {
    bytes: Vec<u8>,
    counted: usize,
}

impl Gathered {
    /// Room for a message of `total` bytes, from its first `piece`; `None` if the worker has
    /// none left.
    fn new(piece: &[u8], total: usize) -> Option<Gathered> {
        GATHERED_BYTES.with(|gathered| {
            let now = gathered.get().checked_add(total)?;
            if now > MAX_GATHERED_PER_WORKER {
                return None;
            }
            gathered.set(now);
            let mut bytes = Vec::with_capacity(total);
            bytes.extend_from_slice(piece);
            Some(Gathered {
                bytes,
                counted: total,
            })
        })
    }
}

impl Drop for Gathered {
    fn drop(&mut self) {
        GATHERED_BYTES.with(|gathered| gathered.set(gathered.get().saturating_sub(self.counted)));
    }
}

impl Transient {
    /// True while the pieces of a long Parse or Query are gathered
    /// ([`Translator::gathered_rest`]).
    pub fn gathering(&self) -> bool {
        self.gathered.is_some()
    }
}

/// The longest Parse or simple Query the router gathers from pieces to read whole (more than
/// its buffers hold). A named Parse past it is refused with 54000; an unnamed one or a Query
/// goes on in pieces, unread (its session is read back after it). A client's statements are
/// bounded besides ([`MAX_CLIENT_STATEMENT_BYTES`](super::client::MAX_CLIENT_STATEMENT_BYTES)).
pub const MAX_GATHERED_BYTES: usize = 1024 * 1024;

/// Rewrites the client's extended-protocol messages that name statements for the backend it
/// holds now, and answers for the router what it answers itself.
pub struct Translator<'a> {
    /// The transaction state machine.
    pub tx: &'a mut Transaction,
    /// The client's statements.
    pub client: &'a mut ClientStatements,
    /// The backend's statements.
    pub backend: &'a mut BackendStatements,
    /// `max_prepared_statements` (0: statements are passed through untouched).
    pub max: usize,
    /// The texts of the pool's clients' statements.
    pub texts: &'a SharedTexts,
    /// This transaction's state.
    pub transient: &'a mut Transient,
    /// What the backend is sent.
    pub out: &'a mut Vec<u8>,
}

fn error(code: SqlState, message: &str) -> Box<[u8]> {
    let mut out = Vec::new();
    write::error_response(&mut out, Severity::Error, code, message);
    out.into_boxed_slice()
}

/// What the router has a backend run in place of a message it refuses: it fails at once
/// (a syntax error), creates nothing, and puts the backend in the state PostgreSQL would be in
/// after the refusal (an aborted transaction block, the skip to the next Sync).
pub const REFUSAL_SQL: &str = "branchgate refused the statement";
/// The name the refusing Parse is sent under (never created: the Parse fails).
pub(super) const REFUSAL_NAME: &str = "bg_refused";

/// Has the backend fail in place of the client's message (a simple query if `simple`), and the
/// client get `error` in place of the backend's error.
pub fn refuse(tx: &mut Transaction, out: &mut Vec<u8>, error: Box<[u8]>, simple: bool) {
    if simple {
        write::query(out, REFUSAL_SQL);
    } else {
        write::parse(out, REFUSAL_NAME, REFUSAL_SQL);
    }
    tx.refuse(error, simple);
}

impl Translator<'_> {
    fn enabled(&self) -> bool {
        self.max > 0
    }

    /// Answers the client's extended-protocol message with `error`, as PostgreSQL would have.
    fn refuse(&mut self, error: Box<[u8]>) {
        refuse(self.tx, self.out, error, false);
    }

    /// Closes the backend's least recently used statements until one more fits under
    /// `max_prepared_statements`.
    fn make_room(&mut self) {
        while let Some(evicted) = self.backend.make_room(self.max) {
            message_with_name(self.out, fe::CLOSE, b"S", &evicted, b"");
            self.tx.router_close(&evicted);
        }
    }

    /// Gives the backend `statement` if it does not have it (a Parse of the router's own,
    /// after closing the least recently used one if it is full), or if its plan there is not
    /// the client's to run ([`Translator::replaces`]): closed, and prepared again with the
    /// parameter types the client was told. Returns what the router knows of the backend's plan
    /// of it.
    fn ensure(&mut self, statement: &Rc<Statement>) -> Plan {
        let told_types = statement.told_types();
        let name = statement.server_name();
        let plan = match self.backend.touch(name) {
            Some(plan) if !self.replaces(statement, plan) => plan,
            Some(_) => {
                self.transient.replaced = Some(statement.clone());
                message_with_name(self.out, fe::CLOSE, b"S", name, b"");
                self.tx.router_close(name);
                statement.write_parse_for_backend(self.out);
                self.tx.router_parse(Some(statement.clone()));
                self.backend.prepared_again(name, told_types)
            }
            None => {
                self.make_room();
                statement.write_parse_for_backend(self.out);
                self.tx.router_parse(Some(statement.clone()));
                self.backend.insert(name, told_types)
            }
        };
        statement.settled.set(true);
        plan
    }

    /// True if the backend's `plan` of the text of `statement` must be replaced by a Parse of
    /// the client's before it runs the statement:
    /// - the client's statement has not run yet on a plan parsed after its Parse (PostgreSQL
    ///   parses it when the client does: a DDL since the backend's plan was made changes the
    ///   parameter types and row shape the client is to be told);
    /// - the plan has other parameter types than the client was told (the text was prepared
    ///   there for another client, either side of a DDL or under another `search_path`);
    /// - the plan is older than the client's Parse and has another row shape than the client
    ///   was told (its other shape is from before a DDL the client's statement came after; a
    ///   plan newer than the client's with another shape is answered 0A000, as PostgreSQL
    ///   answers the client's own, [`Translator::resolve`]), or one the router would have to
    ///   ask for (a Describe of a plan from before such a DDL fails with that 0A000 itself,
    ///   and would abort the client's transaction; the client's own plan is asked instead).
    fn replaces(&self, statement: &Rc<Statement>, plan: Plan) -> bool {
        let older = plan.parsed < statement.parsed;
        if !statement.settled.get() {
            return older;
        }
        let just_replaced = self
            .transient
            .replaced
            .as_ref()
            .is_some_and(|replaced| Rc::ptr_eq(replaced, statement));
        let (told_shape, told_types) = (statement.told_shape(), statement.told_types());
        let other_types = differ(told_types, plan.types);
        let older_unlike = differ(told_shape, plan.shape)
            || (told_shape.is_some() && plan.shape.is_none())
            || (told_types.is_some() && plan.types.is_none());
        !just_replaced && (other_types || (older && older_unlike))
    }

    /// A whole Parse message.
    pub fn parse(&mut self, message: &[u8]) -> Result<(), Malformed> {
        let mut r = Reader::new(&message[HEADER_BYTES..]);
        let name = r.cstr_utf8().map_err(|_| Malformed("Parse"))?;
        let after_name = r.rest();
        let mut changes_parameters = false;
        let mut lookup = None;
        parse_parameter_changes(after_name, |change| {
            changes_parameters = true;
            lookup = lookup.or(change.lookup_hash(after_name));
            self.tx.parameter_change(change);
        });
        if let Some(what) = lookup {
            self.client.amend(what);
        }
        if name.is_empty() || !self.enabled() {
            // The unnamed statement: as sent, and kept for a later transaction (until its
            // Parse fails: then the client has none, as on the server).
            let statement = Rc::new(Statement::new(message.into(), changes_parameters, 0));
            self.client.unnamed = Some(statement.clone());
            self.transient.unnamed_here = true;
            self.tx.hold_for_unnamed(false);
            self.out.extend_from_slice(message);
            self.tx.client_parse(name.is_empty().then_some(statement));
            return Ok(());
        }
        if self.client.named.contains_key(name) {
            self.refuse(error(
                SqlState::DUPLICATE_PREPARED_STATEMENT,
                &format!("prepared statement \"{name}\" already exists"),
            ));
            return Ok(());
        }
        let statement = self.client.statement(after_name, self.texts);
        if !self.client.has_room(1, statement_cost(name, &statement)) {
            self.refuse(error(
                SqlState::PROGRAM_LIMIT_EXCEEDED,
                &format!(
                    "too many prepared statements for one client of the pooled port (at most \
                     {MAX_CLIENT_STATEMENTS}, {} MiB of statement text): close some, or use \
                     the direct port",
                    MAX_CLIENT_STATEMENT_BYTES / (1024 * 1024)
                ),
            ));
            return Ok(());
        }
        self.client.insert(name.into(), statement.clone());
        let server_name = statement.server_name();
        if self.backend.touch(server_name).is_some() {
            // The backend's plan of the text was parsed before the client's Parse, maybe
            // before a DDL: the client is told what a Parse now tells (its error too).
            message_with_name(self.out, fe::CLOSE, b"S", server_name, b"");
            self.tx.router_close(server_name);
            self.backend.prepared_again(server_name, None);
        } else {
            self.make_room();
            self.backend.insert(server_name, None);
        }
        statement.settled.set(true);
        self.out.extend_from_slice(&statement.parse);
        self.tx.client_parse(Some(statement));
        Ok(())
    }

    /// The start of a Parse message too long to be read whole (over 20 KiB), of `total`
    /// bytes: says whether its rest is passed on as it comes. It is gathered
    /// ([`Translator::gathered_rest`]) and then taken as a whole Parse (an ORM's `IN ($1, ...,
    /// $5000)` is one), up to [`MAX_GATHERED_BYTES`]; a longer named one is refused with
    /// 54000, a longer unnamed one goes on unread.
    pub fn long_parse(&mut self, piece: &[u8], total: usize) -> bool {
        let unnamed = piece.get(HEADER_BYTES) == Some(&0);
        if total <= MAX_GATHERED_BYTES && self.enabled() {
            if self.gather(piece, total) {
                return false;
            }
            if !unnamed {
                self.refuse(error(
                    SqlState::OUT_OF_MEMORY,
                    "too many long statements are arriving at once on the pooled port: try \
                     again",
                ));
                return false;
            }
        }
        if unnamed || !self.enabled() {
            self.unread();
            self.hold_long_unnamed(unnamed);
            self.out.extend_from_slice(piece);
            self.tx.client_parse(None);
            return true;
        }
        self.refuse(error(
            SqlState::PROGRAM_LIMIT_EXCEEDED,
            &format!(
                "a named prepared statement is too long for the pooled port: its Parse message \
                 must fit in {} MiB (use the direct port, or an unnamed statement)",
                MAX_GATHERED_BYTES / (1024 * 1024)
            ),
        ));
        false
    }

    /// The start of a simple Query too long to be read whole (over 20 KiB: a bulk `INSERT
    /// ... VALUES` of literals), of `total` bytes: says whether its rest is passed on as it
    /// comes. It is gathered ([`Translator::gathered_rest`]) and then read as a whole one, up
    /// to [`MAX_GATHERED_BYTES`]; a longer one goes on unread.
    pub fn long_query(&mut self, piece: &[u8], total: usize) -> bool {
        if total <= MAX_GATHERED_BYTES && self.gather(piece, total) {
            return false;
        }
        self.unread();
        self.simple_query_starts();
        self.tx.client(fe::QUERY, 0);
        self.out.extend_from_slice(piece);
        true
    }

    /// A message goes on too long to read: what it did to the session is read back, and any
    /// lock or temporary table it left cleaned up, before the backend is lent again.
    fn unread(&mut self) {
        self.tx.parameter_change(ParameterChange::Unknown);
        self.tx.parameter_change(ParameterChange::Residue);
    }

    /// Gathers a long message from its first `piece`, `total` bytes in all; false if the
    /// worker has no room for it ([`MAX_GATHERED_PER_WORKER`]).
    fn gather(&mut self, piece: &[u8], total: usize) -> bool {
        self.transient.gathered = Gathered::new(piece, total);
        self.transient.gathered.is_some()
    }

    /// More of the long Parse or Query that [`Translator::long_parse`] or
    /// [`Translator::long_query`] began to gather; `last` if the message ends with it: then
    /// it is taken as a whole one. An unnamed statement that long is not kept for another
    /// backend: this one is held for it ([`Translator::hold_long_unnamed`]).
    pub fn gathered_rest(&mut self, piece: &[u8], last: bool) -> Result<(), Malformed> {
        let Some(gathered) = self.transient.gathered.as_mut() else {
            return Ok(());
        };
        gathered.bytes.extend_from_slice(piece);
        if !last {
            return Ok(());
        }
        // Counted until it has been taken.
        let Some(done) = self.transient.gathered.take() else {
            return Ok(());
        };
        let whole = &done.bytes;
        match whole.first().copied() {
            Some(fe::PARSE) => {
                self.parse(whole)?;
                if whole.get(HEADER_BYTES) == Some(&0) {
                    self.hold_long_unnamed(true);
                }
            }
            Some(fe::QUERY) => {
                self.query(whole);
            }
            _ => {}
        }
        Ok(())
    }

    /// The client's unnamed statement is on this backend only (too long to keep for another):
    /// the backend is held until the client binds it (a driver's Parse+Sync, then
    /// Bind+Execute+Sync), replaces it or drops it.
    fn hold_long_unnamed(&mut self, unnamed: bool) {
        self.tx.hold_for_unnamed(unnamed);
        self.client.unnamed = None;
        self.transient.unnamed_here = true;
    }

    /// The unnamed statement a Bind or Describe names: the backend is given the client's
    /// own first if it was parsed in an earlier transaction. False if the client has none (the
    /// router has answered 26000, as PostgreSQL does): whatever unnamed statement the backend
    /// holds is another client's.
    fn resolve_unnamed(&mut self) -> bool {
        if self.transient.unnamed_here {
            // Bound: a backend held for it (a long one) may go back after this batch.
            self.tx.hold_for_unnamed(false);
            return true;
        }
        match self.client.unnamed.clone() {
            Some(unnamed) => {
                // Parsed in an earlier transaction, run in this one: what it changes is
                // followed now.
                unnamed.parameter_changes(|change| self.tx.parameter_change(change));
                self.out.extend_from_slice(&unnamed.parse);
                self.tx.router_parse(None);
                self.transient.unnamed_here = true;
                true
            }
            None => {
                self.refuse(error(
                    SqlState::INVALID_SQL_STATEMENT_NAME,
                    "unnamed prepared statement does not exist",
                ));
                false
            }
        }
    }

    /// A simple Query begins (whole or not): PostgreSQL drops the unnamed statement first
    /// (`exec_simple_query`), so the client has none from here on.
    pub fn simple_query_starts(&mut self) {
        if self.enabled() {
            self.client.unnamed = None;
            self.transient.unnamed_here = false;
            self.tx.hold_for_unnamed(false);
        }
    }

    /// The statement a Bind or Describe names: the backend is given it first if needed, and
    /// its plan there must have the row shape the client was told.
    fn resolve(&mut self, name: &str) -> Resolved {
        let Some(statement) = self.client.named.get(name).cloned() else {
            self.refuse(error(
                SqlState::INVALID_SQL_STATEMENT_NAME,
                &format!("prepared statement \"{name}\" does not exist"),
            ));
            return Resolved::Refused;
        };
        let plan = self.ensure(&statement);
        // Until its Sync the backend ignores what it is sent: nothing runs there to check.
        if self.tx.skipping() {
            return Resolved::Statement(statement);
        }
        let told_shape = statement.told_shape();
        if let (Some(told), Some(shape)) = (told_shape, plan.shape) {
            if told != shape {
                // PostgreSQL's answer to a statement whose plan a DDL changed, until the
                // client prepares it again. The pool's other backends may have the old plan:
                // they drop their statements before their next transaction (once per
                // statement: a client that binds it again and again changes nothing more).
                if !statement.stale.replace(true) {
                    self.tx.note_changed_shape();
                }
                let mut stale = Vec::new();
                write::error_response_from(
                    &mut stale,
                    SqlState::FEATURE_NOT_SUPPORTED,
                    "cached plan must not change result type",
                    "plancache.c",
                    "RevalidateCachedQuery",
                );
                self.refuse(stale.into_boxed_slice());
                return Resolved::Refused;
            }
        }
        // What the client was told and the router does not know of the backend's plan is
        // asked first (then the message is translated again).
        let unknown_shape = told_shape.is_some() && plan.shape.is_none();
        let unknown_types = statement.told_types().is_some() && plan.types.is_none();
        if unknown_shape || unknown_types {
            message_with_name(self.out, fe::DESCRIBE, b"S", statement.server_name(), b"");
            write::flush(self.out);
            self.tx.router_describe(statement);
            return Resolved::Check;
        }
        Resolved::Statement(statement)
    }

    /// The start of a Bind message (at least its two names): the names are rewritten; the
    /// rest of `piece` follows unchanged. Says whether the rest of the message follows
    /// (`Passed`), the router answered it (`Answered`: dropped), or it waits for the
    /// backend's answer to a check of the statement's row shape (`Check`: not taken).
    pub fn bind(&mut self, piece: &[u8], total_len: usize) -> Result<Taken, Malformed> {
        let mut r = Reader::new(&piece[HEADER_BYTES..]);
        let portal = r.cstr().map_err(|_| Malformed("Bind"))?;
        let name = r.cstr_utf8().map_err(|_| Malformed("Bind"))?;
        let rest = r.rest();
        if !self.enabled() {
            self.out.extend_from_slice(piece);
            self.tx.client(fe::BIND, 0);
            return Ok(Taken::Passed);
        }
        let statement = if name.is_empty() {
            if !self.resolve_unnamed() {
                return Ok(Taken::Answered);
            }
            None
        } else {
            match self.resolve(name) {
                Resolved::Statement(statement) => Some(statement),
                Resolved::Refused => return Ok(Taken::Answered),
                Resolved::Check => return Ok(Taken::Check),
            }
        };
        let run = match &statement {
            Some(statement) => Some((statement, true)),
            None => self.client.unnamed.as_ref().map(|unnamed| (unnamed, false)),
        };
        if let Some((run, named)) = run.filter(|(s, _)| s.changes_parameters) {
            let run = Rc::clone(run);
            self.follow_run(&run, named, rest);
        }
        // Followed only until the client has been told the statement's row shape: once it
        // has, a Bind costs nothing more here.
        self.transient.bound_statement = statement
            .as_ref()
            .filter(|statement| statement.told_shape().is_none())
            .cloned();
        if self.transient.bound_statement.is_some() {
            self.transient.bound_portal.clear();
            self.transient.bound_portal.extend_from_slice(portal);
        }
        let new_name = statement.as_ref().map_or("", |s| s.server_name());
        let len = total_len - name.len() + new_name.len() - 1;
        self.out.push(fe::BIND);
        self.out.extend_from_slice(&(len as u32).to_be_bytes());
        self.out.extend_from_slice(portal);
        self.out.push(0);
        self.out.extend_from_slice(new_name.as_bytes());
        self.out.push(0);
        self.out.extend_from_slice(rest);
        self.tx.client(fe::BIND, 0);
        Ok(Taken::Passed)
    }

    /// What `statement`, which changes parameters, does when a Bind whose body past its names
    /// is `rest` runs it. A named one was prepared in an earlier transaction, or its Parse
    /// went before: its changes are followed again (the unnamed statement's were followed at
    /// its Parse, or by [`Translator::resolve_unnamed`]). Either way, its `set_config` calls
    /// that take `search_path` or the role from its parameters
    /// ([`BoundLookup`](crate::pooled::query_text::BoundLookup)) tell the statements the
    /// client parses after it apart by the values bound, as those of a `SET LOCAL
    /// search_path` are by what it sets; a Bind the router does not have whole (over 20 KiB,
    /// its parameter past what was read) sets something no other statement shares.
    fn follow_run(&mut self, statement: &Statement, named: bool, rest: &[u8]) {
        use std::hash::{Hash, Hasher};
        let mut lookup = None;
        let mut bound: Option<std::hash::DefaultHasher> = None;
        statement.parameter_changes(|change| {
            if let ParameterChange::BoundLookup(call) = &change {
                let hash = call.hash(rest).unwrap_or_else(|_| Some(unshared()));
                if let Some(hash) = hash {
                    hash.hash(bound.get_or_insert_with(Default::default));
                }
            }
            if named {
                lookup = lookup.or(change.lookup_hash(&statement.parse));
                self.tx.parameter_change(change);
            }
        });
        if let Some(what) = lookup {
            self.client.amend(what);
        }
        if let Some(bound) = bound {
            self.client.amend(bound.finish());
        }
    }

    /// A whole Describe message: `Check` if it waits for the backend's answer to a check of
    /// the statement's row shape (not taken), else taken.
    pub fn describe(&mut self, message: &[u8]) -> Result<Taken, Malformed> {
        let mut r = Reader::new(&message[HEADER_BYTES..]);
        let kind = r.u8().map_err(|_| Malformed("Describe"))?;
        let name = r.cstr_utf8().map_err(|_| Malformed("Describe"))?;
        if kind != b'S' || !self.enabled() {
            self.out.extend_from_slice(message);
            // Until the client has been told its statement's row shape (then backends that
            // were not told theirs are asked, [`Translator::resolve`]).
            let bound = self.transient.bound_statement.as_ref().filter(|statement| {
                statement.told_shape().is_none() && self.transient.bound_portal == name.as_bytes()
            });
            match bound {
                Some(statement) if kind == b'P' => self.tx.client_describe_portal(statement),
                _ => {
                    self.tx.client(fe::DESCRIBE, kind);
                }
            }
            return Ok(Taken::Passed);
        }
        if name.is_empty() {
            if !self.resolve_unnamed() {
                return Ok(Taken::Answered);
            }
            self.out.extend_from_slice(message);
            self.tx.client(fe::DESCRIBE, kind);
            return Ok(Taken::Passed);
        }
        match self.resolve(name) {
            Resolved::Statement(statement) => {
                message_with_name(self.out, fe::DESCRIBE, b"S", statement.server_name(), b"");
                self.tx.client_describe(statement);
                Ok(Taken::Passed)
            }
            Resolved::Refused => Ok(Taken::Answered),
            Resolved::Check => Ok(Taken::Check),
        }
    }

    /// A whole Close message.
    pub fn close(&mut self, message: &[u8]) -> Result<(), Malformed> {
        let mut r = Reader::new(&message[HEADER_BYTES..]);
        let kind = r.u8().map_err(|_| Malformed("Close"))?;
        let name = r.cstr_utf8().map_err(|_| Malformed("Close"))?;
        if kind != b'S' || name.is_empty() || !self.enabled() {
            if kind == b'S' && name.is_empty() {
                // Closed on the backend it holds (if there), and not parsed again later.
                self.client.unnamed = None;
                self.tx.hold_for_unnamed(false);
            }
            self.out.extend_from_slice(message);
            self.tx.client(fe::CLOSE, kind);
            return Ok(());
        }
        // The statement stays on the backends (other clients may use it); the client's name
        // goes. PostgreSQL answers CloseComplete for a name that does not exist too.
        self.client.remove(name);
        self.tx.synthesize(Synthesized::CloseComplete);
        self.tx.note_extended();
        Ok(())
    }

    /// True if the query's `DISCARD ALL` or `DEALLOCATE ALL` is sure to fail as PostgreSQL runs
    /// it, leaving every prepared statement: a `DISCARD ALL` beside other statements (they make
    /// an implicit block, 25001), or alone in the client's block (25001), or either in an
    /// aborted block (25P02) that no statement of the query ends. A block is known only when
    /// nothing the client sent before is still owed (a pipelined `BEGIN` may open one the
    /// router has not seen): then the names go, as for PgBouncer #1535's pipelined `DEALLOCATE
    /// ALL` and Parse.
    fn clear_fails(&self, facts: &QueryFacts) -> bool {
        if facts.discard_all && facts.statements > 1 {
            return true;
        }
        if self.tx.pending() > 0 {
            return false;
        }
        match self.tx.status() {
            b'E' => !facts.transaction_control,
            b'T' => facts.discard_all,
            _ => false,
        }
    }

    /// A whole (or the start of a long) simple Query: `DEALLOCATE` and `DISCARD ALL` clear the
    /// client's names; `DEALLOCATE name` of a name only the router knows is answered by the
    /// router. Returns false if the router answered it (the rest is dropped).
    pub fn query(&mut self, piece: &[u8]) -> bool {
        self.simple_query_starts();
        let facts = query_facts(&piece[HEADER_BYTES..]);
        if facts.prepare {
            refuse(
                self.tx,
                self.out,
                error(
                    SqlState::FEATURE_NOT_SUPPORTED,
                    "SQL-level PREPARE is not supported on the pooled port: use \
                         protocol-level prepared statements (your driver's), or the direct port",
                ),
                true,
            );
            return false;
        }
        if let Some(name) = &facts.deallocate {
            if self.enabled() {
                if self.client.remove(name) {
                    self.tx.synthesize_command("DEALLOCATE");
                } else {
                    // The client has no statement of that name (SQL-level PREPARE is
                    // refused), whatever the backend has under it (another client's).
                    refuse(
                        self.tx,
                        self.out,
                        error(
                            SqlState::INVALID_SQL_STATEMENT_NAME,
                            &format!("prepared statement \"{name}\" does not exist"),
                        ),
                        true,
                    );
                }
                return false;
            }
        }
        if facts.clears_statements && self.enabled() && !self.clear_fails(&facts) {
            self.client.clear();
            self.client.unnamed = None;
            // The backend loses every statement it had, other clients' too: it will be
            // given them again when they are used.
            self.backend.clear();
        }
        self.out.extend_from_slice(piece);
        self.tx.client(fe::QUERY, 0);
        if facts.resets != Resets::Nothing {
            self.tx.resets_parameters(facts.resets);
            // `search_path` (and for `DISCARD ALL` the role) back to the session's defaults:
            // statements parsed after it are told apart from those parsed before.
            self.client.amend(0);
        }
        for change in facts.changes {
            if let Some(what) = change.lookup_hash(piece) {
                self.client.amend(what);
            }
            self.tx.parameter_change(change);
        }
        true
    }
}

/// A value no other call of [`unshared`] returns: what a lookup the router cannot read sets.
fn unshared() -> u64 {
    static UNSHARED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    UNSHARED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod gathered_tests {
    use super::*;

    #[test]
    fn a_workers_gathered_bytes_are_bounded_and_given_back() {
        let piece = b"Q\0\0\0\0select";
        let each = MAX_GATHERED_BYTES;
        let held: Vec<Gathered> = (0..MAX_GATHERED_PER_WORKER / each)
            .map(|i| Gathered::new(piece, each).unwrap_or_else(|| panic!("room for {i}")))
            .collect();
        assert!(Gathered::new(piece, each).is_none(), "the worker's bound");
        assert!(Gathered::new(piece, 1).is_none());
        drop(held);
        assert!(
            Gathered::new(piece, each).is_some(),
            "given back when dropped"
        );
        assert_eq!(GATHERED_BYTES.with(Cell::get), 0);
    }
}
