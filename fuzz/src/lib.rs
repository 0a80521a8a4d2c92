//! Helpers the fuzz targets share: a SCRAM identity whose keys the targets know, so they can
//! sign messages correctly and check what the router computes from them.

use std::sync::OnceLock;

use aws_lc_rs::hmac;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use branchgate::auth::verifier::{self, ScramVerifier, KEY_LEN};

/// The password, salt and PBKDF2 cost of [`Identity`].
const PASSWORD: &str = "pscale_pw_fuzz";
const SALT: &[u8] = b"fuzz salt 16 byt";
const ITERATIONS: u32 = 4096;

/// A role's verifier and the keys derived from its password (PBKDF2 runs once per process).
pub struct Identity {
    /// What the catalog holds for the role.
    pub verifier: ScramVerifier,
    /// `HMAC(SaltedPassword, "Client Key")`.
    pub client_key: [u8; KEY_LEN],
    /// `HMAC(SaltedPassword, "Server Key")`.
    pub server_key: [u8; KEY_LEN],
    /// A stand-in for a role that does not exist.
    pub mock: ScramVerifier,
}

/// The one identity of this process.
pub fn identity() -> &'static Identity {
    static IDENTITY: OnceLock<Identity> = OnceLock::new();
    IDENTITY.get_or_init(|| {
        let salted = verifier::salted_password(PASSWORD.as_bytes(), SALT, ITERATIONS);
        Identity {
            verifier: ScramVerifier::from_password(PASSWORD, SALT, ITERATIONS),
            client_key: verifier::client_key(&salted),
            server_key: verifier::server_key(&salted),
            mock: ScramVerifier::mock("b1", "ghost", branchgate::auth::VerifierShape::DEFAULT, &[7; KEY_LEN]),
        }
    })
}

/// HMAC-SHA-256, computed with aws-lc-rs rather than the router's own `hmac` crate use.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; KEY_LEN] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), message);
    tag.as_ref().try_into().expect("SHA-256 output is 32 bytes")
}

/// `a XOR b`.
pub fn xor(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// Standard base64 with padding, as SCRAM uses.
pub fn base64(bytes: &[u8]) -> Vec<u8> {
    BASE64.encode(bytes).into_bytes()
}

/// Standard base64 decoding; `None` if invalid.
pub fn unbase64(text: &[u8]) -> Option<Vec<u8>> {
    BASE64.decode(text).ok()
}

/// Splits `flags, u16 length, first part, second part`: the layout of the two-message targets.
pub fn split_two(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&[flags, hi, lo], rest) = data.split_first_chunk::<3>()?;
    let (first, second) = rest.split_at(usize::from(u16::from_be_bytes([hi, lo])).min(rest.len()));
    Some((flags, first, second))
}
