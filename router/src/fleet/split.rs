//! Per-branch limits that hold fleet-wide: each node enforces its share.
//!
//! A branch's `pool_size`, `min_pool_size` and pooled `max_client_connections` are meant for the
//! branch, whichever node its clients reach. With `n` live nodes each node enforces
//! `ceil(limit / n)`, at least 1 (a limit of 0, where 0 means "none", stays 0):
//!
//! - Rounding up means the fleet may go over the limit by less than `n` (pool_size 5 over 2
//!   nodes: 3 + 3 = 6), never under it; rounding down would starve a branch whose limit is
//!   smaller than the node count (pool_size 2 over 3 nodes would be 0), and a limit is a
//!   protection for the server, not an exact budget.
//! - The split assumes the balancer spreads a branch's clients evenly; a branch whose clients
//!   all reach one node gets only that node's share there. That is the price of not
//!   coordinating per connection (which would put etcd on the login path).
//! - The node count is the registry's live set, so it moves when nodes join or leave (a dead
//!   node leaves when its lease expires). Pools take the new share at their next transaction or
//!   maintenance round, as after a reload that changed `pool_size`.

use std::num::NonZeroU32;

use crate::config::PoolSettings;

/// One node's share of a fleet-wide `limit` over `nodes` live nodes: `ceil(limit / nodes)`,
/// and never 0 for a limit that is not 0.
pub fn share(limit: u32, nodes: NonZeroU32) -> u32 {
    limit.div_ceil(nodes.get())
}

/// [`share`] of a non-zero limit (at least 1).
pub fn share_non_zero(limit: NonZeroU32, nodes: NonZeroU32) -> NonZeroU32 {
    NonZeroU32::new(share(limit.get(), nodes)).unwrap_or(NonZeroU32::MIN)
}

/// A branch's pool settings as one node of `nodes` enforces them: `pool_size`,
/// `min_pool_size` (kept at most the `pool_size` share) and `max_client_connections`
/// divided; the rest as they are.
pub fn split_pool(settings: PoolSettings, nodes: NonZeroU32) -> PoolSettings {
    if nodes.get() == 1 {
        return settings;
    }
    let pool_size = share_non_zero(settings.pool_size, nodes);
    PoolSettings {
        pool_size,
        min_pool_size: share(settings.min_pool_size, nodes).min(pool_size.get()),
        max_client_connections: settings
            .max_client_connections
            .map(|max| share_non_zero(max, nodes)),
        ..settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("non-zero")
    }

    #[test]
    fn shares_round_up_and_never_reach_zero() {
        // (limit, nodes, share)
        for (limit, nodes, expected) in [
            (4, 1, 4),
            (4, 2, 2),
            (5, 2, 3),
            (4, 3, 2),
            (2, 3, 1),
            (1, 5, 1),
            (0, 3, 0),
            (20, 3, 7),
            (u32::MAX, 2, u32::MAX / 2 + 1),
        ] {
            assert_eq!(share(limit, n(nodes)), expected, "{limit} over {nodes}");
        }
        assert_eq!(share_non_zero(n(1), n(4)), n(1));
        assert_eq!(share_non_zero(n(9), n(4)), n(3));
    }

    #[test]
    fn pool_settings_split_their_limits_only() {
        let settings = PoolSettings {
            pool_size: n(4),
            min_pool_size: 3,
            max_client_connections: Some(n(10)),
            ..PoolSettings::default()
        };
        assert_eq!(split_pool(settings, n(1)), settings, "one node: unchanged");
        let two = split_pool(settings, n(2));
        assert_eq!(
            (two.pool_size, two.min_pool_size, two.max_client_connections),
            (n(2), 2, Some(n(5)))
        );
        assert_eq!(two.query_wait_timeout, settings.query_wait_timeout);
        assert_eq!(two.server_lifetime, settings.server_lifetime);
        let many = split_pool(settings, n(8));
        assert_eq!(
            (
                many.pool_size,
                many.min_pool_size,
                many.max_client_connections
            ),
            (n(1), 1, Some(n(2)))
        );
        let unlimited = PoolSettings {
            max_client_connections: None,
            min_pool_size: 0,
            ..settings
        };
        let split = split_pool(unlimited, n(3));
        assert_eq!(
            (split.max_client_connections, split.min_pool_size),
            (None, 0)
        );
    }
}
