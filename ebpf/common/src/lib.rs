//! Map key and value types shared by the `sk_reuseport` program (ebpf/program) and the router
//! (`branchgate::steering`). Every type is `#[repr(C)]` with its padding spelled out, so the
//! kernel, the program and user space agree on every byte; flags are `u32`, never `bool`.
//!
//! The maps, one set per listening port (`/sys/fs/bpf/branchgate/<listener>/`):
//! - `sockets` (REUSEPORT_SOCKARRAY, [`MAX_WORKERS`]): worker index -> that worker's listener.
//! - `clients` (LRU hash, [`MAX_CLIENTS`]): [`ClientKey`] -> [`BranchSlot`], filled by user space
//!   once a client's startup packet has named its branch.
//! - `owners` (array, [`BRANCH_SLOTS`]): branch slot -> [`Owner`], the worker a branch lives on.
//! - `load` (array, [`MAX_WORKERS`]): worker index -> `u32` load kept current by user space.
//! - `counters` (per-CPU array, [`COUNTERS`]): `u64` counts at [`HIT`], [`MISS`], [`EMPTY_SLOT`],
//!   [`SELECT_ERROR`].
#![no_std]

/// Largest number of workers the program can steer to (sockarray and load array size).
pub const MAX_WORKERS: u32 = 128;

/// Client addresses remembered (LRU: the least recently used are forgotten first).
pub const MAX_CLIENTS: u32 = 65_536;

/// Branch slots: a branch's slot is a hash of its id modulo this (see `branchgate::steering`).
/// Branches whose ids hash to one slot share an owner.
pub const BRANCH_SLOTS: u32 = 16_384;

/// Counter index: a remembered client whose branch slot has an owner.
pub const HIT: u32 = 0;
/// Counter index: an unknown client, or a known one whose slot has no owner: least loaded.
pub const MISS: u32 = 1;
/// Counter index: the chosen worker's sockarray slot held no socket (kernel hash instead).
pub const EMPTY_SLOT: u32 = 2;
/// Counter index: selecting the chosen socket failed otherwise (kernel hash instead).
pub const SELECT_ERROR: u32 = 3;
/// Number of counters.
pub const COUNTERS: u32 = 4;

/// Name of the program's global holding the number of workers (set when loading).
pub const WORKERS_GLOBAL: &str = "WORKERS";

/// A client's address: IPv6, or IPv4 as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), so one
/// key type serves both families. Network byte order, as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// The 16 address bytes.
    pub addr: [u8; 16],
}

impl ClientKey {
    /// The key of an IPv4 address, given as its 4 bytes in network order.
    pub const fn v4(octets: [u8; 4]) -> Self {
        let [a, b, c, d] = octets;
        Self {
            addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d],
        }
    }

    /// The key of an IPv6 address, given as its 16 bytes in network order.
    pub const fn v6(octets: [u8; 16]) -> Self {
        Self { addr: octets }
    }
}

/// The branch slot a remembered client's branch hashes to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BranchSlot {
    /// Index into `owners`, below [`BRANCH_SLOTS`].
    pub slot: u32,
    /// Explicit padding to 8 bytes; always 0.
    pub _pad: u32,
}

/// Who owns a branch slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The owning worker's index (the `sockets` index); meaningful only with [`OWNER_SET`].
    pub worker: u32,
    /// [`OWNER_SET`] once user space has set an owner: an array's entries start zeroed, and
    /// worker 0 is a real worker.
    pub flags: u32,
}

/// [`Owner::flags`]: the slot has an owner.
pub const OWNER_SET: u32 = 1;

#[cfg(feature = "user")]
mod user {
    // SAFETY (all three): `#[repr(C)]` plain integers and byte arrays with no implicit padding
    // (every padding byte is a named field), so every bit pattern is valid.
    unsafe impl aya::Pod for super::ClientKey {}
    unsafe impl aya::Pod for super::BranchSlot {}
    unsafe impl aya::Pod for super::Owner {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<ClientKey>(), 16);
        assert_eq!(core::mem::size_of::<BranchSlot>(), 8);
        assert_eq!(core::mem::size_of::<Owner>(), 8);
    }

    #[test]
    fn ipv4_keys_are_ipv4_mapped() {
        assert_eq!(
            ClientKey::v4([127, 0, 0, 1]).addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]
        );
    }
}
