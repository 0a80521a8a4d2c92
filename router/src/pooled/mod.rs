//! A pooled client (the transaction-mode port): a placeholder until the pooled client lands.

use std::net::SocketAddr;
use std::rc::Rc;

use monoio::net::TcpStream;
use monoio::time::Instant;

use crate::worker::{LiveGuard, StartupSlot, Worker};

/// The task of a pooled-port connection that has spoken: for now, the connection is dropped.
pub async fn session(
    worker: Rc<Worker>,
    tcp: TcpStream,
    peer: SocketAddr,
    live: LiveGuard,
    slot: StartupSlot,
    accepted: Instant,
) {
    let _ = (worker, live, slot, accepted);
    tracing::debug!(%peer, "pooled port not implemented");
    drop(tcp);
}
