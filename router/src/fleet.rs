//! The fleet: every router following one catalog in etcd is a node of it.
//!
//! - [`node`]: a node's id (configured, or generated once and kept in a file), its registry
//!   entry and its acknowledgement, as written to etcd.
//! - [`registry`]: on the control-plane thread: the node's entry under a lease kept alive, the
//!   watch on every node's entry (the live set), and the acknowledgements it writes.
//! - [`split`]: per-branch limits divided by the live node count.
//! - [`acks`]: what `branchgate role` waits for: every live node's acknowledgement.
//! - [`wire`]: the node-to-node cancel message, its MAC and replay window, and the node tag in
//!   the pooled port's cancel keys.
//! - [`peer`]: the thread that forwards cancels to other nodes and receives theirs.
//!
//! ```text
//! <prefix>/nodes/<id>    JSON NodeRecord (id, peer, version, started_at), on the node's lease
//! <prefix>/acks/<id>     JSON Ack (revision, refused?), on the node's lease
//! ```
//!
//! Both live on the node's lease: a node that dies leaves the live set (and stops being waited
//! for) once its lease expires, and a clean shutdown revokes the lease at once. With a catalog
//! file the router is a fleet of one: nothing is registered and no limit is divided.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::{PoolOverrides, PoolSettings};

pub mod acks;
pub mod node;
pub mod peer;
pub mod registry;
pub mod split;
pub mod wire;

pub use node::{Ack, NodeId, NodeRecord};

/// The live nodes the registry saw last, in id order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSet {
    /// One entry per live node (this one included once its own entry is seen).
    pub nodes: Vec<NodeRecord>,
}

/// What the workers, `/metrics` and the control socket know of the fleet. Written by the
/// registry (live set) and the reload path (acknowledgements); read on the hot path without a
/// lock (one atomic load for the node count).
#[derive(Debug)]
pub struct Fleet {
    /// This node's id, when the catalog is in etcd.
    id: Option<NodeId>,
    /// The live set, swapped whole by the registry.
    live: ArcSwap<NodeSet>,
    /// The live set's size, at least 1 (this node counts even before its entry is seen): what
    /// the limit split divides by.
    count: AtomicU32,
    /// The newest acknowledgement to write; the registry writes each one it sees.
    acks: watch::Sender<Option<Ack>>,
    /// This node's tag in the pooled port's cancel keys ([`wire::node_tag`]).
    tag: u16,
    /// Where the workers hand keys that matched nothing to the peer thread ([`peer`]); unset
    /// while cancels are not forwarded (no etcd catalog, or no `[node] secret_file`).
    forwarder: OnceLock<tokio::sync::mpsc::Sender<crate::protocol::startup::CancelKey>>,
    /// The node-to-node channel's counts (`/metrics`).
    pub peer_stats: peer::PeerStats,
}

impl Fleet {
    /// A router that is no fleet's node (its catalog is a file): one node, no registry.
    pub fn single() -> Fleet {
        Fleet::with_id(None)
    }

    /// Node `id` of a fleet, before its registry has seen anything.
    pub fn node(id: NodeId) -> Fleet {
        Fleet::with_id(Some(id))
    }

    fn with_id(id: Option<NodeId>) -> Fleet {
        // A router that is no fleet's node forwards nothing: any tag keeps its pooled pids
        // above real pids.
        let tag = id.as_ref().map_or(1, |id| wire::node_tag(id.as_str()));
        Fleet {
            tag,
            forwarder: OnceLock::new(),
            peer_stats: peer::PeerStats::default(),
            id,
            live: ArcSwap::from_pointee(NodeSet::default()),
            count: AtomicU32::new(1),
            acks: watch::Sender::new(None),
        }
    }

    /// This node's id, if it is a fleet's node.
    pub fn id(&self) -> Option<&NodeId> {
        self.id.as_ref()
    }

    /// This node's tag, for the pid of the pooled port's cancel keys ([`wire::tagged_pid`]).
    pub fn tag(&self) -> u16 {
        self.tag
    }

    /// True once cancels that match nothing here go to the other nodes.
    pub fn forwards_cancels(&self) -> bool {
        self.forwarder.get().is_some()
    }

    /// A CancelRequest's `key` matched no session here: the peer thread sends it to the nodes
    /// that may own it ([`peer`]). Never waits: a full queue drops the key (counted). Nothing
    /// happens when cancels are not forwarded.
    pub fn forward(&self, key: crate::protocol::startup::CancelKey) {
        if let Some(forwarder) = self.forwarder.get() {
            if forwarder.try_send(key).is_err() {
                self.peer_stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The peer thread takes the keys sent to `forwarder` (once; a second is ignored).
    pub(crate) fn set_forwarder(
        &self,
        forwarder: tokio::sync::mpsc::Sender<crate::protocol::startup::CancelKey>,
    ) {
        let _ = self.forwarder.set(forwarder);
    }

    /// The live nodes as last seen (empty for a router that is no fleet's node).
    pub fn nodes(&self) -> Arc<NodeSet> {
        self.live.load_full()
    }

    /// How many nodes share the per-branch limits: the live set's size, at least 1.
    pub fn count(&self) -> NonZeroU32 {
        NonZeroU32::new(self.count.load(Ordering::Relaxed)).unwrap_or(NonZeroU32::MIN)
    }

    /// A branch's pool settings as this node enforces them: `[pool]` with the branch's
    /// overrides, its limits divided by the live node count ([`split`]).
    pub fn pool_settings(&self, global: &PoolSettings, overrides: &PoolOverrides) -> PoolSettings {
        split::split_pool(global.for_branch(overrides), self.count())
    }

    /// The registry saw this live set.
    pub(crate) fn set_nodes(&self, nodes: NodeSet) {
        let count = u32::try_from(nodes.nodes.len()).unwrap_or(u32::MAX).max(1);
        self.live.store(Arc::new(nodes));
        self.count.store(count, Ordering::Relaxed);
    }

    /// The node dealt with a catalog revision (applied or refused it): the registry writes
    /// `ack` to `<prefix>/acks/<id>`. Only the newest matters, so an unwritten one is replaced.
    pub(crate) fn acknowledge(&self, ack: Ack) {
        self.acks.send_replace(Some(ack));
    }

    /// The acknowledgements to write, for the registry.
    pub(crate) fn subscribe_acks(&self) -> watch::Receiver<Option<Ack>> {
        self.acks.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> NodeRecord {
        NodeRecord::new(id.parse().expect("id"), None)
    }

    #[test]
    fn the_count_follows_the_live_set_and_is_never_zero() {
        let fleet = Fleet::node("a".parse().expect("id"));
        assert_eq!(fleet.count().get(), 1, "before anything is seen");
        fleet.set_nodes(NodeSet {
            nodes: vec![record("a"), record("b")],
        });
        assert_eq!(fleet.count().get(), 2);
        assert_eq!(fleet.nodes().nodes.len(), 2);
        let global = PoolSettings {
            pool_size: NonZeroU32::new(4).expect("4"),
            ..PoolSettings::default()
        };
        let split = fleet.pool_settings(&global, &PoolOverrides::default());
        assert_eq!(split.pool_size.get(), 2);
        fleet.set_nodes(NodeSet::default());
        assert_eq!(fleet.count().get(), 1, "own entry not seen (etcd lost it)");
        assert_eq!(Fleet::single().count().get(), 1);
        assert_eq!(Fleet::single().id(), None);
    }
}
