//! The keys of a catalog in etcd, and the conversions between them, a [`Catalog`] and a TOML
//! catalog file.
//!
//! ```text
//! <prefix>/catalog/branches/<id>             TOML: primary, replicas, [pool]
//! <prefix>/catalog/roles/<branch>/<role>     the role's SCRAM verifier, as in pg_authid
//! <prefix>/locks/roles/<branch>/<role>       held (with a lease) by a running `branchgate role`
//! <prefix>/nodes/<node id>                   a live router's entry, on its lease (crate::fleet)
//! <prefix>/acks/<node id>                    the catalog revision that router applied, on its lease
//! ```
//!
//! A role is a key of its own rather than a line of its branch's document, so that a password
//! reset is one key written, guarded by that key's own revision: two operators resetting two
//! roles of one branch never conflict, one reset never rewrites (or races with) the branch's
//! addresses, and a watch names exactly what changed. Role names may contain `/` (the branch id
//! cannot, so the first `/` after `roles/` ends it). Everything a router reads is under
//! `<prefix>/catalog/`, read with one range request and followed with one watch; other
//! subtrees (locks, the node registry, acknowledgements) churn without waking the catalog's watchers.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Deserialize;
use toml::Spanned;
use toml_edit::{ArrayOfTables, DocumentMut, Item, Table, TableLike};

use super::super::build::{Builder, RoleProblem};
use super::super::{Catalog, CatalogError};
use crate::config::pool::RawPool;
use crate::config::TomlError;

/// Where a catalog lives under an etcd prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The prefix from the URL: `/branchgate` (leading `/`, no trailing `/`).
    prefix: String,
}

/// A key under `<prefix>/catalog/`, by what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatalogKey<'k> {
    /// `branches/<id>`: a branch's document.
    Branch(&'k str),
    /// `roles/<branch>/<role>`: a role's verifier.
    Role {
        /// The branch id.
        branch: &'k str,
        /// The role name (may contain `/` and `.`).
        role: &'k str,
    },
}

const CATALOG: &str = "/catalog/";
const BRANCHES: &str = "branches/";
const ROLES: &str = "roles/";
const ROLE_LOCKS: &str = "/locks/roles/";
const NODES: &str = "/nodes/";
const ACKS: &str = "/acks/";

impl Layout {
    /// The layout under `prefix` (as [`super::EtcdUrl::prefix`] gives it).
    pub fn new(prefix: &str) -> Layout {
        Layout {
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    /// `<prefix>/catalog/`: the range routers read and watch.
    pub fn catalog_prefix(&self) -> String {
        format!("{}{CATALOG}", self.prefix)
    }

    /// `<prefix>/catalog/branches/<id>`.
    pub fn branch_key(&self, id: &str) -> String {
        format!("{}{CATALOG}{BRANCHES}{id}", self.prefix)
    }

    /// `<prefix>/catalog/roles/<branch>/<role>`.
    pub fn role_key(&self, branch: &str, role: &str) -> String {
        format!("{}{CATALOG}{ROLES}{branch}/{role}", self.prefix)
    }

    /// `<prefix>/locks/roles/<branch>/<role>`: held by the `role` command changing that role.
    pub fn role_lock_key(&self, branch: &str, role: &str) -> String {
        format!("{}{ROLE_LOCKS}{branch}/{role}", self.prefix)
    }

    /// `<prefix>/`: everything branchgate keeps under the prefix.
    pub fn root(&self) -> String {
        format!("{}/", self.prefix)
    }

    /// `<prefix>/nodes/`: the live routers' entries ([`crate::fleet`]).
    pub fn nodes_prefix(&self) -> String {
        format!("{}{NODES}", self.prefix)
    }

    /// `<prefix>/nodes/<id>`.
    pub fn node_key(&self, id: &str) -> String {
        format!("{}{NODES}{id}", self.prefix)
    }

    /// `<prefix>/acks/`: the catalog revisions the routers applied.
    pub fn acks_prefix(&self) -> String {
        format!("{}{ACKS}", self.prefix)
    }

    /// `<prefix>/acks/<id>`.
    pub fn ack_key(&self, id: &str) -> String {
        format!("{}{ACKS}{id}", self.prefix)
    }

    /// What a full key under `<prefix>/catalog/` holds; `None` for a key outside the layout.
    pub fn parse_key<'k>(&self, key: &'k str) -> Option<CatalogKey<'k>> {
        let relative = key
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(CATALOG)?;
        if let Some(id) = relative.strip_prefix(BRANCHES) {
            return (!id.is_empty() && !id.contains('/')).then_some(CatalogKey::Branch(id));
        }
        let (branch, role) = relative.strip_prefix(ROLES)?.split_once('/')?;
        (!branch.is_empty() && !role.is_empty()).then_some(CatalogKey::Role { branch, role })
    }
}

/// One key's value and revisions, as read from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value's bytes.
    pub value: Vec<u8>,
    /// The revision of the key's last change: what a guarded write compares.
    pub mod_revision: i64,
    /// The revision that created the key: a branch deleted and made again has a new one.
    pub create_revision: i64,
}

/// Every key under `<prefix>/catalog/` at one etcd revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The store's revision this snapshot is of.
    pub revision: i64,
    /// Full key -> entry, in key order (so branches come in id order).
    pub entries: BTreeMap<String, Entry>,
}

/// A branch document (`<prefix>/catalog/branches/<id>`): a `[[branch]]` table of the file
/// without `id` (the key names it) and without `roles` (each is a key of its own).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBranchDoc {
    primary: SocketAddr,
    #[serde(default)]
    replicas: Vec<Spanned<SocketAddr>>,
    #[serde(default)]
    pool: RawPool,
}

impl Snapshot {
    /// The catalog these keys make, checked exactly as a catalog file is (the same builder);
    /// besides, every key must fit the layout and every role must belong to a branch that has
    /// a key. Errors name the etcd key (and the line, inside a branch document).
    pub fn catalog(&self, layout: &Layout) -> Result<Catalog, CatalogError> {
        let invalid = |key: &str, message: String| CatalogError::Etcd {
            key: key.to_owned(),
            message,
        };
        let mut branches = Vec::new();
        // branch id -> [(role, verifier, key)]
        let mut roles: BTreeMap<&str, Vec<(&str, &str, &str)>> = BTreeMap::new();
        for (key, entry) in &self.entries {
            let value = std::str::from_utf8(&entry.value)
                .map_err(|_| invalid(key, "the value is not UTF-8".into()))?;
            match layout.parse_key(key) {
                Some(CatalogKey::Branch(id)) => branches.push((id, key.as_str(), value)),
                Some(CatalogKey::Role { branch, role }) => {
                    roles.entry(branch).or_default().push((role, value, key));
                }
                None => {
                    return Err(invalid(
                        key,
                        format!(
                            "not a catalog key: expected {}<id> or {}<branch>/<role>",
                            layout.branch_key(""),
                            layout.role_key("", "").trim_end_matches('/'),
                        ),
                    ))
                }
            }
        }

        let mut builder = Builder::default();
        for (id, key, text) in branches {
            let doc: RawBranchDoc = toml::from_str(text)
                .map_err(|e| TomlError::parse(text, key, e.span(), e.message()))?;
            let in_doc =
                |span, message| CatalogError::from(TomlError::invalid(text, key, span, message));
            let mut draft = builder
                .branch(id, doc.primary)
                .map_err(|message| invalid(key, message))?;
            for replica in doc.replicas {
                draft
                    .replica(*replica.get_ref())
                    .map_err(|message| in_doc(replica.span(), message))?;
            }
            for (role, verifier, role_key) in roles.remove(id).unwrap_or_default() {
                draft
                    .role(role, verifier)
                    .map_err(|problem| match problem {
                        RoleProblem::Name(message) | RoleProblem::Verifier(message) => {
                            invalid(role_key, message)
                        }
                    })?;
            }
            let pool = doc
                .pool
                .branch_overrides(&format!("branch {id:?}: [pool]"))
                .map_err(|(span, message)| in_doc(span, message))?;
            draft.pool(pool);
            builder.add(draft);
        }
        let orphan = roles
            .into_iter()
            .find_map(|(branch, orphans)| Some((branch, *orphans.first()?)));
        if let Some((branch, (role, _, key))) = orphan {
            return Err(invalid(
                key,
                format!(
                    "role {role:?} of branch {branch:?}, which has no key {}: write the branch \
                     first, or delete its roles",
                    layout.branch_key(branch)
                ),
            ));
        }
        Ok(builder.finish())
    }

    /// The catalog as a TOML catalog file (`branchgate catalog export`), after checking that it
    /// is valid: each branch document becomes a `[[branch]]` table with its `id` and its roles.
    pub fn to_toml(&self, layout: &Layout) -> Result<String, CatalogError> {
        self.catalog(layout)?;
        let mut branches: BTreeMap<&str, (Table, Table)> = BTreeMap::new();
        let mut roles: Vec<(&str, &str, &str)> = Vec::new();
        for (key, entry) in &self.entries {
            // Checked by `catalog` above: UTF-8, and keys of the layout.
            let Ok(value) = std::str::from_utf8(&entry.value) else {
                continue;
            };
            match layout.parse_key(key) {
                Some(CatalogKey::Branch(id)) => {
                    let doc: DocumentMut = value.parse().map_err(|e: toml_edit::TomlError| {
                        TomlError::parse(value, key, e.span(), e.message())
                    })?;
                    let mut table = Table::new();
                    table.insert("id", toml_edit::value(id));
                    let mut pool = None;
                    for (name, item) in doc.as_table().iter() {
                        match name {
                            "pool" => pool = Some(item.clone()),
                            _ => {
                                table.insert(name, item.clone());
                            }
                        }
                    }
                    let mut pool_table = match pool {
                        Some(Item::Table(table)) => table,
                        Some(Item::Value(toml_edit::Value::InlineTable(inline))) => {
                            inline.into_table()
                        }
                        _ => Table::new(),
                    };
                    pool_table.decor_mut().clear();
                    branches.insert(id, (table, pool_table));
                }
                Some(CatalogKey::Role { branch, role }) => roles.push((branch, role, value)),
                None => {}
            }
        }
        for (branch, role, verifier) in roles {
            if let Some((table, _)) = branches.get_mut(branch) {
                let roles = table
                    .entry("roles")
                    .or_insert_with(|| Item::Table(Table::new()));
                if let Some(roles) = roles.as_table_like_mut() {
                    roles.insert(role, toml_edit::value(verifier));
                }
            }
        }
        let mut array = ArrayOfTables::new();
        for (_, (mut table, pool)) in branches {
            if !table.contains_key("roles") {
                table.insert("roles", Item::Table(Table::new()));
            }
            if !pool.is_empty() {
                table.insert("pool", Item::Table(pool));
            }
            array.push(table);
        }
        let mut doc = DocumentMut::new();
        doc.insert("branch", Item::ArrayOfTables(array));
        Ok(doc.to_string())
    }
}

/// The keys and values a catalog file becomes in etcd (`branchgate catalog import`), after
/// checking the file as a router would ([`Catalog::parse`]). The branch documents keep what the
/// file says (durations as written, comments inside the table).
pub fn keys_from_toml(
    text: &str,
    file_name: &str,
    layout: &Layout,
) -> Result<BTreeMap<String, String>, CatalogError> {
    Catalog::parse(text, file_name)?;
    let doc: DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| {
        TomlError::parse(text, file_name, e.span(), e.message())
    })?;
    let mut keys = BTreeMap::new();
    let mut add = |branch: &dyn TableLike| {
        // `Catalog::parse` accepted the file: every branch has a string id.
        let Some(id) = branch.get("id").and_then(Item::as_str) else {
            return;
        };
        let mut out = DocumentMut::new();
        for (name, item) in branch.iter() {
            match name {
                "id" => {}
                "roles" => {
                    if let Some(roles) = item.as_table_like() {
                        for (role, verifier) in roles.iter() {
                            if let Some(verifier) = verifier.as_str() {
                                keys.insert(layout.role_key(id, role), verifier.to_owned());
                            }
                        }
                    }
                }
                _ => {
                    let item = match item {
                        Item::Value(toml_edit::Value::InlineTable(inline)) if name == "pool" => {
                            Item::Table(inline.clone().into_table())
                        }
                        other => other.clone(),
                    };
                    out.insert(name, item);
                }
            }
        }
        keys.insert(layout.branch_key(id), out.to_string());
    };
    match doc.get("branch") {
        Some(Item::ArrayOfTables(array)) => array.iter().for_each(|t| add(t)),
        Some(Item::Value(toml_edit::Value::Array(array))) => array
            .iter()
            .filter_map(toml_edit::Value::as_inline_table)
            .for_each(|t| add(t)),
        _ => {}
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::tests::{two_branches, V1, V2, V3};

    fn layout() -> Layout {
        Layout::new("/fleet")
    }

    fn snapshot(pairs: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            revision: 7,
            entries: pairs
                .iter()
                .map(|(key, value)| {
                    let entry = Entry {
                        value: value.as_bytes().to_vec(),
                        mod_revision: 5,
                        create_revision: 3,
                    };
                    ((*key).to_owned(), entry)
                })
                .collect(),
        }
    }

    fn error(pairs: &[(&str, &str)]) -> String {
        match snapshot(pairs).catalog(&layout()) {
            Ok(catalog) => panic!("expected an error, got {catalog:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn keys_of_the_layout() {
        let layout = layout();
        assert_eq!(layout.catalog_prefix(), "/fleet/catalog/");
        assert_eq!(layout.branch_key("b1"), "/fleet/catalog/branches/b1");
        assert_eq!(
            layout.role_key("b1", "my.role"),
            "/fleet/catalog/roles/b1/my.role"
        );
        assert_eq!(
            layout.role_lock_key("b1", "app"),
            "/fleet/locks/roles/b1/app"
        );
        assert_eq!(
            layout.parse_key("/fleet/catalog/branches/b1"),
            Some(CatalogKey::Branch("b1"))
        );
        // The first `/` after the branch id ends it; the role keeps the rest.
        assert_eq!(
            layout.parse_key("/fleet/catalog/roles/b1/odd/role.x"),
            Some(CatalogKey::Role {
                branch: "b1",
                role: "odd/role.x"
            })
        );
        for outside in [
            "/fleet/catalog/branches/",
            "/fleet/catalog/branches/a/b",
            "/fleet/catalog/roles/b1",
            "/fleet/catalog/roles/b1/",
            "/fleet/catalog/roles//app",
            "/fleet/catalog/nodes/n1",
            "/fleet/locks/roles/b1/app",
            "/fleetx/catalog/branches/b1",
            "/other/catalog/branches/b1",
        ] {
            assert_eq!(layout.parse_key(outside), None, "{outside}");
        }
        assert_eq!(Layout::new("/fleet/"), layout);
    }

    #[test]
    fn a_snapshot_builds_the_same_catalog_as_the_file() {
        let keys = keys_from_toml(&two_branches(), "catalog.toml", &layout()).expect("import");
        let names: Vec<&str> = keys.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "/fleet/catalog/branches/b1",
                "/fleet/catalog/branches/b2",
                "/fleet/catalog/roles/b1/app",
                "/fleet/catalog/roles/b1/my.dotted.role",
                "/fleet/catalog/roles/b2/app",
            ]
        );
        assert_eq!(
            keys["/fleet/catalog/branches/b1"],
            "primary = \"127.0.0.1:5433\"\nreplicas = [\"127.0.0.1:5434\", \"127.0.0.1:5435\"]\n"
        );
        assert_eq!(keys["/fleet/catalog/roles/b1/app"], V1);
        let pairs: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let from_etcd = snapshot(&pairs).catalog(&layout()).expect("valid snapshot");
        let from_file = Catalog::parse(&two_branches(), "catalog.toml").expect("file");
        assert_same(&from_file, &from_etcd);

        // Export gives a file that parses to the same catalog again.
        let exported = snapshot(&pairs).to_toml(&layout()).expect("export");
        let reparsed = Catalog::parse(&exported, "exported.toml")
            .unwrap_or_else(|e| panic!("{e}\n{exported}"));
        assert_same(&from_file, &reparsed);
    }

    #[test]
    fn pool_settings_go_in_and_out() {
        let text = two_branches().replace(
            "primary = \"[::1]:5433\"",
            "primary = \"[::1]:5433\"\npool = { pool_size = 3, server_lifetime = \"0s\" }",
        ) + &format!(
            "[[branch]]\nid = \"b3\"\nprimary = \"127.0.0.1:9\"\n[branch.pool]\n\
             query_wait_timeout = \"5s\" # short\n[branch.roles]\nro = \"{V2}\"\n"
        );
        let keys = keys_from_toml(&text, "catalog.toml", &layout()).expect("import");
        assert_eq!(
            keys["/fleet/catalog/branches/b2"],
            "primary = \"[::1]:5433\"\n\n[pool]\npool_size = 3\nserver_lifetime = \"0s\"\n"
        );
        let pairs: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let from_file = Catalog::parse(&text, "catalog.toml").expect("file");
        let from_etcd = snapshot(&pairs).catalog(&layout()).expect("etcd");
        assert_same(&from_file, &from_etcd);
        let exported = snapshot(&pairs).to_toml(&layout()).expect("export");
        let reparsed = Catalog::parse(&exported, "exported.toml")
            .unwrap_or_else(|e| panic!("{e}\n{exported}"));
        assert_same(&from_file, &reparsed);
        assert!(
            exported.contains("[branch.pool]\nquery_wait_timeout = \"5s\""),
            "{exported}"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let b1 = "/fleet/catalog/branches/b1";
        let e = error(&[(b1, "primary = \"127.0.0.1:1\"\nroles = {}\n")]);
        assert!(
            e.starts_with("/fleet/catalog/branches/b1:2:1: unknown field `roles`"),
            "{e}"
        );
        let e = error(&[(
            b1,
            "primary = \"127.0.0.1:1\"\nreplicas = [\"127.0.0.1:1\"]\n",
        )]);
        assert_eq!(
            e,
            "/fleet/catalog/branches/b1:2: branch \"b1\": replica 127.0.0.1:1 is listed twice"
        );
        let e = error(&[(
            b1,
            "primary = \"127.0.0.1:1\"\n[pool]\npool_size = 2\nmin_pool_size = 3\n",
        )]);
        assert!(e.starts_with("/fleet/catalog/branches/b1:"), "{e}");
        assert!(
            e.contains("min_pool_size (3) must not be more than pool_size (2)"),
            "{e}"
        );
        let e = error(&[("/fleet/catalog/branches/B1", "primary = \"127.0.0.1:1\"\n")]);
        assert!(
            e.starts_with("/fleet/catalog/branches/B1: branch id \"B1\" must be"),
            "{e}"
        );
        let e = error(&[
            (b1, "primary = \"127.0.0.1:1\"\n"),
            ("/fleet/catalog/roles/b1/app", "md5abc"),
        ]);
        assert!(
            e.starts_with(
                "/fleet/catalog/roles/b1/app: branch \"b1\": role \"app\": invalid SCRAM"
            ),
            "{e}"
        );
        let e = error(&[
            (b1, "primary = \"127.0.0.1:1\"\n"),
            ("/fleet/catalog/roles/b1/a|b", V1),
        ]);
        assert!(e.contains("role \"a|b\" must not contain '|'"), "{e}");
        let e = error(&[
            (b1, "primary = \"127.0.0.1:1\"\n"),
            ("/fleet/catalog/roles/b2/app", V3),
        ]);
        assert_eq!(
            e,
            "/fleet/catalog/roles/b2/app: role \"app\" of branch \"b2\", which has no key \
             /fleet/catalog/branches/b2: write the branch first, or delete its roles"
        );
        let e = error(&[("/fleet/catalog/stray", "x")]);
        assert!(
            e.starts_with("/fleet/catalog/stray: not a catalog key"),
            "{e}"
        );
        let mut bad_utf8 = snapshot(&[(b1, "")]);
        if let Some(entry) = bad_utf8.entries.get_mut(b1) {
            entry.value = vec![0xff];
        }
        let e = bad_utf8
            .catalog(&layout())
            .expect_err("not UTF-8")
            .to_string();
        assert_eq!(e, "/fleet/catalog/branches/b1: the value is not UTF-8");
        // An empty prefix is an empty catalog, as an empty file is.
        let empty = Snapshot::default().catalog(&layout()).expect("empty");
        assert_eq!(empty.branches().len(), 0);
    }

    #[test]
    fn import_checks_the_file_first() {
        let e = keys_from_toml("[[branch]]\nid = \"b1\"\n", "catalog.toml", &layout())
            .expect_err("no primary");
        assert!(
            e.to_string()
                .starts_with("catalog.toml:1:1: missing field `primary`"),
            "{e}"
        );
        let inline = format!(
            "branch = [{{ id = \"b1\", primary = \"127.0.0.1:1\", roles = {{ app = \"{V1}\" }}, \
             pool = {{ pool_size = 2 }} }}]\n"
        );
        let keys = keys_from_toml(&inline, "catalog.toml", &layout()).expect("inline branches");
        assert_eq!(
            keys["/fleet/catalog/branches/b1"],
            "primary = \"127.0.0.1:1\"\n\n[pool]\npool_size = 2\n"
        );
        assert_eq!(keys["/fleet/catalog/roles/b1/app"], V1);
    }

    /// Same branches, addresses, verifiers and pool settings.
    fn assert_same(a: &Catalog, b: &Catalog) {
        let ids = |c: &Catalog| c.branches().map(|b| b.id.to_string()).collect::<Vec<_>>();
        assert_eq!(ids(a), ids(b));
        assert!(a.changed_roles(b).is_empty() && b.changed_roles(a).is_empty());
        assert!(a.changed_pools(b).is_empty());
        for branch in a.branches() {
            let other = b.branch(&branch.id).expect("same ids");
            assert_eq!(branch.primary, other.primary);
            assert_eq!(branch.replicas, other.replicas);
        }
    }
}
