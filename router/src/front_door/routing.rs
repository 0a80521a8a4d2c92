//! Step 2 of the front door: the StartupMessage, read over TLS and parsed in place, says where
//! the client wants to go; what the backend will be sent is built from it.
//!
//! Nothing here tells the client whether its branch or role exists: an unknown branch or role is
//! carried on to a SCRAM exchange that fails like a wrong password ([`super::auth`]).

use std::sync::Arc;

use crate::auth::verifier::ScramVerifier;
use crate::catalog::{self, Branch};
use crate::error::SessionError;
use crate::protocol::startup::{self, CancelKey, StartupPacket};
use crate::protocol::write;
use crate::route;
use crate::worker::Worker;

use super::conn::ClientConn;

/// Where a client asked to go, taken from its StartupMessage before the buffer is reused.
#[derive(Debug)]
pub struct Routed {
    /// The branch, if the catalog has it.
    pub branch: Option<Arc<Branch>>,
    /// The branch id the client named.
    pub branch_id: Box<str>,
    /// The role, as the backend will see it.
    pub role: Box<str>,
    /// `|replica` was asked for.
    pub replica: bool,
    /// The role's verifier, if the branch has the role.
    pub verifier: Option<Arc<ScramVerifier>>,
    /// The StartupMessage for the backend (user = bare role).
    pub backend_startup: Vec<u8>,
}

/// What the first packet over TLS was.
#[derive(Debug)]
pub enum Startup {
    /// A CancelRequest sent over TLS: nothing follows.
    Cancel(CancelKey),
    /// A StartupMessage.
    Session(Routed),
}

/// Reads the first packet over TLS. A StartupMessage asking for a newer protocol minor version
/// or for `_pq_.` options is answered with NegotiateProtocolVersion (queued in `out`).
pub async fn read_startup(
    worker: &Worker,
    conn: &mut ClientConn<'_>,
) -> Result<Startup, SessionError> {
    let len = loop {
        match startup::check_startup(conn.plain())? {
            Some(len) => break len,
            None => conn.read_more().await?,
        }
    };
    let (routed, mut negotiate) = match startup::parse_startup(&conn.plain()[..len])? {
        StartupPacket::Cancel(key) => return Ok(Startup::Cancel(key)),
        StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
            return Err(SessionError::Protocol("encryption request inside TLS"))
        }
        StartupPacket::Startup(message) => {
            let mut negotiate = Vec::new();
            if message.minor > 0 || message.protocol_options().next().is_some() {
                write::negotiate_protocol_version(
                    &mut negotiate,
                    startup::PROTOCOL_3_0,
                    message.protocol_options(),
                );
            }
            let user = message.user().ok_or(SessionError::NoUser)?;
            // The server name may stand in for the branch when it could be one; whether the
            // catalog has it is not asked, so the answer does not tell.
            let target = route::parse_user_or_sni(
                user,
                conn.handshake().sni.as_deref(),
                catalog::is_branch_id,
            )?;
            let catalog = worker.shared.catalog.load();
            let branch = catalog.branch(target.branch).cloned();
            let mut backend_startup = Vec::with_capacity(len);
            write::startup_message(
                &mut backend_startup,
                message.params().filter_map(|(name, value)| match name {
                    "user" => Some((name, target.role)),
                    // libpq defaults the database to the user name, which here carries the branch.
                    "database" if value == user => Some((name, target.role)),
                    _ if name.starts_with("_pq_.") => None,
                    _ => Some((name, value)),
                }),
            );
            let routed = Routed {
                verifier: branch
                    .as_ref()
                    .and_then(|branch| branch.role(target.role).cloned()),
                branch,
                branch_id: target.branch.into(),
                role: target.role.into(),
                replica: target.replica,
                backend_startup,
            };
            (routed, negotiate)
        }
    };
    conn.out().append(&mut negotiate);
    conn.consume_plain(len);
    Ok(Startup::Session(routed))
}
