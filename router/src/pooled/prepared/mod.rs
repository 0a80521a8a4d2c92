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
//! ([`Resolved::Check`](translator::Resolved::Check)), before anything of the client's runs
//! there. Once a change is found, every backend of the pool drops its statements
//! ([`BackendStatements::behind`]), so a statement prepared after the DDL never meets an old
//! plan.
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

// Where each part lives: `statement` (a statement, the Parse clock, the shared texts),
// `client` (a client's names), `backend` (a backend's plans), `described` (what a Describe
// told), `translator` (the client's messages rewritten for its backend), `without_backend`
// (Parse and Close answered between transactions).
mod backend;
mod client;
mod described;
mod statement;
mod translator;
mod without_backend;

#[cfg(test)]
mod tests;

pub use backend::{BackendStatements, Described, Plan};
pub use client::{ClientStatements, MAX_CLIENT_STATEMENTS, MAX_CLIENT_STATEMENT_BYTES};
pub use described::{apply_described, parameter_types, row_shape};
pub use statement::{SharedTexts, Statement};
pub use translator::{
    refuse, Malformed, Taken, Transient, Translator, MAX_GATHERED_BYTES, REFUSAL_SQL,
};
pub use without_backend::{answer_idle, KnownGood};

/// Longest statement or portal name accepted (PostgreSQL has no limit; clients use short ones).
pub const MAX_NAME_BYTES: usize = 512;

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
