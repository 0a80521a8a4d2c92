//! The server side of SCRAM-SHA-256: the router checking a client's proof against a verifier.
//!
//! Like PostgreSQL, the user name in the client-first-message is ignored (libpq sends it
//! empty): the role comes from the StartupMessage. For a role that does not exist, run the same
//! exchange against [`ScramVerifier::mock`] so the client cannot tell the difference.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use subtle::ConstantTimeEq;

use super::{decode_key, is_valid_nonce, random_nonce, xor, Attributes, ClientKey, ScramError};
use crate::auth::verifier::{hmac_sha256, stored_key, ScramVerifier, KEY_LEN};

/// `c=` values a client must send back: base64 of the gs2 header `n,,` or `y,,`.
const CBIND_NONE: &[u8] = b"biws";
const CBIND_CLIENT_SUPPORTS: &[u8] = b"eSws";

/// The server's state between its server-first-message and the client-final-message.
pub struct ServerFirst {
    stored_key: [u8; KEY_LEN],
    server_key: [u8; KEY_LEN],
    /// The `c=` value the client-final-message must carry.
    channel_binding: &'static [u8],
    /// Client nonce followed by ours.
    nonce: Vec<u8>,
    /// `client-first-message-bare "," server-first-message ","`: the AuthMessage up to the
    /// client-final-message-without-proof, which is not known yet.
    auth_message_prefix: Vec<u8>,
}

impl fmt::Debug for ServerFirst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerFirst")
            .field("nonce", &String::from_utf8_lossy(&self.nonce))
            .finish_non_exhaustive()
    }
}

/// Reads the client-first-message and answers with the server-first-message
/// (`r=<nonce>,s=<salt>,i=<iterations>`), appending 18 random bytes to the client's nonce.
pub fn server_start(
    client_first: &[u8],
    verifier: &ScramVerifier,
) -> Result<(ServerFirst, Vec<u8>), ScramError> {
    server_start_with_nonce(client_first, verifier, random_nonce().as_bytes())
}

/// [`server_start`] with a chosen server part of the nonce, for tests and test vectors.
/// `server_nonce` must be printable ASCII without ','. Never use a fixed nonce in production:
/// a repeated nonce lets a recorded exchange be replayed.
pub fn server_start_with_nonce(
    client_first: &[u8],
    verifier: &ScramVerifier,
    server_nonce: &[u8],
) -> Result<(ServerFirst, Vec<u8>), ScramError> {
    let (channel_binding, bare) = split_gs2_header(client_first)?;
    let client_nonce = parse_client_first_bare(bare)?;
    if !is_valid_nonce(server_nonce) {
        return Err(ScramError::Malformed("server nonce is not printable"));
    }
    let nonce = [client_nonce, server_nonce].concat();

    let mut server_first = Vec::with_capacity(nonce.len() + 64);
    server_first.extend_from_slice(b"r=");
    server_first.extend_from_slice(&nonce);
    server_first.extend_from_slice(b",s=");
    server_first.extend_from_slice(BASE64.encode(&verifier.salt).as_bytes());
    server_first.extend_from_slice(b",i=");
    server_first.extend_from_slice(verifier.iterations.to_string().as_bytes());

    let auth_message_prefix = [bare, b",", &server_first, b","].concat();
    let state = ServerFirst {
        stored_key: verifier.stored_key,
        server_key: verifier.server_key,
        channel_binding,
        nonce,
        auth_message_prefix,
    };
    Ok((state, server_first))
}

/// Checks the client-final-message. On success returns the client's ClientKey and the
/// server-final-message (`v=<ServerSignature>`) to send in AuthenticationSASLFinal; a wrong
/// password is [`ScramError::InvalidProof`].
pub fn server_finish(
    state: ServerFirst,
    client_final: &[u8],
) -> Result<(ClientKey, Vec<u8>), ScramError> {
    // The proof is the last attribute, and the AuthMessage covers everything before it.
    let proof_at = client_final
        .windows(3)
        .rposition(|w| w == b",p=")
        .ok_or(ScramError::Malformed("client-final-message has no proof"))?;
    let without_proof = &client_final[..proof_at];
    let proof = decode_key(
        &client_final[proof_at + 3..],
        "proof is not 32 bytes of base64",
    )?;

    let mut attrs = Attributes::new(without_proof);
    let channel_binding = attrs.expect(b'c', "client-final-message must start with c=")?;
    let nonce = attrs.expect(b'r', "client-final-message lacks r=")?;
    attrs.skip_extensions()?;
    if channel_binding != state.channel_binding {
        return Err(ScramError::ChannelBindingMismatch);
    }
    if nonce != state.nonce.as_slice() {
        return Err(ScramError::NonceMismatch);
    }

    let auth_message = [state.auth_message_prefix.as_slice(), without_proof];
    let client_signature = hmac_sha256(&state.stored_key, &auth_message);
    let client_key = xor(&proof, &client_signature);
    if !bool::from(stored_key(&client_key).ct_eq(&state.stored_key)) {
        return Err(ScramError::InvalidProof);
    }
    let server_signature = hmac_sha256(&state.server_key, &auth_message);
    let server_final = [b"v=", BASE64.encode(server_signature).as_bytes()].concat();
    Ok((ClientKey(client_key), server_final))
}

/// Splits `gs2-header client-first-message-bare`, returning the `c=` value the client must
/// send later and the bare message.
fn split_gs2_header(client_first: &[u8]) -> Result<(&'static [u8], &[u8]), ScramError> {
    let (channel_binding, rest) = match client_first {
        [b'n', b',', rest @ ..] => (CBIND_NONE, rest),
        // The client could bind but thinks we cannot; true, as we never offer -PLUS.
        [b'y', b',', rest @ ..] => (CBIND_CLIENT_SUPPORTS, rest),
        [b'p', b'=', ..] => return Err(ScramError::UnsupportedChannelBinding),
        _ => {
            return Err(ScramError::Malformed(
                "gs2 header must start with n, y or p=",
            ))
        }
    };
    match rest {
        [b',', bare @ ..] => Ok((channel_binding, bare)),
        [b'a', b'=', ..] => Err(ScramError::AuthzidNotSupported),
        _ => Err(ScramError::Malformed("gs2 header is not terminated")),
    }
}

/// Parses `[m=...,] n=<user>,r=<nonce>[,extensions]` and returns the client nonce.
fn parse_client_first_bare(bare: &[u8]) -> Result<&[u8], ScramError> {
    let mut attrs = Attributes::new(bare);
    match attrs.next()? {
        Some((b'n', _ignored_user)) => {}
        Some((b'm', _)) => return Err(ScramError::UnsupportedExtension),
        _ => return Err(ScramError::Malformed("client-first-message lacks n=")),
    }
    let nonce = attrs.expect(b'r', "client-first-message lacks r=")?;
    if !is_valid_nonce(nonce) {
        return Err(ScramError::Malformed(
            "client nonce is empty or not printable",
        ));
    }
    attrs.skip_extensions()?;
    Ok(nonce)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWORD: &str = "pscale_pw_test";
    const CLIENT_NONCE: &str = "fyko+d2lbbFgONRv9qkxdawL";
    const SERVER_NONCE: &[u8] = b"3rfcNHYJY1ZVvWVs7j";

    fn verifier() -> ScramVerifier {
        ScramVerifier::from_password(PASSWORD, b"0123456789abcdef", 4096)
    }

    fn start(client_first: &[u8]) -> Result<(ServerFirst, Vec<u8>), ScramError> {
        server_start_with_nonce(client_first, &verifier(), SERVER_NONCE)
    }

    fn combined_nonce() -> String {
        format!("{CLIENT_NONCE}3rfcNHYJY1ZVvWVs7j")
    }

    /// A correct client-final-message for `gs2_header` + `n=,r=CLIENT_NONCE`.
    fn client_final(gs2_header: &str, cbind: &str) -> (ServerFirst, Vec<u8>) {
        let bare = format!("n=,r={CLIENT_NONCE}");
        let (state, server_first) =
            start(format!("{gs2_header}{bare}").as_bytes()).expect("server-first");
        let without_proof = format!("c={cbind},r={}", combined_nonce());
        let server_first = String::from_utf8(server_first).expect("ASCII");
        let auth_message = format!("{bare},{server_first},{without_proof}");
        let salted =
            crate::auth::verifier::salted_password(PASSWORD.as_bytes(), b"0123456789abcdef", 4096);
        let client_key = crate::auth::verifier::client_key(&salted);
        let signature = hmac_sha256(&stored_key(&client_key), &[auth_message.as_bytes()]);
        let proof = BASE64.encode(xor(&client_key, &signature));
        (state, format!("{without_proof},p={proof}").into_bytes())
    }

    #[test]
    fn server_first_message_bytes() {
        let (state, server_first) = start(b"n,,n=,r=abc").expect("valid");
        assert_eq!(
            server_first,
            b"r=abc3rfcNHYJY1ZVvWVs7j,s=MDEyMzQ1Njc4OWFiY2RlZg==,i=4096"
        );
        assert_eq!(
            state.auth_message_prefix,
            [b"n=,r=abc,", &server_first[..], b","].concat()
        );
        assert!(!format!("{state:?}").contains("key"));
    }

    #[test]
    fn random_server_nonce_extends_the_client_nonce() {
        let (_, a) = server_start(b"n,,n=,r=abc", &verifier()).expect("valid");
        let (_, b) = server_start(b"n,,n=,r=abc", &verifier()).expect("valid");
        assert_ne!(a, b);
        assert!(a.starts_with(b"r=abc") && b.starts_with(b"r=abc"));
        // 24 base64 characters of randomness, then ",s=".
        assert_eq!(a.iter().position(|&c| c == b','), Some(5 + 24));
    }

    #[test]
    fn accepts_n_and_y_headers_and_extensions() {
        for (header, cbind) in [("n,,", "biws"), ("y,,", "eSws")] {
            let (state, message) = client_final(header, cbind);
            server_finish(state, &message).expect("valid proof");
        }
        assert!(start(b"n,,n=alice,r=abc,x=ext").is_ok());
        assert!(start(b"n,,n==2Cweird=3D,r=abc").is_ok());
    }

    #[test]
    fn rejects_bad_client_first() {
        let cases: &[(&[u8], ScramError)] = &[
            (
                b"p=tls-server-end-point,,n=,r=abc",
                ScramError::UnsupportedChannelBinding,
            ),
            (b"n,a=admin,n=,r=abc", ScramError::AuthzidNotSupported),
            (b"n,,m=ext,n=,r=abc", ScramError::UnsupportedExtension),
            (
                b"",
                ScramError::Malformed("gs2 header must start with n, y or p="),
            ),
            (
                b"n",
                ScramError::Malformed("gs2 header must start with n, y or p="),
            ),
            (
                b"x,,n=,r=abc",
                ScramError::Malformed("gs2 header must start with n, y or p="),
            ),
            (b"n,", ScramError::Malformed("gs2 header is not terminated")),
            (
                b"n,x,n=,r=abc",
                ScramError::Malformed("gs2 header is not terminated"),
            ),
            (b"n,,", ScramError::Malformed("attribute is not 'x=value'")),
            (
                b"n,,r=abc",
                ScramError::Malformed("client-first-message lacks n="),
            ),
            (
                b"n,,n=",
                ScramError::Malformed("client-first-message lacks r="),
            ),
            (
                b"n,,n=,s=abc",
                ScramError::Malformed("client-first-message lacks r="),
            ),
            (
                b"n,,n=,r=",
                ScramError::Malformed("client nonce is empty or not printable"),
            ),
            (
                b"n,,n=,r=a b",
                ScramError::Malformed("client nonce is empty or not printable"),
            ),
            (
                b"n,,n=,r=a\x80",
                ScramError::Malformed("client nonce is empty or not printable"),
            ),
            (
                b"n,,n=,r=abc,",
                ScramError::Malformed("attribute is not 'x=value'"),
            ),
        ];
        for (message, expected) in cases {
            assert_eq!(start(message).err().as_ref(), Some(expected), "{message:?}");
        }
        let bad_nonce = server_start_with_nonce(b"n,,n=,r=abc", &verifier(), b"a,b");
        assert!(bad_nonce.is_err());
    }

    #[test]
    fn rejects_bad_client_final() {
        let (_, good) = client_final("n,,", "biws");
        let good = String::from_utf8(good).expect("ASCII");
        let proof_at = good.find(",p=").expect("has proof");
        let proof = &good[proof_at..];
        let nonce = combined_nonce();
        let mut tampered = good.clone().into_bytes();
        let first = &mut tampered[proof_at + 3];
        *first = if *first == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).expect("ASCII");
        let cases: Vec<(String, ScramError)> = vec![
            (
                format!("c=eSws,r={nonce}{proof}"),
                ScramError::ChannelBindingMismatch,
            ),
            (
                format!("c=biws,r={nonce}x{proof}"),
                ScramError::NonceMismatch,
            ),
            (
                format!("c=biws,r={}{proof}", &nonce[1..]),
                ScramError::NonceMismatch,
            ),
            (
                format!("r={nonce},c=biws{proof}"),
                ScramError::Malformed("client-final-message must start with c="),
            ),
            (
                format!("c=biws{proof}"),
                ScramError::Malformed("client-final-message lacks r="),
            ),
            (
                format!("c=biws,r={nonce}"),
                ScramError::Malformed("client-final-message has no proof"),
            ),
            (
                format!("c=biws,r={nonce},p=!!!"),
                ScramError::Malformed("proof is not 32 bytes of base64"),
            ),
            (
                format!("c=biws,r={nonce},p=YWJj"),
                ScramError::Malformed("proof is not 32 bytes of base64"),
            ),
            (tampered, ScramError::InvalidProof),
            (
                good[..good.len() - 1].to_string(),
                ScramError::Malformed("proof is not 32 bytes of base64"),
            ),
            (
                good[..proof_at + 2].to_string(),
                ScramError::Malformed("client-final-message has no proof"),
            ),
            (
                String::new(),
                ScramError::Malformed("client-final-message has no proof"),
            ),
        ];
        for (message, expected) in cases {
            let (state, _) = client_final("n,,", "biws");
            assert_eq!(
                server_finish(state, message.as_bytes()).err(),
                Some(expected),
                "{message}"
            );
        }
    }

    #[test]
    fn y_header_requires_y_binding() {
        let (state, message) = client_final("y,,", "biws");
        assert_eq!(
            server_finish(state, &message).err(),
            Some(ScramError::ChannelBindingMismatch)
        );
    }
}
