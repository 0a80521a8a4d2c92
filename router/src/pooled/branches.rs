//! Each branch's pooled clients, on all workers: how many there are, how many transactions
//! hold a backend, and whether `branchgate pause` holds new ones back.

use std::sync::Arc;

/// Per branch, on all workers: its pooled clients (so `[pool] max_client_connections` holds
/// router-wide), its transactions holding a backend, and whether it is paused
/// (`branchgate pause`). The map is locked when a client logs in or leaves and by the control
/// socket; a transaction only touches its branch's atomics.
#[derive(Debug, Default)]
pub struct BranchClients(std::sync::Mutex<std::collections::HashMap<Box<str>, Arc<BranchEntry>>>);

/// One branch's counts.
#[derive(Debug, Default)]
pub struct BranchEntry {
    clients: std::sync::atomic::AtomicU32,
    active: std::sync::atomic::AtomicU32,
    paused: std::sync::atomic::AtomicBool,
}

impl BranchEntry {
    /// True while `branchgate pause` holds new transactions back.
    pub fn paused(&self) -> bool {
        self.paused.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Transactions of the branch holding a backend now.
    pub fn active(&self) -> u32 {
        self.active.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// A pooled client's place among its branch's; given back when dropped.
#[derive(Debug)]
pub struct BranchSlot {
    clients: Arc<BranchClients>,
    branch: Box<str>,
    pub(super) entry: Arc<BranchEntry>,
}

/// A transaction holding a backend, counted for `branchgate pause`.
#[derive(Debug)]
pub(super) struct ActiveTransaction(Arc<BranchEntry>);

impl Drop for ActiveTransaction {
    fn drop(&mut self) {
        self.0
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl BranchSlot {
    pub(super) fn transaction(&self) -> ActiveTransaction {
        self.entry
            .active
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        ActiveTransaction(self.entry.clone())
    }
}

impl BranchClients {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<Box<str>, Arc<BranchEntry>>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn entry(&self, branch: &str) -> Arc<BranchEntry> {
        self.lock().entry(branch.into()).or_default().clone()
    }

    /// A place for one more client of `branch`, or `None` when it has `max` already.
    pub fn enter(
        self: &Arc<Self>,
        branch: &str,
        max: Option<std::num::NonZeroU32>,
    ) -> Option<BranchSlot> {
        let entry = self.entry(branch);
        entry
            .clients
            .fetch_update(
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
                |n| match max {
                    Some(max) if n >= max.get() => None,
                    _ => Some(n + 1),
                },
            )
            .ok()?;
        Some(BranchSlot {
            clients: self.clone(),
            branch: branch.into(),
            entry,
        })
    }

    /// Pooled clients of `branch` now.
    pub fn count(&self, branch: &str) -> u32 {
        self.lock()
            .get(branch)
            .map_or(0, |e| e.clients.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Holds back new transactions of `branch`'s pooled clients (running ones finish).
    pub fn pause(&self, branch: &str) -> Arc<BranchEntry> {
        let entry = self.entry(branch);
        entry
            .paused
            .store(true, std::sync::atomic::Ordering::Release);
        entry
    }

    /// Lets them go again. False if the branch was not paused.
    pub fn resume(&self, branch: &str) -> bool {
        self.entry(branch)
            .paused
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }
}

impl Drop for BranchSlot {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        if self.entry.clients.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last client left: forget the branch unless it is paused (checked again
            // under the lock: another client may have come in meanwhile).
            let mut entries = self.clients.lock();
            let idle = |e: &BranchEntry| {
                e.clients.load(Ordering::Acquire) == 0 && !e.paused() && e.active() == 0
            };
            if entries.get(&self.branch).is_some_and(|e| idle(e)) {
                entries.remove(&self.branch);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_limits_count_across_workers_and_come_back() {
        let clients = Arc::new(BranchClients::default());
        let max = std::num::NonZeroU32::new(2);
        let a = clients.enter("b1", max).expect("first");
        let _b = clients.enter("b1", max).expect("second");
        assert!(clients.enter("b1", max).is_none());
        assert!(clients.enter("b2", max).is_some(), "another branch");
        drop(a);
        assert!(clients.enter("b1", max).is_some());
        assert!(clients.enter("b1", None).is_some(), "no limit");
    }
}
