//! Why a `branchgate role` command failed.

use std::io;
use std::net::SocketAddr;

use crate::auth::scram::ScramError;
use crate::catalog::etcd::EtcdError;
use crate::catalog::CatalogError;
use crate::config::ConfigError;
use crate::fleet::acks::AckReport;

/// [`RoleError::NodesNotUpdated`]'s text: which routers refused it, which did not answer.
fn nodes_not_updated(report: &AckReport) -> String {
    let mut parts = Vec::new();
    for (node, why) in &report.refused {
        parts.push(format!("router {node} refused the catalog ({why})"));
    }
    if !report.missing.is_empty() {
        parts.push(format!(
            "{} did not acknowledge it in time: {}",
            if report.missing.len() == 1 {
                "router"
            } else {
                "routers"
            },
            report.missing.join(", ")
        ));
    }
    format!(
        "the role was changed on the server and in etcd, but not every live router applied it: \
         {}; until they do, they do not accept the new password (a refusal is lifted with \
         `branchgate reload --force` on that router)",
        parts.join("; ")
    )
}

/// Why a `branchgate role` command failed. The Display text is meant for an operator reading
/// `branchgate: <error>`; it never contains a password.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// The router configuration could not be read or is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The catalog could not be read or is invalid (nothing was changed anywhere).
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// Reading the catalog in etcd, or taking the role's lock there, failed (nothing was
    /// changed anywhere).
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The catalog has no branch with this id.
    #[error("{catalog}: no branch with id {branch:?}")]
    UnknownBranch {
        /// The catalog file, or the etcd URL.
        catalog: String,
        /// The requested branch id.
        branch: String,
    },
    /// `create` for a role the catalog already has on this branch.
    #[error(
        "branch {branch:?} already has role {role:?}; \
         use `branchgate role reset` to give it a new password"
    )]
    RoleExists {
        /// The branch id.
        branch: String,
        /// The role name.
        role: String,
    },
    /// `reset` for a role the catalog does not have on this branch.
    #[error("branch {branch:?} has no role {role:?}; use `branchgate role create` to add it")]
    UnknownRole {
        /// The branch id.
        branch: String,
        /// The role name.
        role: String,
    },
    /// The role name cannot be used in a catalog or as a client user name.
    #[error("role name {role:?} {reason}")]
    InvalidRoleName {
        /// The rejected name.
        role: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `BRANCHGATE_ADMIN_PASSWORD` is set but is not valid UTF-8.
    #[error("BRANCHGATE_ADMIN_PASSWORD is not valid UTF-8")]
    AdminPasswordNotUtf8,
    /// The TCP connection to the branch primary could not be opened.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The branch primary.
        addr: SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
    /// Reading from or writing to the branch primary failed.
    #[error("connection to {addr} failed: {source}")]
    Io {
        /// The branch primary.
        addr: SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
    /// The branch primary did not accept, read or answer within the admin timeout.
    #[error("{addr} did not answer within {seconds} s")]
    Timeout {
        /// The branch primary.
        addr: SocketAddr,
        /// The timeout that expired.
        seconds: u64,
    },
    /// The branch primary closed the connection in the middle of an exchange.
    #[error("{addr} closed the connection unexpectedly")]
    Closed {
        /// The branch primary.
        addr: SocketAddr,
    },
    /// The server wants a password for the admin user and `BRANCHGATE_ADMIN_PASSWORD` is unset.
    #[error(
        "{addr} asks for a password for admin user {user:?}: \
         set BRANCHGATE_ADMIN_PASSWORD"
    )]
    PasswordRequired {
        /// The branch primary.
        addr: SocketAddr,
        /// The admin user name.
        user: String,
    },
    /// The server asks for an authentication method other than SCRAM-SHA-256 (cleartext and
    /// MD5 would expose or weaken the admin password).
    #[error(
        "{addr} asks for {method} authentication, which branchgate refuses; \
         use scram-sha-256 (or trust/peer) for the admin user in pg_hba.conf"
    )]
    UnsupportedAuth {
        /// The branch primary.
        addr: SocketAddr,
        /// The method the server asked for.
        method: String,
    },
    /// The SCRAM exchange with the server failed on our side (bad server signature, malformed
    /// message, ...). A wrong admin password is a [`RoleError::Server`] error 28P01 instead.
    #[error("SCRAM authentication with {addr} failed: {source}")]
    Scram {
        /// The branch primary.
        addr: SocketAddr,
        /// What went wrong.
        source: ScramError,
    },
    /// The server sent something that does not follow the protocol.
    #[error("{addr} sent an invalid message: {reason}")]
    Protocol {
        /// The branch primary.
        addr: SocketAddr,
        /// What was wrong with it.
        reason: String,
    },
    /// The server answered with an ErrorResponse (failed login or failed statement).
    #[error("PostgreSQL error {code}: {message}")]
    Server {
        /// SQLSTATE, e.g. `28P01` or `42710`.
        code: String,
        /// The server's primary message.
        message: String,
    },
    /// The role was changed on the server, but writing the catalog failed: the router still
    /// has the old state. Running the same command again repairs it.
    #[error(
        "the role was changed on {primary} but the catalog was not updated: {source}; \
         fix that and run the same command again"
    )]
    CatalogNotUpdated {
        /// The branch primary that already has the new password.
        primary: SocketAddr,
        /// Why the catalog edit failed.
        source: CatalogError,
    },
    /// The role was changed on the server, but writing it to etcd failed: the routers still
    /// have the old state. Running the same command again repairs it.
    #[error(
        "the role was changed on {primary} but the catalog in etcd was not updated: {source}; \
         fix that and run the same command again"
    )]
    EtcdNotUpdated {
        /// The branch primary that already has the new password.
        primary: SocketAddr,
        /// Why the etcd write failed.
        source: EtcdError,
    },
    /// The role's key in etcd changed while the command ran (a writer that does not take the
    /// role's lock: an import, etcdctl), so the guarded write did not happen and the other
    /// change stands. `restored`: the server was given back the verifier the catalog has.
    #[error(
        "role {role:?} on branch {branch:?} was changed in etcd by someone else while this \
         command ran, so its new password was not written (the other change stands, no update \
         is lost); {}",
        if *restored {
            "the server was given back the catalog's password: run the command again for a new one"
        } else {
            "the server has this command's password, which the catalog does not: run \
             `branchgate role reset` again"
        }
    )]
    EtcdConflict {
        /// The branch id.
        branch: String,
        /// The role name.
        role: String,
        /// Whether the server has the catalog's verifier again.
        restored: bool,
    },
    /// The role was changed on the server and in the catalog, but the running router answered
    /// that it did not load the catalog (the reload guard refused it, the file is invalid) or
    /// did not answer in time: it still has the previous verifier, or none for a new role.
    #[error(
        "the role was changed on the server and in the catalog, but the running router did not \
         load it: {reason}; until it does, it does not accept the new password (fix that, then \
         run `branchgate reload`)"
    )]
    RouterNotUpdated {
        /// What the router answered, or why it could not be asked.
        reason: String,
    },
    /// The role was changed on the server and in etcd, but not every router live at the time
    /// applied it within `--wait`: some refused the catalog (their reload guard), some did
    /// not answer. Those keep the previous verifier until they apply a later catalog.
    #[error("{}", nodes_not_updated(report))]
    NodesNotUpdated {
        /// What each live router answered.
        report: AckReport,
    },
    /// The role was changed on the server and in etcd, but the routers' acknowledgements could
    /// not be read (etcd failed meanwhile): whether they applied it is unknown.
    #[error(
        "the role was changed on the server and in etcd, but whether the routers applied it is \
         unknown: {source}"
    )]
    AcksUnknown {
        /// Why the acknowledgements could not be read.
        source: EtcdError,
    },
    /// The new password could not be written to stdout; server and catalog were already changed.
    #[error(
        "cannot print the new password ({0}); the role was changed: \
         run `branchgate role reset` to get another password"
    )]
    Output(io::Error),
}
