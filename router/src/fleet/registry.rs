//! The node registry, on the control-plane thread (beside the catalog's watch, on the same
//! tokio runtime): this node's entry under a lease kept alive, every node's entry watched (the
//! live set, swapped into [`Fleet`]), and this node's acknowledgements written.
//!
//! The lease's time to live (`[node] lease_ttl`, [`DEFAULT_LEASE_TTL`]) is how long a node
//! that died without a word (SIGKILL, a dead machine, a partition) still counts as live: the
//! limits stay divided by one node too many for that long, and a `role` command started in
//! that window waits for it until its own timeout. 10 s keeps that window short while a
//! keep-alive every third of it ([`KEEP_ALIVE_DIVISOR`]) survives an etcd leader election
//! (about a second) and a slow request or two without the node dropping out.
//!
//! A node registers once, at start, with a transaction that creates its entry only if no
//! entry has its id: a second live router with the same id fails to start. If the lease is
//! lost later (etcd unreachable for longer than the time to live), the node registers again
//! once etcd answers, and writes its latest acknowledgement again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::watch;

use super::node::{Ack, NodeRecord};
use super::{Fleet, NodeSet};
use crate::catalog::etcd::follow::{stopped, BACKOFF_MAX, BACKOFF_MIN};
use crate::catalog::etcd::{EtcdError, Layout, Store};

/// Default time to live of a node's lease (see the module's documentation).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// The shortest lease etcd grants as asked (it raises shorter ones to about this).
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);
/// Keep-alives per time to live.
pub const KEEP_ALIVE_DIVISOR: u32 = 3;

/// Why the node could not register.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// etcd refused a request or could not be reached.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// etcd said the node's lease expired (it was unreachable for longer than the time to
    /// live): the node registers again.
    #[error("the node's lease expired")]
    LeaseLost,
    /// Another live router registered this node id.
    #[error(
        "node id {id:?} is taken: {key} is held by a live router ({holder}); each router needs \
         its own [node] id (or its own node-id file): stop the other one, or change the id"
    )]
    Duplicate {
        /// The id.
        id: String,
        /// Its registry key.
        key: String,
        /// The entry there, as written by its holder.
        holder: String,
    },
}

/// What a node registers: its entry, its lease's time to live, and where the live set goes.
#[derive(Debug)]
pub struct NodeSetup {
    /// The entry written under `<prefix>/nodes/<id>`.
    pub record: NodeRecord,
    /// The lease's time to live.
    pub ttl: Duration,
    /// The router's view of the fleet.
    pub fleet: Arc<Fleet>,
}

/// A node's registration, run by the control-plane thread.
#[derive(Debug)]
pub struct Registry {
    /// What is registered.
    setup: NodeSetup,
    /// The keys under the prefix.
    layout: Layout,
    /// The lease the entry lives on, while registered.
    lease: Option<i64>,
    /// The acknowledgements to write.
    acks: watch::Receiver<Option<Ack>>,
}

/// How one session with etcd ended.
enum SessionEnd {
    /// The router stops.
    Stopped,
    /// etcd failed (or the lease was lost): start again after a pause.
    Failed(RegistryError),
}

impl Registry {
    /// A registry for `setup` under `layout`, not registered yet.
    pub fn new(setup: NodeSetup, layout: Layout) -> Registry {
        let acks = setup.fleet.subscribe_acks();
        Registry {
            setup,
            layout,
            lease: None,
            acks,
        }
    }

    /// The node's id as text.
    fn id(&self) -> &str {
        self.setup.record.id.as_str()
    }

    /// Grants a lease and creates the node's entry on it, unless an entry with this id exists
    /// (then [`RegistryError::Duplicate`], and the lease is given back).
    pub async fn register(&mut self, store: &mut Store) -> Result<(), RegistryError> {
        let ttl = i64::try_from(self.setup.ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let mut client = store.client();
        let lease = store.timed(client.lease_grant(ttl, None)).await?.id();
        let key = self.layout.node_key(self.id());
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                self.setup.record.encode(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let response = match store.timed(client.txn(txn)).await {
            Ok(response) => response,
            Err(error) => {
                revoke(store, lease).await;
                return Err(error.into());
            }
        };
        if response.succeeded() {
            self.lease = Some(lease);
            return Ok(());
        }
        revoke(store, lease).await;
        let holder = response
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(get) => get
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            })
            .unwrap_or_else(|| "entry unreadable".into());
        Err(RegistryError::Duplicate {
            id: self.id().to_owned(),
            key,
            holder,
        })
    }

    /// Keeps the lease alive, follows the live set and writes acknowledgements until `stop`;
    /// then revokes the lease, so the node leaves the live set at once.
    pub async fn run(mut self, mut store: Store, mut stop: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.session(&mut store, &mut stop, &mut backoff).await {
                SessionEnd::Stopped => break,
                SessionEnd::Failed(RegistryError::Etcd(error)) => {
                    // The catalog's follower says once that etcd is unreachable.
                    tracing::debug!(%error, "node registry: etcd failed; retrying");
                }
                SessionEnd::Failed(RegistryError::LeaseLost) => {}
                SessionEnd::Failed(error) => {
                    tracing::error!(%error, "node registry: cannot register again; retrying");
                }
            }
            let wait = backoff;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                _ = stopped(&mut stop) => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if let Some(lease) = self.lease.take() {
            revoke(&mut store, lease).await;
            tracing::info!(node = self.id(), "left the fleet (lease revoked)");
        }
    }

    /// One run with etcd answering: registered (again, if the lease was lost), keep-alives
    /// going, the live set read and watched, acknowledgements written.
    async fn session(
        &mut self,
        store: &mut Store,
        stop: &mut watch::Receiver<bool>,
        backoff: &mut Duration,
    ) -> SessionEnd {
        let failed = |error: EtcdError| SessionEnd::Failed(error.into());
        let mut client = store.client();
        if let Some(lease) = self.lease {
            match store.timed(client.lease_time_to_live(lease, None)).await {
                Ok(alive) if alive.ttl() > 0 => {}
                Ok(_) => {
                    tracing::warn!(
                        node = self.id(),
                        "the node's lease expired (etcd was unreachable for longer than its \
                         time to live): registering again"
                    );
                    self.lease = None;
                }
                Err(error) => return failed(error),
            }
        }
        let lease = match self.lease {
            Some(lease) => lease,
            None => match self.register(store).await {
                Ok(()) => {
                    tracing::info!(node = self.id(), "registered again in the fleet");
                    match self.lease {
                        Some(lease) => lease,
                        None => return SessionEnd::Stopped,
                    }
                }
                Err(error) => return SessionEnd::Failed(error),
            },
        };
        let (mut keeper, mut kept) = match store.timed(client.lease_keep_alive(lease)).await {
            Ok(pair) => pair,
            Err(error) => return failed(error),
        };
        let prefix = self.layout.nodes_prefix();
        let (revision, kvs) = match store.read_prefix(&prefix).await {
            Ok(read) => read,
            Err(error) => return failed(error),
        };
        let mut live = BTreeMap::new();
        for kv in kvs {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if let Some(record) = decode(&key, kv.value()) {
                live.insert(key, record);
            }
        }
        self.publish(&live);
        let mut watch = match store.watch_prefix(&prefix, revision + 1).await {
            Ok(watch) => watch,
            Err(error) => return failed(error),
        };
        // The latest acknowledgement, written again: it may not have been (etcd was down), or
        // it was on a lease that expired.
        let mut written: Option<Ack> = None;
        let interval = self.setup.ttl / KEEP_ALIVE_DIVISOR;
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        *backoff = BACKOFF_MIN;
        loop {
            let pending = self.acks.borrow_and_update().clone();
            if let Some(ack) = pending.filter(|ack| written.as_ref() != Some(ack)) {
                let key = self.layout.ack_key(self.id());
                let options = PutOptions::new().with_lease(lease);
                if let Err(error) = store
                    .timed(client.put(key, ack.encode(), Some(options)))
                    .await
                {
                    return failed(error);
                }
                tracing::debug!(revision = ack.revision, refused = ?ack.refused, "acknowledged");
                written = Some(ack);
            }
            tokio::select! {
                _ = stopped(stop) => return SessionEnd::Stopped,
                _ = tick.tick() => {
                    if let Err(error) = keeper.keep_alive().await {
                        return failed(store.stream_error(error));
                    }
                }
                answer = kept.message() => match answer {
                    Ok(Some(answer)) if answer.ttl() <= 0 => {
                        tracing::warn!(node = self.id(), "the node's lease expired: registering again");
                        self.lease = None;
                        return SessionEnd::Failed(RegistryError::LeaseLost);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        let closed = etcd_client::Error::LeaseKeepAliveError("stream ended".into());
                        return failed(store.stream_error(closed));
                    }
                    Err(error) => return failed(store.stream_error(error)),
                },
                message = watch.message() => {
                    let response = match message {
                        Ok(Some(response)) => response,
                        Ok(None) => {
                            let closed = etcd_client::Error::WatchError("the watch stream ended".into());
                            return failed(store.stream_error(closed));
                        }
                        Err(error) => return failed(store.stream_error(error)),
                    };
                    if response.canceled() {
                        let closed = etcd_client::Error::WatchError(response.cancel_reason().to_owned());
                        return failed(store.stream_error(closed));
                    }
                    let mut changed = false;
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        changed = true;
                        match event.event_type() {
                            EventType::Put => {
                                if let Some(record) = decode(&key, kv.value()) {
                                    live.insert(key, record);
                                }
                            }
                            EventType::Delete => {
                                live.remove(&key);
                            }
                        }
                    }
                    if changed {
                        self.publish(&live);
                    }
                }
                changed = self.acks.changed() => {
                    if changed.is_err() {
                        return SessionEnd::Stopped;
                    }
                }
            }
        }
    }

    /// Swaps `live` into the fleet, and logs when the set changed.
    fn publish(&self, live: &BTreeMap<String, NodeRecord>) {
        let nodes = NodeSet {
            nodes: live.values().cloned().collect(),
        };
        let before = self.setup.fleet.nodes();
        if *before != nodes {
            let ids: Vec<&str> = nodes.nodes.iter().map(|n| n.id.as_str()).collect();
            tracing::info!(
                nodes = ids.len(),
                ids = %ids.join(","),
                "fleet: live nodes changed; per-branch limits divided among them"
            );
        }
        self.setup.fleet.set_nodes(nodes);
    }
}

/// A registry entry, or `None` (logged) if it cannot be read: a router of another version
/// or a hand-written key must not stop this one from counting the others.
fn decode(key: &str, value: &[u8]) -> Option<NodeRecord> {
    match NodeRecord::decode(key, value) {
        Ok(record) => Some(record),
        Err(error) => {
            tracing::warn!(%error, "ignoring an unreadable node registry entry");
            None
        }
    }
}

/// Gives `lease` back (its keys go with it). A failure is only logged: it expires anyway.
async fn revoke(store: &mut Store, lease: i64) {
    let mut client = store.client();
    if let Err(error) = store.timed(client.lease_revoke(lease)).await {
        tracing::warn!(%error, lease, "could not revoke the node's lease; it expires by itself");
    }
}
