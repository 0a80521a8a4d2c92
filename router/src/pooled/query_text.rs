//! What a simple query's text (or a Parse's) does to the session, read without a parser: the
//! statements in it ([`statements`], split outside quotes, dollar quotes and comments), what
//! they do to prepared statements and to the session as a whole ([`QueryFacts`]: `PREPARE`,
//! `DEALLOCATE`, `DISCARD ALL`, `RESET ALL`, transaction control), and which parameters they
//! set or reset ([`ParameterChange`]: `SET`, `RESET`, `SET ROLE`, `set_config(...)`, the
//! `pg_settings` writes and calls the router cannot name). The pooled port follows a client's
//! session from these: [`super::prepared::Translator::query`] and the transaction state
//! machine ([`super::transaction::Transaction::parameter_change`]).

use std::hash::{Hash, Hasher};

use super::transaction::Resets;
use crate::protocol::reader::{DecodeError, Reader};

/// The statements of a simple query's text, split at the semicolons outside quotes, quoted
/// identifiers, dollar quotes and comments, each from its first word (comments and spaces
/// before it skipped); empty statements left out.
pub fn statements(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for_each_statement(text, |statement| out.push(statement));
    out
}

/// As [`statements`], each handed to `f` in turn, without allocating (every simple query on
/// the pooled port goes through it).
fn for_each_statement<'a>(text: &'a str, mut f: impl FnMut(&'a str)) {
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut start: Option<usize> = None;
    let skip_comment = |i: usize| -> Option<usize> {
        match (bytes.get(i), bytes.get(i + 1)) {
            (Some(b'-'), Some(b'-')) => Some(
                bytes[i..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(bytes.len(), |n| i + n + 1),
            ),
            (Some(b'/'), Some(b'*')) => {
                // Block comments nest.
                let (mut depth, mut j) = (1, i + 2);
                while j < bytes.len() && depth > 0 {
                    match (bytes[j], bytes.get(j + 1)) {
                        (b'/', Some(b'*')) => (depth, j) = (depth + 1, j + 2),
                        (b'*', Some(b'/')) => (depth, j) = (depth - 1, j + 2),
                        _ => j += 1,
                    }
                }
                Some(j)
            }
            _ => None,
        }
    };
    while i < bytes.len() {
        if let Some(end) = skip_comment(i) {
            i = end;
            continue;
        }
        let byte = bytes[i];
        if start.is_none() {
            // PostgreSQL's spaces: the ASCII ones and vertical tab.
            if byte.is_ascii_whitespace() || byte == 0x0b || byte == b';' {
                i += 1;
                continue;
            }
            start = Some(i);
        }
        match byte {
            b';' => {
                if let Some(s) = start.take() {
                    f(trim_spaces(&text[s..i]));
                }
                i += 1;
            }
            b'\'' => {
                // E'...' strings take backslash escapes; '' is a quote either way.
                let escapes = i > 0 && matches!(bytes[i - 1], b'e' | b'E');
                let mut j = i + 1;
                while j < bytes.len() {
                    match bytes[j] {
                        b'\\' if escapes => j += 2,
                        b'\'' if bytes.get(j + 1) == Some(&b'\'') => j += 2,
                        b'\'' => break,
                        _ => j += 1,
                    }
                }
                i = j + 1;
            }
            b'"' => {
                let mut j = i + 1;
                while j < bytes.len() {
                    match bytes[j] {
                        b'"' if bytes.get(j + 1) == Some(&b'"') => j += 2,
                        b'"' => break,
                        _ => j += 1,
                    }
                }
                i = j + 1;
            }
            b'$' => {
                // A dollar quote: $tag$ ... $tag$ (a tag never starts with a digit: $1 is a
                // parameter).
                let tag_end = bytes[i + 1..]
                    .iter()
                    .position(|&b| !(b.is_ascii_alphanumeric() || b == b'_'))
                    .map(|n| i + 1 + n);
                match tag_end {
                    Some(end)
                        if bytes[end] == b'$'
                            && !bytes.get(i + 1).is_some_and(|b| b.is_ascii_digit()) =>
                    {
                        let tag = &text[i..=end];
                        i = text[end + 1..]
                            .find(tag)
                            .map_or(bytes.len(), |n| end + 1 + n + tag.len());
                    }
                    _ => i += 1,
                }
            }
            _ => i += 1,
        }
    }
    if let Some(s) = start {
        f(trim_spaces(&text[s..]));
    }
}

/// `text` without the spaces (PostgreSQL's) at its end.
fn trim_spaces(text: &str) -> &str {
    text.trim_end_matches(|c: char| c.is_ascii_whitespace() || c == '\u{b}')
}

/// What a simple query does that the router must know of.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct QueryFacts {
    /// A `PREPARE` (refused on this port).
    pub(super) prepare: bool,
    /// A `DEALLOCATE ALL` or `DISCARD ALL`: every prepared statement goes.
    pub(super) clears_statements: bool,
    /// A `DISCARD ALL` or `RESET ALL`: every parameter goes back to its session default
    /// (and for `DISCARD ALL`, the role).
    pub(super) resets: Resets,
    /// The whole query is one `DEALLOCATE name`.
    pub(super) deallocate: Option<String>,
    /// It has a `DISCARD ALL`.
    pub(super) discard_all: bool,
    /// Statements in it.
    pub(super) statements: usize,
    /// A statement of it begins, ends or cuts a transaction ([`TRANSACTION_CONTROL`]).
    pub(super) transaction_control: bool,
    /// Parameters its statements reset or set (see [`ParameterChange`]).
    pub(super) changes: Vec<ParameterChange>,
}

/// Reads a simple query's statements' first words.
pub(super) fn query_facts(text: &[u8]) -> QueryFacts {
    let text = text.strip_suffix(&[0]).unwrap_or(text);
    let Ok(text) = std::str::from_utf8(text) else {
        return QueryFacts::default();
    };
    let mut facts = QueryFacts::default();
    let mut count = 0;
    // `DEALLOCATE name` counts only as the whole query.
    let mut deallocate = None;
    let mut discard_all = false;
    let mut transaction_control = false;
    for_each_statement(text, |statement| {
        count += 1;
        let mut words = statement.split_ascii_whitespace();
        let first = words.next().unwrap_or("");
        let second = words.next();
        let is =
            |w: Option<&str>, keyword: &str| w.is_some_and(|w| w.eq_ignore_ascii_case(keyword));
        if TRANSACTION_CONTROL
            .iter()
            .any(|word| first.eq_ignore_ascii_case(word))
        {
            transaction_control = true;
        }
        if first.eq_ignore_ascii_case("prepare") {
            facts.prepare = true;
        } else if first.eq_ignore_ascii_case("deallocate") {
            let mut name = second;
            if is(name, "prepare") {
                name = words.next();
            }
            if is(name, "all") {
                facts.clears_statements = true;
            } else if let (Some(name), None) = (name, words.next()) {
                deallocate = Some(name);
            }
        } else if first.eq_ignore_ascii_case("discard") && is(second, "all") {
            facts.clears_statements = true;
            facts.resets = Resets::Session;
            discard_all = true;
        } else if first.eq_ignore_ascii_case("reset") && is(second, "all") {
            if facts.resets == Resets::Nothing {
                facts.resets = Resets::Parameters;
            }
        } else if let Some(change) = parameter_change(statement) {
            facts.changes.push(change);
        }
    });
    facts.statements = count;
    facts.discard_all = discard_all;
    facts.transaction_control = transaction_control;
    if count == 1 {
        facts.deallocate = deallocate.map(unquote);
    } else if deallocate.is_some() || discard_all {
        // Beside other statements it reaches the backend, where no statement of the client's
        // has its name: what it did is read back. (PostgreSQL runs `DISCARD ALL` only as a
        // query of its own, outside any block, where nothing can undo it: alone, it leaves
        // the session as it starts, with nothing to read; if it fails, the transaction reads
        // the session back, [`Transaction::backend`].)
        facts.changes.push(ParameterChange::Unknown);
    }
    if facts.resets == Resets::Parameters && transaction_control {
        // A `RESET ALL` a statement of the same query may roll back (or commit apart from a
        // later error): what the session has is read back. Otherwise it is undone only by an
        // error (the transaction reads the session back) or by the client's own block, which
        // it runs in only if the backend is still in it after the query: read back then too
        // ([`Transaction::backend`]).
        facts.changes.push(ParameterChange::Unknown);
    }
    mentioned_changes(text.as_bytes(), |change| facts.changes.push(change));
    facts
}

/// The parameters `SET SESSION CHARACTERISTICS AS TRANSACTION` sets.
pub const CHARACTERISTICS: [&str; 3] = [
    "default_transaction_isolation",
    "default_transaction_read_only",
    "default_transaction_deferrable",
];

/// First words of the statements that begin, end or cut a transaction.
const TRANSACTION_CONTROL: [&str; 8] = [
    "begin",
    "start",
    "commit",
    "end",
    "rollback",
    "abort",
    "savepoint",
    "release",
];

/// What a statement does to a session parameter that the router must follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParameterChange {
    /// `RESET name` or `SET [SESSION | LOCAL] name {TO | =} DEFAULT` (with PostgreSQL's other
    /// spellings, `TIME ZONE` and `NAMES`; `RESET ROLE` and `SET SESSION AUTHORIZATION
    /// DEFAULT` are the role's): back to the session default. `RESET ALL` is not one.
    Reset(String),
    /// `SET [SESSION] name {TO | =} value` (or `SET SCHEMA`, `SET ROLE`): a new session value.
    /// `SET LOCAL` (over with the transaction), `SET SESSION AUTHORIZATION`, `SET TRANSACTION`
    /// and `SET CONSTRAINTS` are not one; neither are `SET TIME ZONE` and `SET NAMES`, whose
    /// parameters the server reports.
    Set(String),
    /// `SET SESSION CHARACTERISTICS AS TRANSACTION ...` (JDBC's `setTransactionIsolation`):
    /// new session values of the `default_transaction_*` parameters ([`CHARACTERISTICS`]).
    Characteristics,
    /// A change of the session the router cannot name from the text: `SET SESSION
    /// AUTHORIZATION name`, a `set_config` the router cannot
    /// read as a call or a write to `pg_settings`, a `RESET ALL` beside transaction control
    /// or a `DISCARD ALL` beside other statements (which may be undone or partly done), a
    /// `PREPARE`, `DEALLOCATE` or `DISCARD` in a Parse, a query too long to read. The backend's whole session is read back before it is lent again
    /// ([`readback::session_audit`](super::readback::session_audit)).
    Unknown,
    /// State no reply tells of may outlive the transaction: a session-level advisory lock
    /// (`pg_advisory_lock`, `pg_try_advisory_lock`, their `_shared` forms), which would stay
    /// held by the backend for clients that never took it, or a temporary table made by
    /// `CREATE TEMP TABLE ... AS` or `SELECT ... INTO TEMP` (whose reply is `SELECT n`, as any
    /// query's). Cleaned up before the backend is lent again.
    Residue,
    /// A change of a parameter whose name the text does not give (`set_config($1, ...)`): the
    /// backend is closed after the session read, as no read can find every custom parameter.
    Untraceable,
    /// `SET LOCAL search_path`, `SET LOCAL ROLE` (or `SESSION AUTHORIZATION`), or a
    /// `set_config` of either for the transaction: nothing outlives the transaction, but the
    /// names in statements parsed after it in the transaction are looked up under another
    /// `search_path` or role. Carries a hash of what it sets them to as written (the
    /// statement, or the `set_config` call's name and value).
    Lookup(u64),
    /// A `set_config` of `search_path` or the role (for the transaction or the session) whose
    /// name or value is a parameter of the statement (`set_config('search_path', $1, true)`,
    /// the way to pick a tenant without quoting it into the text): what it sets them to is in
    /// the Bind that runs it ([`BoundLookup::hash`]).
    BoundLookup(BoundLookup),
}

/// The name and value of a `set_config` call of [`ParameterChange::BoundLookup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundLookup {
    pub name: Argument,
    pub value: Argument,
}

/// An argument of a `set_config` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Argument {
    /// Written in the text: a hash of it (a name in lower case, a value as written).
    Written(u64),
    /// The statement's parameter of this number (from 1), cast or not (`$1`, `$1::text`).
    Parameter(u16),
}

impl BoundLookup {
    /// What the call sets where names are looked up, when run by a Bind whose body past its
    /// two names is `bind_rest` (the whole of it, or as much as the router has): a hash of
    /// its name and value, as [`ParameterChange::lookup_hash`] gives for changes written in
    /// the text. `Ok(None)` if its name is a parameter bound to something other than
    /// `search_path` or the role; `Err` if the Bind does not hold the parameter (cut short,
    /// or malformed: PostgreSQL refuses the latter).
    pub fn hash(&self, bind_rest: &[u8]) -> Result<Option<u64>, DecodeError> {
        let name = match self.name {
            Argument::Written(name) => name,
            Argument::Parameter(number) => {
                let name = bind_parameter(bind_rest, number)?.unwrap_or_default();
                let Some(lookup) = LOOKUP
                    .iter()
                    .find(|n| name.eq_ignore_ascii_case(n.as_bytes()))
                else {
                    return Ok(None);
                };
                hash_of(&[lookup.as_bytes()])
            }
        };
        let mut hash = std::hash::DefaultHasher::new();
        name.hash(&mut hash);
        match self.value {
            Argument::Written(value) => value.hash(&mut hash),
            Argument::Parameter(number) => bind_parameter(bind_rest, number)?.hash(&mut hash),
        }
        Ok(Some(hash.finish()))
    }
}

/// The value of parameter `number` (from 1) in a Bind's body past its two names (`None` for
/// NULL), as its bytes are: a parameter `set_config` takes is text, whose binary form is its
/// text form.
fn bind_parameter(rest: &[u8], number: u16) -> Result<Option<&[u8]>, DecodeError> {
    let mut r = Reader::new(rest);
    let formats = usize::from(r.u16()?);
    r.take(formats * 2)?;
    let count = r.u16()?;
    if number == 0 || number > count {
        return Err(DecodeError::Truncated);
    }
    for _ in 1..number {
        r.len_prefixed()?;
    }
    r.len_prefixed()
}

/// Parameters that decide where the names in a statement's text are looked up.
const LOOKUP: [&str; 3] = ["search_path", "role", "session_authorization"];

impl ParameterChange {
    /// True if statements parsed after it in the same transaction look names up elsewhere:
    /// it sets or resets `search_path` or the role, for the session ([`ParameterChange::Set`],
    /// [`ParameterChange::Reset`]) or the transaction ([`ParameterChange::Lookup`]).
    pub fn changes_lookup(&self) -> bool {
        match self {
            ParameterChange::Reset(name) | ParameterChange::Set(name) => {
                LOOKUP.iter().any(|n| name.eq_ignore_ascii_case(n))
            }
            ParameterChange::Lookup(_) | ParameterChange::BoundLookup(_) => true,
            _ => false,
        }
    }

    /// What it changes where names are looked up to, if it changes that
    /// ([`ParameterChange::changes_lookup`]): the hash a [`ParameterChange::Lookup`] carries,
    /// or for a session's `SET` or `RESET` of `search_path` or the role, a hash of `text`, the
    /// statement that made it.
    /// A [`ParameterChange::BoundLookup`] has none: its Bind tells it ([`BoundLookup::hash`]).
    pub fn lookup_hash(&self, text: &[u8]) -> Option<u64> {
        match self {
            ParameterChange::Lookup(what) => Some(*what),
            ParameterChange::BoundLookup(_) => None,
            change if change.changes_lookup() => Some(hash_of(&[text])),
            _ => None,
        }
    }
}

/// A hash of `parts`, as written.
fn hash_of(parts: &[&[u8]]) -> u64 {
    let mut hash = std::hash::DefaultHasher::new();
    parts.hash(&mut hash);
    hash.finish()
}

/// A [`ParameterChange::Lookup`] of what `parts` (as written) set.
fn lookup(parts: &[&[u8]]) -> ParameterChange {
    ParameterChange::Lookup(hash_of(parts))
}

/// What a statement's text names that the router follows without reading the statement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Mentions {
    /// `set_config`: settings may change without `SET` ([`set_config_calls`]).
    set_config: bool,
    /// `pg_settings` (an `UPDATE` of it sets): settings may change without `SET`.
    pg_settings: bool,
    /// A session-level advisory lock function.
    session_lock: bool,
    /// A temporary object made where no reply says so ([`temporary_at`]).
    temp: bool,
}

/// Scans `text` (any case) for the names [`Mentions`] lists. Every one has an underscore at a
/// known place: only the bytes around each underscore are looked at.
fn mentions(text: &[u8]) -> Mentions {
    let is_at = |start: usize, name: &[u8]| {
        text.get(start..start + name.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(name))
    };
    // A whole identifier `name` with its first underscore at `at`.
    let word_at = |at: usize, (name, before): (&[u8], usize)| {
        at.checked_sub(before).is_some_and(|start| {
            is_at(start, name)
                && !ident(start.checked_sub(1).and_then(|i| text.get(i)))
                && !ident(text.get(start + name.len()))
        })
    };
    // `pg_advisory_lock`, `pg_try_advisory_lock` and their `_shared` forms, with the
    // underscore before `lock` at `at`; not `pg_advisory_xact_lock` (over with its
    // transaction) or `pg_advisory_unlock`.
    let session_lock_at = |at: usize| {
        ["pg_advisory", "pg_try_advisory"].iter().any(|prefix| {
            let prefix = prefix.as_bytes();
            let Some(start) = at.checked_sub(prefix.len()) else {
                return false;
            };
            let end = at + b"_lock".len();
            is_at(start, prefix)
                && is_at(at, b"_lock")
                && !ident(start.checked_sub(1).and_then(|i| text.get(i)))
                && (!ident(text.get(end)) || is_at(end, b"_shared"))
        })
    };
    // The temporary schema named: `pg_temp`, `pg_temp_3`.
    let temp_schema_at = |at: usize| {
        word_at(at, (b"pg_temp", 2))
            || at.checked_sub(2).is_some_and(|start| {
                is_at(start, b"pg_temp_")
                    && !ident(start.checked_sub(1).and_then(|i| text.get(i)))
                    && text.get(start + 8).is_some_and(u8::is_ascii_digit)
            })
    };
    let mut seen = Mentions::default();
    for at in memchr::memchr_iter(b'_', text) {
        seen.set_config |= word_at(at, (b"set_config", 3));
        seen.pg_settings |= word_at(at, (b"pg_settings", 2));
        seen.session_lock |= session_lock_at(at);
        seen.temp |= temp_schema_at(at);
        if seen.set_config && seen.pg_settings && seen.session_lock && seen.temp {
            break;
        }
    }
    if !seen.temp {
        seen.temp = memchr::memchr2_iter(b't', b'T', text).any(|at| temporary_at(text, at));
    }
    seen
}

/// True if `text` has the keyword `TEMP` or `TEMPORARY` at `at` where it makes a temporary
/// object: after `CREATE`, `GLOBAL` or `LOCAL` (`CREATE TEMP TABLE t AS ...`), or after `INTO`
/// (`SELECT ... INTO TEMP t`). A column named `temp` is not (`select temp from t`), a table
/// named `temp` after `INTO` is (its cleanup is only a round trip too many).
fn temporary_at(text: &[u8], at: usize) -> bool {
    let word_at = |start: usize, word: &[u8]| {
        text.get(start..start + word.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(word))
            && !ident(text.get(start + word.len()))
    };
    if !(word_at(at, b"temp") || word_at(at, b"temporary"))
        || ident(at.checked_sub(1).and_then(|i| text.get(i)))
    {
        return false;
    }
    let before = &text[..at];
    let Some(end) = before.iter().rposition(|b| !b.is_ascii_whitespace()) else {
        return false;
    };
    let start = before[..=end]
        .iter()
        .rposition(|&b| !ident(Some(&b)))
        .map_or(0, |i| i + 1);
    let previous = &before[start..=end];
    [&b"create"[..], b"global", b"local", b"into"]
        .iter()
        .any(|word| previous.eq_ignore_ascii_case(word))
}

/// The changes [`mentions`] stands for. A `set_config('name', value, true)` sets its
/// parameter for its transaction only (PostgREST's every request): nothing to follow. Any other
/// `set_config('name', ...)` names its parameter, which is read back by name (one round trip;
/// custom ones, `app.x`, are not in `pg_settings` anyway); one whose name is not a plain
/// literal cannot be followed: its backend is closed after the session read. The session is
/// read whole (a costlier round trip: PostgreSQL builds all of `pg_settings`) only after a
/// write to `pg_settings`, a `set_config` that is not a readable call, or one of
/// `session_authorization` (which also resets the role).
fn mentioned_changes(text: &[u8], mut f: impl FnMut(ParameterChange)) {
    let seen = mentions(text);
    if seen.pg_settings {
        f(ParameterChange::Unknown);
    }
    if seen.set_config {
        let calls = set_config_calls(text);
        if calls.is_empty() {
            // Named but not called where the router can read it.
            f(ParameterChange::Unknown);
        }
        for call in calls {
            let bound = call.bound_lookup();
            if call.local {
                if let Some(bound) = bound {
                    f(bound);
                } else if let Some(value) = call.lookup_value {
                    f(lookup(&[
                        call.name.as_deref().unwrap_or("").as_bytes(),
                        value,
                    ]));
                }
                continue;
            }
            match call.name {
                Some(name) => {
                    if name == "session_authorization" {
                        f(ParameterChange::Unknown);
                    }
                    f(ParameterChange::Set(name))
                }
                None => f(ParameterChange::Untraceable),
            }
            // For the session, read back when the transaction ends; statements parsed after
            // it in the transaction are told apart by what its Bind gives.
            if let Some(bound) = bound {
                f(bound);
            }
        }
    }
    if seen.session_lock || seen.temp {
        f(ParameterChange::Residue);
    }
}

/// One `set_config(name, value, is_local)` call in a statement's text.
#[derive(Debug, PartialEq, Eq)]
struct SetConfigCall<'a> {
    /// Its first argument, if it is a plain string literal (`'app.x'`), in lower case; `None`
    /// for one that is not (a parameter, an expression).
    name: Option<String>,
    /// Its third argument is a literal true (`true`, `'on'`, ...): the value lasts for the
    /// transaction only.
    local: bool,
    /// Its second argument as written, if its name may be one of [`LOOKUP`] (one that is not
    /// a literal may be).
    lookup_value: Option<&'a [u8]>,
    /// The numbers of the statement's parameters its first and second arguments are, where
    /// they are one ([`parameter_number`]).
    name_parameter: Option<u16>,
    value_parameter: Option<u16>,
}

impl SetConfigCall<'_> {
    /// The [`ParameterChange::BoundLookup`] it is, if its name may be one of [`LOOKUP`] and
    /// its name or value is a parameter; a name neither literal nor a parameter (an
    /// expression) is not one: such a call is followed as written.
    fn bound_lookup(&self) -> Option<ParameterChange> {
        let value = self.lookup_value?;
        if self.name_parameter.is_none() && self.value_parameter.is_none() {
            return None;
        }
        let name = match (&self.name, self.name_parameter) {
            (Some(name), _) => Argument::Written(hash_of(&[name.as_bytes()])),
            (None, Some(number)) => Argument::Parameter(number),
            (None, None) => return None,
        };
        let value = match self.value_parameter {
            Some(number) => Argument::Parameter(number),
            None => Argument::Written(hash_of(&[value])),
        };
        Some(ParameterChange::BoundLookup(BoundLookup { name, value }))
    }
}

/// The number of the statement's parameter an argument is, if it is one: `$n`, or a cast of
/// it (`$1::text`, `$1 :: pg_catalog.varchar(63)`), whose value is decided by the parameter's
/// alone. Not an expression of it (`$1 || 'x'`).
fn parameter_number(arg: &[u8]) -> Option<u16> {
    let digits = arg.strip_prefix(b"$")?;
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    let number: u16 = std::str::from_utf8(&digits[..end]).ok()?.parse().ok()?;
    let cast = digits[end..].trim_ascii_start();
    let is_cast = cast.is_empty()
        || cast.strip_prefix(b"::").is_some_and(|types| {
            types
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b" \t\n\r_.\"()[]:".contains(b))
        });
    (number > 0 && is_cast).then_some(number)
}

/// Each `set_config(` call in `text`.
fn set_config_calls(text: &[u8]) -> Vec<SetConfigCall<'_>> {
    let mut calls = Vec::new();
    for at in memchr::memchr_iter(b'_', text) {
        let Some(start) = at.checked_sub(3) else {
            continue;
        };
        let end = start + b"set_config".len();
        let is_call = text
            .get(start..end)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"set_config"))
            && !ident(start.checked_sub(1).and_then(|i| text.get(i)))
            && !ident(text.get(end));
        if !is_call {
            continue;
        }
        let skip_space = |mut i: usize| {
            while text.get(i).is_some_and(|b| b.is_ascii_whitespace()) {
                i += 1;
            }
            i
        };
        let open = skip_space(end);
        if text.get(open) != Some(&b'(') {
            continue;
        }
        let quote = skip_space(open + 1);
        let args = call_arguments(text, open + 1);
        let local = args
            .as_ref()
            .and_then(|args| args.get(2))
            .is_some_and(|&(start, end)| literal_true(&text[start..end]));
        let name = literal_at(text, quote).map(|name| name.to_ascii_lowercase());
        let lookup_value = name
            .as_deref()
            .is_none_or(|name| LOOKUP.contains(&name))
            .then(|| {
                let value = args.as_ref().and_then(|args| args.get(1));
                value.map_or(&b""[..], |&(start, end)| &text[start..end])
            });
        let parameter = |at: usize| {
            let &(start, end) = args.as_ref()?.get(at)?;
            parameter_number(&text[start..end])
        };
        calls.push(SetConfigCall {
            name,
            local,
            lookup_value,
            name_parameter: parameter(0),
            value_parameter: parameter(1),
        });
    }
    calls
}

/// The arguments of the call whose `(` is just before `at`, as `(start, end)` ranges of
/// `text` trimmed of white space: split at the commas outside parentheses, brackets, string
/// literals, quoted identifiers and dollar quotes. `None` where the router does not read it
/// (a comment, or no closing parenthesis).
fn call_arguments(text: &[u8], at: usize) -> Option<Vec<(usize, usize)>> {
    let mut args = Vec::new();
    let mut depth = 0usize;
    let mut start = at;
    let mut i = at;
    let trimmed = |start: usize, end: usize| {
        let arg = &text[start..end];
        let from = arg.iter().position(|b| !b.is_ascii_whitespace());
        let to = arg.iter().rposition(|b| !b.is_ascii_whitespace());
        match (from, to) {
            (Some(from), Some(to)) => (start + from, start + to + 1),
            _ => (start, start),
        }
    };
    loop {
        match *text.get(i)? {
            b'\'' => {
                // `E'...'` takes backslash escapes; `''` is a quote in either. A backslash in
                // another string means what `standard_conforming_strings` says: not read.
                let escapes = i > 0 && text[i - 1].eq_ignore_ascii_case(&b'e');
                i += 1;
                loop {
                    match *text.get(i)? {
                        b'\\' if escapes => i += 2,
                        b'\\' => return None,
                        b'\'' if text.get(i + 1) == Some(&b'\'') => i += 2,
                        b'\'' => break,
                        _ => i += 1,
                    }
                }
            }
            b'"' => i += memchr::memchr(b'"', text.get(i + 1..)?)? + 1,
            // `$` inside an identifier (`a$b`) is part of it; a parameter is `$1`.
            b'$' if ident(i.checked_sub(1).and_then(|p| text.get(p))) => {}
            b'$' if !text.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                // A dollar quote: `$tag$ ... $tag$`.
                let tag_len = text.get(i + 1..)?.iter().position(|&b| b == b'$')? + 2;
                let tag = text.get(i..i + tag_len)?;
                let body = i + tag_len;
                i = body + memchr::memmem::find(text.get(body..)?, tag)? + tag_len - 1;
            }
            b'-' if text.get(i + 1) == Some(&b'-') => return None,
            b'/' if text.get(i + 1) == Some(&b'*') => return None,
            b'(' | b'[' => depth += 1,
            b']' => depth = depth.checked_sub(1)?,
            b')' if depth == 0 => {
                args.push(trimmed(start, i));
                return Some(args);
            }
            b')' => depth -= 1,
            b',' if depth == 0 => {
                args.push(trimmed(start, i));
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
}

/// True if `b` is a byte an identifier continues with (ASCII letters and digits, `_`, `$`).
fn ident(b: Option<&u8>) -> bool {
    b.is_some_and(|b| b.is_ascii_alphanumeric() || b"_$".contains(b))
}

/// True for an argument PostgreSQL reads as a boolean true: the keyword `true`, or a string
/// literal `parse_bool` takes as true (`'t'`, `'on'`, `'yes'`, `'1'`, ...).
fn literal_true(arg: &[u8]) -> bool {
    if arg.eq_ignore_ascii_case(b"true") {
        return true;
    }
    let Some(value) = arg
        .strip_prefix(b"'")
        .and_then(|rest| rest.strip_suffix(b"'"))
    else {
        return false;
    };
    let value = value.trim_ascii();
    ["t", "tr", "tru", "true", "y", "ye", "yes", "on", "1"]
        .iter()
        .any(|word| value.eq_ignore_ascii_case(word.as_bytes()))
}

/// The standard string literal starting at `at` (`'...'`, `''` for a quote), if there is one.
fn literal_at(text: &[u8], at: usize) -> Option<String> {
    if text.get(at) != Some(&b'\'') {
        return None;
    }
    let mut value = Vec::new();
    let mut i = at + 1;
    loop {
        match text.get(i)? {
            b'\'' if text.get(i + 1) == Some(&b'\'') => {
                value.push(b'\'');
                i += 2;
            }
            b'\'' => return String::from_utf8(value).ok(),
            b => {
                value.push(*b);
                i += 1;
            }
        }
    }
}

/// The parameter change a statement makes, if it makes one (see [`ParameterChange`]).
fn parameter_change(statement: &str) -> Option<ParameterChange> {
    // Bytes, not characters: the text may have any UTF-8 after the first letters.
    let first = statement.as_bytes().get(..5)?;
    if !(first.eq_ignore_ascii_case(b"reset") || first[..3].eq_ignore_ascii_case(b"set")) {
        return None;
    }
    // The first words, with `=` one of its own: a handful decide.
    let mut words: [&str; 6] = [""; 6];
    let mut count = 0;
    let mut more = false;
    'split: for piece in statement.split(|c: char| c.is_ascii_whitespace() || c == '\u{b}') {
        let mut rest = piece;
        while !rest.is_empty() {
            let word = match rest.find('=') {
                Some(0) => &rest[..1],
                Some(at) => &rest[..at],
                None => rest,
            };
            rest = &rest[word.len()..];
            if count == words.len() {
                more = true;
                break 'split;
            }
            words[count] = word;
            count += 1;
        }
    }
    let words = &words[..count];
    let is = |word: &str, keyword: &str| word.eq_ignore_ascii_case(keyword);
    let reset = |name: String| Some(ParameterChange::Reset(name));
    // The role is read back by name (`SET ROLE` takes a role name or NONE, `RESET ROLE` and
    // `SET role TO DEFAULT` go back to the session's default), and so are the transaction
    // characteristics. The session authorization: only a read of the whole session knows what
    // it became (`SET SESSION AUTHORIZATION` also resets the role).
    match words {
        [reset_, role] if is(reset_, "reset") && is(role, "role") => {
            return Some(ParameterChange::Reset("role".into()))
        }
        [reset_, session, authorization]
            if is(reset_, "reset")
                && is(session, "session")
                && is(authorization, "authorization") =>
        {
            // Back to the login role, which takes the role back to the session's default
            // too (PostgreSQL's session authorization reset); the authorization is reported.
            return Some(ParameterChange::Reset("role".into()));
        }
        [set, session, characteristics, ..]
            if is(set, "set")
                && is(session, "session")
                && is(characteristics, "characteristics") =>
        {
            return Some(ParameterChange::Characteristics);
        }
        [set, rest @ ..] if is(set, "set") => {
            // `SET LOCAL` ends with the transaction: nothing to follow.
            let (local, rest) = match rest {
                [local, rest @ ..] if is(local, "local") => (true, rest),
                [session, next, ..] if is(session, "session") && !is(next, "authorization") => {
                    (false, &rest[1..])
                }
                _ => (false, rest),
            };
            match rest {
                [role, first, more @ ..] if is(role, "role") => {
                    let value = match more {
                        [value, ..] if is(first, "to") || *first == "=" => value,
                        _ => first,
                    };
                    let name = || "role".into();
                    return match (local, is(value, "default")) {
                        (true, _) => Some(lookup(&[statement.as_bytes()])),
                        (false, true) => Some(ParameterChange::Reset(name())),
                        (false, false) => Some(ParameterChange::Set(name())),
                    };
                }
                [session, authorization, value, ..]
                    if is(session, "session") && is(authorization, "authorization") =>
                {
                    return match (local, is(value, "default")) {
                        (true, _) => Some(lookup(&[statement.as_bytes()])),
                        // As `RESET SESSION AUTHORIZATION`.
                        (false, true) => Some(ParameterChange::Reset("role".into())),
                        (false, false) => Some(ParameterChange::Unknown),
                    };
                }
                _ => {}
            }
        }
        _ => {}
    }
    match words {
        _ if more => {}
        [reset_, time, zone] if is(reset_, "reset") && is(time, "time") && is(zone, "zone") => {
            return reset("timezone".into());
        }
        [reset_, name] if is(reset_, "reset") => {
            let not = ["all", "role", "session"];
            return (!not.iter().any(|n| is(name, n)))
                .then(|| ParameterChange::Reset(unquote(name)));
        }
        [set, rest @ ..] if is(set, "set") => {
            let rest = match rest {
                [scope, rest @ ..] if is(scope, "session") || is(scope, "local") => rest,
                _ => rest,
            };
            match rest {
                [time, zone, value]
                    if is(time, "time")
                        && is(zone, "zone")
                        && (is(value, "default") || is(value, "local")) =>
                {
                    return reset("timezone".into());
                }
                [names, value] if is(names, "names") && is(value, "default") => {
                    return reset("client_encoding".into());
                }
                [name, to, value]
                    if (is(to, "to") || *to == "=")
                        && is(value, "default")
                        && !is(name, "role")
                        && !is(name, "session") =>
                {
                    return reset(unquote(name));
                }
                _ => {}
            }
        }
        _ => {}
    }
    // A new value: `SET [SESSION] name {TO | =} ...` or `SET SCHEMA ...`.
    let rest = match words {
        [set, rest @ ..] if is(set, "set") => rest,
        _ => return None,
    };
    let rest = match rest {
        // Over with the transaction: only where names are looked up matters until then.
        [local, name, ..] if is(local, "local") => {
            let sets_lookup = is(name, "schema") || unquote(name) == "search_path";
            return sets_lookup.then(|| lookup(&[statement.as_bytes()]));
        }
        [local, ..] if is(local, "local") => return None,
        [session, name, ..] if is(session, "session") && !is(name, "authorization") => &rest[1..],
        _ => rest,
    };
    match rest {
        [schema, _, ..] if is(schema, "schema") => Some(ParameterChange::Set("search_path".into())),
        [name, to, _, ..] if is(to, "to") || *to == "=" => {
            // `seed` reads back as `unavailable`, which no SET takes: not followed (it only
            // starts random()'s sequence, which no other backend would continue anyway).
            // Nor the `transaction_*` ones: a transaction's own, which no `set_config` takes
            // back outside a transaction's start.
            let not = [
                "role",
                "session",
                "transaction",
                "constraints",
                "time",
                "names",
                "seed",
                "transaction_isolation",
                "transaction_read_only",
                "transaction_deferrable",
            ];
            (!not.iter().any(|n| is(name, n))).then(|| ParameterChange::Set(unquote(name)))
        }
        _ => None,
    }
}

/// The parameter changes in a Parse's query text (see [`ParameterChange`]); only a text that
/// starts like one is read.
pub fn parse_parameter_changes(body_after_name: &[u8], mut f: impl FnMut(ParameterChange)) {
    let end = memchr::memchr(0, body_after_name).unwrap_or(body_after_name.len());
    let text = &body_after_name[..end];
    mentioned_changes(text, &mut f);
    let Some(&first) = text
        .iter()
        .find(|b| !(b.is_ascii_whitespace() || **b == 0x0b))
    else {
        return;
    };
    if !matches!(
        first,
        b's' | b'S' | b'r' | b'R' | b'p' | b'P' | b'd' | b'D' | b'-' | b'/'
    ) {
        return;
    }
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    for_each_statement(text, |statement| {
        let first = statement.split_ascii_whitespace().next().unwrap_or("");
        // Statements a Parse runs as any other (the simple protocol's are handled where the
        // router sees them): what they did is read back.
        if ["prepare", "deallocate", "discard"]
            .iter()
            .any(|k| first.eq_ignore_ascii_case(k))
            || (first.eq_ignore_ascii_case("reset")
                && statement
                    .split_ascii_whitespace()
                    .nth(1)
                    .is_some_and(|w| w.eq_ignore_ascii_case("all")))
        {
            f(ParameterChange::Unknown);
        } else if let Some(change) = parameter_change(statement) {
            f(change);
        }
    });
}

/// An SQL identifier as PostgreSQL reads it: quoted as written, otherwise folded to lower case.
fn unquote(name: &str) -> String {
    match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None => name.to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_split_outside_quotes_and_comments() {
        assert_eq!(
            statements("select 1; -- a; comment\n /* a; /* nested; */ */ select ';' ; ;"),
            ["select 1", "select ';'"]
        );
        assert_eq!(
            statements("select $$a;b$$, $tag$ ; $tag$, $1; select E'\\';' , \"x;\"\"y\""),
            [
                "select $$a;b$$, $tag$ ; $tag$, $1",
                "select E'\\';' , \"x;\"\"y\""
            ]
        );
        assert_eq!(statements("  "), Vec::<&str>::new());
        // Found by the fuzzer: a vertical tab is a space to PostgreSQL, not a statement.
        assert_eq!(statements("\u{b}\t;select 1\u{b}"), ["select 1"]);
    }

    #[test]
    fn deallocate_and_discard() {
        let facts = |text: &str| query_facts(format!("{text}\0").as_bytes());
        assert!(facts("DEALLOCATE ALL").clears_statements);
        assert!(facts("deallocate prepare all;").clears_statements);
        assert_eq!(facts("DEALLOCATE \"S1\"").deallocate.as_deref(), Some("S1"));
        assert_eq!(facts("DEALLOCATE S1").deallocate.as_deref(), Some("s1"));
        assert_eq!(facts("select 1; DEALLOCATE S1").deallocate, None);
        let discard = facts("select 1; discard all");
        assert!(discard.clears_statements && discard.resets == Resets::Session);
        assert_eq!(discard.changes, [ParameterChange::Unknown], "read back");
        // Alone, it leaves the session as it starts: nothing to read back.
        let discard = facts(" Discard  ALL ;");
        assert!(discard.clears_statements && discard.resets == Resets::Session);
        assert!(discard.changes.is_empty());
        assert_eq!(facts("RESET ALL").resets, Resets::Parameters);
        assert!(facts("RESET ALL").changes.is_empty());
        assert_eq!(facts("RESET TimeZone").resets, Resets::Nothing);
        // Npgsql's reset of a connection that has prepared statements.
        let npgsql = facts(
            "SET SESSION AUTHORIZATION DEFAULT;RESET ALL;CLOSE ALL;UNLISTEN *;\
             SELECT pg_advisory_unlock_all();DISCARD SEQUENCES;DISCARD TEMP",
        );
        assert_eq!(npgsql.resets, Resets::Parameters);
        assert!(!npgsql.clears_statements);
        assert_eq!(npgsql.changes, [ParameterChange::Reset("role".into())]);
        // asyncpg's, at each release of a pooled connection.
        let asyncpg =
            facts("SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;");
        assert_eq!(asyncpg.resets, Resets::Parameters);
        assert!(asyncpg.changes.is_empty());
        for undone in [
            "RESET ALL; ROLLBACK",
            "begin; reset all",
            "reset all; commit; select 1/0",
        ] {
            assert_eq!(
                facts(undone).changes,
                [ParameterChange::Unknown],
                "{undone}"
            );
        }
        let reset = |name: &str| ParameterChange::Reset(name.into());
        let set = |name: &str| ParameterChange::Set(name.into());
        assert_eq!(facts("RESET TimeZone").changes, [reset("timezone")]);
        assert_eq!(
            facts(
                "begin; SET application_name=DEFAULT; set local \"DateStyle\" to default; commit"
            )
            .changes,
            [reset("application_name"), reset("DateStyle")]
        );
        assert_eq!(facts("reset time zone").changes, [reset("timezone")]);
        assert_eq!(
            facts("SET SESSION TIME ZONE LOCAL").changes,
            [reset("timezone")]
        );
        assert_eq!(
            facts("SET NAMES DEFAULT").changes,
            [reset("client_encoding")]
        );
        assert_eq!(facts("RESET search_path").changes, [reset("search_path")]);
        assert_eq!(
            facts("SET search_path TO a, b, c, d, e, f; set session statement_timeout='5s'")
                .changes,
            [set("search_path"), set("statement_timeout")]
        );
        assert_eq!(facts("SET SCHEMA 'app'").changes, [set("search_path")]);
        assert_eq!(facts("SET TimeZone TO UTC").changes, [set("timezone")]);
        assert_eq!(
            facts("SET application_name = default, x").changes,
            [set("application_name")]
        );
        // The role, read back by name.
        for (text, change) in [
            ("SET ROLE bob", set("role")),
            ("set session role 'bob'", set("role")),
            ("SET ROLE NONE", set("role")),
            ("set role = bob", set("role")),
            ("SET role TO \"default\"", set("role")),
            ("RESET ROLE", ParameterChange::Reset("role".into())),
            ("SET role TO DEFAULT", ParameterChange::Reset("role".into())),
            (
                "set session role = default",
                ParameterChange::Reset("role".into()),
            ),
            (
                "RESET SESSION AUTHORIZATION",
                ParameterChange::Reset("role".into()),
            ),
            (
                "SET SESSION AUTHORIZATION DEFAULT",
                ParameterChange::Reset("role".into()),
            ),
        ] {
            assert_eq!(facts(text).changes, [change], "{text}");
        }
        assert_eq!(
            facts("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE")
                .changes,
            [ParameterChange::Characteristics]
        );
        // For the transaction only: where the names of statements parsed after it are
        // looked up.
        for local in [
            "SET LOCAL ROLE bob",
            "set local role to default",
            "SET LOCAL SESSION AUTHORIZATION bob",
            "SET LOCAL search_path TO a",
            "set local \"search_path\" = a, b",
            "SET LOCAL SCHEMA 'a'",
        ] {
            let changes = facts(local).changes;
            assert!(
                matches!(changes[..], [ParameterChange::Lookup(_)]),
                "{local}"
            );
        }
        // Told apart by what they set, as written.
        let lookups = |text| facts(text).changes;
        assert_ne!(
            lookups("SET LOCAL search_path TO a"),
            lookups("SET LOCAL search_path TO b")
        );
        assert_eq!(
            lookups("SET LOCAL search_path TO a"),
            lookups("SET LOCAL search_path TO a")
        );
        assert!(facts("SET LOCAL work_mem = '1MB'").changes.is_empty());
        assert!(!ParameterChange::Set("work_mem".into()).changes_lookup());
        assert!(ParameterChange::Set("search_path".into()).changes_lookup());
        assert!(ParameterChange::Reset("role".into()).changes_lookup());
        // Changes only a read of the whole session can follow.
        for unknown in [
            "RESET ALL; END",
            "SET SESSION AUTHORIZATION bob",
            "set session session authorization bob",
            "update PG_SETTINGS set setting = '1' where name = 'work_mem'",
            "DISCARD ALL; select 1",
            "deallocate x; select 1",
        ] {
            assert_eq!(
                facts(unknown).changes.first(),
                Some(&ParameterChange::Unknown),
                "{unknown}"
            );
        }
        assert!(facts("DEALLOCATE x").changes.is_empty());
        assert_eq!(
            facts("select set_config('App.Tenant', '42', false), SET_CONFIG ( 'it''s', 'x', $3)")
                .changes,
            [set("app.tenant"), set("it's")]
        );
        assert_eq!(
            facts("select set_config($1, $2, false)").changes,
            [
                ParameterChange::Untraceable,
                bound(Argument::Parameter(1), Argument::Parameter(2))
            ]
        );
        // For the transaction only: nothing outlives it (PostgREST's every request), but what
        // its Bind gives decides where names are looked up.
        let postgrest = facts(
            "select set_config('search_path', $1, true), set_config('role', $2::text, true), \
             set_config('request.jwt.claims', $3, TRUE)",
        );
        let [search_path, role] = ["search_path", "role"].map(|name| {
            bound(
                Argument::Written(hash_of(&[name.as_bytes()])),
                Argument::Parameter(if name == "role" { 2 } else { 1 }),
            )
        });
        assert_eq!(postgrest.changes, [search_path.clone(), role]);
        assert_eq!(
            facts("select set_config($1, $2, true)").changes,
            [bound(Argument::Parameter(1), Argument::Parameter(2))],
            "a name the router cannot read may be search_path's"
        );
        assert_eq!(
            facts("select set_config($1, 'a', true)").changes,
            [bound(
                Argument::Parameter(1),
                Argument::Written(hash_of(&[b"'a'"]))
            )],
        );
        assert_eq!(
            facts("select set_config('search_path', $1, false)").changes,
            [set("search_path"), search_path]
        );
        // An expression of a parameter is followed as written, as before.
        for written in [
            "select set_config('search_path', $1 || ', public', true)",
            "select set_config('search_path', lower($1), true)",
            "select set_config('search_path', $1::text || $2, true)",
        ] {
            assert!(
                matches!(facts(written).changes[..], [ParameterChange::Lookup(_)]),
                "{written}"
            );
        }
        assert_ne!(
            lookups("select set_config('search_path', 'a', true)"),
            lookups("select set_config('search_path', 'b', true)")
        );
        assert_ne!(
            lookups("select set_config('search_path', 'a', true)"),
            lookups("select set_config('role', 'a', true)")
        );
        for local in [
            "select pg_catalog.set_config('a.b', format('%s,(%s', $1, ')'), 'on')",
            "select set_config('a.b', E'it\\'s, (', ' t ')",
            "select set_config('a.b', $q$), 'x$q$, 'yes')",
            "select set_config('a.b', (array['x', 'y'])[1], '1')",
        ] {
            assert!(facts(local).changes.is_empty(), "{local}");
        }
        for (session, changes) in [
            ("select set_config('a.b', 'x', $3)", vec![set("a.b")]),
            (
                "select pg_catalog.set_config('statement_timeout', '1', false)",
                vec![set("statement_timeout")],
            ),
            ("select set_config('a.b', 'x', 'off')", vec![set("a.b")]),
            (
                "select set_config('a.b', 'x' -- comment\n, true)",
                vec![set("a.b")],
            ),
            ("select set_config('a.b', 'x', true", vec![set("a.b")]),
            // With `standard_conforming_strings` off the string ends later: not read.
            (
                "select set_config('a.b', 'x\\', true)', false)",
                vec![set("a.b")],
            ),
            (
                "select set_config('a.b', x$y$, true) from (select 1 as x$y$) s",
                vec![],
            ),
            (
                "select set_config('session_authorization', 'x', false)",
                vec![ParameterChange::Unknown, set("session_authorization")],
            ),
            (
                "update pg_settings set setting = '1' where name = 'work_mem'",
                vec![ParameterChange::Unknown],
            ),
            ("select 'set_config' as f", vec![ParameterChange::Unknown]),
        ] {
            assert_eq!(facts(session).changes, changes, "{session}");
        }
        for locking in [
            "select pg_advisory_lock(1)",
            "SELECT PG_TRY_ADVISORY_LOCK(1, 2)",
            "select pg_catalog.pg_advisory_lock_shared($1)",
        ] {
            assert_eq!(
                facts(locking).changes,
                [ParameterChange::Residue],
                "{locking}"
            );
        }
        for not_locking in [
            "select pg_advisory_xact_lock(1)",
            "select pg_advisory_unlock(1)",
            "select my_advisory_lock_table from t",
        ] {
            assert!(facts(not_locking).changes.is_empty(), "{not_locking}");
        }
        // Temporary tables whose reply is `SELECT n`.
        for temporary in [
            "create temp table t as select 1",
            "CREATE GLOBAL TEMPORARY TABLE t AS SELECT 1",
            "create\n\tlocal temp table t as table u",
            "select * into temp t from u",
            "SELECT 1 AS a INTO TEMPORARY TABLE t",
            "create table pg_temp.t as select 1",
            "select * into PG_TEMP_3.t from u",
            "create temp table t (a int)",
        ] {
            assert_eq!(
                facts(temporary).changes,
                [ParameterChange::Residue],
                "{temporary}"
            );
        }
        for not_temporary in [
            "select temp from weather",
            "select t.temp, temperature from t",
            "create table temps as select 1",
            "select * into t from tempt",
            "select my_pg_temp, pg_temporal from t",
            "insert into attempt values (1)",
        ] {
            assert!(facts(not_temporary).changes.is_empty(), "{not_temporary}");
        }
        for not in [
            "SET seed = 0.5",
            "select 'user_config', set_configuration from t",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET CONSTRAINTS ALL DEFERRED",
            "SET TIME ZONE 'UTC'",
            "SET NAMES 'LATIN1'",
            "SELECT 'RESET TimeZone'",
            "settle",
            "RESET",
            // Found by the fuzzer: a multi-byte character among the first five bytes.
            "sRïelect 1",
            "seï",
        ] {
            assert!(facts(not).changes.is_empty(), "{not}");
        }
        let mut parsed = Vec::new();
        parse_parameter_changes(b"  reset \"TimeZone\"\0\0\0", |c| parsed.push(c));
        parse_parameter_changes(b"select 1\0\0\0", |c| parsed.push(c));
        parse_parameter_changes(b"SET search_path = app\0\0\0", |c| parsed.push(c));
        assert_eq!(parsed, [reset("TimeZone"), set("search_path")]);
        let mut parsed = Vec::new();
        parse_parameter_changes(b"set role bob\0\0\0", |c| parsed.push(c));
        assert_eq!(parsed, [set("role")]);
        let mut parsed = Vec::new();
        parse_parameter_changes(
            b"with x as (select set_config('a.b', '1', false)) select 1\0\0\0",
            |c| parsed.push(c),
        );
        assert_eq!(parsed, [set("a.b")]);
        for text in [
            &b"update pg_settings set setting = '1' where name = 'work_mem'\0\0\0"[..],
            b"DEALLOCATE ALL\0\0\0",
            b"prepare p as select 1\0\0\0",
            b"discard all\0\0\0",
            b"reset all\0\0\0",
            b"set session authorization bob\0\0\0",
        ] {
            let mut parsed = Vec::new();
            parse_parameter_changes(text, |c| parsed.push(c));
            assert_eq!(parsed.first(), Some(&ParameterChange::Unknown), "{text:?}");
        }
        assert!(facts("PREPARE p AS select 1").prepare);
        assert!(facts("select 'first'; PREPARE p3 AS select 3").prepare);
        assert!(facts("/* hidden */ prepare p as select 1").prepare);
        assert!(!facts("select 'prepare p as select 1'").prepare);
    }

    fn bound(name: Argument, value: Argument) -> ParameterChange {
        ParameterChange::BoundLookup(BoundLookup { name, value })
    }

    /// A Bind's body past its two names: `params` in the text format.
    fn bind_rest(params: &[Option<&str>]) -> Vec<u8> {
        let mut rest = 0u16.to_be_bytes().to_vec();
        rest.extend_from_slice(&(params.len() as u16).to_be_bytes());
        for param in params {
            match param {
                Some(value) => {
                    rest.extend_from_slice(&(value.len() as i32).to_be_bytes());
                    rest.extend_from_slice(value.as_bytes());
                }
                None => rest.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        rest.extend_from_slice(&0u16.to_be_bytes());
        rest
    }

    #[test]
    fn set_config_arguments_that_are_parameters() {
        for (arg, number) in [
            ("$1", Some(1)),
            ("$12", Some(12)),
            ("$2::text", Some(2)),
            ("$2 :: pg_catalog.varchar(63)", Some(2)),
            ("$3::regnamespace::text", Some(3)),
            ("$0", None),
            ("$70000", None),
            ("$", None),
            ("$1 || 'x'", None),
            ("$1::text || $2", None),
            ("'$1'", None),
            ("x$1", None),
        ] {
            assert_eq!(parameter_number(arg.as_bytes()), number, "{arg}");
        }
    }

    #[test]
    fn bound_lookups_hash_what_the_bind_gives() {
        let [(_, by_name), (_, by_parameter)] = [
            "select set_config('search_path', $1, true)",
            "select set_config($2, $1, true)",
        ]
        .map(|text| {
            let changes = query_facts(format!("{text}\0").as_bytes()).changes;
            let [ParameterChange::BoundLookup(bound)] = changes[..] else {
                panic!("{text}: {changes:?}");
            };
            (text, bound)
        });
        let hash = |bound: BoundLookup, params: &[Option<&str>]| bound.hash(&bind_rest(params));
        // The value bound decides; the name, bound or written, is the same name.
        let a = hash(by_name, &[Some("tenant_a")]);
        assert!(matches!(a, Ok(Some(_))));
        assert_eq!(a, hash(by_name, &[Some("tenant_a")]));
        assert_ne!(a, hash(by_name, &[Some("tenant_b")]));
        assert_ne!(a, hash(by_name, &[None]));
        assert_eq!(
            a,
            hash(by_parameter, &[Some("tenant_a"), Some("Search_Path")])
        );
        assert_ne!(a, hash(by_parameter, &[Some("tenant_a"), Some("role")]));
        // A name bound to another parameter sets nothing names are looked up by.
        assert_eq!(
            hash(by_parameter, &[Some("x"), Some("request.jwt.claims")]),
            Ok(None)
        );
        // Not in the Bind: too few parameters, or cut short.
        assert!(hash(by_parameter, &[Some("x")]).is_err());
        let rest = bind_rest(&[Some("tenant_a")]);
        assert!(by_name.hash(&rest[..rest.len() - 4]).is_err());
        assert!(by_name.hash(&[]).is_err());
    }
}
