//! A pooled client (the transaction-mode port): an authenticated client borrows a backend from
//! its pool for each transaction and gives it back when the transaction ends.
//!
//! 1. The front door ([`crate::front_door`]): TLS, the StartupMessage, SCRAM with the client.
//! 2. A place among `limits.max_client_connections`, and the pool of its (branch, role,
//!    database); the client's login is answered from what the pool's backends reported at
//!    startup (one backend is opened first if the pool has never had one), with a
//!    router-issued cancel key.
//! 3. Then, for ever: wait for the client's next message holding no backend and no buffer;
//!    take a backend from the pool ([`pool`]), give it the client's parameters ([`params`]),
//!    and relay both ways, message by message, while the [`transaction`] state machine follows
//!    what the backend still owes; when it says the transaction is over, the backend goes back.
//!
//! A client that leaves (or is closed) while its backend is not idle takes the backend with
//! it: the backend is closed, never lent in an unknown state. A backend that fails fails only
//! its client's transaction (08006); the pool opens another for the next one.

pub mod params;
pub mod pool;
pub mod prepared;
pub mod stream;
pub mod transaction;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use monoio::io::Splitable;
use monoio::net::tcp::{TcpOwnedReadHalf, TcpOwnedWriteHalf};
use monoio::net::TcpStream;
use monoio::time::Instant;

use crate::buf::{write_all_vec, ReadBuf};
use crate::cancel::{PooledCancel, Registration};
use crate::error::{KillReason, SessionError};
use crate::front_door::{self, Authenticated, Parts};
use crate::protocol::backend::{self as be, ParameterStatus};
use crate::protocol::frame::HEADER_BYTES;
use crate::protocol::frontend as fe;
use crate::protocol::sqlstate::SqlState;
use crate::protocol::startup::CancelKey;
use crate::protocol::write::{self, Severity};
use crate::throttle::LogThrottle;
use crate::tls::{self, RecordLayer};
use crate::worker::{LiveGuard, SessionHandle, SessionSlot, Signal, StartupSlot, Worker};

use params::{startup_params, ClientParams};
use pool::{AcquireError, Backend, Context, Pool, PoolKey};
use prepared::{BackendStatements, ClientStatements, Transient, Translator};
use stream::{MessageStream, Piece};
use transaction::{Reply, Send, Transaction};

/// A client waiting this long for a backend is told so with a NOTICE, as PgBouncer does.
pub const QUEUED_NOTICE_AFTER: Duration = Duration::from_secs(5);

/// The notice's text.
pub const QUEUED_NOTICE: &str =
    "client queued: waiting for a server connection, the pool is full (query_wait_timeout applies)";

/// How long a release waits for a cancel on its way to the backend to be delivered (so it
/// cannot reach the backend's next client); past it the backend is closed instead.
const CANCEL_DELIVERY_WAIT: Duration = Duration::from_secs(5);

/// Per branch, on all workers: its pooled clients (so `[pool] max_client_connections` holds
/// router-wide), its transactions holding a backend, and whether it is paused
/// (`branchgate pause`). The map is locked when a client logs in or leaves and by the control
/// socket; a transaction only touches its branch's atomics.
#[derive(Debug, Default)]
pub struct BranchClients(std::sync::Mutex<std::collections::HashMap<Box<str>, Arc<BranchEntry>>>);

/// One branch's counts.
#[derive(Debug, Default)]
pub struct BranchEntry {
    clients: std::sync::atomic::AtomicU32,
    active: std::sync::atomic::AtomicU32,
    paused: std::sync::atomic::AtomicBool,
}

impl BranchEntry {
    /// True while `branchgate pause` holds new transactions back.
    pub fn paused(&self) -> bool {
        self.paused.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Transactions of the branch holding a backend now.
    pub fn active(&self) -> u32 {
        self.active.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// A pooled client's place among its branch's; given back when dropped.
#[derive(Debug)]
pub struct BranchSlot {
    clients: Arc<BranchClients>,
    branch: Box<str>,
    entry: Arc<BranchEntry>,
}

/// A transaction holding a backend, counted for `branchgate pause`.
#[derive(Debug)]
struct ActiveTransaction(Arc<BranchEntry>);

impl Drop for ActiveTransaction {
    fn drop(&mut self) {
        self.0
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl BranchSlot {
    fn transaction(&self) -> ActiveTransaction {
        self.entry
            .active
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        ActiveTransaction(self.entry.clone())
    }
}

impl BranchClients {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<Box<str>, Arc<BranchEntry>>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn entry(&self, branch: &str) -> Arc<BranchEntry> {
        self.lock().entry(branch.into()).or_default().clone()
    }

    /// A place for one more client of `branch`, or `None` when it has `max` already.
    pub fn enter(
        self: &Arc<Self>,
        branch: &str,
        max: Option<std::num::NonZeroU32>,
    ) -> Option<BranchSlot> {
        let entry = self.entry(branch);
        entry
            .clients
            .fetch_update(
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
                |n| match max {
                    Some(max) if n >= max.get() => None,
                    _ => Some(n + 1),
                },
            )
            .ok()?;
        Some(BranchSlot {
            clients: self.clone(),
            branch: branch.into(),
            entry,
        })
    }

    /// Pooled clients of `branch` now.
    pub fn count(&self, branch: &str) -> u32 {
        self.lock()
            .get(branch)
            .map_or(0, |e| e.clients.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Holds back new transactions of `branch`'s pooled clients (running ones finish).
    pub fn pause(&self, branch: &str) -> Arc<BranchEntry> {
        let entry = self.entry(branch);
        entry
            .paused
            .store(true, std::sync::atomic::Ordering::Release);
        entry
    }

    /// Lets them go again. False if the branch was not paused.
    pub fn resume(&self, branch: &str) -> bool {
        self.entry(branch)
            .paused
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }
}

impl Drop for BranchSlot {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        if self.entry.clients.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last client left: forget the branch unless it is paused (checked again
            // under the lock: another client may have come in meanwhile).
            let mut entries = self.clients.lock();
            let idle = |e: &BranchEntry| {
                e.clients.load(Ordering::Acquire) == 0 && !e.paused() && e.active() == 0
            };
            if entries.get(&self.branch).is_some_and(|e| idle(e)) {
                entries.remove(&self.branch);
            }
        }
    }
}

/// A pooled client that has logged in.
struct Client {
    rd: TcpOwnedReadHalf,
    wr: TcpOwnedWriteHalf,
    records: Box<RecordLayer>,
    /// Ciphertext not yet opened (a partial record).
    cipher: ReadBuf,
    /// Opened bytes not yet processed (a partial message).
    plain: ReadBuf,
    /// Where the current client message is.
    messages: MessageStream,
    params: ClientParams,
    statements: ClientStatements,
    /// Its backend went away in a transaction block: the next transaction starts aborted.
    aborted: Option<Aborted>,
    pool: Rc<Pool>,
    handle: Rc<SessionHandle>,
    /// Which backend a cancel for this client reaches now.
    cancel: Arc<PooledCancel>,
    _cancel_registration: Registration,
    _slot: SessionSlot,
    branch: BranchSlot,
}

/// Serve one pooled client from its first byte. Every failure is logged once.
pub async fn session(
    worker: Rc<Worker>,
    tcp: TcpStream,
    peer: SocketAddr,
    live: LiveGuard,
    slot: StartupSlot,
    accepted: Instant,
) {
    let _live = live;
    // Each step boxed, and bound before it is awaited (a temporary would keep its room in
    // this task for the whole await): an idle client's task holds the client and a pointer.
    let starting = Box::pin(start(worker.clone(), tcp, peer, slot, accepted));
    let Some(mut client) = starting.await else {
        return;
    };
    let _registration = worker.register(client.handle.clone());
    tracing::debug!(
        %peer,
        branch = %client.pool.key.branch,
        role = %client.pool.key.role,
        database = %client.pool.key.database,
        "pooled client logged in"
    );
    let serving = Box::pin(serve(&worker, &mut client));
    let end = serving.await;
    let finishing = Box::pin(finish(&worker, client, peer, end));
    finishing.await;
}

/// Logs in: the front door, a place, the pool, the answer.
async fn start(
    worker: Rc<Worker>,
    tcp: TcpStream,
    peer: SocketAddr,
    startup_slot: StartupSlot,
    accepted: Instant,
) -> Option<Client> {
    let worker = &worker;
    let front_door::Entered {
        mut conn,
        auth,
        slot,
    } = front_door::enter(worker, tcp, peer, startup_slot, accepted).await?;
    let Authenticated {
        branch,
        role,
        backend_startup,
        client_key,
        server_final,
        verifier,
        ..
    } = *auth;
    let database = startup_params(&backend_startup)
        .filter(|(name, _)| *name == "database")
        .map(|(_, value)| value)
        .last()
        .unwrap_or(&role);
    let key = PoolKey {
        branch: branch.id.clone(),
        role: role.clone(),
        database: database.into(),
    };
    let settings = worker.shared.config.pool.for_branch(&branch.pool);
    let Some(branch_slot) = worker
        .shared
        .branch_clients
        .enter(&branch.id, settings.max_client_connections)
    else {
        Box::pin(front_door::refuse(
            conn,
            peer,
            SessionError::BranchFull(branch.id.clone()),
        ))
        .await;
        return None;
    };
    let pool = worker.pools.get(&key, settings);
    pool.set_credentials(client_key, verifier.clone());
    // The first client of a pool: its backends' startup parameters are learned from one.
    let base = match pool.base() {
        Some(base) => base,
        None => {
            let catalog = worker.shared.catalog.load_full();
            let ctx = context(worker, &branch.primary, &catalog);
            let deadline = Instant::now() + settings.query_wait_timeout;
            let acquired = monoio::select! {
                acquired = pool.acquire(&ctx, deadline) => acquired,
                _ = worker.drain_over() => Err(AcquireError::WaitTimeout),
            };
            match acquired {
                Ok(backend) => pool.release(&ctx, backend),
                Err(AcquireError::Connect { error, to_client }) => {
                    if !to_client.is_empty() {
                        // The backend refused the login (no such database): the client sees
                        // its error after AuthenticationOk, as from PostgreSQL itself.
                        write::auth_sasl_final(conn.out(), &server_final);
                        write::auth_ok(conn.out());
                        conn.out().extend_from_slice(&to_client);
                    }
                    front_door::refuse(conn, peer, SessionError::Backend(error)).await;
                    return None;
                }
                Err(error) => {
                    tracing::warn!(%peer, %error, "no backend for a pooled client's login");
                    front_door::refuse(
                        conn,
                        peer,
                        SessionError::Backend(crate::backend::BackendError::Timeout),
                    )
                    .await;
                    return None;
                }
            }
            pool.base()?
        }
    };
    let params = ClientParams::new(base, startup_params(&backend_startup));
    let search_path = startup_params(&backend_startup)
        .filter(|(name, _)| name.eq_ignore_ascii_case("search_path"))
        .map(|(_, value)| value)
        .last();
    let statements = ClientStatements::new(&role, search_path);
    let key = CancelKey {
        pid: router_pid(),
        secret: rand::random(),
    };
    let cancel = Arc::new(PooledCancel::default());
    let registration = worker.shared.cancels.register_pooled(key, cancel.clone());
    let out = conn.out();
    write::auth_sasl_final(out, &server_final);
    write::auth_ok(out);
    for (name, value) in params.reported_view() {
        write::parameter_status(out, name, value);
    }
    write::backend_key_data(out, key.pid, key.secret);
    write::ready_for_query(out, b'I');
    if let Err(error) = conn.flush().await {
        tracing::debug!(%peer, %error, "client gone before ReadyForQuery");
        conn.drop_silently();
        return None;
    }
    let Parts {
        tcp,
        records,
        handshake,
        cipher,
        plain,
    } = conn.into_parts()?;
    let (rd, wr) = tcp.into_split();
    let handle = Rc::new(SessionHandle {
        backend_addr: branch.primary,
        backend_key: key,
        branch: branch.id.clone(),
        role,
        sni: handshake.sni,
        verifier,
        kill: Signal::default(),
    });
    let mut client = Client {
        rd,
        wr,
        records,
        cipher: ReadBuf::detached(),
        plain: ReadBuf::detached(),
        messages: MessageStream::default(),
        params,
        statements,
        aborted: None,
        pool,
        handle,
        cancel,
        _cancel_registration: registration,
        _slot: slot,
        branch: branch_slot,
    };
    // Bytes the client sent past its login (normally none).
    if !plain.is_empty() {
        client.plain.attach(&worker.buffers);
        client.plain.spare_mut()[..plain.len()].copy_from_slice(&plain);
        client.plain.commit(plain.len());
    }
    if !cipher.is_empty() {
        client.cipher.attach(&worker.buffers);
        client.cipher.spare_mut()[..cipher.len()].copy_from_slice(&cipher);
        client.cipher.commit(cipher.len());
    }
    Some(client)
}

/// A process id for a pooled client's cancel key: above Linux's largest pid (2^22), so it is
/// never mistaken for a real backend's.
fn router_pid() -> u32 {
    rand::random::<u32>() % (i32::MAX as u32 - (1 << 22)) + (1 << 22)
}

fn context<'a>(
    worker: &'a Worker,
    primary: &SocketAddr,
    catalog: &'a crate::catalog::Catalog,
) -> Context<'a> {
    Context {
        primary: *primary,
        connect_timeout: worker.shared.config.timeouts.connect,
        upstreams: &worker.shared.upstreams,
        buffers: &worker.buffers,
        catalog,
    }
}

/// How a pooled client's life ended.
#[derive(Debug)]
enum End {
    /// Terminate, close_notify or end of stream.
    ClientClosed,
    /// The client's socket or records failed.
    ClientFailed(String),
    /// The client broke the protocol: it gets a FATAL 08P01.
    Protocol(String),
    /// The router ends it with a FATAL error.
    Fatal(SqlState, &'static str),
    /// The router closed it (shutdown, password reset).
    Killed(KillReason),
    /// Its backend failed and the client was told (the error was sent already).
    BackendFailed,
    /// Its backend went away mid-transaction; the client goes on.
    Lost(Lost),
}

/// Logs each backend failure (one per client while a backend is down).
static BACKEND_FAILED: LogThrottle = LogThrottle::new();

/// The client's life after login: transactions, each on a backend from the pool.
async fn serve(worker: &Rc<Worker>, client: &mut Client) -> End {
    loop {
        // Each boxed: while idle, the task holds the wait's state only.
        let waiting = Box::pin(next_batch(worker, client));
        if let Err(end) = waiting.await {
            return end;
        }
        let running = Box::pin(run_transaction(worker, client));
        if let Some(end) = running.await {
            return end;
        }
    }
}

/// Waits, holding no backend and no buffer, until the client sends messages that need a
/// backend; answers those that need none on the way.
async fn next_batch(worker: &Worker, client: &mut Client) -> Result<(), End> {
    loop {
        let settings = client.pool.settings();
        // Idle: nothing held but the socket (and a partial message, if the client sent one).
        client.cipher.detach(&worker.buffers);
        client.plain.detach(&worker.buffers);
        if !has_message(&client.plain) {
            let idle_deadline = settings.client_idle_timeout.map(|t| Instant::now() + t);
            monoio::select! {
                readable = readable(&client.rd) => readable.map_err(|e| End::ClientFailed(e.to_string()))?,
                reason = client.handle.kill.wait() => return Err(End::Killed(reason)),
                () = sleep_until(idle_deadline) => return Err(End::Fatal(
                    SqlState::IDLE_SESSION_TIMEOUT,
                    "client_idle_timeout",
                )),
            }
            // Boxed, as what it sends below: the wait above is what an idle client holds.
            let reading = Box::pin(read_client(worker, client));
            if !reading.await? {
                return Err(End::ClientClosed);
            }
            if !has_message(&client.plain) {
                continue;
            }
        }
        if client.plain.data().first() == Some(&fe::TERMINATE) {
            return Err(End::ClientClosed);
        }
        // Messages the router answers itself need no backend (a driver closing or preparing
        // a statement between transactions, with its Sync).
        let mut answer = Vec::new();
        let answered = prepared::answer_idle(
            &mut client.plain,
            &mut client.statements,
            &client.pool.known_good,
            settings.max_prepared_statements as usize,
            &mut answer,
        );
        if !answer.is_empty() {
            let sending = Box::pin(send_plain(worker, client, &answer));
            sending.await?;
        }
        if !answered {
            return Ok(());
        }
    }
}

/// One transaction: a backend from the pool, the messages both ways until it is over, the
/// backend back. `Some` when the client's life ends.
async fn run_transaction(worker: &Rc<Worker>, client: &mut Client) -> Option<End> {
    let settings = client.pool.settings();
    let pool = client.pool.clone();
    if worker
        .shared
        .catalog
        .load()
        .branch(&pool.key.branch)
        .is_none()
    {
        return Some(End::Killed(KillReason::PasswordReset));
    }
    // Both boxed: an idle client's task keeps no room for them.
    let acquiring = Box::pin(acquire(worker, client, &pool, settings));
    let mut backend = match acquiring.await {
        Ok(backend) => backend,
        Err(end) => return Some(end),
    };
    let active = client.branch.transaction();
    let transacting = Box::pin(transaction(worker, client, &mut backend));
    let outcome = transacting.await;
    let delivered = client.cancel.release(CANCEL_DELIVERY_WAIT).await;
    drop(active);
    let catalog = worker.shared.catalog.load_full();
    let primary = catalog
        .branch(&pool.key.branch)
        .map_or(backend.addr, |branch| branch.primary);
    let ctx = context(worker, &primary, &catalog);
    match outcome {
        Ok(()) if delivered => pool.release(&ctx, backend),
        Ok(()) => pool.discard(backend),
        Err(Broken {
            end: End::Lost(lost),
            ..
        }) => {
            pool.discard(backend);
            if !lost.now.is_empty() {
                if let Err(end) = send_plain(worker, client, &lost.now).await {
                    return Some(end);
                }
            }
            if lost.in_block {
                client.aborted = Some(Aborted { error: lost.error });
            }
        }
        Err(Broken { end, reusable }) => {
            if reusable && delivered {
                pool.release(&ctx, backend);
            } else {
                pool.discard(backend);
            }
            return Some(end);
        }
    }
    None
}

/// True if `plain` holds at least a message header (a message has begun).
fn has_message(plain: &ReadBuf) -> bool {
    plain.len() >= crate::protocol::frame::HEADER_BYTES
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => monoio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Waits until the socket behind `half` is readable, without lending a buffer to the kernel.
async fn readable(half: &TcpOwnedReadHalf) -> std::io::Result<()> {
    // SAFETY: as in `relay::readable`: monoio's split halves share the stream through this
    // cell, its operations keep no reference into it, and both halves live on this thread.
    let stream: &TcpStream = unsafe { &*half.0.get() };
    stream.readable(false).await
}

/// Reads what the client sent and opens it. `Ok(false)`: the client closed.
async fn read_client(worker: &Worker, client: &mut Client) -> Result<bool, End> {
    client.cipher.attach(&worker.buffers);
    client.plain.attach(&worker.buffers);
    let n = client
        .cipher
        .fill_from(&mut client.rd)
        .await
        .map_err(|e| End::ClientFailed(e.to_string()))?;
    if n == 0 {
        return Ok(false);
    }
    match tls::open_into(&mut client.records, &mut client.cipher, &mut client.plain) {
        Ok(open) => Ok(open),
        Err(error) => Err(End::ClientFailed(error.to_string())),
    }
}

/// Takes a backend from the pool for the client's transaction and gives it the client's
/// parameters. A client waiting longer than [`QUEUED_NOTICE_AFTER`] is told so.
async fn acquire(
    worker: &Rc<Worker>,
    client: &mut Client,
    pool: &Pool,
    settings: crate::config::PoolSettings,
) -> Result<Backend, End> {
    let deadline = Instant::now() + settings.query_wait_timeout;
    let notice_at = Instant::now() + QUEUED_NOTICE_AFTER;
    let entry = client.branch.entry.clone();
    let acquiring = async {
        loop {
            // `branchgate pause`: new transactions wait until `resume` (or their deadline).
            while entry.paused() {
                if Instant::now() >= deadline {
                    return Err(AcquireError::WaitTimeout);
                }
                monoio::time::sleep(PAUSE_POLL).await;
            }
            // The primary as the catalog names it now (a failover may have changed it).
            let catalog = worker.shared.catalog.load_full();
            let Some(branch) = catalog.branch(&pool.key.branch) else {
                return Err(AcquireError::NoCredentials);
            };
            // A reload may have changed the branch's pool settings.
            pool.set_settings(worker.shared.config.pool.for_branch(&branch.pool));
            let ctx = context(worker, &branch.primary, &catalog);
            match pool.acquire(&ctx, deadline).await {
                Err(AcquireError::Connect { error, .. })
                    if unavailable(&error) && Instant::now() + FAILOVER_RETRY < deadline =>
                {
                    // Failover buffering: the client has sent nothing anywhere yet, so it
                    // can wait for the primary to come back, or for the catalog to name a
                    // new one, and nothing runs twice.
                    if let Some(suppressed) = BUFFERING.allow() {
                        tracing::warn!(
                            branch = %pool.key.branch,
                            primary = %branch.primary,
                            %error,
                            suppressed,
                            "primary unreachable: new transactions wait for it (query_wait_timeout)"
                        );
                    }
                    drop(catalog);
                    monoio::time::sleep(FAILOVER_RETRY).await;
                }
                other => return other,
            }
        }
    };
    let mut acquiring = std::pin::pin!(acquiring);
    let mut noticed = false;
    let acquired = loop {
        let notice = async {
            if noticed {
                std::future::pending::<()>().await;
            }
            monoio::time::sleep_until(notice_at).await;
        };
        monoio::select! {
            acquired = &mut acquiring => break acquired,
            reason = client.handle.kill.wait() => return Err(End::Killed(reason)),
            () = notice => {
                noticed = true;
                let mut notice = Vec::new();
                write::notice_response(
                    &mut notice,
                    SqlState::SUCCESSFUL_COMPLETION,
                    QUEUED_NOTICE,
                );
                send_plain(worker, client, &notice).await?;
            }
        }
    };
    match acquired {
        Ok(backend) => Ok(backend),
        Err(AcquireError::WaitTimeout) => Err(End::Fatal(
            SqlState::TOO_MANY_CONNECTIONS,
            "query_wait_timeout",
        )),
        Err(AcquireError::Connect { error, to_client }) => {
            if let Some(suppressed) = BACKEND_FAILED.allow() {
                tracing::warn!(branch = %pool.key.branch, %error, suppressed, "backend connection failed");
            }
            if to_client.is_empty() {
                Err(End::Fatal(
                    SqlState::CONNECTION_FAILURE,
                    "could not connect to the branch's server",
                ))
            } else {
                // The backend's own ErrorResponse (its FATAL), then the end.
                let _ = send_plain(worker, client, &to_client).await;
                Err(End::BackendFailed)
            }
        }
        Err(AcquireError::NoCredentials) => Err(End::Fatal(
            SqlState::CONNECTION_FAILURE,
            "could not connect to the branch's server",
        )),
    }
}

/// How often a transaction held back by `branchgate pause` looks whether it may go.
const PAUSE_POLL: Duration = Duration::from_millis(10);
/// How long a transaction waits before trying an unreachable primary again.
const FAILOVER_RETRY: Duration = Duration::from_millis(250);
/// Logs transactions held back by an unreachable primary.
static BUFFERING: LogThrottle = LogThrottle::new();

/// True for failures that mean the server is not there now (down, restarting, being promoted),
/// not that it refused this client.
fn unavailable(error: &crate::backend::BackendError) -> bool {
    use crate::backend::BackendError;
    match error {
        BackendError::Connect(_)
        | BackendError::Timeout
        | BackendError::Closed
        | BackendError::Io(_) => true,
        BackendError::Rejected(code) => code.server_unavailable(),
        _ => false,
    }
}

/// Seals `plain` and sends it to the client.
async fn send_plain(worker: &Worker, client: &mut Client, plain: &[u8]) -> Result<(), End> {
    let _ = worker;
    let mut sealed = Vec::with_capacity(plain.len() + 64);
    tls::seal_into(&mut client.records, plain, &mut sealed)
        .map_err(|e| End::ClientFailed(e.to_string()))?;
    write_all_vec(&mut client.wr, &mut sealed)
        .await
        .map_err(|e| End::ClientFailed(e.to_string()))
}

/// One transaction on `backend`, until the state machine says it is over (the backend can go
/// back) or something ends the client or the backend.
async fn transaction(
    worker: &Rc<Worker>,
    client: &mut Client,
    backend: &mut Backend,
) -> Result<(), Broken> {
    let mut tx = Transaction::default();
    let mut to_backend: Vec<u8> = Vec::new();
    // The client's parameters on this backend.
    let mut sql = String::new();
    // A DDL changed a statement's result type under this backend: its statements are dropped
    // and prepared again as they are used (the client saw the error once).
    if backend.statements.take_stale() {
        sql.push_str("DEALLOCATE ALL;");
        backend.statements.clear();
    }
    backend.params.sync_to(&client.params, &mut sql);
    // After a lost backend: the transaction block it had, aborted, on this one (last: the
    // failing statement ends the query).
    let mut refuse_first = None;
    if let Some(aborted) = client.aborted.take() {
        sql.push_str("BEGIN;");
        match aborted.error {
            Some(error) => refuse_first = Some(error),
            None => {
                sql.push_str(prepared::REFUSAL_SQL);
                sql.push(';');
            }
        }
    }
    if !sql.is_empty() {
        tx.router_query();
        write::query(&mut to_backend, &sql);
    }
    client
        .cancel
        .hold(backend.addr, backend.pid, backend.secret);
    let state = RefCell::new(Linked {
        tx,
        client_at_rest: false,
        owed: false,
        transient: Transient::default(),
    });
    let settings = client.pool.settings();
    let max_prepared = settings.max_prepared_statements as usize;
    let pool = client.pool.clone();
    let owed_waker: Cell<Option<std::task::Waker>> = Cell::new(None);
    // A record is on its way to the client: the transaction cannot stop there.
    let writing = Cell::new(false);
    let write_done: Cell<Option<std::task::Waker>> = Cell::new(None);
    // A read from the backend is under way: stopping there could lose what it read.
    let reading = Cell::new(false);
    // What the backend's messages told about it.
    let found = RefCell::new(Findings::default());
    let Client {
        rd,
        wr,
        records,
        cipher,
        plain,
        messages,
        params,
        statements,
        handle,
        ..
    } = client;
    let statements = RefCell::new(statements);
    let backend_statements = RefCell::new(&mut backend.statements);
    let records = RefCell::new(&mut **records);
    let params = RefCell::new(params);
    let backend_params = RefCell::new(&mut backend.params);
    let buffers = &worker.buffers;
    let settings_idle_tx = settings.idle_transaction_timeout;
    let (backend_rd, backend_wr) = (&mut backend.rd, &mut backend.wr);

    let client_to_backend = async {
        let mut forwarded = false;
        loop {
            // The client's next messages begin a new transaction: the backend goes back first
            // (the client may well get it again), so clients in line, `server_lifetime` and
            // password resets are served at every transaction boundary, even for a client
            // that sends its next transaction the moment the last one ends.
            if forwarded
                && !plain.is_empty()
                && !messages.inside()
                && state.borrow().tx.releasable()
            {
                // The last ReadyForQuery may still be on its way to the client.
                std::future::poll_fn(|cx| {
                    if writing.get() {
                        write_done.set(Some(cx.waker().clone()));
                        std::task::Poll::Pending
                    } else {
                        std::task::Poll::Ready(())
                    }
                })
                .await;
                if state.borrow().tx.releasable() {
                    return Step::Released;
                }
            }
            forwarded = true;
            // Whole messages at hand go to the backend.
            let step = {
                let mut state = state.borrow_mut();
                let Linked { tx, transient, .. } = &mut *state;
                let side = ClientSide {
                    tx,
                    statements: &mut statements.borrow_mut(),
                    backend: &mut backend_statements.borrow_mut(),
                    max_prepared,
                    transient,
                    refuse_first: &mut refuse_first,
                };
                client_messages(plain, messages, side, &mut to_backend)
            };
            let terminated = match step {
                Ok(terminated) => terminated,
                Err(end) => return end,
            };
            {
                let mut state = state.borrow_mut();
                if state.tx.owes_synthesized() {
                    state.owed = true;
                    if let Some(waker) = owed_waker.take() {
                        waker.wake();
                    }
                }
            }
            if !to_backend.is_empty() {
                if let Err(error) = write_all_vec(backend_wr, &mut to_backend).await {
                    return Step::BackendFailed(error.to_string());
                }
            }
            if terminated {
                return Step::ClientGone;
            }
            // At rest: nothing half read, nothing half written.
            let at_rest = !messages.inside() && plain.is_empty();
            {
                let mut state = state.borrow_mut();
                if at_rest && state.tx.releasable() && !writing.get() {
                    return Step::Released;
                }
                state.client_at_rest = at_rest;
            }
            plain.detach(buffers);
            cipher.detach(buffers);
            let idle_tx = match settings_idle_tx {
                Some(limit) if state.borrow().tx.status() != b'I' => Some(Instant::now() + limit),
                _ => None,
            };
            let waited = monoio::select! {
                readable = readable(rd) => readable.map_err(|e| Step::ClientFailed(e.to_string())),
                () = sleep_until(idle_tx) => Err(Step::Fatal(
                    SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                    "idle transaction timeout",
                )),
            };
            if let Err(step) = waited {
                return step;
            }
            state.borrow_mut().client_at_rest = false;
            cipher.attach(buffers);
            plain.attach(buffers);
            match cipher.fill_from(rd).await {
                Ok(0) => return Step::ClientGone,
                Ok(_) => {}
                Err(error) => return Step::ClientFailed(error.to_string()),
            }
            match tls::open_into(&mut records.borrow_mut(), cipher, plain) {
                Ok(true) => {}
                Ok(false) => return Step::ClientGone,
                Err(error) => return Step::ClientFailed(error.to_string()),
            }
        }
    };
    let backend_to_client = async {
        let mut from_backend = ReadBuf::detached();
        let mut backend_stream = MessageStream::default();
        let mut to_client: Vec<u8> = Vec::new();
        let mut sealed: Vec<u8> = Vec::new();
        let result = loop {
            let owed = std::future::poll_fn(|cx| {
                if std::mem::take(&mut state.borrow_mut().owed) {
                    std::task::Poll::Ready(())
                } else {
                    owed_waker.set(Some(cx.waker().clone()));
                    std::task::Poll::Pending
                }
            });
            let readable = monoio::select! {
                readable = readable(backend_rd) => Some(readable),
                () = owed => None,
            };
            match readable {
                Some(Err(error)) => break Step::BackendFailed(error.to_string()),
                Some(Ok(())) => {
                    from_backend.attach(buffers);
                    reading.set(true);
                    let read = from_backend.fill_from(backend_rd).await;
                    reading.set(false);
                    match read {
                        Ok(0) => break Step::BackendFailed("closed".into()),
                        Ok(_) => {}
                        Err(error) => break Step::BackendFailed(error.to_string()),
                    }
                    let done = {
                        let mut state = state.borrow_mut();
                        let done = backend_messages(
                            &mut from_backend,
                            &mut backend_stream,
                            &mut state.tx,
                            &mut params.borrow_mut(),
                            &mut backend_params.borrow_mut(),
                            &mut to_client,
                            &mut found.borrow_mut(),
                        );
                        if std::mem::take(&mut found.borrow_mut().stale_plans) {
                            backend_statements.borrow_mut().mark_stale();
                        }
                        for statement in state.tx.take_accepted() {
                            pool.known_good.add(&statement);
                        }
                        for undo in state.tx.take_undo() {
                            undo.apply(
                                &mut statements.borrow_mut(),
                                &mut backend_statements.borrow_mut(),
                            );
                        }
                        done
                    };
                    if let Err(error) = done {
                        break Step::BackendProtocol(error);
                    }
                }
                None => state.borrow_mut().tx.take_synthesized(&mut to_client),
            }
            if !to_client.is_empty() {
                if let Err(error) =
                    tls::seal_into(&mut records.borrow_mut(), &to_client, &mut sealed)
                {
                    break Step::ClientFailed(error.to_string());
                }
                to_client.clear();
                writing.set(true);
                let written = write_all_vec(wr, &mut sealed).await;
                writing.set(false);
                if let Some(waker) = write_done.take() {
                    waker.wake();
                }
                if let Err(error) = written {
                    break Step::ClientFailed(error.to_string());
                }
            }
            from_backend.detach(buffers);
            let state = state.borrow();
            if state.client_at_rest && state.tx.releasable() && !backend_stream.inside() {
                break Step::Released;
            }
        };
        from_backend.release(buffers);
        result
    };
    let step = monoio::select! {
        step = client_to_backend => step,
        step = backend_to_client => step,
        reason = handle.kill.wait() => Step::Killed(reason),
    };
    let reusable = !state.borrow().tx.busy() && !writing.get() && !reading.get();
    let end = match step {
        Step::Released => return Ok(()),
        Step::ClientGone => End::ClientClosed,
        Step::ClientFailed(error) => End::ClientFailed(error),
        Step::Fatal(code, message) => End::Fatal(code, message),
        Step::Protocol(what) => End::Protocol(what),
        Step::Killed(reason) => End::Killed(reason),
        Step::BackendProtocol(error) => {
            tracing::warn!(%error, "backend broke the protocol: closing it and its client");
            End::Fatal(SqlState::CONNECTION_FAILURE, LOST_BACKEND)
        }
        Step::BackendFailed(error) => {
            if let Some(suppressed) = BACKEND_FAILED.allow() {
                tracing::warn!(%error, suppressed, "backend failed during a transaction");
            }
            let tx = &state.borrow().tx;
            let writing_now = writing.get();
            return Err(Broken {
                end: lost(tx, found.borrow_mut().unsolicited.take(), writing_now),
                reusable: false,
            });
        }
    };
    Err(Broken { end, reusable })
}

/// What a client whose backend went away mid-transaction gets: the error and ReadyForQuery its
/// outstanding request is owed, and, if a transaction block was open, an aborted transaction
/// the router re-creates on its next backend (so its COMMIT cannot succeed there: it must roll
/// back, as after any error). A client owed more than one answer, or in a COPY, is closed.
fn lost(tx: &Transaction, unsolicited: Option<Vec<u8>>, writing: bool) -> End {
    let in_block = tx.status() != b'I';
    let owed = tx.owed_ready();
    if writing || tx.in_copy() || owed > 1 || (owed == 0 && !in_block) {
        return End::Fatal(SqlState::CONNECTION_FAILURE, LOST_BACKEND);
    }
    let error = unsolicited.unwrap_or_else(|| {
        let mut error = Vec::new();
        write::error_response(
            &mut error,
            Severity::Error,
            SqlState::CONNECTION_FAILURE,
            LOST_BACKEND,
        );
        error
    });
    if owed == 1 {
        // The answer now: the error (unless the backend's reached the client already), then
        // ReadyForQuery.
        let mut now = Vec::new();
        if !tx.errored() {
            now.extend_from_slice(&error);
        }
        write::ready_for_query(&mut now, if in_block { b'E' } else { b'I' });
        return End::Lost(Lost {
            now,
            in_block,
            error: None,
        });
    }
    // Idle in a transaction block: the error answers the client's next message.
    End::Lost(Lost {
        now: Vec::new(),
        in_block,
        error: Some(error.into_boxed_slice()),
    })
}

/// A backend lost under a client that goes on.
#[derive(Debug)]
struct Lost {
    /// What the client is sent at once.
    now: Vec<u8>,
    /// A transaction block was open: it is re-created, aborted, on the next backend.
    in_block: bool,
    /// The error the client's next message gets (it was idle when the backend went).
    error: Option<Box<[u8]>>,
}

/// The first messages of a client's next transaction after it lost its backend in a
/// transaction block: the backend is put in an aborted transaction block, and the client's
/// first message is refused with the error it is owed, if any.
#[derive(Debug, Default)]
struct Aborted {
    error: Option<Box<[u8]>>,
}

/// An ErrorResponse the backend sent unasked (its FATAL before it goes away), as an ERROR:
/// the client's connection goes on.
fn as_error(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len());
    out.push(be::ERROR_RESPONSE);
    out.extend_from_slice(&[0; 4]);
    let mut r =
        crate::protocol::reader::Reader::new(message.get(HEADER_BYTES..).unwrap_or_default());
    while let Ok(field) = r.u8() {
        if field == 0 {
            break;
        }
        let Ok(value) = r.cstr() else { break };
        out.push(field);
        if matches!(field, b'S' | b'V') && matches!(value, b"FATAL" | b"PANIC") {
            out.extend_from_slice(b"ERROR");
        } else {
            out.extend_from_slice(value);
        }
        out.push(0);
    }
    out.push(0);
    let len = (out.len() - 1) as u32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out
}

/// What a client whose backend failed mid-transaction is told (PgBouncer's words, which
/// applications match, then ours).
const LOST_BACKEND: &str = "server conn crashed? (the connection to the branch's server was lost)";

/// Why a transaction ended other than with the backend released.
struct Broken {
    end: End,
    /// The backend is idle all the same (the client left between transactions): it can go
    /// back to the pool.
    reusable: bool,
}

/// The state both directions of a transaction share.
struct Linked {
    tx: Transaction,
    /// The client direction has nothing half read or half written: the transaction may end.
    client_at_rest: bool,
    /// The router owes the client replies of its own (they reached the head of the queue).
    owed: bool,
    /// What the client's unnamed statement is doing in this transaction.
    transient: Transient,
}

/// How one direction of a transaction stopped.
#[derive(Debug)]
enum Step {
    Released,
    ClientGone,
    ClientFailed(String),
    Protocol(String),
    Fatal(SqlState, &'static str),
    Killed(KillReason),
    BackendFailed(String),
    BackendProtocol(String),
}

/// The client's view of one transaction's messages: what the router keeps across them.
struct ClientSide<'a> {
    tx: &'a mut Transaction,
    statements: &'a mut ClientStatements,
    backend: &'a mut BackendStatements,
    max_prepared: usize,
    transient: &'a mut Transient,
    /// The error the client's first message gets in place of its answer.
    refuse_first: &'a mut Option<Box<[u8]>>,
}

/// Bytes of a Bind the router needs before rewriting it: the header and both names.
const BIND_PREFIX: usize = HEADER_BYTES + 2 * (prepared::MAX_NAME_BYTES + 1);

/// Moves the client's whole messages (and pieces of long ones) from `plain` to `out`, as the
/// state machine says, statement names rewritten for the backend. Returns true if the client
/// sent Terminate.
fn client_messages(
    plain: &mut ReadBuf,
    stream: &mut MessageStream,
    side: ClientSide<'_>,
    out: &mut Vec<u8>,
) -> Result<bool, Step> {
    let ClientSide {
        tx,
        statements,
        backend,
        max_prepared,
        transient,
        refuse_first,
    } = side;
    let protocol = |e: prepared::Malformed| Step::Protocol(e.to_string());
    loop {
        let capacity = plain.capacity();
        let prefix = if plain.data().first() == Some(&fe::BIND) {
            BIND_PREFIX
        } else {
            HEADER_BYTES + 1
        };
        let piece = stream
            .next(plain.data(), capacity, prefix, |tag| {
                matches!(
                    tag,
                    fe::DESCRIBE | fe::CLOSE | fe::PARSE | fe::BIND | fe::QUERY
                )
            })
            .map_err(|e| Step::Protocol(e.to_string()))?;
        let data = plain.data();
        let (tag, len, whole) = match piece {
            None => return Ok(false),
            Some(Piece::Rest { len }) => {
                if stream.passing() {
                    out.extend_from_slice(&data[..len]);
                }
                plain.consume(len);
                continue;
            }
            Some(Piece::Whole { tag, len }) => (tag, len, true),
            Some(Piece::Start { tag, len }) => (tag, len, false),
        };
        let message = &data[..len];
        tracing::trace!(tag = %char::from(tag), len, whole, "client message");
        let total = if whole {
            len
        } else {
            // The header's length, type byte included.
            usize::try_from(u32::from_be_bytes([data[1], data[2], data[3], data[4]]))
                .unwrap_or(usize::MAX)
                .saturating_add(1)
        };
        if let Some(error) = refuse_first.take() {
            let simple = tag == fe::QUERY;
            prepared::refuse(tx, out, error, simple);
            if simple || !matches!(tag, fe::SYNC | fe::FLUSH) {
                // In its place: the rest of it is dropped.
                if !whole {
                    stream.started(false);
                }
                plain.consume(len);
                continue;
            }
        }
        let mut translator = Translator {
            tx: &mut *tx,
            client: &mut *statements,
            backend: &mut *backend,
            max: max_prepared,
            transient: &mut *transient,
            out: &mut *out,
        };
        let pass_rest = {
            match tag {
                fe::TERMINATE => {
                    plain.consume(len);
                    return Ok(true);
                }
                fe::PARSE if whole => {
                    translator.parse(message).map_err(protocol)?;
                    false
                }
                fe::PARSE => translator.long_parse(message),
                fe::BIND => translator.bind(message, total).map_err(protocol)?,
                fe::DESCRIBE if whole => {
                    translator.describe(message).map_err(protocol)?;
                    false
                }
                fe::CLOSE if whole => {
                    translator.close(message).map_err(protocol)?;
                    false
                }
                fe::QUERY if whole => {
                    translator.query(message);
                    false
                }
                _ => {
                    let kind = data.get(HEADER_BYTES).copied().unwrap_or(0);
                    let send = translator.tx.client(tag, kind) == Send::Forward;
                    if send {
                        out.extend_from_slice(message);
                    }
                    send
                }
            }
        };
        if !whole {
            stream.started(pass_rest);
        }
        plain.consume(len);
    }
}

/// Moves the backend's messages from `buf` to `out` (for the client) as the state machine
/// says, following the parameters it reports.
fn backend_messages(
    buf: &mut ReadBuf,
    stream: &mut MessageStream,
    tx: &mut Transaction,
    client: &mut ClientParams,
    backend: &mut params::BackendParams,
    out: &mut Vec<u8>,
    found: &mut Findings,
) -> Result<(), String> {
    loop {
        let capacity = buf.capacity();
        let piece = stream
            .next(buf.data(), capacity, 5, |tag| {
                matches!(
                    tag,
                    be::READY_FOR_QUERY | be::ERROR_RESPONSE | be::PARAMETER_STATUS
                )
            })
            .map_err(|e| e.to_string())?;
        let data = buf.data();
        if matches!(piece, Some(Piece::Whole { .. } | Piece::Start { .. })) {
            // Replies the router owes that came before this message (the client direction
            // may have queued some since).
            tx.take_synthesized(out);
        }
        match piece {
            None => return Ok(()),
            Some(Piece::Whole { tag, len }) => {
                let body = &data[5..len];
                if tag == be::ERROR_RESPONSE && !tx.awaiting_backend() {
                    // Not an answer: the backend is going away. The client gets it when the
                    // router tells it the backend is lost.
                    found.unsolicited = Some(as_error(&data[..len]));
                    buf.consume(len);
                    continue;
                }
                if tag == be::ERROR_RESPONSE && stale_plan(body) {
                    found.stale_plans = true;
                }
                let resetting = tx.resetting();
                let reply = tx.backend(tag, body).map_err(|e| e.to_string())?;
                if tag == be::PARAMETER_STATUS {
                    if let Ok(status) = ParameterStatus::parse(body) {
                        backend.reported.set(status.name, status.value);
                        // Swallowed but for a reset: the answer to the router's SET for this
                        // client, in the server's spelling of the client's value.
                        if !resetting {
                            client.reported(status.name, status.value);
                        }
                    }
                }
                if tag == be::READY_FOR_QUERY && tx.take_reset_done() {
                    // The backend went back to the pool's defaults; the client, as on a real
                    // server, to its own (applied on its next backend, or this one next time).
                    backend.unreported = params::Params::default();
                    for (name, value) in client.reset_to_startup() {
                        write::parameter_status(out, &name, &value);
                    }
                }
                if reply == Reply::Forward {
                    out.extend_from_slice(&data[..len]);
                }
                tx.take_synthesized(out);
                buf.consume(len);
            }
            Some(Piece::Start { tag, len }) => {
                let reply = tx.backend(tag, &[]).map_err(|e| e.to_string())?;
                stream.started(reply == Reply::Forward);
                if reply == Reply::Forward {
                    out.extend_from_slice(&data[..len]);
                }
                buf.consume(len);
            }
            Some(Piece::Rest { len }) => {
                if stream.passing() {
                    out.extend_from_slice(&data[..len]);
                }
                buf.consume(len);
                if !stream.inside() {
                    tx.take_synthesized(out);
                }
            }
        }
    }
}

/// What a backend's messages told the router about the backend.
#[derive(Debug, Default)]
struct Findings {
    /// An ErrorResponse it sent unasked (its FATAL as it goes away), as an ERROR.
    unsolicited: Option<Vec<u8>>,
    /// One of its statements' plans went stale.
    stale_plans: bool,
}

/// True for PostgreSQL's error for a prepared statement whose result type a DDL changed: the
/// statement stays broken on that backend until it is prepared again.
fn stale_plan(body: &[u8]) -> bool {
    crate::protocol::backend::ErrorFields::parse(body).is_ok_and(|fields| {
        fields.code == "0A000" && fields.message == "cached plan must not change result type"
    })
}

/// Says goodbye as fits how the client's life ended: a FATAL error where the router ends it,
/// then close_notify.
async fn finish(worker: &Worker, mut client: Client, peer: SocketAddr, end: End) {
    let mut plain = Vec::new();
    match &end {
        End::ClientClosed => tracing::debug!(%peer, "pooled client closed"),
        End::ClientFailed(error) => tracing::debug!(%peer, %error, "pooled client failed"),
        End::BackendFailed => tracing::debug!(%peer, "pooled client's backend refused it"),
        // Handled where it happens: the client goes on.
        End::Lost(_) => {}
        End::Protocol(what) => {
            tracing::info!(%peer, %what, "pooled client broke the protocol");
            write::error_response(
                &mut plain,
                Severity::Fatal,
                SqlState::PROTOCOL_VIOLATION,
                what,
            );
        }
        End::Fatal(code, message) => {
            tracing::info!(%peer, %message, "pooled client closed by the router");
            write::error_response(&mut plain, Severity::Fatal, *code, message);
        }
        End::Killed(reason) => {
            tracing::info!(%peer, ?reason, "pooled client closed by the router");
            let (code, message) = reason.to_wire();
            write::error_response(&mut plain, Severity::Fatal, code, message);
        }
    }
    // Whatever the client sent last is not needed: the buffers go back.
    client.cipher.clear();
    client.plain.clear();
    client.cipher.detach(&worker.buffers);
    client.plain.detach(&worker.buffers);
    if matches!(end, End::ClientFailed(_)) {
        return;
    }
    let mut last = Vec::new();
    if !plain.is_empty() {
        let _ = tls::seal_final_into(&mut client.records, &plain, &mut last);
    }
    let _ = tls::close_notify_into(&mut client.records, &mut last);
    let _ = monoio::time::timeout(
        crate::relay::CLOSE_WRITE_TIMEOUT,
        write_all_vec(&mut client.wr, &mut last),
    )
    .await;
}

/// How often a worker looks after its pools: idle and old backends closed, `min_pool_size`
/// kept, settings taken from the catalog.
pub const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(1);

/// Logs pre-warming failures (one per pool and interval while a backend is down).
static PREWARM_FAILED: LogThrottle = LogThrottle::new();

/// Looks after the worker's pools until the worker stops: closes idle backends past
/// `server_idle_timeout` or `server_lifetime` or whose role's password changed, opens backends
/// up to `min_pool_size`, and forgets pools of branches and roles gone from the catalog.
pub async fn maintain(worker: Rc<Worker>) {
    loop {
        monoio::time::sleep(MAINTENANCE_INTERVAL).await;
        maintain_once(&worker).await;
    }
}

/// Closes the idle backends of every pool of a stopping worker, each with a Terminate.
pub async fn close_pools(worker: &Worker) {
    let idle = worker.pools.take_idle_all();
    if idle.is_empty() {
        return;
    }
    let closing: Vec<_> = idle
        .into_iter()
        .map(|backend| monoio::spawn(pool::say_goodbye(backend)))
        .collect();
    for done in closing {
        done.await;
    }
}

/// One round of [`maintain`].
pub async fn maintain_once(worker: &Rc<Worker>) {
    let catalog = worker.shared.catalog.load_full();
    for pool in worker.pools.all() {
        let Some(branch) = catalog.branch(&pool.key.branch) else {
            continue;
        };
        pool.set_settings(worker.shared.config.pool.for_branch(&branch.pool));
        let ctx = context(worker, &branch.primary, &catalog);
        let closed = pool.sweep(&ctx);
        if closed > 0 {
            tracing::debug!(
                branch = %pool.key.branch,
                role = %pool.key.role,
                closed,
                "idle backends closed"
            );
        }
        for _ in 0..pool.missing() {
            if let Err(error) = pool.prewarm(&ctx).await {
                if let Some(suppressed) = PREWARM_FAILED.allow() {
                    tracing::warn!(
                        branch = %pool.key.branch,
                        role = %pool.key.role,
                        %error,
                        suppressed,
                        "opening a backend for min_pool_size failed"
                    );
                }
                break;
            }
        }
    }
    worker.pools.forget_unused(&catalog);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::backend::ErrorFields;

    fn fields(message: &[u8]) -> (String, String, String) {
        let fields = ErrorFields::parse(&message[HEADER_BYTES..]).expect("an ErrorResponse");
        (
            fields.severity.to_owned(),
            fields.code.to_owned(),
            fields.message.to_owned(),
        )
    }

    #[test]
    fn a_fatal_sent_unasked_reaches_the_client_as_an_error() {
        let mut fatal = Vec::new();
        write::error_response(
            &mut fatal,
            Severity::Fatal,
            SqlState::ADMIN_SHUTDOWN,
            "terminating connection due to administrator command",
        );
        let error = as_error(&fatal);
        assert_eq!(
            fields(&error),
            (
                "ERROR".to_owned(),
                "57P01".to_owned(),
                "terminating connection due to administrator command".to_owned()
            )
        );
        assert_eq!(error.len(), fatal.len(), "FATAL and ERROR are as long");
    }

    #[test]
    fn a_lost_backend_owes_the_client_what_it_waits_for() {
        // Idle in a transaction block: the error waits for the client's next message.
        let mut tx = Transaction::default();
        tx.client(fe::QUERY, 0);
        tx.backend(be::COMMAND_COMPLETE, b"").expect("in turn");
        tx.backend(be::READY_FOR_QUERY, b"T").expect("in turn");
        match lost(&tx, None, false) {
            End::Lost(Lost {
                now,
                in_block: true,
                error: Some(error),
            }) => {
                assert!(now.is_empty());
                assert_eq!(fields(&error).1, "08006");
            }
            other => panic!("{other:?}"),
        }
        // A query under way in the block: its error (the backend's, already sent) and a
        // ReadyForQuery saying the block failed.
        tx.client(fe::QUERY, 0);
        tx.backend(be::ERROR_RESPONSE, b"").expect("in turn");
        match lost(&tx, None, false) {
            End::Lost(Lost {
                now,
                in_block: true,
                error: None,
            }) => assert_eq!(now, [b'Z', 0, 0, 0, 5, b'E']),
            other => panic!("{other:?}"),
        }
        // Two answers owed (a pipeline): the client is closed.
        let mut tx = Transaction::default();
        for tag in [fe::SYNC, fe::SYNC] {
            tx.client(tag, 0);
        }
        assert!(matches!(lost(&tx, None, false), End::Fatal(..)));
        // A query outside a block: the error, then ReadyForQuery idle.
        let mut tx = Transaction::default();
        tx.client(fe::QUERY, 0);
        match lost(&tx, None, false) {
            End::Lost(Lost {
                now,
                in_block: false,
                ..
            }) => {
                assert_eq!(now[0], b'E');
                assert!(now.ends_with(&[b'Z', 0, 0, 0, 5, b'I']));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn branch_limits_count_across_workers_and_come_back() {
        let clients = Arc::new(BranchClients::default());
        let max = std::num::NonZeroU32::new(2);
        let a = clients.enter("b1", max).expect("first");
        let _b = clients.enter("b1", max).expect("second");
        assert!(clients.enter("b1", max).is_none());
        assert!(clients.enter("b2", max).is_some(), "another branch");
        drop(a);
        assert!(clients.enter("b1", max).is_some());
        assert!(clients.enter("b1", None).is_some(), "no limit");
    }
}
