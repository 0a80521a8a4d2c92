//! The router checking a client (auth/scram/server.rs): an arbitrary client-first-message into
//! `server_start`, then a client-final-message into `server_finish`.
//!
//! Input: a flags byte, a big-endian u16 length, the client-first-message, then the rest. Without
//! [`SIGNED`] the rest is the client-final-message as sent, which must never pass. With it, the
//! target builds a correctly signed client-final-message (`c=<gs2>,r=<nonce><rest>,p=<proof>`)
//! for the verifier's password, which must pass unless the rest is not `,x=value` attributes.
#![no_main]

use branchgate::auth::scram::{server_finish, server_start, server_start_with_nonce, ScramError};
use branchgate_fuzz::{base64, hmac_sha256, identity, split_two, xor};
use libfuzzer_sys::fuzz_target;

/// Flag: sign the client-final-message correctly.
const SIGNED: u8 = 1;
/// Flag: run against the mock verifier of a role that does not exist.
const MOCK: u8 = 2;

/// A fixed server nonce, so the fuzzer can learn the combined nonce and reach the proof check.
const SERVER_NONCE: &[u8] = b"SeRvEr+NoNcE";

fuzz_target!(|data: &[u8]| {
    let Some((flags, client_first, rest)) = split_two(data) else {
        return;
    };
    let id = identity();
    let verifier = if flags & MOCK != 0 {
        &id.mock
    } else {
        &id.verifier
    };

    // server_start is server_start_with_nonce with a random nonce: same verdict.
    let random = server_start(client_first, verifier);
    let (state, server_first) = match server_start_with_nonce(client_first, verifier, SERVER_NONCE)
    {
        Ok(started) => started,
        Err(e) => {
            assert_eq!(random.err(), Some(e));
            return;
        }
    };
    let (_, random_first) = random.expect("only the server nonce differs");
    let nonce_end = server_first
        .iter()
        .position(|&b| b == b',')
        .expect("server-first-message has s= and i=");
    let nonce = &server_first[2..nonce_end];
    assert!(server_first.starts_with(b"r=") && nonce.ends_with(SERVER_NONCE));
    let client_nonce = &nonce[..nonce.len() - SERVER_NONCE.len()];
    assert!(random_first[2..].starts_with(client_nonce));

    if flags & SIGNED == 0 {
        let result = server_finish(state, rest);
        assert!(result.is_err(), "an unsigned client-final-message passed");
        return;
    }

    // Accepted, so the gs2 header is "n,," or "y,,", and the bare message follows it.
    let (gs2_header, bare) = client_first.split_at(3);
    let without_proof = [b"c=", &base64(gs2_header)[..], b",r=", nonce, rest].concat();
    let auth_message = [bare, b",", &server_first, b",", &without_proof].concat();
    let signature = hmac_sha256(&verifier.stored_key, &auth_message);
    let proof = base64(&xor(&id.client_key, &signature));
    let client_final = [&without_proof[..], b",p=", &proof].concat();
    match server_finish(state, &client_final) {
        Ok((key, server_final)) => {
            assert!(flags & MOCK == 0, "the mock verifier accepted a proof");
            assert_eq!(key.0, id.client_key);
            let expected = hmac_sha256(&verifier.server_key, &auth_message);
            assert_eq!(server_final, [&b"v="[..], &base64(&expected)].concat());
        }
        Err(ScramError::InvalidProof) if flags & MOCK != 0 => {}
        // The fuzzer's bytes after the nonce are not `,x=value` extensions, or they carry on
        // the nonce itself.
        Err(ScramError::Malformed(_)) => {}
        Err(ScramError::NonceMismatch) if !rest.is_empty() && rest[0] != b',' => {}
        Err(e) => panic!("a correctly signed client-final-message was refused: {e:?}"),
    }
});
