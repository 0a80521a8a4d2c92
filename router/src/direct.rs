//! A direct session (the session-mode port): an authenticated client gets its own backend
//! connection for its whole life.
//!
//! 1. The front door ([`crate::front_door`]): TLS, the StartupMessage, SCRAM with the client.
//! 2. A place among `limits.max_client_connections` authenticated sessions
//!    ([`front_door::enter`] takes both steps), and the hand-off to the worker that owns the
//!    branch when that is another one ([`crate::handoff`]: there [`handed_over`] goes on).
//!    What follows is [`after_front_door`], on whichever worker serves the client.
//! 3. A backend connection (primary, or the least-loaded healthy replica) authenticated with the
//!    client's ClientKey, within `timeouts.connect`.
//! 4. The relay both ways ([`crate::relay`]) until either side closes.
//!
//! Nothing is allocated for a connection before its first byte arrives ([`front_door::serve`]
//! waits for it). Steps 1 to 3 run in a future of their own, boxed then and freed when they end,
//! so the task of an established session holds only what the relay needs.

use std::net::SocketAddr;
use std::rc::Rc;

use monoio::io::Splitable;
use monoio::net::TcpStream;
use monoio::time::Instant;

use crate::auth::scram::ClientCredentials;
use crate::backend::{self, BackendConn, BackendError};
use crate::buf::{write_all_vec, ReadBuf};
use crate::cancel;
use crate::error::{KillReason, SessionError};
use crate::front_door::{self, Authenticated, Entered, Parts, Port};
use crate::handoff::Handoff;
use crate::probes::ProbePort;
use crate::protocol::startup::CancelKey;
use crate::protocol::write::{self, Severity};
use crate::relay::{self, ClientFailure, End, Sockets, CLOSE_WRITE_TIMEOUT};
use crate::throttle::LogThrottle;
use crate::tls::{self, RecordLayer};
use crate::upstream::{self, ActiveGuard, Upstreams};
use crate::worker::{LiveGuard, Quiet, SessionHandle, SessionSlot, Signal, StartupSlot, Worker};

/// An established session: the client authenticated, its backend connected, both told.
pub struct Session {
    sockets: Sockets,
    records: Box<RecordLayer>,
    /// Ciphertext past the client's last whole record (normally none).
    cipher: Vec<u8>,
    handle: Rc<SessionHandle>,
    _upstream: ActiveGuard,
    _slot: SessionSlot,
    /// The client's cancel key, findable by every worker while the session lives.
    _cancel: cancel::Registration,
}

/// The task of a direct-port connection that has spoken (started by [`front_door::serve`]): its
/// front door and backend connect (boxed, freed when they end), then the relay.
pub async fn session(
    worker: Rc<Worker>,
    tcp: TcpStream,
    peer: SocketAddr,
    live: LiveGuard,
    slot: StartupSlot,
    accepted: Instant,
) {
    let _live = live;
    let starting = Box::pin(start(worker.clone(), tcp, peer, slot, accepted));
    if let Some(session) = starting.await {
        established(&worker, session, peer, accepted).await;
    }
}

/// The task of a direct-port client handed over by the worker that accepted it
/// ([`crate::handoff`]): what follows its front door (boxed, as in [`session`]), then the relay.
pub async fn handed_over(worker: Rc<Worker>, live: LiveGuard, handoff: Box<Handoff>) {
    let _live = live;
    let (peer, accepted) = (handoff.peer(), handoff.accepted());
    let starting = Box::pin(resume(worker.clone(), handoff));
    if let Some(session) = starting.await {
        established(&worker, session, peer, accepted).await;
    }
}

/// Step 4, counted.
async fn established(
    worker: &Rc<Worker>,
    mut session: Session,
    peer: SocketAddr,
    accepted: Instant,
) {
    let stats = &worker.stats;
    stats.logins[0].inc();
    stats.login_time[0].observe(accepted.elapsed());
    relay(worker, &mut session, peer).await;
    stats.sessions_ended[0].inc();
}

/// Steps 1 to 3: the front door, then [`after_front_door`] here unless the client was handed
/// over to its branch's owner. `None` if the connection ended here (a cancel request, a
/// refusal, logged, or a hand-off).
async fn start(
    worker: Rc<Worker>,
    tcp: TcpStream,
    peer: SocketAddr,
    startup_slot: StartupSlot,
    accepted: Instant,
) -> Option<Session> {
    let worker = &worker;
    let entered =
        front_door::enter(worker, tcp, peer, startup_slot, accepted, Port::Direct).await?;
    after_front_door(worker, entered, peer).await
}

/// Steps 2 and 3 on the worker a client was handed over to.
async fn resume(worker: Rc<Worker>, handoff: Box<Handoff>) -> Option<Session> {
    let worker = &worker;
    let peer = handoff.peer();
    let entered = (*handoff).arrive(worker)?;
    after_front_door(worker, entered, peer).await
}

/// What follows the front door, on the worker that serves the client (the one that accepted
/// it, or its branch's owner after a hand-off): step 3, the backend connection, and the
/// client's login answered. `None` if the connection ended (a refusal, logged).
pub async fn after_front_door(
    worker: &Rc<Worker>,
    entered: Entered<'_>,
    peer: SocketAddr,
) -> Option<Session> {
    let Entered {
        mut conn,
        auth,
        slot,
    } = entered;
    let connecting = monoio::select! {
        connected = Box::pin(connect_backend(worker, &auth)) => connected,
        _ = worker.drain_over() => Err((SessionError::Terminated(KillReason::Shutdown), Vec::new())),
    };
    let Connected {
        ready,
        status,
        mut to_client,
    } = match connecting {
        Ok(connected) => connected,
        Err((error, mut to_client)) => {
            // The client did authenticate; a backend that then refuses the session (no such
            // database, too many connections) says why in its own ErrorResponse, which the
            // client sees verbatim after AuthenticationOk, as PostgreSQL itself would send it.
            if matches!(error, SessionError::Backend(BackendError::Rejected(_))) {
                write::auth_sasl_final(conn.out(), &auth.server_final);
                write::auth_ok(conn.out());
                conn.out().append(&mut to_client);
            }
            // Boxed: room for the refusal in this future would be held by every connection
            // through its start (2.5 KiB of the 4 KiB it was), and it is needed once.
            Box::pin(front_door::refuse(conn, peer, error)).await;
            return None;
        }
    };
    let Ready {
        backend,
        upstream,
        client_key,
    } = ready;
    let BackendConn {
        mut stream,
        addr,
        pid,
        secret,
        read_buf,
        hot_standby: _,
    } = backend;
    let out = conn.out();
    write::auth_sasl_final(out, &auth.server_final);
    write::auth_ok(out);
    out.append(&mut to_client);
    write::backend_key_data(out, client_key.pid, client_key.secret);
    write::ready_for_query(out, status);
    // Bytes the backend sent past its ReadyForQuery (normally none) follow ours.
    out.extend_from_slice(read_buf.data());
    read_buf.release(&worker.buffers);
    let Parts {
        tcp,
        records,
        handshake,
        cipher,
        mut plain,
    } = front_door::hand_over(conn, peer).await?;
    // Messages the client pipelined after authenticating go to the backend first.
    if let Err(error) = write_all_vec(&mut stream, &mut plain).await {
        tracing::warn!(%peer, %error, "backend connection failed");
        return None;
    }
    let Authenticated {
        branch,
        role,
        verifier,
        ..
    } = *auth;
    let backend_key = CancelKey { pid, secret };
    // The client was told the backend's pid: its key and the backend's share it.
    let cancel = worker
        .shared
        .cancels
        .register(client_key, upstream.shared(), secret);
    let handle = Rc::new(SessionHandle {
        backend_addr: addr,
        backend_key,
        branch: branch.id.clone(),
        role,
        sni: handshake.sni,
        verifier,
        kill: Signal::default(),
        quiet: Quiet::default(),
    });
    let (client_rd, client_wr) = tcp.into_split();
    let (backend_rd, backend_wr) = stream.into_split();
    Some(Session {
        sockets: Sockets {
            client_rd,
            client_wr,
            backend_rd,
            backend_wr,
        },
        records,
        cipher,
        handle,
        _upstream: upstream,
        _slot: slot,
        _cancel: cancel,
    })
}

struct Ready {
    backend: BackendConn,
    upstream: ActiveGuard,
    client_key: CancelKey,
}

struct Connected {
    ready: Ready,
    status: u8,
    to_client: Vec<u8>,
}

/// Logs each replica given up on (one per client while a replica is down).
static REPLICA_FAILED: LogThrottle = LogThrottle::new();

/// Step 3: connect to the primary, or to replicas in least-connections order until one works.
/// On failure, also returns what the backend said (its ErrorResponse) for the client.
async fn connect_backend(
    worker: &Rc<Worker>,
    auth: &Authenticated,
) -> Result<Connected, (SessionError, Vec<u8>)> {
    let shared = &worker.shared;
    let branch = &auth.branch;
    let mut failed: Vec<SocketAddr> = Vec::new();
    loop {
        let upstream = if auth.replica {
            shared
                .upstreams
                .pick_replica(&branch.replicas, &failed)
                .ok_or_else(|| {
                    (
                        SessionError::NoHealthyReplica(branch.id.clone()),
                        Vec::new(),
                    )
                })?
        } else {
            shared.upstreams.get(branch.primary)
        };
        let addr = upstream.addr;
        let guard = Upstreams::hold(upstream);
        let credentials = ClientCredentials::Keys {
            client_key: auth.client_key.0,
            server_key: auth.verifier.server_key,
        };
        let mut to_client = Vec::new();
        let attempt = monoio::time::timeout(
            shared.config.timeouts.connect,
            backend::connect(
                addr,
                &auth.backend_startup,
                credentials,
                &mut to_client,
                ReadBuf::from_storage(worker.buffers.take()),
            ),
        )
        .await
        .unwrap_or(Err(BackendError::Timeout));
        let give_up = |error: &dyn std::fmt::Display, what: &str| {
            if let Some(suppressed) = REPLICA_FAILED.allow() {
                tracing::warn!(%addr, %error, suppressed, "replica {what}, trying another");
            }
        };
        match attempt {
            Ok((backend, _)) if auth.replica && backend.hot_standby == Some(false) => {
                give_up(
                    &format_args!(
                        "in_hot_standby = off, held out for {:?}",
                        upstream::NOT_A_STANDBY_HOLD
                    ),
                    "is not a standby",
                );
                guard.upstream().hold_down(upstream::NOT_A_STANDBY_HOLD);
                failed.push(addr);
                backend.terminate(&worker.buffers).await;
            }
            Ok((backend, status)) => {
                guard.upstream().set_healthy(true);
                let client_key = CancelKey {
                    pid: backend.pid,
                    secret: rand::random(),
                };
                return Ok(Connected {
                    ready: Ready {
                        backend,
                        upstream: guard,
                        client_key,
                    },
                    status,
                    to_client,
                });
            }
            Err(BackendError::Rejected(code)) if auth.replica && code.server_unavailable() => {
                give_up(&code, "refused the connection");
                guard.upstream().set_healthy(false);
                failed.push(addr);
            }
            Err(error @ BackendError::Rejected(_)) => {
                return Err((SessionError::Backend(error), to_client));
            }
            // The replica itself failed (not the client's credentials): try another.
            Err(
                error @ (BackendError::Connect(_)
                | BackendError::Timeout
                | BackendError::Io(_)
                | BackendError::Closed
                | BackendError::Protocol(_)),
            ) if auth.replica => {
                give_up(&error, "failed");
                guard.upstream().set_healthy(false);
                failed.push(addr);
            }
            Err(error) => {
                if matches!(error, BackendError::Connect(_) | BackendError::Timeout) {
                    guard.upstream().set_healthy(false);
                }
                return Err((error.into(), Vec::new()));
            }
        }
    }
}

/// Step 4: register the session and relay until one side ends, then say goodbye as fits.
async fn relay(worker: &Rc<Worker>, session: &mut Session, peer: SocketAddr) {
    // Fields are used in place: moving them out would give each a second slot in the task.
    let handle = &session.handle;
    tracing::debug!(
        %peer,
        branch = %handle.branch,
        role = %handle.role,
        sni = handle.sni.as_deref().unwrap_or("-"),
        backend = %handle.backend_addr,
        backend_pid = handle.backend_key.pid,
        "session established"
    );
    let _registration = worker.register(handle.clone());
    let logged_in = Instant::now();
    // The login's expanded TLS keys go (about 1.2 KiB): a session that logs in and waits
    // holds none, and its first record rebuilds them (about a microsecond each). Later, the
    // relay sheds them once the client has been quiet for a second or more.
    session.records.shed_keys();
    let end = relay::run(
        &mut session.sockets,
        &mut session.records,
        &session.cipher,
        &session.handle,
        worker,
    )
    .await;
    crate::probes::session_end(ProbePort::Direct, handle.backend_key.pid, logged_in);
    session.cipher = Vec::new();
    let records = &mut session.records;
    // What the client still gets: a FATAL error if the router ends the session, then
    // close_notify: every orderly end of a TLS connection says so.
    let mut last = Vec::new();
    match &end {
        End::Killed { reason, clean } => {
            // After a half-sent record nothing the client could read can follow.
            if *clean {
                let (code, message) = reason.to_wire();
                let mut error = Vec::with_capacity(128);
                write::error_response(&mut error, Severity::Fatal, code, message);
                let _ = tls::seal_final_into(records, &error, &mut last);
                let _ = tls::close_notify_into(records, &mut last);
            }
            tracing::info!(%peer, ?reason, "session closed by the router");
        }
        End::BackendClosed => {
            let _ = tls::close_notify_into(records, &mut last);
            tracing::debug!(%peer, "backend closed the session");
        }
        End::BackendError(error) => {
            let _ = tls::close_notify_into(records, &mut last);
            tracing::warn!(%peer, %error, "backend connection failed");
        }
        End::ClientClosed => {
            let _ = tls::close_notify_into(records, &mut last);
            tracing::debug!(%peer, "client closed the session");
        }
        End::ClientError(error) => {
            // A record that broke a rule gets the alert rustls would send; a socket error, nothing.
            if let ClientFailure::Record(error) = error {
                tls::fatal_alert_into(records, error, &mut last);
            }
            tracing::debug!(%peer, %error, "client connection failed");
        }
    }
    if !last.is_empty() {
        // Boxed: the last write's state is needed once, not for the session's whole life.
        Box::pin(send_last(&mut session.sockets.client_wr, last)).await;
    }
}

/// Sends a session's last records, giving up on a client that does not read them.
async fn send_last(client: &mut monoio::net::tcp::TcpOwnedWriteHalf, mut last: Vec<u8>) {
    let _ = monoio::time::timeout(CLOSE_WRITE_TIMEOUT, write_all_vec(client, &mut last)).await;
}
