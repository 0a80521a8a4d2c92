//! Protocol-level prepared statements on the pooled port: a client's named statements work in
//! every transaction, whichever backend it gets.
//!
//! The router keeps each client's names. A statement's name on the backends is derived from
//! what it is: its query text and parameter types, with the `search_path` and role the client
//! has when it parses it (so two schemas never share a plan): `bg_` and 32 hex digits of a
//! SHA-256. A client's Parse goes to the backend it holds, as it sent it (between transactions,
//! one of a text the pool's backends accepted is answered without one, [`answer_idle`]); a
//! backend is given the statement (a Parse of the router's own, its ParseComplete swallowed)
//! the first time the client binds or describes it there, unless it has it already; each
//! backend keeps at most `max_prepared_statements`, least recently used closed first.
//!
//! PostgreSQL's answers, not another pooler's: a Parse of a name the client already uses is
//! 42P05, a Bind or Describe of a name it does not have is 26000, a Close of an unknown name is
//! CloseComplete; a failed Parse leaves no name behind; Close of a portal never touches a
//! statement. The unnamed statement is kept too (the last one the client parsed), so a client
//! that binds it in a later transaction, on another backend, still finds it.
//!
//! A named statement's result type is fixed when it is prepared, as on a server: once the
//! client has been told its row shape (a Describe of it, or of a portal bound to it), a
//! backend whose plan of the same text has another shape (a DDL came between, and the
//! statement was prepared there after it) answers its Bind and Describe with PostgreSQL's
//! 0A000 "cached plan must not change result type", which drivers answer by preparing the
//! statement again, never with rows the client would decode with the old description. A
//! backend that is given the statement by the router is asked for its row shape first
//! ([`Resolved::Check`]), before anything of the client's runs there. Once a change is found,
//! every backend of the pool drops its statements ([`BackendStatements::behind`]), so a
//! statement prepared after the DDL never meets an old plan.
//!
//! Its parameter types are fixed the same way: a client told them (a Describe of the
//! statement) encodes its values by them, often in binary. Backends share a statement by its
//! text, and the types a backend's plan of a text has are those the server inferred when it
//! was prepared there, which a DDL (or another `search_path`) can change: two clients that
//! prepared the text either side of such a change were told different types. A backend whose
//! plan of the statement has other types than the client was told is given the client's own
//! in its place ([`Translator::ensure`]), never sent values it would read as another type.
//!
//! A client's Parse is answered as PostgreSQL answers one, from the catalog as it is then: the
//! first backend that runs a client's statement runs a plan of it parsed after the client's
//! Parse (a backend's older plan of the same text is closed and the statement prepared again),
//! so a client that prepares after a DDL is told the types and row shape the DDL made, never
//! those a plan from before it kept ([`Translator::ensure`]). Parses are ordered by one clock
//! ([`parse_clock`]).

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::num::NonZeroU64;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::buf::ReadBuf;
use crate::protocol::backend as be;
use crate::protocol::frame::{self, HEADER_BYTES};
use crate::protocol::frontend as fe;
use crate::protocol::reader::Reader;
use crate::protocol::sqlstate::SqlState;
use crate::protocol::write::{self, Severity};

use super::query_text::{parse_parameter_changes, query_facts, ParameterChange, QueryFacts};
use super::transaction::{Resets, Synthesized, Transaction};

/// Longest statement or portal name accepted (PostgreSQL has no limit; clients use short ones).
pub const MAX_NAME_BYTES: usize = 512;

/// One statement as backends know it, as one client prepared it.
#[derive(Debug, PartialEq, Eq)]
pub struct Statement {
    /// The Parse message that prepares it on a backend, under its name there
    /// ([`Statement::server_name`]): one copy for all the clients of a pool that prepared
    /// the same ([`SharedTexts`]).
    parse: Rc<[u8]>,
    /// Its text resets or sets parameters (`RESET name`, `SET search_path ...`): each
    /// execution is to be followed as the Parse was.
    pub changes_parameters: bool,
    /// Its row shape ([`row_shape`]) as the client was first told it (a Describe of the
    /// statement, or of a portal bound to it): what every backend's plan of it must still
    /// have.
    shape: Cell<Option<NonZeroU64>>,
    /// The parameter types the client was first told (a Describe of the statement), where its
    /// own Parse left some to the server: spelled out in the Parse a backend that is given the
    /// statement later is sent ([`Statement::told_parameters`]).
    told: OnceCell<Told>,
    /// A backend's plan of it was found with another row shape than the client was told (it
    /// is answered 0A000 from then on): the pool was told once.
    stale: Cell<bool>,
    /// When the client parsed it ([`parse_clock`]; 0 for the unnamed statement, which is
    /// always sent as parsed).
    parsed: u64,
    /// A backend's plan parsed after the client's Parse has run it ([`Translator::ensure`]):
    /// what the client was told of it is what PostgreSQL told a Parse then.
    settled: Cell<bool>,
}

/// Parses of named statements, counted across every pool: a client's statement is parsed
/// after a backend's plan of the same text if its count is higher ([`Plan::parsed`]).
static PARSES: AtomicU64 = AtomicU64::new(0);

/// The next Parse's place in the order of all of them (never 0).
fn parse_clock() -> u64 {
    PARSES.fetch_add(1, Ordering::Relaxed) + 1
}

/// The parameter types a client was told of its statement.
#[derive(Debug, PartialEq, Eq)]
struct Told {
    /// The ParameterDescription's body.
    description: Box<[u8]>,
    /// The types ([`parameter_types`]).
    types: u64,
}

impl Statement {
    /// A statement as backends know it: `parse` prepares it under its server name; the client
    /// parsed it at `parsed` ([`parse_clock`]).
    fn new(parse: Rc<[u8]>, changes_parameters: bool, parsed: u64) -> Statement {
        Statement {
            parse,
            changes_parameters,
            shape: Cell::new(None),
            told: OnceCell::new(),
            stale: Cell::new(false),
            parsed,
            settled: Cell::new(false),
        }
    }

    /// The row shape the client was told ([`row_shape`]), if it was.
    pub fn told_shape(&self) -> Option<u64> {
        self.shape.get().map(NonZeroU64::get)
    }

    /// The client was told `shape` ([`row_shape`]): kept if it is the first.
    fn tell_shape(&self, shape: u64) {
        if self.shape.get().is_none() {
            self.shape.set(NonZeroU64::new(shape));
        }
    }

    /// The router's Parse of it that would have settled it ([`Statement::settled`]) did not
    /// happen (the backend skipped it after an error): the next backend that runs it is
    /// checked again.
    pub fn unsettle(&self) {
        self.settled.set(false);
    }

    /// Its name on backends (empty for the client's unnamed statement).
    pub fn server_name(&self) -> &str {
        let name = self.parse.get(HEADER_BYTES..).unwrap_or_default();
        let end = name.iter().position(|&b| b == 0).unwrap_or(0);
        std::str::from_utf8(&name[..end]).unwrap_or_default()
    }

    /// The client was told the statement's parameter types (a ParameterDescription `body`).
    /// A session's plan keeps the types its Parse resolved, through any DDL (PostgreSQL
    /// plans it again with them), and the client encodes its values by them: a backend given
    /// the statement after a DDL that changed what the server would infer (a column from int4
    /// to float4) must get them spelled out, or it reads the client's binary int4 as a float4
    /// (1 stored as 1.4e-45). Kept once, if the Parse with them is at most twice the size.
    pub fn told_parameters(&self, body: &[u8]) {
        if self.told.get().is_some() || self.server_name().is_empty() {
            return;
        }
        if pinned_parts(&self.parse, body).is_none() {
            return;
        }
        if let Some(types) = parameter_types(body) {
            let _ = self.told.set(Told {
                description: body.into(),
                types,
            });
        }
    }

    /// The parameter types the client was told ([`parameter_types`]), if its Parse left some to
    /// the server (else every backend's plan has the types its Parse gives).
    pub fn told_types(&self) -> Option<u64> {
        self.told.get().map(|told| told.types)
    }

    /// Appends the Parse a backend that lacks the statement is sent: the client's, with the
    /// types it was told spelled out.
    pub fn write_parse_for_backend(&self, out: &mut Vec<u8>) {
        let parts = self
            .told
            .get()
            .and_then(|told| pinned_parts(&self.parse, &told.description));
        match parts {
            Some(parts) => parts.write(out),
            None => out.extend_from_slice(&self.parse),
        }
    }

    /// The parameter changes its text makes.
    fn parameter_changes(&self, f: impl FnMut(ParameterChange)) {
        if self.changes_parameters {
            let after_name = HEADER_BYTES + self.server_name().len() + 1;
            parse_parameter_changes(self.parse.get(after_name..).unwrap_or_default(), f);
        }
    }
}

/// The Parse messages of a pool's clients' named statements, each kept once: an
/// application's connections all prepare the same statements (an ORM's, a driver's cache),
/// and a copy for each client would cost each one the whole text (PgBouncer shares them
/// too). A text no client has any more is dropped when the set has doubled since it was
/// last swept, so what it keeps beyond the clients' own is bounded by what they have.
#[derive(Debug, Default)]
pub struct SharedTexts {
    texts: RefCell<HashSet<Rc<[u8]>>>,
    /// Bytes of the texts in the set.
    bytes: Cell<usize>,
    /// Texts and bytes left by the last sweep.
    swept: Cell<(usize, usize)>,
}

/// The set is not swept below this many texts, or bytes of them.
const SWEEP_MIN_TEXTS: usize = 1024;
const SWEEP_MIN_BYTES: usize = 1024 * 1024;

impl SharedTexts {
    /// The pool's copy of `parse`.
    fn share(&self, parse: Vec<u8>) -> Rc<[u8]> {
        let mut texts = self.texts.borrow_mut();
        if let Some(text) = texts.get(parse.as_slice()) {
            return text.clone();
        }
        let (count, bytes) = self.swept.get();
        if texts.len() >= 2 * count.max(SWEEP_MIN_TEXTS)
            || self.bytes.get() >= 2 * bytes.max(SWEEP_MIN_BYTES)
        {
            texts.retain(|text| Rc::strong_count(text) > 1);
            let bytes = texts.iter().map(|text| text.len()).sum();
            self.bytes.set(bytes);
            self.swept.set((texts.len(), bytes));
        }
        let text: Rc<[u8]> = Rc::from(parse);
        self.bytes.set(self.bytes.get() + text.len());
        texts.insert(text.clone());
        text
    }

    /// Texts kept.
    pub fn len(&self) -> usize {
        self.texts.borrow().len()
    }

    /// True if none are.
    pub fn is_empty(&self) -> bool {
        self.texts.borrow().is_empty()
    }
}

/// Named statements one pooled client may have at once ([`ClientStatements::has_room`]).
pub const MAX_CLIENT_STATEMENTS: usize = 10_000;
/// Bytes one pooled client's named statements may take, at most: each is kept for the
/// client's life (a Parse is at most 20 KiB, so 10,000 of them could be 200 MiB).
pub const MAX_CLIENT_STATEMENT_BYTES: usize = 4 * 1024 * 1024;

/// What one named statement costs its client's budget: its name and Parse message, and about
/// what the map entry and the shared statement take besides.
fn statement_cost(name: &str, statement: &Statement) -> usize {
    const OVERHEAD: usize = 96;
    name.len() + statement.parse.len() + OVERHEAD
}

/// A client's statements, by its own names.
#[derive(Debug, Default)]
pub struct ClientStatements {
    named: HashMap<Box<str>, Rc<Statement>>,
    /// Bytes of the names and Parse messages in `named`.
    bytes: usize,
    /// The last unnamed statement (its Parse, unchanged), if it was small enough to keep.
    unnamed: Option<Rc<Statement>>,
    /// What tells apart the same text under different sessions: the role and `search_path` the
    /// client has ([`ClientStatements::follow`]).
    context: Box<[u8]>,
}

impl ClientStatements {
    /// Statements of a client that started with `search_path` (if it gave one) as `role`.
    pub fn new(role: &str, search_path: Option<&str>) -> Self {
        let mut statements = ClientStatements::default();
        statements.follow(role, search_path);
        statements
    }

    /// The client's session now has `role` (the one it logged in as, or the one it set) and
    /// `search_path` (`None`: the server's default): the statements it parses from now on are
    /// told apart from the same text parsed under others, as each session's own are on a
    /// server (the names in a text are looked up in the schemas of the `search_path`, `$user`
    /// among them, when it is parsed; a backend keeps the plan, its row shape and parameter
    /// types, it made then). Those it has keep their names.
    pub fn follow(&mut self, role: &str, search_path: Option<&str>) {
        let search_path = search_path.unwrap_or("");
        let same = self.context.len() == role.len() + 1 + search_path.len()
            && self.context.starts_with(role.as_bytes())
            && self.context[role.len()] == 0
            && self.context.ends_with(search_path.as_bytes());
        if same {
            return;
        }
        let mut context = Vec::with_capacity(role.len() + 1 + search_path.len());
        context.extend_from_slice(role.as_bytes());
        context.push(0);
        context.extend_from_slice(search_path.as_bytes());
        self.context = context.into_boxed_slice();
    }

    /// A statement of the client's changed where names are looked up (`what`, a hash of what
    /// it set them to: [`ParameterChange::lookup_hash`]), for its transaction or its session:
    /// the statements the client parses after it, until its next transaction ([`follow`] then
    /// takes the session's own), are told apart from the same text parsed under others, as on
    /// a server (a schema-per-tenant application's `BEGIN; SET LOCAL search_path TO tenant`).
    ///
    /// [`follow`]: ClientStatements::follow
    pub fn amend(&mut self, what: u64) {
        // The role and search_path are one NUL apart; an amendment is a NUL and 8 bytes more.
        let amended = self.context.iter().filter(|&&b| b == 0).count() > 1;
        let base = if amended {
            self.context.len().saturating_sub(9)
        } else {
            self.context.len()
        };
        let mut hash = std::hash::DefaultHasher::new();
        self.context.hash(&mut hash);
        what.hash(&mut hash);
        let mut context = Vec::with_capacity(base + 9);
        context.extend_from_slice(&self.context[..base]);
        context.push(0);
        context.extend_from_slice(&hash.finish().to_be_bytes());
        self.context = context.into_boxed_slice();
    }

    /// The statement a Parse with `after_name` (its body past the name) prepares for this
    /// client (its text the pool's copy, from `texts`).
    fn statement(&self, after_name: &[u8], texts: &SharedTexts) -> Rc<Statement> {
        self.statement_named(&self.server_name(after_name), after_name, texts)
    }

    /// The name on backends of the statement a Parse with `after_name` prepares.
    fn server_name(&self, after_name: &[u8]) -> Box<str> {
        server_name(&self.context, after_name)
    }

    /// [`ClientStatements::statement`], its `server_name` known.
    fn statement_named(
        &self,
        server_name: &str,
        after_name: &[u8],
        texts: &SharedTexts,
    ) -> Rc<Statement> {
        let mut parse = Vec::with_capacity(HEADER_BYTES + server_name.len() + 1 + after_name.len());
        message_with_name(&mut parse, fe::PARSE, b"", server_name, after_name);
        let mut changes_parameters = false;
        parse_parameter_changes(after_name, |_| changes_parameters = true);
        Rc::new(Statement::new(
            texts.share(parse),
            changes_parameters,
            parse_clock(),
        ))
    }

    /// Number of named statements.
    pub fn len(&self) -> usize {
        self.named.len()
    }

    /// True if the client has none.
    pub fn is_empty(&self) -> bool {
        self.named.is_empty()
    }

    /// Forgets every named statement (DEALLOCATE ALL, DISCARD ALL).
    pub fn clear(&mut self) {
        self.named.clear();
        self.bytes = 0;
    }

    /// Forgets `name`; true if the client had it.
    pub fn remove(&mut self, name: &str) -> bool {
        match self.named.remove_entry(name) {
            Some((name, statement)) => {
                self.bytes -= statement_cost(&name, &statement);
                true
            }
            None => false,
        }
    }

    /// True if the client may have `more` more statements costing `bytes` more (names and
    /// Parse messages): at most [`MAX_CLIENT_STATEMENTS`] and [`MAX_CLIENT_STATEMENT_BYTES`].
    fn has_room(&self, more: usize, bytes: usize) -> bool {
        self.named.len() + more <= MAX_CLIENT_STATEMENTS
            && self.bytes + bytes <= MAX_CLIENT_STATEMENT_BYTES
    }

    /// Keeps `statement` under the client's `name` (not in use).
    fn insert(&mut self, name: Box<str>, statement: Rc<Statement>) {
        let cost = statement_cost(&name, &statement);
        let old_cost = |old: &Rc<Statement>| cost - statement.parse.len() + old.parse.len();
        if let Some(old) = self.named.insert(name, statement.clone()) {
            // Callers insert names not in use; the cost of what it replaced goes all the same.
            self.bytes -= old_cost(&old);
        }
        self.bytes += cost;
    }

    /// Undoes a Parse that failed (or that the backend skipped after an error).
    pub fn undo(&mut self, statement: &Rc<Statement>) {
        let bytes = &mut self.bytes;
        self.named.retain(|name, s| {
            let keep = !Rc::ptr_eq(s, statement);
            if !keep {
                *bytes -= statement_cost(name, s);
            }
            keep
        });
        if self
            .unnamed
            .as_ref()
            .is_some_and(|s| Rc::ptr_eq(s, statement))
        {
            self.unnamed = None;
        }
    }
}

/// One statement prepared on a backend.
#[derive(Debug)]
struct Prepared {
    /// When it was last used (the backend's tick).
    used: u64,
    /// What the router knows of the backend's plan of it.
    plan: Plan,
}

/// What the router knows of a backend's plan of a statement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Plan {
    /// Its row shape ([`row_shape`]), once a Describe told it.
    pub shape: Option<u64>,
    /// Its parameter types ([`parameter_types`]): those a Parse of the router's spelled out,
    /// or those a Describe told.
    pub types: Option<u64>,
    /// When the Parse that made it was sent ([`parse_clock`]); 0 if not known (a Close of it
    /// the backend skipped).
    pub parsed: u64,
}

/// What a backend's answer to a Describe of a named statement told of its plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Described {
    /// Its row shape ([`row_shape`]).
    Shape(u64),
    /// Its parameter types ([`parameter_types`]).
    ParameterTypes(u64),
}

/// The statements prepared on one backend, least recently used first out.
#[derive(Debug, Default)]
pub struct BackendStatements {
    used: HashMap<Box<str>, Prepared>,
    tick: u64,
    /// The pool's plan epoch its statements were prepared in ([`BackendStatements::behind`]).
    epoch: u64,
}

impl BackendStatements {
    /// True if its statements must be dropped before the transaction (a `DEALLOCATE ALL` of
    /// the router's): a DDL changed a statement's row shape since they were prepared, under
    /// a backend of the pool (`epoch`, the pool's, moved on: PostgreSQL's 0A000 "cached plan
    /// must not change result type", or a changed shape the router found), so any of them may
    /// be stale here too, and a client's fresh Parse of the same text would run the old plan
    /// (and fail with 0A000, which PostgreSQL never answers a statement parsed after the DDL).
    /// Takes the epoch on.
    pub fn behind(&mut self, epoch: u64) -> bool {
        if self.epoch >= epoch {
            return false;
        }
        self.epoch = epoch;
        !self.used.is_empty()
    }

    /// If the backend has `name` (marked used), what the router knows of its plan.
    fn touch(&mut self, name: &str) -> Option<Plan> {
        self.tick += 1;
        let prepared = self.used.get_mut(name)?;
        prepared.used = self.tick;
        Some(prepared.plan)
    }

    /// A Describe of `name` on this backend told its row shape or its parameter types.
    pub fn described(&mut self, name: &str, described: Described) {
        if let Some(prepared) = self.used.get_mut(name) {
            match described {
                Described::Shape(shape) => prepared.plan.shape = Some(shape),
                Described::ParameterTypes(types) => prepared.plan.types = Some(types),
            }
        }
    }

    /// `name` was closed and prepared again, with parameter `types` if known: its new plan.
    fn prepared_again(&mut self, name: &str, types: Option<u64>) -> Plan {
        let plan = Plan {
            shape: None,
            types,
            parsed: parse_clock(),
        };
        if let Some(prepared) = self.used.get_mut(name) {
            prepared.plan = plan;
        }
        plan
    }

    /// Takes out the least recently used statement if the backend has `max` or more: the
    /// one to close before another is prepared.
    fn make_room(&mut self, max: usize) -> Option<Box<str>> {
        if self.used.len() < max {
            return None;
        }
        let oldest = self
            .used
            .iter()
            .min_by_key(|(_, prepared)| prepared.used)
            .map(|(name, _)| name.clone())?;
        self.used.remove(&oldest);
        Some(oldest)
    }

    /// Records `name` as prepared now, with parameter `types` if known: its plan.
    fn insert(&mut self, name: &str, types: Option<u64>) -> Plan {
        let plan = Plan {
            shape: None,
            types,
            parsed: parse_clock(),
        };
        self.insert_plan(name, plan);
        plan
    }

    fn insert_plan(&mut self, name: &str, plan: Plan) {
        self.tick += 1;
        let prepared = Prepared {
            used: self.tick,
            plan,
        };
        self.used.insert(name.into(), prepared);
    }

    /// The backend still has `name`, which the router closed there (it skipped the Close
    /// after an error): what its plan is, and when it was parsed, the router does not know.
    /// May leave the backend one over `max_prepared_statements` until its next Parse of the
    /// router's.
    pub fn kept(&mut self, name: &str) {
        if !self.used.contains_key(name) {
            self.insert_plan(name, Plan::default());
        }
    }

    /// Forgets `name` (its Parse failed).
    pub fn remove(&mut self, name: &str) {
        self.used.remove(name);
    }

    /// Forgets everything (the backend ran DEALLOCATE ALL or DISCARD ALL).
    pub fn clear(&mut self) {
        self.used.clear();
    }

    /// Statements prepared.
    pub fn len(&self) -> usize {
        self.used.len()
    }

    /// True if none are.
    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

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
enum Resolved {
    /// The statement, on the backend with the row shape the client was told (or one the
    /// client was never told).
    Statement(Rc<Statement>),
    /// Answered by the router: 26000 (no such statement) or 0A000 (its row shape changed).
    Refused,
    /// The router does not know what the client was told of the backend's plan (its row shape,
    /// its parameter types): the backend is asked first.
    Check,
}

/// What `parse` (a whole Parse message) with the parameter types of `description` (a
/// ParameterDescription body) in place of its own is made of, if it left any to the server
/// (fewer types, or 0) and the result is at most twice its size; `None` otherwise, or if
/// either does not read.
fn pinned_parts<'a>(parse: &'a [u8], description: &'a [u8]) -> Option<PinnedParse<'a>> {
    let mut told = Reader::new(description);
    let count = told.i16().ok()?;
    let types = told.rest();
    if count < 0 || types.len() != count as usize * 4 {
        return None;
    }
    let mut r = Reader::new(parse.get(HEADER_BYTES..)?);
    let name = r.cstr().ok()?;
    let query = r.cstr().ok()?;
    let own = r.i16().ok()?;
    let own_types = r.rest();
    if own < 0 || own_types.len() != own as usize * 4 {
        return None;
    }
    let all_given = own == count && !own_types.chunks_exact(4).any(|oid| oid == [0; 4]);
    let len = HEADER_BYTES + name.len() + 1 + query.len() + 1 + 2 + types.len();
    if all_given || len > 2 * parse.len() {
        return None;
    }
    Some(PinnedParse {
        name,
        query,
        count,
        types,
        len,
    })
}

/// A Parse with every parameter type spelled out ([`pinned_parts`]).
struct PinnedParse<'a> {
    name: &'a [u8],
    query: &'a [u8],
    count: i16,
    types: &'a [u8],
    /// The whole message's.
    len: usize,
}

impl PinnedParse<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        out.reserve(self.len);
        out.push(fe::PARSE);
        out.extend_from_slice(&((self.len - 1) as u32).to_be_bytes());
        out.extend_from_slice(self.name);
        out.push(0);
        out.extend_from_slice(self.query);
        out.push(0);
        out.extend_from_slice(&self.count.to_be_bytes());
        out.extend_from_slice(self.types);
    }
}

/// `parse` with the parameter types of `description` spelled out ([`pinned_parts`]).
#[cfg(test)]
fn pin_parameter_types(parse: &[u8], description: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    pinned_parts(parse, description)?.write(&mut out);
    Some(out)
}

/// A statement's row shape: the column names, types and type modifiers of its RowDescription
/// (or that it has none: NoData), which a plan of the same text keeps until a DDL changes
/// them (PostgreSQL compares the same, and answers 0A000 then). `None` if `body` is not a
/// whole RowDescription. Never 0 (a statement keeps it in a `NonZeroU64`).
pub fn row_shape(tag: u8, body: &[u8]) -> Option<u64> {
    let mut hash = std::hash::DefaultHasher::new();
    tag.hash(&mut hash);
    if tag == be::ROW_DESCRIPTION {
        let mut r = Reader::new(body);
        let fields = r.i16().ok()?;
        fields.hash(&mut hash);
        for _ in 0..fields {
            let name = r.cstr().ok()?;
            let _table = r.u32().ok()?;
            let _column = r.i16().ok()?;
            let type_oid = r.u32().ok()?;
            let _size = r.i16().ok()?;
            let modifier = r.i32().ok()?;
            let _format = r.i16().ok()?;
            (name, type_oid, modifier).hash(&mut hash);
        }
    }
    Some(hash.finish().max(1))
}

/// A statement's parameter types: a hash of its ParameterDescription `body` (the type OIDs),
/// which a plan keeps through any DDL. `None` if `body` is empty (the start of a message too
/// long to be given whole).
pub fn parameter_types(body: &[u8]) -> Option<u64> {
    if body.is_empty() {
        return None;
    }
    let mut hash = std::hash::DefaultHasher::new();
    body.hash(&mut hash);
    Some(hash.finish())
}

/// Takes in what a backend's Describes told ([`Transaction::take_described`]): the client keeps
/// the first row shape it was told of each statement (its parameter types were kept as they
/// came, [`Statement::told_parameters`]), the backend's plan what it was prepared with.
pub fn apply_described(
    described: Vec<(Rc<Statement>, Described)>,
    backend: &mut BackendStatements,
) {
    for (statement, told) in described {
        if let Described::Shape(shape) = told {
            statement.tell_shape(shape);
        }
        backend.described(statement.server_name(), told);
    }
}

/// True if what a client was told (`told`) and what a backend's plan has (`has`) are both known
/// and differ.
fn differ(told: Option<u64>, has: Option<u64>) -> bool {
    matches!((told, has), (Some(told), Some(has)) if told != has)
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
}

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

fn server_name(context: &[u8], body_after_name: &[u8]) -> Box<str> {
    let mut hash = Sha256::new();
    hash.update((context.len() as u64).to_be_bytes());
    hash.update(context);
    hash.update(body_after_name);
    let digest = hash.finalize();
    let mut name = String::with_capacity(3 + 32);
    name.push_str("bg_");
    for byte in &digest[..16] {
        name.push_str(&format!("{byte:02x}"));
    }
    name.into_boxed_str()
}

/// A message `tag` with `name` in place of the name at the start of `rest`'s original.
fn message_with_name(out: &mut Vec<u8>, tag: u8, before: &[u8], name: &str, after: &[u8]) {
    let len = 4 + before.len() + name.len() + 1 + after.len();
    out.push(tag);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.extend_from_slice(before);
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.extend_from_slice(after);
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
const REFUSAL_NAME: &str = "bg_refused";

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

    /// The start of a Parse too long to keep: an unnamed one goes through (it cannot be given
    /// to another backend later), a named one is refused with 54000. Returns whether the
    /// rest of the message goes to the backend.
    pub fn long_parse(&mut self, piece: &[u8]) -> bool {
        let unnamed = piece.get(HEADER_BYTES) == Some(&0);
        if unnamed || !self.enabled() {
            // Too long to read: what it did to the session is read back, and any lock it
            // took released.
            self.tx.parameter_change(ParameterChange::Unknown);
            self.tx.parameter_change(ParameterChange::Residue);
            // Too long to keep for another backend: this one is held until the client binds
            // it (a driver's Parse+Sync, then Bind+Execute+Sync), replaces or drops it.
            self.tx.hold_for_unnamed(unnamed);
            self.client.unnamed = None;
            self.transient.unnamed_here = true;
            self.out.extend_from_slice(piece);
            self.tx.client_parse(None);
            return true;
        }
        self.refuse(error(
            SqlState::PROGRAM_LIMIT_EXCEEDED,
            "a named prepared statement is too long for the pooled port: its Parse message must \
             fit in 20 KiB (use the direct port, or an unnamed statement)",
        ));
        false
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
        if let Some(statement) = &statement {
            // A statement prepared in an earlier transaction: its Parse was followed then.
            let mut lookup = None;
            statement.parameter_changes(|change| {
                lookup = lookup.or(change.lookup_hash(&statement.parse));
                self.tx.parameter_change(change);
            });
            if let Some(what) = lookup {
                self.client.amend(what);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_message(name: &str, sql: &str) -> Vec<u8> {
        let mut m = Vec::new();
        write::parse(&mut m, name, sql);
        m
    }

    fn bind_message(portal: &str, name: &str) -> Vec<u8> {
        let mut m = Vec::new();
        write::bind(&mut m, portal, name);
        m
    }

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// The messages in `bytes`, as (tag, first name in the body).
    fn messages(bytes: &[u8]) -> Vec<(char, String)> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while rest.len() >= 5 {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize + 1;
            let body = &rest[5..len];
            let name_at = usize::from(matches!(rest[0], b'C' | b'D'));
            let mut r = Reader::new(&body[name_at..]);
            let first = if rest[0] == b'B' {
                let _ = r.cstr();
                r.cstr_utf8().unwrap_or("?").to_owned()
            } else {
                r.cstr_utf8().unwrap_or("?").to_owned()
            };
            out.push((char::from(rest[0]), first));
            rest = &rest[len..];
        }
        out
    }

    struct Fixture {
        tx: Transaction,
        client: ClientStatements,
        backend: BackendStatements,
        texts: SharedTexts,
        transient: Transient,
        out: Vec<u8>,
        max: usize,
    }

    impl Fixture {
        fn new(max: usize) -> Self {
            Fixture {
                tx: Transaction::default(),
                client: ClientStatements::new("app", None),
                backend: BackendStatements::default(),
                texts: SharedTexts::default(),
                transient: Transient::default(),
                out: Vec::new(),
                max,
            }
        }

        fn t(&mut self) -> Translator<'_> {
            Translator {
                tx: &mut self.tx,
                client: &mut self.client,
                backend: &mut self.backend,
                max: self.max,
                texts: &self.texts,
                transient: &mut self.transient,
                out: &mut self.out,
            }
        }

        fn sync(&mut self) {
            self.tx.client(fe::SYNC, 0);
        }

        fn reply(&mut self, tags: &[u8]) -> Vec<u8> {
            let mut to_client = Vec::new();
            for &tag in tags {
                let body: &[u8] = if tag == be::READY_FOR_QUERY {
                    b"I"
                } else {
                    b""
                };
                let reply = self.tx.backend(tag, body).expect("in turn");
                if reply == super::super::transaction::Reply::Forward {
                    to_client.push(tag);
                }
                let mut synthesized = Vec::new();
                self.tx.take_synthesized(&mut synthesized);
                to_client.extend(messages(&synthesized).iter().map(|(t, _)| *t as u8));
            }
            for undo in self.tx.take_undo() {
                undo.apply(&mut self.client, &mut self.backend);
            }
            to_client
        }

        /// A new transaction on `backend`.
        fn on(&mut self, backend: BackendStatements) -> BackendStatements {
            self.transient = Transient::default();
            self.out.clear();
            std::mem::replace(&mut self.backend, backend)
        }
    }

    #[test]
    fn a_statement_is_prepared_again_on_another_backend() {
        let mut f = Fixture::new(10);
        f.t()
            .parse(&parse_message("s1", "select $1"))
            .expect("well-formed");
        f.sync();
        let sent = messages(&f.out);
        assert_eq!(sent.len(), 1);
        assert!(sent[0].1.starts_with("bg_"), "{sent:?}");
        assert_eq!(f.reply(b"1Z"), b"1Z");
        // Next transaction, another backend: the Bind gets a Parse of the router's first.
        let first = f.on(BackendStatements::default());
        f.t()
            .bind(&bind_message("", "s1"), bind_message("", "s1").len())
            .expect("well-formed");
        f.sync();
        let sent = messages(&f.out);
        assert_eq!(sent.iter().map(|m| m.0).collect::<String>(), "PB");
        assert_eq!(sent[0].1, sent[1].1);
        assert_eq!(
            f.reply(b"12Z"),
            b"2Z",
            "the router's ParseComplete swallowed"
        );
        // Back on the first backend: it has it, nothing is re-prepared.
        f.on(first);
        f.t()
            .bind(&bind_message("", "s1"), bind_message("", "s1").len())
            .expect("well-formed");
        assert_eq!(messages(&f.out).len(), 1);
    }

    /// A RowDescription body of int4 columns named `names`.
    fn int4_columns(names: &[&str]) -> Vec<u8> {
        let mut body = (names.len() as i16).to_be_bytes().to_vec();
        for name in names {
            body.extend_from_slice(name.as_bytes());
            body.push(0);
            body.extend_from_slice(&16_384u32.to_be_bytes()); // table
            body.extend_from_slice(&1i16.to_be_bytes()); // column
            body.extend_from_slice(&23u32.to_be_bytes()); // int4
            body.extend_from_slice(&4i16.to_be_bytes());
            body.extend_from_slice(&(-1i32).to_be_bytes());
            body.extend_from_slice(&0i16.to_be_bytes());
        }
        body
    }

    impl Fixture {
        /// The backend's answer to a Describe of a statement: ParameterDescription, then a
        /// RowDescription of `columns`; what the client gets of it.
        fn described(&mut self, columns: &[&str]) -> Vec<u8> {
            let mut to_client = self.reply(b"t");
            let reply = self
                .tx
                .backend(be::ROW_DESCRIPTION, &int4_columns(columns))
                .expect("in turn");
            if reply == super::super::transaction::Reply::Forward {
                to_client.push(be::ROW_DESCRIPTION);
            }
            apply_described(self.tx.take_described(), &mut self.backend);
            to_client
        }

        fn bind(&mut self, name: &str) -> Taken {
            let bind = bind_message("", name);
            self.t().bind(&bind, bind.len()).expect("well-formed")
        }
    }

    #[test]
    fn a_backend_given_a_described_statement_is_asked_its_row_shape_first() {
        let mut f = Fixture::new(10);
        f.t()
            .parse(&parse_message("s1", "select * from t"))
            .expect("well-formed");
        let describe = message(fe::DESCRIBE, b"Ss1\0");
        assert_eq!(f.t().describe(&describe), Ok(Taken::Passed));
        f.sync();
        assert_eq!(f.reply(b"1"), b"1");
        assert_eq!(f.described(&["a"]), b"tT", "the client's own Describe");
        assert_eq!(f.reply(b"Z"), b"Z");
        // Another backend, which has the same text as one column too: a Describe of the
        // router's own goes first, then the Bind (translated again) goes on.
        f.on(BackendStatements::default());
        assert_eq!(f.bind("s1"), Taken::Check);
        let sent: String = messages(&f.out).iter().map(|m| m.0).collect();
        assert_eq!(sent, "PDH", "Parse, Describe and Flush of the router's own");
        assert!(f.tx.checking());
        assert_eq!(f.reply(b"1"), b"", "swallowed");
        assert_eq!(f.described(&["a"]), b"", "swallowed");
        assert!(!f.tx.checking());
        f.out.clear();
        assert_eq!(f.bind("s1"), Taken::Passed);
        assert_eq!(
            messages(&f.out).iter().map(|m| m.0).collect::<String>(),
            "B"
        );
        f.sync();
        assert_eq!(f.reply(b"2Z"), b"2Z");
        // A third backend, prepared after a DDL added a column: PostgreSQL's 0A000 in place of
        // the Bind (a failing statement holds the backend's place), and for every later one.
        f.on(BackendStatements::default());
        assert_eq!(f.bind("s1"), Taken::Check);
        f.reply(b"1");
        f.described(&["a", "b"]);
        f.out.clear();
        assert_eq!(f.bind("s1"), Taken::Answered);
        assert_eq!(messages(&f.out)[0].1, REFUSAL_NAME);
        let mut error = Vec::new();
        assert_eq!(
            f.tx.backend(be::ERROR_RESPONSE, b""),
            Ok(super::super::transaction::Reply::Swallow)
        );
        f.tx.take_synthesized(&mut error);
        let text = String::from_utf8_lossy(&error);
        assert!(text.contains("C0A000"), "{text}");
        assert!(
            text.contains("Mcached plan must not change result type"),
            "{text}"
        );
        assert!(text.contains("RRevalidateCachedQuery"), "{text}");
        assert!(f.tx.take_changed_shape(), "the pool is told");
        f.sync();
        assert_eq!(f.reply(b"Z"), b"Z");
        f.out.clear();
        assert_eq!(
            f.bind("s1"),
            Taken::Answered,
            "no check: the backend's shape is known"
        );
        assert_eq!(messages(&f.out)[0].1, REFUSAL_NAME);
        assert!(!f.tx.take_changed_shape(), "once per statement");
    }

    #[test]
    fn a_close_the_backend_skipped_after_an_error_leaves_the_statement_there() {
        // A backend with room for one statement, which has s1.
        let mut f = Fixture::new(1);
        f.t()
            .parse(&parse_message("s1", "select 1"))
            .expect("well-formed");
        f.sync();
        assert_eq!(f.reply(b"1Z"), b"1Z");
        // A pipeline whose first message fails, then a Parse that makes room by closing s1:
        // the backend skips the Close with the rest, so it still has s1.
        f.out.clear();
        assert_eq!(f.bind("nope"), Taken::Answered, "26000");
        f.t()
            .parse(&parse_message("s2", "select 2"))
            .expect("well-formed");
        f.sync();
        assert_eq!(
            f.sent(),
            "PCP",
            "the refusal, then s1 closed and s2 prepared"
        );
        f.reply(b"EZ");
        assert!(!f.client.named.contains_key("s2"), "s2 was never prepared");
        // s1 is bound as it is: a Parse of it would fail (42P05, the backend has it).
        assert_eq!(f.bind("s1"), Taken::Passed);
        assert_eq!(f.sent(), "B");
    }

    #[test]
    fn a_backend_behind_the_pools_plan_epoch_drops_its_statements_once() {
        let mut backend = BackendStatements::default();
        assert!(!backend.behind(1), "nothing to drop");
        backend.insert("bg_1", None);
        assert!(!backend.behind(1), "prepared in this epoch");
        assert!(backend.behind(2), "a DDL changed a row shape since");
        assert!(!backend.behind(2), "once");
    }

    /// ParameterDescription body of `oids`.
    fn type_oids(oids: &[u32]) -> Vec<u8> {
        let mut body = (oids.len() as i16).to_be_bytes().to_vec();
        for oid in oids {
            body.extend_from_slice(&oid.to_be_bytes());
        }
        body
    }

    impl Fixture {
        /// The backend's answer to a Describe of a statement without a result: a
        /// ParameterDescription of `oids`, then NoData; what the client gets of it.
        fn described_parameters(&mut self, oids: &[u32]) -> Vec<u8> {
            let mut to_client = Vec::new();
            for (tag, body) in [
                (be::PARAMETER_DESCRIPTION, type_oids(oids)),
                (be::NO_DATA, Vec::new()),
            ] {
                let reply = self.tx.backend(tag, &body).expect("in turn");
                if reply == super::super::transaction::Reply::Forward {
                    to_client.push(tag);
                }
            }
            apply_described(self.tx.take_described(), &mut self.backend);
            to_client
        }

        fn sent(&mut self) -> String {
            let sent = messages(&self.out).iter().map(|m| m.0).collect();
            self.out.clear();
            sent
        }
    }

    #[test]
    fn a_backend_whose_plan_has_other_parameter_types_is_given_the_clients_statement() {
        let mut f = Fixture::new(10);
        f.t()
            .parse(&parse_message("s1", "insert into t values ($1)"))
            .expect("well-formed");
        let describe = message(fe::DESCRIBE, b"Ss1\0");
        assert_eq!(f.t().describe(&describe), Ok(Taken::Passed));
        f.sync();
        assert_eq!(f.reply(b"1"), b"1");
        assert_eq!(f.described_parameters(&[23]), b"tn", "told int4");
        assert_eq!(f.reply(b"Z"), b"Z");
        let statement = f.client.named.get("s1").expect("kept").clone();
        let int4 = parameter_types(&type_oids(&[23]));
        assert_eq!(statement.told_types(), int4);
        // The backend it was described on is known to have its types: a Bind just goes.
        f.out.clear();
        assert_eq!(f.bind("s1"), Taken::Passed);
        assert_eq!(f.sent(), "B");
        f.sync();
        assert_eq!(f.reply(b"2Z"), b"2Z");
        // A backend that has the text as another client prepared it after the text's
        // parameter became float4 (the router gave it the client's Parse as written, then
        // that client's Describe told float4): closed and prepared again with int4 spelled
        // out, then asked its row shape, then the Bind goes.
        let mut other = BackendStatements::default();
        let float4 = parameter_types(&type_oids(&[700]));
        other.insert(statement.server_name(), float4);
        f.on(other);
        assert_eq!(f.bind("s1"), Taken::Check);
        let sent = f.out.clone();
        assert_eq!(f.sent(), "CPDH");
        let mut pinned = Vec::new();
        statement.write_parse_for_backend(&mut pinned);
        assert!(
            sent.windows(pinned.len()).any(|w| w == pinned),
            "the Parse with int4 spelled out"
        );
        assert_eq!(f.reply(b"31"), b"", "swallowed");
        assert_eq!(f.described_parameters(&[23]), b"", "swallowed");
        assert_eq!(f.bind("s1"), Taken::Passed);
        assert_eq!(f.sent(), "B");
        f.sync();
        assert_eq!(f.reply(b"2Z"), b"2Z");
        // A backend whose plan's types the router does not know (a client's Parse as written,
        // never described there): asked first, kept if they are the client's.
        for (oids, then) in [(23, "B"), (700, "CPDH")] {
            let mut unknown = BackendStatements::default();
            unknown.insert(statement.server_name(), None);
            f.on(unknown);
            assert_eq!(f.bind("s1"), Taken::Check);
            assert_eq!(f.sent(), "DH");
            assert_eq!(f.described_parameters(&[oids]), b"", "swallowed");
            let taken = f.bind("s1");
            assert_eq!(f.sent(), then, "types {oids}");
            assert_eq!(taken == Taken::Passed, then == "B");
            f.tx = Transaction::default();
        }
    }

    /// What a Parse of `sql` (unnamed, no types) carries past its name.
    fn after_name(sql: &str) -> Vec<u8> {
        let mut after = sql.as_bytes().to_vec();
        after.extend_from_slice(&[0, 0, 0]);
        after
    }

    #[test]
    fn a_clients_parse_of_a_text_the_backend_has_is_parsed_there_again() {
        const INSERT: &str = "insert into t values ($1)";
        let mut f = Fixture::new(10);
        // The backend has the text, as another client prepared it and was told int4 (before a
        // DDL made the column float4, say).
        let mut backend = BackendStatements::default();
        let server_name = f.client.server_name(&after_name(INSERT));
        backend.insert(&server_name, parameter_types(&type_oids(&[23])));
        f.on(backend);
        f.t()
            .parse(&parse_message("s1", INSERT))
            .expect("well-formed");
        // Closed and parsed as the client sent it: the backend answers the client's Parse and
        // its Describe from the catalog as it is now.
        assert_eq!(f.sent(), "CP");
        let describe = message(fe::DESCRIBE, b"Ss1\0");
        assert_eq!(f.t().describe(&describe), Ok(Taken::Passed));
        assert_eq!(f.sent(), "D", "no check: the plan is the client's own");
        f.sync();
        assert_eq!(f.reply(b"31"), b"1", "the router's CloseComplete swallowed");
        assert_eq!(f.described_parameters(&[700]), b"tn", "told float4");
        assert_eq!(f.reply(b"Z"), b"Z");
        // A Parse that fails leaves the backend without the text (its Close ran).
        f.t()
            .parse(&parse_message("s2", INSERT))
            .expect("well-formed");
        assert_eq!(f.sent(), "CP");
        f.sync();
        assert_eq!(f.reply(b"3EZ"), b"EZ");
        assert!(!f.client.named.contains_key("s2"));
        assert!(f.backend.touch(&server_name).is_none());
    }

    #[test]
    fn a_statement_parsed_without_a_backend_first_runs_on_a_plan_parsed_after_it() {
        const SELECT: &str = "select * from t where a = $1";
        let mut f = Fixture::new(10);
        let server_name = f.client.server_name(&after_name(SELECT));
        let older = || {
            let mut backend = BackendStatements::default();
            backend.insert(&server_name, None);
            backend
        };
        let (first, later) = (older(), older());
        // Parsed between transactions (answered by the router, [`answer_idle`]).
        let statement = f.client.statement(&after_name(SELECT), &f.texts);
        f.client.insert("s1".into(), statement);
        let mut newer = BackendStatements::default();
        newer.insert(&server_name, None);
        // The first backend that runs it has a plan from before the client's Parse: closed
        // and prepared again.
        f.on(first);
        assert_eq!(f.bind("s1"), Taken::Passed);
        assert_eq!(f.sent(), "CPB");
        f.sync();
        assert_eq!(f.reply(b"312Z"), b"2Z");
        // From then on a backend's plan runs it as it is, older or newer (what the client was
        // told, it was told by a plan parsed after its Parse).
        for backend in [newer, later] {
            f.on(backend);
            assert_eq!(f.bind("s1"), Taken::Passed);
            assert_eq!(f.sent(), "B");
            f.sync();
            assert_eq!(f.reply(b"2Z"), b"2Z");
        }
    }

    #[test]
    fn a_plan_older_than_the_clients_with_another_row_shape_is_replaced_not_refused() {
        const SELECT: &str = "select * from t";
        let mut f = Fixture::new(10);
        // A backend that has the text with one column, described before a DDL added one.
        let server_name = f.client.server_name(&after_name(SELECT));
        let mut older = BackendStatements::default();
        older.insert(&server_name, None);
        let one_column = row_shape(be::ROW_DESCRIPTION, &int4_columns(&["a"]));
        older.described(&server_name, Described::Shape(one_column.expect("reads")));
        let mut unknown_older = BackendStatements::default();
        unknown_older.insert(&server_name, None);
        let unknown_newer = |f: &Fixture| {
            let mut backend = BackendStatements::default();
            backend.insert(&f.client.server_name(&after_name(SELECT)), None);
            backend
        };
        // The client prepares the text after the DDL on another backend: told two columns.
        f.on(BackendStatements::default());
        f.t()
            .parse(&parse_message("s1", SELECT))
            .expect("well-formed");
        let describe = message(fe::DESCRIBE, b"Ss1\0");
        assert_eq!(f.t().describe(&describe), Ok(Taken::Passed));
        f.sync();
        assert_eq!(f.reply(b"1"), b"1");
        assert_eq!(f.described(&["a", "b"]), b"tT");
        assert_eq!(f.reply(b"Z"), b"Z");
        // On the backend with the older plan: the client's statement is prepared there, its
        // shape checked, and the Bind goes (PostgreSQL answers a statement parsed after the
        // DDL with its rows, never 0A000).
        f.on(older);
        assert_eq!(f.bind("s1"), Taken::Check);
        assert_eq!(f.sent(), "CPDH");
        assert_eq!(f.reply(b"31"), b"");
        assert_eq!(f.described(&["a", "b"]), b"");
        assert_eq!(f.bind("s1"), Taken::Passed);
        assert_eq!(f.sent(), "B");
        assert!(!f.tx.take_changed_shape(), "nothing stale");
        // A plan whose shape the router does not know: one older than the client's Parse is
        // not asked (PostgreSQL's Describe of a plan from before the DDL fails with 0A000,
        // which would abort the client's transaction), the client's own is, once prepared;
        // a newer one is asked as it is.
        for (unknown, sent) in [(unknown_older, "CPDH"), (unknown_newer(&f), "DH")] {
            f.on(unknown);
            f.tx = Transaction::default();
            assert_eq!(f.bind("s1"), Taken::Check);
            assert_eq!(f.sent(), sent);
        }
    }

    #[test]
    fn parameter_types_the_client_was_told_are_spelled_out_for_other_backends() {
        let types = type_oids;
        let mut f = Fixture::new(10);
        // The client gave the second parameter's type, left the first to the server.
        let mut parse = Vec::new();
        write::parse(&mut parse, "s1", "select $1 + 1, $2");
        parse.truncate(parse.len() - 2);
        parse.extend_from_slice(&types(&[0, 25]));
        let len = (parse.len() - 1) as u32;
        parse[1..5].copy_from_slice(&len.to_be_bytes());
        f.t().parse(&parse).expect("well-formed");
        let statement = f.client.named.get("s1").expect("kept").clone();
        let for_backend = |statement: &Statement| {
            let mut out = Vec::new();
            statement.write_parse_for_backend(&mut out);
            out
        };
        assert_eq!(for_backend(&statement), &statement.parse[..]);
        statement.told_parameters(&types(&[23, 25]));
        let pinned = for_backend(&statement);
        let pinned = &pinned[..];
        assert!(pinned.ends_with(&types(&[23, 25])), "{pinned:?}");
        assert_eq!(
            &pinned[..pinned.len() - 10],
            &statement.parse[..statement.parse.len() - 10]
        );
        assert_eq!(
            u32::from_be_bytes([pinned[1], pinned[2], pinned[3], pinned[4]]) as usize + 1,
            pinned.len()
        );
        // Given on another backend, it is sent with both types.
        f.sync();
        f.reply(b"1Z");
        f.on(BackendStatements::default());
        assert_eq!(f.bind("s1"), Taken::Passed);
        assert!(f.out.starts_with(pinned));
        // Every type given: nothing to spell out; far more than the Parse: not kept.
        assert_eq!(pin_parameter_types(pinned, &types(&[23, 25])), None);
        assert_eq!(
            pin_parameter_types(&statement.parse, &types(&[23; 200])),
            None
        );
        assert_eq!(pin_parameter_types(&statement.parse, b"\x00"), None);
    }

    #[test]
    fn a_statement_never_described_is_not_checked() {
        let mut f = Fixture::new(10);
        f.t()
            .parse(&parse_message("s1", "select * from t"))
            .expect("well-formed");
        f.sync();
        f.reply(b"1Z");
        f.on(BackendStatements::default());
        assert_eq!(f.bind("s1"), Taken::Passed);
        let sent: String = messages(&f.out).iter().map(|m| m.0).collect();
        assert_eq!(sent, "PB");
    }

    #[test]
    fn row_shapes_differ_in_names_types_and_modifiers_not_in_tables() {
        let shape = |body: &[u8]| row_shape(be::ROW_DESCRIPTION, body);
        let one = int4_columns(&["a"]);
        assert_eq!(shape(&one), shape(&one));
        assert_ne!(shape(&one), shape(&int4_columns(&["b"])));
        assert_ne!(shape(&one), shape(&int4_columns(&["a", "b"])));
        assert_ne!(shape(&one), row_shape(be::NO_DATA, b""));
        let mut other_table = one.clone();
        other_table[4] ^= 1;
        assert_eq!(shape(&one), shape(&other_table));
        let mut other_type = one.clone();
        other_type[13] = 20;
        assert_ne!(shape(&one), shape(&other_type));
        let mut modifier = one.clone();
        modifier[17] = 4;
        assert_ne!(shape(&one), shape(&modifier));
        assert_eq!(shape(&one[..one.len() - 1]), None, "cut short");
    }

    #[test]
    fn same_text_same_server_name_other_search_path_other_name() {
        let mut a = Fixture::new(10);
        let mut b = Fixture::new(10);
        let mut c = Fixture::new(10);
        c.client = ClientStatements::new("app", Some("other"));
        a.t()
            .parse(&parse_message("x", "select 1"))
            .expect("well-formed");
        b.t()
            .parse(&parse_message("y", "select 1"))
            .expect("well-formed");
        c.t()
            .parse(&parse_message("x", "select 1"))
            .expect("well-formed");
        let (na, nb, nc) = (messages(&a.out), messages(&b.out), messages(&c.out));
        assert_eq!(na[0].1, nb[0].1);
        assert_ne!(na[0].1, nc[0].1);
        // A client that sets its search_path (or its role) later parses under it from then on;
        // what it parsed before keeps its name.
        let name_of = |f: &Fixture, client: &str| {
            f.client
                .named
                .get(client)
                .expect("kept")
                .server_name()
                .to_owned()
        };
        b.client.follow("app", Some("other"));
        b.t()
            .parse(&parse_message("z", "select 1"))
            .expect("well-formed");
        assert_eq!(name_of(&b, "z"), nc[0].1, "as if it had started with it");
        assert_eq!(name_of(&b, "y"), na[0].1);
        b.client.follow("reader", Some("other"));
        b.t()
            .parse(&parse_message("w", "select 1"))
            .expect("well-formed");
        assert_ne!(name_of(&b, "w"), name_of(&b, "z"), "another role");
        b.client.follow("app", None);
        b.t()
            .parse(&parse_message("v", "select 1"))
            .expect("well-formed");
        assert_eq!(name_of(&b, "v"), na[0].1, "back to the default");
    }

    #[test]
    fn statements_parsed_after_a_set_local_search_path_in_the_transaction_are_told_apart() {
        let mut f = Fixture::new(10);
        let name_of = |f: &Fixture, client: &str| {
            let statement = f.client.named.get(client).expect("kept");
            statement.server_name().to_owned()
        };
        let parse = |f: &mut Fixture, name: &str, sql: &str| {
            f.t().parse(&parse_message(name, sql)).expect("well-formed");
        };
        parse(&mut f, "before", "select * from t");
        let query = |f: &mut Fixture, sql: &str| {
            let mut message = Vec::new();
            write::query(&mut message, sql);
            assert!(f.t().query(&message));
        };
        query(&mut f, "BEGIN");
        query(&mut f, "SET LOCAL search_path TO tenant_1");
        parse(&mut f, "one", "select * from t");
        query(&mut f, "SET LOCAL search_path TO tenant_2");
        parse(&mut f, "two", "select * from t");
        query(&mut f, "SET LOCAL search_path TO tenant_1");
        parse(&mut f, "one_again", "select * from t");
        let names = ["before", "one", "two", "one_again"].map(|n| name_of(&f, n));
        assert_ne!(names[0], names[1]);
        assert_ne!(names[1], names[2]);
        assert_ne!(names[0], names[2]);
        // What the transaction set before is part of it: tenant 1 after tenant 2 is not
        // taken for tenant 1 alone (the client may have set more between).
        assert_ne!(names[1], names[3]);
        // The next transaction starts from the session's own again.
        f.client.follow("app", None);
        parse(&mut f, "after", "select * from t");
        assert_eq!(name_of(&f, "after"), names[0]);
        // The same in a Parse, and a set_config for the transaction.
        parse(
            &mut f,
            "",
            "select set_config('search_path', 'tenant_1', true)",
        );
        parse(&mut f, "in_parse", "select * from t");
        assert_ne!(name_of(&f, "in_parse"), names[0]);
        f.client.follow("app", None);
        query(&mut f, "SET LOCAL work_mem = '1MB'");
        parse(&mut f, "not_a_lookup", "select * from t");
        assert_eq!(name_of(&f, "not_a_lookup"), names[0]);
        // RESET ALL takes search_path back to the session's default, whatever it was.
        query(&mut f, "RESET ALL");
        parse(&mut f, "after_reset", "select * from t");
        assert_ne!(name_of(&f, "after_reset"), names[0]);
    }

    #[test]
    fn postgresql_answers_for_names() {
        let mut f = Fixture::new(10);
        f.t()
            .parse(&parse_message("s1", "select 1"))
            .expect("well-formed");
        f.sync();
        f.reply(b"1Z");
        f.out.clear();
        // Re-Parse of a name in use: a Parse that fails goes in its place, and the client
        // gets 42P05 in place of its error; the backend skips to the Sync.
        f.t()
            .parse(&parse_message("s1", "select 2"))
            .expect("well-formed");
        assert_eq!(messages(&f.out), [('P', REFUSAL_NAME.to_owned())]);
        f.t()
            .bind(&bind_message("", "s1"), bind_message("", "s1").len())
            .expect("well-formed");
        f.tx.client(fe::EXECUTE, 0);
        f.sync();
        let mut to_client = Vec::new();
        assert_eq!(
            f.tx.backend(be::ERROR_RESPONSE, b""),
            Ok(super::super::transaction::Reply::Swallow)
        );
        f.tx.take_synthesized(&mut to_client);
        assert!(String::from_utf8_lossy(&to_client).contains("42P05"));
        assert_eq!(f.reply(b"Z"), b"Z");
        assert_eq!(f.client.len(), 1, "the first statement keeps its name");
        // Bind of an unknown name: 26000 in place of the refusal's error.
        f.out.clear();
        f.t()
            .bind(&bind_message("", "nope"), bind_message("", "nope").len())
            .expect("well-formed");
        assert_eq!(messages(&f.out), [('P', REFUSAL_NAME.to_owned())]);
        f.sync();
        f.tx.backend(be::ERROR_RESPONSE, b"").expect("in turn");
        let mut to_client = Vec::new();
        f.tx.take_synthesized(&mut to_client);
        assert!(String::from_utf8_lossy(&to_client).contains("26000"));
        f.reply(b"Z");
        // Close of an unknown name: CloseComplete, nothing sent.
        f.out.clear();
        f.t()
            .close(&message(b'C', b"Snope\0"))
            .expect("well-formed");
        let mut synthesized = Vec::new();
        f.tx.take_synthesized(&mut synthesized);
        assert_eq!(synthesized, [b'3', 0, 0, 0, 4]);
        assert!(f.out.is_empty());
        // Close of a portal goes to the backend.
        f.t().close(&message(b'C', b"Pp1\0")).expect("well-formed");
        assert_eq!(messages(&f.out), [('C', "p1".to_owned())]);
    }

    #[test]
    fn a_failed_parse_leaves_no_name() {
        let mut f = Fixture::new(10);
        f.t()
            .parse(&parse_message("bad", "selec 1"))
            .expect("well-formed");
        f.sync();
        assert_eq!(f.reply(b"EZ"), b"EZ");
        assert!(f.client.is_empty());
        assert!(f.backend.is_empty());
        // The name can be used again.
        f.out.clear();
        f.t()
            .parse(&parse_message("bad", "select 1"))
            .expect("well-formed");
        assert_eq!(messages(&f.out)[0].0, 'P');
    }

    #[test]
    fn eviction_closes_the_least_recently_used() {
        let mut f = Fixture::new(2);
        for name in ["a", "b"] {
            f.t()
                .parse(&parse_message(name, &format!("select '{name}'")))
                .expect("well-formed");
        }
        f.sync();
        f.reply(b"11Z");
        // Use a, then parse c: b goes.
        f.out.clear();
        f.t()
            .bind(&bind_message("", "a"), bind_message("", "a").len())
            .expect("well-formed");
        f.t()
            .parse(&parse_message("c", "select 'c'"))
            .expect("well-formed");
        f.sync();
        let sent = messages(&f.out);
        assert_eq!(sent.iter().map(|m| m.0).collect::<String>(), "BCP");
        assert_eq!(f.reply(b"231Z"), b"21Z", "the router's CloseComplete");
        assert_eq!(f.backend.len(), 2);
    }

    #[test]
    fn the_unnamed_statement_survives_the_transaction() {
        let mut f = Fixture::new(10);
        f.t()
            .parse(&parse_message("", "select $1"))
            .expect("well-formed");
        f.sync();
        f.reply(b"1Z");
        f.on(BackendStatements::default());
        f.t()
            .bind(&bind_message("", ""), bind_message("", "").len())
            .expect("well-formed");
        f.sync();
        assert_eq!(
            messages(&f.out).iter().map(|m| m.0).collect::<String>(),
            "PB",
            "parsed again on this backend"
        );
        assert_eq!(f.reply(b"12Z"), b"2Z");
    }

    #[test]
    fn a_clients_statements_are_bounded_and_their_cost_follows_removals() {
        let mut f = Fixture::new(10);
        let long = format!("select '{}'", "x".repeat(10_000));
        let tries = MAX_CLIENT_STATEMENT_BYTES / 10_000 + 10;
        for i in 0..tries {
            f.t()
                .parse(&parse_message(&format!("s{i}"), &format!("{long} -- {i}")))
                .expect("well-formed");
        }
        assert!(
            f.client.named.len() < tries,
            "past the budget, a Parse is refused"
        );
        assert!(f.client.named.contains_key("s0"));
        assert!(f.client.bytes <= MAX_CLIENT_STATEMENT_BYTES);
        let total: usize = f
            .client
            .named
            .iter()
            .map(|(n, s)| statement_cost(n, s))
            .sum();
        assert_eq!(f.client.bytes, total);
        assert!(f.client.remove("s0"));
        f.client.clear();
        assert_eq!(f.client.bytes, 0);
    }

    #[test]
    fn closes_between_transactions_are_answered_without_a_backend() {
        let mut statements = ClientStatements::new("app", None);
        let mut f = Fixture::new(10);
        f.t()
            .parse(&parse_message("s1", "select 1"))
            .expect("well-formed");
        statements.named = std::mem::take(&mut f.client.named);
        statements.bytes = std::mem::take(&mut f.client.bytes);
        let mut plain = ReadBuf::new(256);
        let mut bytes = message(b'C', b"Ss1\0");
        bytes.extend_from_slice(&message(b'H', b""));
        bytes.extend_from_slice(&message(b'S', b""));
        bytes.extend_from_slice(&message(b'C', b"Sother\0"));
        plain.spare_mut()[..bytes.len()].copy_from_slice(&bytes);
        plain.commit(bytes.len());
        let mut out = Vec::new();
        let known = KnownGood::default();
        let texts = SharedTexts::default();
        assert!(
            !answer_idle(&mut plain, &mut statements, &known, &texts, 10, &mut out),
            "a Close without its Sync stays"
        );
        assert_eq!(out, [b'3', 0, 0, 0, 4, b'Z', 0, 0, 0, 5, b'I']);
        assert!(statements.is_empty());
        assert_eq!(plain.data(), message(b'C', b"Sother\0"));
        // A batch with anything else goes to a backend, whole.
        let mut plain = ReadBuf::new(256);
        let mut bytes = message(b'C', b"Ss1\0");
        bytes.extend_from_slice(&bind_message("", "s1"));
        bytes.extend_from_slice(&message(b'S', b""));
        plain.spare_mut()[..bytes.len()].copy_from_slice(&bytes);
        plain.commit(bytes.len());
        out.clear();
        assert!(!answer_idle(
            &mut plain,
            &mut statements,
            &known,
            &texts,
            10,
            &mut out
        ));
        assert!(out.is_empty());
        assert_eq!(plain.len(), bytes.len());
    }

    #[test]
    fn clients_that_prepare_the_same_text_share_one_copy() {
        let texts = SharedTexts::default();
        let after_name = |sql: &str| parse_message("x", sql)[HEADER_BYTES + 2..].to_vec();
        let (a, b) = (
            ClientStatements::new("app", None),
            ClientStatements::new("app", None),
        );
        let held = a.statement(&after_name("select 1"), &texts);
        let other = b.statement(&after_name("select 1"), &texts);
        assert!(Rc::ptr_eq(&held.parse, &other.parse), "one copy");
        assert_eq!(texts.len(), 1);
        // Another role's (or search_path's) is another statement on the backends.
        let third = ClientStatements::new("other", None);
        let elsewhere = third.statement(&after_name("select 1"), &texts);
        assert_ne!(held.server_name(), elsewhere.server_name());
        assert_eq!(texts.len(), 2);
        // Texts no client holds go when the set has doubled (its 2048th text sweeps it); held
        // ones stay.
        drop((other, elsewhere));
        for i in 0..2 * SWEEP_MIN_TEXTS - 1 {
            let _ = a.statement(&after_name(&format!("select {i} + 1")), &texts);
        }
        assert_eq!(texts.len(), 2, "swept: the held one and the newest");
        let again = b.statement(&after_name("select 1"), &texts);
        assert!(Rc::ptr_eq(&held.parse, &again.parse));
    }

    #[test]
    fn parses_of_accepted_statements_are_answered_without_a_backend() {
        let known = KnownGood::default();
        let texts = SharedTexts::default();
        let mut statements = ClientStatements::new("app", None);
        let mut batch = parse_message("p1", "select 1");
        batch.extend_from_slice(&message(b'S', b""));
        let fill = |bytes: &[u8]| {
            let mut plain = ReadBuf::new(256);
            plain.spare_mut()[..bytes.len()].copy_from_slice(bytes);
            plain.commit(bytes.len());
            plain
        };
        let mut out = Vec::new();
        // Not known to parse yet: a backend must see it.
        let mut plain = fill(&batch);
        assert!(!answer_idle(
            &mut plain,
            &mut statements,
            &known,
            &texts,
            10,
            &mut out
        ));
        assert!(out.is_empty() && statements.is_empty());
        let accepted = statements.statement(&parse_message("x", "select 1")[7..], &texts);
        known.add(&accepted);
        let mut plain = fill(&batch);
        assert!(answer_idle(
            &mut plain,
            &mut statements,
            &known,
            &texts,
            10,
            &mut out
        ));
        assert_eq!(out, [b'1', 0, 0, 0, 4, b'Z', 0, 0, 0, 5, b'I']);
        assert_eq!(statements.len(), 1);
        // The statement kept is the one a backend accepted: the same Parse, one copy.
        let kept = statements.named.get("p1").expect("kept");
        assert!(Rc::ptr_eq(&kept.parse, &accepted.parse), "{kept:?}");
        // The same name again is 42P05: for a backend to answer.
        out.clear();
        let mut plain = fill(&batch);
        assert!(!answer_idle(
            &mut plain,
            &mut statements,
            &known,
            &texts,
            10,
            &mut out
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn deallocate_all_pipelined_before_a_parse_and_deallocate_of_a_name_only_the_router_knows() {
        let mut f = Fixture::new(10);
        f.t()
            .parse(&parse_message("s1", "select 1"))
            .expect("well-formed");
        f.sync();
        f.reply(b"1Z");
        f.out.clear();
        // Pipelined: DEALLOCATE ALL, then a Parse of the same name.
        assert!(f.t().query(&message(b'Q', b"DEALLOCATE ALL\0")));
        f.t()
            .parse(&parse_message("s1", "select 2"))
            .expect("well-formed");
        f.sync();
        assert_eq!(
            messages(&f.out).iter().map(|m| m.0).collect::<String>(),
            "QP"
        );
        assert_eq!(f.reply(b"CZ1Z"), b"CZ1Z");
        // DEALLOCATE of a name only the router knows: answered by the router.
        f.out.clear();
        assert!(!f.t().query(&message(b'Q', b"DEALLOCATE s1\0")));
        assert!(f.out.is_empty());
        let mut synthesized = Vec::new();
        f.tx.take_synthesized(&mut synthesized);
        assert_eq!(
            messages(&synthesized)
                .iter()
                .map(|m| m.0)
                .collect::<String>(),
            "CZ"
        );
        assert!(f.client.is_empty());
    }
}
