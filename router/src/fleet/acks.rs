//! What `branchgate role create|reset` waits for after its write at revision R: every node
//! live at that moment (its entry under `<prefix>/nodes/`) acknowledging a revision >= R under
//! `<prefix>/acks/`, within a timeout.
//!
//! A node whose reload guard refused the catalog acknowledges the revision with the refusal,
//! so the command learns of it at once and reports it, instead of waiting for the timeout. A
//! node that leaves meanwhile (its lease expired or was revoked) is no longer waited for. A
//! node that joins meanwhile is not waited for either: it read a catalog newer than R.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use etcd_client::{EventType, GetOptions, Txn, TxnOp, TxnOpResponse};

use super::node::Ack;
use crate::catalog::etcd::{EtcdError, Store};

/// What became of each node live when the command wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckReport {
    /// Nodes that applied revision R or a later one.
    pub applied: Vec<String>,
    /// Nodes that refused it, with why (they keep their catalog).
    pub refused: Vec<(String, String)>,
    /// Nodes that did not acknowledge it in time.
    pub missing: Vec<String>,
    /// Nodes that left the fleet before acknowledging it.
    pub left: Vec<String>,
}

impl AckReport {
    /// Every node live at the write has the change in force (or has left).
    pub fn complete(&self) -> bool {
        self.refused.is_empty() && self.missing.is_empty()
    }
}

/// The nodes being waited for and the newest acknowledgement of each.
#[derive(Debug, Default)]
struct Waiting {
    /// Node ids live at the write, not left since.
    nodes: BTreeSet<String>,
    /// Node id -> its acknowledgement.
    acks: BTreeMap<String, Ack>,
    /// Nodes that left.
    left: Vec<String>,
}

impl Waiting {
    /// The report if every node is settled for revision `revision` (applied or refused), or
    /// with `timed_out` whatever is known (the unsettled ones missing).
    fn report(&self, revision: i64, timed_out: bool) -> Option<AckReport> {
        let mut report = AckReport {
            left: self.left.clone(),
            ..AckReport::default()
        };
        for node in &self.nodes {
            match self.acks.get(node).filter(|ack| ack.revision >= revision) {
                Some(Ack { refused: None, .. }) => report.applied.push(node.clone()),
                Some(Ack {
                    refused: Some(why), ..
                }) => report.refused.push((node.clone(), why.clone())),
                None if timed_out => report.missing.push(node.clone()),
                None => return None,
            }
        }
        Some(report)
    }
}

/// Waits (at most `timeout`) until every node live now has acknowledged `revision`.
pub async fn wait_for_acks(
    store: &mut Store,
    revision: i64,
    timeout: Duration,
) -> Result<AckReport, EtcdError> {
    let layout = store.layout().clone();
    let (nodes_prefix, acks_prefix) = (layout.nodes_prefix(), layout.acks_prefix());
    // Both ranges at one revision, so the watch after misses nothing in between.
    let txn = Txn::new().and_then([
        TxnOp::get(nodes_prefix.clone(), Some(GetOptions::new().with_prefix())),
        TxnOp::get(acks_prefix.clone(), Some(GetOptions::new().with_prefix())),
    ]);
    let mut client = store.client();
    let response = store.timed(client.txn(txn)).await?;
    let read_at = response.header().map_or(0, |h| h.revision());
    let mut waiting = Waiting::default();
    let mut gets = response
        .op_responses()
        .into_iter()
        .filter_map(|op| match op {
            TxnOpResponse::Get(get) => Some(get),
            _ => None,
        });
    if let Some(nodes) = gets.next() {
        for kv in nodes.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            if let Some(id) = key.strip_prefix(&nodes_prefix) {
                waiting.nodes.insert(id.to_owned());
            }
        }
    }
    if let Some(acks) = gets.next() {
        for kv in acks.kvs() {
            note_ack(&mut waiting, &acks_prefix, kv.key(), kv.value());
        }
    }
    if let Some(report) = waiting.report(revision, false) {
        return Ok(report);
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut watch =
        match tokio::time::timeout_at(deadline, store.watch_prefix(&layout.root(), read_at + 1))
            .await
        {
            Ok(watch) => watch?,
            Err(_) => return Ok(waiting.report(revision, true).unwrap_or_default()),
        };
    loop {
        let message = match tokio::time::timeout_at(deadline, watch.message()).await {
            Ok(message) => message.map_err(|e| store.stream_error(e))?,
            Err(_) => return Ok(waiting.report(revision, true).unwrap_or_default()),
        };
        let Some(response) = message else {
            let closed = etcd_client::Error::WatchError("the watch stream ended".into());
            return Err(store.stream_error(closed));
        };
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            match event.event_type() {
                EventType::Put => note_ack(&mut waiting, &acks_prefix, kv.key(), kv.value()),
                EventType::Delete => {
                    let key = String::from_utf8_lossy(kv.key());
                    if let Some(id) = key.strip_prefix(&nodes_prefix) {
                        if waiting.nodes.remove(id) {
                            waiting.left.push(id.to_owned());
                        }
                    }
                }
            }
        }
        if let Some(report) = waiting.report(revision, false) {
            return Ok(report);
        }
    }
}

/// Records the acknowledgement at `key`, if it is one (other keys under the prefix are
/// ignored, as are acknowledgements that cannot be read: that node stays unsettled).
fn note_ack(waiting: &mut Waiting, acks_prefix: &str, key: &[u8], value: &[u8]) {
    let key = String::from_utf8_lossy(key);
    let Some(id) = key.strip_prefix(acks_prefix) else {
        return;
    };
    match Ack::decode(&key, value) {
        Ok(ack) => {
            waiting.acks.insert(id.to_owned(), ack);
        }
        Err(error) => tracing::warn!(%error, "ignoring an unreadable acknowledgement"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(revision: i64, refused: Option<&str>) -> Ack {
        Ack {
            revision,
            refused: refused.map(str::to_owned),
        }
    }

    #[test]
    fn a_report_waits_for_every_live_node() {
        let mut waiting = Waiting {
            nodes: ["a", "b", "c"].map(str::to_owned).into(),
            ..Waiting::default()
        };
        assert_eq!(waiting.report(10, false), None, "nothing acknowledged");
        waiting.acks.insert("a".into(), ack(12, None));
        waiting.acks.insert("b".into(), ack(9, None));
        assert_eq!(waiting.report(10, false), None, "b is behind, c silent");
        let timed_out = waiting.report(10, true).expect("at the timeout");
        assert_eq!(timed_out.applied, ["a"]);
        assert_eq!(timed_out.missing, ["b", "c"]);
        assert!(!timed_out.complete());

        waiting
            .acks
            .insert("b".into(), ack(10, Some("removes every branch (1 of 1)")));
        waiting.nodes.remove("c");
        waiting.left.push("c".into());
        let report = waiting.report(10, false).expect("settled");
        assert_eq!(report.applied, ["a"]);
        assert_eq!(
            report.refused,
            [("b".to_owned(), "removes every branch (1 of 1)".to_owned())]
        );
        assert_eq!(report.left, ["c"]);
        assert!(!report.complete());

        waiting.acks.insert("b".into(), ack(11, None));
        let report = waiting.report(10, false).expect("settled");
        assert_eq!(report.applied, ["a", "b"]);
        assert!(report.complete());
        assert!(Waiting::default()
            .report(5, false)
            .expect("no node")
            .complete());
    }
}
