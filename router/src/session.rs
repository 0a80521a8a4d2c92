//! One client connection on the direct (session) port, from its first byte to the relay.
//!
//! 1. Front door: direct SSL (first byte 0x16), SSLRequest, GSSENCRequest (answered `N`),
//!    CancelRequest, or a plaintext StartupMessage (refused: TLS is required).
//! 2. StartupMessage over TLS, parsed in place; `user` names the role and the branch.
//! 3. SCRAM-SHA-256 with the client against the catalog verifier; we keep the ClientKey.
//! 4. Backend connection (primary, or least-loaded healthy replica) authenticated with that key.
//! 5. Relay both ways ([`crate::relay`]) until either side closes.
//!
//! Steps 1-3 run under `timeouts.startup`, step 4 under `timeouts.connect`. Steps 1-4 run in a
//! future of their own, boxed and freed when they end, so the task of an established session
//! holds only what the relay needs.

use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use monoio::io::Splitable;
use monoio::net::TcpStream;

use crate::auth::scram::{self, ClientCredentials, ClientKey};
use crate::auth::verifier::ScramVerifier;
use crate::backend::{self, BackendConn, BackendError};
use crate::buf::{write_all_vec, BufPool, ReadBuf};
use crate::error::SessionError;
use crate::protocol::frame::{self, FrameHeader};
use crate::protocol::frontend::SaslInitialResponse;
use crate::protocol::startup::{self, CancelKey, StartupPacket};
use crate::protocol::write::{self, Severity};
use crate::relay::{self, End, Sockets, CLOSE_WRITE_TIMEOUT};
use crate::route;
use crate::tls::{self, Handshake, RecordLayer, TlsError};
use crate::upstream::{self, ActiveGuard, Upstreams};
use crate::worker::{SessionHandle, Signal, Worker};

/// The TLS record type of a handshake: a direct-SSL ClientHello starts with it.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Largest SASL message accepted from a client (PostgreSQL allows 65535; SCRAM needs < 1 KiB).
pub const MAX_AUTH_MESSAGE_BYTES: usize = 8 * 1024;

const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// The client's side of a connection while it is being established.
struct Client {
    tcp: TcpStream,
    /// Bytes from the socket: plaintext before TLS, ciphertext after.
    raw: ReadBuf,
    /// Opened data from the client's records.
    plain: ReadBuf,
    /// Messages to send (plaintext, sealed on flush once TLS is up).
    out: Vec<u8>,
    /// Records to send (and the handshake's flights).
    tls_out: Vec<u8>,
    tls: Option<Box<RecordLayer>>,
    handshake: Handshake,
}

impl Client {
    fn new(tcp: TcpStream, pool: &BufPool) -> Self {
        Self {
            tcp,
            raw: ReadBuf::from_storage(pool.take()),
            plain: ReadBuf::from_storage(pool.take()),
            out: Vec::with_capacity(1024),
            tls_out: Vec::with_capacity(2048),
            tls: None,
            handshake: Handshake::default(),
        }
    }

    /// The connection ends here: its buffers go back to the worker's pool.
    fn give_up(self, pool: &BufPool) -> Option<Session> {
        self.raw.release(pool);
        self.plain.release(pool);
        None
    }

    /// Send everything in `out` (as TLS records once TLS is up).
    async fn flush(&mut self) -> Result<(), SessionError> {
        match &mut self.tls {
            Some(records) => {
                tls::seal_into(records, &self.out, &mut self.tls_out).map_err(TlsError::from)?;
                self.out.clear();
                write_all_vec(&mut self.tcp, &mut self.tls_out).await?;
            }
            None => write_all_vec(&mut self.tcp, &mut self.out).await?,
        }
        Ok(())
    }

    /// Read more opened data into `plain`.
    async fn read_more(&mut self) -> Result<(), SessionError> {
        let Some(records) = &mut self.tls else {
            return Err(SessionError::Protocol("read before TLS"));
        };
        loop {
            let before = self.plain.len();
            let open = tls::open_into(records, &mut self.raw, &mut self.plain)?;
            // Data that came before a close_notify is still served (a CancelRequest, say).
            if self.plain.len() > before {
                return Ok(());
            }
            if !open {
                return Err(SessionError::ClientClosed);
            }
            if records
                .record_len(self.raw.data())
                .map_err(TlsError::from)?
                .is_some()
            {
                // A whole record is waiting that `plain` has no room for.
                return Err(SessionError::Protocol("message too long"));
            }
            if self.raw.fill_from(&mut self.tcp).await? == 0 {
                return Err(SessionError::ClientClosed);
            }
        }
    }

    /// Wait for one whole message in `plain`.
    async fn read_frame(&mut self, max_bytes: usize) -> Result<FrameHeader, SessionError> {
        loop {
            match frame::check(self.plain.data(), max_bytes) {
                Ok(Some(header)) => return Ok(header),
                Ok(None) => self.read_more().await?,
                Err(_) => return Err(SessionError::Protocol("invalid message length")),
            }
        }
    }

    async fn accept_tls(&mut self, config: Arc<rustls::ServerConfig>) -> Result<(), SessionError> {
        let (records, handshake) =
            tls::accept(&mut self.tcp, config, &mut self.raw, &mut self.tls_out).await?;
        self.tls = Some(Box::new(records));
        self.handshake = handshake;
        Ok(())
    }
}

/// What the front door produced.
enum Established {
    /// A CancelRequest: no session follows.
    Cancel(CancelKey),
    /// An authenticated client, not yet connected to a backend.
    Authenticated(Box<Authenticated>),
}

struct Authenticated {
    routed: Routed,
    client_key: ClientKey,
    server_final: Vec<u8>,
    verifier: Arc<ScramVerifier>,
}

struct Ready {
    backend: BackendConn,
    _upstream: ActiveGuard,
    client_key: CancelKey,
    branch: Box<str>,
    role: Box<str>,
}

/// Routing facts taken from the StartupMessage before its buffer is reused.
struct Routed {
    branch: Arc<crate::catalog::Branch>,
    role: Box<str>,
    replica: bool,
    verifier: Option<Arc<ScramVerifier>>,
    /// The StartupMessage for the backend (user = bare role).
    backend_startup: Vec<u8>,
}

/// An established session: the client authenticated, its backend connected, both told.
struct Session {
    sockets: Sockets,
    records: Box<RecordLayer>,
    /// Ciphertext past the client's last whole record (normally none).
    cipher: Vec<u8>,
    handle: Rc<SessionHandle>,
    _upstream: ActiveGuard,
}

/// Serve one accepted connection until it ends. Every failure is logged once, here.
///
/// Steps 1 to 4 run in a boxed future of their own, which owns the socket until the session
/// is established: its state (buffers, SCRAM, the backend handshake) is freed before the relay,
/// and the task itself only keeps what the relay needs.
pub fn serve(worker: Rc<Worker>, tcp: TcpStream, peer: SocketAddr) -> impl Future<Output = ()> {
    let (live, over_limit) = worker.connection_started();
    if let Err(error) = tcp.set_nodelay(true) {
        tracing::debug!(%peer, %error, "set_nodelay failed");
    }
    let starting = Box::pin(start(worker.clone(), tcp, peer, over_limit));
    async move {
        let _live = live;
        if let Some(mut session) = starting.await {
            relay(&worker, &mut session, peer).await;
        }
    }
}

/// Steps 1 to 4. `None` if the connection ended (a cancel request, or a refusal, logged).
async fn start(
    worker: Rc<Worker>,
    tcp: TcpStream,
    peer: SocketAddr,
    over_limit: bool,
) -> Option<Session> {
    let worker = &worker;
    let mut client = Client::new(tcp, &worker.buffers);
    let startup_timeout = worker.shared.config.timeouts.startup;
    let result =
        match monoio::time::timeout(startup_timeout, establish(worker, &mut client, over_limit))
            .await
        {
            Ok(result) => result,
            Err(_) => Err(SessionError::StartupTimeout),
        };
    let auth = match result {
        Ok(Established::Cancel(key)) => {
            crate::cancel::handle(worker, key);
            return client.give_up(&worker.buffers);
        }
        Ok(Established::Authenticated(auth)) => auth,
        Err(error) => {
            refuse(&mut client, peer, error).await;
            return client.give_up(&worker.buffers);
        }
    };
    let Authenticated {
        routed,
        client_key,
        server_final,
        verifier,
    } = *auth;
    let (ready, status, mut to_client) =
        match connect_backend(worker, &routed, client_key, &verifier).await {
            Ok(Connected {
                ready,
                status,
                to_client,
            }) => (ready, status, to_client),
            Err((error, mut to_client)) => {
                // The client did authenticate; a backend that then refuses the session (no
                // such database, too many connections) says why in its own ErrorResponse,
                // which the client sees verbatim after AuthenticationOk, as PostgreSQL itself
                // would send it.
                if matches!(error, SessionError::Backend(BackendError::Rejected(_))) {
                    write::auth_sasl_final(&mut client.out, &server_final);
                    write::auth_ok(&mut client.out);
                    client.out.append(&mut to_client);
                }
                refuse(&mut client, peer, error).await;
                return client.give_up(&worker.buffers);
            }
        };
    let Ready {
        backend,
        _upstream,
        client_key,
        branch,
        role,
    } = ready;
    let BackendConn {
        mut stream,
        addr,
        pid,
        secret,
        read_buf,
        hot_standby: _,
    } = backend;
    write::auth_sasl_final(&mut client.out, &server_final);
    write::auth_ok(&mut client.out);
    client.out.append(&mut to_client);
    write::backend_key_data(&mut client.out, client_key.pid, client_key.secret);
    write::ready_for_query(&mut client.out, status);
    // Bytes the backend sent past its ReadyForQuery (normally none) follow ours.
    client.out.extend_from_slice(read_buf.data());
    read_buf.release(&worker.buffers);
    if let Err(error) = client.flush().await {
        tracing::debug!(%peer, %error, "client gone before ReadyForQuery");
        return client.give_up(&worker.buffers);
    }
    // And messages the client pipelined after authenticating go to the backend first.
    if !client.plain.is_empty() {
        let mut early = client.plain.data().to_vec();
        if let Err(error) = write_all_vec(&mut stream, &mut early).await {
            tracing::warn!(%peer, %error, "backend connection failed");
            return client.give_up(&worker.buffers);
        }
    }
    let Client {
        tcp,
        raw,
        plain,
        tls,
        handshake,
        ..
    } = client;
    let cipher = raw.data().to_vec();
    raw.release(&worker.buffers);
    plain.release(&worker.buffers);
    let records = tls?;
    let handle = Rc::new(SessionHandle {
        client_key,
        backend_addr: addr,
        backend_key: CancelKey { pid, secret },
        branch,
        role,
        sni: handshake.sni,
        verifier,
        kill: Signal::default(),
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
        _upstream,
    })
}

/// Log the error once and tell the client what it may know.
async fn refuse(client: &mut Client, peer: SocketAddr, error: SessionError) {
    match &error {
        SessionError::ClientClosed => tracing::debug!(%peer, "client left during startup"),
        SessionError::Backend(_) | SessionError::NoHealthyReplica(_) => {
            tracing::warn!(%peer, %error, "connection refused")
        }
        _ => tracing::info!(%peer, %error, "connection refused"),
    }
    // Before TLS only the front-door errors are written (in plaintext, as PostgreSQL does).
    let may_write = client.tls.is_some()
        || matches!(
            error,
            SessionError::TlsRequired
                | SessionError::DataAfterSslRequest
                | SessionError::DataAfterGssEncRequest
                | SessionError::Startup(_)
        );
    if let (true, Some((code, message))) = (may_write, error.to_wire()) {
        write::error_response(&mut client.out, Severity::Fatal, code, &message);
    }
    if may_write && !client.out.is_empty() {
        let _ = client.flush().await;
    }
}

async fn establish(
    worker: &Rc<Worker>,
    client: &mut Client,
    over_limit: bool,
) -> Result<Established, SessionError> {
    if let Some(key) = front_door(worker, client).await? {
        return Ok(Established::Cancel(key));
    }
    let len = loop {
        match startup::check_startup(client.plain.data())? {
            Some(len) => break len,
            None => client.read_more().await?,
        }
    };
    let routed = match startup::parse_startup(&client.plain.data()[..len])? {
        StartupPacket::Cancel(key) => return Ok(Established::Cancel(key)),
        StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
            return Err(SessionError::Protocol("encryption request inside TLS"))
        }
        StartupPacket::Startup(message) => {
            if over_limit {
                return Err(SessionError::TooManyConnections);
            }
            if message.minor > 0 || message.protocol_options().next().is_some() {
                write::negotiate_protocol_version(
                    &mut client.out,
                    startup::PROTOCOL_3_0,
                    message.protocol_options(),
                );
            }
            let user = message.user().ok_or(SessionError::NoUser)?;
            let catalog = worker.shared.catalog.load();
            let target = route::parse_user_or_sni(user, client.handshake.sni.as_deref(), |b| {
                catalog.branch(b).is_some()
            })?;
            let branch = catalog
                .branch(target.branch)
                .cloned()
                .ok_or_else(|| SessionError::UnknownBranch(target.branch.into()))?;
            let mut backend_startup = Vec::with_capacity(len);
            write::startup_message(
                &mut backend_startup,
                message.params().filter_map(|(name, value)| match name {
                    "user" => Some((name, target.role)),
                    // libpq defaults the database to the user name, which here carries the branch.
                    "database" if value == user => Some((name, target.role)),
                    _ if name.starts_with("_pq_.") => None,
                    _ => Some((name, value)),
                }),
            );
            Routed {
                verifier: branch.role(target.role).cloned(),
                branch,
                role: target.role.into(),
                replica: target.replica,
                backend_startup,
            }
        }
    };
    client.plain.consume(len);

    let (client_key, server_final, verifier) = authenticate(worker, client, &routed).await?;
    Ok(Established::Authenticated(Box::new(Authenticated {
        routed,
        client_key,
        server_final,
        verifier,
    })))
}

/// Step 1: everything before the StartupMessage. Returns a CancelRequest's key if that is what
/// the client sent; otherwise TLS is up when it returns.
async fn front_door(
    worker: &Rc<Worker>,
    client: &mut Client,
) -> Result<Option<CancelKey>, SessionError> {
    let mut answered_gss = false;
    loop {
        if client.raw.is_empty() && client.raw.fill_from(&mut client.tcp).await? == 0 {
            return Err(SessionError::ClientClosed);
        }
        if client.raw.data().first() == Some(&TLS_HANDSHAKE_RECORD) {
            client.accept_tls(worker.shared.tls.clone()).await?;
            if !client.handshake.alpn {
                // PostgreSQL 17 closes direct-SSL connections that did not negotiate ALPN.
                return Err(TlsError::NoAlpn.into());
            }
            return Ok(None);
        }
        let len = loop {
            match startup::check_startup(client.raw.data())? {
                Some(len) => break len,
                None => {
                    if client.raw.fill_from(&mut client.tcp).await? == 0 {
                        return Err(SessionError::ClientClosed);
                    }
                }
            }
        };
        match startup::parse_startup(&client.raw.data()[..len])? {
            StartupPacket::SslRequest => {
                if client.raw.len() > len {
                    return Err(SessionError::DataAfterSslRequest);
                }
                client.raw.consume(len);
                client.out.push(b'S');
                client.flush().await?;
                client.accept_tls(worker.shared.tls.clone()).await?;
                return Ok(None);
            }
            StartupPacket::GssEncRequest if !answered_gss => {
                answered_gss = true;
                let pipelined = client.raw.len() > len;
                client.raw.consume(len);
                client.out.push(b'N');
                client.flush().await?;
                // PostgreSQL answers `N`, then refuses bytes sent before the client read it.
                if pipelined {
                    return Err(SessionError::DataAfterGssEncRequest);
                }
            }
            StartupPacket::GssEncRequest => {
                return Err(SessionError::Protocol("repeated GSSENCRequest"))
            }
            StartupPacket::Cancel(key) => return Ok(Some(key)),
            StartupPacket::Startup(_) => return Err(SessionError::TlsRequired),
        }
    }
}

/// Step 3: SCRAM-SHA-256 with the client. Unknown roles run the same exchange against a fake
/// verifier and fail the same way as a wrong password.
async fn authenticate(
    worker: &Rc<Worker>,
    client: &mut Client,
    routed: &Routed,
) -> Result<(ClientKey, Vec<u8>, Arc<ScramVerifier>), SessionError> {
    let known = routed.verifier.is_some();
    let verifier = match &routed.verifier {
        Some(verifier) => verifier.clone(),
        None => Arc::new(ScramVerifier::mock(
            &routed.role,
            &worker.shared.mock_secret,
        )),
    };
    write::auth_sasl(&mut client.out, &[SCRAM_SHA_256]);
    client.flush().await?;

    let header = expect_password_message(client).await?;
    let state = {
        let body = frame::body(&client.plain.data()[..header.len], header);
        let initial = SaslInitialResponse::parse(body)
            .map_err(|_| SessionError::Protocol("malformed SASLInitialResponse"))?;
        if initial.mechanism != SCRAM_SHA_256 {
            return Err(SessionError::InvalidSaslMechanism);
        }
        let (state, server_first) =
            scram::server_start(initial.data, &verifier).map_err(SessionError::MalformedScram)?;
        write::auth_sasl_continue(&mut client.out, &server_first);
        state
    };
    client.plain.consume(header.len);
    client.flush().await?;

    let header = expect_password_message(client).await?;
    let body = frame::body(&client.plain.data()[..header.len], header);
    let outcome = scram::server_finish(state, body);
    client.plain.consume(header.len);
    match outcome {
        Ok((client_key, server_final)) if known => Ok((client_key, server_final, verifier)),
        Ok(_) | Err(scram::ScramError::InvalidProof) => {
            Err(SessionError::AuthFailed(routed.role.clone()))
        }
        Err(error) => Err(SessionError::MalformedScram(error)),
    }
}

async fn expect_password_message(client: &mut Client) -> Result<FrameHeader, SessionError> {
    let header = client.read_frame(MAX_AUTH_MESSAGE_BYTES).await?;
    match header.tag {
        b'p' => Ok(header),
        b'X' => Err(SessionError::ClientClosed),
        _ => Err(SessionError::Protocol("expected SASL response")),
    }
}

struct Connected {
    ready: Ready,
    status: u8,
    to_client: Vec<u8>,
}

/// Step 4: connect to the primary, or to replicas in least-connections order until one works.
/// On failure, also returns what the backend said (its ErrorResponse) for the client.
async fn connect_backend(
    worker: &Rc<Worker>,
    routed: &Routed,
    client_key: ClientKey,
    verifier: &ScramVerifier,
) -> Result<Connected, (SessionError, Vec<u8>)> {
    let shared = &worker.shared;
    let mut failed: Vec<SocketAddr> = Vec::new();
    loop {
        let upstream = if routed.replica {
            shared
                .upstreams
                .pick_replica(&routed.branch.replicas, &failed)
                .ok_or_else(|| {
                    (
                        SessionError::NoHealthyReplica(routed.branch.id.clone()),
                        Vec::new(),
                    )
                })?
        } else {
            shared.upstreams.get(routed.branch.primary)
        };
        let addr = upstream.addr;
        let guard = Upstreams::hold(upstream);
        let credentials = ClientCredentials::Keys {
            client_key: client_key.0,
            server_key: verifier.server_key,
        };
        let mut to_client = Vec::new();
        let attempt = monoio::time::timeout(
            shared.config.timeouts.connect,
            backend::connect(
                addr,
                &routed.backend_startup,
                credentials,
                &mut to_client,
                ReadBuf::from_storage(worker.buffers.take()),
            ),
        )
        .await
        .unwrap_or(Err(BackendError::Timeout));
        match attempt {
            Ok((backend, _)) if routed.replica && backend.hot_standby == Some(false) => {
                tracing::warn!(
                    %addr,
                    hold = ?upstream::NOT_A_STANDBY_HOLD,
                    "replica address is not a standby (in_hot_standby = off), trying another"
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
                        _upstream: guard,
                        client_key,
                        branch: routed.branch.id.clone(),
                        role: routed.role.clone(),
                    },
                    status,
                    to_client,
                });
            }
            Err(BackendError::Rejected(code)) if routed.replica && code.server_unavailable() => {
                tracing::warn!(%addr, %code, "replica refused the connection, trying another");
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
            ) if routed.replica => {
                tracing::warn!(%addr, %error, "replica failed, trying another");
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

/// Step 5: register the session and relay until one side ends, then say goodbye as fits.
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
    let end = relay::run(
        &mut session.sockets,
        &mut session.records,
        &session.cipher,
        &session.handle.kill,
        &worker.buffers,
    )
    .await;
    session.cipher = Vec::new();
    let records = &mut session.records;
    // What the client still gets: a FATAL error if the router ends the session, then
    // close_notify if we are the side that closes.
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
        End::BackendError(error) => tracing::warn!(%peer, %error, "backend connection failed"),
        End::ClientClosed => tracing::debug!(%peer, "client closed the session"),
        End::ClientError(error) => tracing::debug!(%peer, %error, "client connection failed"),
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
