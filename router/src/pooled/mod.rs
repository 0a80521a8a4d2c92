//! A pooled client (the transaction-mode port): an authenticated client borrows a backend from
//! its pool for each transaction and gives it back when the transaction ends.
//!
//! 1. The front door ([`crate::front_door`]): TLS, the StartupMessage, SCRAM with the client.
//! 2. A place among `limits.max_client_connections`; the hand-off to the worker that owns the
//!    branch when that is another one ([`crate::handoff`]: there [`handed_over`] goes on), so
//!    that a branch's clients share one pool; and the pool of its (branch, role,
//!    database) on the worker that serves it; the client's login is answered from what the pool's backends reported at
//!    startup (one backend is opened first if the pool has never had one), with a
//!    router-issued cancel key.
//! 3. Then, for ever: wait for the client's next message holding no backend and no buffer;
//!    take a backend from the pool ([`pool`]), give it the client's parameters ([`params`]),
//!    and relay both ways, message by message, while the [`transaction`](mod@transaction)
//!    state machine follows what the backend still owes; when it says the transaction is over,
//!    the backend goes back.
//!
//! A client that leaves (or is closed) while its backend is not idle takes the backend with
//! it: the backend is closed, never lent in an unknown state. A backend that fails fails only
//! its client's transaction (08006); the pool opens another for the next one.
//!
//! # Layout
//! [`session`], here, is a client's life: its login, then for ever its next messages and a
//! transaction for them, then its goodbye. The parts:
//! - [`login`]: step 2: the client's place among its branch's, its pool, the answer to its login.
//! - [`idle`]: step 3 between transactions: the wait for the client's next messages, holding
//!   nothing, and the answers that need no backend.
//! - [`acquire`](mod@acquire): a backend for the next transaction: `branchgate pause`, failover
//!   buffering, the queued notice.
//! - [`exchange`]: one transaction on its backend: both directions, message by message.
//! - [`lost`](mod@lost): a backend gone mid-transaction: what its client is owed, and the
//!   aborted block it finds on its next backend.
//! - [`branches`]: each branch's pooled clients, running transactions and pause, on all workers.
//! - [`maintenance`]: each worker's pools looked after: idle and old backends closed,
//!   `min_pool_size` kept, idle backends closed when the worker stops.
//! - [`startup_checks`]: the clients' startup parameter sets the pool's backends have read.
//! - [`pool`]: the pools of backends. - [`params`]: session parameters, the client's and the
//!   backend's. - [`prepared`]: prepared statements across backends. - [`stream`]: messages as
//!   they arrive. - [`transaction`](mod@transaction): the state machine that says when a
//!   backend can go back.

pub mod acquire;
pub mod branches;
pub mod exchange;
pub mod idle;
pub mod login;
pub mod lost;
pub mod maintenance;
pub mod params;
pub mod pool;
pub mod prepared;
pub mod query_text;
pub mod readback;
pub mod startup_checks;
pub mod stream;
pub mod transaction;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use monoio::net::tcp::{TcpOwnedReadHalf, TcpOwnedWriteHalf};
use monoio::net::TcpStream;
use monoio::time::Instant;

use crate::buf::{write_all_vec, ReadBuf};
use crate::cancel::{PooledCancel, Registration};
use crate::error::KillReason;
use crate::handoff::Handoff;
use crate::probes::{self, ProbePort};
use crate::protocol::sqlstate::SqlState;
use crate::protocol::write::{self, Severity};
use crate::throttle::LogThrottle;
use crate::tls::{self, RecordLayer};
use crate::worker::{LiveGuard, SessionHandle, SessionSlot, StartupSlot, Worker};

use acquire::acquire;
use exchange::{transaction, Broken};
use idle::next_batch;
use login::start;
use lost::{Aborted, Lost};
use params::ClientParams;
use pool::{Context, Pool};
use prepared::ClientStatements;
use stream::MessageStream;

pub use branches::{BranchClients, BranchEntry, BranchFigures, BranchSlot};
pub use maintenance::{close_pools, maintain, maintain_once, MAINTENANCE_INTERVAL};

/// What a transaction's statements left in its backend's session (`exchange::Over::residue`)
/// goes with this before the backend is lent again: cursors, `LISTEN`s, temporary objects,
/// session-level advisory locks.
const SESSION_RESIDUE_CLEANUP: &str =
    "CLOSE ALL;UNLISTEN *;DISCARD TEMP;SELECT pg_catalog.pg_advisory_unlock_all();";

/// How long a release waits for a cancel on its way to the backend to be delivered (so it
/// cannot reach the backend's next client); past it the backend is closed instead.
const CANCEL_DELIVERY_WAIT: Duration = Duration::from_secs(5);

/// A pooled client that has logged in.
struct Client {
    /// The wait for the client's next bytes, kept across the end of a transaction.
    readiness: Readiness,
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

impl Client {
    /// Its statements parsed from now on are told apart by the role and `search_path` its
    /// session has now ([`ClientStatements::follow`]).
    fn follow_session(&mut self) {
        let role = self.params.set_role().unwrap_or(&self.pool.key.role);
        self.statements.follow(role, self.params.own("search_path"));
    }
}

/// Serve one pooled client from its first byte. Every failure is logged once.
pub fn session(
    worker: Rc<Worker>,
    tcp: TcpStream,
    peer: SocketAddr,
    live: LiveGuard,
    slot: StartupSlot,
    accepted: Instant,
) -> impl std::future::Future<Output = ()> {
    // Each step boxed, and bound before it is awaited (a temporary would keep its room in
    // this task for the whole await): an idle client's task holds the client and a pointer.
    // The login is boxed before the task's future is made: what only the login needs (the
    // socket, the startup slot) is then never part of the task, which keeps the arguments of
    // an `async fn` for its whole life.
    let starting = Box::pin(start(worker.clone(), tcp, peer, slot, accepted));
    async move {
        let _live = live;
        let Some(client) = starting.await else {
            return;
        };
        // Boxed too: the task would otherwise keep room for a second client.
        let living = Box::pin(life(&worker, client, peer, accepted));
        living.await;
    }
}

/// Serve a pooled client handed over by the worker that accepted it ([`crate::handoff`]): the
/// rest of its login here, then its life as in [`session`].
pub async fn handed_over(worker: Rc<Worker>, live: LiveGuard, handoff: Box<Handoff>) {
    let _live = live;
    let (peer, accepted) = (handoff.peer(), handoff.accepted());
    let starting = Box::pin(login::resume(worker.clone(), handoff));
    let Some(client) = starting.await else {
        return;
    };
    let living = Box::pin(life(&worker, client, peer, accepted));
    living.await;
}

/// A logged-in client's life: registered, its transactions, its goodbye. Not an `async fn`:
/// one would keep its `client` argument and a second copy it moves into (936 bytes, not
/// 496); the block uses the captured client in place.
#[allow(clippy::manual_async_fn)]
fn life(
    worker: &Rc<Worker>,
    mut client: Client,
    peer: SocketAddr,
    accepted: Instant,
) -> impl std::future::Future<Output = ()> + '_ {
    async move {
        let _registration = worker.register(client.handle.clone());
        let stats = &worker.stats;
        stats.logins[1].inc();
        stats.login_time[1].observe(accepted.elapsed());
        tracing::debug!(
            %peer,
            branch = %client.pool.key.branch,
            role = %client.pool.key.role,
            database = %client.pool.key.database,
            "pooled client logged in"
        );
        let logged_in = Instant::now();
        let serving = Box::pin(serve(worker, &mut client));
        let end = serving.await;
        probes::session_end(ProbePort::Pooled, client.handle.backend_key.pid, logged_in);
        stats.sessions_ended[1].inc();
        let finishing = Box::pin(finish(worker, client, peer, end));
        finishing.await;
    }
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
        stats: &worker.stats,
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
    /// A backend refused the `SET`s of the client's parameters: it gets this FATAL.
    SetupRefused(Vec<u8>),
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
    let client_pid = client.handle.backend_key.pid;
    let began = Instant::now();
    probes::transaction_begin(client_pid, backend.pid);
    let transacting = Box::pin(transaction(worker, client, &mut backend));
    let outcome = transacting.await;
    let delivered = client.cancel.release(CANCEL_DELIVERY_WAIT).await;
    drop(active);
    probes::transaction_end(client_pid, backend.pid, began);
    worker.stats.transactions.inc();
    worker.stats.transaction_time.observe(began.elapsed());
    let catalog = worker.shared.catalog.load_full();
    let primary = catalog
        .branch(&pool.key.branch)
        .map_or(backend.addr, |branch| branch.primary);
    let ctx = context(worker, &primary, &catalog);
    match outcome {
        Ok(over) if delivered && over.overflow => {
            pool.discard(backend);
            return Some(End::Fatal(
                SqlState::PROGRAM_LIMIT_EXCEEDED,
                TOO_MANY_SETTINGS,
            ));
        }
        Ok(over) if delivered => {
            // Parameters the server does not report that the transaction set: read back, so
            // the client keeps them and the backend's next client does not.
            let unreported: Vec<Box<str>> = over
                .sets
                .into_iter()
                .filter(|name| !client.params.is_reported(name))
                .collect();
            if unreported.is_empty() && !over.residue && !over.audit {
                pool.release(&ctx, backend);
            } else {
                // Cursors, LISTENs, temporary objects and session locks the transaction left
                // go; a `RESET name` outside a block left the backend at the pool's default:
                // the client's value goes first. Then what the client set is read back. In
                // one round trip.
                let mut sql = String::new();
                if over.residue {
                    sql.push_str(SESSION_RESIDUE_CLEANUP);
                }
                if over.resync {
                    backend.params.sync_to(&client.params, &mut sql);
                }
                let read = if over.audit {
                    // By name too: the client's and the backend's custom parameters
                    // (`app.x`), which `pg_settings` does not list.
                    let mut names = unreported;
                    for name in client
                        .params
                        .unreported_names()
                        .chain(backend.params.unreported_names())
                    {
                        if !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
                            names.push(name.into());
                        }
                    }
                    Box::pin(readback::session_audit(
                        &mut backend,
                        &names,
                        &sql,
                        &worker.buffers,
                    ))
                    .await
                    .map(|audit| audited(client, &mut backend, &audit) && !over.untraceable)
                } else {
                    Box::pin(readback::current_settings(
                        &mut backend,
                        &unreported,
                        &sql,
                        &worker.buffers,
                    ))
                    .await
                    .map(|values| {
                        for (name, value) in unreported.iter().zip(&values) {
                            client.params.set_unreported(name, value.as_deref());
                            backend.params.set_unreported(name, value.as_deref());
                        }
                        true
                    })
                };
                match read {
                    Ok(true) => pool.release(&ctx, backend),
                    Ok(false) => pool.discard(backend),
                    Err(error) => {
                        if let Some(suppressed) = BACKEND_FAILED.allow() {
                            tracing::warn!(%error, suppressed, "reading back a client's settings failed");
                        }
                        pool.discard(backend);
                    }
                }
            }
        }
        Ok(_) => pool.discard(backend),
        Err(Broken {
            end: End::Lost(lost),
            ..
        }) => {
            pool.discard(backend);
            if !lost.now.is_empty() {
                if let Err(end) = send_plain(client, &lost.now).await {
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
    if client.params.too_many_unreported() {
        return Some(End::Fatal(
            SqlState::PROGRAM_LIMIT_EXCEEDED,
            TOO_MANY_SETTINGS,
        ));
    }
    None
}

/// Why a client whose settings outgrew [`params::MAX_UNREPORTED`] is closed.
const TOO_MANY_SETTINGS: &str = "too many session settings for the pooled port (at most 256 \
     parameters PostgreSQL does not report, 64 KiB of names and values): use the direct port";

/// Takes what a session audit read on `backend` after `client`'s transaction: the settings
/// the session has become the client's (and the backend's record). False if the backend's
/// prepared statements are not what the router recorded (a `PREPARE`, `DEALLOCATE` or
/// `DISCARD` the router could not follow): it is not lent again, and if none of the router's
/// is left (`DEALLOCATE ALL`), the client's names go too.
fn audited(
    client: &mut Client,
    backend: &mut pool::Backend,
    audit: &readback::SessionAudit,
) -> bool {
    let unreported: Vec<(&str, &str)> = audit
        .settings
        .iter()
        .filter(|(name, _)| !client.params.is_reported(name))
        .map(|(name, value)| (&**name, &**value))
        .collect();
    client.params.audited(&unreported);
    backend.params.audited(&unreported);
    if client.pool.settings().max_prepared_statements == 0 {
        // Statements pass through untouched: the router keeps no record to check.
        return true;
    }
    let recorded = backend.statements.len() as u64;
    if audit.sql_statements == 0 && audit.protocol_statements == recorded {
        return true;
    }
    if audit.protocol_statements == 0 && recorded > 0 {
        client.statements.clear();
    }
    tracing::debug!(
        sql = audit.sql_statements,
        protocol = audit.protocol_statements,
        recorded,
        "a backend's prepared statements changed under the router: not lent again"
    );
    false
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

/// A client socket's readiness, waited for across the end of a transaction: the poll the
/// kernel has for it stays in place when a wait is dropped, and the next wait takes it up.
///
/// A transaction's client direction waits for the client's next bytes while the backend
/// answers; the backend's ReadyForQuery ends the transaction and drops that wait, and the
/// client goes back to waiting for its next bytes between transactions. With a poll per wait,
/// every transaction would cancel one poll and start another; with this, a client costs one
/// poll per arrival of its bytes.
#[derive(Default)]
struct Readiness(Option<Pin<Box<dyn Future<Output = std::io::Result<()>>>>>);

impl Readiness {
    /// Waits until the socket behind `half` is readable, without lending a buffer to the
    /// kernel. Dropped before it is, it leaves its poll for the next wait.
    async fn wait(&mut self, half: &TcpOwnedReadHalf) -> std::io::Result<()> {
        let poll = self.0.get_or_insert_with(|| {
            let cell = half.0.clone();
            Box::pin(async move {
                // SAFETY: as in `readable`; this clone of the cell keeps the stream alive for
                // as long as the poll.
                let stream: &TcpStream = unsafe { &*cell.get() };
                stream.readable(false).await
            })
        });
        let ready = poll.as_mut().await;
        self.0 = None;
        ready
    }
}

/// Seals `plain` and sends it to the client.
async fn send_plain(client: &mut Client, plain: &[u8]) -> Result<(), End> {
    let mut sealed = Vec::with_capacity(plain.len() + 64);
    tls::seal_into(&mut client.records, plain, &mut sealed)
        .map_err(|e| End::ClientFailed(e.to_string()))?;
    write_all_vec(&mut client.wr, &mut sealed)
        .await
        .map_err(|e| End::ClientFailed(e.to_string()))
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
        // Logged where the backend refused them.
        End::SetupRefused(error) => plain.extend_from_slice(error),
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
    client.plain.detach(&worker.message_buffers);
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
