//! Untagged startup packets (F): StartupMessage, SSLRequest, GSSENCRequest, CancelRequest.
//!
//! They share one layout, an Int32 length that counts itself, then an Int32 code (a protocol
//! version or a request code), so the first packet of a connection is told apart by its code.

use thiserror::Error;

use super::reader::{DecodeError, Reader};

mod message;

pub use message::StartupMessage;

/// Largest startup packet accepted, as in PostgreSQL (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET_BYTES: usize = 10_000;
/// SSLRequest code: 1234 in the high 16 bits, 5679 in the low 16 bits (80877103).
pub const SSL_REQUEST_CODE: u32 = 0x04D2_162F;
/// GSSENCRequest code: 1234 / 5680 (80877104).
pub const GSSENC_REQUEST_CODE: u32 = 0x04D2_1630;
/// CancelRequest code: 1234 / 5678 (80877102).
pub const CANCEL_REQUEST_CODE: u32 = 0x04D2_162E;
/// Protocol version 3.0, the version field of a StartupMessage.
pub const PROTOCOL_3_0: u32 = 0x0003_0000;
/// Single-byte answer to SSLRequest: go ahead with the TLS handshake.
pub const SSL_ACCEPT: u8 = b'S';
/// Single-byte answer to SSLRequest or GSSENCRequest: refused, continue in plaintext.
pub const ENCRYPTION_REFUSED: u8 = b'N';

/// Length of SSLRequest and GSSENCRequest: length word and code.
const REQUEST_BYTES: usize = 8;
/// Length of a protocol 3.0 CancelRequest: length, code, process id, secret key.
const CANCEL_REQUEST_BYTES: usize = 16;

/// Why a startup packet was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum StartupError {
    /// The length word is negative.
    #[error("invalid startup packet length {0}")]
    LengthNegative(i32),
    /// The length word is below 8 (it must cover itself and the code).
    #[error("invalid startup packet length {0}")]
    LengthTooSmall(i32),
    /// The length word exceeds [`MAX_STARTUP_PACKET_BYTES`].
    #[error("startup packet of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The slice given to [`parse_startup`] is not exactly the packet its length word describes.
    #[error("startup packet length {declared} does not match the {actual} bytes given")]
    LengthMismatch {
        /// The length word.
        declared: usize,
        /// The bytes passed in.
        actual: usize,
    },
    /// An SSLRequest, GSSENCRequest or CancelRequest of the wrong size.
    #[error("request code 0x{code:08x} with invalid length {len}")]
    BadRequestLength {
        /// The request code.
        code: u32,
        /// The packet length.
        len: usize,
    },
    /// A protocol major version other than 3.
    #[error("unsupported frontend protocol {major}.{minor}")]
    UnsupportedProtocol {
        /// Requested major version.
        major: u16,
        /// Requested minor version.
        minor: u16,
    },
    /// The parameter list of a StartupMessage is malformed.
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
    /// A field could not be decoded.
    #[error("invalid startup packet: {0}")]
    Decode(#[from] DecodeError),
}

/// Checks whether `buf` starts with a complete startup packet and returns its length.
///
/// `Ok(None)` means more bytes are needed. The length word is validated as soon as it is in,
/// so a packet over [`MAX_STARTUP_PACKET_BYTES`] is refused before it is buffered.
pub fn check_startup(buf: &[u8]) -> Result<Option<usize>, StartupError> {
    let Some((&word, _)) = buf.split_first_chunk::<4>() else {
        return Ok(None);
    };
    let len = packet_length(i32::from_be_bytes(word))?;
    Ok((buf.len() >= len).then_some(len))
}

fn packet_length(word: i32) -> Result<usize, StartupError> {
    let len = usize::try_from(word).map_err(|_| StartupError::LengthNegative(word))?;
    if len < REQUEST_BYTES {
        return Err(StartupError::LengthTooSmall(word));
    }
    if len > MAX_STARTUP_PACKET_BYTES {
        return Err(StartupError::TooLarge(len));
    }
    Ok(len)
}

/// The key a CancelRequest carries and BackendKeyData hands out (protocol 3.0: 4-byte secret).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CancelKey {
    /// Process id of the backend (or the id the router issued).
    pub pid: u32,
    /// Secret key proving the requester saw BackendKeyData.
    pub secret: u32,
}

/// The first packet of a connection (F).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartupPacket<'a> {
    /// SSLRequest (F): answer [`SSL_ACCEPT`] and start TLS.
    SslRequest,
    /// GSSENCRequest (F): answer [`ENCRYPTION_REFUSED`].
    GssEncRequest,
    /// CancelRequest (F).
    Cancel(CancelKey),
    /// StartupMessage (F).
    Startup(StartupMessage<'a>),
}

/// Parses exactly one startup packet, as delimited by [`check_startup`].
pub fn parse_startup(packet: &[u8]) -> Result<StartupPacket<'_>, StartupError> {
    let mut r = Reader::new(packet);
    let len = packet_length(r.i32()?)?;
    if len != packet.len() {
        return Err(StartupError::LengthMismatch {
            declared: len,
            actual: packet.len(),
        });
    }
    let code = r.u32()?;
    let exact = |want: usize| {
        if len == want {
            Ok(())
        } else {
            Err(StartupError::BadRequestLength { code, len })
        }
    };
    match code {
        SSL_REQUEST_CODE => exact(REQUEST_BYTES).map(|()| StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE => exact(REQUEST_BYTES).map(|()| StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => {
            exact(CANCEL_REQUEST_BYTES)?;
            let key = CancelKey {
                pid: r.u32()?,
                secret: r.u32()?,
            };
            r.finish()?;
            Ok(StartupPacket::Cancel(key))
        }
        version => {
            let [major, minor] = [(version >> 16) as u16, version as u16];
            if major != 3 {
                return Err(StartupError::UnsupportedProtocol { major, minor });
            }
            StartupMessage::parse(major, minor, r.rest()).map(StartupPacket::Startup)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, rest: &[u8]) -> Vec<u8> {
        let len = u32::try_from(8 + rest.len()).expect("small packet");
        [&len.to_be_bytes()[..], &code.to_be_bytes(), rest].concat()
    }

    #[test]
    fn check_startup_edge_cases() {
        assert_eq!(check_startup(b""), Ok(None));
        assert_eq!(check_startup(b"\x00\x00\x00"), Ok(None));
        assert_eq!(
            check_startup(b"\x00\x00\x00\x07"),
            Err(StartupError::LengthTooSmall(7))
        );
        assert_eq!(
            check_startup(b"\xff\xff\xff\xf8"),
            Err(StartupError::LengthNegative(-8))
        );
        assert_eq!(
            check_startup(b"\x80\x00\x00\x00"),
            Err(StartupError::LengthNegative(i32::MIN))
        );
        // 10001 is refused from the length word alone.
        assert_eq!(
            check_startup(&10_001u32.to_be_bytes()),
            Err(StartupError::TooLarge(10_001))
        );
        let mut max = vec![0u8; MAX_STARTUP_PACKET_BYTES];
        max[..4].copy_from_slice(&10_000u32.to_be_bytes());
        assert_eq!(check_startup(&max[..4]), Ok(None));
        assert_eq!(check_startup(&max[..9_999]), Ok(None));
        assert_eq!(check_startup(&max), Ok(Some(10_000)));
        let ssl = packet(SSL_REQUEST_CODE, b"");
        assert_eq!(check_startup(&ssl[..7]), Ok(None));
        // Pipelined bytes after the packet are not part of it.
        assert_eq!(
            check_startup(&[&ssl[..], b"\x16\x03"].concat()),
            Ok(Some(8))
        );
    }

    #[test]
    fn ssl_request_fixture() {
        let bytes = b"\x00\x00\x00\x08\x04\xd2\x16\x2f";
        assert_eq!(parse_startup(bytes), Ok(StartupPacket::SslRequest));
        assert_eq!(
            parse_startup(&packet(GSSENC_REQUEST_CODE, b"")),
            Ok(StartupPacket::GssEncRequest)
        );
    }

    #[test]
    fn ssl_request_with_wrong_length() {
        let bad = packet(SSL_REQUEST_CODE, b"\0\0\0\0");
        assert_eq!(
            parse_startup(&bad),
            Err(StartupError::BadRequestLength {
                code: SSL_REQUEST_CODE,
                len: 12
            })
        );
        let bad = packet(GSSENC_REQUEST_CODE, b"\0");
        assert!(matches!(
            parse_startup(&bad),
            Err(StartupError::BadRequestLength { len: 9, .. })
        ));
    }

    #[test]
    fn cancel_request() {
        let bytes = b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x30\x39\xde\xad\xbe\xef";
        let key = CancelKey {
            pid: 12345,
            secret: 0xdead_beef,
        };
        assert_eq!(parse_startup(bytes), Ok(StartupPacket::Cancel(key)));
        // A protocol 3.2 style longer secret is refused.
        let long = packet(CANCEL_REQUEST_CODE, &[0; 12]);
        assert!(matches!(
            parse_startup(&long),
            Err(StartupError::BadRequestLength { len: 20, .. })
        ));
        let short = packet(CANCEL_REQUEST_CODE, &[0; 4]);
        assert!(matches!(
            parse_startup(&short),
            Err(StartupError::BadRequestLength { len: 12, .. })
        ));
    }

    #[test]
    fn length_must_match_the_slice() {
        let ssl = packet(SSL_REQUEST_CODE, b"");
        assert_eq!(
            parse_startup(&[&ssl[..], b"x"].concat()),
            Err(StartupError::LengthMismatch {
                declared: 8,
                actual: 9
            })
        );
        assert_eq!(
            parse_startup(&ssl[..4]),
            Err(StartupError::LengthMismatch {
                declared: 8,
                actual: 4
            })
        );
        assert_eq!(
            parse_startup(b"\x00\x00"),
            Err(StartupError::Decode(DecodeError::Truncated))
        );
    }

    #[test]
    fn startup_message_fixture() {
        let bytes = b"\x00\x00\x00\x4d\x00\x03\x00\x00\
            user\0app.br_1|replica\0database\0shop\0_pq_.x\0on\0\
            application_name\0psql\0\0";
        assert_eq!(check_startup(bytes), Ok(Some(bytes.len())));
        let StartupPacket::Startup(m) = parse_startup(bytes).expect("valid startup") else {
            panic!("not a StartupMessage");
        };
        assert_eq!((m.major, m.minor), (3, 0));
        assert_eq!(m.user(), Some("app.br_1|replica"));
        assert_eq!(m.database(), Some("shop"));
        assert_eq!(m.get("application_name"), Some("psql"));
        assert_eq!(m.get("options"), None);
        assert_eq!(m.protocol_options().collect::<Vec<_>>(), ["_pq_.x"]);
        assert_eq!(m.params().count(), 4);
        assert_eq!(m.params_bytes().last(), Some(&0));
    }

    #[test]
    fn startup_minor_versions_and_other_majors() {
        let p = packet(0x0003_0002, b"user\0u\0\0");
        let m = parse_startup(&p).expect("3.2 is accepted");
        assert!(matches!(
            m,
            StartupPacket::Startup(StartupMessage {
                major: 3,
                minor: 2,
                ..
            })
        ));
        assert_eq!(
            parse_startup(&packet(0x0002_0000, b"user\0u\0\0")),
            Err(StartupError::UnsupportedProtocol { major: 2, minor: 0 })
        );
        assert_eq!(
            parse_startup(&packet(0x04D2_1631, b"")),
            Err(StartupError::UnsupportedProtocol {
                major: 1234,
                minor: 5681
            })
        );
    }
}
