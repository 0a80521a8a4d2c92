//! Cancels across nodes: a thread of its own that receives forwarded cancels on `[node] peer`
//! and sends this node's to the others.
//!
//! A CancelRequest whose key matches no session here ([`crate::cancel::handle`]) may belong to
//! another node's session: the client's balancer chose a node for the cancel connection without
//! knowing where the session is. The worker hands the key to this thread ([`Fleet::forward`],
//! a bounded queue, never waited on) and closes the client's connection at once, as PostgreSQL
//! does: the client never learns whether its cancel did anything. This thread sends the key to
//! the nodes that may own it ([`targets`]): on the pooled port the key names its node
//! ([`wire::tag_of`]), so only that node; on the direct port the key is the backend's real pid,
//! so every live node. The receiving node looks the key up exactly as for a CancelRequest of
//! its own (secret compared in constant time, one cancel on its way per session) and acts only
//! on a match; it never forwards again and never answers.
//!
//! Cancels are rare, so one thread with a current-thread tokio runtime serves both ways; the
//! workers stay on monoio and only ever call [`Fleet::forward`]. Everything is bounded: the
//! queue ([`FORWARD_QUEUE`]), forwards in flight ([`MAX_FORWARDS`]), the nodes one forward
//! reaches ([`MAX_FANOUT`]) and its time ([`FORWARD_TIME_BOUND`]), connections being read
//! ([`MAX_RECEIVING`]) and their time ([`RECEIVE_TIMEOUT`]), the replay cache
//! ([`wire::REPLAY_CACHE_CAPACITY`]).
//!
//! The cost to a guesser is unchanged by the fleet's size: a key that matches nothing costs its
//! source a token at the node it reached (before the forward), and the receiving nodes trust
//! the sender's limit (they know the message comes from a node by its MAC).

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use super::wire::{self, ForwardedCancel, PeerSecret, Rejected, ReplayCache, MESSAGE_LEN};
use super::{Fleet, NodeSet};
use crate::cancel::{CancelTarget, Claim};
use crate::protocol::startup::CancelKey;
use crate::throttle::LogThrottle;
use crate::worker::Shared;

/// Keys waiting to be forwarded; beyond it they are dropped (and counted): the workers never
/// wait for this thread.
pub const FORWARD_QUEUE: usize = 256;
/// Forwards in flight at once; a key that finds none free is dropped (and counted).
pub const MAX_FORWARDS: usize = 64;
/// Nodes one forward reaches at most (the live set's first ones with the key's tag).
pub const MAX_FANOUT: usize = 32;
/// How long one forward may take, all its nodes together: a client's cancel is worth little
/// after that, and a dead node must not hold a forward's place.
pub const FORWARD_TIME_BOUND: Duration = Duration::from_secs(1);
/// Connecting to one node: short, so that a dead node (not yet out of the live set) costs
/// little.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Connections read at once on the peer port; more are closed at once.
pub const MAX_RECEIVING: usize = 64;
/// How long a sender has to send its message: one write of 80 bytes.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the thread looks whether the router stops.
const STOP_POLL: Duration = Duration::from_millis(100);

/// The node-to-node channel's counts, for `/metrics`.
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Messages written to another node.
    pub sent: AtomicU64,
    /// Messages that could not be sent (connection refused or timed out).
    pub send_failed: AtomicU64,
    /// Keys not forwarded: the queue or the forwards in flight were full.
    pub dropped: AtomicU64,
    /// Messages received with a right MAC, timestamp and nonce.
    pub received: AtomicU64,
    /// Received messages whose key matched a session here: its cancel went to the backend.
    pub matched: AtomicU64,
    /// Received messages refused, by reason: malformed, bad MAC, stale, replayed.
    pub rejected: [AtomicU64; 4],
}

impl PeerStats {
    /// The reasons of [`PeerStats::rejected`], in its order (metric labels).
    pub const REJECT_REASONS: [&'static str; 4] = ["malformed", "bad_mac", "stale", "replay"];

    fn reject(&self, why: Rejected) {
        let at = match why {
            Rejected::Malformed => 0,
            Rejected::BadMac => 1,
            Rejected::Stale => 2,
            Rejected::Replay => 3,
        };
        self.rejected[at].fetch_add(1, Ordering::Relaxed);
    }
}

/// Received messages refused (logged at most once per interval).
static REJECTED: LogThrottle = LogThrottle::new();
/// Keys dropped because the forwarding was full.
static DROPPED: LogThrottle = LogThrottle::new();
/// Sends to a node that failed.
static SEND_FAILED: LogThrottle = LogThrottle::new();

/// Why the peer thread could not start.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The thread or its runtime could not start.
    #[error("cancel forwarding: {0}")]
    Start(std::io::Error),
}

/// Starts the peer thread: it receives on `listener` (when `[node] peer` is set) and forwards
/// what the workers give [`Fleet::forward`], until `stopping`.
pub fn start(
    shared: Arc<Shared>,
    secret: PeerSecret,
    listener: Option<std::net::TcpListener>,
    stopping: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, PeerError> {
    let (tx, rx) = mpsc::channel(FORWARD_QUEUE);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(PeerError::Start)?;
    let listener = match listener {
        Some(listener) => {
            listener.set_nonblocking(true).map_err(PeerError::Start)?;
            let _entered = runtime.enter();
            Some(TcpListener::from_std(listener).map_err(PeerError::Start)?)
        }
        None => None,
    };
    shared.fleet.set_forwarder(tx);
    let handle = std::thread::Builder::new()
        .name("branchgate-peer".into())
        .spawn(move || runtime.block_on(serve(shared, secret, listener, rx, stopping)))
        .map_err(PeerError::Start)?;
    Ok(handle)
}

/// The thread's loop: accept forwarded cancels, forward this node's, until `stopping`.
async fn serve(
    shared: Arc<Shared>,
    secret: PeerSecret,
    listener: Option<TcpListener>,
    mut rx: mpsc::Receiver<CancelKey>,
    stopping: Arc<AtomicBool>,
) {
    let receiving = Arc::new(Semaphore::new(MAX_RECEIVING));
    let forwarding = Arc::new(Semaphore::new(MAX_FORWARDS));
    let replay = Arc::new(Mutex::new(ReplayCache::default()));
    let origin = shared
        .fleet
        .id()
        .map_or([0; 8], |id| wire::origin_of(id.as_str()));
    let mut tick = tokio::time::interval(STOP_POLL);
    while !stopping.load(Ordering::Relaxed) {
        tokio::select! {
            accepted = accept(listener.as_ref()) => {
                let Ok((stream, from)) = accepted else { continue };
                let Ok(permit) = receiving.clone().try_acquire_owned() else {
                    // Closed at once: only a flood gets here, and nodes retry nothing.
                    continue;
                };
                let (shared, secret, replay) = (shared.clone(), secret.clone(), replay.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    receive(stream, from, &shared, &secret, &replay).await;
                });
            }
            key = rx.recv() => {
                let Some(key) = key else { break };
                let Ok(permit) = forwarding.clone().try_acquire_owned() else {
                    dropped(&shared.fleet);
                    continue;
                };
                let targets = targets(&shared.fleet, key);
                if targets.is_empty() {
                    continue;
                }
                let message = ForwardedCancel {
                    key,
                    timestamp_ms: now_ms(),
                    nonce: nonce(),
                    origin,
                }
                .encode(&secret);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    forward(&shared.fleet, message, targets).await;
                });
            }
            _ = tick.tick() => {}
        }
    }
}

/// The next connection on the peer port, or never (no `[node] peer`: this node only sends).
async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// The nodes that may own `key`: every other live node with a peer address, or, for a pooled
/// port's key ([`wire::tag_of`]), those whose tag is the key's (nearly always one; none when
/// the tag is this node's alone). At most [`MAX_FANOUT`].
pub fn targets(fleet: &Fleet, key: CancelKey) -> Vec<SocketAddr> {
    targets_in(&fleet.nodes(), fleet.id().map(|id| id.as_str()), key)
}

fn targets_in(nodes: &NodeSet, own: Option<&str>, key: CancelKey) -> Vec<SocketAddr> {
    let tag = wire::tag_of(key.pid);
    nodes
        .nodes
        .iter()
        .filter(|node| Some(node.id.as_str()) != own)
        .filter(|node| tag.is_none_or(|tag| wire::node_tag(node.id.as_str()) == tag))
        .filter_map(|node| node.peer)
        .take(MAX_FANOUT)
        .collect()
}

/// One node's send: its address and how it went.
type NodeSend =
    Pin<Box<dyn Future<Output = (SocketAddr, std::io::Result<()>)> + std::marker::Send>>;

/// Sends `message` to every one of `targets` at once, all within [`FORWARD_TIME_BOUND`].
async fn forward(fleet: &Fleet, message: [u8; MESSAGE_LEN], targets: Vec<SocketAddr>) {
    let stats = &fleet.peer_stats;
    let mut sends: Vec<NodeSend> = targets
        .into_iter()
        .map(|addr| Box::pin(async move { (addr, send(addr, &message).await) }) as NodeSend)
        .collect();
    let all = poll_fn(|cx| {
        sends.retain_mut(|send| match send.as_mut().poll(cx) {
            Poll::Ready((addr, result)) => {
                match result {
                    Ok(()) => {
                        stats.sent.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(node = %addr, "cancel forwarded");
                    }
                    Err(error) => {
                        stats.send_failed.fetch_add(1, Ordering::Relaxed);
                        if let Some(suppressed) = SEND_FAILED.allow() {
                            tracing::warn!(node = %addr, %error, suppressed, "forwarding a cancel failed");
                        }
                    }
                }
                false
            }
            Poll::Pending => true,
        });
        if sends.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    });
    if tokio::time::timeout(FORWARD_TIME_BOUND, all).await.is_err() {
        stats.send_failed.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = SEND_FAILED.allow() {
            tracing::warn!(suppressed, "forwarding a cancel timed out");
        }
    }
}

/// One message to one node: connect, write, close.
async fn send(addr: SocketAddr, message: &[u8; MESSAGE_LEN]) -> std::io::Result<()> {
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    stream.set_nodelay(true)?;
    stream.write_all(message).await?;
    stream.shutdown().await
}

/// One connection on the peer port: one message, checked, and acted on if it matches a
/// session here. Nothing is ever written back.
async fn receive(
    mut stream: TcpStream,
    from: SocketAddr,
    shared: &Shared,
    secret: &PeerSecret,
    replay: &Mutex<ReplayCache>,
) {
    let stats = &shared.fleet.peer_stats;
    let mut bytes = [0u8; MESSAGE_LEN];
    match tokio::time::timeout(RECEIVE_TIMEOUT, stream.read_exact(&mut bytes)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) | Err(_) => {
            rejected(stats, from, Rejected::Malformed);
            return;
        }
    }
    drop(stream);
    let checked = ForwardedCancel::decode(&bytes, secret).and_then(|message| {
        replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(&message, now_ms())
            .map(|()| message)
    });
    let message = match checked {
        Ok(message) => message,
        Err(why) => {
            rejected(stats, from, why);
            return;
        }
    };
    stats.received.fetch_add(1, Ordering::Relaxed);
    let (target, claim) = match shared.cancels.claim(message.key) {
        Claim::Sending(target, claim) => (target, claim),
        Claim::AlreadySending | Claim::NoBackend | Claim::Unknown => return,
    };
    stats.matched.fetch_add(1, Ordering::Relaxed);
    let _claim = claim;
    let CancelTarget { backend, key } = target;
    let timeout = shared.config.timeouts.connect;
    match tokio::time::timeout(timeout, cancel_backend(backend, key)).await {
        Ok(Ok(())) => tracing::debug!(%backend, pid = key.pid, "forwarded cancel sent"),
        Ok(Err(error)) => tracing::warn!(%backend, %error, "sending a forwarded cancel failed"),
        Err(_) => tracing::warn!(%backend, "a forwarded cancel to the backend timed out"),
    }
}

/// The real CancelRequest to `backend`, as [`crate::backend::cancel`] sends it on a worker:
/// written, then the backend's close awaited (so the claim lasts until it is delivered).
async fn cancel_backend(backend: SocketAddr, key: CancelKey) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(backend).await?;
    let mut request = Vec::with_capacity(16);
    crate::protocol::write::cancel_request(&mut request, key.pid, key.secret);
    stream.write_all(&request).await?;
    let mut rest = [0u8; 64];
    while stream.read(&mut rest).await? != 0 {}
    Ok(())
}

fn rejected(stats: &PeerStats, from: SocketAddr, why: Rejected) {
    stats.reject(why);
    if let Some(suppressed) = REJECTED.allow() {
        tracing::warn!(%from, reason = %why, suppressed, "forwarded cancel refused");
    }
}

fn dropped(fleet: &Fleet) {
    fleet.peer_stats.dropped.fetch_add(1, Ordering::Relaxed);
    if let Some(suppressed) = DROPPED.allow() {
        tracing::warn!(
            suppressed,
            "cancel not forwarded: too many forwards at once"
        );
    }
}

/// Wall-clock milliseconds since the Unix epoch (what other nodes compare timestamps with).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn nonce() -> [u8; 16] {
    let mut nonce = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    nonce
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::NodeRecord;

    fn node(id: &str, port: u16) -> NodeRecord {
        NodeRecord::new(
            id.parse().expect("id"),
            Some(SocketAddr::from(([127, 0, 0, 1], port))),
        )
    }

    #[test]
    fn pooled_keys_go_to_their_node_and_direct_keys_to_every_other() {
        let nodes = NodeSet {
            nodes: vec![node("a", 1), node("b", 2), node("c", 3)],
        };
        let addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let direct = CancelKey {
            pid: 4242,
            secret: 1,
        };
        assert_eq!(targets_in(&nodes, Some("a"), direct), [addr(2), addr(3)]);
        let pooled_b = CancelKey {
            pid: wire::tagged_pid(wire::node_tag("b"), 77),
            secret: 1,
        };
        assert_eq!(targets_in(&nodes, Some("a"), pooled_b), [addr(2)]);
        // A key with this node's tag that matched nothing here goes nowhere.
        let pooled_a = CancelKey {
            pid: wire::tagged_pid(wire::node_tag("a"), 77),
            secret: 1,
        };
        assert!(targets_in(&nodes, Some("a"), pooled_a).is_empty());
        // A dead node (out of the live set) is not tried.
        let alive = NodeSet {
            nodes: vec![node("a", 1), node("c", 3)],
        };
        assert!(targets_in(&alive, Some("a"), pooled_b).is_empty());
    }
}
