//! Step 3 of the front door: SCRAM-SHA-256 with the client, against the role's verifier from
//! the catalog; the ClientKey recovered from the client's proof is kept for the backend.
//!
//! Every `role.branch` gets the same exchange. A role or branch the catalog does not have runs
//! it against a fake verifier ([`ScramVerifier::mock`]) of the branch's (or the catalog's)
//! shape, with a salt that is stable across restarts and routers, and fails like a wrong
//! password: 28P01. The fake verifier is derived for every login, real or not, so both cost
//! the same work.

use std::sync::Arc;

use crate::auth::scram::{self, ClientKey};
use crate::auth::verifier::ScramVerifier;
use crate::catalog::Branch;
use crate::error::SessionError;
use crate::protocol::frame::{self, FrameHeader};
use crate::protocol::frontend::SaslInitialResponse;
use crate::protocol::write;
use crate::worker::Worker;

use super::conn::ClientConn;
use super::routing::Routed;

/// Largest SASL message accepted from a client (PostgreSQL allows 65535; SCRAM needs < 1 KiB).
pub const MAX_AUTH_MESSAGE_BYTES: usize = 8 * 1024;

const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// A client that proved it knows the role's password, not yet told so.
#[derive(Debug)]
pub struct Authenticated {
    /// The branch.
    pub branch: Arc<Branch>,
    /// The role, as the backend sees it.
    pub role: Box<str>,
    /// `|replica` was asked for.
    pub replica: bool,
    /// The StartupMessage for the backend (user = bare role).
    pub backend_startup: Vec<u8>,
    /// Recovered from the client's proof; proves the router to the backend as this client.
    pub client_key: ClientKey,
    /// The server-final-message, sent with AuthenticationSASLFinal once the backend is ready.
    pub server_final: Vec<u8>,
    /// The verifier the client authenticated against.
    pub verifier: Arc<ScramVerifier>,
}

/// Runs SCRAM-SHA-256 with the client. Not cancel-safe.
pub async fn authenticate(
    worker: &Worker,
    conn: &mut ClientConn<'_>,
    routed: Routed,
) -> Result<Authenticated, SessionError> {
    let shape = match &routed.branch {
        Some(branch) => branch.mock_shape(),
        None => worker.shared.catalog.load().mock_shape(),
    };
    let mock = ScramVerifier::mock(
        &routed.branch_id,
        &routed.role,
        shape,
        &worker.shared.mock_secret,
    );
    let real = routed.verifier.clone();
    let verifier = real.as_deref().unwrap_or(&mock);

    write::auth_sasl(conn.out(), &[SCRAM_SHA_256]);
    conn.flush().await?;

    let header = expect_password_message(conn).await?;
    let state = {
        let body = frame::body(&conn.plain()[..header.len], header);
        let initial = SaslInitialResponse::parse(body)
            .map_err(|_| SessionError::Protocol("malformed SASLInitialResponse"))?;
        if initial.mechanism != SCRAM_SHA_256 {
            return Err(SessionError::InvalidSaslMechanism);
        }
        let (state, server_first) =
            scram::server_start(initial.data, verifier).map_err(SessionError::MalformedScram)?;
        write::auth_sasl_continue(conn.out(), &server_first);
        state
    };
    conn.consume_plain(header.len);
    conn.flush().await?;

    let header = expect_password_message(conn).await?;
    let body = frame::body(&conn.plain()[..header.len], header);
    let outcome = scram::server_finish(state, body);
    conn.consume_plain(header.len);
    let failed = || SessionError::AuthFailed(routed.role.clone());
    match outcome {
        Ok((client_key, server_final)) => match (routed.branch, real) {
            (Some(branch), Some(verifier)) => Ok(Authenticated {
                branch,
                role: routed.role,
                replica: routed.replica,
                backend_startup: routed.backend_startup,
                client_key,
                server_final,
                verifier,
            }),
            // A proof against the fake verifier would need a SHA-256 preimage.
            _ => Err(failed()),
        },
        Err(scram::ScramError::InvalidProof) => Err(failed()),
        Err(error) => Err(SessionError::MalformedScram(error)),
    }
}

async fn expect_password_message(conn: &mut ClientConn<'_>) -> Result<FrameHeader, SessionError> {
    let header = conn.read_frame(MAX_AUTH_MESSAGE_BYTES).await?;
    // As PostgreSQL, even a Terminate gets this answer (only an end of stream does not).
    match header.tag {
        b'p' => Ok(header),
        tag => Err(SessionError::ExpectedSaslResponse(tag)),
    }
}
