//! A login and a query by hand, with the router crate's SCRAM client.

use std::io::{Read, Write};

use branchgate::auth::{ClientCredentials, ScramClient};

use super::{
    expect_auth, expect_sasl, message, next_message, parse_error, query, sasl_initial_response,
    startup_for, PgError, AUTH_OK, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL, SCRAM_SHA_256,
};

/// Sends a StartupMessage for `user` and reads AuthenticationSASL.
pub fn start_sasl(s: &mut (impl Read + Write), user: &str) {
    s.write_all(&startup_for(user))
        .expect("send StartupMessage");
    expect_sasl(s, user);
}

/// Sends a client-first-message with `nonce` and returns the server-first-message.
pub fn scram_first(s: &mut (impl Read + Write), nonce: &str) -> String {
    let first = format!("n,,n=,r={nonce}");
    s.write_all(&sasl_initial_response(SCRAM_SHA_256, first.as_bytes()))
        .expect("send SASLInitialResponse");
    let data = expect_auth(s, AUTH_SASL_CONTINUE, "server-first-message")
        .unwrap_or_else(|e| panic!("server-first-message: {e:?}"));
    String::from_utf8(data).expect("ASCII server-first-message")
}

/// The `x=` attribute of a SCRAM message.
pub fn attribute<'a>(scram: &'a str, name: &str) -> &'a str {
    scram
        .split(',')
        .find_map(|a| a.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("{name}= missing in {scram:?}"))
}

/// SCRAM with the password after AuthenticationSASL, up to ReadyForQuery.
pub fn login(s: &mut (impl Read + Write), password: &str) -> Result<(), PgError> {
    login_keyed(s, password).map(drop)
}

/// As [`login`], returning the cancel key (pid, secret) of BackendKeyData.
pub fn login_keyed(s: &mut (impl Read + Write), password: &str) -> Result<(u32, u32), PgError> {
    login_reporting(s, password).map(|login| login.key)
}

/// What a successful login told the client.
#[derive(Clone, Debug)]
pub struct Login {
    /// The cancel key (pid, secret) of BackendKeyData.
    pub key: (u32, u32),
    /// ParameterStatus (name, value) pairs, in the order they came.
    pub params: Vec<(String, String)>,
}

/// As [`login`], returning the cancel key and the ParameterStatus values.
pub fn login_reporting(s: &mut (impl Read + Write), password: &str) -> Result<Login, PgError> {
    let (mut scram, first) = ScramClient::new(ClientCredentials::Password(password.to_owned()));
    s.write_all(&sasl_initial_response(SCRAM_SHA_256, &first))
        .expect("send SASLInitialResponse");
    let server_first = expect_auth(s, AUTH_SASL_CONTINUE, "server-first-message")?;
    let client_final = scram
        .handle_server_first(&server_first)
        .expect("valid server-first-message");
    s.write_all(&message(b'p', &client_final))
        .expect("send SASLResponse");
    let server_final = expect_auth(s, AUTH_SASL_FINAL, "server-final-message")?;
    scram
        .verify_server_final(&server_final)
        .expect("the router proves it holds the verifier");
    expect_auth(s, AUTH_OK, "AuthenticationOk")?;
    let mut key = None;
    let mut params = Vec::new();
    loop {
        match next_message(s, "after AuthenticationOk") {
            (b'Z', _) => {
                return Ok(Login {
                    key: key.expect("BackendKeyData before ReadyForQuery"),
                    params,
                })
            }
            (b'E', body) => return Err(parse_error(&body)),
            (b'K', body) => {
                let word =
                    |at: usize| u32::from_be_bytes(body[at..at + 4].try_into().expect("4 bytes"));
                assert_eq!(body.len(), 8, "BackendKeyData of protocol 3.0");
                key = Some((word(0), word(4)));
            }
            (b'S', body) => {
                let mut parts = body.split(|&b| b == 0);
                let mut text = || {
                    String::from_utf8(parts.next().expect("ParameterStatus field").to_vec())
                        .expect("UTF-8 ParameterStatus")
                };
                let name = text();
                let value = text();
                params.push((name, value));
            }
            (b'N', _) => {}
            (tag, _) => panic!("unexpected {:?} before ReadyForQuery", tag as char),
        }
    }
}

/// Runs `sql` (one row, one column) and returns the value.
pub fn query_one(s: &mut (impl Read + Write), sql: &str) -> String {
    s.write_all(&query(sql)).expect("send Query");
    let mut value = None;
    loop {
        match next_message(s, sql) {
            (b'D', body) => {
                let len = i32::from_be_bytes(body[2..6].try_into().expect("4 bytes"));
                let len = usize::try_from(len).expect("not NULL");
                value = Some(String::from_utf8(body[6..6 + len].to_vec()).expect("UTF-8"));
            }
            (b'E', body) => panic!("{sql}: {:?}", parse_error(&body)),
            (b'Z', _) => return value.unwrap_or_else(|| panic!("{sql}: no row")),
            _ => {}
        }
    }
}
