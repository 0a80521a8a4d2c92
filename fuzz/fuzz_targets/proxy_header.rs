//! The PROXY protocol v2 header (balancer to router): `front_door::proxy_header::parse` on
//! every prefix of the input, as the front door's reader sees the bytes arrive.
//!
//! Checks: a prefix shorter than the header asks for more (never past `MAX_HEADER_BYTES`, never
//! less than it has); the verdict, once given (a header, or an error), stays the same for every
//! longer prefix; a header is complete exactly at its length, which the length field says, and
//! what it names is the bytes it was parsed from.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use branchgate::front_door::proxy_header::{
    parse, Parsed, ProxyHeader, FIXED_BYTES, MAX_HEADER_BYTES, SIGNATURE,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Past the bound every prefix has a verdict already; longer inputs add nothing.
    let data = &data[..data.len().min(MAX_HEADER_BYTES + 64)];
    let mut settled = None;
    let mut asked = FIXED_BYTES;
    for cut in 0..=data.len() {
        let now = parse(&data[..cut]);
        if let Some(verdict) = settled {
            assert_eq!(now, verdict, "{cut} bytes: the verdict changed");
            continue;
        }
        match now {
            Ok(Parsed::Incomplete { needed }) => {
                assert!(needed > cut && needed <= MAX_HEADER_BYTES, "{cut}: {needed}");
                assert!(needed >= asked, "asked for {asked}, then {needed}");
                asked = needed;
            }
            Ok(Parsed::Complete { header, len }) => {
                assert_eq!(len, cut, "complete before or after its length");
                check(header, &data[..len]);
                settled = Some(now);
            }
            Err(_) => settled = Some(now),
        }
    }
});

/// A header says what its bytes say.
fn check(header: ProxyHeader, bytes: &[u8]) {
    assert_eq!(bytes[..12], SIGNATURE);
    let body_len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    assert_eq!(bytes.len(), FIXED_BYTES + body_len);
    let body = &bytes[FIXED_BYTES..];
    match header {
        ProxyHeader::Local => assert_eq!(bytes[12], 0x20),
        ProxyHeader::Proxied {
            source,
            destination,
        } => {
            assert_eq!(bytes[12], 0x21);
            let (address_len, from_bytes): (usize, fn(&[u8]) -> IpAddr) = match bytes[13] {
                0x11 => (4, |b| IpAddr::from(<[u8; 4]>::try_from(b).expect("4 bytes"))),
                0x21 => (16, |b| IpAddr::from(<[u8; 16]>::try_from(b).expect("16 bytes"))),
                other => panic!("PROXY header for family {other:#04x}"),
            };
            let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
            let expected_source = SocketAddr::new(
                from_bytes(&body[..address_len]),
                port(2 * address_len),
            );
            let expected_destination = SocketAddr::new(
                from_bytes(&body[address_len..2 * address_len]),
                port(2 * address_len + 2),
            );
            assert_eq!((source, destination), (expected_source, expected_destination));
        }
    }
}
