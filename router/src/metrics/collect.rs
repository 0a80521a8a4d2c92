//! A scrape: every worker's counts, each branch's and each backend address's, encoded as
//! OpenMetrics text by the Prometheus client.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::worker::Shared;

use super::{Counter, Histogram, PerPort, WorkerStats};

/// The router's metrics, read at each scrape.
pub struct RouterCollector {
    shared: Arc<Shared>,
}

impl RouterCollector {
    /// Reads `shared`'s counts at each scrape.
    pub fn new(shared: Arc<Shared>) -> Self {
        RouterCollector { shared }
    }
}

impl fmt::Debug for RouterCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RouterCollector")
    }
}

const PORTS: [&str; 2] = ["direct", "pooled"];

/// One metric family written from `values`: (labels, value) pairs.
fn family(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    values: impl IntoIterator<Item = (Vec<(&'static str, String)>, u64)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in values {
        let mut one = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => one.encode_counter::<NoLabelSet, _, u64>(&value, None)?,
            _ => one.encode_gauge(&value)?,
        }
    }
    Ok(())
}

/// One histogram family: (labels, histogram) pairs.
fn histograms<'h>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Vec<(&'static str, String)>, &'h Histogram)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, histogram) in values {
        let (sum, count, buckets) = histogram.snapshot();
        metric
            .encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}

fn worker_label(id: usize) -> Vec<(&'static str, String)> {
    vec![("worker", id.to_string())]
}

fn per_port<'s>(
    stats: &'s [Arc<WorkerStats>],
    field: impl Fn(&'s WorkerStats) -> &'s PerPort<Counter> + 's,
) -> impl Iterator<Item = (Vec<(&'static str, String)>, u64)> + 's {
    stats.iter().enumerate().flat_map(move |(id, s)| {
        let counters = field(s);
        PORTS.iter().zip(counters).map(move |(port, counter)| {
            (
                vec![("worker", id.to_string()), ("port", (*port).to_owned())],
                counter.get(),
            )
        })
    })
}

impl Collector for RouterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let stats = &self.shared.stats;
        let e = &mut encoder;
        family(
            e,
            "branchgate_connections_accepted",
            "Connections accepted",
            MetricType::Counter,
            per_port(stats, |s| &s.accepted),
        )?;
        family(
            e,
            "branchgate_proxy_headers_refused",
            "Connections from a balancer in [listen] proxy_from closed for want of a valid PROXY \
             protocol v2 header (malformed, cut short, or not complete within the handshake \
             timeout)",
            MetricType::Counter,
            per_port(stats, |s| &s.proxy_headers_refused),
        )?;
        family(
            e,
            "branchgate_logins",
            "Clients that logged in",
            MetricType::Counter,
            per_port(stats, |s| &s.logins),
        )?;
        family(
            e,
            "branchgate_client_connections",
            "Logged-in clients now",
            MetricType::Gauge,
            stats.iter().enumerate().flat_map(|(id, s)| {
                PORTS.iter().enumerate().map(move |(i, port)| {
                    (
                        vec![("worker", id.to_string()), ("port", (*port).to_owned())],
                        s.logins[i].get().saturating_sub(s.sessions_ended[i].get()),
                    )
                })
            }),
        )?;
        histograms(
            e,
            "branchgate_login_seconds",
            "From accept to the login answered (TLS, startup, SCRAM, and on the direct port the \
             backend's connect)",
            stats.iter().enumerate().flat_map(|(id, s)| {
                PORTS.iter().zip(&s.login_time).map(move |(port, h)| {
                    (
                        vec![("worker", id.to_string()), ("port", (*port).to_owned())],
                        h,
                    )
                })
            }),
        )?;
        family(
            e,
            "branchgate_backend_connections",
            "Backend connections now: one per direct session, and the pools' on the pooled port",
            MetricType::Gauge,
            stats.iter().enumerate().flat_map(|(id, s)| {
                let direct = s.logins[0].get().saturating_sub(s.sessions_ended[0].get());
                let pooled = s
                    .pool_backends_opened
                    .get()
                    .saturating_sub(s.pool_backends_closed.get());
                [("direct", direct), ("pooled", pooled)]
                    .into_iter()
                    .map(move |(port, n)| {
                        (
                            vec![("worker", id.to_string()), ("port", port.to_owned())],
                            n,
                        )
                    })
            }),
        )?;
        family(
            e,
            "branchgate_pooled_transactions",
            "Pooled transactions (a backend lent, then given back or closed)",
            MetricType::Counter,
            stats
                .iter()
                .enumerate()
                .map(|(id, s)| (worker_label(id), s.transactions.get())),
        )?;
        family(
            e,
            "branchgate_pooled_queries",
            "Simple queries and Executes sent by pooled clients",
            MetricType::Counter,
            stats
                .iter()
                .enumerate()
                .map(|(id, s)| (worker_label(id), s.queries.get())),
        )?;
        histograms(
            e,
            "branchgate_pooled_transaction_seconds",
            "How long a pooled transaction held its backend",
            stats
                .iter()
                .enumerate()
                .map(|(id, s)| (worker_label(id), &s.transaction_time)),
        )?;
        family(
            e,
            "branchgate_pool_waiting_clients",
            "Pooled clients waiting for a backend now (the wait queue)",
            MetricType::Gauge,
            stats.iter().enumerate().map(|(id, s)| {
                (
                    worker_label(id),
                    s.waits_started.get().saturating_sub(s.waits_ended.get()),
                )
            }),
        )?;
        histograms(
            e,
            "branchgate_pool_wait_seconds",
            "How long pooled clients waited for a backend",
            stats
                .iter()
                .enumerate()
                .map(|(id, s)| (worker_label(id), &s.wait_time)),
        )?;
        family(
            e,
            "branchgate_handoffs",
            "Authenticated clients handed over between workers, to the worker that owns their \
             branch: out (this worker gave one) and in (this worker took one)",
            MetricType::Counter,
            stats.iter().enumerate().flat_map(|(id, s)| {
                [("out", s.handoffs_out.get()), ("in", s.handoffs_in.get())]
                    .into_iter()
                    .map(move |(direction, n)| {
                        (
                            vec![
                                ("worker", id.to_string()),
                                ("direction", direction.to_owned()),
                            ],
                            n,
                        )
                    })
            }),
        )?;
        histograms(
            e,
            "branchgate_handoff_seconds",
            "Hand-offs a worker took over: from the accepting worker taking the socket out of its \
             runtime to the connection registered in the owner's, queue and wake-up included",
            stats
                .iter()
                .enumerate()
                .map(|(id, s)| (worker_label(id), &s.handoff_time)),
        )?;
        let branches = self.shared.branch_clients.snapshot();
        let branch = |id: &str| vec![("branch", id.to_owned())];
        family(
            e,
            "branchgate_branch_pooled_clients",
            "Pooled clients of each branch now, on all workers",
            MetricType::Gauge,
            branches
                .iter()
                .map(|b| (branch(&b.branch), u64::from(b.clients))),
        )?;
        family(
            e,
            "branchgate_branch_active_transactions",
            "Pooled transactions of each branch holding a backend now",
            MetricType::Gauge,
            branches
                .iter()
                .map(|b| (branch(&b.branch), u64::from(b.active))),
        )?;
        family(
            e,
            "branchgate_branch_paused",
            "1 while `branchgate pause` holds the branch's new transactions",
            MetricType::Gauge,
            branches
                .iter()
                .map(|b| (branch(&b.branch), u64::from(b.paused))),
        )?;
        match self.shared.steering.counters() {
            Some(Ok(counters)) => family(
                e,
                "branchgate_steering_choices",
                "New connections by what the eBPF steering program did (its per-CPU counters, \
                 summed): hit (a remembered client, to its branch's owner), miss (to the \
                 least-loaded worker), empty_slot and select_error (the kernel's hash chose)",
                MetricType::Counter,
                [
                    ("hit", counters.hit),
                    ("miss", counters.miss),
                    ("empty_slot", counters.empty_slot),
                    ("select_error", counters.select_error),
                ]
                .into_iter()
                .map(|(outcome, n)| (vec![("outcome", outcome.to_owned())], n)),
            )?,
            Some(Err(error)) => tracing::debug!(%error, "cannot read the steering counters"),
            None => {}
        }
        family(
            e,
            "branchgate_steering_moves",
            "Branch slots moved to a lighter worker by `rebalance`",
            MetricType::Counter,
            std::iter::once((Vec::new(), self.shared.steering.moves())),
        )?;
        let upstreams = self.shared.upstreams.snapshot();
        family(
            e,
            "branchgate_upstream_connections",
            "Connections to each backend address now (both ports, all workers)",
            MetricType::Gauge,
            upstreams
                .iter()
                .map(|(addr, active, _)| (vec![("backend", addr.to_string())], u64::from(*active))),
        )?;
        family(
            e,
            "branchgate_upstream_healthy",
            "1 while the backend address answers the health probe",
            MetricType::Gauge,
            upstreams.iter().map(|(addr, _, healthy)| {
                (vec![("backend", addr.to_string())], u64::from(*healthy))
            }),
        )?;
        // What each branch's pools and pooled clients are held to on this node: its settings
        // divided among the fleet's live nodes (crate::fleet::split).
        let catalog = self.shared.catalog.load();
        let limits: Vec<_> = catalog
            .branches()
            .map(|b| (b.id.to_string(), self.shared.pool_settings(&b.pool)))
            .collect();
        family(
            e,
            "branchgate_branch_pool_size",
            "The pool_size each branch's pools have on this node: the branch's (or [pool]'s) \
             divided among the fleet's live nodes, rounded up",
            MetricType::Gauge,
            limits
                .iter()
                .map(|(id, s)| (vec![("branch", id.clone())], u64::from(s.pool_size.get()))),
        )?;
        family(
            e,
            "branchgate_branch_max_client_connections",
            "The pooled clients each branch may have on this node ([pool] \
             max_client_connections divided among the fleet's live nodes); only branches that \
             have a limit",
            MetricType::Gauge,
            limits.iter().filter_map(|(id, s)| {
                let max = s.max_client_connections?;
                Some((vec![("branch", id.clone())], u64::from(max.get())))
            }),
        )?;
        let fleet = &self.shared.fleet;
        family(
            e,
            "branchgate_fleet_nodes",
            "Live nodes of the fleet this router sees in the etcd registry (itself included); \
             1 with a catalog file. Per-branch limits are divided by it",
            MetricType::Gauge,
            [(Vec::new(), u64::from(fleet.count().get()))],
        )?;
        // Cancels across nodes (crate::fleet::peer): zero on a router that does not forward.
        let peer = &fleet.peer_stats;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        family(
            e,
            "branchgate_fleet_cancels_sent",
            "Cancels that matched no session here, forwarded to another node (one per node)",
            MetricType::Counter,
            [(Vec::new(), load(&peer.sent))],
        )?;
        family(
            e,
            "branchgate_fleet_cancels_send_failed",
            "Forwarded cancels that could not be delivered to a node (refused, timed out)",
            MetricType::Counter,
            [(Vec::new(), load(&peer.send_failed))],
        )?;
        family(
            e,
            "branchgate_fleet_cancels_dropped",
            "Cancels not forwarded because too many forwards were under way",
            MetricType::Counter,
            [(Vec::new(), load(&peer.dropped))],
        )?;
        family(
            e,
            "branchgate_fleet_cancels_received",
            "Forwarded cancels received from other nodes with a valid MAC, timestamp and nonce",
            MetricType::Counter,
            [(Vec::new(), load(&peer.received))],
        )?;
        family(
            e,
            "branchgate_fleet_cancels_matched",
            "Forwarded cancels whose key matched a session here (its cancel went to the backend)",
            MetricType::Counter,
            [(Vec::new(), load(&peer.matched))],
        )?;
        family(
            e,
            "branchgate_fleet_cancels_rejected",
            "Messages on the peer port refused, by reason (malformed, bad_mac, stale, replay)",
            MetricType::Counter,
            crate::fleet::peer::PeerStats::REJECT_REASONS
                .iter()
                .zip(&peer.rejected)
                .map(|(reason, count)| (vec![("reason", (*reason).to_owned())], load(count))),
        )?;
        let source = &self.shared.catalog_source;
        let source_label = || vec![("source", source.kind().to_owned())];
        family(
            e,
            "branchgate_catalog_source_up",
            "1 while the catalog's source answers (etcd: the watch runs or the last read \
             succeeded; a file: always); at 0 the router serves with the catalog it has",
            MetricType::Gauge,
            [(source_label(), u64::from(source.is_up()))],
        )?;
        if let Some(revision) = source.revision() {
            family(
                e,
                "branchgate_catalog_revision",
                "The etcd revision the catalog in force was built from",
                MetricType::Gauge,
                [(source_label(), u64::try_from(revision).unwrap_or(0))],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The text format of one histogram named `h`, as `/metrics` encodes it.
    pub fn histogram_text(histogram: Arc<Histogram>) -> String {
        #[derive(Debug)]
        struct One(Arc<Histogram>);
        impl Collector for One {
            fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
                histograms(&mut encoder, "h", "a histogram", [(Vec::new(), &*self.0)])
            }
        }
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(One(histogram)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)
            .expect("a String takes any text");
        text
    }
}
