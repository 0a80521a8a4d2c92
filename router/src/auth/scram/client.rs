//! The client side of SCRAM-SHA-256: the router logging in to a backend with a client's
//! ClientKey, or a password holder (the load generator) logging in anywhere.
//!
//! The client-first-message is `n,,n=,r=<nonce>` like libpq's: no channel binding (a backend
//! over TLS offers -PLUS, and `y` would then be a downgrade it must refuse), and an empty user
//! name because PostgreSQL takes the role from the StartupMessage.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use subtle::ConstantTimeEq;

use super::{
    decode_key, is_valid_nonce, random_nonce, xor, Attributes, ClientCredentials, Pbkdf2,
    SaltedPasswordSource, ScramError,
};
use crate::auth::verifier::{self, hmac_sha256, KEY_LEN};

/// The most PBKDF2 iterations we compute for a server: a hostile or misconfigured server could
/// otherwise make each login cost seconds of CPU. PostgreSQL's default is 4096.
pub const MAX_CLIENT_ITERATIONS: u32 = 1_000_000;

enum Step {
    AwaitingServerFirst,
    AwaitingServerFinal { server_signature: [u8; KEY_LEN] },
}

/// A SCRAM-SHA-256 client exchange: [`ScramClient::new`], then
/// [`ScramClient::handle_server_first`], then [`ScramClient::verify_server_final`].
pub struct ScramClient {
    credentials: ClientCredentials,
    /// `n=<user>,r=<nonce>`, the first part of the AuthMessage.
    client_first_bare: Vec<u8>,
    /// Where the nonce starts in `client_first_bare`.
    nonce_at: usize,
    step: Step,
}

impl fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramClient")
            .field(
                "client_first_bare",
                &String::from_utf8_lossy(&self.client_first_bare),
            )
            .finish_non_exhaustive()
    }
}

impl ScramClient {
    /// Starts an exchange with a random nonce; returns the client-first-message
    /// (`n,,n=,r=<nonce>`) for SASLInitialResponse.
    pub fn new(credentials: ClientCredentials) -> (Self, Vec<u8>) {
        Self::start(credentials, b"", random_nonce().as_bytes())
    }

    /// [`ScramClient::new`] with a chosen nonce, for tests; it must be printable ASCII
    /// without ','. Never reuse a nonce in production.
    pub fn new_with_nonce(
        credentials: ClientCredentials,
        nonce: &str,
    ) -> Result<(Self, Vec<u8>), ScramError> {
        if !is_valid_nonce(nonce.as_bytes()) {
            return Err(ScramError::Malformed(
                "client nonce is empty or not printable",
            ));
        }
        Ok(Self::start(credentials, b"", nonce.as_bytes()))
    }

    /// `user` must already be a SASL name (',' and '=' escaped); only the RFC test vector
    /// needs a non-empty one.
    pub(super) fn start(
        credentials: ClientCredentials,
        user: &[u8],
        nonce: &[u8],
    ) -> (Self, Vec<u8>) {
        let client_first_bare = [b"n=", user, b",r=", nonce].concat();
        let client_first = [b"n,,", client_first_bare.as_slice()].concat();
        let client = Self {
            credentials,
            nonce_at: client_first_bare.len() - nonce.len(),
            client_first_bare,
            step: Step::AwaitingServerFirst,
        };
        (client, client_first)
    }

    /// Answers the server-first-message (AuthenticationSASLContinue) with the
    /// client-final-message (SASLResponse), computing PBKDF2 for a password.
    pub fn handle_server_first(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        self.handle_server_first_with(server_first, &mut Pbkdf2)
    }

    /// [`ScramClient::handle_server_first`] taking SaltedPassword from `source` (consulted only
    /// for [`ClientCredentials::Password`]).
    pub fn handle_server_first_with<S: SaltedPasswordSource + ?Sized>(
        &mut self,
        server_first: &[u8],
        source: &mut S,
    ) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.step, Step::AwaitingServerFirst) {
            return Err(ScramError::OutOfOrder);
        }
        let mut attrs = Attributes::new(server_first);
        let nonce = match attrs.next()? {
            Some((b'r', nonce)) => nonce,
            Some((b'm', _)) => return Err(ScramError::UnsupportedExtension),
            _ => {
                return Err(ScramError::Malformed(
                    "server-first-message must start with r=",
                ))
            }
        };
        let client_nonce = &self.client_first_bare[self.nonce_at..];
        if nonce.len() <= client_nonce.len() || !nonce.starts_with(client_nonce) {
            return Err(ScramError::NonceMismatch);
        }
        if !is_valid_nonce(nonce) {
            return Err(ScramError::Malformed("server nonce is not printable"));
        }
        let salt = attrs.expect(b's', "server-first-message lacks s=")?;
        let salt = match BASE64.decode(salt) {
            Ok(salt) if !salt.is_empty() => salt,
            _ => return Err(ScramError::Malformed("salt is empty or not base64")),
        };
        let iterations = parse_iterations(attrs.expect(b'i', "server-first-message lacks i=")?)?;
        attrs.skip_extensions()?;

        let (client_key, server_key) = match &self.credentials {
            ClientCredentials::Keys {
                client_key,
                server_key,
            } => (*client_key, *server_key),
            ClientCredentials::Password(password) => {
                if iterations > MAX_CLIENT_ITERATIONS {
                    return Err(ScramError::IterationsOutOfRange);
                }
                let salted = source.salted_password(password, &salt, iterations);
                (verifier::client_key(&salted), verifier::server_key(&salted))
            }
        };

        let without_proof = [b"c=biws,r=", nonce].concat();
        let auth_message = [
            self.client_first_bare.as_slice(),
            b",",
            server_first,
            b",",
            &without_proof,
        ];
        let client_signature = hmac_sha256(&verifier::stored_key(&client_key), &auth_message);
        let proof = xor(&client_key, &client_signature);
        self.step = Step::AwaitingServerFinal {
            server_signature: hmac_sha256(&server_key, &auth_message),
        };
        Ok([
            without_proof.as_slice(),
            b",p=",
            BASE64.encode(proof).as_bytes(),
        ]
        .concat())
    }

    /// Checks the server-final-message (AuthenticationSASLFinal): `v=` must carry the
    /// ServerSignature only a holder of the verifier can compute.
    pub fn verify_server_final(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let Step::AwaitingServerFinal { server_signature } = &self.step else {
            return Err(ScramError::OutOfOrder);
        };
        let mut attrs = Attributes::new(server_final);
        match attrs.next()? {
            Some((b'v', signature)) => {
                let signature =
                    decode_key(signature, "server signature is not 32 bytes of base64")?;
                attrs.skip_extensions()?;
                if bool::from(signature.ct_eq(server_signature)) {
                    Ok(())
                } else {
                    Err(ScramError::ServerSignatureMismatch)
                }
            }
            Some((b'e', error)) => Err(ScramError::ServerError(
                String::from_utf8_lossy(error).into_owned(),
            )),
            _ => Err(ScramError::Malformed(
                "server-final-message must start with v= or e=",
            )),
        }
    }
}

fn parse_iterations(text: &[u8]) -> Result<u32, ScramError> {
    if text.is_empty() || !text.iter().all(u8::is_ascii_digit) {
        return Err(ScramError::Malformed("iteration count is not a number"));
    }
    // All digits, so the only failure left is overflow.
    match std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse::<u32>().ok())
    {
        Some(n) if n > 0 => Ok(n),
        _ => Err(ScramError::IterationsOutOfRange),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::scram::{server_finish, server_start_with_nonce, SaltedPasswordCache};
    use crate::auth::verifier::ScramVerifier;

    const SERVER_FIRST: &[u8] = b"r=abcXYZ,s=c2FsdA==,i=16";

    fn password_client() -> ScramClient {
        let credentials = ClientCredentials::Password("pw".into());
        let (client, first) = ScramClient::new_with_nonce(credentials, "abc").expect("nonce");
        assert_eq!(first, b"n,,n=,r=abc");
        client
    }

    fn keys_client() -> ScramClient {
        let credentials = ClientCredentials::Keys {
            client_key: [1; KEY_LEN],
            server_key: [2; KEY_LEN],
        };
        ScramClient::new_with_nonce(credentials, "abc")
            .expect("nonce")
            .0
    }

    #[test]
    fn client_first_message() {
        let (_, a) = ScramClient::new(ClientCredentials::Password("pw".into()));
        let (_, b) = ScramClient::new(ClientCredentials::Password("pw".into()));
        assert_ne!(a, b);
        assert!(a.starts_with(b"n,,n=,r="));
        assert_eq!(a.len(), 8 + 24);
        let credentials = ClientCredentials::Password("pw".into());
        assert!(ScramClient::new_with_nonce(credentials.clone(), "").is_err());
        assert!(ScramClient::new_with_nonce(credentials, "a,b").is_err());
    }

    #[test]
    fn client_final_message_bytes() {
        let mut client = keys_client();
        let final_message = client.handle_server_first(SERVER_FIRST).expect("valid");
        let text = String::from_utf8(final_message).expect("ASCII");
        let proof = text.strip_prefix("c=biws,r=abcXYZ,p=").expect("layout");
        assert_eq!(proof.len(), 44);
    }

    #[test]
    fn rejects_bad_server_first() {
        let cases: &[(&[u8], ScramError)] = &[
            (b"r=abc,s=c2FsdA==,i=16", ScramError::NonceMismatch),
            (b"r=abXYZ,s=c2FsdA==,i=16", ScramError::NonceMismatch),
            (b"r=xabc,s=c2FsdA==,i=16", ScramError::NonceMismatch),
            (
                b"r=abc\x01,s=c2FsdA==,i=16",
                ScramError::Malformed("server nonce is not printable"),
            ),
            (
                b"m=x,r=abcXYZ,s=c2FsdA==,i=16",
                ScramError::UnsupportedExtension,
            ),
            (b"", ScramError::Malformed("attribute is not 'x=value'")),
            (
                b"s=c2FsdA==",
                ScramError::Malformed("server-first-message must start with r="),
            ),
            (
                b"r=abcXYZ",
                ScramError::Malformed("server-first-message lacks s="),
            ),
            (
                b"r=abcXYZ,i=16",
                ScramError::Malformed("server-first-message lacks s="),
            ),
            (
                b"r=abcXYZ,s=c2FsdA",
                ScramError::Malformed("salt is empty or not base64"),
            ),
            (
                b"r=abcXYZ,s=,i=16",
                ScramError::Malformed("salt is empty or not base64"),
            ),
            (
                b"r=abcXYZ,s=c2FsdA==",
                ScramError::Malformed("server-first-message lacks i="),
            ),
            (
                b"r=abcXYZ,s=c2FsdA==,i=",
                ScramError::Malformed("iteration count is not a number"),
            ),
            (
                b"r=abcXYZ,s=c2FsdA==,i=-1",
                ScramError::Malformed("iteration count is not a number"),
            ),
            (b"r=abcXYZ,s=c2FsdA==,i=0", ScramError::IterationsOutOfRange),
            (
                b"r=abcXYZ,s=c2FsdA==,i=99999999999",
                ScramError::IterationsOutOfRange,
            ),
            (
                b"r=abcXYZ,s=c2FsdA==,i=1000001",
                ScramError::IterationsOutOfRange,
            ),
            (
                b"r=abcXYZ,s=c2FsdA==,i=16,",
                ScramError::Malformed("attribute is not 'x=value'"),
            ),
        ];
        for (message, expected) in cases {
            let result = password_client().handle_server_first(message);
            assert_eq!(result.err().as_ref(), Some(expected), "{message:?}");
        }
        assert!(password_client()
            .handle_server_first(b"r=abcXYZ,s=c2FsdA==,i=16,x=ext")
            .is_ok());
    }

    #[test]
    fn keys_need_no_pbkdf2_so_any_iteration_count_is_fine() {
        let mut client = keys_client();
        assert!(client
            .handle_server_first(b"r=abcXYZ,s=c2FsdA==,i=2000000000")
            .is_ok());
    }

    #[test]
    fn steps_in_order() {
        let mut client = password_client();
        assert_eq!(
            client.verify_server_final(b"v=x"),
            Err(ScramError::OutOfOrder)
        );
        client.handle_server_first(SERVER_FIRST).expect("valid");
        assert_eq!(
            client.handle_server_first(SERVER_FIRST),
            Err(ScramError::OutOfOrder)
        );
    }

    #[test]
    fn rejects_bad_server_final() {
        let mut client = password_client();
        client.handle_server_first(SERVER_FIRST).expect("valid");
        let wrong = format!("v={}", BASE64.encode([0u8; KEY_LEN]));
        let cases: &[(&[u8], ScramError)] = &[
            (wrong.as_bytes(), ScramError::ServerSignatureMismatch),
            (
                b"e=invalid-proof",
                ScramError::ServerError("invalid-proof".into()),
            ),
            (
                b"v=",
                ScramError::Malformed("server signature is not 32 bytes of base64"),
            ),
            (
                b"v=YWJj",
                ScramError::Malformed("server signature is not 32 bytes of base64"),
            ),
            (b"", ScramError::Malformed("attribute is not 'x=value'")),
            (
                b"x=1",
                ScramError::Malformed("server-final-message must start with v= or e="),
            ),
        ];
        for (message, expected) in cases {
            assert_eq!(
                client.verify_server_final(message).err().as_ref(),
                Some(expected)
            );
        }
    }

    /// Counts calls, answering with real PBKDF2.
    #[derive(Default)]
    struct Counting(usize);

    impl SaltedPasswordSource for Counting {
        fn salted_password(
            &mut self,
            password: &str,
            salt: &[u8],
            iterations: u32,
        ) -> [u8; KEY_LEN] {
            self.0 += 1;
            Pbkdf2.salted_password(password, salt, iterations)
        }
    }

    #[test]
    fn salted_password_hook_is_used_for_passwords_only() {
        let verifier = ScramVerifier::from_password("pw", b"salt", 16);
        let mut cache = SaltedPasswordCache::new();
        for _ in 0..3 {
            let (mut client, first) = ScramClient::new(ClientCredentials::Password("pw".into()));
            let (state, server_first) =
                server_start_with_nonce(&first, &verifier, b"srv").expect("server-first");
            let client_final = client
                .handle_server_first_with(&server_first, &mut cache)
                .expect("client-final");
            let (_, server_final) = server_finish(state, &client_final).expect("accepted");
            client.verify_server_final(&server_final).expect("verified");
        }
        assert_eq!(cache.len(), 1);

        let mut counting = Counting::default();
        keys_client()
            .handle_server_first_with(SERVER_FIRST, &mut counting)
            .expect("valid");
        assert_eq!(counting.0, 0);
        password_client()
            .handle_server_first_with(SERVER_FIRST, &mut counting)
            .expect("valid");
        assert_eq!(counting.0, 1);
    }

    #[test]
    fn debug_is_redacted() {
        let password = ClientCredentials::Password("hunter2".into());
        assert!(!format!("{password:?}").contains("hunter2"));
        let (client, _) = ScramClient::new(password);
        assert!(!format!("{client:?}").contains("hunter2"));
    }
}
