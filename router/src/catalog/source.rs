//! What `/metrics` says about where the catalog in force comes from: whether its source can be
//! read now, and (for etcd) which revision of it is in force.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// The catalog source's state, written by the reload path and the etcd follower, read by a
/// scrape (`branchgate_catalog_source_up`, `branchgate_catalog_revision`).
#[derive(Debug)]
pub struct SourceState {
    /// etcd (`true`) or a file.
    etcd: bool,
    /// Whether the source answered last time.
    up: AtomicBool,
    /// The etcd revision of the catalog in force; 0 before one is (or for a file).
    revision: AtomicI64,
}

impl SourceState {
    /// A catalog file: always "up" (a file that cannot be read is an error of one reload, logged
    /// as such, not a source that went away), no revision.
    pub fn file() -> SourceState {
        SourceState {
            etcd: false,
            up: AtomicBool::new(true),
            revision: AtomicI64::new(0),
        }
    }

    /// A catalog in etcd, not read yet.
    pub fn etcd() -> SourceState {
        SourceState {
            etcd: true,
            up: AtomicBool::new(false),
            revision: AtomicI64::new(0),
        }
    }

    /// `"etcd"` or `"file"`: the `source` label.
    pub fn kind(&self) -> &'static str {
        if self.etcd {
            "etcd"
        } else {
            "file"
        }
    }

    /// Whether the source answered last time it was asked (for etcd: the watch runs, or the
    /// last read succeeded).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The etcd revision the catalog in force was built from; `None` for a file, or before the
    /// first catalog from etcd is in force.
    pub fn revision(&self) -> Option<i64> {
        let revision = self.revision.load(Ordering::Relaxed);
        (self.etcd && revision > 0).then_some(revision)
    }

    /// The source answered (`true`) or did not.
    pub(crate) fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
    }

    /// A catalog built from etcd revision `revision` is in force.
    pub(crate) fn set_revision(&self, revision: i64) {
        self.revision.store(revision, Ordering::Relaxed);
    }
}
