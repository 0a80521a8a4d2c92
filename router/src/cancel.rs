//! CancelRequest handling: an index of every session's key, and a per-source limit on guesses.
//!
//! The key a client holds is (backend pid, router-issued secret). Each session puts its key in
//! one [`CancelIndex`] shared by all workers, sharded by pid (a shard is a mutex held for one
//! hash-map operation: when a session starts, when it ends, and for a cancel request). A
//! CancelRequest may arrive on any worker, in plaintext or over TLS; that worker looks the key
//! up (the secret compared in constant time) and, on a match, sends the real CancelRequest to
//! the session's backend with the backend's own key. No other worker is involved, so a flood of
//! made-up keys fills no queue and displaces no real cancel. A wrong key does nothing and the
//! client is told nothing, as in PostgreSQL.
//!
//! Guessing is bounded per source ([`CancelLimiter`], one per worker): every key that matches
//! nothing costs its source a token; a source without tokens has its cancel requests ignored
//! until the tokens come back. Other sources are not affected. Floods are logged once per
//! interval, with counts. A right key cannot be used to flood the backend either: each session
//! has at most one cancel on its way to its backend at a time (a second one while the first is
//! still being delivered would cancel the same query), so the router opens at most one backend
//! connection per session for cancels.
//!
//! In a fleet (catalog in etcd, `[node] secret_file`), a key that matches nothing here, once
//! charged to its source, is handed to the peer thread ([`crate::fleet::peer`]), which forwards
//! it to the node(s) that may own it; the receiving node claims it in its own index just as
//! here. The worker never waits for that.

use std::collections::HashMap;
use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

use crate::protocol::startup::CancelKey;
use crate::throttle::LogThrottle;
use crate::upstream::Upstream;
use crate::worker::Worker;

/// Shards of the index: enough that workers registering sessions rarely meet on one.
const INDEX_SHARDS: usize = 64;

/// Unknown keys a source may send at once before its cancel requests are ignored.
pub const MISS_BURST: u32 = 16;
/// Unknown keys a source earns back per second.
pub const MISS_REFILL_PER_SECOND: u32 = 2;
/// Sources one worker's limiter remembers; beyond it, the idlest are forgotten.
pub const MAX_TRACKED_SOURCES: usize = 4096;

/// Where a session's cancel goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelTarget {
    /// The backend serving the session.
    pub backend: SocketAddr,
    /// The backend's own key (its BackendKeyData).
    pub key: CancelKey,
}

/// One session's key. Kept small (every session has one).
#[derive(Debug)]
struct Entry {
    secret: u32,
    session: Session,
    /// Tells apart two sessions whose backends (on different servers) have the same pid.
    id: u64,
    /// A cancel for this session is on its way to the backend ([`CancelClaim`]).
    sending: bool,
}

/// Where a session's cancel goes.
#[derive(Debug)]
enum Session {
    /// A direct session: its backend for life. The backend's pid is the key's own (the client
    /// is told its backend's pid), its address the upstream's.
    Direct {
        backend: Arc<Upstream>,
        /// The backend's own secret (its BackendKeyData).
        backend_secret: u32,
    },
    /// A pooled client: the backend it holds at the moment, if any.
    Pooled(Arc<PooledCancel>),
}

impl Entry {
    fn target(&self, pid: u32) -> Option<CancelTarget> {
        match &self.session {
            Session::Direct {
                backend,
                backend_secret,
            } => Some(CancelTarget {
                backend: backend.addr,
                key: CancelKey {
                    pid,
                    secret: *backend_secret,
                },
            }),
            Session::Pooled(pooled) => pooled.lock().held,
        }
    }
}

/// Which backend a pooled client holds, for its cancels. A cancel on its way to that backend
/// keeps the client from giving the backend back until it has been delivered, so it can never
/// cancel the next client's query there. A cancel that comes while the router's own statements
/// run ahead of the client's on that backend (the client's parameters, [`PooledCancel::hold`])
/// waits for their answer before it goes: it would stop them, not the client's query, and the
/// query would then run with the backend's previous client's settings (PgBouncer PR #298).
#[derive(Debug, Default)]
pub struct PooledCancel(Mutex<PooledState>);

#[derive(Debug, Default)]
struct PooledState {
    held: Option<CancelTarget>,
    in_flight: bool,
    /// The client giving its backend back waits for the cancel on its way.
    waker: Option<Waker>,
    /// The router's own statements run ahead of the client's on the held backend.
    setting_up: bool,
    /// A claimed cancel waits for the router's statements to be answered.
    cancel_waiter: Option<Waker>,
    /// The client is giving its backend back: a cancel still waiting is not sent.
    releasing: bool,
}

impl PooledCancel {
    fn lock(&self) -> MutexGuard<'_, PooledState> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The client holds the backend at `backend` (pid and secret its BackendKeyData);
    /// `setting_up`: the router's own statements go ahead of the client's there, and cancels
    /// wait until [`PooledCancel::set_up`].
    pub fn hold(&self, backend: SocketAddr, pid: u32, secret: u32, setting_up: bool) {
        let mut state = self.lock();
        state.held = Some(CancelTarget {
            backend,
            key: CancelKey { pid, secret },
        });
        state.setting_up = setting_up;
        state.releasing = false;
    }

    /// The router sends statements of its own ahead of the client's next ones on the held
    /// backend (the client's parameters again, mid-transaction): cancels wait until
    /// [`PooledCancel::set_up`] again.
    pub fn setting_up(&self) {
        let mut state = self.lock();
        if state.held.is_some() && !state.releasing {
            state.setting_up = true;
        }
    }

    /// The router's own statements ahead of the client's have been answered: a cancel may go.
    pub fn set_up(&self) {
        let mut state = self.lock();
        state.setting_up = false;
        if let Some(waker) = state.cancel_waiter.take() {
            waker.wake();
        }
    }

    /// Resolves when a claimed cancel may go: true once nothing of the router's runs ahead of
    /// the client's messages on the held backend; false if the client gives the backend back
    /// first (nothing of its own is left to cancel there).
    pub async fn clear_to_send(&self) -> bool {
        poll_fn(|cx| {
            let mut state = self.lock();
            if state.releasing || state.held.is_none() {
                Poll::Ready(false)
            } else if !state.setting_up {
                Poll::Ready(true)
            } else {
                state.cancel_waiter = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// The client is giving its backend back: resolves once no cancel is on its way to it,
    /// and from then on cancels find no backend. False if a cancel was still undelivered
    /// after `wait` (the backend must then be closed, not lent again).
    pub async fn release(&self, wait: Duration) -> bool {
        {
            let mut state = self.lock();
            state.releasing = true;
            if let Some(waker) = state.cancel_waiter.take() {
                waker.wake();
            }
        }
        let released = poll_fn(|cx| {
            let mut state = self.lock();
            if state.in_flight {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            } else {
                state.held = None;
                Poll::Ready(())
            }
        });
        let delivered = monoio::time::timeout(wait, released).await.is_ok();
        let mut state = self.lock();
        state.held = None;
        state.setting_up = false;
        delivered
    }

    /// A cancel goes to the held backend, if any.
    fn claim(&self) -> Option<CancelTarget> {
        let mut state = self.lock();
        let held = state.held?;
        state.in_flight = true;
        Some(held)
    }

    fn delivered(&self) {
        let mut state = self.lock();
        state.in_flight = false;
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
    }
}

/// Sessions under one pid: nearly always one, so no allocation for it.
#[derive(Debug)]
enum Slot {
    One(Entry),
    Many(Vec<Entry>),
}

#[derive(Debug, Default)]
struct Shard {
    by_pid: HashMap<u32, Slot>,
    next_id: u64,
}

/// Every live session's cancel key, shared by all workers.
#[derive(Debug)]
pub struct CancelIndex {
    shards: Box<[Mutex<Shard>]>,
}

impl Default for CancelIndex {
    fn default() -> Self {
        CancelIndex {
            shards: (0..INDEX_SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

/// A session's place in the [`CancelIndex`]; dropping it removes the key.
#[derive(Debug)]
pub struct Registration {
    index: Arc<CancelIndex>,
    pid: u32,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut shard = self.index.shard(self.pid);
        let Some(slot) = shard.by_pid.get_mut(&self.pid) else {
            return;
        };
        match slot {
            Slot::One(entry) if entry.id == self.id => {
                shard.by_pid.remove(&self.pid);
            }
            Slot::One(_) => {}
            Slot::Many(entries) => {
                entries.retain(|entry| entry.id != self.id);
                if let [_] = entries.as_slice() {
                    if let Some(last) = entries.pop() {
                        *slot = Slot::One(last);
                    }
                } else if entries.is_empty() {
                    shard.by_pid.remove(&self.pid);
                }
            }
        }
    }
}

impl CancelIndex {
    fn shard(&self, pid: u32) -> MutexGuard<'_, Shard> {
        let shard = &self.shards[pid as usize % self.shards.len()];
        // A panic while a shard was held left it consistent (each operation is one map call).
        shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes `key` cancel the query of the session whose backend `backend` gave it
    /// `backend_secret` (and `key.pid`, its own pid), until the registration is dropped.
    pub fn register(
        self: &Arc<Self>,
        key: CancelKey,
        backend: Arc<Upstream>,
        backend_secret: u32,
    ) -> Registration {
        self.insert(
            key,
            Session::Direct {
                backend,
                backend_secret,
            },
        )
    }

    /// Makes `key` (router-issued) cancel the query of the pooled client behind `pooled`,
    /// on whichever backend it holds then, until the registration is dropped.
    pub fn register_pooled(
        self: &Arc<Self>,
        key: CancelKey,
        pooled: Arc<PooledCancel>,
    ) -> Registration {
        self.insert(key, Session::Pooled(pooled))
    }

    fn insert(self: &Arc<Self>, key: CancelKey, session: Session) -> Registration {
        let mut shard = self.shard(key.pid);
        let id = shard.next_id;
        shard.next_id += 1;
        let entry = Entry {
            secret: key.secret,
            session,
            id,
            sending: false,
        };
        match shard.by_pid.remove(&key.pid) {
            None => {
                shard.by_pid.insert(key.pid, Slot::One(entry));
            }
            Some(Slot::One(other)) => {
                shard.by_pid.insert(key.pid, Slot::Many(vec![other, entry]));
            }
            Some(Slot::Many(mut entries)) => {
                entries.push(entry);
                shard.by_pid.insert(key.pid, Slot::Many(entries));
            }
        }
        Registration {
            index: self.clone(),
            pid: key.pid,
            id,
        }
    }

    /// The session `key` belongs to, if any; the secret is compared in constant time.
    pub fn find(&self, key: CancelKey) -> Option<CancelTarget> {
        let mut shard = self.shard(key.pid);
        Self::entry(&mut shard, key).and_then(|entry| entry.target(key.pid))
    }

    fn entry(shard: &mut Shard, key: CancelKey) -> Option<&mut Entry> {
        let matches = |entry: &&mut Entry| bool::from(entry.secret.ct_eq(&key.secret));
        match shard.by_pid.get_mut(&key.pid)? {
            Slot::One(entry) => Some(entry).filter(matches),
            Slot::Many(entries) => entries.iter_mut().find(matches),
        }
    }

    /// Finds `key`'s session and claims the right to send its cancel: [`Claim::Sending`] until
    /// the returned claim is dropped, during which the same session's key gets
    /// [`Claim::AlreadySending`].
    pub fn claim(self: &Arc<Self>, key: CancelKey) -> Claim {
        let mut shard = self.shard(key.pid);
        let Some(entry) = Self::entry(&mut shard, key) else {
            return Claim::Unknown;
        };
        if entry.sending {
            return Claim::AlreadySending;
        }
        let (target, pooled) = match &entry.session {
            Session::Direct { .. } => (entry.target(key.pid), None),
            Session::Pooled(pooled) => (pooled.claim(), Some(pooled.clone())),
        };
        let Some(target) = target else {
            return Claim::NoBackend;
        };
        entry.sending = true;
        Claim::Sending(
            target,
            CancelClaim {
                index: self.clone(),
                pid: key.pid,
                id: entry.id,
                pooled,
            },
        )
    }

    /// Keys registered (for tests and metrics).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
                shard
                    .by_pid
                    .values()
                    .map(|slot| match slot {
                        Slot::One(_) => 1,
                        Slot::Many(entries) => entries.len(),
                    })
                    .sum::<usize>()
            })
            .sum()
    }

    /// True if no key is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What [`CancelIndex::claim`] found.
#[derive(Debug)]
pub enum Claim {
    /// No session has this key.
    Unknown,
    /// The session's previous cancel is still on its way to the backend.
    AlreadySending,
    /// A pooled client that holds no backend now: there is no query to cancel.
    NoBackend,
    /// Send the cancel to this target; the claim ends when the [`CancelClaim`] is dropped.
    Sending(CancelTarget, CancelClaim),
}

/// The right to send one session's cancel; dropping it lets the next one go.
#[derive(Debug)]
pub struct CancelClaim {
    index: Arc<CancelIndex>,
    pid: u32,
    id: u64,
    /// A pooled client's: it may give its backend back once the cancel is delivered.
    pooled: Option<Arc<PooledCancel>>,
}

impl CancelClaim {
    /// A pooled client's cancel: waits until it may go ([`PooledCancel::clear_to_send`]).
    /// True at once for a direct session's.
    async fn clear_to_send(&self) -> bool {
        match &self.pooled {
            Some(pooled) => pooled.clear_to_send().await,
            None => true,
        }
    }
}

impl Drop for CancelClaim {
    fn drop(&mut self) {
        if let Some(pooled) = &self.pooled {
            pooled.delivered();
        }
        let mut shard = self.index.shard(self.pid);
        let entry = match shard.by_pid.get_mut(&self.pid) {
            Some(Slot::One(entry)) => Some(entry),
            Some(Slot::Many(entries)) => entries.iter_mut().find(|e| e.id == self.id),
            None => None,
        };
        // The session may have ended meanwhile, or another taken its pid: only ours is freed.
        if let Some(entry) = entry.filter(|e| e.id == self.id) {
            entry.sending = false;
        }
    }
}

/// One source's allowance of unknown keys: a token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Per-source limit on cancel requests whose key matches nothing, for one worker.
#[derive(Debug, Default)]
pub struct CancelLimiter {
    sources: HashMap<IpAddr, Bucket>,
}

/// What the limiter says about a source's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Look the key up.
    Allowed,
    /// The source guessed too much lately: ignore the request.
    Throttled,
}

impl CancelLimiter {
    /// The address a source is counted under: IPv6 clients by their /64 (one host's usual
    /// share), IPv4 (and IPv4-mapped) by their address.
    fn source(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let mut segments = v6.segments();
                    segments[4..].fill(0);
                    IpAddr::from(segments)
                }
            },
        }
    }

    fn refill(bucket: &mut Bucket, now: Instant) {
        let earned =
            now.duration_since(bucket.updated).as_secs_f64() * f64::from(MISS_REFILL_PER_SECOND);
        bucket.tokens = (bucket.tokens + earned).min(f64::from(MISS_BURST));
        bucket.updated = now;
    }

    /// May a cancel request from `ip` be looked up now?
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Verdict {
        match self.sources.get_mut(&Self::source(ip)) {
            None => Verdict::Allowed,
            Some(bucket) => {
                Self::refill(bucket, now);
                if bucket.tokens >= 1.0 {
                    Verdict::Allowed
                } else {
                    Verdict::Throttled
                }
            }
        }
    }

    /// Charges `ip` for a key that matched nothing.
    pub fn miss(&mut self, ip: IpAddr, now: Instant) {
        let source = Self::source(ip);
        if !self.sources.contains_key(&source) && self.sources.len() >= MAX_TRACKED_SOURCES {
            self.forget_idlest(now);
        }
        let bucket = self.sources.entry(source).or_insert(Bucket {
            tokens: f64::from(MISS_BURST),
            updated: now,
        });
        Self::refill(bucket, now);
        bucket.tokens = (bucket.tokens - 1.0).max(0.0);
    }

    /// Makes room: sources whose allowance is whole again carry no information; if that frees
    /// nothing, the half that was charged longest ago goes.
    fn forget_idlest(&mut self, now: Instant) {
        let whole = f64::from(MISS_BURST);
        self.sources.retain(|_, bucket| {
            Self::refill(bucket, now);
            bucket.tokens < whole
        });
        if self.sources.len() >= MAX_TRACKED_SOURCES {
            let mut ages: Vec<Duration> = self
                .sources
                .values()
                .map(|b| now.duration_since(b.updated))
                .collect();
            let middle = ages.len() / 2;
            let (_, &mut median, _) = ages.select_nth_unstable(middle);
            self.sources
                .retain(|_, b| now.duration_since(b.updated) < median);
        }
    }

    /// Sources tracked.
    pub fn tracked(&self) -> usize {
        self.sources.len()
    }
}

/// Cancel requests whose key matched no session.
static UNKNOWN_KEYS: LogThrottle = LogThrottle::new();
/// Cancel requests ignored because their source guessed too much.
static THROTTLED: LogThrottle = LogThrottle::new();

/// Handles a CancelRequest that `worker` received from `from`: cancels the matching session's
/// query, if there is one and the source is not over its limit. Returns true if a cancel went
/// to a backend.
pub fn handle(worker: &Rc<Worker>, key: CancelKey, from: IpAddr) -> bool {
    let now = Instant::now();
    let mut limiter = worker.cancel_limiter.borrow_mut();
    if limiter.check(from, now) == Verdict::Throttled {
        if let Some(suppressed) = THROTTLED.allow() {
            tracing::warn!(
                source = %from,
                suppressed,
                "cancel requests ignored: the source sent too many unknown keys"
            );
        }
        return false;
    }
    let (target, claim) = match worker.shared.cancels.claim(key) {
        Claim::Sending(target, claim) => (target, claim),
        Claim::AlreadySending => {
            tracing::debug!(source = %from, "cancel request while one is on its way: dropped");
            return false;
        }
        Claim::NoBackend => {
            tracing::debug!(source = %from, "cancel request for a pooled client between transactions");
            return false;
        }
        Claim::Unknown => {
            // Charged before the forward: a guess costs the same whatever the fleet's size.
            limiter.miss(from, now);
            if let Some(suppressed) = UNKNOWN_KEYS.allow() {
                tracing::info!(source = %from, suppressed, "cancel request with an unknown key");
            }
            // Perhaps another node's session (crate::fleet::peer); never waited for.
            worker.shared.fleet.forward(key);
            return false;
        }
    };
    drop(limiter);
    let timeout = worker.shared.config.timeouts.connect;
    monoio::spawn(async move {
        let CancelTarget { backend, key } = target;
        // Not while the router's own statements run ahead of the client's query.
        let clear = monoio::time::timeout(timeout, claim.clear_to_send()).await;
        if clear != Ok(true) {
            tracing::debug!(%backend, "cancel request not sent: the transaction ended first");
            return;
        }
        let _claim = claim;
        let sent = monoio::time::timeout(
            timeout,
            crate::backend::cancel(backend, key.pid, key.secret),
        )
        .await;
        match sent {
            Ok(Ok(())) => tracing::debug!(%backend, pid = key.pid, "cancel request sent"),
            Ok(Err(error)) => {
                tracing::warn!(%backend, %error, "sending cancel request to backend failed")
            }
            Err(_) => tracing::warn!(%backend, "cancel request to backend timed out"),
        }
    });
    true
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    /// Registers `key` for a session of the backend on `port` (its secret: the port too).
    fn register(index: &Arc<CancelIndex>, key: CancelKey, port: u16) -> Registration {
        let upstream = crate::upstream::Upstreams::default().get(addr(port));
        index.register(key, upstream, u32::from(port))
    }

    /// Where `key`'s cancel goes for a session registered with `port`.
    fn target(key: CancelKey, port: u16) -> CancelTarget {
        CancelTarget {
            backend: addr(port),
            key: CancelKey {
                pid: key.pid,
                secret: u32::from(port),
            },
        }
    }

    #[test]
    fn keys_are_found_by_pid_and_secret_and_removed_with_their_session() {
        let index = Arc::new(CancelIndex::default());
        let key = |pid, secret| CancelKey { pid, secret };
        let a = register(&index, key(7, 1), 1);
        // Another server's backend with the same pid.
        let b = register(&index, key(7, 2), 2);
        let c = register(&index, key(8, 1), 3);
        assert_eq!(index.len(), 3);
        assert_eq!(index.find(key(7, 1)), Some(target(key(7, 1), 1)));
        assert_eq!(index.find(key(7, 2)), Some(target(key(7, 2), 2)));
        assert_eq!(index.find(key(8, 1)), Some(target(key(8, 1), 3)));
        for wrong in [key(7, 3), key(8, 2), key(9, 1)] {
            assert_eq!(index.find(wrong), None, "{wrong:?}");
        }
        drop(a);
        assert_eq!(index.find(key(7, 1)), None);
        assert_eq!(index.find(key(7, 2)), Some(target(key(7, 2), 2)));
        drop(b);
        drop(c);
        assert!(index.is_empty());
        // Two sessions may even share a whole key: each removes only itself.
        let d = register(&index, key(5, 5), 4);
        let e = register(&index, key(5, 5), 5);
        drop(d);
        assert_eq!(index.find(key(5, 5)), Some(target(key(5, 5), 5)));
        drop(e);
        assert!(index.is_empty());
    }

    #[test]
    fn entries_stay_small() {
        // Every session has one, in a table with spare room: 40 bytes a slot, not 80.
        assert!(std::mem::size_of::<(u32, Slot)>() <= 40);
    }

    #[test]
    fn one_cancel_per_session_is_on_its_way_at_a_time() {
        let index = Arc::new(CancelIndex::default());
        let key = CancelKey { pid: 7, secret: 1 };
        let registration = register(&index, key, 1);
        let Claim::Sending(found, claim) = index.claim(key) else {
            panic!("the first cancel goes");
        };
        assert_eq!(found, target(key, 1));
        assert!(matches!(index.claim(key), Claim::AlreadySending));
        // Another session under the same pid is not held up.
        let other = CancelKey { pid: 7, secret: 2 };
        let _other = register(&index, other, 2);
        assert!(matches!(index.claim(other), Claim::Sending(..)));
        drop(claim);
        assert!(matches!(index.claim(key), Claim::Sending(..)));
        assert!(matches!(
            index.claim(CancelKey { pid: 7, secret: 3 }),
            Claim::Unknown
        ));
        // A claim outliving its session frees nothing of a later one.
        let Claim::Sending(_, late) = index.claim(CancelKey { pid: 7, secret: 2 }) else {
            panic!("claim");
        };
        drop(registration);
        drop(late);
    }

    #[test]
    fn misses_are_limited_per_source_and_earned_back() {
        let mut limiter = CancelLimiter::default();
        let start = Instant::now();
        let guesser = IpAddr::from([10, 0, 0, 1]);
        let neighbour = IpAddr::from([10, 0, 0, 2]);
        for _ in 0..MISS_BURST {
            assert_eq!(limiter.check(guesser, start), Verdict::Allowed);
            limiter.miss(guesser, start);
        }
        assert_eq!(limiter.check(guesser, start), Verdict::Throttled);
        assert_eq!(limiter.check(neighbour, start), Verdict::Allowed);
        // Half a second earns one guess back at 2 per second.
        let later = start + Duration::from_millis(500);
        assert_eq!(limiter.check(guesser, later), Verdict::Allowed);
        limiter.miss(guesser, later);
        assert_eq!(limiter.check(guesser, later), Verdict::Throttled);
    }

    #[test]
    fn ipv6_sources_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let mut limiter = CancelLimiter::default();
        let now = Instant::now();
        let host = |last: u16| IpAddr::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, last));
        for i in 0..MISS_BURST {
            limiter.miss(host(i as u16), now);
        }
        assert_eq!(limiter.check(host(999), now), Verdict::Throttled);
        let other_64 = IpAddr::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1));
        assert_eq!(limiter.check(other_64, now), Verdict::Allowed);
        let v4 = Ipv4Addr::new(192, 0, 2, 1);
        for _ in 0..MISS_BURST {
            limiter.miss(IpAddr::V4(v4), now);
        }
        assert_eq!(
            limiter.check(IpAddr::V6(v4.to_ipv6_mapped()), now),
            Verdict::Throttled
        );
    }

    #[test]
    fn the_limiter_stays_bounded() {
        let mut limiter = CancelLimiter::default();
        let start = Instant::now();
        for i in 0..(3 * MAX_TRACKED_SOURCES as u32) {
            let now = start + Duration::from_micros(u64::from(i));
            limiter.miss(IpAddr::from(i.to_be_bytes()), now);
            assert!(limiter.tracked() <= MAX_TRACKED_SOURCES);
        }
        // The newest guesser is still remembered.
        let last = IpAddr::from((3 * MAX_TRACKED_SOURCES as u32 - 1).to_be_bytes());
        assert!(limiter.sources.contains_key(&last));
    }

    /// A CancelRequest that lands on worker 0 for a session another worker registered reaches
    /// that session's backend with the backend's own key; a wrong secret sends nothing, and a
    /// source over its limit is ignored even with the right key.
    #[test]
    fn a_cancel_on_any_worker_reaches_the_sessions_backend() {
        use std::io::Read;

        let backend = std::net::TcpListener::bind("127.0.0.1:0").expect("fake backend");
        let backend_addr = backend.local_addr().expect("address");
        let received = std::thread::spawn(move || {
            let (mut stream, _) = backend.accept().expect("the cancel connection");
            let mut request = Vec::new();
            stream
                .read_to_end(&mut request)
                .expect("read the CancelRequest");
            request
        });
        let verifier = crate::auth::verifier::ScramVerifier::generate("pscale_pw_cancel");
        let shared = crate::worker::tests::shared(2, &verifier);
        let client_key = CancelKey {
            pid: 4242,
            secret: 0x5eed_cafe,
        };
        let backend_key = CancelKey {
            pid: 4242,
            secret: 0x0bac_0e4d,
        };
        // Registered as worker 1's session would be.
        let upstream = shared.upstreams.get(backend_addr);
        let _registration = shared
            .cancels
            .register(client_key, upstream, backend_key.secret);
        let mut runtime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let worker = Worker::new(0, shared.clone());
            let honest = IpAddr::from([127, 0, 0, 1]);
            let guesser = IpAddr::from([127, 0, 0, 2]);
            let wrong = CancelKey {
                secret: client_key.secret ^ 1,
                ..client_key
            };
            assert!(!handle(&worker, wrong, honest));
            for _ in 0..MISS_BURST {
                assert!(!handle(&worker, wrong, guesser));
            }
            assert!(
                !handle(&worker, client_key, guesser),
                "the guesser is ignored"
            );
            assert!(handle(&worker, client_key, honest));
            // The send runs as a task on this runtime: let it run until the backend has it.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !received.is_finished() && Instant::now() < deadline {
                monoio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let mut expected = Vec::new();
        crate::protocol::write::cancel_request(&mut expected, 4242, 0x0bac_0e4d);
        // One connection came, and it carried the backend's key, not the client's.
        assert_eq!(received.join().expect("fake backend thread"), expected);
    }

    #[test]
    fn a_pooled_cancel_waits_for_the_routers_own_statements() {
        use std::future::Future;
        use std::task::Context;
        let mut cx = Context::from_waker(Waker::noop());
        let pooled = PooledCancel::default();
        // Nothing of the router's ahead: the cancel goes at once.
        pooled.hold(addr(1), 7, 8, false);
        assert!(pooled.claim().is_some());
        let ready = std::pin::pin!(pooled.clear_to_send())
            .as_mut()
            .poll(&mut cx);
        assert_eq!(ready, Poll::Ready(true));
        pooled.delivered();
        // A claimed cancel waits until the router's statements are answered, then goes.
        let waits_for_set_up = |cx: &mut Context<'_>| {
            assert!(pooled.claim().is_some());
            let mut waiting = std::pin::pin!(pooled.clear_to_send());
            assert!(waiting.as_mut().poll(cx).is_pending());
            pooled.set_up();
            assert_eq!(waiting.as_mut().poll(cx), Poll::Ready(true));
            pooled.delivered();
        };
        // The router's statements ahead of the client's first.
        pooled.hold(addr(1), 7, 8, true);
        waits_for_set_up(&mut cx);
        // Mid-transaction, the router's statements go ahead again: the same wait.
        pooled.hold(addr(1), 7, 8, false);
        pooled.setting_up();
        waits_for_set_up(&mut cx);
        // The client gives the backend back before they are: the cancel is not sent.
        pooled.hold(addr(1), 7, 8, true);
        assert!(pooled.claim().is_some());
        let mut runtime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let mut waiting = std::pin::pin!(pooled.clear_to_send());
            assert!(waiting
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
                .is_pending());
            let releasing = pooled.release(Duration::from_millis(50));
            let (delivered, clear) = monoio::join!(releasing, async {
                let clear = waiting.await;
                pooled.delivered();
                clear
            });
            assert!(!clear, "not sent");
            assert!(delivered, "the release waited for the claim to end");
        });
        assert!(pooled.claim().is_none(), "released: no backend");
    }
}
