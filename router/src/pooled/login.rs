//! A pooled client's login, after the front door: its place among its branch's clients, its
//! pool (and the parameters its backends report, from a first backend if it has none), and the
//! answer with a router-issued cancel key.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use monoio::io::Splitable;
use monoio::net::TcpStream;
use monoio::time::Instant;

use crate::buf::ReadBuf;
use crate::cancel::PooledCancel;
use crate::error::SessionError;
use crate::front_door::{self, Authenticated, Parts};
use crate::protocol::startup::CancelKey;
use crate::protocol::write;
use crate::worker::{SessionHandle, Signal, StartupSlot, Worker};

use super::params::{startup_params, ClientParams};
use super::pool::{AcquireError, PoolKey};
use super::prepared::ClientStatements;
use super::stream::MessageStream;
use super::{context, Client};

/// Logs in: the front door, a place, the pool, the answer.
pub(super) async fn start(
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
