//! Backend servers as the router sees them: outstanding connections and health.
//!
//! Replica choice is "least outstanding connections among healthy replicas". The counters are
//! shared by all workers (atomics, no locks); the address map is rebuilt on catalog reload and
//! read through `ArcSwap`. A health thread probes every address with a TCP connect; a failed
//! backend connect also marks the address unhealthy at once.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::catalog::Catalog;

/// How long one health probe may take.
pub const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// One backend address.
#[derive(Debug)]
pub struct Upstream {
    /// The address.
    pub addr: SocketAddr,
    active: AtomicU32,
    healthy: AtomicBool,
}

impl Upstream {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            active: AtomicU32::new(0),
            // Optimistic until a probe or a connect says otherwise.
            healthy: AtomicBool::new(true),
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

    /// Record the outcome of a probe or a connect.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
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

    /// Probe every address once (blocking; run on the health thread).
    pub fn probe_all(&self) {
        let map = self.map.load_full();
        for upstream in map.values() {
            let healthy = TcpStream::connect_timeout(&upstream.addr, HEALTH_PROBE_TIMEOUT).is_ok();
            if healthy != upstream.is_healthy() {
                tracing::info!(addr = %upstream.addr, healthy, "backend health changed");
            }
            upstream.set_healthy(healthy);
        }
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
    fn guard_releases() {
        let u = upstreams(&[addr(1)]);
        {
            let _g = Upstreams::hold(u.get(addr(1)));
            assert_eq!(u.get(addr(1)).active(), 1);
        }
        assert_eq!(u.get(addr(1)).active(), 0);
    }
}
