//! A pooled client's login, after the front door: its place among its branch's clients, its
//! pool (and the parameters its backends report, from a first backend if it has none), and the
//! answer with a router-issued cancel key. `start` runs the front door first; a client handed
//! over from another worker ([`crate::handoff`]) comes in through `resume`; both go on in
//! `after_front_door`.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use monoio::io::Splitable;
use monoio::net::TcpStream;
use monoio::time::Instant;

use crate::backend::{BackendError, ReceivedSqlState};
use crate::buf::ReadBuf;
use crate::cancel::PooledCancel;
use crate::config::PoolSettings;
use crate::error::SessionError;
use crate::front_door::{self, Authenticated, ClientConn, Entered, Parts, Port};
use crate::handoff::Handoff;
use crate::protocol::startup::CancelKey;
use crate::protocol::write::{self, Severity};
use crate::worker::{Quiet, SessionHandle, Signal, StartupSlot, Worker};

use super::acquire::unavailable;
use super::branches::BranchSlot;
use super::params::{options_settings, startup_params, ClientParams};
use super::pool::{AcquireError, Backend, Pool, PoolKey};
use super::prepared::ClientStatements;
use super::readback::{self, StartupSettings};
use super::startup_checks::{self, Lookup, Outcome, StartupValues};
use super::stream::MessageStream;
use super::{context, Client, Readiness};

/// Logs in: the front door, then [`after_front_door`] here unless the client was handed over
/// to its branch's owner ([`crate::handoff`]: there [`resume`] goes on). `None` if the
/// connection ended here (a cancel request, a refusal, logged, or a hand-off).
pub(super) async fn start(
    worker: Rc<Worker>,
    tcp: TcpStream,
    peer: SocketAddr,
    startup_slot: StartupSlot,
    accepted: Instant,
) -> Option<Client> {
    let worker = &worker;
    let entered =
        front_door::enter(worker, tcp, peer, startup_slot, accepted, Port::Pooled).await?;
    after_front_door(worker, entered, peer).await
}

/// [`after_front_door`] on the worker a client was handed over to.
pub(super) async fn resume(worker: Rc<Worker>, handoff: Box<Handoff>) -> Option<Client> {
    let worker = &worker;
    let peer = handoff.peer();
    let entered = (*handoff).arrive(worker)?;
    after_front_door(worker, entered, peer).await
}

/// A backend of `pool` for the login's own use (learning the pool's parameters, checking the
/// client's), waiting in line as a transaction would.
async fn acquire_for_login(
    worker: &Rc<Worker>,
    pool: &Pool,
    primary: &SocketAddr,
    settings: PoolSettings,
) -> Result<Backend, AcquireError> {
    let catalog = worker.shared.catalog.load_full();
    let ctx = context(worker, primary, &catalog);
    let deadline = Instant::now() + settings.query_wait_timeout;
    monoio::select! {
        acquired = pool.acquire(&ctx, deadline) => acquired,
        _ = worker.drain_over() => Err(AcquireError::WaitTimeout),
    }
}

/// Gives a backend the login used back to its pool.
fn release_after_login(worker: &Rc<Worker>, pool: &Pool, primary: &SocketAddr, backend: Backend) {
    let catalog = worker.shared.catalog.load_full();
    pool.release(&context(worker, primary, &catalog), backend);
}

/// Refuses a login that found no backend for its own use.
async fn refuse_login(
    mut conn: ClientConn<'_>,
    peer: SocketAddr,
    error: AcquireError,
    server_final: &[u8],
) {
    match error {
        AcquireError::Connect { error, to_client } => {
            if !to_client.is_empty() {
                // The backend refused the login (no such database): the client sees its error
                // after AuthenticationOk, as from PostgreSQL itself.
                write::auth_sasl_final(conn.out(), server_final);
                write::auth_ok(conn.out());
                conn.out().extend_from_slice(&to_client);
            }
            front_door::refuse(conn, peer, SessionError::Backend(error)).await;
        }
        error => {
            tracing::warn!(%peer, %error, "no backend for a pooled client's login");
            front_door::refuse(conn, peer, SessionError::Backend(BackendError::Timeout)).await;
        }
    }
}

/// Refuses a login as PostgreSQL refuses a StartupMessage parameter: AuthenticationOk, then
/// `fatal` (a whole ErrorResponse).
async fn refuse_after_auth(
    mut conn: ClientConn<'_>,
    peer: SocketAddr,
    server_final: &[u8],
    fatal: Vec<u8>,
) {
    write::auth_sasl_final(conn.out(), server_final);
    write::auth_ok(conn.out());
    conn.out().extend_from_slice(&fatal);
    let code = ReceivedSqlState::new(sqlstate_of(&fatal));
    front_door::refuse(conn, peer, SessionError::StartupParameter(code)).await;
}

/// Why a client's StartupMessage parameters were not accepted.
enum StartupRefusal {
    /// The server refused a value: its ErrorResponse, FATAL, for the client.
    Server(Vec<u8>),
    /// No backend to ask.
    NoBackend(AcquireError),
    /// Not asked now: the branch is paused or its primary unreachable. The client logs in
    /// with the values as it gave them, as a transaction waits out a pause or a failover;
    /// each of its transactions gives them to its backend.
    NotNow,
}

/// A login's StartupMessage parameters, to be read as the server reads them, on a backend of
/// its pool.
struct StartupCheck<'a> {
    worker: &'a Rc<Worker>,
    pool: &'a Pool,
    branch: &'a BranchSlot,
    primary: &'a SocketAddr,
    settings: PoolSettings,
    params: &'a ClientParams,
}

impl StartupCheck<'_> {
    /// The values the server reads the client's StartupMessage parameters as: remembered by the
    /// pool, or read by another login now asking for the same set ([`startup_checks`]), or read
    /// here ([`StartupCheck::check`]).
    async fn read(&self) -> Result<StartupValues, StartupRefusal> {
        let pool = self.pool;
        let key = startup_checks::key(self.params.startup());
        let lead = match pool.startups.lookup(&key) {
            Lookup::Accepted(values) => return Ok(values),
            Lookup::Running(running) => match running.outcome().await {
                Outcome::Accepted(values) => return Ok(values),
                Outcome::Refused(fatal) => return Err(StartupRefusal::Server(fatal.to_vec())),
                Outcome::NotChecked => return Err(StartupRefusal::NotNow),
                // Read on its own, once: a waiting login follows at most one reading, so its
                // wait stays bounded by two.
                Outcome::Failed => None,
            },
            Lookup::Lead(lead) => Some(lead),
        };
        let read = self.check().await;
        let outcome = match &read {
            Ok(values) => Outcome::Accepted(values.clone()),
            Err(StartupRefusal::Server(fatal)) => Outcome::Refused(fatal.as_slice().into()),
            Err(StartupRefusal::NotNow) => Outcome::NotChecked,
            Err(StartupRefusal::NoBackend(_)) => Outcome::Failed,
        };
        match lead {
            Some(lead) => lead.finish(outcome),
            None => {
                if let Outcome::Accepted(values) = outcome {
                    pool.startups.accept(key, values);
                }
            }
        }
        read
    }

    /// Gives a backend of the pool the client's StartupMessage parameters and reads back what the
    /// server made of them (in the order of `params.startup()`). The backend keeps them (recorded
    /// as its parameters), or is closed if it could not answer.
    async fn check(&self) -> Result<StartupValues, StartupRefusal> {
        let StartupCheck {
            worker,
            pool,
            branch,
            primary,
            settings,
            params,
        } = *self;
        if branch.entry.paused() {
            return Err(StartupRefusal::NotNow);
        }
        let mut backend = match acquire_for_login(worker, pool, primary, settings).await {
            Ok(backend) => backend,
            Err(AcquireError::Connect { error, .. }) if unavailable(&error) => {
                return Err(StartupRefusal::NotNow)
            }
            Err(error) => return Err(StartupRefusal::NoBackend(error)),
        };
        let asked: Vec<(&str, &str)> = params.startup().iter().collect();
        let checked = Box::pin(readback::startup_settings(
            &mut backend,
            &asked,
            &worker.buffers,
        ))
        .await;
        let (values, refusal) = match checked {
            Ok(StartupSettings::Accepted(values)) => (values, None),
            Ok(StartupSettings::Refused { applied, fatal }) => (applied, Some(fatal)),
            Err(error) => {
                tracing::warn!(%error, "checking a pooled client's startup parameters failed");
                pool.discard(backend);
                return Err(StartupRefusal::NoBackend(AcquireError::Connect {
                    error: BackendError::Timeout,
                    to_client: Vec::new(),
                }));
            }
        };
        // What the backend now has: the values before any refused one, as the server read them.
        for ((name, _), value) in asked.iter().zip(&values) {
            backend
                .params
                .startup_value(name, value, params.is_reported(name));
        }
        release_after_login(worker, pool, primary, backend);
        match refusal {
            Some(fatal) => Err(StartupRefusal::Server(fatal)),
            None => Ok(values.into()),
        }
    }
}

/// The SQLSTATE of a whole ErrorResponse, for the log.
fn sqlstate_of(message: &[u8]) -> &str {
    message
        .get(crate::protocol::frame::HEADER_BYTES..)
        .and_then(|body| crate::protocol::backend::ErrorFields::parse(body).ok())
        .map_or("", |fields| fields.code)
}

/// What follows the front door, on the worker that serves the client (the one that accepted
/// it, or its branch's owner after a hand-off): a place among its branch's clients, its pool
/// (this worker's), the answer. `None` if the connection ended (a refusal, logged).
pub(super) async fn after_front_door(
    worker: &Rc<Worker>,
    entered: Entered<'_>,
    peer: SocketAddr,
) -> Option<Client> {
    let Entered {
        mut conn,
        auth,
        slot,
    } = entered;
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
    let settings = worker.shared.pool_settings(&branch.pool);
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
            match acquire_for_login(worker, &pool, &branch.primary, settings).await {
                Ok(backend) => release_after_login(worker, &pool, &branch.primary, backend),
                Err(error) => {
                    refuse_login(conn, peer, error, &server_final).await;
                    return None;
                }
            }
            // Set by the backend just opened (or by whichever opened the one lent).
            match pool.base() {
                Some(base) => base,
                None => {
                    tracing::warn!(%peer, "pooled login: the pool's parameters are unknown");
                    front_door::refuse(
                        conn,
                        peer,
                        SessionError::Backend(crate::backend::BackendError::Timeout),
                    )
                    .await;
                    return None;
                }
            }
        }
    };
    // `options` (`-c name=value`, PGOPTIONS) first: the StartupMessage's own parameters win
    // over it, as in PostgreSQL.
    let options = startup_params(&backend_startup)
        .filter(|(name, _)| *name == "options")
        .map(|(_, value)| value)
        .last()
        .map_or(Ok(Vec::new()), options_settings);
    let options = match options {
        Ok(options) => options,
        Err(error) => {
            let mut fatal = Vec::new();
            write::error_response_full(
                &mut fatal,
                Severity::Fatal,
                error.code,
                &error.message,
                None,
                error.hint,
            );
            refuse_after_auth(conn, peer, &server_final, fatal).await;
            return None;
        }
    };
    let asked = options
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .chain(startup_params(&backend_startup));
    let mut params = ClientParams::new(base, asked);
    // The client's own parameters, as PostgreSQL would read them at its login: a value the
    // server refuses refuses the login, and the client sees the values as the server shows
    // them. A set a backend of the pool accepted before needs no backend.
    if !params.startup().is_empty() {
        let check = StartupCheck {
            worker,
            pool: &pool,
            branch: &branch_slot,
            primary: &branch.primary,
            settings,
            params: &params,
        };
        match Box::pin(check.read()).await {
            Ok(values) => params.startup_read_as(&values),
            Err(StartupRefusal::NotNow) => {
                tracing::debug!(%peer, "pooled login: startup parameters not checked (branch paused or primary unreachable)");
            }
            Err(StartupRefusal::Server(fatal)) => {
                refuse_after_auth(conn, peer, &server_final, fatal).await;
                return None;
            }
            Err(StartupRefusal::NoBackend(error)) => {
                refuse_login(conn, peer, error, &server_final).await;
                return None;
            }
        }
    }
    let statements = ClientStatements::new(&role, params.startup().get("search_path"));
    let key = CancelKey {
        pid: crate::fleet::wire::tagged_pid(worker.shared.fleet.tag(), rand::random()),
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
    let Parts {
        tcp,
        records,
        handshake,
        cipher,
        plain,
    } = front_door::hand_over(conn, peer).await?;
    let (rd, wr) = tcp.into_split();
    let handle = Rc::new(SessionHandle {
        backend_addr: branch.primary,
        backend_key: key,
        branch: branch.id.clone(),
        role,
        sni: handshake.sni,
        verifier,
        kill: Signal::default(),
        quiet: Quiet::default(),
    });
    let mut client = Client {
        readiness: Readiness::default(),
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
        client.plain.attach(&worker.message_buffers);
        client.plain.spare_mut()[..plain.len()].copy_from_slice(&plain);
        client.plain.commit(plain.len());
    }
    if !cipher.is_empty() {
        client.cipher.attach(&worker.buffers);
        client.cipher.spare_mut()[..cipher.len()].copy_from_slice(&cipher);
        client.cipher.commit(cipher.len());
    }
    // The expanded TLS keys go until the client's first transaction rebuilds them (about a
    // microsecond each): a pooled client that logs in and waits holds none, and the memory goes
    // straight to the next login's. Later waits shed them once quiet (`Quiet`).
    client.records.shed_keys();
    Some(client)
}
