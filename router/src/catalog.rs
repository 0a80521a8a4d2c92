//! The branch catalog: branch id -> primary, replicas, and role verifiers.
//!
//! ```toml
//! [[branch]]
//! id = "b1"                          # [a-z0-9_-]{1,63}, unique
//! primary = "127.0.0.1:5433"
//! replicas = ["127.0.0.1:5434"]      # optional
//! [branch.roles]                     # role name -> SCRAM verifier
//! app = "SCRAM-SHA-256$4096:...$...:..."
//! "my.dotted.role" = "SCRAM-SHA-256$4096:...$...:..."
//! [branch.pool]                      # optional: the router's [pool] settings for this branch
//! pool_size = 5                      # any [pool] key; those left out come from router.toml
//! ```
//!
//! A [`Catalog`] is immutable once built and shared behind an `Arc`; a reload builds a new one,
//! and [`Catalog::changed_roles`] says whose live sessions must be closed,
//! [`Catalog::changed_pools`] which branches' pool settings changed, and
//! [`Catalog::removed_by`] how much of the catalog in force it would remove (the reload
//! [`guard`] refuses a new catalog that removes too much). The `role` command edits the file in
//! place with [`set_role_verifier`].
//!
//! The same catalog may instead live in etcd ([`etcd`]): its keys go through the same checks
//! (`build`, shared by [`Catalog::parse`] and [`etcd::Snapshot::catalog`]), so a file and etcd
//! accept and refuse exactly the same catalogs.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::auth::verifier::{ScramVerifier, VerifierShape};
use crate::config::pool::RawPool;
use crate::config::{PoolOverrides, TomlError};

mod build;
mod edit;
pub mod etcd;
pub mod guard;
pub mod source;

use build::{Builder, RoleProblem};

pub use edit::{lock_for_edit, set_role_verifier, EditLock};
pub use guard::{Refusal, Removal, Verdict};

/// Longest branch id, and longest role name (PostgreSQL's NAMEDATALEN - 1).
pub const MAX_NAME_BYTES: usize = 63;

/// One database branch.
pub struct Branch {
    /// The branch id clients name after the last dot of their user name.
    pub id: Box<str>,
    /// The read-write server.
    pub primary: SocketAddr,
    /// Read-only servers for `|replica` sessions; may be empty.
    pub replicas: Box<[SocketAddr]>,
    /// `[branch.pool]`: this branch's own pool settings for the pooled port
    /// ([`crate::config::PoolSettings::for_branch`]).
    pub pool: PoolOverrides,
    /// Role name -> verifier. A role belongs to exactly this branch.
    roles: HashMap<Box<str>, Arc<ScramVerifier>>,
    /// The shape of this branch's verifiers, which a fake one for a role it lacks must have.
    mock_shape: VerifierShape,
}

impl Branch {
    /// The shape a fake verifier for a role this branch does not have must take: that of most
    /// of its roles (or, with none, of the catalog's).
    pub fn mock_shape(&self) -> VerifierShape {
        self.mock_shape
    }

    /// The verifier of `name`, if the role exists on this branch.
    pub fn role(&self, name: &str) -> Option<&Arc<ScramVerifier>> {
        self.roles.get(name)
    }

    /// All roles of this branch, in no particular order.
    pub fn roles(&self) -> impl Iterator<Item = (&str, &Arc<ScramVerifier>)> {
        self.roles.iter().map(|(name, v)| (&**name, v))
    }
}

// Verifiers allow offline password guessing, so Debug shows role names only.
impl fmt::Debug for Branch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut roles: Vec<&str> = self.roles.keys().map(|r| &**r).collect();
        roles.sort_unstable();
        f.debug_struct("Branch")
            .field("id", &self.id)
            .field("primary", &self.primary)
            .field("replicas", &self.replicas)
            .field("pool", &self.pool)
            .field("roles", &roles)
            .finish()
    }
}

/// All branches, immutable once built.
#[derive(Debug)]
pub struct Catalog {
    /// In file order.
    branches: Box<[Arc<Branch>]>,
    /// Branch id -> index into `branches`.
    by_id: HashMap<Box<str>, usize>,
    /// The shape of most verifiers in the catalog: fake verifiers for branches it lacks.
    mock_shape: VerifierShape,
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog {
            branches: Box::default(),
            by_id: HashMap::new(),
            mock_shape: VerifierShape::DEFAULT,
        }
    }
}

/// Why a catalog file was rejected or could not be edited.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Reading, writing or renaming a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A TOML syntax error, or values that do not make a valid file, with its line.
    #[error(transparent)]
    Toml(#[from] TomlError),
    /// [`set_role_verifier`] could not make the edit (an unusual file layout); file unchanged.
    #[error("{}: cannot edit the catalog: {reason}", path.display())]
    NotEdited {
        /// The catalog file.
        path: PathBuf,
        /// What went wrong.
        reason: &'static str,
    },
    /// A catalog in etcd whose keys do not make a valid catalog (a role of a branch it lacks,
    /// a key outside the layout, a verifier that does not parse); `key` names the etcd key.
    #[error("{key}: {message}")]
    Etcd {
        /// The etcd key (with the prefix) holding the offending value.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// [`set_role_verifier`] was asked for a branch the file does not have.
    #[error("{}: no branch with id {branch:?}", path.display())]
    UnknownBranch {
        /// The catalog file.
        path: PathBuf,
        /// The requested branch id.
        branch: String,
    },
}

impl Catalog {
    /// Reads and parses a catalog file.
    pub fn load(path: &Path) -> Result<Catalog, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|source| CatalogError::Io {
            path: path.to_owned(),
            source,
        })?;
        Catalog::parse(&text, &path.display().to_string())
    }

    /// Parses catalog text; `file_name` only labels errors.
    pub fn parse(text: &str, file_name: &str) -> Result<Catalog, CatalogError> {
        let raw: RawCatalog = toml::from_str(text)
            .map_err(|e| TomlError::parse(text, file_name, e.span(), e.message()))?;
        let invalid = |span: Range<usize>, message: String| {
            CatalogError::from(TomlError::invalid(text, file_name, span, message))
        };

        let mut builder = Builder::default();
        for raw_branch in raw.branch {
            let id_span = raw_branch.id.span();
            let id = raw_branch.id.into_inner();
            let mut draft = builder
                .branch(&id, raw_branch.primary)
                .map_err(|message| invalid(id_span, message))?;
            for replica in raw_branch.replicas {
                draft
                    .replica(*replica.get_ref())
                    .map_err(|message| invalid(replica.span(), message))?;
            }
            for (name, verifier) in raw_branch.roles {
                draft.role(name.get_ref(), verifier.get_ref()).map_err(
                    |problem| match problem {
                        RoleProblem::Name(message) => invalid(name.span(), message),
                        RoleProblem::Verifier(message) => invalid(verifier.span(), message),
                    },
                )?;
            }
            let pool = raw_branch
                .pool
                .branch_overrides(&format!("branch {id:?}: [branch.pool]"))
                .map_err(|(span, message)| invalid(span, message))?;
            draft.pool(pool);
            builder.add(draft);
        }
        Ok(builder.finish())
    }

    /// The shape a fake verifier for a branch the catalog does not have must take: that of
    /// most verifiers in the catalog.
    pub fn mock_shape(&self) -> VerifierShape {
        self.mock_shape
    }

    /// The branch with this id.
    pub fn branch(&self, id: &str) -> Option<&Arc<Branch>> {
        self.by_id.get(id).and_then(|&i| self.branches.get(i))
    }

    /// All branches, in file order.
    pub fn branches(&self) -> impl ExactSizeIterator<Item = &Arc<Branch>> {
        self.branches.iter()
    }

    /// `(branch, role)` pairs of `self` whose verifier differs in `newer` or that `newer` no
    /// longer has (branch or role removed): their live sessions must be closed. Sorted.
    pub fn changed_roles(&self, newer: &Catalog) -> Vec<(Box<str>, Box<str>)> {
        let mut changed = Vec::new();
        for old in self.branches() {
            let new = newer.branch(&old.id);
            for (role, verifier) in old.roles() {
                if new.and_then(|b| b.role(role)) != Some(verifier) {
                    changed.push((old.id.clone(), role.into()));
                }
            }
        }
        changed.sort_unstable();
        changed
    }

    /// Branches of both `self` and `newer` whose `[branch.pool]` differs between them: their
    /// pools must take up the new settings. Sorted.
    pub fn changed_pools(&self, newer: &Catalog) -> Vec<Box<str>> {
        let mut changed: Vec<Box<str>> = self
            .branches()
            .filter(|old| {
                newer
                    .branch(&old.id)
                    .is_some_and(|new| new.pool != old.pool)
            })
            .map(|old| old.id.clone())
            .collect();
        changed.sort_unstable();
        changed
    }
}

/// True if `id` is a well-formed branch id: 1 to 63 bytes of `a-z`, `0-9`, `_` and `-`.
pub fn is_branch_id(id: &str) -> bool {
    (1..=MAX_NAME_BYTES).contains(&id.len())
        && id
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
}

/// Why a role name cannot be used, if it cannot.
fn role_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        Some("must be 1 to 63 bytes long")
    } else if name.contains('|') {
        // `|` starts the `|replica` suffix of a user name.
        Some("must not contain '|'")
    } else if name.contains('\0') {
        Some("must not contain NUL")
    } else {
        None
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    #[serde(default)]
    branch: Vec<RawBranch>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBranch {
    id: Spanned<String>,
    primary: SocketAddr,
    #[serde(default)]
    replicas: Vec<Spanned<SocketAddr>>,
    #[serde(default)]
    roles: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    pool: RawPool,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Well-formed verifiers (16-byte salt, 32-byte keys), all different.
    pub(crate) const V1: &str = "SCRAM-SHA-256$4096:AAAAAAAAAAAAAAAAAAAAAA==$joRZZgn1P/jqw6F1foc7/EzYgYofSYn9LqOfzgMDH4Q=:cfFubxQ0PC+ruB+yTEfgmXtOrvsyOqarwlEekTcfMWo=";
    pub(crate) const V2: &str = "SCRAM-SHA-256$4096:AQEBAQEBAQEBAQEBAQEBAQ==$O1O5Kev22UteAD8y8wR35rFjJQAEJulizRZcPdDWbII=:f0CbGzIRw3SZyWGfQq4NKr3uZS69wa8FAta1OaZwQwY=";
    pub(crate) const V3: &str = "SCRAM-SHA-256$4096:AgICAgICAgICAgICAgICAg==$mbulUOQfgJKKFRfMP17nUwNyCbpuyMEQK3dCKJUEzio=:xn6D/MaygHeKOhRSKq6lBWNk7/in7UrkCtV6shpjBZ4=";

    pub(crate) fn two_branches() -> String {
        format!(
            r#"# two branches
[[branch]]
id = "b1"
primary = "127.0.0.1:5433"
replicas = ["127.0.0.1:5434", "127.0.0.1:5435"]
[branch.roles]
app = "{V1}"
"my.dotted.role" = "{V2}"

[[branch]]
id = "b2"
primary = "[::1]:5433"
roles = {{ app = "{V3}" }}
"#
        )
    }

    fn parse(text: &str) -> Result<Catalog, CatalogError> {
        Catalog::parse(text, "catalog.toml")
    }

    fn error(text: &str) -> String {
        match parse(text) {
            Ok(catalog) => panic!("expected an error, got {catalog:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn valid_file() {
        let catalog = parse(&two_branches()).expect("valid catalog");
        let ids: Vec<&str> = catalog.branches().map(|b| &*b.id).collect();
        assert_eq!(ids, ["b1", "b2"]);
        let b1 = catalog.branch("b1").expect("b1");
        assert_eq!(b1.primary, "127.0.0.1:5433".parse().expect("addr"));
        assert_eq!(b1.replicas.len(), 2);
        let expected: ScramVerifier = V2.parse().expect("verifier");
        assert_eq!(b1.role("my.dotted.role").map(|v| &**v), Some(&expected));
        assert!(b1.role("my").is_none());
        let b2 = catalog.branch("b2").expect("b2");
        assert!(b2.replicas.is_empty());
        assert_eq!(b2.roles().count(), 1);
        assert!(catalog.branch("b3").is_none());
        assert_eq!(parse("").expect("empty catalog").branches().len(), 0);
        // Debug must not leak verifiers.
        assert!(!format!("{catalog:?}").contains("SCRAM"));
    }

    #[test]
    fn duplicate_branch_id_has_line() {
        let text = format!(
            "{}\n[[branch]]\nid = \"b1\"\nprimary = \"127.0.0.1:1\"\n",
            two_branches()
        );
        assert_eq!(error(&text), r#"catalog.toml:16: duplicate branch id "b1""#);
    }

    #[test]
    fn bad_values_have_lines() {
        let text = two_branches().replace(V1, "md5c4ca4238a0b923820dcc509a6f75849b");
        let e = error(&text);
        assert!(
            e.starts_with(r#"catalog.toml:7: branch "b1": role "app": invalid SCRAM"#),
            "{e}"
        );
        let e = error(&two_branches().replace("\"b2\"", "\"B2\""));
        assert!(
            e.starts_with(r#"catalog.toml:11: branch id "B2" must be"#),
            "{e}"
        );
        let e = error(&two_branches().replace("\"my.dotted.role\"", "\"a|b\""));
        assert!(
            e.starts_with(r#"catalog.toml:8: branch "b1": role "a|b""#),
            "{e}"
        );
        let e = error(&two_branches().replace("5435", "5434"));
        assert!(
            e.starts_with("catalog.toml:5: branch \"b1\": replica"),
            "{e}"
        );
        let e = error(&two_branches().replace("[::1]:5433", "db.internal:5433"));
        assert!(
            e.starts_with("catalog.toml:12:11: invalid socket address"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_has_line_and_column() {
        let text = two_branches().replace("id = \"b2\"\n", "id = \"b2\"\nprimry = \"x\"\n");
        let e = error(&text);
        assert!(
            e.starts_with("catalog.toml:12:1: unknown field `primry`"),
            "{e}"
        );
        let e = error("[[branches]]\n");
        assert!(
            e.starts_with("catalog.toml:1:3: unknown field `branches`"),
            "{e}"
        );
    }

    #[test]
    fn pool_overrides_are_per_branch_and_have_lines() {
        let text = two_branches().replace(
            "\n[[branch]]\nid = \"b2\"",
            "[branch.pool]\npool_size = 3\nserver_lifetime = \"0s\"\n\n[[branch]]\nid = \"b2\"",
        );
        let catalog = parse(&text).expect("catalog with [branch.pool]");
        let b1 = catalog.branch("b1").expect("b1");
        assert_eq!(
            b1.pool,
            PoolOverrides {
                pool_size: std::num::NonZeroU32::new(3),
                server_lifetime: Some(None),
                ..PoolOverrides::default()
            }
        );
        assert_eq!(b1.roles().count(), 2, "roles before [branch.pool] stay");
        let b2 = catalog.branch("b2").expect("b2");
        assert_eq!(b2.pool, PoolOverrides::default());
        // An inline table too.
        let inline = two_branches().replace(
            "primary = \"[::1]:5433\"",
            "primary = \"[::1]:5433\"\npool = { min_pool_size = 2 }",
        );
        let catalog = parse(&inline).expect("inline pool");
        assert_eq!(
            catalog.branch("b2").expect("b2").pool.min_pool_size,
            Some(2)
        );

        let e = error(&text.replace("pool_size = 3", "pool_size = 3\nmin_pool_size = 4"));
        assert_eq!(
            e,
            "catalog.toml:11: branch \"b1\": [branch.pool] min_pool_size (4) must not be more \
             than pool_size (3)"
        );
        let e = error(&text.replace("pool_size = 3", "query_wait_timeout = \"0s\""));
        assert!(
            e.starts_with(
                "catalog.toml:10: branch \"b1\": [branch.pool] query_wait_timeout must be greater"
            ),
            "{e}"
        );
        let e = error(&text.replace("pool_size = 3", "pool_mode = \"session\""));
        assert!(
            e.starts_with("catalog.toml:10:1: unknown field `pool_mode`"),
            "{e}"
        );
    }

    #[test]
    fn changed_pools_lists_branches_whose_overrides_changed() {
        let old = parse(&two_branches()).expect("old");
        assert!(old.changed_pools(&old).is_empty());
        let text = two_branches().replace(
            "primary = \"[::1]:5433\"",
            "primary = \"[::1]:5433\"\npool = { pool_size = 9 }",
        );
        let new = parse(&text).expect("new");
        assert_eq!(old.changed_pools(&new), [Box::from("b2")]);
        assert_eq!(new.changed_pools(&old), [Box::from("b2")]);
        // Only the pool changed: no session is closed for it.
        assert!(old.changed_roles(&new).is_empty());
        // Removed branches are not pool changes (their roles are in changed_roles).
        assert!(new.changed_pools(&Catalog::default()).is_empty());
    }

    #[test]
    fn changed_roles_lists_changed_and_removed() {
        let old = parse(&two_branches()).expect("old");
        assert!(old.changed_roles(&old).is_empty());
        let text = two_branches()
            .replace(&format!("app = \"{V1}\""), &format!("app = \"{V3}\""))
            .replace(&format!("roles = {{ app = \"{V3}\" }}"), "");
        let new = parse(&format!(
            "{text}[[branch]]\nid = \"b3\"\nprimary = \"127.0.0.1:1\"\n"
        ))
        .expect("new");
        let pair = |b: &str, r: &str| (Box::from(b), Box::from(r));
        assert_eq!(
            old.changed_roles(&new),
            [pair("b1", "app"), pair("b2", "app")]
        );
        // Added roles and branches close nothing.
        assert!(new.changed_roles(&old).iter().all(|(b, _)| &**b == "b1"));
        assert_eq!(old.changed_roles(&Catalog::default()).len(), 3);
    }
}
