//! Connections from a load balancer listed in `[listen] proxy_from`: the PROXY protocol v2
//! header it must send before anything else ([`proxy_header`]), and the client address it
//! names, which is the connection's `peer` from then on: in the log, in the per-source cancel
//! limit ([`crate::cancel`]), in the steering map ([`crate::steering`]) and through a hand-off.
//!
//! The header is required from a listed address and looked for from no other (the
//! specification: a receiver must not guess whether one is there, or any client could choose
//! the address the router sees). It is read within the handshake timeout, which keeps
//! counting from the accept, so the header and the TLS handshake share one deadline.
//!
//! Reads never go past the header: each asks for exactly the bytes [`proxy_header::parse`]
//! says are still missing (16, then the rest, normally two reads), so the client's first bytes
//! (an SSLRequest, a ClientHello) stay in the socket for the negotiation that follows
//! ([`super::negotiate`]), which reads them into the connection's buffer as it does for any
//! connection; nothing is handed between the two. Reading in the connection's first, small task
//! ([`super::serve`]) means the session task is started with the client's address and no code
//! after it has a second one to choose from.
//!
//! A header that is missing, malformed, cut short by a close or not complete by the deadline
//! ends the connection without a word: the peer is the balancer, which has not spoken
//! PostgreSQL, and an ErrorResponse would reach the client through it as the answer to an
//! SSLRequest the router never read. HAProxy's `accept-proxy` closes such a connection the
//! same way, as the specification recommends ("abort the connection as soon as possible so
//! that the sender gets a chance to notice the anomaly"). Each is counted
//! (`branchgate_proxy_headers_refused`) and logged, throttled. A connection the balancer closes
//! before its first byte (a TCP health check) is not a refusal.

use std::net::SocketAddr;

use monoio::net::TcpStream;
use monoio::time::{timeout_at, Instant};

use crate::buf::{read_into, BufPool, POOL_BUFFER_BYTES};
use crate::throttle::LogThrottle;
use crate::worker::Worker;

use super::proxy_header::{self, Parsed, ProxyHeader, ProxyHeaderError, MAX_HEADER_BYTES};
use super::Port;

// The whole header is read into one pool buffer.
const _: () = assert!(MAX_HEADER_BYTES <= POOL_BUFFER_BYTES);

/// Why a listed balancer's connection got no further than its header.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// What arrived is not an acceptable header.
    #[error("bad PROXY v2 header: {0}")]
    Malformed(#[from] ProxyHeaderError),
    /// The balancer closed the connection `after` bytes into the header.
    #[error("closed after {after} bytes of a PROXY v2 header")]
    Closed {
        /// Bytes of the header that came.
        after: usize,
    },
    /// No whole header by the handshake deadline.
    #[error("no whole PROXY v2 header within the handshake timeout")]
    Timeout,
    /// The socket failed.
    #[error("reading the PROXY v2 header: {0}")]
    Io(#[from] std::io::Error),
}

/// Refused headers (a misconfigured balancer refuses every connection: one line per interval).
static REFUSED: LogThrottle = LogThrottle::new();

/// The client a listed balancer's connection `tcp` is for: the header's source address, or
/// `balancer` itself for a LOCAL header. `None` when the connection ends here (logged, and
/// counted in `worker`'s stats for `port` unless the balancer closed before its first byte or
/// the worker's drain ended). Not cancel-safe (the caller drops the connection).
pub async fn client_of(
    worker: &Worker,
    tcp: &mut TcpStream,
    balancer: SocketAddr,
    deadline: Instant,
    port: Port,
) -> Option<SocketAddr> {
    let read = monoio::select! {
        read = timeout_at(deadline, read_header(tcp, &worker.buffers)) => {
            read.unwrap_or(Err(HeaderError::Timeout))
        }
        _ = worker.drain_over() => return None,
    };
    match read {
        Ok(header) => {
            let client = header.client(balancer);
            tracing::debug!(%client, %balancer, ?header, "PROXY v2 header");
            Some(client)
        }
        Err(HeaderError::Closed { after: 0 }) => {
            tracing::debug!(%balancer, "balancer closed before its PROXY v2 header");
            None
        }
        Err(error) => {
            refused(worker, balancer, port, &error);
            None
        }
    }
}

/// Counts and logs (throttled) a refused header.
#[cold]
fn refused(worker: &Worker, balancer: SocketAddr, port: Port, error: &HeaderError) {
    worker.stats.proxy_headers_refused[port.index()].inc();
    if let Some(suppressed) = REFUSED.allow() {
        tracing::warn!(
            %balancer,
            %error,
            suppressed,
            "connection from a balancer closed: [listen] proxy_from lists it, so it must send \
             a PROXY protocol v2 header first (HAProxy: send-proxy-v2)"
        );
    }
}

/// Reads one header from `tcp`, never a byte past it, into a buffer of `pool` (given back).
/// Not cancel-safe (a read dropped in flight takes the buffer with it).
pub async fn read_header(tcp: &mut TcpStream, pool: &BufPool) -> Result<ProxyHeader, HeaderError> {
    let mut buf = pool.take();
    let mut have = 0;
    let read = loop {
        let needed = match proxy_header::parse(&buf[..have]) {
            Ok(Parsed::Complete { header, .. }) => break Ok(header),
            Ok(Parsed::Incomplete { needed }) => needed,
            Err(error) => break Err(error.into()),
        };
        match read_into(tcp, &mut buf, have..needed).await {
            Ok(0) => break Err(HeaderError::Closed { after: have }),
            Ok(n) => have += n,
            Err(error) => break Err(error.into()),
        }
    };
    pool.give(buf);
    read
}
