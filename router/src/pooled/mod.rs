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
pub mod stream;
pub mod transaction;

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use monoio::net::tcp::{TcpOwnedReadHalf, TcpOwnedWriteHalf};
use monoio::net::TcpStream;
use monoio::time::Instant;

use crate::buf::{write_all_vec, ReadBuf};
use crate::cancel::{PooledCancel, Registration};
use crate::error::KillReason;
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

pub use acquire::{QUEUED_NOTICE, QUEUED_NOTICE_AFTER};
pub use branches::{BranchClients, BranchEntry, BranchSlot};
pub use maintenance::{close_pools, maintain, maintain_once, MAINTENANCE_INTERVAL};

/// How long a release waits for a cancel on its way to the backend to be delivered (so it
/// cannot reach the backend's next client); past it the backend is closed instead.
const CANCEL_DELIVERY_WAIT: Duration = Duration::from_secs(5);

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
    None
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
