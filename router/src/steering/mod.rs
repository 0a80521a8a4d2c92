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
//! # Cost
//! [`Steering::remember`] is one map update system call per authenticated client (the front door
//! calls it once the client has proved it may use the branch), plus one more the first time a
//! slot is seen. [`Steering::set_load`] is one per connection that starts or ends on a worker.
//! Each map sits behind its own mutex, held only for that one system call.

pub mod ebpf;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

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
}

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
        })
    }

    /// No program: the kernel's hash (for tests that build a router's state by hand).
    pub fn off(workers: usize) -> Self {
        Self {
            ebpf: None,
            mode: SteeringMode::Off,
            accepted: (0..workers).map(|_| WorkerCount::default()).collect(),
        }
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
        match &self.ebpf {
            Some(ebpf) => ebpf.remember(client, slot),
            None => Ok(()),
        }
    }

    /// Make `worker` the owner of branch slot `slot`.
    pub fn set_owner(&self, slot: u32, worker: u32) -> Result<(), SteeringError> {
        match &self.ebpf {
            Some(ebpf) => ebpf.set_owner(slot, worker),
            None => Ok(()),
        }
    }

    /// The worker that owns branch slot `slot`: with the program, what the router wrote into
    /// its `owners` map (the router keeps its own copy of it: no system call); for a slot it
    /// wrote nothing for, and in the other modes, [`default_owner`]. With `"off"` nobody acts
    /// on it (see [`Steering::hands_off`]).
    pub fn owner(&self, slot: u32) -> u32 {
        let workers = u32::try_from(self.accepted.len()).unwrap_or(u32::MAX);
        self.ebpf
            .as_ref()
            .and_then(|ebpf| ebpf.owner(slot))
            .unwrap_or_else(|| default_owner(slot, workers))
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
