//! Backend servers as the router sees them: outstanding connections and health.
//!
//! Replica choice is "least outstanding connections among healthy replicas". The counters are
//! shared by all workers (atomics, no locks); the address map is rebuilt on catalog reload and
//! read through `ArcSwap`.
//!
//! Health comes from two sources. A health thread probes every address each
//! `timeouts.health_check_interval`: a StartupMessage must be answered with an authentication
//! request, which proves a PostgreSQL server that accepts connections (a port that takes TCP
//! but is not PostgreSQL, or a server that is starting up, shutting down or full, fails). And
//! sessions report what they find: a failed connect or an "unavailable" refusal marks the
//! address unhealthy until the next good probe; a replica address whose server says it is not a
//! standby (`in_hot_standby = off`: promoted, or a primary listed as a replica) is held down for
//! [`NOT_A_STANDBY_HOLD`], since a probe cannot tell a primary from a standby without logging in.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::catalog::Catalog;
use crate::protocol::backend::{self as msg, ErrorFields};
use crate::protocol::sqlstate::SqlState;
use crate::protocol::{frame, write};

/// How long one health probe may take, connect and answer together.
pub const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Probes run at most this many at a time (one thread each), so a round over many unreachable
/// addresses takes about `addresses / PROBE_THREADS` probe timeouts, not one per address.
pub const PROBE_THREADS: usize = 8;

/// How long a replica address whose server said it is not a standby stays out of rotation.
pub const NOT_A_STANDBY_HOLD: Duration = Duration::from_secs(30);

/// The user name probes log in with; they hang up before authenticating, so it need not exist
/// (PostgreSQL logs nothing for a client that leaves during authentication).
const PROBE_USER: &str = "branchgate_health_probe";

/// Largest answer a probe reads: an ErrorResponse with its message fits easily.
const PROBE_ANSWER_BYTES: usize = 4096;

/// Milliseconds since the first call in this process: a clock cheap to keep in an atomic.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One backend address.
#[derive(Debug)]
pub struct Upstream {
    /// The address.
    pub addr: SocketAddr,
    active: AtomicU32,
    healthy: AtomicBool,
    /// Until when (in [`now_ms`]) a good probe may not mark it healthy again.
    held_until_ms: AtomicU64,
}

impl Upstream {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            active: AtomicU32::new(0),
            // Optimistic until a probe or a connect says otherwise.
            healthy: AtomicBool::new(true),
            held_until_ms: AtomicU64::new(0),
        }
    }

    /// Connections currently held to this backend by clients.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Last known health.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Record the outcome of a session's connect.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Take the address out of rotation for at least `hold`, whatever probes say meanwhile.
    pub fn hold_down(&self, hold: Duration) {
        let until = now_ms().saturating_add(u64::try_from(hold.as_millis()).unwrap_or(u64::MAX));
        self.held_until_ms.fetch_max(until, Ordering::Relaxed);
        self.set_healthy(false);
    }

    /// Record a probe's outcome; a good one does not end a hold-down early.
    fn probed(&self, outcome: &Result<(), ProbeError>) {
        let healthy = outcome.is_ok() && now_ms() >= self.held_until_ms.load(Ordering::Relaxed);
        if healthy != self.is_healthy() {
            match outcome {
                Ok(()) if healthy => tracing::info!(addr = %self.addr, "backend healthy again"),
                Ok(()) => {}
                Err(error) => tracing::warn!(addr = %self.addr, %error, "backend unhealthy"),
            }
        }
        self.set_healthy(healthy);
    }
}

/// Counts one client connection against an upstream for as long as it lives.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Upstream>);

impl ActiveGuard {
    /// The upstream held.
    pub fn upstream(&self) -> &Upstream {
        &self.0
    }

    /// The upstream held, shared.
    pub fn shared(&self) -> Arc<Upstream> {
        self.0.clone()
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// All known backend addresses.
#[derive(Debug, Default)]
pub struct Upstreams {
    map: ArcSwap<HashMap<SocketAddr, Arc<Upstream>>>,
}

impl Upstreams {
    /// Make the map hold exactly the catalog's addresses, keeping the state of known ones.
    pub fn sync(&self, catalog: &Catalog) {
        let old = self.map.load();
        let mut map = HashMap::new();
        for branch in catalog.branches() {
            for addr in std::iter::once(&branch.primary).chain(branch.replicas.iter()) {
                let upstream = old
                    .get(addr)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Upstream::new(*addr)));
                map.insert(*addr, upstream);
            }
        }
        self.map.store(Arc::new(map));
    }

    /// The state of `addr` (a fresh, untracked one if the catalog changed under us).
    pub fn get(&self, addr: SocketAddr) -> Arc<Upstream> {
        self.map
            .load()
            .get(&addr)
            .cloned()
            .unwrap_or_else(|| Arc::new(Upstream::new(addr)))
    }

    /// Each known address: its connections now and whether it is healthy (for `/metrics`).
    pub fn snapshot(&self) -> Vec<(SocketAddr, u32, bool)> {
        let mut all: Vec<_> = self
            .map
            .load()
            .values()
            .map(|u| (u.addr, u.active(), u.is_healthy()))
            .collect();
        all.sort_by_key(|(addr, ..)| *addr);
        all
    }

    /// Count a connection to `upstream`.
    pub fn hold(upstream: Arc<Upstream>) -> ActiveGuard {
        upstream.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(upstream)
    }

    /// The healthy replica with the fewest connections, skipping `exclude` (ones that just failed).
    pub fn pick_replica(
        &self,
        replicas: &[SocketAddr],
        exclude: &[SocketAddr],
    ) -> Option<Arc<Upstream>> {
        let map = self.map.load();
        replicas
            .iter()
            .filter(|addr| !exclude.contains(addr))
            .filter_map(|addr| map.get(addr))
            .filter(|upstream| upstream.is_healthy())
            .min_by_key(|upstream| upstream.active())
            .cloned()
    }

    /// Probe every address once, [`PROBE_THREADS`] at a time (blocking; run on the health
    /// thread). Returns when every probe has ended, each within [`HEALTH_PROBE_TIMEOUT`]; once
    /// `stopping` is set no new probe starts, so a shutdown waits for one probe at most.
    pub fn probe_all(&self, stopping: &AtomicBool) {
        let map = self.map.load_full();
        let upstreams: Vec<&Arc<Upstream>> = map.values().collect();
        let per_thread = upstreams.len().div_ceil(PROBE_THREADS).max(1);
        std::thread::scope(|scope| {
            for share in upstreams.chunks(per_thread) {
                scope.spawn(move || {
                    for upstream in share {
                        if stopping.load(Ordering::Relaxed) {
                            return;
                        }
                        upstream.probed(&probe(upstream.addr, HEALTH_PROBE_TIMEOUT));
                    }
                });
            }
        });
    }
}

/// Why a probe found an address unhealthy.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// TCP connect failed or timed out.
    #[error("connect: {0}")]
    Connect(io::Error),
    /// The socket failed, or the answer did not come in time.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// The server closed without answering the StartupMessage.
    #[error("closed without answering")]
    Closed,
    /// What came back is not a PostgreSQL server accepting connections.
    #[error("not a PostgreSQL answer: {0}")]
    NotPostgres(&'static str),
    /// The server refused because of its own state (starting up, shutting down, full).
    #[error("refuses connections: {code} {message}")]
    Unavailable {
        /// SQLSTATE.
        code: String,
        /// The server's message.
        message: String,
    },
}

/// One probe: connect, send a StartupMessage, and read the first answer. An authentication
/// request (or any refusal about the user or database, which only a running server gives) is
/// healthy; an "unavailable" ErrorResponse, anything else, or silence until `timeout` is not.
pub fn probe(addr: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(ProbeError::Connect)?;
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))
    };
    stream.set_write_timeout(Some(remaining()?))?;
    let mut startup = Vec::with_capacity(96);
    write::startup_message(
        &mut startup,
        [
            ("user", PROBE_USER),
            ("database", "postgres"),
            ("application_name", "branchgate health probe"),
        ],
    );
    stream.write_all(&startup)?;
    let mut answer = [0u8; PROBE_ANSWER_BYTES];
    let mut filled = 0;
    let header = loop {
        match frame::check(&answer[..filled], PROBE_ANSWER_BYTES) {
            Ok(Some(header)) => break header,
            Ok(None) => {}
            Err(_) => return Err(ProbeError::NotPostgres("bad message length")),
        }
        stream.set_read_timeout(Some(remaining()?))?;
        let n = stream.read(&mut answer[filled..])?;
        if n == 0 {
            return Err(ProbeError::Closed);
        }
        filled += n;
    };
    let body = frame::body(&answer[..header.len], header);
    match header.tag {
        msg::AUTHENTICATION => Ok(()),
        msg::ERROR_RESPONSE => {
            let fields = ErrorFields::parse(body)
                .map_err(|_| ProbeError::NotPostgres("bad ErrorResponse"))?;
            if SqlState::means_server_unavailable(fields.code.as_bytes()) {
                Err(ProbeError::Unavailable {
                    code: fields.code.into(),
                    message: fields.message.into(),
                })
            } else {
                Ok(())
            }
        }
        _ => Err(ProbeError::NotPostgres("unexpected first message")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn upstreams(addrs: &[SocketAddr]) -> Upstreams {
        let u = Upstreams::default();
        let map = addrs
            .iter()
            .map(|a| (*a, Arc::new(Upstream::new(*a))))
            .collect();
        u.map.store(Arc::new(map));
        u
    }

    #[test]
    fn least_connections_among_healthy() {
        let (a, b, c) = (addr(1), addr(2), addr(3));
        let u = upstreams(&[a, b, c]);
        let _g1 = Upstreams::hold(u.get(a));
        let _g2 = Upstreams::hold(u.get(a));
        let _g3 = Upstreams::hold(u.get(b));
        u.get(c).set_healthy(false);
        assert_eq!(u.pick_replica(&[a, b, c], &[]).map(|x| x.addr), Some(b));
        assert_eq!(u.pick_replica(&[a, b, c], &[b]).map(|x| x.addr), Some(a));
        u.get(a).set_healthy(false);
        u.get(b).set_healthy(false);
        assert!(u.pick_replica(&[a, b, c], &[]).is_none());
    }

    #[test]
    fn a_good_probe_does_not_end_a_hold_down() {
        let u = upstreams(&[addr(1)]);
        let up = u.get(addr(1));
        up.hold_down(Duration::from_secs(60));
        up.probed(&Ok(()));
        assert!(!up.is_healthy());
        assert!(u.pick_replica(&[addr(1)], &[]).is_none());
        up.held_until_ms.store(0, Ordering::Relaxed);
        up.probed(&Ok(()));
        assert!(up.is_healthy());
        up.probed(&Err(ProbeError::Closed));
        assert!(!up.is_healthy());
    }

    #[test]
    fn no_probe_starts_once_stopping() {
        // Nothing listens on port 1: a probe would mark it unhealthy.
        let u = upstreams(&[addr(1)]);
        u.probe_all(&AtomicBool::new(true));
        assert!(u.get(addr(1)).is_healthy());
        u.probe_all(&AtomicBool::new(false));
        assert!(!u.get(addr(1)).is_healthy());
    }

    #[test]
    fn guard_releases() {
        let u = upstreams(&[addr(1)]);
        {
            let _g = Upstreams::hold(u.get(addr(1)));
            assert_eq!(u.get(addr(1)).active(), 1);
        }
        assert_eq!(u.get(addr(1)).active(), 0);
    }
}
