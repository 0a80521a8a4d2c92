//! A worker's backend pools: one per (branch, role, database), each at most `pool_size`
//! backends, lent to one client at a time for the length of a transaction.
//!
//! Backends authenticate with the ClientKey the router recovered when the role's last client
//! logged in (the router never has a password): a pool can open backends only once a client of
//! its role has logged in since the router started, and closes them when the role's verifier
//! changes. Idle backends are kept newest first, so a quiet pool's oldest ones reach
//! `server_idle_timeout` and close. A client that finds the pool full waits in line (first come,
//! first served) until a backend is released to it or `query_wait_timeout` passes.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use monoio::io::Splitable;
use monoio::net::tcp::{TcpOwnedReadHalf, TcpOwnedWriteHalf};

use crate::auth::scram::{ClientCredentials, ClientKey};
use crate::auth::verifier::ScramVerifier;
use crate::backend::{self, BackendError};
use crate::buf::{BufPool, ReadBuf};
use crate::config::PoolSettings;
use crate::protocol::backend::{ParameterStatus, PARAMETER_STATUS};
use crate::protocol::frame;
use crate::upstream::{ActiveGuard, Upstreams};

use super::params::{BackendParams, Params};

/// Which pool: the branch, the role and the database a client named.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Branch id.
    pub branch: Box<str>,
    /// Role.
    pub role: Box<str>,
    /// Database.
    pub database: Box<str>,
}

/// A backend connection of a pool.
#[derive(Debug)]
pub struct Backend {
    /// Reading from it.
    pub rd: TcpOwnedReadHalf,
    /// Writing to it.
    pub wr: TcpOwnedWriteHalf,
    fd: RawFd,
    /// Its address.
    pub addr: SocketAddr,
    /// Its BackendKeyData.
    pub pid: u32,
    /// Its BackendKeyData.
    pub secret: u32,
    /// Its session parameters.
    pub params: BackendParams,
    /// The statements prepared on it.
    pub statements: super::prepared::BackendStatements,
    /// The verifier whose ClientKey it authenticated with.
    pub verifier: Arc<ScramVerifier>,
    /// When it connected.
    pub created: Instant,
    /// When it last went back to the pool.
    pub idle_since: Instant,
    /// Counts it among its upstream's connections.
    _upstream: ActiveGuard,
    _counted: crate::metrics::OpenBackend,
}

impl Backend {
    /// True if the socket has nothing unread and is not closed: a backend that sent something
    /// while idle (a FATAL before it went away) or closed is not lent again.
    fn looks_alive(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: a non-blocking peek of one byte into a local.
        let n = unsafe {
            libc::recv(
                self.fd,
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
    }
}

/// What a waiting client is given.
#[derive(Debug)]
enum Handoff {
    /// A backend released to it.
    Backend(Box<Backend>),
    /// Room to open a backend itself (its place already counted in `open`).
    Room,
}

/// A client waiting for a backend.
#[derive(Debug, Default)]
struct Waiter {
    handoff: RefCell<Option<Handoff>>,
    waker: RefCell<Option<Waker>>,
    /// Taken out of the line and given something: only [`Pool::pass_on`] takes waiters out,
    /// so one not given is still in the line, and one given is not.
    given: Cell<bool>,
}

impl Waiter {
    fn give(&self, handoff: Handoff) {
        self.given.set(true);
        *self.handoff.borrow_mut() = Some(handoff);
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    /// Resolves once given something. Cancel-safe.
    async fn wait(&self) -> Handoff {
        poll_fn(|cx| match self.handoff.borrow_mut().take() {
            Some(handoff) => Poll::Ready(handoff),
            None => {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// Why no backend could be had.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    /// `query_wait_timeout` passed in line.
    #[error("query_wait_timeout")]
    WaitTimeout,
    /// Opening a backend failed; `to_client` holds the backend's ErrorResponse, if it sent one.
    #[error("backend: {error}")]
    Connect {
        /// Why.
        error: BackendError,
        /// What the backend said, for the client.
        to_client: Vec<u8>,
    },
    /// No client of this role has logged in since the router started (cannot happen for a
    /// client that asks: it has just logged in).
    #[error("no credentials")]
    NoCredentials,
}

/// The credentials backends of a pool authenticate with.
#[derive(Clone, Debug)]
struct Credentials {
    client_key: ClientKey,
    verifier: Arc<ScramVerifier>,
}

/// One pool.
#[derive(Debug)]
pub struct Pool {
    /// Which.
    pub key: PoolKey,
    /// The StartupMessage its backends are opened with (user and database only: a client's
    /// own parameters are `SET` on the backend it gets).
    startup: Box<[u8]>,
    settings: Cell<PoolSettings>,
    credentials: RefCell<Option<Credentials>>,
    idle: RefCell<Vec<Backend>>,
    /// Backends open, lent or being opened.
    open: Cell<u32>,
    waiters: RefCell<VecDeque<Rc<Waiter>>>,
    /// What its backends report at startup, once one has connected.
    base: RefCell<Option<Rc<Params>>>,
    /// Statements its backends have accepted.
    pub known_good: super::prepared::KnownGood,
    /// Its clients' statements' texts, one copy of each.
    pub texts: super::prepared::SharedTexts,
    /// Moves on each time a DDL is found to have changed a statement's row shape under one of
    /// its backends: each backend drops its statements before its next transaction
    /// ([`super::prepared::BackendStatements::behind`]).
    pub plans_epoch: Cell<u64>,
    /// The StartupMessage parameter sets its backends have read for logins.
    pub startups: super::startup_checks::StartupChecks,
}

impl Pool {
    /// The settings in force.
    pub fn settings(&self) -> PoolSettings {
        self.settings.get()
    }

    /// Takes the settings in force from the catalog (they may change on reload). A pool that
    /// grew lets clients in line open backends at once; one that shrank closes backends as
    /// they come back.
    pub fn set_settings(&self, settings: PoolSettings) {
        self.settings.set(settings);
        while self.open.get() < settings.pool_size.get() && !self.waiters.borrow().is_empty() {
            self.open.set(self.open.get() + 1);
            self.pass_on(Handoff::Room);
        }
    }

    /// True while more backends are open than `pool_size` allows (it was lowered).
    fn over_size(&self) -> bool {
        self.open.get() > self.settings.get().pool_size.get()
    }

    /// Records the credentials of a client that has just logged in: the pool's backends open
    /// with them from now on.
    pub fn set_credentials(&self, client_key: ClientKey, verifier: Arc<ScramVerifier>) {
        *self.credentials.borrow_mut() = Some(Credentials {
            client_key,
            verifier,
        });
    }

    /// The parameters its backends report at startup, once known.
    pub fn base(&self) -> Option<Rc<Params>> {
        self.base.borrow().clone()
    }

    /// Backends open, lent or being opened.
    pub fn open(&self) -> u32 {
        self.open.get()
    }

    /// Backends idle in the pool.
    pub fn idle(&self) -> usize {
        self.idle.borrow().len()
    }

    /// Clients waiting in line.
    pub fn waiting(&self) -> usize {
        self.waiters.borrow().len()
    }

    /// A backend for a transaction: an idle one, a new one if the pool has room, or the next
    /// one released, waiting at most until `deadline`. `on_wait` is told once when the client
    /// has to wait past `notice_after` (it sends the client a notice).
    pub async fn acquire(
        &self,
        ctx: &Context<'_>,
        deadline: monoio::time::Instant,
    ) -> Result<Backend, AcquireError> {
        if let Some(backend) = self.take_idle(ctx) {
            return Ok(backend);
        }
        // Connecting is boxed, here and below: it is rare, and its future (TLS, SCRAM) would
        // otherwise make every transaction's wait for a backend several kilobytes larger.
        if self.open.get() < self.settings.get().pool_size.get() {
            self.open.set(self.open.get() + 1);
            return Box::pin(self.connect(ctx)).await;
        }
        let waiter = Rc::new(Waiter::default());
        self.waiters.borrow_mut().push_back(waiter.clone());
        // Leaving the line (timed out, or the client went away): whatever it was given
        // meanwhile goes to the next in line.
        let _leave = LeaveLine {
            pool: self,
            waiter: &waiter,
        };
        match monoio::time::timeout_at(deadline, waiter.wait()).await {
            Ok(Handoff::Backend(backend)) => Ok(*backend),
            Ok(Handoff::Room) => Box::pin(self.connect(ctx)).await,
            Err(_) => Err(AcquireError::WaitTimeout),
        }
    }

    /// The newest idle backend still fit to lend; the others found on the way are closed.
    fn take_idle(&self, ctx: &Context<'_>) -> Option<Backend> {
        loop {
            let backend = self.idle.borrow_mut().pop()?;
            if self.fit(ctx, &backend) && backend.looks_alive() && !self.over_size() {
                return Some(backend);
            }
            self.close(backend);
        }
    }

    /// True if `backend` may be lent again: its verifier is still the role's and it has not
    /// outlived `server_lifetime`.
    fn fit(&self, ctx: &Context<'_>, backend: &Backend) -> bool {
        let young = self
            .settings
            .get()
            .server_lifetime
            .is_none_or(|lifetime| backend.created.elapsed() < lifetime);
        young && ctx.verifier_in_force(&self.key, &backend.verifier)
    }

    /// Opens a backend in a place already counted in `open` (given back on failure).
    async fn connect(&self, ctx: &Context<'_>) -> Result<Backend, AcquireError> {
        let result = self.try_connect(ctx).await;
        if result.is_err() {
            self.room_freed();
        }
        result
    }

    async fn try_connect(&self, ctx: &Context<'_>) -> Result<Backend, AcquireError> {
        let credentials = self
            .credentials
            .borrow()
            .clone()
            .ok_or(AcquireError::NoCredentials)?;
        let upstream = ctx.upstreams.get(ctx.primary);
        let guard = Upstreams::hold(upstream.clone());
        let mut to_client = Vec::new();
        let attempt = monoio::time::timeout(
            ctx.connect_timeout,
            backend::connect(
                ctx.primary,
                &self.startup,
                ClientCredentials::Keys {
                    client_key: credentials.client_key.0,
                    server_key: credentials.verifier.server_key,
                },
                &mut to_client,
                ReadBuf::from_storage(ctx.buffers.take()),
            ),
        )
        .await
        .unwrap_or(Err(BackendError::Timeout));
        let (conn, _status) = match attempt {
            Ok(connected) => connected,
            Err(error) => {
                if matches!(error, BackendError::Connect(_) | BackendError::Timeout) {
                    upstream.set_healthy(false);
                }
                return Err(AcquireError::Connect { error, to_client });
            }
        };
        upstream.set_healthy(true);
        conn.read_buf.release(ctx.buffers);
        let mut reported = Params::default();
        for (header, body) in frame::Frames::new(&to_client, to_client.len()).flatten() {
            if header.tag != PARAMETER_STATUS {
                continue;
            }
            if let Ok(status) = ParameterStatus::parse(body) {
                reported.set(status.name, status.value);
            }
        }
        if self.base.borrow().is_none() {
            *self.base.borrow_mut() = Some(Rc::new(reported.clone()));
        }
        let now = Instant::now();
        let fd = conn.stream.as_raw_fd();
        let (rd, wr) = conn.stream.into_split();
        Ok(Backend {
            rd,
            wr,
            fd,
            addr: conn.addr,
            pid: conn.pid,
            secret: conn.secret,
            params: BackendParams::new(reported),
            statements: Default::default(),
            verifier: credentials.verifier,
            created: now,
            idle_since: now,
            _upstream: guard,
            _counted: crate::metrics::OpenBackend::new(ctx.stats),
        })
    }

    /// A backend comes back after a transaction, idle: to the first client in line, or to the
    /// pool. One no longer fit is closed.
    pub fn release(&self, ctx: &Context<'_>, mut backend: Backend) {
        if !self.fit(ctx, &backend) || self.over_size() {
            self.close(backend);
            return;
        }
        backend.idle_since = Instant::now();
        self.pass_on(Handoff::Backend(Box::new(backend)));
    }

    fn pass_on(&self, handoff: Handoff) {
        let waiter = self.waiters.borrow_mut().pop_front();
        match (waiter, handoff) {
            (Some(waiter), handoff) => waiter.give(handoff),
            (None, Handoff::Backend(backend)) => self.idle.borrow_mut().push(*backend),
            (None, Handoff::Room) => self.open.set(self.open.get() - 1),
        }
    }

    /// A backend that cannot be reused (its client left mid-transaction, it failed, it is too
    /// old): closed, its place given to the next client in line.
    pub fn discard(&self, backend: Backend) {
        self.close(backend);
    }

    fn close(&self, backend: Backend) {
        terminate(backend);
        self.room_freed();
    }

    fn room_freed(&self) {
        self.open.set(self.open.get() - 1);
        if !self.waiters.borrow().is_empty() {
            self.open.set(self.open.get() + 1);
            self.pass_on(Handoff::Room);
        }
    }

    /// Closes idle backends past `server_idle_timeout` or `server_lifetime`, or whose role's
    /// verifier changed. Returns how many.
    pub fn sweep(&self, ctx: &Context<'_>) -> usize {
        let settings = self.settings.get();
        let mut closed = 0;
        let stale: Vec<Backend> = {
            let mut idle = self.idle.borrow_mut();
            let backends = std::mem::take(&mut *idle);
            let unfit = backends.iter().filter(|b| !self.fit(ctx, b)).count() as u32;
            // Idle too long: closed, but not below min_pool_size.
            let mut closable = (self.open.get() - unfit).saturating_sub(settings.min_pool_size);
            // pool_size was lowered: idle backends beyond it close now.
            let mut over_size = (self.open.get() - unfit).saturating_sub(settings.pool_size.get());
            let mut stale = Vec::new();
            for backend in backends {
                let expired = settings
                    .server_idle_timeout
                    .is_some_and(|t| backend.idle_since.elapsed() >= t);
                if !self.fit(ctx, &backend) {
                    stale.push(backend);
                } else if over_size > 0 {
                    over_size -= 1;
                    closable = closable.saturating_sub(1);
                    stale.push(backend);
                } else if expired && closable > 0 {
                    closable -= 1;
                    stale.push(backend);
                } else {
                    idle.push(backend);
                }
            }
            stale
        };
        for backend in stale {
            self.close(backend);
            closed += 1;
        }
        closed
    }

    /// True if the pool has nothing open and no one waiting: it can be forgotten.
    pub fn is_unused(&self) -> bool {
        self.open.get() == 0 && self.waiters.borrow().is_empty()
    }

    /// How many backends to open now to reach `min_pool_size`.
    pub fn missing(&self) -> u32 {
        if self.credentials.borrow().is_none() {
            return 0;
        }
        let settings = self.settings.get();
        settings.min_pool_size.saturating_sub(self.open.get())
    }

    /// Opens one backend towards `min_pool_size` and puts it in the pool.
    pub async fn prewarm(&self, ctx: &Context<'_>) -> Result<(), AcquireError> {
        self.open.set(self.open.get() + 1);
        let backend = self.connect(ctx).await?;
        self.release(ctx, backend);
        Ok(())
    }
}

/// A client's place in a pool's line, given up when dropped.
struct LeaveLine<'a> {
    pool: &'a Pool,
    waiter: &'a Rc<Waiter>,
}

impl Drop for LeaveLine<'_> {
    fn drop(&mut self) {
        // Only a waiter that gives up (timed out, its client gone) is still in the line: the
        // search is not paid by every transaction that waited its turn, at a length of up to
        // the branch's clients.
        if !self.waiter.given.get() {
            self.pool
                .waiters
                .borrow_mut()
                .retain(|w| !Rc::ptr_eq(w, self.waiter));
        }
        if let Some(handoff) = self.waiter.handoff.borrow_mut().take() {
            self.pool.pass_on(handoff);
        }
    }
}

/// Sends Terminate and closes, in the background.
pub fn terminate(backend: Backend) {
    monoio::spawn(say_goodbye(backend));
}

/// Sends Terminate (giving up after a second) and closes.
pub async fn say_goodbye(backend: Backend) {
    use monoio::io::AsyncWriteRentExt;
    let mut stream = backend.wr;
    let mut buf = Vec::with_capacity(frame::HEADER_BYTES);
    crate::protocol::write::terminate(&mut buf);
    let _ = monoio::time::timeout(Duration::from_secs(1), stream.write_all(buf)).await;
}

/// What a pool needs from its worker for one operation.
pub struct Context<'a> {
    /// The branch's primary.
    pub primary: SocketAddr,
    /// `timeouts.connect`.
    pub connect_timeout: Duration,
    /// Upstream accounting.
    pub upstreams: &'a Upstreams,
    /// The worker's buffers.
    pub buffers: &'a BufPool,
    /// The catalog in force.
    pub catalog: &'a crate::catalog::Catalog,
    /// The worker's counts.
    pub stats: &'a std::sync::Arc<crate::metrics::WorkerStats>,
}

impl Context<'_> {
    /// True while the catalog still holds `verifier` for the pool's role.
    fn verifier_in_force(&self, key: &PoolKey, verifier: &ScramVerifier) -> bool {
        self.catalog
            .branch(&key.branch)
            .and_then(|branch| branch.role(&key.role))
            .is_some_and(|current| **current == *verifier)
    }
}

/// A worker's pools.
#[derive(Debug, Default)]
pub struct Pools {
    pools: RefCell<HashMap<PoolKey, Rc<Pool>>>,
}

impl Pools {
    /// The pool for `key`, created with `settings` if new (its backends start with
    /// `startup`). An existing pool takes `settings`.
    pub fn get(&self, key: &PoolKey, settings: PoolSettings) -> Rc<Pool> {
        if let Some(pool) = self.pools.borrow().get(key) {
            pool.set_settings(settings);
            return pool.clone();
        }
        let mut startup = Vec::new();
        crate::protocol::write::startup_message(
            &mut startup,
            [("user", &*key.role), ("database", &*key.database)],
        );
        let pool = Rc::new(Pool {
            key: key.clone(),
            startup: startup.into_boxed_slice(),
            settings: Cell::new(settings),
            credentials: RefCell::new(None),
            idle: RefCell::new(Vec::new()),
            open: Cell::new(0),
            waiters: RefCell::new(VecDeque::new()),
            base: RefCell::new(None),
            known_good: Default::default(),
            texts: Default::default(),
            plans_epoch: Cell::new(0),
            startups: Default::default(),
        });
        self.pools.borrow_mut().insert(key.clone(), pool.clone());
        pool
    }

    /// Takes every idle backend out of every pool (the worker is stopping).
    pub fn take_idle_all(&self) -> Vec<Backend> {
        let mut all = Vec::new();
        for pool in self.pools.borrow().values() {
            let idle = std::mem::take(&mut *pool.idle.borrow_mut());
            pool.open.set(pool.open.get() - idle.len() as u32);
            all.extend(idle);
        }
        all
    }

    /// Every pool.
    pub fn all(&self) -> Vec<Rc<Pool>> {
        self.pools.borrow().values().cloned().collect()
    }

    /// Forgets pools with nothing open whose branch or role left the catalog.
    pub fn forget_unused(&self, catalog: &crate::catalog::Catalog) {
        self.pools.borrow_mut().retain(|key, pool| {
            !pool.is_unused()
                || catalog
                    .branch(&key.branch)
                    .is_some_and(|branch| branch.role(&key.role).is_some())
        });
    }
}
