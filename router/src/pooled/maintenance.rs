//! A worker's pools looked after: between transactions (idle and old backends closed,
//! `min_pool_size` kept, settings and forgotten branches taken from the catalog) and when the
//! worker stops.

use std::rc::Rc;
use std::time::Duration;

use crate::throttle::LogThrottle;
use crate::worker::Worker;

use super::context;
use super::pool;

/// How often a worker looks after its pools: idle and old backends closed, `min_pool_size`
/// kept, settings taken from the catalog.
pub const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(1);

/// Logs pre-warming failures (one per pool and interval while a backend is down).
static PREWARM_FAILED: LogThrottle = LogThrottle::new();

/// Looks after the worker's pools until the worker stops: closes idle backends past
/// `server_idle_timeout` or `server_lifetime` or whose role's password changed, opens backends
/// up to `min_pool_size`, and forgets pools of branches and roles gone from the catalog.
pub async fn maintain(worker: Rc<Worker>) {
    loop {
        monoio::time::sleep(MAINTENANCE_INTERVAL).await;
        maintain_once(&worker).await;
    }
}

/// Closes the idle backends of every pool of a stopping worker, each with a Terminate.
pub async fn close_pools(worker: &Worker) {
    let idle = worker.pools.take_idle_all();
    if idle.is_empty() {
        return;
    }
    let closing: Vec<_> = idle
        .into_iter()
        .map(|backend| monoio::spawn(pool::say_goodbye(backend)))
        .collect();
    for done in closing {
        done.await;
    }
}

/// One round of [`maintain`].
pub async fn maintain_once(worker: &Rc<Worker>) {
    let catalog = worker.shared.catalog.load_full();
    for pool in worker.pools.all() {
        let Some(branch) = catalog.branch(&pool.key.branch) else {
            continue;
        };
        pool.set_settings(worker.shared.config.pool.for_branch(&branch.pool));
        let ctx = context(worker, &branch.primary, &catalog);
        let closed = pool.sweep(&ctx);
        if closed > 0 {
            tracing::debug!(
                branch = %pool.key.branch,
                role = %pool.key.role,
                closed,
                "idle backends closed"
            );
        }
        for _ in 0..pool.missing() {
            if let Err(error) = pool.prewarm(&ctx).await {
                if let Some(suppressed) = PREWARM_FAILED.allow() {
                    tracing::warn!(
                        branch = %pool.key.branch,
                        role = %pool.key.role,
                        %error,
                        suppressed,
                        "opening a backend for min_pool_size failed"
                    );
                }
                break;
            }
        }
    }
    worker.pools.forget_unused(&catalog);
}
