//! Router errors seen by clients, and the one place that turns them into ErrorResponses.
//!
//! Every variant decides what the client may see: a SQLSTATE and a message written for users.
//! Internal details (addresses, I/O errors, which check failed inside SCRAM) stay in the log.

use std::borrow::Cow;

use crate::backend::BackendError;
use crate::protocol::sqlstate::SqlState;
use crate::protocol::startup::StartupError;
use crate::route::RouteError;
use crate::tls::TlsError;

/// Why a client connection ended before or instead of a normal relay.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A StartupMessage arrived without TLS.
    #[error("plaintext startup refused")]
    TlsRequired,
    /// Bytes followed an SSLRequest before the TLS handshake (a man-in-the-middle pattern).
    #[error("data pipelined after SSLRequest")]
    DataAfterSslRequest,
    /// Bytes followed a GSSENCRequest before its `N` answer was read (as PostgreSQL, refused).
    #[error("data pipelined after GSSENCRequest")]
    DataAfterGssEncRequest,
    /// The startup packet was malformed or too large.
    #[error("invalid startup packet: {0}")]
    Startup(#[from] StartupError),
    /// A protocol rule was broken after the startup packet.
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// The startup packet has no `user`.
    #[error("no user name in startup packet")]
    NoUser,
    /// The user name does not name a branch.
    #[error("{0}")]
    Route(#[from] RouteError),
    /// Wrong password, or a role or branch that does not exist (indistinguishable on purpose).
    #[error("password authentication failed for role {0:?}")]
    AuthFailed(Box<str>),
    /// A message other than a SASL response (its type byte) arrived during authentication.
    #[error("expected SASL response, got message type {0}")]
    ExpectedSaslResponse(u8),
    /// The client chose a SASL mechanism we did not offer.
    #[error("client selected an invalid SASL mechanism")]
    InvalidSaslMechanism,
    /// A SCRAM message from the client could not be parsed.
    #[error("malformed SCRAM message: {0}")]
    MalformedScram(crate::auth::scram::ScramError),
    /// `limits.max_client_connections` reached.
    #[error("too many client connections")]
    TooManyConnections,
    /// The branch has `[pool] max_client_connections` pooled clients already.
    #[error("branch {0:?} has max_client_connections pooled clients")]
    BranchFull(Box<str>),
    /// No replica of the branch is healthy.
    #[error("no healthy replica for branch {0:?}")]
    NoHealthyReplica(Box<str>),
    /// The backend could not be reached or refused us.
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
    /// PostgreSQL refused a value of the client's startup parameters (the pooled port asks a
    /// backend at login), or the router could not read its `options`: the FATAL is written.
    #[error("startup parameter refused (SQLSTATE {0})")]
    StartupParameter(crate::backend::ReceivedSqlState),
    /// The client did not finish startup and authentication in time.
    #[error("startup timeout")]
    StartupTimeout,
    /// The client did not send its first bytes and finish TLS within `timeouts.handshake`.
    #[error("no TLS within the handshake timeout")]
    HandshakeTimeout,
    /// The router's drain time ended while the client was still authenticating: as PostgreSQL
    /// during authentication, nothing is said but close_notify.
    #[error("shutting down")]
    DrainOver,
    /// The router ended an authenticated client's connection before its session began.
    #[error("terminated: {0:?}")]
    Terminated(KillReason),
    /// TLS failed (alerts were sent by rustls where the protocol says so).
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// The client closed the connection.
    #[error("client closed the connection")]
    ClientClosed,
    /// Socket error talking to the client.
    #[error("client I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// What a client is told about an error: an ErrorResponse's code, message and detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    /// The SQLSTATE.
    pub code: SqlState,
    /// The message, written for users.
    pub message: Cow<'static, str>,
    /// The detail line, where PostgreSQL sends one.
    pub detail: Option<&'static str>,
}

/// PostgreSQL's detail for unencrypted bytes after an encryption request.
const MAN_IN_THE_MIDDLE_DETAIL: &str = "This could be either a client-software bug or evidence \
                                        of an attempted man-in-the-middle attack.";

impl SessionError {
    /// What the client is told of this error, or `None` when nothing is sent (the connection
    /// is gone, or TLS is the layer that answers).
    pub fn to_wire(&self) -> Option<WireError> {
        use SessionError::*;
        let (code, message): (SqlState, Cow<'static, str>) = match self {
            TlsRequired => (
                SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                "TLS is required: connect with sslmode=require (or verify-full)".into(),
            ),
            DataAfterSslRequest => (
                SqlState::PROTOCOL_VIOLATION,
                "received unencrypted data after SSL request".into(),
            ),
            DataAfterGssEncRequest => (
                SqlState::PROTOCOL_VIOLATION,
                "received unencrypted data after GSSAPI encryption request".into(),
            ),
            Startup(StartupError::UnsupportedProtocol { major, minor }) => (
                SqlState::FEATURE_NOT_SUPPORTED,
                format!(
                    "unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
                )
                .into(),
            ),
            Startup(e) => (
                SqlState::PROTOCOL_VIOLATION,
                format!("invalid startup packet: {e}").into(),
            ),
            Protocol(what) => (SqlState::PROTOCOL_VIOLATION, Cow::Borrowed(*what)),
            NoUser => (
                SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                "no PostgreSQL user name specified in startup packet".into(),
            ),
            Route(e) => (
                SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                e.to_string().into(),
            ),
            AuthFailed(role) => (
                SqlState::INVALID_PASSWORD,
                format!("password authentication failed for user \"{role}\"").into(),
            ),
            // PostgreSQL's words, with the type byte in decimal (Terminate, 'X', is 88).
            ExpectedSaslResponse(tag) => (
                SqlState::PROTOCOL_VIOLATION,
                format!("expected SASL response, got message type {tag}").into(),
            ),
            InvalidSaslMechanism => (
                SqlState::PROTOCOL_VIOLATION,
                "client selected an invalid SASL authentication mechanism".into(),
            ),
            MalformedScram(_) => (
                SqlState::PROTOCOL_VIOLATION,
                "malformed SCRAM message".into(),
            ),
            TooManyConnections => (
                SqlState::TOO_MANY_CONNECTIONS,
                "sorry, too many clients already".into(),
            ),
            // PgBouncer's words for its own per-database limit.
            BranchFull(_) => (
                SqlState::TOO_MANY_CONNECTIONS,
                "no more connections allowed (max_client_connections)".into(),
            ),
            NoHealthyReplica(branch) => (
                SqlState::CONNECTION_FAILURE,
                format!("no healthy replica available for branch \"{branch}\"").into(),
            ),
            Backend(BackendError::Rejected(_)) | StartupParameter(_) => return None,
            Backend(_) => (
                SqlState::CONNECTION_FAILURE,
                "could not connect to the branch's database server".into(),
            ),
            StartupTimeout => (
                SqlState::PROTOCOL_VIOLATION,
                "timeout waiting for startup and authentication".into(),
            ),
            Terminated(reason) => {
                let (code, message) = reason.to_wire();
                (code, message.into())
            }
            Tls(_) | ClientClosed | Io(_) | HandshakeTimeout | DrainOver => return None,
        };
        let detail = match self {
            DataAfterSslRequest | DataAfterGssEncRequest => Some(MAN_IN_THE_MIDDLE_DETAIL),
            _ => None,
        };
        Some(WireError {
            code,
            message,
            detail,
        })
    }

    /// True for the errors PostgreSQL reports in plaintext, before any TLS (everything else
    /// is said over TLS or not at all).
    pub fn is_sent_before_tls(&self) -> bool {
        matches!(
            self,
            SessionError::TlsRequired
                | SessionError::DataAfterGssEncRequest
                | SessionError::Startup(_)
        )
    }
}

/// Why a live session is closed by the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillReason {
    /// The router is shutting down and the drain time is over.
    Shutdown,
    /// The role's password was reset (or the role removed from the catalog).
    PasswordReset,
}

impl KillReason {
    /// The FATAL error sent to the client.
    pub fn to_wire(self) -> (SqlState, &'static str) {
        match self {
            KillReason::Shutdown => (
                SqlState::ADMIN_SHUTDOWN,
                "terminating connection due to administrator command",
            ),
            KillReason::PasswordReset => (
                SqlState::ADMIN_SHUTDOWN,
                "terminating connection because the role's password was reset",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_user_facing_error_has_its_sqlstate() {
        let cases: Vec<(SessionError, &str)> = vec![
            (SessionError::TlsRequired, "28000"),
            (SessionError::DataAfterSslRequest, "08P01"),
            (SessionError::DataAfterGssEncRequest, "08P01"),
            (SessionError::Protocol("x"), "08P01"),
            (SessionError::NoUser, "28000"),
            (SessionError::AuthFailed("r".into()), "28P01"),
            (SessionError::InvalidSaslMechanism, "08P01"),
            (SessionError::ExpectedSaslResponse(b'X'), "08P01"),
            (SessionError::TooManyConnections, "53300"),
            (SessionError::BranchFull("b".into()), "53300"),
            (SessionError::NoHealthyReplica("b".into()), "08006"),
            (SessionError::StartupTimeout, "08P01"),
            (SessionError::Terminated(KillReason::Shutdown), "57P01"),
        ];
        for (error, code) in cases {
            let wire = error.to_wire().expect("user-facing");
            assert_eq!(wire.code.as_str(), code, "{error:?}");
            assert!(!wire.message.is_empty());
        }
        for silent in [
            SessionError::ClientClosed,
            SessionError::HandshakeTimeout,
            SessionError::DrainOver,
            // Written already: PostgreSQL's FATAL for the parameter.
            SessionError::StartupParameter(crate::backend::ReceivedSqlState::new("22023")),
        ] {
            assert!(silent.to_wire().is_none(), "{silent:?}");
        }
        assert_eq!(KillReason::Shutdown.to_wire().0.as_str(), "57P01");
        // PostgreSQL's detail for bytes sent behind an encryption request.
        let detail = SessionError::DataAfterSslRequest
            .to_wire()
            .and_then(|w| w.detail);
        assert_eq!(
            detail,
            Some(
                "This could be either a client-software bug or evidence of an attempted \
                 man-in-the-middle attack."
            )
        );
    }

    #[test]
    fn backend_details_stay_internal() {
        let error = SessionError::Backend(BackendError::Connect(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "10.1.2.3:5432 refused",
        )));
        let wire = error.to_wire().expect("user-facing");
        assert_eq!(wire.code.as_str(), "08006");
        assert!(!wire.message.contains("10.1.2.3"));
    }
}
