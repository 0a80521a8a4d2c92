//! branchgate's `sk_reuseport` program: picks the worker that accepts each new connection.
//!
//! Attached to each listening port's SO_REUSEPORT group (one listener per worker; one entry
//! point and one socket array per port, the other maps shared). For each SYN
//! it reads the client's source address from the IP header, looks it up in `clients` (filled by
//! the router once a startup packet from that address named a branch), and on a hit selects the
//! worker that `owners` names for the branch's slot; on a miss (unknown client, or a slot without
//! an owner) the least-loaded worker in `load`. The maps' layouts are in
//! `branchgate-ebpf-common`.
//!
//! It never refuses a connection: when the chosen worker's `sockets` slot is empty or the
//! selection fails, it returns SK_PASS without a selection and the kernel picks by hash.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_hdr_start_off::BPF_HDR_START_NET, sk_action::SK_PASS},
    helpers::generated::bpf_skb_load_bytes_relative,
    macros::{map, sk_reuseport},
    maps::{Array, LruHashMap, PerCpuArray, ReusePortSockArray},
    programs::SkReuseportContext,
    EbpfContext as _,
};
use branchgate_ebpf_common::{
    BranchSlot, ClientKey, Owner, BRANCH_SLOTS, COUNTERS, EMPTY_SLOT, HIT, MAX_CLIENTS,
    MAX_WORKERS, MISS, OWNER_SET, SELECT_ERROR,
};

/// `ETH_P_IP` and `ETH_P_IPV6` as `sk_reuseport_md.eth_protocol` holds them: network order.
const ETH_P_IP: u32 = u16::to_be(0x0800) as u32;
const ETH_P_IPV6: u32 = u16::to_be(0x86dd) as u32;
const IPPROTO_TCP: u32 = 6;
/// Offsets of the source address from the start of the network header.
const IPV4_SADDR_OFFSET: u32 = 12;
const IPV6_SADDR_OFFSET: u32 = 8;
/// `-ENOENT` from bpf_sk_select_reuseport: no socket at that index.
const ENOENT: i64 = 2;

/// Number of workers, set by the loader (`WORKERS_GLOBAL`).
#[no_mangle]
static WORKERS: u32 = 0;

/// Each worker's listener on the direct port (index = worker).
#[map(name = "sockets_direct")]
static SOCKETS_DIRECT: ReusePortSockArray = ReusePortSockArray::with_max_entries(MAX_WORKERS, 0);

/// Each worker's listener on the pooled port (index = worker).
#[map(name = "sockets_pooled")]
static SOCKETS_POOLED: ReusePortSockArray = ReusePortSockArray::with_max_entries(MAX_WORKERS, 0);

#[map(name = "clients")]
static CLIENTS: LruHashMap<ClientKey, BranchSlot> = LruHashMap::with_max_entries(MAX_CLIENTS, 0);

#[map(name = "owners")]
static OWNERS: Array<Owner> = Array::with_max_entries(BRANCH_SLOTS, 0);

#[map(name = "load")]
static LOAD: Array<u32> = Array::with_max_entries(MAX_WORKERS, 0);

#[map(name = "counters")]
static COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

/// The direct port's reuseport group.
#[sk_reuseport(migrate)]
pub fn steer_direct(ctx: SkReuseportContext) -> u32 {
    steer(&ctx, &SOCKETS_DIRECT)
}

/// The pooled port's reuseport group.
#[sk_reuseport(migrate)]
pub fn steer_pooled(ctx: SkReuseportContext) -> u32 {
    steer(&ctx, &SOCKETS_POOLED)
}

/// Selects the worker for one new connection from `sockets`, its port's listeners.
#[inline(always)]
fn steer(ctx: &SkReuseportContext, sockets: &ReusePortSockArray) -> u32 {
    if ctx.ip_protocol() != IPPROTO_TCP {
        return SK_PASS;
    }
    let owner = client_key(ctx)
        .and_then(|key| unsafe { CLIENTS.get(&key) }.copied())
        .and_then(|branch| OWNERS.get(branch.slot).copied())
        .filter(|owner| owner.flags & OWNER_SET != 0);
    let worker = match owner {
        Some(owner) => {
            count(HIT);
            owner.worker
        }
        None => {
            count(MISS);
            match least_loaded(ctx) {
                Some(worker) => worker,
                None => return SK_PASS,
            }
        }
    };
    match sockets.select_reuseport(ctx, worker) {
        Ok(()) => {}
        Err(error) if error == -ENOENT => count(EMPTY_SLOT),
        Err(_) => count(SELECT_ERROR),
    }
    SK_PASS
}

/// The client's source address, read from the IP header: the context's data starts past it
/// (at the TCP header), so the read is relative to the network header.
///
/// Every store has a constant offset: the verifier refuses pointer arithmetic with a variable
/// on the stack to a loader without CAP_PERFMON (Spectre v1), and the unit in deploy/ grants only
/// CAP_BPF and CAP_NET_ADMIN.
#[inline(always)]
fn client_key(ctx: &SkReuseportContext) -> Option<ClientKey> {
    match ctx.eth_protocol() {
        ETH_P_IP => {
            let mut v4 = [0u8; 4];
            // SAFETY: writes 4 bytes into `v4`, which holds 4.
            let read = unsafe {
                bpf_skb_load_bytes_relative(
                    ctx.as_ptr(),
                    IPV4_SADDR_OFFSET,
                    v4.as_mut_ptr().cast(),
                    4,
                    BPF_HDR_START_NET,
                )
            };
            (read == 0).then(|| ClientKey::v4(v4))
        }
        ETH_P_IPV6 => {
            // Not zeroed first: `[0; 16]` is a memset loop the verifier refuses (above); the
            // helper fills all of it or fails.
            let mut addr = core::mem::MaybeUninit::<[u8; 16]>::uninit();
            // SAFETY: writes 16 bytes into `addr`, which holds 16.
            let read = unsafe {
                bpf_skb_load_bytes_relative(
                    ctx.as_ptr(),
                    IPV6_SADDR_OFFSET,
                    addr.as_mut_ptr().cast(),
                    16,
                    BPF_HDR_START_NET,
                )
            };
            // SAFETY: a successful read wrote all 16 bytes.
            (read == 0).then(|| ClientKey::v6(unsafe { addr.assume_init() }))
        }
        _ => None,
    }
}

/// The worker with the least load; ties go to the first one from a start the packet's hash
/// picks, so equal workers share new clients. `None` before the loader set `WORKERS`.
#[inline(always)]
fn least_loaded(ctx: &SkReuseportContext) -> Option<u32> {
    // SAFETY: a plain read of a global the loader set; volatile so that the compiler does not
    // fold the 0 it was compiled with.
    let workers = unsafe { core::ptr::read_volatile(&WORKERS) };
    if workers == 0 || workers > MAX_WORKERS {
        return None;
    }
    let start = ctx.hash() % workers;
    let mut best = start;
    let mut best_load = u32::MAX;
    let mut i = 0;
    while i < MAX_WORKERS && i < workers {
        let mut worker = start + i;
        if worker >= workers {
            worker -= workers;
        }
        if let Some(&load) = LOAD.get(worker) {
            if load < best_load {
                best = worker;
                best_load = load;
            }
        }
        i += 1;
    }
    Some(best)
}

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = COUNTS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot: nothing else writes it while this program runs on this CPU.
        unsafe { *counter += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
