//! A backend for a pooled client's next transaction: held back while its branch is paused,
//! waiting out an unreachable primary (failover buffering), and a NOTICE for a client that
//! waits longer than `query_wait_notify`.

use std::rc::Rc;
use std::time::Duration;

use monoio::time::Instant;

use crate::protocol::sqlstate::SqlState;
use crate::protocol::write;
use crate::throttle::LogThrottle;
use crate::worker::Worker;

use super::pool::{AcquireError, Backend, Pool};
use super::{context, send_plain, Client, End, BACKEND_FAILED};

/// The notice's text: PgBouncer's own words (1.25, `query_wait_notify`), which scripts and
/// monitoring written for PgBouncer may look for.
const QUEUED_NOTICE: &str =
    "No server connection available in postgres backend, client being queued";

/// Takes a backend from the pool for the client's transaction and gives it the client's
/// parameters. A client waiting longer than `query_wait_notify` is told so.
pub(super) async fn acquire(
    worker: &Rc<Worker>,
    client: &mut Client,
    pool: &Pool,
    settings: crate::config::PoolSettings,
) -> Result<Backend, End> {
    let _waiting = worker.stats.wait();
    let deadline = Instant::now() + settings.query_wait_timeout;
    let notice_at = settings
        .query_wait_notify
        .map(|after| Instant::now() + after);
    let entry = client.branch.entry.clone();
    let acquiring = async {
        loop {
            // `branchgate pause`: new transactions wait until `resume` (or their deadline).
            while entry.paused() {
                if Instant::now() >= deadline {
                    return Err(AcquireError::WaitTimeout);
                }
                Box::pin(monoio::time::sleep(PAUSE_POLL)).await;
            }
            // The primary as the catalog names it now (a failover may have changed it).
            let catalog = worker.shared.catalog.load_full();
            let Some(branch) = catalog.branch(&pool.key.branch) else {
                return Err(AcquireError::NoCredentials);
            };
            // A reload may have changed the branch's pool settings.
            pool.set_settings(worker.shared.pool_settings(&branch.pool));
            let ctx = context(worker, &branch.primary, &catalog);
            match pool.acquire(&ctx, deadline).await {
                Err(AcquireError::Connect { error, .. })
                    if unavailable(&error) && Instant::now() + FAILOVER_RETRY < deadline =>
                {
                    // Failover buffering: the client has sent nothing anywhere yet, so it
                    // can wait for the primary to come back, or for the catalog to name a
                    // new one, and nothing runs twice.
                    if let Some(suppressed) = BUFFERING.allow() {
                        tracing::warn!(
                            branch = %pool.key.branch,
                            primary = %branch.primary,
                            %error,
                            suppressed,
                            "primary unreachable: new transactions wait for it (query_wait_timeout)"
                        );
                    }
                    drop(catalog);
                    Box::pin(monoio::time::sleep(FAILOVER_RETRY)).await;
                }
                other => return other,
            }
        }
    };
    let mut acquiring = std::pin::pin!(acquiring);
    let mut noticed = false;
    let acquired = loop {
        let notice = async {
            match notice_at {
                Some(at) if !noticed => monoio::time::sleep_until(at).await,
                _ => std::future::pending::<()>().await,
            }
        };
        // In this order: a backend at hand is taken before the notice's timer is even set.
        monoio::select! {
            biased;
            acquired = &mut acquiring => break acquired,
            reason = client.handle.kill.wait() => return Err(End::Killed(reason)),
            () = notice => {
                noticed = true;
                let mut notice = Vec::new();
                write::notice_response(
                    &mut notice,
                    SqlState::SUCCESSFUL_COMPLETION,
                    QUEUED_NOTICE,
                );
                send_plain(client, &notice).await?;
            }
        }
    };
    match acquired {
        Ok(backend) => Ok(backend),
        Err(AcquireError::WaitTimeout) => Err(End::Fatal(
            SqlState::TOO_MANY_CONNECTIONS,
            "query_wait_timeout",
        )),
        Err(AcquireError::Connect { error, to_client }) => {
            if let Some(suppressed) = BACKEND_FAILED.allow() {
                tracing::warn!(branch = %pool.key.branch, %error, suppressed, "backend connection failed");
            }
            if to_client.is_empty() {
                Err(End::Fatal(
                    SqlState::CONNECTION_FAILURE,
                    "could not connect to the branch's server",
                ))
            } else {
                // The backend's own ErrorResponse (its FATAL), then the end.
                let _ = send_plain(client, &to_client).await;
                Err(End::BackendFailed)
            }
        }
        Err(AcquireError::NoCredentials) => Err(End::Fatal(
            SqlState::CONNECTION_FAILURE,
            "could not connect to the branch's server",
        )),
    }
}

/// How often a transaction held back by `branchgate pause` looks whether it may go.
const PAUSE_POLL: Duration = Duration::from_millis(10);
/// How long a transaction waits before trying an unreachable primary again.
const FAILOVER_RETRY: Duration = Duration::from_millis(250);
/// Logs transactions held back by an unreachable primary.
static BUFFERING: LogThrottle = LogThrottle::new();

/// True for failures that mean the server is not there now (down, restarting, being promoted),
/// not that it refused this client.
pub(super) fn unavailable(error: &crate::backend::BackendError) -> bool {
    use crate::backend::BackendError;
    match error {
        BackendError::Connect(_)
        | BackendError::Timeout
        | BackendError::Closed
        | BackendError::Io(_) => true,
        BackendError::Rejected(code) => code.server_unavailable(),
        _ => false,
    }
}
