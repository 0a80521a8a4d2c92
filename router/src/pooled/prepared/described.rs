//! What a Describe told: row shapes, parameter types, and a Parse with the told types spelled
//! out.

use std::hash::{Hash, Hasher};
use std::rc::Rc;

use crate::protocol::backend as be;
use crate::protocol::frame::HEADER_BYTES;
use crate::protocol::frontend as fe;
use crate::protocol::reader::Reader;

use super::*;

/// What `parse` (a whole Parse message) with the parameter types of `description` (a
/// ParameterDescription body) in place of its own is made of, if it left any to the server
/// (fewer types, or 0) and the result is at most twice its size; `None` otherwise, or if
/// either does not read.
pub(super) fn pinned_parts<'a>(parse: &'a [u8], description: &'a [u8]) -> Option<PinnedParse<'a>> {
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
pub(super) struct PinnedParse<'a> {
    name: &'a [u8],
    query: &'a [u8],
    count: i16,
    types: &'a [u8],
    /// The whole message's.
    len: usize,
}

impl PinnedParse<'_> {
    pub(super) fn write(&self, out: &mut Vec<u8>) {
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
pub(super) fn pin_parameter_types(parse: &[u8], description: &[u8]) -> Option<Vec<u8>> {
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

/// Takes in what a backend's Describes told ([`Transaction::take_described`]): the client
/// keeps the first row shape it was told of each statement (its parameter types were kept as
/// they came, [`Statement::told_parameters`]), the backend's plan what it was prepared with.
///
/// [`Transaction::take_described`]: crate::pooled::transaction::Transaction::take_described
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
pub(super) fn differ(told: Option<u64>, has: Option<u64>) -> bool {
    matches!((told, has), (Some(told), Some(has)) if told != has)
}
