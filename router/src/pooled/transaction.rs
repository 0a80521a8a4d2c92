//! The transaction state machine of a pooled client: what the backend it holds still owes it,
//! and so when that backend can go back to the pool.
//!
//! Every message the backend is sent that has a reply puts what it waits for in a queue, in
//! order; every reply the backend sends is matched against the head of that queue. The backend
//! goes back to the pool when the queue is empty, the last ReadyForQuery said `I` (idle, no
//! transaction), no COPY is in progress and no extended-protocol message is waiting for its
//! Sync (a Flush without Sync keeps the backend: the unnamed statement and portal live on it).
//!
//! Some entries are the router's own:
//! - replies to swallow: the ParseComplete of a statement the router prepared on a backend
//!   that lacked it, and its description (the router asks for its row shape before the
//!   client's message that names it goes, [`Transaction::router_describe`]), the CloseComplete
//!   of one it evicted or replaced, everything answering the `SET`s that give a backend the
//!   client's parameters;
//! - replies the router gives itself ([`Synthesized`]), sent to the client when they reach the
//!   head of the queue, so the client sees every reply in the order of its messages: the
//!   CloseComplete of a statement Close (statements stay prepared on backends), the answer to
//!   a `DEALLOCATE` of a name only the router knows;
//! - errors PostgreSQL would raise for names only the router knows (42P05, 26000): the router
//!   sends the backend a statement that fails in its place and gives the client its own
//!   error in place of the backend's, so the backend's state (an aborted transaction, the
//!   skip to the next Sync) is exactly what PostgreSQL's would be.
//!
//! Errors follow PostgreSQL: after an ErrorResponse to an extended-protocol message the
//! backend ignores everything until the next Sync, so those entries are dropped (they will get
//! no reply). So does COPY IN: the backend reads the client's messages as COPY data until its
//! CopyDone or CopyFail and drops any Sync among them, such as the one libpq and tokio-postgres
//! send right after the Execute of a COPY (PgBouncer #1023 kept the backend waiting for its
//! answer).
//!
//! Pure: fed message types (and the bodies it reads), it never touches a socket,
//! so it is tested on byte fixtures.

use std::collections::VecDeque;
use std::rc::Rc;

use thiserror::Error;

use super::prepared::{BackendStatements, ClientStatements, Described, Statement};

use crate::protocol::backend as be;
use crate::protocol::frontend as fe;

/// What happens to a backend message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The client gets it.
    Forward,
    /// It answers the router's own message: the client does not see it.
    Swallow,
}

/// What happens to a client message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Send {
    /// The backend gets it.
    Forward,
    /// Dropped: after an error the router raised, until the client's Sync.
    Discard,
}

/// A reply the router gives the client itself, in its place in the order of replies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Synthesized {
    /// CloseComplete.
    CloseComplete,
    /// A simple query the router answered: CommandComplete with this tag, then
    /// ReadyForQuery.
    Command(&'static str),
}

impl Synthesized {
    /// Appends the message(s) to `out`; `status` is the transaction status a ReadyForQuery
    /// reports.
    pub fn write(&self, out: &mut Vec<u8>, status: u8) {
        match self {
            Synthesized::CloseComplete => out.extend_from_slice(&[be::CLOSE_COMPLETE, 0, 0, 0, 4]),
            Synthesized::Command(tag) => {
                out.push(be::COMMAND_COMPLETE);
                out.extend_from_slice(&(4 + tag.len() as u32 + 1).to_be_bytes());
                out.extend_from_slice(tag.as_bytes());
                out.push(0);
                out.extend_from_slice(&[be::READY_FOR_QUERY, 0, 0, 0, 5, status]);
            }
        }
    }
}

/// A statement Parse that did not happen after all (it failed, or the backend skipped it
/// after an earlier error): what the router recorded for it is taken back.
#[derive(Debug)]
pub enum Undo {
    /// The client's Parse, sent: its name goes, and the backend does not have it.
    Prepared(Rc<Statement>),
    /// The router's own Parse: the backend does not have it (the client keeps its name).
    Reprepared(Rc<Statement>),
    /// The router's Close of a statement (its name on the backend): the backend still has it.
    /// Taken back after the others ([`Transaction::take_undo`]), so that a Parse of the same
    /// name the backend skipped with it does not count it gone.
    Closed(Box<str>),
}

impl Undo {
    /// Takes it back.
    pub fn apply(self, client: &mut ClientStatements, backend: &mut BackendStatements) {
        match self {
            Undo::Prepared(statement) => {
                client.undo(&statement);
                backend.remove(statement.server_name());
            }
            Undo::Reprepared(statement) => {
                backend.remove(statement.server_name());
                statement.unsettle();
            }
            Undo::Closed(name) => backend.kept(&name),
        }
    }
}

/// What a client's query resets of its session when it succeeds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Resets {
    /// Nothing all at once.
    #[default]
    Nothing,
    /// `RESET ALL`: every parameter but the role (PostgreSQL's `RESET ALL` leaves it).
    Parameters,
    /// `DISCARD ALL`: every parameter, the role too (back to the StartupMessage's, as the
    /// session authorization's reset takes it).
    Session,
}

/// What one message sent to the backend waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Awaiting {
    /// ParseComplete.
    Parse {
        swallow: bool,
        statement: Option<Rc<Statement>>,
    },
    /// BindComplete.
    Bind,
    /// ParameterDescription, then RowDescription or NoData. `statement`: a named one, whose
    /// row shape the answer tells; `swallow`: the router's own check of it
    /// ([`Transaction::router_describe`]).
    DescribeStatement {
        statement: Option<Rc<Statement>>,
        swallow: bool,
    },
    /// RowDescription or NoData. `statement`: the named one the portal was bound to, whose
    /// row shape the answer tells.
    DescribePortal { statement: Option<Rc<Statement>> },
    /// Rows, then CommandComplete, EmptyQueryResponse or PortalSuspended.
    Execute,
    /// CloseComplete. `router`: the statement the router closed (its name on the backend: an
    /// eviction, or a plan replaced), whose answer is swallowed; `None`: the client's Close.
    Close { router: Option<Box<str>> },
    /// ReadyForQuery.
    Sync,
    /// A simple query or function call: everything up to its ReadyForQuery. `reset`: what it
    /// resets of the session (DISCARD ALL, RESET ALL): the backend's reports of its own
    /// defaults are swallowed, the client is told its own. `setup`: the router's own
    /// `SET`s of the client's parameters (swallowed too), whose error ends the client's session
    /// ([`Transaction::take_setup_failed`]).
    Query {
        swallow: bool,
        reset: Resets,
        setup: bool,
    },
    /// The router's own reply (for a Parse it answered, the statement).
    Synthesized(Synthesized),
    /// A statement the router sent to fail in place of the client's message: the client gets
    /// `error` in place of the backend's. `simple`: a simple query (its ReadyForQuery
    /// follows).
    Refused { error: Box<[u8]>, simple: bool },
    /// Not a reply: where the client's CopyDone or CopyFail went, sent before the COPY it ends
    /// had started (a whole COPY written at once). The Syncs before it are the COPY's to drop;
    /// dropped itself when it reaches the head (no COPY before it started).
    CopyEnd,
}

/// COPY in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Copy {
    None,
    /// CopyInResponse: the client sends the data.
    In,
    /// CopyOutResponse: the backend sends the data.
    Out,
    /// CopyBothResponse.
    Both,
}

/// The backend sent a reply nothing it was sent asks for: the connection cannot be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error("backend sent message type {tag:?} out of turn", tag = char::from(*tag))]
pub struct OutOfTurn {
    /// The message type byte.
    pub tag: u8,
}

/// The state of the conversation between a client and the backend it holds.
#[derive(Debug)]
pub struct Transaction {
    queue: VecDeque<Awaiting>,
    /// The last ReadyForQuery's status: `I`, `T` or `E`.
    status: u8,
    copy: Copy,
    /// An extended-protocol message went to the backend since the last Sync.
    unsynced: bool,
    /// The backend reported an error to an extended-protocol message and is ignoring
    /// messages until the client's next Sync: they get no entries.
    backend_skipping: bool,
    /// The backend is in COPY IN and the client has not sent its CopyDone or CopyFail: a Sync
    /// (or Flush) the client sends now is read and dropped by the backend.
    client_copying: bool,
    /// Parses that did not happen, to take back.
    undo: Vec<Undo>,
    /// The router's statement Closes that did not happen (their names): taken back last.
    kept: Vec<Box<str>>,
    /// The router's error for the client, in place of the backend's just received.
    substitute: Vec<u8>,
    /// Named statements the backend accepted (ParseComplete), since the last call.
    accepted: Vec<Rc<Statement>>,
    /// What the backend told of named statements (their Describe), since the last call.
    described: Vec<(Rc<Statement>, Described)>,
    /// See [`Transaction::take_changed_shape`].
    changed_shape: bool,
    /// An ErrorResponse reached the client since the last ReadyForQuery.
    errored: bool,
    /// A query that reset the session's parameters just ended.
    reset_done: Resets,
    /// The session must be read back whole before the backend is lent again (see
    /// [`Transaction::take_audit`]).
    audit: bool,
    /// More parameters named than listed ([`Transaction::take_overflow`]).
    overflow: bool,
    /// State no reply tells of may outlive the transaction ([`Transaction::take_residue`]).
    residue: bool,
    /// A parameter the router cannot name was changed ([`Transaction::take_untraceable`]).
    untraceable: bool,
    /// See [`Transaction::hold_for_unnamed`].
    held_for_unnamed: bool,
    /// See [`Transaction::take_setup_failed`].
    setup_failed: bool,
    /// Parameters a statement sent since the backend was last idle may have sent back to the
    /// session default (`RESET name`), lower case, at most [`MAX_RESETS`].
    resets: Vec<Box<str>>,
    /// Those of `resets` a later statement may have given a new value (`RESET search_path;
    /// SET search_path = x` in one query string or batch): the reset is not the last word
    /// on them, the read-back after the transaction is.
    set_after_reset: Vec<Box<str>>,
    /// Parameters a statement of this transaction may have given a new session value (`SET
    /// name ...`), lower case, at most [`MAX_RESETS`].
    sets: Vec<Box<str>>,
}

/// Parameter resets followed per transaction; more are not told apart from `SET`s.
/// As many as one client may have ([`super::params::MAX_UNREPORTED`]): a transaction naming
/// more ends its client's session ([`Transaction::take_overflow`]).
const MAX_RESETS: usize = super::params::MAX_UNREPORTED;

impl Default for Transaction {
    fn default() -> Self {
        Transaction {
            queue: VecDeque::new(),
            status: b'I',
            copy: Copy::None,
            unsynced: false,
            backend_skipping: false,
            client_copying: false,
            substitute: Vec::new(),
            accepted: Vec::new(),
            described: Vec::new(),
            changed_shape: false,
            errored: false,
            reset_done: Resets::Nothing,
            audit: false,
            overflow: false,
            residue: false,
            untraceable: false,
            held_for_unnamed: false,
            setup_failed: false,
            resets: Vec::new(),
            set_after_reset: Vec::new(),
            sets: Vec::new(),
            undo: Vec::new(),
            kept: Vec::new(),
        }
    }
}

impl Transaction {
    /// True when the backend can go back to the pool: nothing owed, no transaction open, no
    /// COPY, no extended-protocol batch waiting for its Sync.
    pub fn releasable(&self) -> bool {
        self.queue.is_empty()
            && self.status == b'I'
            && self.copy == Copy::None
            && !self.unsynced
            && !self.held_for_unnamed
    }

    /// Holds the backend past the batch's Sync while `hold` (the client's unnamed statement
    /// lives only there: one too long for the router to keep, [`Translator::long_parse`]),
    /// until the client binds it, replaces it or drops it.
    ///
    /// [`Translator::long_parse`]: super::prepared::Translator::long_parse
    pub fn hold_for_unnamed(&mut self, hold: bool) {
        self.held_for_unnamed = hold;
    }

    /// True while the backend is inside a transaction block (the last ReadyForQuery said `T`
    /// or `E`), or a query or COPY is under way: a client leaving now takes the backend's
    /// state with it, so the backend must be closed, not reused.
    pub fn busy(&self) -> bool {
        !self.releasable()
    }

    /// The last ReadyForQuery's transaction status.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The client sent a message of type `tag` (for Describe and Close, `kind` is the first
    /// body byte, `S` or `P`). Says whether it goes to the backend.
    pub fn client(&mut self, tag: u8, kind: u8) -> Send {
        match tag {
            // Dropped by the backend in COPY IN: no reply, and the batch still wants its Sync.
            fe::SYNC | fe::FLUSH if self.client_copying => return Send::Forward,
            fe::COPY_DONE | fe::COPY_FAIL => {
                if self.client_copying {
                    self.client_copying = false;
                } else {
                    self.push(Awaiting::CopyEnd);
                }
                return Send::Forward;
            }
            _ => {}
        }
        let awaiting = match tag {
            fe::QUERY | fe::FUNCTION_CALL => Some(Awaiting::Query {
                swallow: false,
                reset: Resets::Nothing,
                setup: false,
            }),
            fe::PARSE => Some(Awaiting::Parse {
                swallow: false,
                statement: None,
            }),
            fe::BIND => Some(Awaiting::Bind),
            fe::DESCRIBE if kind == b'S' => Some(Awaiting::DescribeStatement {
                statement: None,
                swallow: false,
            }),
            fe::DESCRIBE => Some(Awaiting::DescribePortal { statement: None }),
            fe::EXECUTE => Some(Awaiting::Execute),
            fe::CLOSE => Some(Awaiting::Close { router: None }),
            fe::SYNC => Some(Awaiting::Sync),
            // Flush, COPY data from the client: no reply of their own.
            _ => None,
        };
        if matches!(
            tag,
            fe::PARSE | fe::BIND | fe::DESCRIBE | fe::EXECUTE | fe::CLOSE | fe::FLUSH
        ) {
            self.unsynced = true;
        }
        if tag == fe::SYNC {
            self.unsynced = false;
        }
        if let Some(awaiting) = awaiting {
            self.push(awaiting);
        }
        Send::Forward
    }

    /// The client's Parse went to the backend (of `statement`, a named one).
    pub fn client_parse(&mut self, statement: Option<Rc<Statement>>) {
        self.unsynced = true;
        self.push(Awaiting::Parse {
            swallow: false,
            statement,
        });
    }

    /// The router sent the backend a Parse of its own (a statement the client prepared on
    /// another backend, or its unnamed one): its ParseComplete is swallowed.
    pub fn router_parse(&mut self, statement: Option<Rc<Statement>>) {
        self.unsynced = true;
        self.push(Awaiting::Parse {
            swallow: true,
            statement,
        });
    }

    /// The client's Describe of its named `statement` went to the backend (under the
    /// statement's server name): the answer tells its row shape.
    pub fn client_describe(&mut self, statement: Rc<Statement>) {
        self.unsynced = true;
        self.push(Awaiting::DescribeStatement {
            statement: Some(statement),
            swallow: false,
        });
    }

    /// The client's Describe of a portal it bound to its named `statement` went to the backend:
    /// the answer tells the statement's row shape.
    pub fn client_describe_portal(&mut self, statement: &Rc<Statement>) {
        self.unsynced = true;
        self.push(Awaiting::DescribePortal {
            statement: Some(statement.clone()),
        });
    }

    /// The router sent the backend a Describe of `statement` of its own (and a Flush), to
    /// learn the row shape of the backend's plan before the client's message that needs it
    /// goes: the answer is swallowed ([`Transaction::checking`] until it came).
    pub fn router_describe(&mut self, statement: Rc<Statement>) {
        self.unsynced = true;
        self.push(Awaiting::DescribeStatement {
            statement: Some(statement),
            swallow: true,
        });
    }

    /// True while the answer to a [`Transaction::router_describe`] is owed.
    pub fn checking(&self) -> bool {
        self.queue
            .iter()
            .any(|awaiting| matches!(awaiting, Awaiting::DescribeStatement { swallow: true, .. }))
    }

    /// True while the backend ignores what it is sent until the client's next Sync (it
    /// reported an error to an extended-protocol message).
    pub fn skipping(&self) -> bool {
        self.backend_skipping
    }

    /// The router found a statement's row shape changed under the backend (a DDL came
    /// between) and answered 0A000 for it.
    pub fn note_changed_shape(&mut self) {
        self.changed_shape = true;
    }

    /// True once (the call clears it) after [`Transaction::note_changed_shape`].
    pub fn take_changed_shape(&mut self) -> bool {
        std::mem::take(&mut self.changed_shape)
    }

    /// What the backend told of named statements since the last call: of which statement, and
    /// its row shape or parameter types.
    pub fn take_described(&mut self) -> Vec<(Rc<Statement>, Described)> {
        std::mem::take(&mut self.described)
    }

    /// The client sent an extended-protocol message the router answered itself: the
    /// backend is held until the client's Sync all the same.
    pub fn note_extended(&mut self) {
        self.unsynced = true;
    }

    /// The router answers the client's simple query itself with CommandComplete `tag`.
    pub fn synthesize_command(&mut self, tag: &'static str) {
        self.push(Awaiting::Synthesized(Synthesized::Command(tag)));
    }

    /// The router sent the backend a statement that fails (a Parse of
    /// [`super::prepared::REFUSAL_SQL`], or a Query when `simple`) in place of the client's
    /// message: the client gets `error` (a whole ErrorResponse) in place of the backend's.
    pub fn refuse(&mut self, error: Box<[u8]>, simple: bool) {
        if !simple {
            self.unsynced = true;
        }
        self.push(Awaiting::Refused { error, simple });
    }

    /// Named statements the backend accepted since the last call.
    pub fn take_accepted(&mut self) -> Vec<Rc<Statement>> {
        std::mem::take(&mut self.accepted)
    }

    /// Parses and Closes to take back, found since the last call (the Closes last).
    pub fn take_undo(&mut self) -> Vec<Undo> {
        let mut undo = std::mem::take(&mut self.undo);
        undo.extend(self.kept.drain(..).map(Undo::Closed));
        undo
    }

    /// The router sent the backend a Close of its statement `name` (an eviction, or a plan
    /// replaced).
    pub fn router_close(&mut self, name: &str) {
        self.unsynced = true;
        self.push(Awaiting::Close {
            router: Some(name.into()),
        });
    }

    /// The router sent the backend a simple query of its own whose error is no news (the
    /// re-creation of an aborted block): everything up to its ReadyForQuery is swallowed.
    pub fn router_query(&mut self) {
        self.push(Awaiting::Query {
            swallow: true,
            reset: Resets::Nothing,
            setup: false,
        });
    }

    /// The router sent the backend the `SET`s that give it the client's parameters: swallowed
    /// as [`Transaction::router_query`], but an error in them is the client's session failing
    /// ([`Transaction::take_setup_failed`]).
    pub fn router_setup(&mut self) {
        self.push(Awaiting::Query {
            swallow: true,
            reset: Resets::Nothing,
            setup: true,
        });
    }

    /// True while the router's `SET`s ([`Transaction::router_setup`]) wait for their answer.
    pub fn setup_owed(&self) -> bool {
        self.queue
            .iter()
            .any(|awaiting| matches!(awaiting, Awaiting::Query { setup: true, .. }))
    }

    /// True once (the call clears it) after the backend refused the router's `SET`s of the
    /// client's parameters: the client's statements would run with the backend's values.
    pub fn take_setup_failed(&mut self) -> bool {
        std::mem::take(&mut self.setup_failed)
    }

    /// The router answers the client's last message itself, in turn.
    pub fn synthesize(&mut self, reply: Synthesized) {
        self.push(Awaiting::Synthesized(reply));
    }

    fn push(&mut self, awaiting: Awaiting) {
        if matches!(awaiting, Awaiting::CopyEnd) && self.queue.is_empty() {
            // Nothing before it can start a COPY.
            return;
        }
        if self.backend_skipping {
            match awaiting {
                Awaiting::Sync => self.backend_skipping = false,
                // The backend ignores it: no reply will come, and PostgreSQL would not have
                // answered it either.
                other => {
                    self.dropped(other);
                    return;
                }
            }
        }
        self.queue.push_back(awaiting);
    }

    /// True if the router owes the client replies of its own now (they reached the head of
    /// the queue): take them with [`Transaction::take_synthesized`].
    pub fn owes_synthesized(&self) -> bool {
        matches!(self.queue.front(), Some(Awaiting::Synthesized(..)))
    }

    /// An entry that will get no reply: a Parse in it is taken back.
    fn dropped(&mut self, awaiting: Awaiting) {
        match awaiting {
            Awaiting::Parse {
                swallow: false,
                statement: Some(statement),
            } => self.undo.push(Undo::Prepared(statement)),
            Awaiting::Parse {
                swallow: true,
                statement: Some(statement),
            } => self.undo.push(Undo::Reprepared(statement)),
            Awaiting::Close { router: Some(name) } => self.kept.push(name),
            _ => {}
        }
    }

    /// Appends to `out` the router's own replies that have reached the head of the queue.
    pub fn take_synthesized(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.substitute);
        while let Some(Awaiting::Synthesized(reply)) = self.queue.front() {
            reply.write(out, self.status);
            self.queue.pop_front();
            self.settle();
        }
    }

    /// The backend sent a message of type `tag`; `body` is its body (read for ReadyForQuery's
    /// status and a statement's RowDescription; empty for the start of a message too long to
    /// be given whole). Says whether the client gets it. Replies the router owes
    /// that reach the head of the queue are left for [`Transaction::take_synthesized`].
    pub fn backend(&mut self, tag: u8, body: &[u8]) -> Result<Reply, OutOfTurn> {
        let out_of_turn = OutOfTurn { tag };
        let head = self.queue.front();
        let swallowing_query = matches!(head, Some(Awaiting::Query { swallow: true, .. }));
        let reply = match tag {
            be::READY_FOR_QUERY => {
                let reply = match self.queue.pop_front() {
                    Some(Awaiting::Query {
                        swallow: false,
                        reset: reset @ (Resets::Parameters | Resets::Session),
                        ..
                    }) => {
                        self.reset_done = reset;
                        // Inside the client's block a rollback may yet undo it: what the
                        // session has is read back when the transaction is over.
                        self.audit |= body.first() != Some(&b'I');
                        Reply::Forward
                    }
                    Some(Awaiting::Sync) | Some(Awaiting::Query { swallow: false, .. }) => {
                        Reply::Forward
                    }
                    Some(Awaiting::Query { swallow: true, .. }) => Reply::Swallow,
                    _ => return Err(out_of_turn),
                };
                self.errored = false;
                self.status = match body.first() {
                    Some(&status @ (b'I' | b'T' | b'E')) => status,
                    _ => return Err(out_of_turn),
                };
                self.copy = Copy::None;
                reply
            }
            be::ERROR_RESPONSE => {
                self.copy = Copy::None;
                // Out of COPY IN: the client's Syncs from here on are answered.
                self.client_copying = false;
                self.errored = true;
                if let Some(Awaiting::Refused { simple, .. }) = head {
                    let simple = *simple;
                    if let Some(Awaiting::Refused { error, .. }) = self.queue.pop_front() {
                        self.substitute.extend_from_slice(&error);
                    }
                    if simple {
                        // Its ReadyForQuery follows.
                        self.queue.push_front(Awaiting::Query {
                            swallow: false,
                            reset: Resets::Nothing,
                            setup: false,
                        });
                    } else {
                        self.skip_to_sync();
                    }
                    return Ok(Reply::Swallow);
                }
                if let Some(Awaiting::Query {
                    swallow: false,
                    reset: reset @ (Resets::Parameters | Resets::Session),
                    ..
                }) = self.queue.front_mut()
                {
                    // The reset did not run (or not all of it, in a query of several
                    // statements): what the session has is read back, and a backend whose
                    // prepared statements the router took for gone is not lent again.
                    *reset = Resets::Nothing;
                    self.audit = true;
                }
                let head = self.queue.front();
                match head {
                    // A simple query's error: its ReadyForQuery follows.
                    Some(Awaiting::Query { swallow, setup, .. }) => {
                        self.setup_failed |= *setup;
                        if *swallow {
                            Reply::Swallow
                        } else {
                            Reply::Forward
                        }
                    }
                    // An error at Sync (a deferred constraint at COMMIT): its ReadyForQuery
                    // follows.
                    Some(Awaiting::Sync) => Reply::Forward,
                    // An extended-protocol error: the backend skips to the next Sync.
                    Some(_) => {
                        self.skip_to_sync();
                        Reply::Forward
                    }
                    // Not an answer to anything (a FATAL before the backend goes away).
                    None => Reply::Forward,
                }
            }
            // May come at any time.
            be::NOTICE_RESPONSE | be::PARAMETER_STATUS | be::NOTIFICATION_RESPONSE => {
                if swallowing_query || (tag == be::PARAMETER_STATUS && self.resetting()) {
                    Reply::Swallow
                } else {
                    Reply::Forward
                }
            }
            be::PARSE_COMPLETE => match self.queue.pop_front() {
                Some(Awaiting::Parse { swallow, statement }) => {
                    if let Some(statement) = statement {
                        self.accepted.push(statement);
                    }
                    if swallow {
                        Reply::Swallow
                    } else {
                        Reply::Forward
                    }
                }
                _ => return Err(out_of_turn),
            },
            be::BIND_COMPLETE => match self.queue.pop_front() {
                Some(Awaiting::Bind) => Reply::Forward,
                _ => return Err(out_of_turn),
            },
            be::CLOSE_COMPLETE => match self.queue.pop_front() {
                Some(Awaiting::Close { router: None }) => Reply::Forward,
                Some(Awaiting::Close { router: Some(_) }) => Reply::Swallow,
                _ => return Err(out_of_turn),
            },
            be::PARAMETER_DESCRIPTION => match head {
                Some(Awaiting::DescribeStatement { statement, swallow }) => {
                    if let Some(statement) = statement {
                        if !swallow {
                            statement.told_parameters(body);
                        }
                        // One too long to be read whole (thousands of parameters) is taken by
                        // the router's check for the types the client was told, so that it ends.
                        let types = super::prepared::parameter_types(body)
                            .or_else(|| statement.told_types().filter(|_| *swallow));
                        if let Some(types) = types {
                            self.described
                                .push((statement.clone(), Described::ParameterTypes(types)));
                        }
                    }
                    if *swallow {
                        Reply::Swallow
                    } else {
                        Reply::Forward
                    }
                }
                _ => return Err(out_of_turn),
            },
            be::ROW_DESCRIPTION | be::NO_DATA => match head {
                Some(Awaiting::DescribeStatement { .. }) => {
                    let Some(Awaiting::DescribeStatement { statement, swallow }) =
                        self.queue.pop_front()
                    else {
                        return Err(out_of_turn);
                    };
                    if let Some(statement) = statement {
                        // A RowDescription too long to be read whole (thousands of columns)
                        // is not compared: the router's check takes it for the shape the
                        // client was told, so that it ends.
                        let shape = super::prepared::row_shape(tag, body)
                            .or_else(|| statement.told_shape().filter(|_| swallow));
                        if let Some(shape) = shape {
                            self.described.push((statement, Described::Shape(shape)));
                        }
                    }
                    if swallow {
                        Reply::Swallow
                    } else {
                        Reply::Forward
                    }
                }
                Some(Awaiting::DescribePortal { .. }) => {
                    if let Some(Awaiting::DescribePortal {
                        statement: Some(statement),
                    }) = self.queue.pop_front()
                    {
                        if let Some(shape) = super::prepared::row_shape(tag, body) {
                            self.described.push((statement, Described::Shape(shape)));
                        }
                    }
                    Reply::Forward
                }
                // A simple query's result set (NoData never comes there).
                Some(Awaiting::Query { swallow, .. }) if tag == be::ROW_DESCRIPTION => {
                    if *swallow {
                        Reply::Swallow
                    } else {
                        Reply::Forward
                    }
                }
                _ => return Err(out_of_turn),
            },
            be::DATA_ROW | be::COPY_DATA | be::COPY_DONE => match head {
                Some(Awaiting::Execute | Awaiting::Query { swallow: false, .. }) => {
                    if tag == be::COPY_DONE {
                        self.copy = Copy::None;
                    }
                    Reply::Forward
                }
                Some(Awaiting::Query { swallow: true, .. }) => Reply::Swallow,
                _ => return Err(out_of_turn),
            },
            be::COPY_IN_RESPONSE | be::COPY_OUT_RESPONSE | be::COPY_BOTH_RESPONSE => match head {
                Some(Awaiting::Execute | Awaiting::Query { swallow: false, .. }) => {
                    self.copy = match tag {
                        be::COPY_IN_RESPONSE => Copy::In,
                        be::COPY_OUT_RESPONSE => Copy::Out,
                        _ => Copy::Both,
                    };
                    if tag != be::COPY_OUT_RESPONSE {
                        self.copy_in_started();
                    }
                    Reply::Forward
                }
                _ => return Err(out_of_turn),
            },
            be::COMMAND_COMPLETE | be::EMPTY_QUERY_RESPONSE | be::PORTAL_SUSPENDED => {
                self.copy = Copy::None;
                match head {
                    Some(Awaiting::Execute) => {
                        self.queue.pop_front();
                        Reply::Forward
                    }
                    Some(Awaiting::Query { swallow, .. }) if tag != be::PORTAL_SUSPENDED => {
                        if *swallow {
                            Reply::Swallow
                        } else {
                            Reply::Forward
                        }
                    }
                    _ => return Err(out_of_turn),
                }
            }
            be::FUNCTION_CALL_RESPONSE => match head {
                Some(Awaiting::Query { swallow: false, .. }) => Reply::Forward,
                _ => return Err(out_of_turn),
            },
            _ => return Err(out_of_turn),
        };
        self.settle();
        Ok(reply)
    }

    /// The backend went into COPY IN for the message at the head of the queue. It reads the
    /// client's next messages as COPY data until CopyDone or CopyFail, and reads and drops any
    /// Sync or Flush among them (PostgreSQL's `CopyGetData`): the Syncs the client sent since
    /// get no ReadyForQuery. A message of another kind ends the COPY with an error (08P01), so
    /// the Syncs after it are answered.
    fn copy_in_started(&mut self) {
        // What the client sent after the message that started the COPY.
        const AFTER: usize = 1;
        self.client_copying = true;
        while let Some(next) = self.queue.get(AFTER) {
            match next {
                Awaiting::Sync => {
                    self.queue.remove(AFTER);
                }
                Awaiting::CopyEnd => {
                    self.queue.remove(AFTER);
                    self.client_copying = false;
                    break;
                }
                _ => {
                    self.client_copying = false;
                    break;
                }
            }
        }
        let extended = matches!(self.queue.front(), Some(Awaiting::Execute));
        if extended && !self.queue.iter().any(|a| matches!(a, Awaiting::Sync)) {
            // The Execute's batch still owes the backend a Sync.
            self.unsynced = true;
        }
    }

    /// Drops the COPY end markers that reached the head: no COPY before them can start.
    fn settle(&mut self) {
        while let Some(Awaiting::CopyEnd) = self.queue.front() {
            self.queue.pop_front();
        }
    }

    /// After an extended-protocol error: the backend skips to the next Sync.
    fn skip_to_sync(&mut self) {
        while !matches!(self.queue.front(), None | Some(Awaiting::Sync)) {
            if let Some(dropped) = self.queue.pop_front() {
                self.dropped(dropped);
            }
        }
        self.backend_skipping = self.queue.is_empty();
    }

    /// The client's last message resets the session's parameters (DISCARD ALL, RESET ALL).
    pub fn resets_parameters(&mut self, what: Resets) {
        if let Some(Awaiting::Query {
            swallow: false,
            reset,
            ..
        }) = self.queue.back_mut()
        {
            *reset = what;
        }
    }

    /// True while the backend answers a query that resets the session's parameters: its
    /// ParameterStatus messages report the pool's defaults, not the client's.
    pub fn resetting(&self) -> bool {
        matches!(
            self.queue.front(),
            Some(Awaiting::Query {
                swallow: false,
                reset: Resets::Parameters | Resets::Session,
                ..
            })
        )
    }

    /// A statement the client sent may change a parameter.
    pub fn parameter_change(&mut self, change: super::query_text::ParameterChange) {
        use super::query_text::ParameterChange;
        /// Lists `name`; false if the list is full without it.
        fn note(list: &mut Vec<Box<str>>, name: &str) -> bool {
            if list.iter().any(|n| **n == *name) {
                return true;
            }
            if list.len() < MAX_RESETS {
                list.push(name.into());
                return true;
            }
            false
        }
        match change {
            ParameterChange::Reset(mut name) => {
                name.make_ascii_lowercase();
                note(&mut self.resets, &name);
                self.set_after_reset.retain(|n| **n != *name);
                // Its outcome is read back too: a ROLLBACK can undo it.
                if !note(&mut self.sets, &name) {
                    self.overflow = true;
                }
            }
            ParameterChange::Set(mut name) => {
                name.make_ascii_lowercase();
                if self.resets.iter().any(|n| **n == *name) {
                    note(&mut self.set_after_reset, &name);
                }
                if !note(&mut self.sets, &name) {
                    self.overflow = true;
                }
            }
            ParameterChange::Characteristics => {
                for name in super::query_text::CHARACTERISTICS {
                    self.parameter_change(ParameterChange::Set(name.into()));
                }
            }
            // Over with the transaction; statements parsed after it are told apart
            // ([`super::prepared::ClientStatements::amend`]).
            ParameterChange::Lookup(_) | ParameterChange::BoundLookup(_) => {}
            ParameterChange::Unknown => self.audit = true,
            ParameterChange::Residue => self.residue = true,
            ParameterChange::Untraceable => {
                self.audit = true;
                self.untraceable = true;
            }
        }
    }

    /// True if this transaction's statements named more parameters than one client may
    /// have: the router cannot follow them all (the backend is closed, and the client).
    pub fn take_overflow(&mut self) -> bool {
        std::mem::take(&mut self.overflow)
    }

    /// True if a statement changed a parameter the router cannot name
    /// ([`ParameterChange::Untraceable`](super::query_text::ParameterChange)): the backend is
    /// closed after the session read. The call clears it.
    pub fn take_untraceable(&mut self) -> bool {
        std::mem::take(&mut self.untraceable)
    }

    /// True if a statement may have left state no reply tells of (a session-level advisory
    /// lock, a temporary table made by `CREATE TABLE ... AS`): cleaned up before the backend
    /// is lent again. The call clears it.
    pub fn take_residue(&mut self) -> bool {
        std::mem::take(&mut self.residue)
    }

    /// As [`Transaction::take_residue`], without clearing it.
    pub fn residue_owed(&self) -> bool {
        self.residue
    }

    /// True if the session is to be read whole before the backend is lent again.
    pub fn audit_owed(&self) -> bool {
        self.audit
    }

    /// True if a statement since the last call changed the session in a way only a read of
    /// all of it can follow ([`ParameterChange::Unknown`](super::query_text::ParameterChange),
    /// or more parameters than the router lists): the call clears it.
    pub fn take_audit(&mut self) -> bool {
        std::mem::take(&mut self.audit)
    }

    /// True if statements of this transaction may have given parameters new session values.
    pub fn has_sets(&self) -> bool {
        !self.sets.is_empty()
    }

    /// The parameters statements of this transaction may have given new session values:
    /// the call clears them.
    pub fn take_sets(&mut self) -> Vec<Box<str>> {
        std::mem::take(&mut self.sets)
    }

    /// True if a statement the client sent since the backend was last idle may have sent
    /// parameter `name` back to its session default.
    pub fn may_have_reset(&self, name: &str) -> bool {
        self.resets.iter().any(|n| n.eq_ignore_ascii_case(name))
    }

    /// The parameters statements sent back to their session default and no later statement
    /// gave a new value, once the backend owes nothing: the call clears them (and those a
    /// later statement set, which the read-back after the transaction follows).
    pub fn take_resets(&mut self) -> Vec<Box<str>> {
        if !self.queue.is_empty() {
            return Vec::new();
        }
        let superseded = std::mem::take(&mut self.set_after_reset);
        let mut resets = std::mem::take(&mut self.resets);
        resets.retain(|name| !superseded.contains(name));
        resets
    }

    /// What a query reset, once (the call clears it), after its ReadyForQuery: the client is
    /// owed ParameterStatus for its own defaults.
    pub fn take_reset_done(&mut self) -> Resets {
        std::mem::take(&mut self.reset_done)
    }

    /// True while a simple query of the router's own ([`Transaction::router_query`]) waits
    /// for its answer.
    pub fn router_query_owed(&self) -> bool {
        self.queue
            .iter()
            .any(|awaiting| matches!(awaiting, Awaiting::Query { swallow: true, .. }))
    }

    /// True if the backend owes nothing and yet cannot go back: the client is idle in a
    /// transaction block, an unsynced extended-protocol batch or a COPY, holding it.
    pub fn idle_holding(&self) -> bool {
        self.queue.is_empty() && !self.releasable()
    }

    /// Replies owed (the backend's and the router's own).
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// ReadyForQuery messages the backend owes (one per Sync and per simple query sent).
    pub fn owed_ready(&self) -> usize {
        self.queue
            .iter()
            .filter(|a| matches!(a, Awaiting::Sync | Awaiting::Query { .. }))
            .count()
    }

    /// True while a COPY is under way.
    pub fn in_copy(&self) -> bool {
        self.copy != Copy::None
    }

    /// True if an ErrorResponse reached the client since the last ReadyForQuery.
    pub fn errored(&self) -> bool {
        self.errored
    }

    /// True if the next reply owed is the backend's: nothing the router owes can go out
    /// before the backend sends something.
    pub fn backend_next(&self) -> bool {
        matches!(self.queue.front(), Some(awaiting) if !matches!(awaiting, Awaiting::Synthesized(..)))
    }

    /// True while the backend owes replies (or a COPY is under way).
    pub fn awaiting_backend(&self) -> bool {
        self.copy != Copy::None
            || self
                .queue
                .iter()
                .any(|awaiting| !matches!(awaiting, Awaiting::Synthesized(..)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds client message types (`D`/`C` with their kind after a colon is not needed: the
    /// kind is the second char in `"DS"`, `"CP"`).
    fn client(tx: &mut Transaction, messages: &[&str]) -> Vec<Send> {
        messages
            .iter()
            .map(|m| {
                let bytes = m.as_bytes();
                tx.client(bytes[0], bytes.get(1).copied().unwrap_or(0))
            })
            .collect()
    }

    fn backend(tx: &mut Transaction, tag: u8) -> Reply {
        tx.backend(tag, &[]).expect("in turn")
    }

    fn ready(tx: &mut Transaction, status: u8) -> Reply {
        tx.backend(be::READY_FOR_QUERY, &[status]).expect("in turn")
    }

    #[test]
    fn a_reset_that_fails_is_not_taken_as_done_and_the_session_is_read_back() {
        let mut tx = Transaction::default();
        client(&mut tx, &["Q"]);
        tx.resets_parameters(Resets::Session);
        assert!(tx.resetting());
        backend(&mut tx, be::COMMAND_COMPLETE);
        ready(&mut tx, b'I');
        assert_eq!(tx.take_reset_done(), Resets::Session);
        assert!(!tx.take_audit());
        // `RESET ALL` in the client's block: a rollback may undo it.
        client(&mut tx, &["Q"]);
        tx.resets_parameters(Resets::Parameters);
        backend(&mut tx, be::COMMAND_COMPLETE);
        ready(&mut tx, b'T');
        assert_eq!(tx.take_reset_done(), Resets::Parameters);
        assert!(tx.take_audit());
        // `BEGIN; ...` then `DISCARD ALL`: 25001, nothing reset.
        client(&mut tx, &["Q"]);
        tx.resets_parameters(Resets::Session);
        assert_eq!(backend(&mut tx, be::ERROR_RESPONSE), Reply::Forward);
        assert!(!tx.resetting());
        ready(&mut tx, b'T');
        assert_eq!(tx.take_reset_done(), Resets::Nothing);
        assert!(tx.take_audit());
    }

    #[test]
    fn a_set_after_a_reset_is_the_last_word_on_its_parameter() {
        use super::super::query_text::ParameterChange::{Reset, Set};
        let mut tx = Transaction::default();
        client(&mut tx, &["Q"]);
        // `RESET search_path; SET search_path = x; SET lock_timeout = 1; RESET TimeZone`.
        tx.parameter_change(Reset("search_path".into()));
        tx.parameter_change(Set("Search_Path".into()));
        tx.parameter_change(Set("lock_timeout".into()));
        tx.parameter_change(Reset("TimeZone".into()));
        assert!(
            tx.may_have_reset("search_path"),
            "its ParameterStatus is still a reset's"
        );
        assert!(tx.take_resets().is_empty(), "nothing owed yet");
        backend(&mut tx, b'C');
        ready(&mut tx, b'I');
        assert_eq!(tx.take_resets(), ["timezone".into()]);
        // A RESET after the SET is the last word again.
        client(&mut tx, &["Q"]);
        tx.parameter_change(Reset("search_path".into()));
        tx.parameter_change(Set("search_path".into()));
        tx.parameter_change(Reset("search_path".into()));
        ready(&mut tx, b'I');
        assert_eq!(tx.take_resets(), ["search_path".into()]);
        assert_eq!(tx.take_sets().len(), 3);
    }

    #[test]
    fn a_simple_query_releases_at_ready_for_query_idle() {
        let mut tx = Transaction::default();
        assert!(tx.releasable());
        client(&mut tx, &["Q"]);
        assert!(!tx.releasable());
        for tag in [b'T', b'D', b'D', b'C'] {
            assert_eq!(backend(&mut tx, tag), Reply::Forward);
        }
        assert!(!tx.releasable());
        assert_eq!(ready(&mut tx, b'I'), Reply::Forward);
        assert!(tx.releasable());
    }

    #[test]
    fn a_multi_statement_query_with_an_empty_part_is_one_query() {
        let mut tx = Transaction::default();
        client(&mut tx, &["Q"]);
        for tag in [b'C', b'T', b'D', b'C', b'I', b'C'] {
            assert_eq!(backend(&mut tx, tag), Reply::Forward);
        }
        ready(&mut tx, b'I');
        assert!(tx.releasable());
    }

    #[test]
    fn an_explicit_transaction_holds_the_backend_until_it_ends() {
        let mut tx = Transaction::default();
        client(&mut tx, &["Q"]);
        backend(&mut tx, b'C');
        ready(&mut tx, b'T');
        assert!(!tx.releasable(), "BEGIN");
        client(&mut tx, &["Q"]);
        backend(&mut tx, b'E');
        ready(&mut tx, b'E');
        assert!(!tx.releasable(), "failed transaction: held until ROLLBACK");
        client(&mut tx, &["Q"]);
        backend(&mut tx, b'C');
        ready(&mut tx, b'I');
        assert!(tx.releasable(), "ROLLBACK");
    }

    #[test]
    fn an_implicit_transaction_error_releases() {
        let mut tx = Transaction::default();
        client(&mut tx, &["Q"]);
        assert_eq!(backend(&mut tx, b'E'), Reply::Forward);
        ready(&mut tx, b'I');
        assert!(tx.releasable());
    }

    #[test]
    fn an_extended_batch_releases_at_its_sync() {
        let mut tx = Transaction::default();
        client(&mut tx, &["P", "B", "DP", "E", "S"]);
        for tag in [b'1', b'2', b'T', b'D', b'C'] {
            assert_eq!(backend(&mut tx, tag), Reply::Forward);
            assert!(!tx.releasable());
        }
        ready(&mut tx, b'I');
        assert!(tx.releasable());
    }

    #[test]
    fn pipelined_syncs_release_at_the_last_ready_for_query() {
        let mut tx = Transaction::default();
        client(&mut tx, &["B", "E", "S", "B", "E", "S"]);
        for tag in [b'2', b'C'] {
            backend(&mut tx, tag);
        }
        ready(&mut tx, b'I');
        assert!(!tx.releasable(), "a second Sync is outstanding");
        for tag in [b'2', b'C'] {
            backend(&mut tx, tag);
        }
        ready(&mut tx, b'I');
        assert!(tx.releasable());
    }

    #[test]
    fn flush_without_sync_holds_the_backend() {
        let mut tx = Transaction::default();
        client(&mut tx, &["P", "H"]);
        backend(&mut tx, b'1');
        assert!(
            !tx.releasable(),
            "the unnamed statement lives on this backend"
        );
        client(&mut tx, &["B", "E", "S"]);
        for tag in [b'2', b'C'] {
            backend(&mut tx, tag);
        }
        ready(&mut tx, b'I');
        assert!(tx.releasable());
    }

    #[test]
    fn an_extended_error_skips_to_the_sync() {
        let mut tx = Transaction::default();
        client(&mut tx, &["P", "B", "E", "S"]);
        assert_eq!(backend(&mut tx, b'E'), Reply::Forward);
        // Bind and Execute get no replies: the next is the Sync's.
        ready(&mut tx, b'I');
        assert!(tx.releasable());
    }

    #[test]
    fn a_pipeline_error_with_a_delayed_sync() {
        let mut tx = Transaction::default();
        client(&mut tx, &["P", "B"]);
        backend(&mut tx, b'E');
        // Sent after the error came back: the backend ignores them, so no replies.
        client(&mut tx, &["E", "P", "B", "E"]);
        assert!(!tx.releasable());
        client(&mut tx, &["S"]);
        ready(&mut tx, b'I');
        assert!(tx.releasable());
        // The next batch is tracked again.
        client(&mut tx, &["P", "S"]);
        backend(&mut tx, b'1');
        ready(&mut tx, b'I');
        assert!(tx.releasable());
    }

    #[test]
    fn an_error_does_not_skip_past_its_batch() {
        let mut tx = Transaction::default();
        client(&mut tx, &["P", "S", "P", "S"]);
        backend(&mut tx, b'E');
        ready(&mut tx, b'I');
        assert_eq!(
            backend(&mut tx, b'1'),
            Reply::Forward,
            "the second batch runs"
        );
        ready(&mut tx, b'I');
        assert!(tx.releasable());
    }

    #[test]
    fn copy_in_holds_the_backend_until_it_completes() {
        let mut tx = Transaction::default();
        client(&mut tx, &["Q"]);
        backend(&mut tx, b'G');
        assert!(!tx.releasable());
        client(&mut tx, &["d", "d", "c"]);
        backend(&mut tx, b'C');
        ready(&mut tx, b'I');
        assert!(tx.releasable());
    }

    #[test]
    fn copy_in_failed_by_the_client() {
        let mut tx = Transaction::default();
        client(&mut tx, &["Q"]);
        backend(&mut tx, b'G');
        client(&mut tx, &["d", "f"]);
        assert_eq!(backend(&mut tx, b'E'), Reply::Forward);
        ready(&mut tx, b'I');
        assert!(tx.releasable());
    }

    #[test]
    fn copy_in_failed_by_the_backend_before_copy_done() {
        let mut tx = Transaction::default();
        client(&mut tx, &["Q"]);
        backend(&mut tx, b'G');
        client(&mut tx, &["d"]);
        backend(&mut tx, b'E');
        ready(&mut tx, b'I');
        // The client's CopyDone after the error is ignored by the backend.
        client(&mut tx, &["c"]);
        assert!(tx.releasable());
    }

    #[test]
    fn copy_in_in_the_extended_protocol_drops_the_sync_sent_with_its_execute() {
        // libpq and tokio-postgres: Bind, Execute, Sync; the data, CopyDone, Sync. The first
        // Sync reaches the backend in COPY IN, which drops it (PgBouncer #1023).
        let mut tx = Transaction::default();
        client(&mut tx, &["B", "E", "S"]);
        backend(&mut tx, b'2');
        assert_eq!(backend(&mut tx, b'G'), Reply::Forward);
        assert_eq!(
            tx.owed_ready(),
            0,
            "the Sync sent with the Execute is dropped"
        );
        client(&mut tx, &["d", "d", "c"]);
        backend(&mut tx, b'C');
        assert!(!tx.releasable(), "the batch still owes the backend a Sync");
        client(&mut tx, &["S"]);
        ready(&mut tx, b'I');
        assert!(tx.releasable());
        // A Sync or Flush among the data is dropped too.
        client(&mut tx, &["B", "E", "S"]);
        backend(&mut tx, b'2');
        backend(&mut tx, b'G');
        client(&mut tx, &["d", "S", "H", "d", "c", "S"]);
        backend(&mut tx, b'C');
        ready(&mut tx, b'I');
        assert!(tx.releasable());
    }

    #[test]
    fn a_whole_copy_written_at_once() {
        // Everything sent before the CopyInResponse: the Sync before the CopyDone is the
        // COPY's to drop, the one after it is answered, and so is the query after that.
        let mut tx = Transaction::default();
        client(&mut tx, &["P", "B", "E", "S", "d", "d", "c", "S", "Q"]);
        for tag in [b'1', b'2', b'G', b'C'] {
            assert_eq!(backend(&mut tx, tag), Reply::Forward);
        }
        assert_eq!(tx.owed_ready(), 2);
        ready(&mut tx, b'I');
        assert!(!tx.releasable(), "the query");
        backend(&mut tx, b'C');
        ready(&mut tx, b'I');
        assert!(tx.releasable());
        // The same in a simple query: CopyDone, then the next query.
        client(&mut tx, &["Q", "d", "c", "Q"]);
        for tag in [b'G', b'C'] {
            backend(&mut tx, tag);
        }
        ready(&mut tx, b'I');
        backend(&mut tx, b'C');
        ready(&mut tx, b'I');
        assert!(tx.releasable());
    }

    #[test]
    fn copy_in_in_the_extended_protocol_failed_by_the_backend() {
        // The error reaches the router before the client's CopyDone and Sync.
        let mut tx = Transaction::default();
        client(&mut tx, &["B", "E", "S"]);
        backend(&mut tx, b'2');
        backend(&mut tx, b'G');
        client(&mut tx, &["d"]);
        assert_eq!(backend(&mut tx, b'E'), Reply::Forward);
        client(&mut tx, &["c", "S"]);
        ready(&mut tx, b'I');
        assert!(tx.releasable());
        // ... and after them: the backend drops the CopyDone and answers the Sync.
        client(&mut tx, &["B", "E", "S"]);
        backend(&mut tx, b'2');
        backend(&mut tx, b'G');
        client(&mut tx, &["d", "c", "S"]);
        backend(&mut tx, b'E');
        ready(&mut tx, b'I');
        assert!(tx.releasable());
        // CopyFail, as libpq sends it in the extended protocol: with a Sync.
        client(&mut tx, &["B", "E", "S"]);
        backend(&mut tx, b'2');
        backend(&mut tx, b'G');
        client(&mut tx, &["f", "S"]);
        backend(&mut tx, b'E');
        ready(&mut tx, b'I');
        assert!(tx.releasable());
    }

    #[test]
    fn a_copy_done_without_a_copy_changes_nothing() {
        // The Execute was no COPY: the marker its CopyDone left is dropped, and PostgreSQL
        // ignores the CopyDone.
        let mut tx = Transaction::default();
        client(&mut tx, &["B", "E", "c", "S"]);
        backend(&mut tx, b'2');
        backend(&mut tx, b'C');
        assert_eq!(tx.owed_ready(), 1);
        ready(&mut tx, b'I');
        assert!(tx.releasable());
        client(&mut tx, &["c"]);
        assert!(tx.releasable(), "a CopyDone alone");
    }

    #[test]
    fn copy_out_in_the_extended_protocol() {
        let mut tx = Transaction::default();
        client(&mut tx, &["P", "B", "E", "S"]);
        for tag in [b'1', b'2', b'H', b'd', b'd', b'c', b'C'] {
            assert_eq!(backend(&mut tx, tag), Reply::Forward);
        }
        assert!(!tx.releasable());
        ready(&mut tx, b'I');
        assert!(tx.releasable());
    }

    #[test]
    fn the_routers_own_replies_are_swallowed() {
        let mut tx = Transaction::default();
        tx.router_query();
        for tag in [b'S', b'C', b'S', b'C'] {
            assert_eq!(backend(&mut tx, tag), Reply::Swallow);
        }
        assert_eq!(ready(&mut tx, b'I'), Reply::Swallow);
        tx.router_parse(None);
        client(&mut tx, &["B", "E", "S"]);
        assert_eq!(backend(&mut tx, b'1'), Reply::Swallow);
        assert_eq!(backend(&mut tx, b'2'), Reply::Forward);
        tx.router_close("bg_1");
        assert_eq!(backend(&mut tx, b'C'), Reply::Forward);
        ready(&mut tx, b'I');
        assert_eq!(backend(&mut tx, b'3'), Reply::Swallow);
        assert!(!tx.releasable(), "an unsynced router Close");
    }

    #[test]
    fn an_error_in_the_routers_sets_is_the_clients_and_in_its_other_queries_is_not() {
        // The SETs of the client's parameters, then the re-creation of an aborted block (its
        // error is meant), then the client's query.
        let mut tx = Transaction::default();
        tx.router_setup();
        tx.router_query();
        client(&mut tx, &["Q"]);
        assert!(tx.setup_owed());
        assert_eq!(backend(&mut tx, b'T'), Reply::Swallow);
        assert_eq!(backend(&mut tx, b'D'), Reply::Swallow);
        assert_eq!(backend(&mut tx, b'C'), Reply::Swallow);
        assert_eq!(ready(&mut tx, b'I'), Reply::Swallow);
        assert!(!tx.setup_owed());
        assert!(!tx.take_setup_failed());
        assert_eq!(backend(&mut tx, b'C'), Reply::Swallow, "BEGIN");
        assert_eq!(backend(&mut tx, b'E'), Reply::Swallow, "the refusal");
        assert!(!tx.take_setup_failed(), "meant to fail");
        assert_eq!(ready(&mut tx, b'E'), Reply::Swallow);
        assert_eq!(backend(&mut tx, b'E'), Reply::Forward, "the client's 25P02");
        assert!(!tx.take_setup_failed());

        // The SETs refused.
        let mut tx = Transaction::default();
        tx.router_setup();
        client(&mut tx, &["Q"]);
        assert_eq!(backend(&mut tx, b'E'), Reply::Swallow);
        assert!(tx.take_setup_failed());
        assert!(!tx.take_setup_failed(), "told once");
    }

    #[test]
    fn synthesized_replies_come_in_turn() {
        let mut tx = Transaction::default();
        // Close S (answered by the router), Bind, Close S, Sync.
        tx.synthesize(Synthesized::CloseComplete);
        assert!(tx.owes_synthesized());
        let mut out = Vec::new();
        tx.take_synthesized(&mut out);
        assert_eq!(out, [b'3', 0, 0, 0, 4]);
        client(&mut tx, &["B"]);
        tx.synthesize(Synthesized::CloseComplete);
        client(&mut tx, &["S"]);
        assert!(!tx.owes_synthesized(), "after the BindComplete");
        backend(&mut tx, b'2');
        assert!(tx.owes_synthesized());
        out.clear();
        tx.take_synthesized(&mut out);
        assert_eq!(out, [b'3', 0, 0, 0, 4]);
        ready(&mut tx, b'I');
        assert!(tx.releasable());
    }

    #[test]
    fn a_refusal_replaces_the_backends_error_and_skips_to_the_sync() {
        let mut tx = Transaction::default();
        client(&mut tx, &["B"]);
        tx.refuse(b"E-fixture".to_vec().into_boxed_slice(), false);
        // Sent on, ignored by the backend after the error.
        client(&mut tx, &["B", "E", "S"]);
        assert_eq!(backend(&mut tx, b'2'), Reply::Forward);
        assert_eq!(backend(&mut tx, b'E'), Reply::Swallow);
        let mut out = Vec::new();
        tx.take_synthesized(&mut out);
        assert_eq!(out, b"E-fixture");
        assert_eq!(
            tx.backend(b'Z', b"E"),
            Ok(Reply::Forward),
            "in a transaction block"
        );
        assert_eq!(tx.status(), b'E');
    }

    #[test]
    fn a_refused_simple_query_gets_the_backends_ready_for_query() {
        let mut tx = Transaction::default();
        tx.refuse(b"E-fixture".to_vec().into_boxed_slice(), true);
        assert_eq!(backend(&mut tx, b'E'), Reply::Swallow);
        let mut out = Vec::new();
        tx.take_synthesized(&mut out);
        assert_eq!(out, b"E-fixture");
        assert_eq!(ready(&mut tx, b'I'), Reply::Forward);
        assert!(tx.releasable());
    }

    #[test]
    fn a_backend_error_drops_synthesized_replies_of_its_batch() {
        let mut tx = Transaction::default();
        client(&mut tx, &["B"]);
        tx.synthesize(Synthesized::CloseComplete);
        client(&mut tx, &["S"]);
        backend(&mut tx, b'E');
        assert!(
            !tx.owes_synthesized(),
            "PostgreSQL would not have answered it"
        );
        ready(&mut tx, b'I');
        assert!(tx.releasable());
    }

    #[test]
    fn describe_statement_and_portal() {
        let mut tx = Transaction::default();
        client(&mut tx, &["DS", "DP", "S"]);
        assert_eq!(backend(&mut tx, b't'), Reply::Forward);
        assert_eq!(backend(&mut tx, b'T'), Reply::Forward);
        assert_eq!(backend(&mut tx, b'n'), Reply::Forward);
        ready(&mut tx, b'I');
        assert!(tx.releasable());
    }

    #[test]
    fn replies_out_of_turn_are_refused() {
        let mut tx = Transaction::default();
        assert_eq!(
            tx.backend(b'1', &[]),
            Err(OutOfTurn { tag: b'1' }),
            "nothing was parsed"
        );
        client(&mut tx, &["Q"]);
        assert!(tx.backend(b'2', &[]).is_err());
        let mut tx = Transaction::default();
        client(&mut tx, &["S"]);
        assert!(tx.backend(b'Z', b"X").is_err(), "bad status");
        let mut tx = Transaction::default();
        client(&mut tx, &["S"]);
        assert!(tx.backend(b'D', &[]).is_err(), "a row for a Sync");
    }

    #[test]
    fn notices_and_parameter_status_may_come_any_time() {
        let mut tx = Transaction::default();
        assert_eq!(backend(&mut tx, b'N'), Reply::Forward);
        assert_eq!(backend(&mut tx, b'S'), Reply::Forward);
        assert_eq!(backend(&mut tx, b'A'), Reply::Forward);
        // A FATAL with nothing outstanding (the backend is going away).
        assert_eq!(backend(&mut tx, b'E'), Reply::Forward);
    }

    #[test]
    fn function_call() {
        let mut tx = Transaction::default();
        client(&mut tx, &["F"]);
        assert_eq!(backend(&mut tx, b'V'), Reply::Forward);
        ready(&mut tx, b'I');
        assert!(tx.releasable());
    }
}
