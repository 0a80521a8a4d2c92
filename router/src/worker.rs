//! The thread-per-core runtime: one pinned thread per worker, each with its own monoio runtime
//! (io_uring, or the legacy epoll driver where io_uring is unavailable), its own SO_REUSEPORT
//! listener on each port, and its own session registry. Nothing here is shared between workers but the
//! read-mostly [`Shared`] state and the mailboxes.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use monoio::net::TcpListener;
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

/// io_uring submission queue entries per worker.
pub const URING_ENTRIES: u32 = 1024;

/// The setup of a worker's io_uring: cooperative task running (Linux 5.19), so a completion
/// that another core's network stack produces (the loopback peer's send, say) is queued until
/// the worker next waits for completions (when it has no task left to run) instead of
/// interrupting it with an IPI while it runs. On the pooled port's connection storms this cut
/// the reschedule IPIs the router took tenfold and its CPU per connection by about 3%.
/// [`plain_uring_builder`] is the fallback for older kernels.
pub fn uring_builder() -> io_uring::Builder {
    let mut builder = io_uring::IoUring::builder();
    builder.setup_coop_taskrun();
    builder
}

/// A worker's io_uring setup where [`uring_builder`]'s is refused (kernels before 5.19).
pub fn plain_uring_builder() -> io_uring::Builder {
    io_uring::IoUring::builder()
}

/// State shared by all workers (read-mostly).
#[derive(Debug)]
pub struct Shared {
    /// The router configuration.
    pub config: Config,
    /// The catalog in force; replaced whole on reload.
    pub catalog: ArcSwap<Catalog>,
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
    sessions: RefCell<HashMap<u64, Rc<SessionHandle>>>,
    next_session: Cell<u64>,
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

/// A place among the router's authenticated sessions (`limits.max_client_connections`).
#[derive(Debug)]
pub struct SessionSlot(Arc<Shared>);

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// A session slot, or `None` when `limits.max_client_connections` sessions are open.
    pub fn session_slot(self: &Arc<Self>) -> Option<SessionSlot> {
        let max = self.config.limits.max_client_connections.get();
        self.sessions
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| SessionSlot(self.clone()))
    }
}

/// Logs the connections closed at accept because the startup budget was full.
static STARTUP_BUDGET_FULL: LogThrottle = LogThrottle::new();

impl Worker {
    /// A worker with no sessions.
    pub fn new(id: usize, shared: Arc<Shared>) -> Rc<Self> {
        Rc::new(Self {
            id,
            shared,
            sessions: RefCell::new(HashMap::new()),
            next_session: Cell::new(0),
            live: Cell::new(0),
            starting: Cell::new(0),
            stop_accepting: Broadcast::default(),
            drain_over: Broadcast::default(),
            cancel_limiter: RefCell::default(),
            buffers: crate::buf::BufPool::default(),
            pools: crate::pooled::pool::Pools::default(),
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
        Some((LiveGuard(self.clone()), StartupSlot(self.clone())))
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
        loop {
            let accepted = monoio::select! {
                accepted = listener.accept() => accepted,
                _ = self.stop_accepting.wait() => break,
            };
            match accepted {
                Ok((stream, peer)) => match self.admit() {
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
                                "connection closed at accept: too many connections still in \
                                 TLS, startup or authentication (limits.max_startup_connections)"
                            );
                        }
                    }
                },
                Err(error) => {
                    tracing::warn!(worker = self.id, ?port, %error, "accept failed");
                    monoio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            }
        }
        tracing::debug!(worker = self.id, ?port, "stopped accepting");
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
        monoio::spawn(self.clone().accept_loop(direct, Port::Direct));
        if let Some(pooled) = pooled {
            monoio::spawn(self.clone().accept_loop(pooled, Port::Pooled));
            // Dropped with the runtime when the worker stops.
            monoio::spawn(crate::pooled::maintain(self.clone()));
        }
        self.handle_mail(false).await;

        self.stop_accepting.fire();
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
            tls,
            mailboxes: (0..workers).map(|_| Mailbox::new()).collect(),
            upstreams: Upstreams::default(),
            sessions: AtomicU32::new(0),
            cancels: Default::default(),
            mock_secret: [7; 32],
            branch_clients: Default::default(),
        })
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
