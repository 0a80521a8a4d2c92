//! Messages the server sends (B) that the router decodes, and the backend type bytes.
//!
//! Everything not decoded here is forwarded as a raw frame.

mod auth;
mod error;

pub use auth::{auth_code, sasl_mechanisms, Authentication};
pub use error::ErrorFields;

use super::reader::{DecodeError, Reader};

/// Authentication* (B): every authentication request and outcome.
pub const AUTHENTICATION: u8 = b'R';
/// BackendKeyData (B).
pub const BACKEND_KEY_DATA: u8 = b'K';
/// BindComplete (B).
pub const BIND_COMPLETE: u8 = b'2';
/// CloseComplete (B).
pub const CLOSE_COMPLETE: u8 = b'3';
/// CommandComplete (B).
pub const COMMAND_COMPLETE: u8 = b'C';
/// CopyBothResponse (B).
pub const COPY_BOTH_RESPONSE: u8 = b'W';
/// CopyData (B, and F).
pub const COPY_DATA: u8 = b'd';
/// CopyDone (B, and F).
pub const COPY_DONE: u8 = b'c';
/// CopyInResponse (B).
pub const COPY_IN_RESPONSE: u8 = b'G';
/// CopyOutResponse (B).
pub const COPY_OUT_RESPONSE: u8 = b'H';
/// DataRow (B).
pub const DATA_ROW: u8 = b'D';
/// EmptyQueryResponse (B).
pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
/// ErrorResponse (B).
pub const ERROR_RESPONSE: u8 = b'E';
/// FunctionCallResponse (B).
pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
/// NegotiateProtocolVersion (B).
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
/// NoData (B).
pub const NO_DATA: u8 = b'n';
/// NoticeResponse (B).
pub const NOTICE_RESPONSE: u8 = b'N';
/// NotificationResponse (B).
pub const NOTIFICATION_RESPONSE: u8 = b'A';
/// ParameterDescription (B).
pub const PARAMETER_DESCRIPTION: u8 = b't';
/// ParameterStatus (B).
pub const PARAMETER_STATUS: u8 = b'S';
/// ParseComplete (B).
pub const PARSE_COMPLETE: u8 = b'1';
/// PortalSuspended (B).
pub const PORTAL_SUSPENDED: u8 = b's';
/// ReadyForQuery (B).
pub const READY_FOR_QUERY: u8 = b'Z';
/// RowDescription (B).
pub const ROW_DESCRIPTION: u8 = b'T';

/// BackendKeyData (B), protocol 3.0 (4-byte secret).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendKeyData {
    /// Process id of the backend.
    pub pid: u32,
    /// Secret key for CancelRequest.
    pub secret: u32,
}

impl BackendKeyData {
    /// Parses the body of a `K` message.
    pub fn parse(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let key = Self {
            pid: r.u32()?,
            secret: r.u32()?,
        };
        r.finish()?;
        Ok(key)
    }
}

/// ParameterStatus (B).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParameterStatus<'a> {
    /// Run-time parameter name.
    pub name: &'a str,
    /// Its current value.
    pub value: &'a str,
}

impl<'a> ParameterStatus<'a> {
    /// Parses the body of an `S` message from the server.
    pub fn parse(body: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let status = Self {
            name: r.cstr_utf8()?,
            value: r.cstr_utf8()?,
        };
        r.finish()?;
        Ok(status)
    }
}

/// The transaction status in ReadyForQuery (B); it decides when a pooled backend is free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransactionStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block (queries rejected until it ends).
    Failed,
}

impl TransactionStatus {
    /// Parses the body of a `Z` message.
    pub fn parse(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let status = Self::from_byte(r.u8()?)?;
        r.finish()?;
        Ok(status)
    }

    /// The status for its wire byte.
    pub fn from_byte(byte: u8) -> Result<Self, DecodeError> {
        match byte {
            b'I' => Ok(Self::Idle),
            b'T' => Ok(Self::InTransaction),
            b'E' => Ok(Self::Failed),
            other => Err(DecodeError::InvalidTransactionStatus(other)),
        }
    }

    /// The wire byte.
    pub fn byte(self) -> u8 {
        match self {
            Self::Idle => b'I',
            Self::InTransaction => b'T',
            Self::Failed => b'E',
        }
    }
}

impl From<TransactionStatus> for u8 {
    fn from(status: TransactionStatus) -> u8 {
        status.byte()
    }
}

/// NegotiateProtocolVersion (B).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NegotiateProtocolVersion<'a> {
    /// Newest protocol version the server supports for the requested major version, as a whole
    /// version number (`3 << 16 | minor`): what PostgreSQL sends, whatever the documentation's
    /// "minor version" suggests.
    pub newest_version: u32,
    /// Number of protocol options the server did not recognise.
    pub unsupported_count: u32,
    /// Their names, NUL-terminated one after another, validated; see [`Self::unsupported`].
    unsupported: &'a [u8],
}

impl<'a> NegotiateProtocolVersion<'a> {
    /// Parses the body of a `v` message.
    pub fn parse(body: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let newest_version = r.u32()?;
        let unsupported_count = r.u32()?;
        let unsupported = r.rest();
        let mut names = Reader::new(unsupported);
        for _ in 0..unsupported_count {
            names.cstr_utf8()?;
        }
        names.finish()?;
        Ok(Self {
            newest_version,
            unsupported_count,
            unsupported,
        })
    }

    /// Names of the protocol options the server did not recognise.
    pub fn unsupported(&self) -> impl Iterator<Item = &'a str> + Clone {
        let mut r = Reader::new(self.unsupported);
        std::iter::from_fn(move || r.cstr_utf8().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_key_data_and_parameter_status() {
        assert_eq!(
            BackendKeyData::parse(b"\x00\x00\x30\x39\xde\xad\xbe\xef"),
            Ok(BackendKeyData {
                pid: 12345,
                secret: 0xdead_beef
            })
        );
        assert_eq!(
            BackendKeyData::parse(&[0; 12]),
            Err(DecodeError::TrailingBytes)
        );
        assert_eq!(BackendKeyData::parse(&[0; 7]), Err(DecodeError::Truncated));
        assert_eq!(
            ParameterStatus::parse(b"TimeZone\0Etc/UTC\0"),
            Ok(ParameterStatus {
                name: "TimeZone",
                value: "Etc/UTC"
            })
        );
        assert_eq!(
            ParameterStatus::parse(b"TimeZone\0"),
            Err(DecodeError::MissingNul)
        );
    }

    #[test]
    fn ready_for_query_status() {
        assert_eq!(TransactionStatus::parse(b"I"), Ok(TransactionStatus::Idle));
        assert_eq!(
            TransactionStatus::parse(b"T"),
            Ok(TransactionStatus::InTransaction)
        );
        assert_eq!(
            TransactionStatus::parse(b"E"),
            Ok(TransactionStatus::Failed)
        );
        assert_eq!(
            TransactionStatus::parse(b"X"),
            Err(DecodeError::InvalidTransactionStatus(b'X'))
        );
        assert_eq!(TransactionStatus::parse(b""), Err(DecodeError::Truncated));
        assert_eq!(
            TransactionStatus::parse(b"II"),
            Err(DecodeError::TrailingBytes)
        );
        assert_eq!(u8::from(TransactionStatus::Failed), b'E');
    }

    #[test]
    fn negotiate_protocol_version_fixture() {
        let v = NegotiateProtocolVersion::parse(b"\0\x03\0\0\0\0\0\x02_pq_.a\0_pq_.b\0")
            .expect("valid");
        assert_eq!((v.newest_version, v.unsupported_count), (0x0003_0000, 2));
        assert_eq!(v.unsupported().collect::<Vec<_>>(), ["_pq_.a", "_pq_.b"]);
        let short = b"\0\0\0\0\0\0\0\x02_pq_.a\0";
        assert_eq!(
            NegotiateProtocolVersion::parse(short),
            Err(DecodeError::MissingNul)
        );
        let long = b"\0\0\0\0\0\0\0\x01_pq_.a\0x\0";
        assert_eq!(
            NegotiateProtocolVersion::parse(long),
            Err(DecodeError::TrailingBytes)
        );
    }
}
