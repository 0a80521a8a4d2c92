//! The PROXY protocol version 2 header (balancer to router): the binary block an L4 balancer
//! (HAProxy's `send-proxy-v2`, AWS NLB, Envoy) writes before the first byte it forwards, naming
//! the client it forwards for. [Specification], section 2.2.
//!
//! ```text
//! 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A   signature (12 bytes)
//! 2c                                    version 2, command c: 0 LOCAL, 1 PROXY
//! ft                                    family f, transport t: 0x11 TCP/IPv4, 0x21 TCP/IPv6
//! nn nn                                 length of what follows (big-endian)
//! addresses                             source, destination, source port, destination port
//! TLVs                                  type (1), length (2), value: skipped
//! ```
//!
//! [`parse`] works on whatever bytes have arrived, allocates nothing, and says either how many
//! bytes the header needs in all ([`Parsed::Incomplete`]: 16 until the fixed part is in, then
//! the whole length), or the header and its length, or why it is refused. It refuses as early
//! as the bytes allow (a wrong signature at its first wrong byte), so the reader never waits for
//! more of something that cannot become a header, and it never asks for more than
//! [`MAX_HEADER_BYTES`].
//!
//! What is accepted: PROXY over TCP/IPv4 or TCP/IPv6 (the client is the source address and
//! port), and LOCAL with any family the specification defines (the balancer's own connection,
//! a health check: the specification says to accept it and ignore its addresses, and the TCP
//! peer stands). Refused: other versions and commands, PROXY for UDP, UNIX sockets or an
//! unspecified family (a TCP balancer never forwards those for a client, and accepting one
//! would put the balancer's address back where the client's belongs), family values the
//! specification leaves undefined, an address block shorter than its family needs, a TLV that
//! runs past the header, and headers longer than [`MAX_HEADER_BYTES`]. TLVs are walked (their
//! framing must hold) but not interpreted; a CRC32C TLV is not checked (the specification asks
//! that only of receivers that implement it).
//!
//! [Specification]: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::protocol::reader::{DecodeError, Reader};

/// The 12 bytes every version 2 header starts with (chosen to be invalid in every common
/// protocol, PostgreSQL's included: as a startup packet length it is 218 MB).
pub const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// The fixed part: signature, version and command, family and transport, length.
pub const FIXED_BYTES: usize = 16;

/// The longest header accepted, fixed part included. The specification designs both versions
/// of the header to fit the smallest TCP segment every host must accept (576 - 40 = 536
/// bytes), so that a header always arrives in one piece; a balancer in TCP mode in front of a
/// router that ends TLS itself has no TLS facts to add, and what TLVs it may send (a unique id
/// of up to 128 bytes, a CRC32C, AWS's VPC endpoint id, Azure's link id, an authority) fit
/// beside a 36-byte IPv6 address block. The length field would allow 65,551 bytes: a header
/// past this bound is refused rather than buffered.
pub const MAX_HEADER_BYTES: usize = 536;

/// The version nibble every accepted header carries.
const VERSION_2: u8 = 0x2;
/// Command: the balancer's own connection (a health check).
const COMMAND_LOCAL: u8 = 0x0;
/// Command: a connection relayed for a client.
const COMMAND_PROXY: u8 = 0x1;
/// Family and transport: TCP over IPv4 (addresses 4 + 4, ports 2 + 2).
const TCP_OVER_IPV4: u8 = 0x11;
/// Family and transport: TCP over IPv6 (addresses 16 + 16, ports 2 + 2).
const TCP_OVER_IPV6: u8 = 0x21;
/// The address block of [`TCP_OVER_IPV4`].
const IPV4_ADDRESS_BYTES: usize = 12;
/// The address block of [`TCP_OVER_IPV6`].
const IPV6_ADDRESS_BYTES: usize = 36;
/// A TLV's type and length.
const TLV_HEADER_BYTES: usize = 3;

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// LOCAL: the balancer speaks for itself (a health check); the connection's own peer
    /// address stands.
    Local,
    /// PROXY over TCP: the connection is relayed for `source`.
    Proxied {
        /// The client: where the balancer's connection came from.
        source: SocketAddr,
        /// Where the client connected to (the balancer's listening address).
        destination: SocketAddr,
    },
}

impl ProxyHeader {
    /// The client's address: the header's source, or `peer` (the TCP peer) for LOCAL.
    pub fn client(self, peer: SocketAddr) -> SocketAddr {
        match self {
            ProxyHeader::Local => peer,
            ProxyHeader::Proxied { source, .. } => source,
        }
    }
}

/// How far the bytes so far go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Not all there yet: the header is `needed` bytes long in all, as far as is known now
    /// ([`FIXED_BYTES`] until the length field has arrived). Never more than
    /// [`MAX_HEADER_BYTES`].
    Incomplete {
        /// Bytes the header takes, from its first.
        needed: usize,
    },
    /// A whole header: the first `len` bytes; what follows is the client's.
    Complete {
        /// What it says.
        header: ProxyHeader,
        /// Its length in bytes.
        len: usize,
    },
}

/// Why bytes are not an acceptable header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The bytes do not start with [`SIGNATURE`]: no header at all (a client speaking
    /// PostgreSQL straight away, or a version 1 text header).
    #[error("no PROXY protocol v2 signature")]
    BadSignature,
    /// A version other than 2.
    #[error("PROXY protocol version {0} (only 2 is accepted)")]
    BadVersion(u8),
    /// A command other than LOCAL (0) and PROXY (1).
    #[error("unassigned PROXY protocol command {0}")]
    BadCommand(u8),
    /// PROXY for a family and transport other than TCP over IPv4 or IPv6.
    #[error("PROXY for family and transport {0:#04x}, not TCP over IPv4 or IPv6")]
    UnsupportedFamily(u8),
    /// A family or transport value the specification does not define.
    #[error("undefined family and transport {0:#04x}")]
    UndefinedFamily(u8),
    /// An address block shorter than its family needs.
    #[error("{len}-byte address block, too short for family and transport {family:#04x}")]
    ShortAddresses {
        /// The family and transport byte.
        family: u8,
        /// What the length field gave.
        len: u16,
    },
    /// A header longer than [`MAX_HEADER_BYTES`].
    #[error("{0}-byte header, longer than the {MAX_HEADER_BYTES} bytes accepted")]
    TooLong(usize),
    /// A TLV whose type and length, or value, run past the end of the header.
    #[error("a TLV runs past the end of the header")]
    BadTlv,
}

/// Parses the header at the start of `bytes` (which may hold more: the client's first bytes).
pub fn parse(bytes: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let seen = bytes.len().min(SIGNATURE.len());
    if bytes[..seen] != SIGNATURE[..seen] {
        return Err(ProxyHeaderError::BadSignature);
    }
    let command = match bytes.get(12) {
        Some(&version_command) => command(version_command)?,
        None => {
            return Ok(Parsed::Incomplete {
                needed: FIXED_BYTES,
            })
        }
    };
    let Some(&family) = bytes.get(13) else {
        return Ok(Parsed::Incomplete {
            needed: FIXED_BYTES,
        });
    };
    let address_bytes = address_bytes(command, family)?;
    let Some(&[high, low]) = bytes.get(14..FIXED_BYTES) else {
        return Ok(Parsed::Incomplete {
            needed: FIXED_BYTES,
        });
    };
    let body_len = u16::from_be_bytes([high, low]);
    let len = FIXED_BYTES + usize::from(body_len);
    if len > MAX_HEADER_BYTES {
        return Err(ProxyHeaderError::TooLong(len));
    }
    if usize::from(body_len) < address_bytes {
        return Err(ProxyHeaderError::ShortAddresses {
            family,
            len: body_len,
        });
    }
    let Some(body) = bytes.get(FIXED_BYTES..len) else {
        return Ok(Parsed::Incomplete { needed: len });
    };
    let header = match command {
        // The specification: discard the block, family and all; TLVs cannot be told from
        // addresses of a family we do not read, so nothing of it is walked.
        COMMAND_LOCAL => ProxyHeader::Local,
        _ => {
            let mut reader = Reader::new(body);
            // The length was checked against the family's block: this cannot run short.
            let header =
                addresses(&mut reader, family).map_err(|_| ProxyHeaderError::ShortAddresses {
                    family,
                    len: body_len,
                })?;
            skip_tlvs(reader)?;
            header
        }
    };
    Ok(Parsed::Complete { header, len })
}

/// The command of a version-and-command byte.
fn command(version_command: u8) -> Result<u8, ProxyHeaderError> {
    let (version, command) = (version_command >> 4, version_command & 0x0F);
    if version != VERSION_2 {
        return Err(ProxyHeaderError::BadVersion(version));
    }
    match command {
        COMMAND_LOCAL | COMMAND_PROXY => Ok(command),
        other => Err(ProxyHeaderError::BadCommand(other)),
    }
}

/// The address block `command` needs for `family` (0 for LOCAL, whose block is ignored).
fn address_bytes(command: u8, family: u8) -> Result<usize, ProxyHeaderError> {
    // Families 0 (unspecified) to 3 (UNIX), transports 0 (unspecified) to 2 (datagram).
    let defined = family >> 4 <= 0x3 && family & 0x0F <= 0x2;
    match (command, family) {
        _ if !defined => Err(ProxyHeaderError::UndefinedFamily(family)),
        (COMMAND_LOCAL, _) => Ok(0),
        (_, TCP_OVER_IPV4) => Ok(IPV4_ADDRESS_BYTES),
        (_, TCP_OVER_IPV6) => Ok(IPV6_ADDRESS_BYTES),
        (_, other) => Err(ProxyHeaderError::UnsupportedFamily(other)),
    }
}

/// The address block of a PROXY header for `family` (already checked to be TCP).
fn addresses(reader: &mut Reader<'_>, family: u8) -> Result<ProxyHeader, DecodeError> {
    let (source, destination): (IpAddr, IpAddr) = if family == TCP_OVER_IPV4 {
        let source = Ipv4Addr::from(reader.u32()?);
        (source.into(), Ipv4Addr::from(reader.u32()?).into())
    } else {
        let source = ipv6(reader)?;
        (source.into(), ipv6(reader)?.into())
    };
    let source_port = reader.u16()?;
    let destination_port = reader.u16()?;
    Ok(ProxyHeader::Proxied {
        source: SocketAddr::new(source, source_port),
        destination: SocketAddr::new(destination, destination_port),
    })
}

/// An IPv6 address: 16 bytes in network order.
fn ipv6(reader: &mut Reader<'_>) -> Result<Ipv6Addr, DecodeError> {
    let octets = <[u8; 16]>::try_from(reader.take(16)?).map_err(|_| DecodeError::Truncated)?;
    Ok(Ipv6Addr::from(octets))
}

/// Walks the TLVs after the addresses: each must fit in the header.
fn skip_tlvs(mut reader: Reader<'_>) -> Result<(), ProxyHeaderError> {
    while !reader.is_empty() {
        if reader.remaining() < TLV_HEADER_BYTES {
            return Err(ProxyHeaderError::BadTlv);
        }
        let _kind = reader.u8().map_err(|_| ProxyHeaderError::BadTlv)?;
        let len = reader.u16().map_err(|_| ProxyHeaderError::BadTlv)?;
        reader
            .take(usize::from(len))
            .map_err(|_| ProxyHeaderError::BadTlv)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header: `version_command`, `family`, then `body` with its length.
    fn encode(version_command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let len = u16::try_from(body.len()).expect("short body");
        let mut bytes = SIGNATURE.to_vec();
        bytes.extend_from_slice(&[version_command, family]);
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    /// HAProxy's `send-proxy-v2` for 203.0.113.7:5555 -> 10.0.0.1:5432.
    fn ipv4() -> Vec<u8> {
        encode(
            0x21,
            0x11,
            &[203, 0, 113, 7, 10, 0, 0, 1, 0x15, 0xB3, 0x15, 0x38],
        )
    }

    /// 2001:db8::7 port 40000 -> 2001:db8::1 port 6432.
    fn ipv6() -> Vec<u8> {
        let source: Ipv6Addr = "2001:db8::7".parse().expect("addr");
        let destination: Ipv6Addr = "2001:db8::1".parse().expect("addr");
        let mut body = source.octets().to_vec();
        body.extend_from_slice(&destination.octets());
        body.extend_from_slice(&40000u16.to_be_bytes());
        body.extend_from_slice(&6432u16.to_be_bytes());
        encode(0x21, 0x21, &body)
    }

    /// What HAProxy's health checks send: LOCAL, no family, no addresses.
    fn local() -> Vec<u8> {
        encode(0x20, 0x00, &[])
    }

    fn complete(bytes: &[u8]) -> (ProxyHeader, usize) {
        match parse(bytes) {
            Ok(Parsed::Complete { header, len }) => (header, len),
            other => panic!("expected a complete header, got {other:?}"),
        }
    }

    fn proxied(source: &str, destination: &str) -> ProxyHeader {
        ProxyHeader::Proxied {
            source: source.parse().expect("source"),
            destination: destination.parse().expect("destination"),
        }
    }

    #[test]
    fn tcp_over_ipv4_names_the_client_and_leaves_what_follows() {
        let mut bytes = ipv4();
        let ssl_request = [0, 0, 0, 8, 0x04, 0xD2, 0x16, 0x2F];
        bytes.extend_from_slice(&ssl_request);
        let (header, len) = complete(&bytes);
        assert_eq!(header, proxied("203.0.113.7:5555", "10.0.0.1:5432"));
        assert_eq!(len, 28);
        assert_eq!(&bytes[len..], ssl_request);
        let peer: SocketAddr = "10.0.0.5:40000".parse().expect("peer");
        assert_eq!(
            header.client(peer),
            "203.0.113.7:5555".parse().expect("addr")
        );
    }

    #[test]
    fn tcp_over_ipv6_names_the_client() {
        let (header, len) = complete(&ipv6());
        assert_eq!(header, proxied("[2001:db8::7]:40000", "[2001:db8::1]:6432"));
        assert_eq!(len, 52);
    }

    #[test]
    fn local_keeps_the_peer_whatever_its_block_holds() {
        let peer: SocketAddr = "10.0.0.5:40000".parse().expect("peer");
        let (header, len) = complete(&local());
        assert_eq!((header, len), (ProxyHeader::Local, 16));
        assert_eq!(header.client(peer), peer);
        // A LOCAL header must be skipped by its length, addresses or not (the specification:
        // "must not assume zero is presented for LOCAL connections").
        let with_block = encode(0x20, 0x11, &[1; 20]);
        assert_eq!(complete(&with_block), (ProxyHeader::Local, 36));
    }

    #[test]
    fn tlvs_are_skipped_but_must_fit() {
        // AWS NLB's VPC endpoint id (0xEA), a NOOP, then HAProxy's unique id (0x05).
        let mut body = vec![203, 0, 113, 7, 10, 0, 0, 1, 0x15, 0xB3, 0x15, 0x38];
        body.extend_from_slice(&[0xEA, 0x00, 0x05, 0x01, b'v', b'p', b'c', b'e']);
        body.extend_from_slice(&[0x04, 0x00, 0x00]);
        body.extend_from_slice(&[0x05, 0x00, 0x03, b'a', b'b', b'c']);
        let bytes = encode(0x21, 0x11, &body);
        let (header_read, len) = complete(&bytes);
        assert_eq!(header_read, proxied("203.0.113.7:5555", "10.0.0.1:5432"));
        assert_eq!(len, bytes.len());

        // A TLV whose value runs past the header, and a stray byte or two after the last one.
        for tail in [
            &[0x05, 0x00, 0x09, b'a'][..],
            &[0x04][..],
            &[0x04, 0x00][..],
        ] {
            let mut body = ipv4()[FIXED_BYTES..].to_vec();
            body.extend_from_slice(tail);
            assert_eq!(
                parse(&encode(0x21, 0x11, &body)),
                Err(ProxyHeaderError::BadTlv),
                "{tail:?}"
            );
        }
    }

    #[test]
    fn truncated_at_every_byte_asks_for_the_rest() {
        for whole in [ipv4(), ipv6(), local()] {
            for cut in 0..whole.len() {
                let needed = if cut < FIXED_BYTES {
                    FIXED_BYTES
                } else {
                    whole.len()
                };
                assert_eq!(
                    parse(&whole[..cut]),
                    Ok(Parsed::Incomplete { needed }),
                    "{} bytes of {}",
                    cut,
                    whole.len()
                );
            }
            assert!(matches!(parse(&whole), Ok(Parsed::Complete { .. })));
        }
    }

    #[test]
    fn a_wrong_signature_is_refused_at_its_first_wrong_byte() {
        for at in 0..SIGNATURE.len() {
            let mut bytes = ipv4();
            bytes[at] ^= 0x40;
            assert_eq!(parse(&bytes[..=at]), Err(ProxyHeaderError::BadSignature));
            assert_eq!(parse(&bytes), Err(ProxyHeaderError::BadSignature));
        }
        // What a client that was never told about a balancer sends, and a version 1 header.
        let ssl_request = [0, 0, 0, 8, 0x04, 0xD2, 0x16, 0x2F];
        assert_eq!(parse(&ssl_request), Err(ProxyHeaderError::BadSignature));
        assert_eq!(
            parse(&[0x16, 0x03, 0x01]),
            Err(ProxyHeaderError::BadSignature)
        );
        assert_eq!(
            parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 5432\r\n"),
            Err(ProxyHeaderError::BadSignature)
        );
    }

    #[test]
    fn bad_versions_and_commands() {
        for (version_command, error) in [
            (0x11, ProxyHeaderError::BadVersion(1)),
            (0x31, ProxyHeaderError::BadVersion(3)),
            (0x01, ProxyHeaderError::BadVersion(0)),
            (0x22, ProxyHeaderError::BadCommand(2)),
            (0x2F, ProxyHeaderError::BadCommand(15)),
        ] {
            let mut bytes = ipv4();
            bytes[12] = version_command;
            // Refused as soon as the byte is in.
            assert_eq!(parse(&bytes[..13]), Err(error), "{version_command:#x}");
            assert_eq!(parse(&bytes), Err(error), "{version_command:#x}");
        }
    }

    #[test]
    fn families_other_than_tcp_are_refused_for_proxy() {
        for family in [0x00, 0x12, 0x22, 0x31, 0x32, 0x10, 0x01] {
            let bytes = encode(0x21, family, &[0; 216]);
            assert_eq!(
                parse(&bytes[..14]),
                Err(ProxyHeaderError::UnsupportedFamily(family))
            );
        }
        for family in [0x13, 0x41, 0xF1, 0x1F] {
            for command in [0x20, 0x21] {
                let bytes = encode(command, family, &[0; 12]);
                assert_eq!(
                    parse(&bytes),
                    Err(ProxyHeaderError::UndefinedFamily(family)),
                    "{command:#x} {family:#04x}"
                );
            }
        }
        // LOCAL ignores a defined family.
        for family in [0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32] {
            assert_eq!(
                complete(&encode(0x20, family, &[])),
                (ProxyHeader::Local, 16)
            );
        }
    }

    #[test]
    fn address_blocks_shorter_than_their_family_are_refused() {
        let bytes = encode(0x21, 0x11, &[203, 0, 113, 7, 10, 0, 0, 1, 0x15, 0xB3, 0x15]);
        // Known from the length field alone, before the block arrives.
        assert_eq!(
            parse(&bytes[..FIXED_BYTES]),
            Err(ProxyHeaderError::ShortAddresses {
                family: 0x11,
                len: 11
            })
        );
        let bytes = encode(0x21, 0x21, &[0; 35]);
        assert_eq!(
            parse(&bytes),
            Err(ProxyHeaderError::ShortAddresses {
                family: 0x21,
                len: 35
            })
        );
    }

    #[test]
    fn headers_past_the_bound_are_refused_from_the_length_field() {
        let body_len = MAX_HEADER_BYTES - FIXED_BYTES;
        let mut body = ipv4()[FIXED_BYTES..].to_vec();
        let tlv = body_len - body.len() - TLV_HEADER_BYTES;
        body.extend_from_slice(&[0x04]);
        body.extend_from_slice(&u16::try_from(tlv).expect("small").to_be_bytes());
        body.resize(body_len, 0);
        let at_bound = encode(0x21, 0x11, &body);
        assert_eq!(complete(&at_bound).1, MAX_HEADER_BYTES);
        body.push(0);
        let over = encode(0x21, 0x11, &body);
        assert_eq!(
            parse(&over[..FIXED_BYTES]),
            Err(ProxyHeaderError::TooLong(MAX_HEADER_BYTES + 1))
        );
        let mut longest = local();
        longest[14..16].copy_from_slice(&[0xFF, 0xFF]);
        assert_eq!(
            parse(&longest),
            Err(ProxyHeaderError::TooLong(FIXED_BYTES + 0xFFFF))
        );
    }

    #[test]
    fn incomplete_never_asks_past_the_bound() {
        let mut bytes = local();
        bytes[14..16].copy_from_slice(
            &u16::try_from(MAX_HEADER_BYTES - FIXED_BYTES)
                .expect("small")
                .to_be_bytes(),
        );
        assert_eq!(
            parse(&bytes),
            Ok(Parsed::Incomplete {
                needed: MAX_HEADER_BYTES
            })
        );
    }
}
