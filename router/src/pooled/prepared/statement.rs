//! A statement as backends know it, the clock that orders Parses, and the texts a pool's
//! clients share.

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashSet;
use std::num::NonZeroU64;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::pooled::query_text::{parse_parameter_changes, ParameterChange};
use crate::protocol::frame::HEADER_BYTES;

use super::described::pinned_parts;
use super::*;

/// One statement as backends know it, as one client prepared it.
#[derive(Debug, PartialEq, Eq)]
pub struct Statement {
    /// The Parse message that prepares it on a backend, under its name there
    /// ([`Statement::server_name`]): one copy for all the clients of a pool that prepared
    /// the same ([`SharedTexts`]).
    pub(super) parse: Rc<[u8]>,
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
    pub(super) stale: Cell<bool>,
    /// When the client parsed it ([`parse_clock`]; 0 for the unnamed statement, which is
    /// always sent as parsed).
    pub(super) parsed: u64,
    /// A backend's plan parsed after the client's Parse has run it ([`Translator::ensure`]):
    /// what the client was told of it is what PostgreSQL told a Parse then.
    pub(super) settled: Cell<bool>,
}

/// Parses of named statements, counted across every pool: a client's statement is parsed
/// after a backend's plan of the same text if its count is higher ([`Plan::parsed`]).
static PARSES: AtomicU64 = AtomicU64::new(0);

/// The next Parse's place in the order of all of them (never 0).
pub(super) fn parse_clock() -> u64 {
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
    pub(super) fn new(parse: Rc<[u8]>, changes_parameters: bool, parsed: u64) -> Statement {
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
    pub(super) fn tell_shape(&self, shape: u64) {
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
    pub(super) fn parameter_changes(&self, f: impl FnMut(ParameterChange)) {
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
pub(super) const SWEEP_MIN_TEXTS: usize = 1024;
const SWEEP_MIN_BYTES: usize = 1024 * 1024;

impl SharedTexts {
    /// The pool's copy of `parse`.
    pub(super) fn share(&self, parse: Vec<u8>) -> Rc<[u8]> {
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
