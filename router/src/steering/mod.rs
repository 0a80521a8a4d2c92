//! Which worker accepts a new connection (`steering` in router.toml).
//!
//! Every worker has its own SO_REUSEPORT listener on each port, so the kernel chooses the worker
//! of each new connection. With `steering = "ebpf"` (the default) an `sk_reuseport` program
//! ([`ebpf`], source in ebpf/program) chooses instead: a client address the router has seen
//! name a branch goes to the worker that owns the branch's slot, any other to the least-loaded
//! worker. With `"userspace"` no program is loaded and the kernel's hash decides; with either,
//! a client that authenticated on a worker that does not own its branch is handed over to the
//! owner ([`crate::handoff`]), so a branch's clients meet on one worker. With `"off"` the
//! kernel's hash decides and each worker serves what it accepted.
//!
//! # Branch slots
//! The program cannot hash strings at SYN time, so user space gives it a number per branch: the
//! branch slot, [`branch_slot`], the 32-bit FNV-1a hash of the branch id's bytes modulo
//! [`BRANCH_SLOTS`]. FNV-1a because it is stable across processes, versions and machines (std's
//! hasher is seeded per process): a pinned map outlives a router. Branches whose ids share a slot
//! share an owner. A slot without an owner set by [`Steering::set_owner`] gets one the first time
//! a client of it is remembered: a jump consistent hash of the slot over the workers.
//!
//! # Following the load
//! Every mode keeps a count of authenticated sessions per branch slot
//! ([`Steering::session_started`]),
//! wherever they run. With `rebalance` set in router.toml (and a mode that hands off), a
//! control thread looks at them every so often ([`Steering::rebalance`]): when the sessions of
//! the slots one worker owns outweigh another's by enough, one slot moves to the lighter worker,
//! through the owner table alone (and the program's `owners` map, so both agree). Sessions
//! already open stay where they are; new ones follow the new owner. The decision counts each
//! slot's sessions on its owner, as they will be once sessions have turned over, so one move is
//! not repeated while the old sessions drain. A moved branch has two pools for a while (the
//! old owner's until its clients leave), which is why this is not on by default.
//!
//! # Cost
//! [`Steering::remember`] is one map update system call per authenticated client (the front door
//! calls it once the client has proved it may use the branch), plus one more the first time a
//! slot is seen. [`Steering::set_load`] is one per connection that starts or ends on a worker.
//! Each map sits behind its own mutex, held only for that one system call.

pub mod ebpf;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub use branchgate_ebpf_common::{BRANCH_SLOTS, MAX_WORKERS};

use crate::config::SteeringConfig;

pub use ebpf::{Counters, EbpfSteering, SteeringError};

/// The steering that runs (after any fallback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SteeringMode {
    /// The `sk_reuseport` program chooses.
    Ebpf,
    /// No program; the kernel's hash chooses, workers hand clients off to their branch's owner.
    Userspace,
    /// No program; the kernel's hash chooses, and no hand-off: each worker serves what it
    /// accepted.
    Off,
}

/// A worker's count of accepted connections, on its own cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct WorkerCount(AtomicU64);

/// The router's steering: the eBPF program and its maps when loaded, and per-worker counts of
/// accepted connections in every mode.
#[derive(Debug)]
pub struct Steering {
    ebpf: Option<EbpfSteering>,
    mode: SteeringMode,
    accepted: Box<[WorkerCount]>,
    /// Branch slot -> the owner set for it (`u32::MAX`: none, [`default_owner`] applies); the
    /// program's `owners` map holds the same.
    owners: Box<[AtomicU32]>,
    /// Branch slot -> authenticated sessions of its branches now, on any worker.
    sessions: Box<[AtomicU32]>,
    /// Slots [`Steering::rebalance`] moved.
    moves: AtomicU64,
}

/// A slot table of `u32`s, all `value`.
fn slot_table(value: u32) -> Box<[AtomicU32]> {
    (0..BRANCH_SLOTS).map(|_| AtomicU32::new(value)).collect()
}

/// A branch slot to move to a lighter worker ([`Steering::rebalance`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// The slot.
    pub slot: u32,
    /// Its sessions now.
    pub sessions: u32,
    /// The worker that owned it.
    pub from: u32,
    /// The worker that owns it now.
    pub to: u32,
}

/// Sessions a heavier worker must have over a lighter one before a slot moves, at the least.
pub const REBALANCE_MIN_GAP: u64 = 16;

/// The listening sockets of one port, one per worker (index = worker).
pub type PortListeners<'a> = &'a [std::net::TcpListener];

impl Steering {
    /// Starts what `config` asks for. The default falls back to userspace steering (one log
    /// line) when the program cannot be loaded; `steering = "ebpf"` written out fails instead.
    /// `name` names the pin directory (`/sys/fs/bpf/branchgate/<name>`).
    pub fn start(
        config: SteeringConfig,
        name: &str,
        direct: PortListeners<'_>,
        pooled: Option<PortListeners<'_>>,
    ) -> Result<Self, SteeringError> {
        let workers = direct.len();
        let (ebpf, mode) = match config {
            SteeringConfig::Off => (None, SteeringMode::Off),
            SteeringConfig::Userspace => (None, SteeringMode::Userspace),
            SteeringConfig::Ebpf { required } => match EbpfSteering::start(name, direct, pooled) {
                Ok(ebpf) => (Some(ebpf), SteeringMode::Ebpf),
                Err(error) if !required => {
                    tracing::warn!(
                        %error,
                        "eBPF steering unavailable, falling back to steering = \"userspace\" \
                         (needs root or CAP_BPF and CAP_NET_ADMIN)"
                    );
                    (None, SteeringMode::Userspace)
                }
                Err(error) => return Err(error),
            },
        };
        Ok(Self {
            ebpf,
            mode,
            accepted: (0..workers).map(|_| WorkerCount::default()).collect(),
            owners: slot_table(u32::MAX),
            sessions: slot_table(0),
            moves: AtomicU64::new(0),
        })
    }

    /// No program: the kernel's hash (for tests that build a router's state by hand).
    pub fn off(workers: usize) -> Self {
        Self {
            ebpf: None,
            mode: SteeringMode::Off,
            accepted: (0..workers).map(|_| WorkerCount::default()).collect(),
            owners: slot_table(u32::MAX),
            sessions: slot_table(0),
            moves: AtomicU64::new(0),
        }
    }

    fn workers(&self) -> u32 {
        u32::try_from(self.accepted.len()).unwrap_or(u32::MAX)
    }

    /// The steering that runs.
    pub fn mode(&self) -> SteeringMode {
        self.mode
    }

    /// The program and its maps, when loaded.
    pub fn ebpf(&self) -> Option<&EbpfSteering> {
        self.ebpf.as_ref()
    }

    /// Remember that `client` uses the branch in `slot`: its next connections go to the slot's
    /// owner. Gives the slot an owner if it has none. Nothing without the program.
    pub fn remember(&self, client: IpAddr, slot: u32) -> Result<(), SteeringError> {
        let Some(ebpf) = &self.ebpf else {
            return Ok(());
        };
        let owner = self
            .owners
            .get(slot as usize)
            .ok_or(SteeringError::NoSlot(slot))?;
        if owner.load(Ordering::Relaxed) == u32::MAX {
            self.set_owner(slot, default_owner(slot, self.workers()))?;
        }
        ebpf.remember(client, slot)
    }

    /// Make `worker` the owner of branch slot `slot`: in the router's table and, with the
    /// program, in its `owners` map (first: a failed map write changes nothing).
    pub fn set_owner(&self, slot: u32, worker: u32) -> Result<(), SteeringError> {
        if worker >= self.workers() {
            return Err(SteeringError::NoWorker(worker));
        }
        let owner = self
            .owners
            .get(slot as usize)
            .ok_or(SteeringError::NoSlot(slot))?;
        if let Some(ebpf) = &self.ebpf {
            ebpf.set_owner(slot, worker)?;
        }
        owner.store(worker, Ordering::Relaxed);
        Ok(())
    }

    /// The worker that owns branch slot `slot`: the one set for it ([`Steering::set_owner`],
    /// the router's own table: no system call), else [`default_owner`]. With `"off"` nobody
    /// acts on it (see [`Steering::hands_off`]).
    pub fn owner(&self, slot: u32) -> u32 {
        self.owners
            .get(slot as usize)
            .map(|owner| owner.load(Ordering::Relaxed))
            .filter(|&owner| owner != u32::MAX)
            .unwrap_or_else(|| default_owner(slot, self.workers()))
    }

    /// Counts an authenticated session of a branch in `slot`, until
    /// [`Steering::session_ended`] (the session's [`crate::worker::SessionSlot`] keeps the
    /// pair).
    pub fn session_started(&self, slot: u32) {
        if let Some(count) = self.sessions.get(slot as usize) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A session [`Steering::session_started`] counted has ended.
    pub fn session_ended(&self, slot: u32) {
        if let Some(count) = self.sessions.get(slot as usize) {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Slots [`Steering::rebalance`] has moved.
    pub fn moves(&self) -> u64 {
        self.moves.load(Ordering::Relaxed)
    }

    /// Sessions of the branches in `slot` now.
    pub fn sessions(&self, slot: u32) -> u32 {
        self.sessions
            .get(slot as usize)
            .map_or(0, |count| count.load(Ordering::Relaxed))
    }

    /// Moves one branch slot from the most loaded worker to the least loaded one when that
    /// evens them out by enough (see the module's "Following the load"); `None` when nothing
    /// moved (balanced, a mode that does not hand off, or the owner could not be written:
    /// logged).
    pub fn rebalance(&self) -> Option<Move> {
        if !self.hands_off() {
            return None;
        }
        let slots = self
            .sessions
            .iter()
            .enumerate()
            .filter_map(|(slot, count)| {
                let sessions = count.load(Ordering::Relaxed);
                let slot = u32::try_from(slot).ok()?;
                (sessions > 0).then(|| (slot, self.owner(slot), sessions))
            });
        let planned = plan_move(slots, self.workers())?;
        match self.set_owner(planned.slot, planned.to) {
            Ok(()) => {
                self.moves.fetch_add(1, Ordering::Relaxed);
                Some(planned)
            }
            Err(error) => {
                tracing::warn!(%error, ?planned, "could not move a branch slot");
                None
            }
        }
    }

    /// True when an authenticated client on a worker other than its branch's owner is handed
    /// over to the owner ([`crate::handoff`]): every mode but `"off"`, with more than one
    /// worker.
    pub fn hands_off(&self) -> bool {
        self.mode != SteeringMode::Off && self.accepted.len() > 1
    }

    /// Tell the program that `worker` has `load` connections.
    pub fn set_load(&self, worker: u32, load: u32) -> Result<(), SteeringError> {
        match &self.ebpf {
            Some(ebpf) => ebpf.set_load(worker, load),
            None => Ok(()),
        }
    }

    /// The program's counters, summed over CPUs and ports; `None` without the program.
    pub fn counters(&self) -> Option<Result<Counters, SteeringError>> {
        self.ebpf.as_ref().map(EbpfSteering::counters)
    }

    /// Removes the pinned maps: the router has stopped.
    pub fn unpin(&self) {
        if let Some(ebpf) = &self.ebpf {
            ebpf.unpin();
        }
    }

    /// Leaves the pinned maps' directory to the router that takes this one over.
    pub fn disown_pins(&self) {
        if let Some(ebpf) = &self.ebpf {
            ebpf.disown_pins();
        }
    }

    /// Count a connection `worker` accepted.
    pub fn count_accept(&self, worker: usize) {
        if let Some(count) = self.accepted.get(worker) {
            count.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Connections `worker` has accepted, on every port.
    pub fn accepted(&self, worker: usize) -> u64 {
        self.accepted
            .get(worker)
            .map_or(0, |count| count.0.load(Ordering::Relaxed))
    }
}

/// The move that best evens out the workers' sessions, counting each slot's `(slot, owner,
/// sessions)` on its owner: from the heaviest worker to the lightest, the slot whose sessions
/// come closest to half the gap (so the heaviest comes out lighter than it was, and the
/// lightest no heavier than the heaviest was). Only when the gap is at least
/// [`REBALANCE_MIN_GAP`] sessions and a fifth of the heaviest's: small or proportionally small
/// differences are not worth two pools for a branch.
pub fn plan_move(slots: impl Iterator<Item = (u32, u32, u32)>, workers: u32) -> Option<Move> {
    let workers_len = usize::try_from(workers).ok()?;
    if workers_len < 2 {
        return None;
    }
    let slots: Vec<(u32, u32, u32)> = slots.collect();
    let mut loads = vec![0u64; workers_len];
    for &(_, owner, sessions) in &slots {
        if let Some(load) = loads.get_mut(owner as usize) {
            *load += u64::from(sessions);
        }
    }
    let (heavy, &most) = loads.iter().enumerate().max_by_key(|&(_, load)| *load)?;
    let (light, &least) = loads.iter().enumerate().min_by_key(|&(_, load)| *load)?;
    let gap = most - least;
    if gap < REBALANCE_MIN_GAP.max(most / 5) {
        return None;
    }
    let (heavy, light) = (u32::try_from(heavy).ok()?, u32::try_from(light).ok()?);
    slots
        .iter()
        .filter(|&&(_, owner, sessions)| owner == heavy && u64::from(sessions) < gap)
        .min_by_key(|&&(slot, _, sessions)| (u64::from(sessions).abs_diff(gap / 2), slot))
        .map(|&(slot, _, sessions)| Move {
            slot,
            sessions,
            from: heavy,
            to: light,
        })
}

/// The branch slot of `branch_id`: 32-bit FNV-1a of its bytes, modulo [`BRANCH_SLOTS`].
pub fn branch_slot(branch_id: &str) -> u32 {
    const OFFSET: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    let hash = branch_id.bytes().fold(OFFSET, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(PRIME)
    });
    hash % BRANCH_SLOTS
}

/// The worker a slot goes to when nobody set its owner: jump consistent hash (Lamping and
/// Veach), so that adding a worker moves only a share of the slots.
pub fn default_owner(slot: u32, workers: u32) -> u32 {
    let mut key = u64::from(slot).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let (mut b, mut j) = (-1i64, 0i64);
    while j < i64::from(workers) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    u32::try_from(b.max(0)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_slots_are_fnv1a_of_the_id() {
        // FNV-1a("") is the offset basis; FNV-1a("a") = 0xe40c292c.
        assert_eq!(branch_slot(""), 0x811c_9dc5 % BRANCH_SLOTS);
        assert_eq!(branch_slot("a"), 0xe40c_292c % BRANCH_SLOTS);
        assert!(branch_slot("br-steady-dawn-123456") < BRANCH_SLOTS);
    }

    #[test]
    fn default_owners_are_workers_and_spread() {
        let mut seen = [0u32; 4];
        for slot in 0..1000 {
            let owner = default_owner(slot, 4);
            seen[owner as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
        assert_eq!(default_owner(7, 1), 0);
        // Growing from 4 to 5 workers moves a slot only to the new worker.
        for slot in 0..1000 {
            let (before, after) = (default_owner(slot, 4), default_owner(slot, 5));
            assert!(
                after == before || after == 4,
                "slot {slot}: {before} -> {after}"
            );
        }
    }

    #[test]
    fn owners_without_the_program_are_the_default_and_off_hands_nothing_off() {
        let steering = Steering::off(3);
        for slot in [0, 7, BRANCH_SLOTS - 1] {
            assert_eq!(steering.owner(slot), default_owner(slot, 3));
        }
        assert!(!steering.hands_off());
        let userspace = Steering {
            mode: SteeringMode::Userspace,
            ..Steering::off(2)
        };
        assert!(userspace.hands_off());
        let alone = Steering {
            mode: SteeringMode::Userspace,
            ..Steering::off(1)
        };
        assert!(!alone.hands_off());
    }

    #[test]
    fn a_move_evens_out_the_heaviest_and_lightest_workers() {
        // Worker 0 owns slots with 40, 30 and 6 sessions, worker 1 one with 10: the gap is 66,
        // and the slot closest to 33 (the 30) moves.
        let slots = [(1, 0, 40), (2, 0, 30), (3, 0, 6), (4, 1, 10)];
        assert_eq!(
            plan_move(slots.into_iter(), 2),
            Some(Move {
                slot: 2,
                sessions: 30,
                from: 0,
                to: 1
            })
        );
        // Once moved, the projection is 46 against 40: not worth another.
        let moved = [(1, 0, 40), (2, 1, 30), (3, 0, 6), (4, 1, 10)];
        assert_eq!(plan_move(moved.into_iter(), 2), None);
        // One slot holding everything: moving it would not make anything better.
        assert_eq!(plan_move([(9, 0, 500)].into_iter(), 2), None);
        // A small gap, or a single worker: nothing.
        assert_eq!(plan_move([(1, 0, 10), (2, 0, 5)].into_iter(), 2), None);
        assert_eq!(plan_move([(1, 0, 100), (2, 0, 50)].into_iter(), 1), None);
        // Three workers: from the heaviest to the idle one (50 and 40 are as close to 45:
        // the lower slot).
        let three = [(1, 0, 50), (2, 0, 40), (3, 1, 45)];
        assert_eq!(
            plan_move(three.into_iter(), 3).map(|m| (m.slot, m.from, m.to)),
            Some((1, 0, 2))
        );
    }

    #[test]
    fn sessions_count_per_slot_and_rebalancing_writes_the_owner() {
        let steering = Steering {
            mode: SteeringMode::Userspace,
            ..Steering::off(2)
        };
        // Slots owned by worker 0 by default.
        let zero: Vec<u32> = (0..BRANCH_SLOTS)
            .filter(|&s| default_owner(s, 2) == 0)
            .take(2)
            .collect();
        let (big, small) = (zero[0], zero[1]);
        (0..40).for_each(|_| steering.session_started(big));
        (0..25).for_each(|_| steering.session_started(small));
        assert_eq!((steering.sessions(big), steering.sessions(small)), (40, 25));
        // 65 against 0: 25 is closer to half of it than 40.
        let moved = steering.rebalance().expect("65 against 0");
        assert_eq!((moved.slot, moved.from, moved.to), (small, 0, 1));
        assert_eq!(steering.owner(small), 1);
        assert_eq!(steering.owner(big), 0);
        assert_eq!(steering.rebalance(), None, "40 against 25");
        (0..25).for_each(|_| steering.session_ended(small));
        assert_eq!(steering.sessions(small), 0);
        // With "off" nothing moves.
        let off = Steering::off(2);
        (0..70).for_each(|_| off.session_started(big));
        assert_eq!(off.rebalance(), None);
    }

    #[test]
    fn accepted_counts_per_worker() {
        let steering = Steering::off(2);
        steering.count_accept(1);
        steering.count_accept(1);
        steering.count_accept(5);
        assert_eq!((steering.accepted(0), steering.accepted(1)), (0, 2));
        assert_eq!(steering.mode(), SteeringMode::Off);
        assert!(steering.counters().is_none());
    }
}
