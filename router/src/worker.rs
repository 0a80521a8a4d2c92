//! The thread-per-core runtime: one pinned thread per worker, each with its own monoio runtime
//! (io_uring, or the legacy epoll driver where io_uring is unavailable), its own SO_REUSEPORT
//! listener on each port, and its own session registry. Nothing here is shared between workers but the
//! read-mostly [`Shared`] state and the mailboxes.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use monoio::net::{TcpListener, TcpStream};
use rustls::ServerConfig;

use crate::auth::verifier::ScramVerifier;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::error::KillReason;
use crate::front_door::Port;
use crate::mailbox::{Mailbox, Message};
use crate::protocol::startup::CancelKey;
use crate::signal::Broadcast;
pub use crate::signal::Signal;
use crate::throttle::LogThrottle;
use crate::upstream::Upstreams;

/// How long killed sessions get to write their FATAL message before the worker stops.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// Pause after a failed accept (e.g. EMFILE) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// How often a listener's queue is looked at beside its accept in flight (see
/// `Worker::sweep_accept_queue`).
const ACCEPT_SWEEP: Duration = Duration::from_millis(100);

/// io_uring submission queue entries per worker.
pub const URING_ENTRIES: u32 = 1024;

/// The setups of a worker's io_uring, the first the kernel accepts taken:
///
/// 1. Deferred task running (Linux 6.1, with the single issuer it requires: a worker's ring is
///    only ever used by its own thread): a completion that another core's network stack
///    produces (the loopback peer's send, say) waits until the worker next asks for
///    completions, which monoio does when it has no task left to run, and the work runs then,
///    in a batch. Against 2 below, one-worker routers interleaved with the targets' order
///    balanced: 7% less CPU per transaction at 32 pooled clients (27.0 / 30.0 / 29.7 against
///    24.8 / 27.1 / 28.4 µs), the same at 256 and 1,000 (BENCHMARKS.md, section 8).
/// 2. Cooperative task running (Linux 5.19): the same work runs at the worker's next entry to
///    the kernel instead of interrupting it with an IPI: 6% less CPU per transaction than 3 at
///    32 and 256 clients (measured in both orders), a tenth of the reschedule IPIs in
///    connection storms.
/// 3. Neither, for older kernels.
pub fn uring_builders() -> [io_uring::Builder; 3] {
    let mut deferred = io_uring::IoUring::builder();
    deferred.setup_single_issuer().setup_defer_taskrun();
    let mut cooperative = io_uring::IoUring::builder();
    cooperative.setup_coop_taskrun();
    [deferred, cooperative, io_uring::IoUring::builder()]
}

/// State shared by all workers (read-mostly).
#[derive(Debug)]
pub struct Shared {
    /// The router configuration.
    pub config: Config,
    /// The catalog in force; replaced whole on reload.
    pub catalog: ArcSwap<Catalog>,
    /// Where the catalog comes from, whether it answers, and (etcd) the revision in force.
    pub catalog_source: Arc<crate::catalog::source::SourceState>,
    /// TLS server configuration.
    pub tls: Arc<ServerConfig>,
    /// One mailbox per worker, indexed by worker id.
    pub mailboxes: Vec<Arc<Mailbox>>,
    /// Backend addresses: connection counts and health.
    pub upstreams: Upstreams,
    /// Authenticated client sessions on all workers (`limits.max_client_connections`).
    pub sessions: AtomicU32,
    /// Every live session's cancel key, whichever worker serves it.
    pub cancels: Arc<crate::cancel::CancelIndex>,
    /// Key for the fake verifiers of unknown roles and branches (from `auth.mock_secret_file`).
    pub mock_secret: crate::auth::mock_secret::MockSecret,
    /// Pooled clients per branch, on all workers (`[pool] max_client_connections`).
    pub branch_clients: Arc<crate::pooled::BranchClients>,
    /// Each worker's counts (`/metrics`), indexed by worker id.
    pub stats: Vec<Arc<crate::metrics::WorkerStats>>,
    /// Which worker accepts new connections: the eBPF program's maps, accept counts.
    pub steering: crate::steering::Steering,
    /// One hand-off inbox per worker, indexed by worker id ([`crate::handoff`]).
    pub inboxes: Vec<crate::handoff::Inbox>,
    /// The fleet this router is a node of (a fleet of one with a catalog file): the live node
    /// count divides the per-branch limits.
    pub fleet: Arc<crate::fleet::Fleet>,
}

/// What the worker knows about one live session (for password resets and shutdown).
#[derive(Debug)]
pub struct SessionHandle {
    /// The backend serving the session.
    pub backend_addr: SocketAddr,
    /// The backend's BackendKeyData.
    pub backend_key: CancelKey,
    /// Branch id.
    pub branch: Box<str>,
    /// Role name.
    pub role: Box<str>,
    /// The server name the client sent in its TLS ClientHello (SNI), if any.
    pub sni: Option<Box<str>>,
    /// The verifier the client authenticated against: the session ends when it leaves the
    /// catalog (password reset, role or branch removed).
    pub verifier: Arc<ScramVerifier>,
    /// Fired to end the session with a FATAL error.
    pub kill: Signal<KillReason>,
    /// How long the session has been waiting for its client (the pooled port's idle wait).
    pub quiet: Quiet,
}

/// How often a worker looks for sessions that went quiet ([`Quiet`]).
pub const QUIET_ROUND: Duration = Duration::from_secs(1);

/// How long a session has waited for its client, in the worker's quiet rounds (one a second,
/// [`Worker::quiet_round`]): a session (a pooled client between transactions, a direct
/// session's relay waiting for its client) waiting since before the previous round is woken
/// (through its kill signal's waker, which its wait keeps registered beside) to shed its
/// expanded TLS keys. Costs each wait two stores, and no timer.
#[derive(Debug, Default)]
pub struct Quiet(Cell<u32>);

impl Quiet {
    /// Not waiting, or woken already.
    const BUSY: u32 = 0;
    /// Quiet long enough: [`Quiet::due`] completes.
    const DUE: u32 = u32::MAX;
    /// Rounds a wait must have begun before to be due: 2 is idle for 1 to 2 seconds.
    pub const ROUNDS: u32 = 2;

    /// The session starts waiting in `round` ([`Worker::quiet_rounds`]).
    pub fn begin(&self, round: u32) {
        self.0.set(round.clamp(1, Self::DUE - 1));
    }

    /// The session stopped waiting (its client spoke, or it was woken).
    pub fn end(&self) {
        self.0.set(Self::BUSY);
    }

    /// Completes once a quiet round found the wait old enough (cancel-safe). Registers no
    /// waker: it must be awaited beside the session's `kill.wait()`, whose waker the round
    /// wakes.
    pub async fn due(&self) {
        poll_fn(|_| match self.0.get() {
            Self::DUE => Poll::Ready(()),
            _ => Poll::Pending,
        })
        .await
    }

    /// True (and then due) if the wait began [`Quiet::ROUNDS`] rounds or more before `round`.
    fn check(&self, round: u32) -> bool {
        let began = self.0.get();
        let due = began != Self::BUSY
            && began != Self::DUE
            && round.saturating_sub(began) >= Self::ROUNDS;
        if due {
            self.0.set(Self::DUE);
        }
        due
    }
}

impl SessionHandle {
    /// True while `catalog` still holds the verifier this session authenticated against.
    pub fn verifier_in_force(&self, catalog: &Catalog) -> bool {
        catalog
            .branch(&self.branch)
            .and_then(|branch| branch.role(&self.role))
            .is_some_and(|verifier| **verifier == *self.verifier)
    }
}

/// One worker thread's state. Lives in an `Rc`: it never leaves its thread.
#[derive(Debug)]
pub struct Worker {
    /// Index of this worker (also its mailbox index).
    pub id: usize,
    /// Shared state.
    pub shared: Arc<Shared>,
    /// This worker's counts (`/metrics`): `shared.stats[id]`.
    pub stats: Arc<crate::metrics::WorkerStats>,
    sessions: RefCell<HashMap<u64, Rc<SessionHandle>>>,
    next_session: Cell<u64>,
    /// Quiet rounds run so far, plus one ([`Worker::quiet_round`]).
    quiet_rounds: Cell<u32>,
    /// Connection tasks (starting or established): the drain waits for them.
    live: Cell<usize>,
    /// Connections not yet authenticated (`limits.max_startup_connections`).
    starting: Cell<u32>,
    /// Fired at shutdown: every accept loop ends.
    stop_accepting: Broadcast,
    /// Fired when the drain time is over: connections still starting end then.
    drain_over: Broadcast,
    /// This worker's limit on cancel requests with unknown keys, per source.
    pub cancel_limiter: RefCell<crate::cancel::CancelLimiter>,
    /// I/O buffers lent to this worker's connections while they move bytes.
    pub buffers: crate::buf::BufPool,
    /// This worker's backend pools (the pooled port).
    pub pools: crate::pooled::pool::Pools,
    /// Buffers for a pooled client's opened bytes: room for the largest message it keeps
    /// whole (a pool buffer) plus a whole record, so a record always fits beside a partial
    /// message.
    pub message_buffers: crate::buf::BufPool,
}

/// Unregisters a session when the session ends.
#[derive(Debug)]
pub struct Registration {
    worker: Rc<Worker>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.worker.sessions.borrow_mut().remove(&self.id);
    }
}

/// Counts a connection task (registered or still in startup) for the drain.
#[derive(Debug)]
pub struct LiveGuard(Rc<Worker>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.set(self.0.live.get() - 1);
        self.0.publish_load();
    }
}

/// A place in the worker's budget of connections that have not authenticated yet; given up
/// (dropped) once the client has authenticated, or when the connection ends.
#[derive(Debug)]
pub struct StartupSlot(Rc<Worker>);

impl Drop for StartupSlot {
    fn drop(&mut self) {
        self.0.starting.set(self.0.starting.get() - 1);
    }
}

/// A place among the router's authenticated sessions (`limits.max_client_connections`), and
/// the session counted for its branch's steering slot once it is known
/// ([`SessionSlot::count_for`]; [`NO_BRANCH_SLOT`] before). Twelve bytes in every pooled
/// client's life, so the slot is a number, not a guard of its own.
#[derive(Debug)]
pub struct SessionSlot(Arc<Shared>, u32);

/// [`SessionSlot`]'s branch slot before it is known.
const NO_BRANCH_SLOT: u32 = u32::MAX;

impl SessionSlot {
    /// Counts this session for `branch_id`'s slot
    /// ([`crate::steering::Steering::session_started`]), which the rebalancing weighs, for as
    /// long as the session holds its place.
    pub fn count_for(&mut self, branch_id: &str) {
        if self.1 != NO_BRANCH_SLOT {
            self.0.steering.session_ended(self.1);
        }
        self.1 = crate::steering::branch_slot(branch_id);
        self.0.steering.session_started(self.1);
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::Relaxed);
        if self.1 != NO_BRANCH_SLOT {
            self.0.steering.session_ended(self.1);
        }
    }
}

impl Shared {
    /// A branch's pool settings as this node enforces them: `[pool]`, the branch's overrides,
    /// and the limits divided among the fleet's live nodes ([`crate::fleet::split`]).
    pub fn pool_settings(
        &self,
        overrides: &crate::config::PoolOverrides,
    ) -> crate::config::PoolSettings {
        self.fleet.pool_settings(&self.config.pool, overrides)
    }

    /// A session slot, or `None` when `limits.max_client_connections` sessions are open.
    pub fn session_slot(self: &Arc<Self>) -> Option<SessionSlot> {
        let max = self.config.limits.max_client_connections.get();
        self.sessions
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| SessionSlot(self.clone(), NO_BRANCH_SLOT))
    }
}

/// Logs the connections closed at accept because the startup budget was full.
static STARTUP_BUDGET_FULL: LogThrottle = LogThrottle::new();
/// Logs failed load updates to the steering program.
static LOAD_NOT_PUBLISHED: LogThrottle = LogThrottle::new();

impl Worker {
    /// A worker with no sessions.
    pub fn new(id: usize, shared: Arc<Shared>) -> Rc<Self> {
        let stats = shared.stats.get(id).cloned().unwrap_or_default();
        Rc::new(Self {
            id,
            stats,
            shared,
            sessions: RefCell::new(HashMap::new()),
            next_session: Cell::new(0),
            quiet_rounds: Cell::new(1),
            live: Cell::new(0),
            starting: Cell::new(0),
            stop_accepting: Broadcast::default(),
            drain_over: Broadcast::default(),
            cancel_limiter: RefCell::default(),
            buffers: crate::buf::BufPool::default(),
            pools: crate::pooled::pool::Pools::default(),
            message_buffers: crate::buf::BufPool::sized(
                crate::buf::POOL_BUFFER_BYTES + crate::tls::record::MAX_RECORD_LEN,
            ),
        })
    }

    /// Takes a newly accepted connection into the startup budget, or `None` when the budget
    /// (`limits.max_startup_connections`) is full: then the connection is closed at once, before
    /// it costs a handshake or a buffer.
    pub fn admit(self: &Rc<Self>) -> Option<(LiveGuard, StartupSlot)> {
        let starting = self.starting.get();
        if starting >= self.shared.config.limits.max_startup_connections.get() {
            return None;
        }
        self.starting.set(starting + 1);
        self.live.set(self.live.get() + 1);
        self.publish_load();
        Some((LiveGuard(self.clone()), StartupSlot(self.clone())))
    }

    /// Counts a connection handed over from another worker ([`crate::handoff`]) among this
    /// worker's live ones. Not against `limits.max_startup_connections`: the client has
    /// authenticated, and holds a session slot.
    pub fn adopt(self: &Rc<Self>) -> LiveGuard {
        self.live.set(self.live.get() + 1);
        self.publish_load();
        LiveGuard(self.clone())
    }

    /// Tells the steering program this worker's load: its live connections (one map update
    /// system call with eBPF steering, nothing otherwise).
    fn publish_load(&self) {
        let live = u32::try_from(self.live.get()).unwrap_or(u32::MAX);
        let id = u32::try_from(self.id).unwrap_or(u32::MAX);
        if let Err(error) = self.shared.steering.set_load(id, live) {
            if let Some(suppressed) = LOAD_NOT_PUBLISHED.allow() {
                tracing::warn!(worker = self.id, %error, suppressed, "could not publish load");
            }
        }
    }

    /// [`Worker::admit`] a connection this worker accepted, counted for
    /// [`crate::steering::Steering::accepted`] after its load is published (so a test that sees
    /// the count sees the load).
    fn admit_counted(self: &Rc<Self>) -> Option<(LiveGuard, StartupSlot)> {
        let admitted = self.admit();
        self.shared.steering.count_accept(self.id);
        admitted
    }

    /// Connections of this worker that have not authenticated yet.
    pub fn starting(&self) -> u32 {
        self.starting.get()
    }

    /// Completes when the drain time is over (connections still starting end then).
    pub fn drain_over(&self) -> crate::signal::BroadcastWait<'_> {
        self.drain_over.wait()
    }

    /// Make a session findable for cancel requests, password resets and shutdown. A session
    /// whose verifier changed while it was starting (after the last sweep) is killed at once.
    pub fn register(self: &Rc<Self>, handle: Rc<SessionHandle>) -> Registration {
        let id = self.next_session.get();
        self.next_session.set(id + 1);
        if !handle.verifier_in_force(&self.shared.catalog.load()) {
            handle.kill.fire(KillReason::PasswordReset);
        }
        self.sessions.borrow_mut().insert(id, handle);
        Registration {
            worker: self.clone(),
            id,
        }
    }

    /// The current quiet round, for [`Quiet::begin`].
    pub fn quiet_rounds(&self) -> u32 {
        self.quiet_rounds.get()
    }

    /// A quiet round every [`QUIET_ROUND`], for ever.
    async fn quiet_loop(self: Rc<Self>) {
        loop {
            monoio::time::sleep(QUIET_ROUND).await;
            self.quiet_round();
        }
    }

    /// One quiet round (once a second): wakes the sessions whose wait for their client began
    /// [`Quiet::ROUNDS`] rounds ago or more, once each wait. Returns how many were woken.
    pub fn quiet_round(&self) -> usize {
        let round = self.quiet_rounds.get().saturating_add(1);
        self.quiet_rounds.set(round);
        let mut woken = 0;
        for session in self.sessions.borrow().values() {
            if session.quiet.check(round) {
                session.kill.nudge();
                woken += 1;
            }
        }
        woken
    }

    fn kill_where(&self, reason: KillReason, pred: impl Fn(&SessionHandle) -> bool) -> usize {
        let sessions = self.sessions.borrow();
        let mut killed = 0;
        for session in sessions.values().filter(|s| pred(s)) {
            session.kill.fire(reason);
            killed += 1;
        }
        killed
    }

    /// Serve the mailbox until a Shutdown request, or for ever when `draining` (then sweeps
    /// still reach the sessions that finish during the drain).
    async fn handle_mail(self: &Rc<Self>, draining: bool) {
        let mailbox = self.shared.mailboxes[self.id].clone();
        loop {
            match mailbox.recv().await {
                Message::Sweep => {
                    let catalog = self.shared.catalog.load();
                    let n = self.kill_where(KillReason::PasswordReset, |s| {
                        !s.verifier_in_force(&catalog)
                    });
                    if n > 0 {
                        tracing::info!(
                            worker = self.id,
                            sessions = n,
                            "closed sessions whose role's password changed or was removed"
                        );
                    }
                }
                Message::Shutdown if !draining => return,
                Message::Shutdown => {}
            }
        }
    }

    /// Accepts `port`'s connections into the startup budget until shutdown.
    async fn accept_loop(self: Rc<Self>, listener: TcpListener, port: Port) {
        // SAFETY: the listener's descriptor is open for this borrow (the listener is right here).
        let listening = unsafe { std::os::fd::BorrowedFd::borrow_raw(listener.as_raw_fd()) };
        // Awaited before this returns: the socket closes only once both let go of it.
        let sweeper = match listening.try_clone_to_owned() {
            Ok(fd) => Some(monoio::spawn(self.clone().sweep_accept_queue(fd, port))),
            Err(error) => {
                tracing::warn!(worker = self.id, %error, "no accept sweep (dup failed)");
                None
            }
        };
        // One canceller for the loop's accepts (each accept registers with it while in flight).
        let canceller = monoio::io::Canceller::new();
        loop {
            let accept = listener.cancelable_accept(canceller.handle());
            let mut accept = std::pin::pin!(accept);
            let accepted = monoio::select! {
                accepted = &mut accept => accepted,
                _ = self.stop_accepting.wait() => {
                    // The accept in flight may have taken a connection already (its completion
                    // not yet seen): dropping it would leave that client with a socket nobody
                    // serves. It is cancelled and awaited instead, and what it took is served.
                    let _ = canceller.cancel();
                    if let Ok((stream, peer)) = accept.await {
                        self.start_connection(stream, peer, port);
                    }
                    break;
                }
            };
            match accepted {
                Ok((stream, peer)) => self.start_connection(stream, peer, port),
                Err(error) => {
                    tracing::warn!(worker = self.id, ?port, %error, "accept failed");
                    monoio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            }
        }
        if let Some(sweeper) = sweeper {
            sweeper.await;
        }
        tracing::debug!(worker = self.id, ?port, "stopped accepting");
    }

    /// Connections the kernel moved onto this listener's queue from another router's closing
    /// listener (a takeover: SO_REUSEPORT migration) may come without waking the accept in
    /// flight; every [`ACCEPT_SWEEP`] the queue is emptied with non-blocking accepts (the
    /// listener is non-blocking), beside it. `fd` is a duplicate of the accept loop's listener:
    /// both end with `stop_accepting`, when the socket closes (a takeover needs it closed then).
    async fn sweep_accept_queue(self: Rc<Self>, listening: std::os::fd::OwnedFd, port: Port) {
        let fd = listening.as_raw_fd();
        loop {
            monoio::select! {
                () = monoio::time::sleep(ACCEPT_SWEEP) => {}
                _ = self.stop_accepting.wait() => { return },
            }
            loop {
                // SAFETY: accept4(2) on `listening`, open for as long as this task; the
                // descriptor it returns is new and owned by the stream made from it below.
                let conn = unsafe {
                    libc::accept4(
                        fd,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    )
                };
                if conn < 0 {
                    // EAGAIN: the queue is empty (or the listener failed: its loop says so).
                    break;
                }
                // SAFETY: `conn` is a connected socket nothing else owns.
                let std_stream =
                    unsafe { <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(conn) };
                let Ok(peer) = std_stream.peer_addr() else {
                    continue;
                };
                match TcpStream::from_std(std_stream) {
                    Ok(stream) => {
                        tracing::debug!(worker = self.id, ?port, %peer, "accepted off the queue");
                        self.start_connection(stream, peer, port);
                    }
                    Err(error) => tracing::warn!(worker = self.id, %error, "accept sweep failed"),
                }
            }
        }
    }

    /// An accepted connection: into the startup budget and served, or closed if it is full.
    fn start_connection(self: &Rc<Self>, stream: TcpStream, peer: SocketAddr, port: Port) {
        match self.admit_counted() {
            Some(admitted) => {
                monoio::spawn(crate::front_door::serve(
                    self.clone(),
                    stream,
                    peer,
                    admitted,
                    port,
                ));
            }
            None => {
                drop(stream);
                if let Some(suppressed) = STARTUP_BUDGET_FULL.allow() {
                    tracing::warn!(
                        worker = self.id,
                        ?port,
                        %peer,
                        limit = self.shared.config.limits.max_startup_connections.get(),
                        suppressed,
                        "connection closed at accept: too many connections still in TLS, \
                         startup or authentication (limits.max_startup_connections)"
                    );
                }
            }
        }
    }

    async fn wait_idle(&self, deadline: Instant) -> bool {
        while self.live.get() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            monoio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Run the worker until a Shutdown message: accept on the direct port (and the pooled one,
    /// if given), serve, then drain.
    pub async fn run(self: Rc<Self>, direct: TcpListener, pooled: Option<TcpListener>) {
        let mut accepting = vec![monoio::spawn(
            self.clone().accept_loop(direct, Port::Direct),
        )];
        // Dropped with the runtime when the worker stops.
        monoio::spawn(self.clone().quiet_loop());
        if let Some(pooled) = pooled {
            accepting.push(monoio::spawn(
                self.clone().accept_loop(pooled, Port::Pooled),
            ));
            // Dropped with the runtime when the worker stops.
            monoio::spawn(crate::pooled::maintain(self.clone()));
        }
        // Dropped with the runtime when the worker stops.
        monoio::spawn(crate::handoff::receive(self.clone()));
        self.handle_mail(false).await;
        // The router closes every inbox before it asks for shutdown; this one again in case.
        if let Some(inbox) = self.shared.inboxes.get(self.id) {
            inbox.close();
        }

        self.stop_accepting.fire();
        // The listeners closed (a task left behind when the runtime stops would keep its socket
        // open, and a takeover waits for the old listeners to close).
        for accept_loop in accepting {
            accept_loop.await;
        }
        // Dropped with the runtime when this returns.
        monoio::spawn({
            let worker = self.clone();
            async move { worker.handle_mail(true).await }
        });
        let drain = self.shared.config.timeouts.drain;
        if !self.wait_idle(Instant::now() + drain).await {
            self.drain_over.fire();
            let n = self.kill_where(KillReason::Shutdown, |_| true);
            tracing::info!(
                worker = self.id,
                sessions = n,
                "drain time over: closing sessions"
            );
            self.wait_idle(Instant::now() + KILL_GRACE).await;
        }
        // The pools' idle backends end with a Terminate, not a dropped socket.
        crate::pooled::close_pools(&self).await;
        tracing::info!(worker = self.id, "worker stopped");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use super::*;
    use crate::mailbox::Mailbox;

    /// Shared state for `workers` workers: branch `b1` (primary on port 1) with role `app`.
    pub(crate) fn shared(workers: usize, verifier: &ScramVerifier) -> Arc<Shared> {
        let config = Config::parse(
            "catalog = \"catalog.toml\"\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
             [listen]\ndirect = \"127.0.0.1:0\"\n",
            Path::new("/nonexistent"),
            "router.toml",
        )
        .expect("config");
        let catalog = Catalog::parse(
            &format!(
                "[[branch]]\nid = \"b1\"\nprimary = \"127.0.0.1:1\"\n\
                 [branch.roles]\napp = \"{verifier}\"\n"
            ),
            "catalog.toml",
        )
        .expect("catalog");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .and_then(|params| params.self_signed(&key))
            .expect("certificate");
        let tls = crate::tls::server_config_from_der(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("TLS config");
        Arc::new(Shared {
            config,
            catalog: ArcSwap::from_pointee(catalog),
            catalog_source: Arc::new(crate::catalog::source::SourceState::file()),
            tls,
            mailboxes: (0..workers).map(|_| Mailbox::new()).collect(),
            upstreams: Upstreams::default(),
            sessions: AtomicU32::new(0),
            cancels: Default::default(),
            mock_secret: [7; 32],
            branch_clients: Default::default(),
            stats: (0..workers).map(|_| Arc::default()).collect(),
            steering: crate::steering::Steering::off(workers),
            inboxes: (0..workers).map(|_| Default::default()).collect(),
            fleet: Arc::new(crate::fleet::Fleet::single()),
        })
    }

    #[test]
    fn a_wait_is_due_once_two_rounds_later() {
        let quiet = Quiet::default();
        assert!(!quiet.check(9), "not waiting");
        quiet.begin(5);
        assert!(!quiet.check(6), "under a second");
        assert!(quiet.check(7));
        assert!(!quiet.check(8), "woken once");
        quiet.end();
        assert!(!quiet.check(100));
    }

    #[test]
    fn session_slots_stop_at_max_client_connections() {
        let verifier = ScramVerifier::generate("pscale_pw_slots");
        let shared = shared(1, &verifier);
        let max = shared.config.limits.max_client_connections.get();
        let slots: Vec<_> = (0..max).map_while(|_| shared.session_slot()).collect();
        assert_eq!(slots.len() as u32, max);
        assert!(shared.session_slot().is_none());
        drop(slots);
        assert!(shared.session_slot().is_some());
        assert_eq!(shared.sessions.load(Ordering::Relaxed), 0);
    }
}
