//! A backend's statements: the plans it has, what the router knows of them, and the LRU bound.

use std::collections::HashMap;

use super::statement::parse_clock;

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
    /// Its row shape ([`row_shape`](super::row_shape)), once a Describe told it.
    pub shape: Option<u64>,
    /// Its parameter types ([`parameter_types`](super::parameter_types)): those a Parse of
    /// the router's spelled out, or those a Describe told.
    pub types: Option<u64>,
    /// When the Parse that made it was sent ([`parse_clock`]); 0 if not known (a Close of it
    /// the backend skipped).
    pub parsed: u64,
}

/// What a backend's answer to a Describe of a named statement told of its plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Described {
    /// Its row shape ([`row_shape`](super::row_shape)).
    Shape(u64),
    /// Its parameter types ([`parameter_types`](super::parameter_types)).
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
    pub(super) fn touch(&mut self, name: &str) -> Option<Plan> {
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
    pub(super) fn prepared_again(&mut self, name: &str, types: Option<u64>) -> Plan {
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
    pub(super) fn make_room(&mut self, max: usize) -> Option<Box<str>> {
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
    pub(super) fn insert(&mut self, name: &str, types: Option<u64>) -> Plan {
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
