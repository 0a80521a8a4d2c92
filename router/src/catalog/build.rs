//! Building a [`Catalog`] branch by branch, with every check a catalog must pass.
//!
//! Both sources go through here: the TOML file ([`Catalog::parse`]) and etcd's keys
//! ([`super::etcd::layout`]). Each check returns only a message; the source says where the
//! value was (a line of the file, an etcd key), so the two report errors in their own terms
//! while accepting and refusing exactly the same catalogs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use super::{is_branch_id, role_name_problem, Branch, Catalog};
use crate::auth::verifier::{ScramVerifier, VerifierShape};
use crate::config::PoolOverrides;

/// Branches checked so far, in the order added.
#[derive(Default)]
pub(crate) struct Builder {
    /// In the order added (a file's order; etcd's key order).
    branches: Vec<Branch>,
    /// Branch id -> index into `branches`: duplicates are refused.
    by_id: HashMap<Box<str>, usize>,
}

/// One branch being built: its id and primary are checked, replicas, roles and pool settings are
/// added, then [`Builder::add`] takes it.
pub(crate) struct BranchDraft {
    /// The checked branch id.
    id: Box<str>,
    /// The primary's address.
    primary: SocketAddr,
    /// Replicas added so far, none twice, none the primary.
    replicas: Vec<SocketAddr>,
    /// Roles added so far, each with its parsed verifier.
    roles: HashMap<Box<str>, Arc<ScramVerifier>>,
    /// `[branch.pool]`, checked by its parser.
    pool: PoolOverrides,
}

/// What is wrong with a role: its name, or its verifier (each source points at a different
/// place for either).
#[derive(Debug)]
pub(crate) enum RoleProblem {
    /// The role name cannot be used, or is there twice.
    Name(String),
    /// The verifier does not parse.
    Verifier(String),
}

impl Builder {
    /// Starts branch `id`: a well-formed id the catalog does not have yet.
    pub(crate) fn branch(&self, id: &str, primary: SocketAddr) -> Result<BranchDraft, String> {
        if !is_branch_id(id) {
            return Err(format!(
                "branch id {id:?} must be 1 to 63 characters of a-z, 0-9, _ and -"
            ));
        }
        if self.by_id.contains_key(id) {
            return Err(format!("duplicate branch id {id:?}"));
        }
        Ok(BranchDraft {
            id: id.into(),
            primary,
            replicas: Vec::new(),
            roles: HashMap::new(),
            pool: PoolOverrides::default(),
        })
    }

    /// Adds a finished branch.
    pub(crate) fn add(&mut self, draft: BranchDraft) {
        self.by_id.insert(draft.id.clone(), self.branches.len());
        self.branches.push(Branch {
            id: draft.id,
            primary: draft.primary,
            replicas: draft.replicas.into(),
            pool: draft.pool,
            roles: draft.roles,
            mock_shape: VerifierShape::DEFAULT,
        });
    }

    /// The catalog: each branch's fake-verifier shape is that of most of its roles, else that
    /// of most roles in the catalog.
    pub(crate) fn finish(self) -> Catalog {
        let mock_shape = VerifierShape::most_common(
            self.branches
                .iter()
                .flat_map(|branch| branch.roles.values().map(|v| &**v)),
        )
        .unwrap_or(VerifierShape::DEFAULT);
        let branches = self
            .branches
            .into_iter()
            .map(|mut branch| {
                branch.mock_shape = VerifierShape::most_common(branch.roles.values().map(|v| &**v))
                    .unwrap_or(mock_shape);
                Arc::new(branch)
            })
            .collect();
        Catalog {
            branches,
            by_id: self.by_id,
            mock_shape,
        }
    }
}

impl BranchDraft {
    /// Sets the branch's own pool settings (`[branch.pool]`, checked by its parser).
    pub(crate) fn pool(&mut self, pool: PoolOverrides) {
        self.pool = pool;
    }

    /// Adds a replica: not the primary, not listed before.
    pub(crate) fn replica(&mut self, addr: SocketAddr) -> Result<(), String> {
        if addr == self.primary || self.replicas.contains(&addr) {
            return Err(format!(
                "branch {:?}: replica {addr} is listed twice",
                self.id
            ));
        }
        self.replicas.push(addr);
        Ok(())
    }

    /// Adds role `name` with its verifier (`SCRAM-SHA-256$...`).
    pub(crate) fn role(&mut self, name: &str, verifier: &str) -> Result<(), RoleProblem> {
        let id = &self.id;
        if let Some(why) = role_name_problem(name) {
            return Err(RoleProblem::Name(format!(
                "branch {id:?}: role {name:?} {why}"
            )));
        }
        if self.roles.contains_key(name) {
            return Err(RoleProblem::Name(format!(
                "branch {id:?}: role {name:?} is listed twice"
            )));
        }
        let parsed = verifier.parse::<ScramVerifier>().map_err(|e| {
            RoleProblem::Verifier(format!(
                "branch {id:?}: role {name:?}: invalid SCRAM verifier ({e}); expected \
                 SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>"
            ))
        })?;
        self.roles.insert(name.into(), Arc::new(parsed));
        Ok(())
    }
}
