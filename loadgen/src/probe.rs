//! The check before a run: every target answers on every branch of `--branches` (once in all
//! if its user name has no `{branch}`), and in query mode runs every statement there. A broken
//! branch among good ones is found every time, not only when a random pick lands on it.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use crate::client::query::{Outcome, Protocol, Request, Statement};
use crate::client::ClientError;
use crate::modes::Local;
use crate::runtime::{join_all, Counters};
use crate::settings::Common;

/// Branches of one target checked at once.
const CONCURRENCY: usize = 16;

/// Why the check failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A target did not accept a connection.
    #[error("target '{target}' ({addr}){}: {error}", on_branch(.branch))]
    Unreachable {
        /// Its name.
        target: String,
        /// Its address.
        addr: SocketAddr,
        /// The branch tried, if the user name has `{branch}`.
        branch: Option<String>,
        /// Why (boxed: it is the largest error, and rare).
        error: Box<ClientError>,
    },
    /// A statement of the query file failed on a target.
    #[error("target '{target}'{}: query '{query}' failed: {message}", on_branch(.branch))]
    QueryFailed {
        /// The target.
        target: String,
        /// The branch tried, if the user name has `{branch}`.
        branch: Option<String>,
        /// The statement.
        query: String,
        /// The server's error.
        message: String,
    },
    /// The check's runtime state could not be set up.
    #[error("cannot start the pre-run check: {0}")]
    Start(io::Error),
}

/// `, branch 'b1'` for an error message, or nothing.
fn on_branch(branch: &Option<String>) -> String {
    branch
        .as_ref()
        .map_or_else(String::new, |b| format!(", branch '{b}'"))
}

/// The check's connection maker and the statements it runs.
struct Probe {
    local: Local,
    queries: Option<(Vec<Statement>, Protocol)>,
}

/// Checks the targets in order and, for each, its branches (a few at once); the first failure,
/// in that order, is the error. Runs inside a monoio runtime.
pub async fn check(
    common: Arc<Common>,
    queries: Option<(Vec<Statement>, Protocol)>,
) -> Result<(), ProbeError> {
    // Inside the runtime: Local starts a timer on it.
    let local =
        Local::new(common.clone(), Arc::new(Counters::default()), 0).map_err(ProbeError::Start)?;
    let probe = Rc::new(Probe { local, queries });
    for (index, target) in common.targets.iter().enumerate() {
        let branches: Vec<Option<String>> = if target.has_branch_placeholder() {
            common
                .branches
                .branches()
                .iter()
                .cloned()
                .map(Some)
                .collect()
        } else {
            vec![None]
        };
        for chunk in branches.chunks(CONCURRENCY) {
            let checks = chunk
                .iter()
                .map(|branch| monoio::spawn(check_one(probe.clone(), index, branch.clone())))
                .collect();
            for result in join_all(checks).await {
                result?;
            }
        }
    }
    Ok(())
}

async fn check_one(
    probe: Rc<Probe>,
    index: usize,
    branch: Option<String>,
) -> Result<(), ProbeError> {
    let common = &probe.local.common;
    let target = &common.targets[index];
    let unreachable = |error| ProbeError::Unreachable {
        target: target.name.clone(),
        addr: target.addr,
        branch: branch.clone(),
        error: Box::new(error),
    };
    let (mut conn, _) = probe
        .local
        .connect_to(index, branch.as_deref())
        .await
        .map_err(unreachable)?;
    let Some((queries, protocol)) = &probe.queries else {
        conn.terminate().await;
        return Ok(());
    };
    for (k, statement) in queries.iter().enumerate() {
        let (sql, params) = (&statement.sql, &statement.params);
        let mut request = match protocol {
            Protocol::Simple => Request::simple(sql),
            Protocol::Extended => Request::extended(sql, params),
            Protocol::Prepared => {
                let name = format!("probe{k}");
                conn.prepare(&name, sql).await.map_err(unreachable)?;
                Request::prepared(&name, params)
            }
        };
        let outcome = monoio::time::timeout(common.timeout, conn.run(&mut request))
            .await
            .map_err(|_| unreachable(ClientError::Timeout))?
            .map_err(unreachable)?;
        if let Outcome::Failed(message) = outcome {
            return Err(ProbeError::QueryFailed {
                target: target.name.clone(),
                branch: branch.clone(),
                query: sql.to_owned(),
                message,
            });
        }
    }
    conn.terminate().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_branch() {
        let error = ProbeError::QueryFailed {
            target: "bg".into(),
            branch: Some("b2".into()),
            query: "SELECT 1".into(),
            message: "XX000: no".into(),
        };
        assert_eq!(
            error.to_string(),
            "target 'bg', branch 'b2': query 'SELECT 1' failed: XX000: no"
        );
        let error = ProbeError::Unreachable {
            target: "pg".into(),
            addr: "127.0.0.1:5".parse().expect("addr"),
            branch: None,
            error: Box::new(ClientError::Closed),
        };
        assert_eq!(
            error.to_string(),
            "target 'pg' (127.0.0.1:5): server closed the connection"
        );
    }
}
