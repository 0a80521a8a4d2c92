//! The router logging in to a backend with a ClientKey (auth/scram/client.rs): an arbitrary
//! server-first-message into `handle_server_first`, then a server-final-message into
//! `verify_server_final`.
//!
//! Input: a flags byte, a big-endian u16 length, the server-first-message, then the rest. With
//! [`PREFIX_NONCE`] the server-first-message is `r=<client nonce>` followed by the fuzzer's
//! bytes. Without [`SIGNED`] the rest is the server-final-message, which must never pass; with
//! it, the target sends `v=<correct signature>` followed by the rest, which must pass unless the
//! rest is not `,x=value` attributes.
#![no_main]

use branchgate::auth::scram::{ClientCredentials, ScramClient, ScramError};
use branchgate::auth::verifier::stored_key;
use branchgate_fuzz::{base64, hmac_sha256, identity, split_two, unbase64, xor};
use libfuzzer_sys::fuzz_target;

/// Flag: the server-final-message carries the correct signature.
const SIGNED: u8 = 1;
/// Flag: the server-first-message starts with `r=` and the client's nonce.
const PREFIX_NONCE: u8 = 2;

const CLIENT_NONCE: &str = "cLiEnT+nOnCe";

fuzz_target!(|data: &[u8]| {
    let Some((flags, first, rest)) = split_two(data) else {
        return;
    };
    let id = identity();
    let credentials = ClientCredentials::Keys {
        client_key: id.client_key,
        server_key: id.server_key,
    };
    let (mut client, client_first) =
        ScramClient::new_with_nonce(credentials, CLIENT_NONCE).expect("valid nonce");
    let server_first = if flags & PREFIX_NONCE != 0 {
        [b"r=", CLIENT_NONCE.as_bytes(), first].concat()
    } else {
        first.to_vec()
    };
    let Ok(client_final) = client.handle_server_first(&server_first) else {
        return;
    };
    assert_eq!(
        client.handle_server_first(&server_first),
        Err(ScramError::OutOfOrder)
    );

    // The proof is ClientKey XOR HMAC(StoredKey, AuthMessage).
    let proof_at = client_final
        .windows(3)
        .rposition(|w| w == b",p=")
        .expect("client-final-message ends with its proof");
    let without_proof = &client_final[..proof_at];
    let bare = &client_first[3..];
    let auth_message = [bare, b",", &server_first, b",", without_proof].concat();
    let proof: [u8; 32] = unbase64(&client_final[proof_at + 3..])
        .and_then(|p| p.try_into().ok())
        .expect("the proof is 32 bytes of base64");
    let signature = hmac_sha256(&stored_key(&id.client_key), &auth_message);
    assert_eq!(xor(&proof, &signature), id.client_key, "wrong proof");

    if flags & SIGNED == 0 {
        assert!(client.verify_server_final(rest).is_err());
        return;
    }
    let signature = hmac_sha256(&id.server_key, &auth_message);
    let server_final = [&b"v="[..], &base64(&signature), rest].concat();
    match client.verify_server_final(&server_final) {
        Ok(()) | Err(ScramError::Malformed(_)) => {}
        Err(e) => panic!("the correct server signature was refused: {e:?}"),
    }
});
