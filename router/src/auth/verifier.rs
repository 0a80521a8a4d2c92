//! SCRAM-SHA-256 verifiers in PostgreSQL's `pg_authid.rolpassword` format, and the key
//! derivations of RFC 5802 section 3 that produce and use them.
//!
//! A verifier is `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` with the salt and
//! keys in standard base64 (with padding), exactly what PostgreSQL writes for
//! `CREATE ROLE ... PASSWORD '...'` under `password_encryption = scram-sha-256`. Because the
//! string is the same on both sides, the catalog can hold it and PostgreSQL can be given it
//! verbatim (`PASSWORD 'SCRAM-SHA-256$...'`).
//!
//! # SASLprep
//! PostgreSQL runs the password through SASLprep (RFC 4013) and falls back to the raw bytes when
//! that fails. SASLprep leaves printable ASCII unchanged, and generated passwords
//! ([`super::password::generate_password`]) are ASCII letters and digits, so the two agree. This
//! module does not implement SASLprep: a non-ASCII password is used as its raw UTF-8 bytes, which
//! may differ from what PostgreSQL derives for the same text (for example when NFKC changes it).

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Length of SHA-256 output, and so of every SCRAM-SHA-256 key.
pub const KEY_LEN: usize = 32;
/// PBKDF2 iterations for new verifiers: PostgreSQL's default `scram_iterations`.
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Salt length for new verifiers, the same as PostgreSQL's `SCRAM_DEFAULT_SALT_LEN`.
pub const DEFAULT_SALT_LEN: usize = 16;
/// PostgreSQL keeps the iteration count in an `int`, so larger values cannot come from it.
pub const MAX_VERIFIER_ITERATIONS: u32 = i32::MAX as u32;

const MECHANISM_PREFIX: &str = "SCRAM-SHA-256$";

// RFC 5802 section 3: the fixed HMAC inputs that turn SaltedPassword into the two keys.
const CLIENT_KEY_LABEL: &[u8] = b"Client Key";
const SERVER_KEY_LABEL: &[u8] = b"Server Key";

// Domain separation for mock verifiers, so their salt and keys are unrelated to each other.
const MOCK_SALT_LABEL: &[u8] = b"branchgate mock scram salt\x00";
const MOCK_STORED_KEY_LABEL: &[u8] = b"branchgate mock scram stored key\x00";
const MOCK_SERVER_KEY_LABEL: &[u8] = b"branchgate mock scram server key\x00";

type HmacSha256 = Hmac<Sha256>;

/// Why a verifier string was rejected. The messages never repeat the string: it is secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifierError {
    /// The string does not start with `SCRAM-SHA-256$` (an MD5 hash or a plain password, say).
    #[error("not a SCRAM-SHA-256 verifier")]
    NotScramSha256,
    /// The `$` / `:` structure is wrong, or a field is empty.
    #[error("malformed SCRAM-SHA-256 verifier: {0}")]
    Malformed(&'static str),
    /// The iteration count is not a decimal number in `1..=i32::MAX`.
    #[error("SCRAM-SHA-256 verifier has an invalid iteration count")]
    InvalidIterations,
    /// The named field is not valid standard base64 with padding.
    #[error("SCRAM-SHA-256 verifier has invalid base64 in its {0}")]
    InvalidBase64(&'static str),
    /// The named key does not decode to exactly 32 bytes.
    #[error("SCRAM-SHA-256 verifier {0} is not 32 bytes")]
    InvalidKeyLength(&'static str),
}

/// A SCRAM-SHA-256 verifier: what a server needs to check a client proof, and nothing that
/// lets it log in as the client.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    /// PBKDF2 iteration count sent to clients in the server-first-message.
    pub iterations: u32,
    /// Salt sent to clients in the server-first-message.
    pub salt: Vec<u8>,
    /// `SHA-256(ClientKey)`: checks a client proof.
    pub stored_key: [u8; KEY_LEN],
    /// `HMAC(SaltedPassword, "Server Key")`: proves the server to the client.
    pub server_key: [u8; KEY_LEN],
}

impl ScramVerifier {
    /// Parses PostgreSQL's `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(text: &str) -> Result<Self, VerifierError> {
        let rest = text
            .strip_prefix(MECHANISM_PREFIX)
            .ok_or(VerifierError::NotScramSha256)?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or(VerifierError::Malformed("missing '$' before the keys"))?;
        let (iterations, salt) = params.split_once(':').ok_or(VerifierError::Malformed(
            "missing ':' after the iteration count",
        ))?;
        let (stored_key, server_key) = keys
            .split_once(':')
            .ok_or(VerifierError::Malformed("missing ':' between the keys"))?;
        let salt = decode_field(salt, "salt")?;
        if salt.is_empty() {
            return Err(VerifierError::Malformed("empty salt"));
        }
        Ok(Self {
            iterations: parse_iterations(iterations)?,
            salt,
            stored_key: decode_key(stored_key, "StoredKey")?,
            server_key: decode_key(server_key, "ServerKey")?,
        })
    }

    /// Derives the verifier PostgreSQL would store for `password` with this salt and count.
    /// `iterations` must be positive; 0 is raised to 1, as PBKDF2 always runs one round.
    /// See the module docs on SASLprep for non-ASCII passwords.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Self {
        let iterations = iterations.max(1);
        let salted = salted_password(password.as_bytes(), salt, iterations);
        Self {
            iterations,
            salt: salt.to_vec(),
            stored_key: stored_key(&client_key(&salted)),
            server_key: server_key(&salted),
        }
    }

    /// A verifier for `password` with a fresh random 16-byte salt and 4096 iterations, the
    /// same parameters PostgreSQL uses by default.
    pub fn generate(password: &str) -> Self {
        let mut salt = [0u8; DEFAULT_SALT_LEN];
        OsRng.fill_bytes(&mut salt);
        Self::from_password(password, &salt, DEFAULT_ITERATIONS)
    }

    /// A stand-in verifier for a role or branch that does not exist, so that authenticating as
    /// it looks exactly like a wrong password: the `shape` (iteration count, salt length) of the
    /// branch's real verifiers, a salt that is stable per branch and role (a changing salt would
    /// reveal the role is fake) and across restarts and routers (`secret` is the operator's
    /// persistent [`super::mock_secret`]), and keys that no password can match short of a
    /// SHA-256 preimage. Without the secret an attacker could compute the mock salts and compare.
    pub fn mock(branch: &str, role: &str, shape: VerifierShape, secret: &[u8; KEY_LEN]) -> Self {
        // Branch ids cannot hold NUL, so "branch\0role" names one pair.
        let name: [&[u8]; 3] = [branch.as_bytes(), b"\0", role.as_bytes()];
        let derive = |label: &[u8], counter: u8| {
            hmac_sha256(secret, &[label, &[counter], name[0], name[1], name[2]])
        };
        let salt_len = shape.salt_len.clamp(1, MAX_MOCK_SALT_LEN);
        let mut salt = Vec::with_capacity(salt_len);
        for counter in 0.. {
            if salt.len() >= salt_len {
                break;
            }
            let block = derive(MOCK_SALT_LABEL, counter);
            let take = (salt_len - salt.len()).min(block.len());
            salt.extend_from_slice(&block[..take]);
        }
        Self {
            iterations: shape.iterations.max(1),
            salt,
            stored_key: derive(MOCK_STORED_KEY_LABEL, 0),
            server_key: derive(MOCK_SERVER_KEY_LABEL, 0),
        }
    }

    /// This verifier's public parameters.
    pub fn shape(&self) -> VerifierShape {
        VerifierShape {
            iterations: self.iterations,
            salt_len: self.salt.len(),
        }
    }
}

/// Longest salt a mock verifier gets (real ones are 16 bytes unless an operator chose more).
pub const MAX_MOCK_SALT_LEN: usize = 64;

/// The public parameters of a verifier, which every client sees in the server-first-message: a
/// fake verifier must have those of the real ones beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct VerifierShape {
    /// PBKDF2 iteration count.
    pub iterations: u32,
    /// Salt length in bytes.
    pub salt_len: usize,
}

impl VerifierShape {
    /// What PostgreSQL gives new verifiers by default (and `branchgate role` too).
    pub const DEFAULT: VerifierShape = VerifierShape {
        iterations: DEFAULT_ITERATIONS,
        salt_len: DEFAULT_SALT_LEN,
    };

    /// The shape most of `verifiers` have (ties go to the larger shape, so the answer does not
    /// depend on the order), or `None` if there are none.
    pub fn most_common<'a>(
        verifiers: impl IntoIterator<Item = &'a ScramVerifier>,
    ) -> Option<VerifierShape> {
        let mut counts: std::collections::BTreeMap<VerifierShape, usize> = Default::default();
        for verifier in verifiers {
            *counts.entry(verifier.shape()).or_default() += 1;
        }
        counts
            .into_iter()
            .max_by_key(|&(shape, count)| (count, shape))
            .map(|(shape, _)| shape)
    }
}

impl FromStr for ScramVerifier {
    type Err = VerifierError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl fmt::Display for ScramVerifier {
    /// Writes the verifier in PostgreSQL's format; `parse` reads it back unchanged.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{MECHANISM_PREFIX}{}:{}${}:{}",
            self.iterations,
            BASE64.encode(&self.salt),
            BASE64.encode(self.stored_key),
            BASE64.encode(self.server_key)
        )
    }
}

impl fmt::Debug for ScramVerifier {
    /// The salt and iteration count are public (every client sees them); the keys are not.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .field("salt", &BASE64.encode(&self.salt))
            .field("stored_key", &"<redacted>")
            .field("server_key", &"<redacted>")
            .finish()
    }
}

/// `SaltedPassword = PBKDF2-HMAC-SHA-256(password, salt, iterations)` (RFC 5802 `Hi`).
pub fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; KEY_LEN] {
    pbkdf2::pbkdf2_hmac_array::<Sha256, KEY_LEN>(password, salt, iterations)
}

/// `ClientKey = HMAC(SaltedPassword, "Client Key")`.
pub fn client_key(salted_password: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    hmac_sha256(salted_password, &[CLIENT_KEY_LABEL])
}

/// `ServerKey = HMAC(SaltedPassword, "Server Key")`.
pub fn server_key(salted_password: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    hmac_sha256(salted_password, &[SERVER_KEY_LABEL])
}

/// `StoredKey = SHA-256(ClientKey)`.
pub fn stored_key(client_key: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    Sha256::digest(client_key).into()
}

/// HMAC-SHA-256 over the concatenation of `parts`, which saves building the AuthMessage
/// or a label+role buffer just to hash it.
pub(crate) fn hmac_sha256(key: &[u8; KEY_LEN], parts: &[&[u8]]) -> [u8; KEY_LEN] {
    // HMAC is defined for keys of every length, so this cannot fail whatever the input.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn parse_iterations(text: &str) -> Result<u32, VerifierError> {
    // u32::from_str would also take a leading '+', which PostgreSQL never writes.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VerifierError::InvalidIterations);
    }
    match text.parse::<u32>() {
        Ok(n) if (1..=MAX_VERIFIER_ITERATIONS).contains(&n) => Ok(n),
        _ => Err(VerifierError::InvalidIterations),
    }
}

fn decode_field(text: &str, field: &'static str) -> Result<Vec<u8>, VerifierError> {
    BASE64
        .decode(text)
        .map_err(|_| VerifierError::InvalidBase64(field))
}

fn decode_key(text: &str, field: &'static str) -> Result<[u8; KEY_LEN], VerifierError> {
    decode_field(text, field)?
        .try_into()
        .map_err(|_| VerifierError::InvalidKeyLength(field))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Taken from pg_authid of a PostgreSQL 15 server after
    // `CREATE ROLE u1 LOGIN PASSWORD 'pencil'` and `... u2 ... PASSWORD 'pscale_pw_abcDEF123'`.
    const PG_PENCIL: &str = "SCRAM-SHA-256$4096:dt0VTpPKsVNTtGqnoexviw==$\
        +FroXuxQwwjAPmegfOtLdhprA4WtoVjaP+t71cyxNm4=:HQvUzao4lDuxfhHm9POp7fW/eEA1FYL7qnTl7Nkrs7s=";
    const PG_PSCALE: &str = "SCRAM-SHA-256$4096:Z2LK+eVz6kUjr1bVe3IwbQ==$\
        8sDngSAvccAoG4H/3GDh18SGww/z3O8iVChWAJwkpxE=:v1Ry3MnL8s/ZY9HTr0qG8YkgRevlV2s5S/AsueSZ1bk=";

    #[test]
    fn postgres_verifiers_round_trip_and_match_from_password() {
        for (text, password) in [(PG_PENCIL, "pencil"), (PG_PSCALE, "pscale_pw_abcDEF123")] {
            let parsed: ScramVerifier = text.parse().expect("PostgreSQL verifier parses");
            assert_eq!(parsed.iterations, 4096);
            assert_eq!(parsed.salt.len(), 16);
            assert_eq!(parsed.to_string(), text);
            let derived = ScramVerifier::from_password(password, &parsed.salt, 4096);
            assert_eq!(derived, parsed);
            assert_eq!(derived.to_string(), text);
        }
    }

    #[test]
    fn rfc7677_keys() {
        let salt = BASE64
            .decode("W22ZaJ0SNY7soEsUEjb6gQ==")
            .expect("test salt");
        let salted = salted_password(b"pencil", &salt, 4096);
        let verifier = ScramVerifier::from_password("pencil", &salt, 4096);
        assert_eq!(verifier.stored_key, stored_key(&client_key(&salted)));
        assert_eq!(verifier.server_key, server_key(&salted));
        assert!(verifier
            .to_string()
            .starts_with("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"));
    }

    #[test]
    fn generate_uses_postgres_defaults_and_fresh_salts() {
        let a = ScramVerifier::generate("pscale_pw_x");
        let b = ScramVerifier::generate("pscale_pw_x");
        assert_eq!(a.iterations, DEFAULT_ITERATIONS);
        assert_eq!(a.salt.len(), DEFAULT_SALT_LEN);
        assert_ne!(a.salt, b.salt);
        assert_eq!(
            a,
            ScramVerifier::from_password("pscale_pw_x", &a.salt, 4096)
        );
        assert_eq!(a.to_string().parse::<ScramVerifier>(), Ok(a));
    }

    #[test]
    fn zero_iterations_become_one() {
        let v = ScramVerifier::from_password("p", b"salt", 0);
        assert_eq!(v, ScramVerifier::from_password("p", b"salt", 1));
        assert!(v.to_string().parse::<ScramVerifier>().is_ok());
    }

    #[test]
    fn rejects_malformed_verifiers() {
        let key = "HQvUzao4lDuxfhHm9POp7fW/eEA1FYL7qnTl7Nkrs7s=";
        let short = "HQvUzao4lDuxfhHm9POp7fW/eEA1FYL7qnTl7Nkrsw==";
        let cases: &[(String, VerifierError)] = &[
            ("md5abcdef".into(), VerifierError::NotScramSha256),
            (
                "scram-sha-256$1:c2FsdA==$a:b".into(),
                VerifierError::NotScramSha256,
            ),
            (
                "SCRAM-SHA-256$4096:c2FsdA==".into(),
                VerifierError::Malformed("missing '$' before the keys"),
            ),
            (
                format!("SCRAM-SHA-256$4096$c2FsdA==:{key}"),
                VerifierError::Malformed("missing ':' after the iteration count"),
            ),
            (
                format!("SCRAM-SHA-256$4096:c2FsdA==${key}"),
                VerifierError::Malformed("missing ':' between the keys"),
            ),
            (
                format!("SCRAM-SHA-256$4096:${key}:{key}"),
                VerifierError::Malformed("empty salt"),
            ),
            (
                format!("SCRAM-SHA-256$0:c2FsdA==${key}:{key}"),
                VerifierError::InvalidIterations,
            ),
            (
                format!("SCRAM-SHA-256$-1:c2FsdA==${key}:{key}"),
                VerifierError::InvalidIterations,
            ),
            (
                format!("SCRAM-SHA-256$+5:c2FsdA==${key}:{key}"),
                VerifierError::InvalidIterations,
            ),
            (
                format!("SCRAM-SHA-256$:c2FsdA==${key}:{key}"),
                VerifierError::InvalidIterations,
            ),
            (
                format!("SCRAM-SHA-256$2147483648:c2FsdA==${key}:{key}"),
                VerifierError::InvalidIterations,
            ),
            (
                format!("SCRAM-SHA-256$99999999999:c2FsdA==${key}:{key}"),
                VerifierError::InvalidIterations,
            ),
            (
                format!("SCRAM-SHA-256$4096:c2FsdA${key}:{key}"),
                VerifierError::InvalidBase64("salt"),
            ),
            (
                format!("SCRAM-SHA-256$4096:c2FsdA==$!!:{key}"),
                VerifierError::InvalidBase64("StoredKey"),
            ),
            (
                format!("SCRAM-SHA-256$4096:c2FsdA==${key}:{key} "),
                VerifierError::InvalidBase64("ServerKey"),
            ),
            (
                format!("SCRAM-SHA-256$4096:c2FsdA==${short}:{key}"),
                VerifierError::InvalidKeyLength("StoredKey"),
            ),
            (
                format!("SCRAM-SHA-256$4096:c2FsdA==${key}:{key}{key}"),
                VerifierError::InvalidBase64("ServerKey"),
            ),
            (
                format!("SCRAM-SHA-256$4096:c2FsdA==${key}:c2FsdA=="),
                VerifierError::InvalidKeyLength("ServerKey"),
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(ScramVerifier::parse(text), Err(*expected), "{text}");
        }
        assert!(
            ScramVerifier::parse(&format!("SCRAM-SHA-256$2147483647:c2FsdA==${key}:{key}")).is_ok()
        );
    }

    #[test]
    fn debug_hides_keys() {
        let v = ScramVerifier::parse(PG_PENCIL).expect("fixture parses");
        let debug = format!("{v:?}");
        assert!(debug.contains("dt0VTpPKsVNTtGqnoexviw=="));
        assert!(!debug.contains("FroXuxQw") && !debug.contains("HQvUzao4"));
        let err =
            ScramVerifier::parse("SCRAM-SHA-256$4096:c2FsdA==$secret").expect_err("malformed");
        assert!(!err.to_string().contains("secret"));
    }

    #[test]
    fn mock_is_deterministic_per_branch_role_and_secret() {
        let secret = [7u8; KEY_LEN];
        let shape = VerifierShape::DEFAULT;
        let a = ScramVerifier::mock("b1", "app", shape, &secret);
        assert_eq!(a, ScramVerifier::mock("b1", "app", shape, &secret));
        assert_eq!(a.shape(), shape);
        let others = [
            ScramVerifier::mock("b1", "app2", shape, &secret),
            ScramVerifier::mock("b2", "app", shape, &secret),
            // "b1" + "\0" + "app" is one name, not "b" + "1\0app".
            ScramVerifier::mock("b", "1\0app", shape, &secret),
            ScramVerifier::mock("b1", "app", shape, &[8u8; KEY_LEN]),
        ];
        for other in &others {
            assert_ne!(a.salt, other.salt);
            assert_ne!(a.stored_key, other.stored_key);
        }
        assert_ne!(a.stored_key, a.server_key);
        assert_eq!(a.to_string().parse::<ScramVerifier>(), Ok(a.clone()));

        // Another shape: its iteration count and salt length, and the same salt prefix.
        let long = ScramVerifier::mock(
            "b1",
            "app",
            VerifierShape {
                iterations: 10_000,
                salt_len: 40,
            },
            &secret,
        );
        assert_eq!((long.iterations, long.salt.len()), (10_000, 40));
        assert_eq!(long.salt[..16], a.salt[..]);
        let huge = VerifierShape {
            iterations: 1,
            salt_len: 1000,
        };
        assert_eq!(
            ScramVerifier::mock("b1", "app", huge, &secret).salt.len(),
            MAX_MOCK_SALT_LEN
        );
    }

    #[test]
    fn most_common_shape_does_not_depend_on_order() {
        let v = |iterations, salt_len| {
            ScramVerifier::from_password("pw", &vec![1; salt_len], iterations)
        };
        let (a, b, c) = (v(4096, 16), v(4096, 16), v(10_000, 16));
        let shape = |list: &[&ScramVerifier]| VerifierShape::most_common(list.iter().copied());
        assert_eq!(shape(&[&a, &c, &b]), Some(a.shape()));
        assert_eq!(shape(&[]), None);
        // A tie: the larger shape, whatever the order.
        assert_eq!(shape(&[&a, &c]), Some(c.shape()));
        assert_eq!(shape(&[&c, &a]), Some(c.shape()));
    }
}
