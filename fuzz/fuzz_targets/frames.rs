//! Tagged frames: `frame::check` at the start of a buffer and `Frames` over it, with every
//! frame body handed to the decoder for its type byte, as a session or backend reader would.
//!
//! Input: a big-endian u16 frame size limit, then the bytes as they arrived.
#![no_main]

use branchgate::protocol::backend::{
    Authentication, BackendKeyData, ErrorFields, NegotiateProtocolVersion, ParameterStatus,
    TransactionStatus,
};
use branchgate::protocol::frame::{self, Frames, HEADER_BYTES};
use branchgate::protocol::{backend, frontend};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((limit, buf)) = data.split_first_chunk::<2>() else {
        return;
    };
    let max = usize::from(u16::from_be_bytes(*limit));

    match frame::check(buf, max) {
        Ok(Some(header)) => {
            assert!(header.len >= HEADER_BYTES && header.len <= max && header.len <= buf.len());
            assert_eq!(header.tag, buf[0]);
            assert_eq!(frame::body(buf, header).len(), header.body_len());
        }
        Ok(None) => {}
        Err(_) => assert!(buf.len() >= HEADER_BYTES, "an error needs a whole header"),
    }

    let mut frames = Frames::new(buf, max);
    let mut covered = 0;
    let mut failed = false;
    for item in frames.by_ref() {
        match item {
            Ok((header, body)) => {
                assert_eq!(body, &buf[covered + HEADER_BYTES..covered + header.len]);
                covered += header.len;
                decode(header.tag, body);
            }
            Err(_) => failed = true,
        }
    }
    assert_eq!(frames.consumed(), covered);
    assert_eq!(frames.remainder(), &buf[covered..]);
    assert!(frames.next().is_none(), "Frames is fused");
    if !failed {
        assert_eq!(frame::check(frames.remainder(), max), Ok(None));
    }
});

/// The decoders the router applies to a frame of this type, from either side.
fn decode(tag: u8, body: &[u8]) {
    match tag {
        backend::AUTHENTICATION => {
            let _ = Authentication::parse(body);
        }
        backend::BACKEND_KEY_DATA => {
            let _ = BackendKeyData::parse(body);
        }
        backend::ERROR_RESPONSE | backend::NOTICE_RESPONSE => {
            let _ = ErrorFields::parse(body);
        }
        backend::NEGOTIATE_PROTOCOL_VERSION => {
            let _ = NegotiateProtocolVersion::parse(body);
        }
        backend::PARAMETER_STATUS => {
            let _ = ParameterStatus::parse(body);
        }
        backend::READY_FOR_QUERY => {
            let _ = TransactionStatus::parse(body);
        }
        frontend::PASSWORD_MESSAGE => {
            let _ = frontend::SaslInitialResponse::parse(body);
            let _ = frontend::password(body);
        }
        frontend::QUERY => {
            let _ = frontend::query(body);
        }
        _ => {}
    }
}
