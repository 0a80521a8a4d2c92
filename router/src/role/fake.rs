//! A scripted fake PostgreSQL server on `127.0.0.1:0` for the `role` tests: one connection,
//! driven step by step by the test, so no real server is needed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::auth::scram::{server_finish, server_start, ScramError};
use crate::auth::verifier::ScramVerifier;
use crate::protocol::frontend::{self, SaslInitialResponse};
use crate::protocol::sqlstate::SqlState;
use crate::protocol::startup::{check_startup, parse_startup, StartupPacket};
use crate::protocol::write::{self, Severity};
use crate::protocol::{backend, frame};

/// How long the fake waits for the client before failing the test.
const FAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The server side of one accepted connection.
pub(crate) struct Peer {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// Listens on `127.0.0.1:0` and runs `script` on the first connection in a thread.
pub(crate) fn serve<T: Send + 'static>(
    script: impl FnOnce(&mut Peer) -> T + Send + 'static,
) -> (SocketAddr, JoinHandle<T>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake server");
    let addr = listener.local_addr().expect("fake server address");
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept the client");
        stream
            .set_read_timeout(Some(FAKE_TIMEOUT))
            .expect("set a read timeout");
        script(&mut Peer {
            stream,
            buf: Vec::new(),
        })
    });
    (addr, handle)
}

impl Peer {
    fn fill(&mut self) {
        let mut chunk = [0; 4096];
        let n = self.stream.read(&mut chunk).expect("read from the client");
        assert!(n > 0, "the client closed the connection");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Reads the StartupMessage; returns its parameters as `name=value` joined by spaces.
    pub(crate) fn read_startup(&mut self) -> String {
        let len = loop {
            if let Some(len) = check_startup(&self.buf).expect("a valid startup packet") {
                break len;
            }
            self.fill();
        };
        let packet: Vec<u8> = self.buf.drain(..len).collect();
        let Ok(StartupPacket::Startup(startup)) = parse_startup(&packet) else {
            panic!("not a StartupMessage");
        };
        let params: Vec<String> = startup.params().map(|(n, v)| format!("{n}={v}")).collect();
        params.join(" ")
    }

    /// Reads one client message: its type byte and body.
    pub(crate) fn read_frame(&mut self) -> (u8, Vec<u8>) {
        loop {
            if let Some(header) = frame::check(&self.buf, usize::MAX).expect("a valid frame") {
                let body = frame::body(&self.buf, header).to_vec();
                self.buf.drain(..header.len);
                return (header.tag, body);
            }
            self.fill();
        }
    }

    /// Reads a Query message and returns its SQL.
    pub(crate) fn read_query(&mut self) -> String {
        let (tag, body) = self.read_frame();
        assert_eq!(tag, frontend::QUERY, "expected a Query");
        frontend::query(&body).expect("valid Query").to_owned()
    }

    /// Sends bytes as they are.
    pub(crate) fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to the client");
    }

    fn send(&mut self, fill: impl FnOnce(&mut Vec<u8>)) {
        let mut out = Vec::new();
        fill(&mut out);
        self.send_bytes(&out);
    }

    /// Sends one message with this type byte and body.
    pub(crate) fn send_raw(&mut self, tag: u8, body: &[u8]) {
        let len = i32::try_from(body.len() + 4).expect("small message");
        self.send(|out| {
            out.push(tag);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(body);
        });
    }

    /// AuthenticationOk, the usual start-up chatter, then ReadyForQuery.
    pub(crate) fn login_ok(&mut self) {
        self.send(|out| {
            write::auth_ok(out);
            write::parameter_status(out, "server_version", "15.0");
            write::backend_key_data(out, 42, 7);
            write::ready_for_query(out, b'I');
        });
    }

    /// ReadyForQuery (idle).
    pub(crate) fn ready(&mut self) {
        self.send(|out| write::ready_for_query(out, b'I'));
    }

    /// CommandComplete with this tag.
    pub(crate) fn complete(&mut self, command_tag: &str) {
        let body = [command_tag.as_bytes(), b"\0"].concat();
        self.send_raw(backend::COMMAND_COMPLETE, &body);
    }

    /// A NoticeResponse, which the client must skip.
    pub(crate) fn notice(&mut self) {
        self.send_raw(
            backend::NOTICE_RESPONSE,
            b"SNOTICE\0VNOTICE\0C00000\0Mjust so you know\0\0",
        );
    }

    /// ErrorResponse with severity ERROR.
    pub(crate) fn error(&mut self, code: &'static str, message: &str) {
        self.send(|out| write::error_response(out, Severity::Error, SqlState::new(code), message));
    }

    /// ErrorResponse with severity FATAL.
    pub(crate) fn fatal(&mut self, code: &'static str, message: &str) {
        self.send(|out| write::error_response(out, Severity::Fatal, SqlState::new(code), message));
    }

    /// Runs the server side of SCRAM-SHA-256 against `verifier`, up to and including
    /// AuthenticationSASLFinal; AuthenticationOk is left to the caller.
    pub(crate) fn scram(&mut self, verifier: &ScramVerifier) -> Result<(), ScramError> {
        self.send(|out| write::auth_sasl(out, &["SCRAM-SHA-256"]));
        let (tag, body) = self.read_frame();
        assert_eq!(
            tag,
            frontend::PASSWORD_MESSAGE,
            "expected SASLInitialResponse"
        );
        let initial = SaslInitialResponse::parse(&body).expect("valid SASLInitialResponse");
        assert_eq!(initial.mechanism, "SCRAM-SHA-256");
        let (state, server_first) = server_start(initial.data, verifier)?;
        self.send(|out| write::auth_sasl_continue(out, &server_first));
        let (tag, client_final) = self.read_frame();
        assert_eq!(tag, frontend::PASSWORD_MESSAGE, "expected SASLResponse");
        let (_, server_final) = server_finish(state, &client_final)?;
        self.send(|out| write::auth_sasl_final(out, &server_final));
        Ok(())
    }
}
