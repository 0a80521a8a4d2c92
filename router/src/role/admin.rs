//! A small blocking PostgreSQL client for the `role` command: log in as an admin user over
//! plain TCP and run simple-protocol statements.
//!
//! It runs once per command, outside the router's runtime, so it uses `std::net` with timeouts
//! and allocates freely. Only SCRAM-SHA-256 (or no password at all) is accepted: cleartext
//! would send the admin password unencrypted, MD5 is deprecated and offline-crackable.
//! See <https://www.postgresql.org/docs/current/protocol-flow.html>.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::RoleError;
use crate::auth::scram::{ClientCredentials, ScramClient};
use crate::protocol::backend::{self, sasl_mechanisms, Authentication, ErrorFields};
use crate::protocol::{frame, write};

/// Connect, read and write timeout towards the branch primary.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest server message we buffer (the admin exchange has only small ones).
pub const MAX_ADMIN_MESSAGE_BYTES: usize = 0x10_0000;
/// Bytes requested from the socket per read.
const READ_CHUNK_BYTES: usize = 0x2000;
/// The database named in the StartupMessage: roles are cluster-wide, any database will do.
const ADMIN_DATABASE: &str = "postgres";
/// The only SASL mechanism we use (no channel binding over plain TCP).
const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// A logged-in admin session, idle between statements. Dropping it sends Terminate.
#[derive(Debug)]
pub struct AdminConn {
    stream: TcpStream,
    addr: SocketAddr,
    /// Received bytes; `buf[..consumed]` is the frame handed out last.
    buf: Vec<u8>,
    consumed: usize,
    /// Outgoing message, reused.
    out: Vec<u8>,
}

impl AdminConn {
    /// Connects to `addr`, logs in as `user` to database `postgres`, and waits until the
    /// server is ready for a query. `password` is used only if the server asks for one.
    pub fn connect(
        addr: SocketAddr,
        user: &str,
        password: Option<&str>,
    ) -> Result<Self, RoleError> {
        let stream = TcpStream::connect_timeout(&addr, ADMIN_TIMEOUT).map_err(|source| {
            if is_timeout(&source) {
                timeout(addr)
            } else {
                RoleError::Connect { addr, source }
            }
        })?;
        let setup = |stream: &TcpStream| {
            stream.set_read_timeout(Some(ADMIN_TIMEOUT))?;
            stream.set_write_timeout(Some(ADMIN_TIMEOUT))?;
            stream.set_nodelay(true)
        };
        setup(&stream).map_err(|source| RoleError::Connect { addr, source })?;
        let mut conn = Self {
            stream,
            addr,
            buf: Vec::with_capacity(READ_CHUNK_BYTES),
            consumed: 0,
            out: Vec::new(),
        };
        write::startup_message(
            &mut conn.out,
            [("user", user), ("database", ADMIN_DATABASE)],
        );
        conn.flush()?;
        conn.authenticate(user, password)?;
        conn.wait_until_ready()?;
        Ok(conn)
    }

    /// Runs `sql` with the simple query protocol and waits for ReadyForQuery, so the session
    /// stays usable after a failed statement. The first ErrorResponse becomes
    /// [`RoleError::Server`]; rows and notices are ignored.
    pub fn execute(&mut self, sql: &str) -> Result<(), RoleError> {
        write::query(&mut self.out, sql);
        self.flush()?;
        let addr = self.addr;
        let mut outcome = Ok(());
        loop {
            let (tag, body) = self.read_frame()?;
            match tag {
                backend::READY_FOR_QUERY => return outcome,
                backend::ERROR_RESPONSE if outcome.is_ok() => {
                    outcome = Err(server_error(addr, body))
                }
                backend::ERROR_RESPONSE
                | backend::COMMAND_COMPLETE
                | backend::EMPTY_QUERY_RESPONSE
                | backend::ROW_DESCRIPTION
                | backend::DATA_ROW
                | backend::NOTICE_RESPONSE
                | backend::NOTIFICATION_RESPONSE
                | backend::PARAMETER_STATUS => {}
                // COPY and anything else would need an answer we cannot give.
                other => return Err(unexpected(addr, other, "a query result")),
            }
        }
    }

    /// Answers authentication requests until AuthenticationOk.
    fn authenticate(&mut self, user: &str, password: Option<&str>) -> Result<(), RoleError> {
        let addr = self.addr;
        let unsupported = |method: &str| RoleError::UnsupportedAuth {
            addr,
            method: method.to_owned(),
        };
        let out_of_order = |what: &str| protocol(addr, format!("{what} out of order"));
        let mut scram: Option<ScramClient> = None;
        let mut server_verified = false;
        loop {
            let (tag, body) = self.read_frame()?;
            match tag {
                backend::AUTHENTICATION => {}
                backend::ERROR_RESPONSE => return Err(server_error(addr, body)),
                backend::NOTICE_RESPONSE => continue,
                other => return Err(unexpected(addr, other, "an authentication request")),
            }
            let request = Authentication::parse(body)
                .map_err(|e| protocol(addr, format!("bad authentication request: {e}")))?;
            match request {
                Authentication::Ok if scram.is_some() && !server_verified => {
                    // Without SASLFinal the server never proved it holds our verifier.
                    return Err(protocol(
                        addr,
                        "SCRAM ended without a server signature".into(),
                    ));
                }
                Authentication::Ok => return Ok(()),
                Authentication::CleartextPassword => return Err(unsupported("cleartext password")),
                Authentication::Md5Password { .. } => return Err(unsupported("MD5 password")),
                Authentication::Other(code) => {
                    return Err(unsupported(&format!("an unsupported method (code {code})")))
                }
                Authentication::Sasl { mechanisms } => {
                    if scram.is_some() {
                        return Err(out_of_order("AuthenticationSASL"));
                    }
                    if !sasl_mechanisms(mechanisms).any(|m| m == SCRAM_SHA_256) {
                        let offered: Vec<&str> = sasl_mechanisms(mechanisms).collect();
                        return Err(unsupported(&format!("SASL ({})", offered.join(", "))));
                    }
                    let password = password.ok_or_else(|| RoleError::PasswordRequired {
                        addr,
                        user: user.to_owned(),
                    })?;
                    let credentials = ClientCredentials::Password(password.to_owned());
                    let (client, client_first) = ScramClient::new(credentials);
                    write::sasl_initial_response(&mut self.out, SCRAM_SHA_256, &client_first);
                    scram = Some(client);
                }
                Authentication::SaslContinue(server_first) => {
                    let client = scram
                        .as_mut()
                        .ok_or_else(|| out_of_order("AuthenticationSASLContinue"))?;
                    let client_final = client
                        .handle_server_first(server_first)
                        .map_err(|source| RoleError::Scram { addr, source })?;
                    write::sasl_response(&mut self.out, &client_final);
                }
                Authentication::SaslFinal(server_final) => {
                    let client = scram
                        .as_ref()
                        .ok_or_else(|| out_of_order("AuthenticationSASLFinal"))?;
                    client
                        .verify_server_final(server_final)
                        .map_err(|source| RoleError::Scram { addr, source })?;
                    server_verified = true;
                }
            }
            self.flush()?;
        }
    }

    /// Skips session parameters, the cancel key and notices until ReadyForQuery.
    fn wait_until_ready(&mut self) -> Result<(), RoleError> {
        let addr = self.addr;
        loop {
            let (tag, body) = self.read_frame()?;
            match tag {
                backend::READY_FOR_QUERY => return Ok(()),
                backend::ERROR_RESPONSE => return Err(server_error(addr, body)),
                backend::PARAMETER_STATUS
                | backend::BACKEND_KEY_DATA
                | backend::NOTICE_RESPONSE => {}
                other => return Err(unexpected(addr, other, "session start-up")),
            }
        }
    }

    /// Sends and clears the outgoing buffer (nothing if it is empty).
    fn flush(&mut self) -> Result<(), RoleError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let written = self.stream.write_all(&self.out);
        self.out.clear();
        written.map_err(|e| io_error(self.addr, e))
    }

    /// The next whole server message, as its type byte and body.
    fn read_frame(&mut self) -> Result<(u8, &[u8]), RoleError> {
        self.buf.drain(..self.consumed);
        self.consumed = 0;
        loop {
            match frame::check(&self.buf, MAX_ADMIN_MESSAGE_BYTES) {
                Ok(Some(header)) => {
                    self.consumed = header.len;
                    return Ok((header.tag, frame::body(&self.buf, header)));
                }
                Ok(None) => {}
                Err(e) => return Err(protocol(self.addr, e.to_string())),
            }
            let filled = self.buf.len();
            self.buf.resize(filled + READ_CHUNK_BYTES, 0);
            let n = match self.stream.read(&mut self.buf[filled..]) {
                Ok(0) => {
                    self.buf.truncate(filled);
                    return Err(RoleError::Closed { addr: self.addr });
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    self.buf.truncate(filled);
                    return Err(io_error(self.addr, e));
                }
            };
            self.buf.truncate(filled + n);
        }
    }
}

impl Drop for AdminConn {
    fn drop(&mut self) {
        self.out.clear();
        write::terminate(&mut self.out);
        // Best effort: the server ends the session on EOF as well.
        let _ = self.stream.write_all(&self.out);
    }
}

fn is_timeout(e: &io::Error) -> bool {
    // A socket timeout surfaces as WouldBlock on Unix and TimedOut elsewhere.
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn timeout(addr: SocketAddr) -> RoleError {
    RoleError::Timeout {
        addr,
        seconds: ADMIN_TIMEOUT.as_secs(),
    }
}

fn io_error(addr: SocketAddr, source: io::Error) -> RoleError {
    if is_timeout(&source) {
        timeout(addr)
    } else {
        RoleError::Io { addr, source }
    }
}

fn protocol(addr: SocketAddr, reason: String) -> RoleError {
    RoleError::Protocol { addr, reason }
}

#[cold]
fn unexpected(addr: SocketAddr, tag: u8, during: &str) -> RoleError {
    protocol(
        addr,
        format!("unexpected message type 0x{tag:02x} during {during}"),
    )
}

fn server_error(addr: SocketAddr, body: &[u8]) -> RoleError {
    match ErrorFields::parse(body) {
        Ok(fields) => RoleError::Server {
            code: fields.code.to_owned(),
            message: fields.message.to_owned(),
        },
        Err(e) => protocol(addr, format!("bad ErrorResponse: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::verifier::ScramVerifier;
    use crate::role::fake::{serve, Peer};

    fn connect_err(addr: SocketAddr, password: Option<&str>) -> RoleError {
        match AdminConn::connect(addr, "postgres", password) {
            Ok(conn) => panic!("expected an error, got {conn:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn trust_login_then_statements_and_terminate() {
        let (addr, server) = serve(|peer: &mut Peer| {
            assert_eq!(peer.read_startup(), "user=postgres database=postgres");
            peer.login_ok();
            assert_eq!(peer.read_query(), "CREATE ROLE x");
            peer.error("42710", "role \"x\" already exists");
            peer.ready();
            assert_eq!(peer.read_query(), "ALTER ROLE x");
            peer.notice();
            peer.complete("ALTER ROLE");
            peer.ready();
            assert_eq!(peer.read_frame().0, b'X');
        });
        let mut conn = AdminConn::connect(addr, "postgres", None).expect("trust login");
        match conn.execute("CREATE ROLE x") {
            Err(RoleError::Server { code, message }) => {
                assert_eq!((&*code, &*message), ("42710", "role \"x\" already exists"));
            }
            other => panic!("expected a server error, got {other:?}"),
        }
        conn.execute("ALTER ROLE x").expect("statement succeeds");
        drop(conn);
        server.join().expect("fake server");
    }

    #[test]
    fn scram_login_checks_both_sides() {
        let verifier = ScramVerifier::generate("admin-pw");
        let (addr, server) = serve(move |peer: &mut Peer| {
            peer.read_startup();
            peer.scram(&verifier).expect("right password");
            peer.login_ok();
        });
        AdminConn::connect(addr, "postgres", Some("admin-pw")).expect("SCRAM login");
        server.join().expect("fake server");

        let verifier = ScramVerifier::generate("admin-pw");
        let (addr, server) = serve(move |peer: &mut Peer| {
            peer.read_startup();
            assert!(peer.scram(&verifier).is_err(), "wrong password accepted");
            peer.fatal(
                "28P01",
                "password authentication failed for user \"postgres\"",
            );
        });
        let e = connect_err(addr, Some("wrong"));
        assert!(
            matches!(&e, RoleError::Server { code, .. } if code == "28P01"),
            "{e}"
        );
        server.join().expect("fake server");
    }

    #[test]
    fn refuses_weak_methods_and_a_missing_password() {
        let cases: [(&[u8], &str); 3] = [
            (b"\0\0\0\x03", "cleartext password"),
            (b"\0\0\0\x05salt", "MD5 password"),
            (b"\0\0\0\x07", "an unsupported method (code 7)"),
        ];
        for (request, method) in cases {
            let (addr, server) = serve(move |peer: &mut Peer| {
                peer.read_startup();
                peer.send_raw(b'R', request);
            });
            let e = connect_err(addr, Some("pw"));
            assert!(
                matches!(&e, RoleError::UnsupportedAuth { method: m, .. } if m == method),
                "{e}"
            );
            server.join().expect("fake server");
        }

        let (addr, server) = serve(|peer: &mut Peer| {
            peer.read_startup();
            peer.send_raw(b'R', b"\0\0\0\x0aSCRAM-SHA-256\0\0");
        });
        let e = connect_err(addr, None);
        assert!(matches!(e, RoleError::PasswordRequired { .. }), "{e}");
        assert!(e.to_string().contains("BRANCHGATE_ADMIN_PASSWORD"), "{e}");
        server.join().expect("fake server");
    }

    #[test]
    fn skipping_the_server_signature_is_refused() {
        let (addr, server) = serve(|peer: &mut Peer| {
            peer.read_startup();
            peer.send_raw(b'R', b"\0\0\0\x0aSCRAM-SHA-256\0\0");
            peer.read_frame();
            peer.send_raw(b'R', b"\0\0\0\0");
        });
        let e = connect_err(addr, Some("pw"));
        assert!(e.to_string().contains("without a server signature"), "{e}");
        server.join().expect("fake server");
    }

    #[test]
    fn oversized_message_and_early_close() {
        let (addr, server) = serve(|peer: &mut Peer| {
            peer.read_startup();
            // A 2 MiB ParameterStatus header: refused before its body is read.
            peer.send_bytes(b"S\x00\x20\x00\x00");
        });
        let e = connect_err(addr, None);
        assert!(e.to_string().contains("more than the limit"), "{e}");
        server.join().expect("fake server");

        let (addr, server) = serve(|peer: &mut Peer| {
            peer.read_startup();
            peer.send_bytes(b"R\0\0");
        });
        let e = connect_err(addr, None);
        assert!(matches!(e, RoleError::Closed { .. }), "{e}");
        server.join().expect("fake server");
    }
}
