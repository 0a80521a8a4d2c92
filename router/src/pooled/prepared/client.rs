//! A pooled client's named statements: its names, its unnamed statement, what it was told.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::rc::Rc;

use sha2::{Digest, Sha256};

use crate::pooled::query_text::parse_parameter_changes;
use crate::protocol::frame::HEADER_BYTES;
use crate::protocol::frontend as fe;

use super::statement::parse_clock;
use super::*;

/// Named statements one pooled client may have at once ([`ClientStatements::has_room`]).
pub const MAX_CLIENT_STATEMENTS: usize = 10_000;
/// Bytes one pooled client's named statements may take, at most: each is kept for the
/// client's life (a Parse may be up to 1 MiB, so 10,000 of them could be 10 GiB).
pub const MAX_CLIENT_STATEMENT_BYTES: usize = 4 * 1024 * 1024;

/// What one named statement costs its client's budget: its name and Parse message, and about
/// what the map entry and the shared statement take besides.
pub(super) fn statement_cost(name: &str, statement: &Statement) -> usize {
    const OVERHEAD: usize = 96;
    name.len() + statement.parse.len() + OVERHEAD
}

/// A client's statements, by its own names.
#[derive(Debug, Default)]
pub struct ClientStatements {
    pub(super) named: HashMap<Box<str>, Rc<Statement>>,
    /// Bytes of the names and Parse messages in `named`.
    pub(super) bytes: usize,
    /// The last unnamed statement (its Parse, unchanged), if it was small enough to keep.
    pub(super) unnamed: Option<Rc<Statement>>,
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
    /// [`ParameterChange::lookup_hash`]: crate::pooled::query_text::ParameterChange::lookup_hash
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
    pub(super) fn statement(&self, after_name: &[u8], texts: &SharedTexts) -> Rc<Statement> {
        self.statement_named(&self.server_name(after_name), after_name, texts)
    }

    /// The name on backends of the statement a Parse with `after_name` prepares.
    pub(super) fn server_name(&self, after_name: &[u8]) -> Box<str> {
        server_name(&self.context, after_name)
    }

    /// [`ClientStatements::statement`], its `server_name` known.
    pub(super) fn statement_named(
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
    pub(super) fn has_room(&self, more: usize, bytes: usize) -> bool {
        self.named.len() + more <= MAX_CLIENT_STATEMENTS
            && self.bytes + bytes <= MAX_CLIENT_STATEMENT_BYTES
    }

    /// Keeps `statement` under the client's `name` (not in use).
    pub(super) fn insert(&mut self, name: Box<str>, statement: Rc<Statement>) {
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

/// The name a statement has on the backends: `bg_` and 32 hex digits of the SHA-256 of the
/// client's naming context and the Parse after its name.
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
