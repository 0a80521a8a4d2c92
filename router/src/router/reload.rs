//! Catalog reloads. Every path (SIGHUP, the file watch, the control socket,
//! [`Router::reload_catalog`](super::Router::reload_catalog), the etcd watch) goes through one
//! [`Reloader`], one reload at a time, and through the reload [`guard`](crate::catalog::guard):
//! a catalog that is valid but would remove every branch, every role, or more than `[reload]
//! max_removed_percent` of either is refused unless forced, and the catalog in force stays.
//!
//! A reload reads the catalog from its source: the file, or the newest keys the etcd follower
//! has seen ([`Latest`]); either way the same build, guard and swap follow.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use crate::catalog::etcd::Latest;
use crate::catalog::{guard, Catalog, CatalogError, Refusal, Verdict};
use crate::fleet::Ack;
use crate::worker::Shared;

/// What the file watch compares: modification time and size of the catalog file.
pub(super) type Stamp = (SystemTime, u64);

/// The catalog file's [`Stamp`], if it can be read.
pub(super) fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// What asked for a reload; logged with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trigger {
    /// SIGHUP.
    Signal,
    /// The catalog file changed.
    FileWatch,
    /// A `reload` request on the control socket.
    ControlSocket,
    /// [`Router::reload_catalog`](super::Router::reload_catalog), from the embedding program.
    Api,
    /// The etcd follower saw the catalog's keys change (or read them all again).
    Etcd,
}

impl Trigger {
    fn name(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::FileWatch => "file watch",
            Trigger::ControlSocket => "control socket",
            Trigger::Api => "API",
            Trigger::Etcd => "etcd watch",
        }
    }
}

/// Why a reload did not happen; the catalog in force stays in force either way.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file could not be read or is not a valid catalog.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The file is a valid catalog, but the reload guard refused it: it removes too much.
    #[error("the new catalog {0}; the catalog in force is kept")]
    Refused(#[from] Refusal),
}

/// What a reload applied (or, for a check, would apply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Branches in the new catalog.
    pub branches: usize,
    /// Roles in the new catalog.
    pub roles: usize,
    /// Roles of the catalog in force whose verifier changed or that went away: their sessions
    /// are closed.
    pub changed_roles: usize,
    /// Branches of the catalog in force whose `[branch.pool]` changed: their pools take up the
    /// new settings.
    pub changed_pools: usize,
    /// The guard's refusal that `force` overrode, if it did.
    pub forced: Option<Refusal>,
}

impl fmt::Display for Reloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural =
            |n: usize, one: &'static str, many: &'static str| if n == 1 { one } else { many };
        write!(
            f,
            "{} {}, {} {}, {} {} changed or removed",
            self.branches,
            plural(self.branches, "branch", "branches"),
            self.roles,
            plural(self.roles, "role", "roles"),
            self.changed_roles,
            plural(self.changed_roles, "role", "roles"),
        )?;
        if self.changed_pools > 0 {
            write!(
                f,
                ", {} {} with new pool settings",
                self.changed_pools,
                plural(self.changed_pools, "branch", "branches"),
            )?;
        }
        if let Some(refusal) = self.forced {
            write!(f, "; forced: {refusal}")?;
        }
        Ok(())
    }
}

/// Where a reload reads the catalog from.
#[derive(Debug)]
pub(super) enum Source {
    /// The catalog file.
    File(PathBuf),
    /// The newest keys the etcd follower has seen.
    Etcd(Arc<Latest>),
}

impl Source {
    /// The etcd revision the source is at (`None` for a file), and the catalog it holds now.
    fn load(&self) -> (Option<i64>, Result<Catalog, CatalogError>) {
        match self {
            Source::File(path) => (None, Catalog::load(path)),
            Source::Etcd(latest) => {
                let (revision, catalog) = latest.build();
                (Some(revision), catalog)
            }
        }
    }
}

/// Reloads the catalog of a running router, one reload at a time.
#[derive(Debug)]
pub(super) struct Reloader {
    shared: Arc<Shared>,
    source: Source,
    /// Held for a whole reload; the stamp of the catalog file when it was last read (by the
    /// last reload, refused or not, or by the start), so the file watch reads a file once.
    last_read: Mutex<Option<Stamp>>,
}

impl Reloader {
    /// `loaded` is the stamp of the file the catalog in force came from (`None` for etcd).
    pub(super) fn new(shared: Arc<Shared>, source: Source, loaded: Option<Stamp>) -> Reloader {
        Reloader {
            shared,
            source,
            last_read: Mutex::new(loaded),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Stamp>> {
        // A panic during a reload leaves nothing half-done behind the lock: the catalog is
        // swapped whole, last.
        self.last_read
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads the catalog file and applies it if the guard (or `force`) lets it through.
    /// Logs the outcome with `trigger`.
    pub(super) fn reload(&self, trigger: Trigger, force: bool) -> Result<Reloaded, ReloadError> {
        let mut last_read = self.lock();
        self.reload_locked(&mut last_read, trigger, force)
    }

    /// The file watch's reload: only if the file's stamp is still not the one last read, so a
    /// file that a SIGHUP or control-socket reload already read (and perhaps refused) is not
    /// read, and its refusal not logged, again.
    pub(super) fn reload_if_unread(&self, now: Stamp) {
        let mut last_read = self.lock();
        if *last_read != Some(now) {
            let _ = self.reload_locked(&mut last_read, Trigger::FileWatch, false);
        }
    }

    /// The stamp of the file as last read.
    pub(super) fn last_read(&self) -> Option<Stamp> {
        *self.lock()
    }

    /// Runs the guard on the catalog file against the catalog in force, applying nothing.
    pub(super) fn check(&self) -> Result<Reloaded, ReloadError> {
        let _serialised = self.lock();
        let newer = self.source.load().1?;
        let in_force = self.shared.catalog.load();
        let verdict = guard::check(&in_force, &newer, &self.shared.config.reload, false)?;
        Ok(summary(&in_force, &newer, verdict))
    }

    fn reload_locked(
        &self,
        last_read: &mut Option<Stamp>,
        trigger: Trigger,
        force: bool,
    ) -> Result<Reloaded, ReloadError> {
        let trigger_name = trigger.name();
        // Stamped before reading: a change after the stamp is seen (and read) again later.
        if let Source::File(path) = &self.source {
            *last_read = stamp(path);
        }
        let (revision, outcome) = self.apply(force);
        if let Some(revision) = revision {
            // Applied or not, the node has dealt with this revision: a `role` command waiting
            // for it learns which (crate::fleet::acks).
            let refused = outcome.as_ref().err().map(ToString::to_string);
            self.shared.fleet.acknowledge(Ack { revision, refused });
        }
        match &outcome {
            Ok(reloaded) => {
                if let Some(refusal) = reloaded.forced {
                    tracing::warn!(
                        trigger = trigger_name,
                        reason = %refusal,
                        "catalog reload forced past the reload guard"
                    );
                }
                tracing::info!(
                    trigger = trigger_name,
                    revision = self.shared.catalog_source.revision(),
                    branches = reloaded.branches,
                    roles = reloaded.roles,
                    changed_roles = reloaded.changed_roles,
                    changed_pools = reloaded.changed_pools,
                    "catalog reloaded"
                );
            }
            Err(ReloadError::Catalog(error)) => tracing::error!(
                trigger = trigger_name,
                %error,
                "catalog reload rejected; the previous catalog stays in force"
            ),
            Err(ReloadError::Refused(refusal)) => tracing::error!(
                trigger = trigger_name,
                reason = %refusal,
                "catalog reload refused, the previous catalog stays in force: to apply the file \
                 anyway, run `branchgate reload --force` (or set [reload] force = true)"
            ),
        }
        outcome
    }

    /// Loads the catalog and applies it if the guard (or `force`) lets it through; with the
    /// etcd revision it was loaded at.
    fn apply(&self, force: bool) -> (Option<i64>, Result<Reloaded, ReloadError>) {
        let (revision, newer) = self.source.load();
        (revision, self.apply_loaded(newer, revision, force))
    }

    fn apply_loaded(
        &self,
        newer: Result<Catalog, CatalogError>,
        revision: Option<i64>,
        force: bool,
    ) -> Result<Reloaded, ReloadError> {
        let shared = &self.shared;
        let newer = newer?;
        let in_force = shared.catalog.load();
        let verdict = guard::check(&in_force, &newer, &shared.config.reload, force)?;
        let reloaded = summary(&in_force, &newer, verdict);
        shared.upstreams.sync(&newer);
        shared.catalog.store(Arc::new(newer));
        if let Some(revision) = revision {
            shared.catalog_source.set_revision(revision);
        }
        if reloaded.changed_roles > 0 {
            // Each worker closes its sessions whose verifier is no longer in force.
            for mailbox in &shared.mailboxes {
                mailbox.request_sweep();
            }
        }
        Ok(reloaded)
    }
}

fn summary(in_force: &Catalog, newer: &Catalog, verdict: Verdict) -> Reloaded {
    Reloaded {
        branches: newer.branches().len(),
        roles: newer.branches().map(|b| b.roles().count()).sum(),
        changed_roles: in_force.changed_roles(newer).len(),
        changed_pools: in_force.changed_pools(newer).len(),
        forced: match verdict {
            Verdict::Apply(_) => None,
            Verdict::Forced(refusal) => Some(refusal),
        },
    }
}

/// The file watch's memory between two looks at the catalog file.
#[derive(Debug)]
pub(super) struct Watch {
    previous: Option<Stamp>,
}

impl Watch {
    /// A watch whose first look at the file was `first`.
    pub(super) fn new(first: Option<Stamp>) -> Watch {
        Watch { previous: first }
    }

    /// Given the stamp seen now: the stamp to reload, if any. A change is reloaded once two
    /// looks in a row see the same new stamp, so a file an editor is still writing in place is
    /// not read half-written (the `role` command replaces it atomically anyway); a file that is
    /// gone is left to the next change.
    pub(super) fn look(&mut self, now: Option<Stamp>, last_read: Option<Stamp>) -> Option<Stamp> {
        let settled = now == self.previous;
        self.previous = now;
        now.filter(|_| settled && now != last_read)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(seconds: u64, len: u64) -> Option<Stamp> {
        Some((SystemTime::UNIX_EPOCH + Duration::from_secs(seconds), len))
    }

    #[test]
    fn the_watch_reloads_a_settled_change_once() {
        let loaded = at(1, 100);
        let mut watch = Watch::new(loaded);
        assert_eq!(watch.look(loaded, loaded), None, "unchanged");
        assert_eq!(
            watch.look(at(2, 50), loaded),
            None,
            "changed, not settled yet"
        );
        assert_eq!(watch.look(at(3, 80), loaded), None, "still being written");
        assert_eq!(watch.look(at(3, 80), loaded), at(3, 80), "settled");
        // The reload read it (and maybe refused it): not again until the file changes.
        for _ in 0..3 {
            assert_eq!(watch.look(at(3, 80), at(3, 80)), None);
        }
        assert_eq!(watch.look(at(4, 80), at(3, 80)), None);
        assert_eq!(watch.look(at(4, 80), at(3, 80)), at(4, 80));
    }

    #[test]
    fn the_watch_skips_what_another_reload_read_and_missing_files() {
        let mut watch = Watch::new(at(1, 100));
        assert_eq!(watch.look(at(2, 100), at(1, 100)), None);
        // A SIGHUP or control-socket reload read the new file in between.
        assert_eq!(watch.look(at(2, 100), at(2, 100)), None);
        assert_eq!(watch.look(None, at(2, 100)), None, "file gone");
        assert_eq!(watch.look(None, at(2, 100)), None, "still gone");
        assert_eq!(watch.look(at(2, 100), at(2, 100)), None, "back as it was");
    }

    #[test]
    fn summaries_say_what_was_forced() {
        let one = Reloaded {
            branches: 1,
            roles: 1,
            changed_roles: 1,
            changed_pools: 0,
            forced: None,
        };
        assert_eq!(
            one.to_string(),
            "1 branch, 1 role, 1 role changed or removed"
        );
        let reloaded = Reloaded {
            branches: 0,
            roles: 0,
            changed_roles: 3,
            changed_pools: 0,
            forced: Some(Refusal::EveryBranch(2)),
        };
        assert_eq!(
            reloaded.to_string(),
            "0 branches, 0 roles, 3 roles changed or removed; forced: removes every branch (2 of 2)"
        );
        let pools = Reloaded {
            branches: 2,
            roles: 3,
            changed_roles: 0,
            changed_pools: 1,
            forced: None,
        };
        assert_eq!(
            pools.to_string(),
            "2 branches, 3 roles, 0 roles changed or removed, 1 branch with new pool settings"
        );
        let refused = ReloadError::Refused(Refusal::EveryRole(4));
        assert_eq!(
            refused.to_string(),
            "the new catalog removes every role (4 of 4); the catalog in force is kept"
        );
    }
}
