//! SCRAM-SHA-256 authentication (RFC 5802, RFC 7677) without passwords at the router.
//!
//! The router checks a client against the role's verifier from the catalog ([`verifier`]),
//! recovers the client's ClientKey from its proof ([`scram::server_finish`]), and then proves
//! itself to the backend as that client with the same ClientKey ([`scram::ScramClient`] with
//! [`scram::ClientCredentials::Keys`]); the backend keeps the same verifier. A ClientKey is
//! password-equivalent for SCRAM, so it lives only as long as the connection that produced it.
//!
//! - [`verifier`]: PostgreSQL's `SCRAM-SHA-256$...` verifier format and the key derivations.
//! - [`scram`]: the server side (client to router) and the client side (router to backend).
//! - [`password`]: generated `pscale_pw_...` passwords.
//! - [`mock_secret`]: the persistent secret behind the fake SCRAM exchanges of unknown names.

pub mod mock_secret;
pub mod password;
pub mod scram;
pub mod verifier;

pub use password::generate_password;
pub use scram::{
    server_finish, server_start, ClientCredentials, ClientKey, ScramClient, ScramError, ServerFirst,
};
pub use verifier::{ScramVerifier, VerifierError, VerifierShape};
