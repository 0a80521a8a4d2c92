//! SCRAM fixture: a client's side of one exchange, computed once (PBKDF2 included) so that a
//! bench times only the router's server side.

use branchgate::auth::scram::{
    server_finish, server_start_with_nonce, ClientCredentials, ClientKey, ScramClient, ScramError,
};
use branchgate::auth::verifier::ScramVerifier;

/// The password of the fixture role (the `pscale_pw_` form the router's CLI generates).
pub const PASSWORD: &str = "pscale_pw_bench0123456789abcdefghijklmnopqrstuvwxyz";
/// A libpq-length (24 characters) client nonce.
pub const CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO1234";
/// A fixed server nonce, which is what lets the client-final-message be precomputed. The
/// router draws 18 random bytes instead; the `scram` bench times that part separately.
pub const SERVER_NONCE: &[u8] = b"%hvYDpWUa2RaTCAfuxFIlj)h";

/// The messages a client sends in one exchange against [`Self::verifier`].
pub struct ScramFixture {
    /// The role's verifier (default iterations, random salt), as the catalog holds it.
    pub verifier: ScramVerifier,
    /// SASLInitialResponse data.
    pub client_first: Vec<u8>,
    /// SASLResponse data, valid for [`SERVER_NONCE`].
    pub client_final: Vec<u8>,
}

impl ScramFixture {
    /// Runs the client once, PBKDF2 and all.
    pub fn new() -> Result<Self, ScramError> {
        let verifier = ScramVerifier::generate(PASSWORD);
        let credentials = ClientCredentials::Password(PASSWORD.into());
        let (mut client, client_first) = ScramClient::new_with_nonce(credentials, CLIENT_NONCE)?;
        let (_, server_first) = server_start_with_nonce(&client_first, &verifier, SERVER_NONCE)?;
        let client_final = client.handle_server_first(&server_first)?;
        Ok(Self {
            verifier,
            client_first,
            client_final,
        })
    }

    /// The router's whole side of the exchange: server-first, then checking the proof and
    /// recovering the ClientKey. Returns the server-final-message too.
    pub fn server_side(&self) -> Result<(ClientKey, Vec<u8>), ScramError> {
        let (state, _server_first) =
            server_start_with_nonce(&self.client_first, &self.verifier, SERVER_NONCE)?;
        server_finish(state, &self.client_final)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_side_accepts_the_precomputed_client() {
        let fixture = ScramFixture::new().expect("client side");
        let (key, server_final) = fixture.server_side().expect("proof accepted");
        assert_eq!(key.stored_key(), fixture.verifier.stored_key);
        assert!(server_final.starts_with(b"v="));
        // Repeatable: the timed loop runs it many times.
        assert!(fixture.server_side().is_ok());
    }
}
