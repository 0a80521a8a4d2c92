//! The SCRAM-SHA-256 exchange (RFC 5802, RFC 7677), as PostgreSQL runs it inside
//! SASLInitialResponse / SASLContinue / SASLResponse / SASLFinal messages
//! (<https://www.postgresql.org/docs/current/sasl-authentication.html>).
//!
//! - [`server`]: the router checking a client: [`server_start`], then [`server_finish`], which
//!   yields the client's [`ClientKey`].
//! - [`client`]: [`ScramClient`], for the router logging in to a backend with that ClientKey,
//!   or for anyone holding the password (the load generator).
//! - [`credentials`]: [`ClientCredentials`] for the client, and the [`SaltedPasswordSource`]
//!   hook that lets a load generator cache PBKDF2.
//!
//! Channel binding is not offered (no SCRAM-SHA-256-PLUS), so the gs2 header is `n,,` or `y,,`.
//! Messages here are the SASL payloads only; framing belongs to [`crate::protocol`].

pub mod client;
pub mod credentials;
pub mod server;

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rand::rngs::OsRng;
use rand::RngCore;

use super::verifier::{self, KEY_LEN};

pub use client::{ScramClient, MAX_CLIENT_ITERATIONS};
pub use credentials::{ClientCredentials, Pbkdf2, SaltedPasswordCache, SaltedPasswordSource};
pub use server::{server_finish, server_start, server_start_with_nonce, ServerFirst};

/// Random bytes in a nonce we generate; base64 makes them 24 characters, as libpq does.
const NONCE_RANDOM_BYTES: usize = 18;

/// Why a SCRAM exchange failed. Only [`ScramError::InvalidProof`] means "wrong password"
/// (SQLSTATE 28P01); the others are protocol violations (08P01) on the server side, or a
/// misbehaving server on the client side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// A message does not follow the RFC 5802 grammar; the text says which part.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The client asked for channel binding (`p=`), which needs SCRAM-SHA-256-PLUS; the
    /// router does not advertise it.
    #[error("SCRAM channel binding is not supported")]
    UnsupportedChannelBinding,
    /// The `c=` attribute of the client-final-message does not repeat the gs2 header the
    /// client sent first.
    #[error("SCRAM channel binding attribute does not match the gs2 header")]
    ChannelBindingMismatch,
    /// The client sent an authorization identity (`a=`); PostgreSQL rejects these as well.
    #[error("SCRAM authorization identity is not supported")]
    AuthzidNotSupported,
    /// A mandatory extension (`m=`) was sent; none is defined, so none is supported.
    #[error("SCRAM mandatory extension is not supported")]
    UnsupportedExtension,
    /// The client-final nonce is not the combined nonce, or the server's nonce does not
    /// extend the client's.
    #[error("SCRAM nonce mismatch")]
    NonceMismatch,
    /// The client's proof does not match the verifier: a wrong password, or a role that does
    /// not exist (mock verifier). Maps to SQLSTATE 28P01.
    #[error("SCRAM client proof is invalid")]
    InvalidProof,
    /// The server's signature is wrong: it does not hold the verifier we expect.
    #[error("SCRAM server signature does not match")]
    ServerSignatureMismatch,
    /// The server ended the exchange with `e=<value>`; the value is RFC 5802's error token.
    #[error("SCRAM server error: {0}")]
    ServerError(String),
    /// The server's iteration count is 0, or too large to compute PBKDF2 for
    /// (above [`MAX_CLIENT_ITERATIONS`]).
    #[error("SCRAM iteration count out of range")]
    IterationsOutOfRange,
    /// A client step was called out of order (twice, or before the previous one).
    #[error("SCRAM step called out of order")]
    OutOfOrder,
}

/// The client's ClientKey, recovered from its proof: enough to log in to any server holding
/// the same verifier, so treat it like the password.
#[derive(Clone, Copy)]
pub struct ClientKey(pub [u8; KEY_LEN]);

impl ClientKey {
    /// `SHA-256(ClientKey)`, the StoredKey of the verifier this key matches.
    pub fn stored_key(&self) -> [u8; KEY_LEN] {
        verifier::stored_key(&self.0)
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientKey(<redacted>)")
    }
}

/// A fresh nonce: 18 random bytes in base64, which has no ',' and needs no padding.
fn random_nonce() -> String {
    let mut bytes = [0u8; NONCE_RANDOM_BYTES];
    OsRng.fill_bytes(&mut bytes);
    BASE64.encode(bytes)
}

/// RFC 5802 `printable`: %x21-2B / %x2D-7E, at least one character.
fn is_valid_nonce(nonce: &[u8]) -> bool {
    !nonce.is_empty()
        && nonce
            .iter()
            .all(|&b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// Decodes a base64 proof or signature that must be exactly one key long.
fn decode_key(text: &[u8], what: &'static str) -> Result<[u8; KEY_LEN], ScramError> {
    BASE64
        .decode(text)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or(ScramError::Malformed(what))
}

fn xor(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// Reads the `x=value,y=value` attributes of a SCRAM message in order.
struct Attributes<'a> {
    rest: Option<&'a [u8]>,
}

impl<'a> Attributes<'a> {
    fn new(message: &'a [u8]) -> Self {
        Self {
            rest: Some(message),
        }
    }

    /// The next attribute as (name, value); `None` once the message is used up.
    fn next(&mut self) -> Result<Option<(u8, &'a [u8])>, ScramError> {
        let Some(rest) = self.rest else {
            return Ok(None);
        };
        let field = match rest.iter().position(|&b| b == b',') {
            Some(comma) => {
                self.rest = Some(&rest[comma + 1..]);
                &rest[..comma]
            }
            None => {
                self.rest = None;
                rest
            }
        };
        match field {
            [name, b'=', value @ ..] if name.is_ascii_alphabetic() => Ok(Some((*name, value))),
            _ => Err(ScramError::Malformed("attribute is not 'x=value'")),
        }
    }

    /// The next attribute, which must be called `name`; its value.
    fn expect(&mut self, name: u8, missing: &'static str) -> Result<&'a [u8], ScramError> {
        match self.next()? {
            Some((found, value)) if found == name => Ok(value),
            _ => Err(ScramError::Malformed(missing)),
        }
    }

    /// Skips optional extensions (allowed at the end of every message), checking their form.
    fn skip_extensions(&mut self) -> Result<(), ScramError> {
        while self.next()?.is_some() {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::verifier::ScramVerifier;

    // RFC 7677 section 3.
    const CLIENT_FIRST: &[u8] = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_NONCE: &[u8] = b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const SERVER_FIRST: &[u8] = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
        s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &[u8] = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
        p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &[u8] = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_verifier() -> ScramVerifier {
        let salt = BASE64
            .decode("W22ZaJ0SNY7soEsUEjb6gQ==")
            .expect("test salt");
        ScramVerifier::from_password("pencil", &salt, 4096)
    }

    /// Runs our client against our server and returns the ClientKey the server recovered.
    fn exchange(
        credentials: ClientCredentials,
        verifier: &ScramVerifier,
    ) -> Result<ClientKey, ScramError> {
        let (mut client, client_first) = ScramClient::new(credentials);
        let (state, server_first) = server_start(&client_first, verifier)?;
        let client_final = client.handle_server_first(&server_first)?;
        let (key, server_final) = server_finish(state, &client_final)?;
        client.verify_server_final(&server_final)?;
        Ok(key)
    }

    #[test]
    fn rfc7677_vector_through_our_server() {
        let (state, server_first) =
            server_start_with_nonce(CLIENT_FIRST, &rfc_verifier(), SERVER_NONCE)
                .expect("server-first");
        assert_eq!(server_first, SERVER_FIRST);
        let (key, server_final) = server_finish(state, CLIENT_FINAL).expect("proof accepted");
        assert_eq!(server_final, SERVER_FINAL);
        assert_eq!(key.stored_key(), rfc_verifier().stored_key);
    }

    #[test]
    fn rfc7677_vector_through_our_client_with_password_and_keys() {
        let salt = BASE64
            .decode("W22ZaJ0SNY7soEsUEjb6gQ==")
            .expect("test salt");
        let salted = verifier::salted_password(b"pencil", &salt, 4096);
        let keys = ClientCredentials::Keys {
            client_key: verifier::client_key(&salted),
            server_key: verifier::server_key(&salted),
        };
        for credentials in [ClientCredentials::Password("pencil".into()), keys] {
            let (mut client, client_first) =
                ScramClient::start(credentials, b"user", b"rOprNGfwEbeRWgbNEkqO");
            assert_eq!(client_first, CLIENT_FIRST);
            let client_final = client
                .handle_server_first(SERVER_FIRST)
                .expect("client-final");
            assert_eq!(client_final, CLIENT_FINAL);
            client
                .verify_server_final(SERVER_FINAL)
                .expect("server verified");
        }
    }

    #[test]
    fn our_client_and_server_agree() {
        let verifier = ScramVerifier::generate("pscale_pw_secret");
        let key = exchange(
            ClientCredentials::Password("pscale_pw_secret".into()),
            &verifier,
        )
        .expect("right password");
        assert_eq!(key.stored_key(), verifier.stored_key);
        assert_eq!(
            exchange(ClientCredentials::Password("wrong".into()), &verifier).err(),
            Some(ScramError::InvalidProof)
        );
    }

    #[test]
    fn router_in_the_middle_reuses_the_client_key() {
        let verifier = ScramVerifier::generate("pscale_pw_secret");
        // Client to router: the router learns the ClientKey, never the password.
        let key = exchange(
            ClientCredentials::Password("pscale_pw_secret".into()),
            &verifier,
        )
        .expect("client authenticates to the router");
        // Router to backend, which has the same verifier (and picks its own nonce).
        let credentials = ClientCredentials::from_client_key(key, &verifier);
        let backend_key = exchange(credentials, &verifier).expect("router authenticates");
        assert_eq!(backend_key.0, key.0);
    }

    #[test]
    fn router_detects_a_backend_without_the_verifier() {
        let verifier = ScramVerifier::generate("pw");
        let key = exchange(ClientCredentials::Password("pw".into()), &verifier).expect("login");
        let other_backend = ScramVerifier::generate("pw");
        let credentials = ClientCredentials::from_client_key(key, &verifier);
        assert_eq!(
            exchange(credentials, &other_backend).err(),
            Some(ScramError::InvalidProof)
        );
        // A server that has the StoredKey but not the ServerKey cannot fool the client.
        let mut forged = verifier.clone();
        forged.server_key = [0u8; KEY_LEN];
        let credentials = ClientCredentials::from_client_key(key, &verifier);
        assert_eq!(
            exchange(credentials, &forged).err(),
            Some(ScramError::ServerSignatureMismatch)
        );
    }

    #[test]
    fn mock_verifier_fails_like_a_wrong_password() {
        let mock = ScramVerifier::mock(
            "b1",
            "ghost",
            crate::auth::VerifierShape::DEFAULT,
            &[9u8; KEY_LEN],
        );
        for password in ["", "pencil", "pscale_pw_guess"] {
            assert_eq!(
                exchange(ClientCredentials::Password(password.into()), &mock).err(),
                Some(ScramError::InvalidProof)
            );
        }
    }

    #[test]
    fn attributes_reader() {
        let mut attrs = Attributes::new(b"a=1,b=,c=x=y");
        assert_eq!(attrs.next(), Ok(Some((b'a', &b"1"[..]))));
        assert_eq!(attrs.expect(b'b', "b"), Ok(&b""[..]));
        assert_eq!(attrs.next(), Ok(Some((b'c', &b"x=y"[..]))));
        assert_eq!(attrs.next(), Ok(None));
        for bad in [&b""[..], b"a", b"=1", b"1=1", b"a=1,", b"a=1,,b=2", b"ab=1"] {
            let mut attrs = Attributes::new(bad);
            assert!(attrs.skip_extensions().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn client_key_debug_is_redacted() {
        assert_eq!(
            format!("{:?}", ClientKey([1; KEY_LEN])),
            "ClientKey(<redacted>)"
        );
    }
}
