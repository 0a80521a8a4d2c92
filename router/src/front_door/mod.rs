//! The front door: one client connection from its first byte until it has authenticated. Every
//! port shares it; what comes after takes over an authenticated client: a direct session
//! ([`crate::direct`], the direct port) or a pooled client ([`crate::pooled`], the pooled port).
//!
//! [`serve`] takes an accepted connection, waits for its first byte, reads the PROXY protocol
//! header that a load balancer listed in `[listen] proxy_from` must send ([`balancer`]: from
//! then on the connection's peer is the client the header names), and starts the task of its
//! port's session, which passes through the front door with [`enter`]:
//!
//! 1. [`negotiate`]: direct SSL (first byte 0x16), SSLRequest, GSSENCRequest (answered `N`),
//!    CancelRequest, or a plaintext StartupMessage (refused: TLS is required).
//! 2. [`routing`]: the StartupMessage over TLS, parsed in place: `user` names the role and branch.
//! 3. [`auth`]: SCRAM-SHA-256 with the client against the catalog's verifier.
//!
//! A connection at the front door belongs to someone who has proved nothing, so it is cheap and
//! bounded: it counts against its worker's `limits.max_startup_connections` (checked at accept),
//! not against `max_client_connections`; it holds buffers only while there are bytes in them
//! ([`conn`]); step 1 must end within `timeouts.handshake` of the accept, all three within
//! `timeouts.startup`; and nothing it is told before the password check says whether its role
//! or branch exists.
//!
//! [`enter`] then gives an authenticated client its place among `limits.max_client_connections`
//! (on either port), or refuses it, and hands it over to the worker that owns its branch when
//! that is another one ([`crate::handoff`]).
//!
//! # Layout
//! - [`conn`]: the client's socket at the front door, its TLS state and lazily held buffers.
//! - [`proxy_header`]: the PROXY protocol v2 header, parsed from bytes.
//! - [`balancer`]: a listed balancer's connection: its header read, the client's address.
//! - [`negotiate`]: step 1. - [`routing`]: step 2. - [`auth`]: step 3.

pub mod auth;
pub mod balancer;
pub mod conn;
pub mod negotiate;
pub mod proxy_header;
pub mod routing;

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use monoio::net::TcpStream;
use monoio::time::{timeout_at, Instant};

use crate::error::SessionError;
use crate::probes::ProbePort;
use crate::protocol::startup::CancelKey;
use crate::protocol::write::{self, Severity};
use crate::throttle::LogThrottle;
use crate::tls::TlsError;
use crate::worker::{LiveGuard, SessionSlot, StartupSlot, Worker};

pub use auth::Authenticated;
pub use conn::{ClientConn, Parts};

use negotiate::Negotiated;
use routing::Startup;

/// The port a connection came in on, which says what follows the front door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// `listen.direct`: a direct session ([`crate::direct`]).
    Direct,
    /// `listen.pooled`: a pooled client ([`crate::pooled`]).
    Pooled,
}

impl Port {
    /// The port as probes and per-port metrics ([`crate::metrics::PerPort`]) name it.
    pub fn probe(self) -> ProbePort {
        match self {
            Port::Direct => ProbePort::Direct,
            Port::Pooled => ProbePort::Pooled,
        }
    }

    /// The port's slot in a [`crate::metrics::PerPort`].
    pub fn index(self) -> usize {
        crate::metrics::port_index(self.probe())
    }
}

/// Serve one accepted connection until it ends. Every failure is logged once.
///
/// Until the client's first byte the connection is a small task of its own that holds nothing
/// but the socket (a silent socket must cost little); then the task of its port's session
/// takes over, which has no room for that wait. A connection from a balancer listed in
/// `[listen] proxy_from` reads its PROXY header in this task too ([`balancer::client_of`]), so
/// the session starts with the client's address as its `peer`.
pub fn serve(
    worker: Rc<Worker>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    (live, slot): (LiveGuard, StartupSlot),
    port: Port,
) -> impl Future<Output = ()> {
    let accepted = Instant::now();
    crate::probes::accepted(port.probe(), tcp.as_raw_fd());
    worker.stats.accepted[port.index()].inc();
    if let Err(error) = tcp.set_nodelay(true) {
        tracing::debug!(%peer, %error, "set_nodelay failed");
    }
    async move {
        let deadline = accepted + worker.shared.config.timeouts.handshake;
        let spoke = monoio::select! {
            readable = timeout_at(deadline, tcp.readable(false)) => matches!(readable, Ok(Ok(()))),
            _ = worker.drain_over() => false,
        };
        if !spoke {
            tracing::debug!(%peer, "connection closed: nothing sent before the handshake timeout");
            return;
        }
        let peer = if worker.shared.config.listen.proxy_from.contains(peer.ip()) {
            match balancer::client_of(&worker, &mut tcp, peer, deadline, port).await {
                Some(client) => client,
                None => return,
            }
        } else {
            peer
        };
        match port {
            Port::Direct => {
                monoio::spawn(crate::direct::session(
                    worker, tcp, peer, live, slot, accepted,
                ));
            }
            Port::Pooled => {
                monoio::spawn(crate::pooled::session(
                    worker, tcp, peer, live, slot, accepted,
                ));
            }
        }
    }
}

/// A client through the front door: authenticated (not yet told so) and holding its place
/// among `limits.max_client_connections`.
pub struct Entered<'w> {
    /// The client's connection, TLS up; [`ClientConn::into_parts`] once it has been told.
    pub conn: ClientConn<'w>,
    /// Who the client is and where it goes.
    pub auth: Box<Authenticated>,
    /// The client's place among the router's authenticated sessions.
    pub slot: SessionSlot,
}

/// Takes a connection that has spoken through the front door ([`admit`], boxed: its state is
/// needed only until then), then gives up its startup slot for a session slot, then, if its
/// branch is owned by another worker, hands it over there ([`crate::handoff`]). `None` when the
/// connection ended here: a CancelRequest (passed on to [`crate::cancel::handle`]), a refusal
/// (logged, the client told as PostgreSQL would tell it: see [`refuse`]), or a hand-off (what
/// follows the front door then runs on the owner). Not cancel-safe.
///
/// The hand-off comes only now, once the client has authenticated, by choice over "right after
/// the startup packet" (which names the branch already): only a client that has proved its
/// password can make the router move a connection between workers, so the cost of what comes
/// before authentication (which anyone can make the router pay) stays flat, and a branch's
/// owner spends nothing on its clients' TLS handshakes and SCRAM.
pub async fn enter(
    worker: &Rc<Worker>,
    tcp: TcpStream,
    peer: SocketAddr,
    startup_slot: StartupSlot,
    accepted: Instant,
    port: Port,
) -> Option<Entered<'_>> {
    let mut conn = ClientConn::new(tcp, &worker.buffers);
    // Boxed: the front door's state is the largest a connection goes through, and it is
    // freed as soon as the client has authenticated.
    let admitted = Box::pin(admit(worker, &mut conn, accepted)).await;
    // The ways out are boxed too: a connection that leaves needs their state once, and the
    // future of one that stays (a direct session's start) has no room for them.
    let auth = match admitted {
        Ok(Admission::Authenticated(auth)) => {
            remember(worker, peer, &auth);
            auth
        }
        Ok(Admission::Cancel(key)) => {
            crate::cancel::handle(worker, key, peer.ip());
            Box::pin(conn.close()).await;
            return None;
        }
        Err(error) => {
            Box::pin(refuse(conn, peer, error)).await;
            return None;
        }
    };
    drop(startup_slot);
    let Some(mut slot) = worker.shared.session_slot() else {
        Box::pin(refuse(conn, peer, SessionError::TooManyConnections)).await;
        return None;
    };
    slot.count_for(&auth.branch.id);
    crate::handoff::hand_off(worker, Entered { conn, auth, slot }, peer, port, accepted)
}

/// Tells the steering program that `peer`'s connections belong with `auth`'s branch (one map
/// update system call: [`crate::steering`]). Once the client has authenticated, so that only
/// clients with a password for the branch cost one; the hand-off follows at the same point
/// for the same reason ([`enter`]).
fn remember(worker: &Worker, peer: SocketAddr, auth: &Authenticated) {
    let steering = &worker.shared.steering;
    let slot = crate::steering::branch_slot(&auth.branch.id);
    if let Err(error) = steering.remember(peer.ip(), slot) {
        if let Some(suppressed) = STEERING_FAILED.allow() {
            tracing::warn!(%peer, %error, suppressed, "could not remember the client's branch");
        }
    }
}

/// Failed [`remember`]s (a map update failing fails for everyone).
static STEERING_FAILED: LogThrottle = LogThrottle::new();

/// Sends the client what its login is answered with (queued in [`ClientConn::out`], up to its
/// ReadyForQuery), then hands the connection over to what serves it. `None` if the client
/// left meanwhile (logged).
pub async fn hand_over(mut conn: ClientConn<'_>, peer: SocketAddr) -> Option<Parts> {
    if let Err(error) = conn.flush().await {
        tracing::debug!(%peer, %error, "client gone before ReadyForQuery");
        conn.drop_silently();
        return None;
    }
    conn.into_parts()
}

/// What the front door let in.
#[derive(Debug)]
pub enum Admission {
    /// A CancelRequest (plaintext or over TLS): no session follows.
    Cancel(CancelKey),
    /// A client that authenticated, not yet told so.
    Authenticated(Box<Authenticated>),
}

/// Steps 1 to 3, under their deadlines (counted from `accepted`), and ended early by the end of
/// the worker's drain. Not cancel-safe.
pub async fn admit(
    worker: &Worker,
    conn: &mut ClientConn<'_>,
    accepted: Instant,
) -> Result<Admission, SessionError> {
    let timeouts = worker.shared.config.timeouts;
    let steps = async {
        let negotiated = match timeout_at(
            accepted + timeouts.handshake,
            negotiate::negotiate(worker, conn),
        )
        .await
        {
            Ok(negotiated) => negotiated?,
            Err(_) => return Err(SessionError::HandshakeTimeout),
        };
        let direct_ssl = match negotiated {
            Negotiated::Cancel(key) => return Ok(Admission::Cancel(key)),
            Negotiated::Tls { direct } => direct,
        };
        crate::probes::tls_done(direct_ssl, accepted);
        let routed = match routing::read_startup(worker, conn).await? {
            Startup::Cancel(key) => return Ok(Admission::Cancel(key)),
            Startup::Session(routed) => routed,
        };
        let authenticated = auth::authenticate(worker, conn, routed).await?;
        crate::probes::authenticated(&authenticated.branch.id, &authenticated.role, accepted);
        Ok(Admission::Authenticated(Box::new(authenticated)))
    };
    monoio::select! {
        result = timeout_at(accepted + timeouts.startup, steps) => {
            result.unwrap_or(Err(SessionError::StartupTimeout))
        }
        _ = worker.drain_over() => Err(SessionError::DrainOver),
    }
}

/// Refusals logged at info level (bad input: a flood of it must not flood the log).
static REFUSED: LogThrottle = LogThrottle::new();
/// Refusals because a backend failed (one per client while a backend is down).
static BACKEND_REFUSED: LogThrottle = LogThrottle::new();

/// Logs `error` once and ends the connection the way PostgreSQL would: the client gets the
/// ErrorResponse it may see (in plaintext only for the errors PostgreSQL sends before TLS),
/// then close_notify once TLS is up.
pub async fn refuse(mut conn: ClientConn<'_>, peer: SocketAddr, error: SessionError) {
    match &error {
        SessionError::ClientClosed => tracing::debug!(%peer, "client left during startup"),
        SessionError::HandshakeTimeout | SessionError::DrainOver => {
            tracing::debug!(%peer, %error, "connection closed")
        }
        SessionError::Backend(_) | SessionError::NoHealthyReplica(_) => {
            if let Some(suppressed) = BACKEND_REFUSED.allow() {
                tracing::warn!(%peer, %error, suppressed, "connection refused");
            }
        }
        _ => {
            if let Some(suppressed) = REFUSED.allow() {
                tracing::info!(%peer, %error, suppressed, "connection refused");
            }
        }
    }
    if conn.has_tls() || error.is_sent_before_tls() {
        if let Some(wire) = error.to_wire() {
            write::error_response_full(
                conn.out(),
                Severity::Fatal,
                wire.code,
                &wire.message,
                wire.detail,
                None,
            );
        }
    }
    match error {
        // The socket failed, or nothing is owed before TLS.
        SessionError::Io(_) | SessionError::HandshakeTimeout => conn.drop_silently(),
        SessionError::ClientClosed | SessionError::DrainOver if !conn.has_tls() => {
            conn.drop_silently()
        }
        // A handshake without ALPN succeeded as TLS: PostgreSQL 17 refuses it with a plain
        // TLS close.
        SessionError::Tls(TlsError::NoAlpn) => conn.close().await,
        // The client's records broke a rule: the alert rustls would send, then the close.
        SessionError::Tls(TlsError::Record(error)) => conn.fail(&error).await,
        // The handshake failed: its alert (rustls's) was sent already.
        SessionError::Tls(_) => conn.drop_silently(),
        _ => conn.close().await,
    }
}
