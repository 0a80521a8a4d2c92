//! SQLSTATE codes the router itself reports in ErrorResponse (B).
//!
//! See <https://www.postgresql.org/docs/current/errcodes-appendix.html>.

use std::fmt;

/// A five-character SQLSTATE code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SqlState(&'static str);

impl SqlState {
    /// 00000 successful_completion (notices).
    pub const SUCCESSFUL_COMPLETION: Self = Self::new("00000");
    /// 25P03 idle_in_transaction_session_timeout.
    pub const IDLE_IN_TRANSACTION_SESSION_TIMEOUT: Self = Self::new("25P03");
    /// 57P05 idle_session_timeout.
    pub const IDLE_SESSION_TIMEOUT: Self = Self::new("57P05");
    /// 26000 invalid_sql_statement_name: no such prepared statement.
    pub const INVALID_SQL_STATEMENT_NAME: Self = Self::new("26000");
    /// 42P05 duplicate_prepared_statement.
    pub const DUPLICATE_PREPARED_STATEMENT: Self = Self::new("42P05");
    /// 54000 program_limit_exceeded.
    pub const PROGRAM_LIMIT_EXCEEDED: Self = Self::new("54000");
    /// 08000 connection_exception.
    pub const CONNECTION_EXCEPTION: Self = Self::new("08000");
    /// 08006 connection_failure: the backend could not be reached or went away.
    pub const CONNECTION_FAILURE: Self = Self::new("08006");
    /// 08P01 protocol_violation.
    pub const PROTOCOL_VIOLATION: Self = Self::new("08P01");
    /// 0A000 feature_not_supported.
    pub const FEATURE_NOT_SUPPORTED: Self = Self::new("0A000");
    /// 28000 invalid_authorization_specification: no TLS, unknown role for the branch.
    pub const INVALID_AUTHORIZATION_SPECIFICATION: Self = Self::new("28000");
    /// 28P01 invalid_password.
    pub const INVALID_PASSWORD: Self = Self::new("28P01");
    /// 3D000 invalid_catalog_name: unknown branch or database.
    pub const INVALID_CATALOG_NAME: Self = Self::new("3D000");
    /// 53300 too_many_connections.
    pub const TOO_MANY_CONNECTIONS: Self = Self::new("53300");
    /// 53200 out_of_memory: a bound of the router's memory was reached.
    pub const OUT_OF_MEMORY: Self = Self::new("53200");
    /// 57014 query_canceled.
    pub const QUERY_CANCELED: Self = Self::new("57014");
    /// 42601 syntax_error (an `options` startup parameter PostgreSQL cannot read).
    pub const SYNTAX_ERROR: Self = Self::new("42601");
    /// 57P01 admin_shutdown.
    pub const ADMIN_SHUTDOWN: Self = Self::new("57P01");
    /// 57P02 crash_shutdown.
    pub const CRASH_SHUTDOWN: Self = Self::new("57P02");
    /// 57P03 cannot_connect_now.
    pub const CANNOT_CONNECT_NOW: Self = Self::new("57P03");
    /// XX000 internal_error.
    pub const INTERNAL_ERROR: Self = Self::new("XX000");

    /// A code from its five characters (digits and upper-case ASCII letters).
    ///
    /// # Panics
    /// If `code` is not such a code; in a `const` that is a compile-time error.
    pub const fn new(code: &'static str) -> Self {
        let bytes = code.as_bytes();
        assert!(bytes.len() == 5, "SQLSTATE must be 5 characters");
        let mut i = 0;
        while i < bytes.len() {
            assert!(
                bytes[i].is_ascii_digit() || bytes[i].is_ascii_uppercase(),
                "SQLSTATE must be digits and upper-case letters"
            );
            i += 1;
        }
        Self(code)
    }

    /// The code as written on the wire.
    pub const fn as_str(self) -> &'static str {
        self.0
    }

    /// True if a server refusing a connection with `code` did so because of its own state, not
    /// the client's request: shutting down, crash recovery, starting up (57P01, 57P02, 57P03)
    /// or full (53300). Another server may well take the client.
    pub fn means_server_unavailable(code: &[u8]) -> bool {
        [
            Self::ADMIN_SHUTDOWN,
            Self::CRASH_SHUTDOWN,
            Self::CANNOT_CONNECT_NOW,
            Self::TOO_MANY_CONNECTIONS,
        ]
        .iter()
        .any(|known| known.as_str().as_bytes() == code)
    }
}

impl fmt::Display for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(SqlState::PROTOCOL_VIOLATION.as_str(), "08P01");
        assert_eq!(SqlState::INVALID_PASSWORD.to_string(), "28P01");
        assert_eq!(SqlState::new("42P01"), SqlState::new("42P01"));
    }

    #[test]
    #[should_panic(expected = "5 characters")]
    fn wrong_length_panics() {
        let _ = SqlState::new("0800");
    }

    #[test]
    #[should_panic(expected = "upper-case")]
    fn lower_case_panics() {
        let _ = SqlState::new("08p01");
    }
}
