//! The `sk_reuseport` program (ebpf/program, built by router/build.rs): loading it, filling its
//! socket arrays, attaching it to each port's reuseport group, pinning its maps, and the map
//! updates user space makes.
//!
//! One load serves both ports: the program has one entry point and one REUSEPORT_SOCKARRAY per
//! port (`steer_direct`/`sockets_direct`, `steer_pooled`/`sockets_pooled`; index = worker) and
//! shares `clients`, `owners`, `load` and `counters` between them, so a client is remembered
//! once for both ports. The maps are pinned under `/sys/fs/bpf/branchgate/<name>/` (`name`: the
//! direct listener's address, `127_0_0_1-5432`), replaced on start and removed when the router
//! stops; `bpftool map dump pinned /sys/fs/bpf/branchgate/<name>/counters` shows them.
//!
//! Needs root, or CAP_BPF and CAP_NET_ADMIN; Linux 5.3 or later (bounded loops).

use std::fs;
use std::io;
use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, ReusePortSockArray};
use aya::programs::{ProgramError, SkReuseport};
use aya::{Ebpf, EbpfError, EbpfLoader};
use branchgate_ebpf_common::{
    BranchSlot, ClientKey, Owner, BRANCH_SLOTS, EMPTY_SLOT, HIT, MAX_WORKERS, MISS, OWNER_SET,
    SELECT_ERROR, WORKERS_GLOBAL,
};

use super::PortListeners;

/// The program object built by build.rs (empty when built with `AYA_BUILD_SKIP=1`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/branchgate-ebpf"));

/// Where the maps are pinned: one directory per router, named after its direct listener.
pub const PIN_ROOT: &str = "/sys/fs/bpf/branchgate";
/// The BPF file system's mount point.
const BPFFS: &str = "/sys/fs/bpf";
/// `statfs.f_type` of a BPF file system.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The maps pinned, by their names in the program.
const CLIENTS: &str = "clients";
const OWNERS: &str = "owners";
const LOAD: &str = "load";
const COUNTERS: &str = "counters";

/// One port's program entry point and socket array.
struct PortNames {
    program: &'static str,
    sockets: &'static str,
}

const DIRECT: PortNames = PortNames {
    program: "steer_direct",
    sockets: "sockets_direct",
};
const POOLED: PortNames = PortNames {
    program: "steer_pooled",
    sockets: "sockets_pooled",
};

/// Why eBPF steering could not start, or a map update failed.
#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    /// The router was built with `AYA_BUILD_SKIP=1`: there is no program to load.
    #[error("the router was built without the eBPF program (AYA_BUILD_SKIP)")]
    NotBuilt,
    /// More workers than the program's arrays hold.
    #[error("{0} workers: eBPF steering handles at most {MAX_WORKERS}")]
    TooManyWorkers(usize),
    /// The kernel refused the object or one of its maps (often: not root, or no CAP_BPF).
    #[error("loading the eBPF program: {0}")]
    Load(#[from] EbpfError),
    /// The object lacks a program or map this code expects (built from other sources).
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    /// Loading or attaching a program failed.
    #[error("program {name}: {source}")]
    Program {
        /// The program.
        name: &'static str,
        /// Why.
        source: ProgramError,
    },
    /// A map operation failed.
    #[error("map {name}: {source}")]
    Map {
        /// The map.
        name: &'static str,
        /// Why.
        source: MapError,
    },
    /// A worker index beyond the router's workers.
    #[error("no worker {0}")]
    NoWorker(u32),
    /// A branch slot beyond [`BRANCH_SLOTS`].
    #[error("no branch slot {0}")]
    NoSlot(u32),
}

fn map_error(name: &'static str) -> impl FnOnce(MapError) -> SteeringError {
    move |source| SteeringError::Map { name, source }
}

/// The program's counters, summed over CPUs (and ports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Remembered clients sent to their branch's owner.
    pub hit: u64,
    /// Other clients, sent to the least-loaded worker.
    pub miss: u64,
    /// Choices whose socket-array slot was empty (the kernel's hash chose instead).
    pub empty_slot: u64,
    /// Choices the kernel refused otherwise (the kernel's hash chose instead).
    pub select_error: u64,
}

/// The loaded program and the maps user space writes.
pub struct EbpfSteering {
    /// Keeps the programs loaded (the reuseport groups hold them too) and the socket arrays.
    _ebpf: Ebpf,
    _sockets: Vec<ReusePortSockArray<MapData>>,
    clients: Mutex<HashMap<MapData, ClientKey, BranchSlot>>,
    owners: Mutex<Array<MapData, Owner>>,
    load: Mutex<Array<MapData, u32>>,
    counters: PerCpuArray<MapData, u64>,
    workers: u32,
    /// The pin directory, when the maps are pinned.
    pins: Pins,
}

impl std::fmt::Debug for EbpfSteering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfSteering")
            .field("workers", &self.workers)
            .field("pinned", &self.pins.0)
            .finish_non_exhaustive()
    }
}

/// A poisoned lock only means another thread panicked between two system calls: the map is
/// whole.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The pin directory name of a router whose direct listener is `addr`: `127_0_0_1-5432`,
/// `::1-5432` (bpffs reserves names with dots).
pub fn pin_name(addr: std::net::SocketAddr) -> String {
    format!("{}-{}", addr.ip(), addr.port()).replace('.', "_")
}

impl EbpfSteering {
    /// Loads the program, puts each worker's listener in its port's socket array, attaches the
    /// program to each port's reuseport group and pins the maps (a pinning failure is logged:
    /// steering works without the pins).
    pub fn start(
        name: &str,
        direct: PortListeners<'_>,
        pooled: Option<PortListeners<'_>>,
    ) -> Result<Self, SteeringError> {
        if OBJECT.is_empty() {
            return Err(SteeringError::NotBuilt);
        }
        let workers = u32::try_from(direct.len())
            .ok()
            .filter(|&n| n <= MAX_WORKERS)
            .ok_or(SteeringError::TooManyWorkers(direct.len()))?;
        let mut ebpf = EbpfLoader::new()
            .override_global(WORKERS_GLOBAL, &workers, true)
            .load(OBJECT)?;
        // Removes the directory again if start-up fails past this point.
        let pins = Pins::new(pin_dir(name));
        let mut sockets = Vec::with_capacity(2);
        let ports =
            std::iter::once((&DIRECT, direct)).chain(pooled.map(|pooled| (&POOLED, pooled)));
        for (names, listeners) in ports {
            let map = take_pinned(&mut ebpf, names.sockets, &pins)?;
            sockets.push(attach(&mut ebpf, names, map, listeners)?);
        }
        let mut take = |name| take_pinned(&mut ebpf, name, &pins);
        let clients = HashMap::try_from(take(CLIENTS)?).map_err(map_error(CLIENTS))?;
        let owners = Array::try_from(take(OWNERS)?).map_err(map_error(OWNERS))?;
        let load = Array::try_from(take(LOAD)?).map_err(map_error(LOAD))?;
        let counters = PerCpuArray::try_from(take(COUNTERS)?).map_err(map_error(COUNTERS))?;
        tracing::info!(
            workers,
            pinned = pins
                .0
                .as_ref()
                .map(|dir| tracing::field::display(dir.display())),
            "eBPF steering loaded"
        );
        Ok(Self {
            _ebpf: ebpf,
            _sockets: sockets,
            clients: Mutex::new(clients),
            owners: Mutex::new(owners),
            load: Mutex::new(load),
            counters,
            workers,
            pins,
        })
    }

    /// Files `client` under branch slot `slot` (see [`super::Steering::remember`], which
    /// gives the slot an owner first).
    pub fn remember(&self, client: IpAddr, slot: u32) -> Result<(), SteeringError> {
        let key = match client {
            IpAddr::V4(v4) => ClientKey::v4(v4.octets()),
            // A v4 client on a dual-stack listener arrives as an IPv4 packet: key it as IPv4.
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::v4(v4.octets()),
                None => ClientKey::v6(v6.octets()),
            },
        };
        lock(&self.clients)
            .insert(key, BranchSlot { slot, _pad: 0 }, 0)
            .map_err(map_error(CLIENTS))
    }

    /// Writes `worker` as the owner of `slot` into the `owners` map (see
    /// [`super::Steering::set_owner`], which keeps the router's own copy).
    pub fn set_owner(&self, slot: u32, worker: u32) -> Result<(), SteeringError> {
        if worker >= self.workers {
            return Err(SteeringError::NoWorker(worker));
        }
        if slot >= BRANCH_SLOTS {
            return Err(SteeringError::NoSlot(slot));
        }
        let value = Owner {
            worker,
            flags: OWNER_SET,
        };
        lock(&self.owners)
            .set(slot, value, 0)
            .map_err(map_error(OWNERS))
    }

    /// See [`super::Steering::set_load`].
    pub fn set_load(&self, worker: u32, load: u32) -> Result<(), SteeringError> {
        if worker >= self.workers {
            return Err(SteeringError::NoWorker(worker));
        }
        lock(&self.load)
            .set(worker, load, 0)
            .map_err(map_error(LOAD))
    }

    /// See [`super::Steering::counters`].
    pub fn counters(&self) -> Result<Counters, SteeringError> {
        let sum = |index: u32| {
            self.counters
                .get(&index, 0)
                .map(|values| values.iter().sum::<u64>())
                .map_err(map_error(COUNTERS))
        };
        Ok(Counters {
            hit: sum(HIT)?,
            miss: sum(MISS)?,
            empty_slot: sum(EMPTY_SLOT)?,
            select_error: sum(SELECT_ERROR)?,
        })
    }

    /// The directory the maps are pinned in, if they are.
    pub fn pinned(&self) -> Option<&Path> {
        self.pins.0.as_deref()
    }

    /// Removes the pinned maps (the router stops; the maps live on while anything uses them).
    pub fn unpin(&self) {
        self.pins.remove();
    }

    /// The pin directory is another router's now (it took this one over and pinned its own
    /// maps there): never remove it.
    pub fn disown_pins(&self) {
        self.pins.1.store(true, Ordering::Release);
    }
}

/// The pin directory, removed when dropped (or by [`EbpfSteering::unpin`]) unless another
/// router took it over ([`EbpfSteering::disown_pins`]).
#[derive(Debug)]
struct Pins(Option<PathBuf>, std::sync::atomic::AtomicBool);

impl Pins {
    fn new(dir: Option<PathBuf>) -> Self {
        Pins(dir, std::sync::atomic::AtomicBool::new(false))
    }

    fn remove(&self) {
        if self.1.load(Ordering::Acquire) {
            return;
        }
        if let Some(dir) = &self.0 {
            if let Err(error) = remove_pins(dir) {
                tracing::warn!(dir = %dir.display(), %error, "could not remove pinned maps");
            }
        }
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Takes map `name` out of the object, pinned in `pins`' directory (a failure to pin is logged).
fn take_pinned(ebpf: &mut Ebpf, name: &'static str, pins: &Pins) -> Result<Map, SteeringError> {
    let map = ebpf.take_map(name).ok_or(SteeringError::Missing(name))?;
    if let Some(dir) = &pins.0 {
        if let Err(error) = map.pin(dir.join(name)) {
            tracing::warn!(map = name, dir = %dir.display(), %error, "could not pin map");
        }
    }
    Ok(map)
}

/// Loads one port's entry point, fills its socket array with the workers' listeners and
/// attaches it to their reuseport group (through the first: any member stands for the group).
fn attach(
    ebpf: &mut Ebpf,
    names: &PortNames,
    map: Map,
    listeners: &[TcpListener],
) -> Result<ReusePortSockArray<MapData>, SteeringError> {
    let mut sockets = ReusePortSockArray::try_from(map).map_err(map_error(names.sockets))?;
    for (worker, listener) in (0u32..).zip(listeners) {
        sockets
            .set(worker, listener, 0)
            .map_err(map_error(names.sockets))?;
    }
    let program: &mut SkReuseport = ebpf
        .program_mut(names.program)
        .ok_or(SteeringError::Missing(names.program))?
        .try_into()
        .map_err(|source| SteeringError::Program {
            name: names.program,
            source,
        })?;
    let failed = |source| SteeringError::Program {
        name: names.program,
        source,
    };
    program.load().map_err(failed)?;
    let first = listeners.first().ok_or(SteeringError::NoWorker(0))?;
    program.attach(first).map_err(failed)?;
    Ok(sockets)
}

/// `/sys/fs/bpf/branchgate/<name>`, emptied and ready for pins; `None` (logged) when there is no
/// BPF file system and one cannot be mounted.
fn pin_dir(name: &str) -> Option<PathBuf> {
    if let Err(error) = ensure_bpffs() {
        tracing::warn!(
            %error,
            "maps not pinned: no BPF file system at {BPFFS} (mount -t bpf bpf {BPFFS})"
        );
        return None;
    }
    let dir = Path::new(PIN_ROOT).join(name);
    let ready = remove_pins(&dir).and_then(|()| fs::create_dir_all(&dir));
    match ready {
        Ok(()) => Some(dir),
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "maps not pinned");
            None
        }
    }
}

/// Removes a pin directory and the pins in it (a previous router's, or ours).
fn remove_pins(dir: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    for entry in entries {
        fs::remove_file(entry?.path())?;
    }
    fs::remove_dir(dir)
}

/// Makes sure a BPF file system is mounted at /sys/fs/bpf, mounting one if not (systemd does
/// at boot; containers often do not).
fn ensure_bpffs() -> io::Result<()> {
    if is_bpffs(Path::new(BPFFS))? {
        return Ok(());
    }
    let c = |s: &str| std::ffi::CString::new(s).map_err(io::Error::other);
    let (source, target, fstype) = (c("bpf")?, c(BPFFS)?, c("bpf")?);
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call and no data.
    let mounted = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if mounted != 0 {
        return Err(io::Error::last_os_error());
    }
    tracing::info!("mounted a BPF file system at {BPFFS}");
    Ok(())
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: statfs is plain data; zeroed is a valid value to be overwritten.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid statfs to write.
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        let error = io::Error::last_os_error();
        return match error.kind() {
            io::ErrorKind::NotFound => Ok(false),
            _ => Err(error),
        };
    }
    // `f_type`'s integer type differs between architectures (i64 on x86_64).
    #[allow(clippy::unnecessary_cast)]
    let f_type = stat.f_type as i64;
    Ok(f_type == BPF_FS_MAGIC)
}
