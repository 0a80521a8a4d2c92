//! Editing the catalog file in place: the `role` command's write path.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use toml_edit::{DocumentMut, InlineTable, Item, Table, TableLike, Value};

use super::{Catalog, CatalogError};
use crate::auth::verifier::ScramVerifier;
use crate::config::TomlError;

/// Sets (creates or replaces) `role`'s verifier on `branch` in the catalog file at `path`.
///
/// Comments and layout are preserved (`toml_edit`); a missing `[branch.roles]` table is
/// created. The result is parsed as a [`Catalog`] before it replaces the file, atomically (temp
/// file in the same directory, fsync, rename, fsync of the directory), so a reader sees the old
/// file or the new one, never a mix. Concurrent editors serialise with [`lock_for_edit`]: hold
/// it across the whole change (server and file), or two edits may lose one update.
pub fn set_role_verifier(
    path: &Path,
    branch: &str,
    role: &str,
    verifier: &ScramVerifier,
) -> Result<(), CatalogError> {
    // Rename onto the real file, not onto a symlink that points at it.
    let path = std::fs::canonicalize(path).map_err(|source| CatalogError::Io {
        path: path.to_owned(),
        source,
    })?;
    let file_name = path.display().to_string();
    let text = std::fs::read_to_string(&path).map_err(|source| CatalogError::Io {
        path: path.clone(),
        source,
    })?;
    // Refuse to edit a file that is already broken: the error would point at the wrong text.
    let before = Catalog::parse(&text, &file_name)?;
    if before.branch(branch).is_none() {
        return Err(CatalogError::UnknownBranch {
            path,
            branch: branch.to_owned(),
        });
    }
    let mut doc: DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| {
        TomlError::parse(&text, &file_name, e.span(), e.message())
    })?;
    let not_edited = |reason| CatalogError::NotEdited {
        path: path.clone(),
        reason,
    };
    let (table, inline) =
        find_branch(&mut doc, branch).ok_or_else(|| not_edited("branch table not found"))?;
    set_role(table, inline, role, &verifier.to_string())
        .ok_or_else(|| not_edited("roles is not a table"))?;

    let new_text = doc.to_string();
    let after = Catalog::parse(&new_text, &file_name)?;
    // The edit must change exactly this one role, to exactly this verifier.
    let set = after.branch(branch).and_then(|b| b.role(role));
    let only_this_role = before
        .changed_roles(&after)
        .iter()
        .all(|(b, r)| (&**b, &**r) == (branch, role))
        && before.changed_pools(&after).is_empty();
    if set.map(|v| **v == *verifier) != Some(true) || !only_this_role {
        return Err(not_edited("the edited file does not say what was asked"));
    }
    replace_file(&path, new_text.as_bytes())
}

/// The `[[branch]]` table (or inline table, flagged `true`) whose `id` is `branch`.
fn find_branch<'a>(
    doc: &'a mut DocumentMut,
    branch: &str,
) -> Option<(&'a mut dyn TableLike, bool)> {
    let has_id = |t: &dyn TableLike| t.get("id").and_then(Item::as_str) == Some(branch);
    match doc.get_mut("branch")? {
        Item::ArrayOfTables(array) => array
            .iter_mut()
            .find(|t| has_id(*t))
            .map(|t| (t as &mut dyn TableLike, false)),
        Item::Value(Value::Array(array)) => array
            .iter_mut()
            .filter_map(Value::as_inline_table_mut)
            .find(|t| has_id(*t))
            .map(|t| (t as &mut dyn TableLike, true)),
        _ => None,
    }
}

/// Inserts or replaces `roles.<role> = "<verifier>"`, keeping a replaced value's comments.
/// `None` if `roles` exists but is not a table.
fn set_role(branch: &mut dyn TableLike, inline: bool, role: &str, verifier: &str) -> Option<()> {
    let empty = || {
        if inline {
            Item::Value(Value::InlineTable(InlineTable::new()))
        } else {
            Item::Table(Table::new())
        }
    };
    let roles = branch
        .entry("roles")
        .or_insert_with(empty)
        .as_table_like_mut()?;
    match roles.get_mut(role).and_then(Item::as_value_mut) {
        Some(old) => {
            let mut new = Value::from(verifier);
            *new.decor_mut() = old.decor().clone();
            *old = new;
        }
        None => {
            roles.insert(role, toml_edit::value(verifier));
        }
    }
    Some(())
}

/// An exclusive lock on the catalog at `path` for one edit, released when dropped.
///
/// The lock is on a sidecar file (`.<name>.lock` in the same directory): the catalog itself is
/// replaced by rename, so a lock on its inode would not exclude the next editor. Blocks while
/// another editor holds it.
#[derive(Debug)]
pub struct EditLock {
    _file: std::fs::File,
}

/// Takes the [`EditLock`] for the catalog at `path`.
pub fn lock_for_edit(path: &Path) -> Result<EditLock, CatalogError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or("catalog".into(), |n| n.to_string_lossy());
    let lock_path = dir.join(format!(".{name}.lock"));
    let io = |source| CatalogError::Io {
        path: lock_path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(io)?;
    file.lock().map_err(io)?;
    Ok(EditLock { _file: file })
}

/// Writes `contents` to a temp file next to `path`, syncs it, and renames it over `path`.
fn replace_file(path: &Path, contents: &[u8]) -> Result<(), CatalogError> {
    static SEQUENCE: AtomicU32 = AtomicU32::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or("catalog".into(), |n| n.to_string_lossy());
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{seq}.tmp", std::process::id()));
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CatalogError::Io { path, source }
    };

    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        // Keep the original mode: verifiers are secrets, the file may be 0600.
        file.set_permissions(std::fs::metadata(path)?.permissions())?;
        file.write_all(contents)?;
        file.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(&tmp)(e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(path)(e));
    }
    // Make the rename itself durable.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    use super::super::tests::{two_branches, V1, V2, V3};
    use super::*;

    fn write_catalog(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("catalog.toml");
        std::fs::write(&path, text).expect("write catalog");
        (dir, path)
    }

    fn verifier(text: &str) -> ScramVerifier {
        text.parse().expect("test verifier parses")
    }

    fn role(path: &Path, branch: &str, role: &str) -> Option<ScramVerifier> {
        let catalog = Catalog::load(path).expect("edited catalog loads");
        let branch = catalog.branch(branch).expect("branch exists");
        branch.role(role).map(|v| (**v).clone())
    }

    #[test]
    fn replace_and_add_keep_comments_and_layout() {
        let original = two_branches().replace(
            &format!("app = \"{V1}\""),
            &format!("# the application role\napp = \"{V1}\" # rotated yearly"),
        );
        let (_dir, path) = write_catalog(&original);
        set_role_verifier(&path, "b1", "app", &verifier(V3)).expect("replace");
        set_role_verifier(&path, "b1", "new.role", &verifier(V2)).expect("add dotted");
        set_role_verifier(&path, "b2", "app", &verifier(V1)).expect("replace inline");

        let text = std::fs::read_to_string(&path).expect("read back");
        let expected = original
            .replace(
                &format!("app = \"{V1}\" # rotated"),
                &format!("app = \"{V3}\" # rotated"),
            )
            .replace(
                &format!("\"my.dotted.role\" = \"{V2}\"\n"),
                &format!("\"my.dotted.role\" = \"{V2}\"\n\"new.role\" = \"{V2}\"\n"),
            )
            .replace(
                &format!("{{ app = \"{V3}\" }}"),
                &format!("{{ app = \"{V1}\" }}"),
            );
        assert_eq!(text, expected);
        assert_eq!(role(&path, "b1", "app"), Some(verifier(V3)));
        assert_eq!(role(&path, "b1", "new.role"), Some(verifier(V2)));
        assert_eq!(role(&path, "b2", "app"), Some(verifier(V1)));
    }

    #[test]
    fn creates_missing_roles_tables() {
        let original = "# first\n[[branch]]\nid = \"b1\"\nprimary = \"127.0.0.1:1\"\n\n\
                        [[branch]] # second\nid = \"b2\"\nprimary = \"127.0.0.1:2\"\n";
        let (_dir, path) = write_catalog(original);
        set_role_verifier(&path, "b1", "app", &verifier(V1)).expect("b1");
        set_role_verifier(&path, "b2", "app", &verifier(V2)).expect("b2");
        let text = std::fs::read_to_string(&path).expect("read back");
        let expected = format!(
            "# first\n[[branch]]\nid = \"b1\"\nprimary = \"127.0.0.1:1\"\n\n\
             [branch.roles]\napp = \"{V1}\"\n\n\
             [[branch]] # second\nid = \"b2\"\nprimary = \"127.0.0.1:2\"\n\n\
             [branch.roles]\napp = \"{V2}\"\n"
        );
        assert_eq!(text, expected);
        assert_eq!(role(&path, "b1", "app"), Some(verifier(V1)));
        assert_eq!(role(&path, "b2", "app"), Some(verifier(V2)));

        let (_dir, path) = write_catalog("branch = [{ id = \"b1\", primary = \"127.0.0.1:1\" }]\n");
        set_role_verifier(&path, "b1", "app", &verifier(V1)).expect("inline branch");
        assert_eq!(role(&path, "b1", "app"), Some(verifier(V1)));

        let dotted =
            format!("[[branch]]\nid = \"b1\"\nprimary = \"127.0.0.1:1\"\nroles.app = \"{V1}\"\n");
        let (_dir, path) = write_catalog(&dotted);
        set_role_verifier(&path, "b1", "x.y", &verifier(V2)).expect("dotted roles");
        let text = std::fs::read_to_string(&path).expect("read back");
        assert_eq!(text, format!("{dotted}roles.\"x.y\" = \"{V2}\"\n"));
    }

    #[test]
    fn pool_tables_stay_as_they_are() {
        // A branch with [branch.pool] and no roles yet, then one with both.
        let original = format!(
            "[[branch]]\nid = \"b1\"\nprimary = \"127.0.0.1:1\"\n\n[branch.pool]\npool_size = 3\n\n\
             [[branch]]\nid = \"b2\"\nprimary = \"127.0.0.1:2\"\n[branch.pool]\n\
             min_pool_size = 1\n[branch.roles]\napp = \"{V1}\"\n"
        );
        let (_dir, path) = write_catalog(&original);
        set_role_verifier(&path, "b1", "app", &verifier(V2)).expect("b1");
        set_role_verifier(&path, "b2", "app", &verifier(V3)).expect("b2");
        assert_eq!(role(&path, "b1", "app"), Some(verifier(V2)));
        assert_eq!(role(&path, "b2", "app"), Some(verifier(V3)));
        let catalog = Catalog::load(&path).expect("edited catalog loads");
        let before = Catalog::parse(&original, "catalog.toml").expect("original");
        assert!(before.changed_pools(&catalog).is_empty());
        let b1 = catalog.branch("b1").expect("b1");
        assert_eq!(b1.pool.pool_size.map(|n| n.get()), Some(3));
    }

    #[test]
    fn refusals_leave_the_file_alone() {
        let (dir, path) = write_catalog(&two_branches());
        let e = set_role_verifier(&path, "b9", "app", &verifier(V1)).expect_err("no b9");
        assert!(matches!(e, CatalogError::UnknownBranch { .. }), "{e}");
        let e = set_role_verifier(&path, "b1", "a|b", &verifier(V1)).expect_err("bad name");
        assert!(
            matches!(e, CatalogError::Toml(TomlError::Invalid { .. })),
            "{e}"
        );
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            two_branches()
        );

        std::fs::write(&path, "[[branch]]\nid = \"b1\"\n").expect("write broken");
        let e = set_role_verifier(&path, "b1", "app", &verifier(V1)).expect_err("broken");
        assert!(
            matches!(e, CatalogError::Toml(TomlError::Parse { line: 1, .. })),
            "{e}"
        );
        let leftovers = std::fs::read_dir(dir.path()).expect("list").count();
        assert_eq!(leftovers, 1, "no temp files left behind");
    }

    #[test]
    fn edit_lock_excludes_a_second_editor_until_dropped() {
        let (dir, path) = write_catalog(&two_branches());
        let held = lock_for_edit(&path).expect("first lock");
        let other = std::fs::File::open(dir.path().join(".catalog.toml.lock")).expect("sidecar");
        assert!(other.try_lock().is_err(), "a second editor got the lock");
        drop(held);
        other
            .try_lock()
            .expect("free after the first editor is done");
    }

    #[test]
    fn keeps_file_mode() {
        let (_dir, path) = write_catalog(&two_branches());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        set_role_verifier(&path, "b1", "app", &verifier(V2)).expect("set");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
