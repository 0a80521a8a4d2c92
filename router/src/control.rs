//! The control socket: how `branchgate reload`, `branchgate role` and `branchgate check-config`
//! reach the running router.
//!
//! A Unix stream socket at `[admin] socket` (default `branchgate.sock` beside router.toml). The
//! router creates it at start with mode 0600, so only its owner (and root) may connect, and
//! removes it at shutdown. A socket file left behind by a router that died is replaced; if a
//! live router still answers on it, the second router does not start.
//!
//! # Protocol
//!
//! One request per connection: the client sends one line, the router answers one line and
//! closes. Lines are UTF-8, end with `\n`, and carry no arguments beyond these words (and a
//! branch id, `[a-z0-9_-]{1,63}`):
//!
//! | request        | the router                                                            |
//! |----------------|-----------------------------------------------------------------------|
//! | `reload`       | reloads the catalog file through the reload guard, as SIGHUP does      |
//! | `reload force` | reloads it past the guard                                              |
//! | `check`        | reads the catalog file and runs the guard, without applying anything   |
//! | `pause BRANCH` | the branch's pooled clients finish their transactions, then new ones wait |
//! | `resume BRANCH`| the waiting transactions of the branch's pooled clients go on          |
//!
//! The answer is `<status> <text>`: `ok` (the text says what was, or would be, loaded),
//! `refused` (the guard's reason; the catalog in force is kept) or `error` (the file could not
//! be read or is invalid, or the request is unknown). Nothing secret crosses the socket: the
//! texts are counts and the catalog's error messages, which name lines, never verifiers.
//!
//! The router serves one connection at a time on a helper thread with blocking I/O. A request
//! must arrive within [`IO_TIMEOUT`] and fit in [`MAX_REQUEST_BYTES`]; an answer is cut to
//! [`MAX_REPLY_BYTES`]; at most [`LISTEN_BACKLOG`] clients wait behind the one being served.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};

/// Longest request line, without its `\n`.
pub const MAX_REQUEST_BYTES: usize = 80;
/// Longest answer line, without its `\n`; longer texts are cut.
pub const MAX_REPLY_BYTES: usize = 4096;
/// Time the router gives a client to send its request, and to take the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Clients that may wait for the router to accept them while it serves another.
pub const LISTEN_BACKLOG: i32 = 8;
/// Time a starting router waits for an answer from a socket file that is already there.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after a failed accept (e.g. EMFILE) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// Bytes read from the socket at a time.
const READ_CHUNK_BYTES: usize = 512;
/// Bytes after the request line the router reads (and ignores) before closing.
const MAX_DRAIN_BYTES: usize = 0x1_0000;

/// What a client asks the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Reload the catalog file; `force` skips the reload guard.
    Reload {
        /// Apply the file even if the guard would refuse it.
        force: bool,
    },
    /// Compare the catalog file with the catalog in force, without applying it.
    Check,
    /// Pause the pooled port's transactions of a branch.
    Pause(Box<str>),
    /// Let them go again.
    Resume(Box<str>),
}

/// True for a branch id as the catalog allows them (the only argument a request takes).
fn branch_id(id: &str) -> bool {
    (1..=crate::catalog::MAX_NAME_BYTES).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl Request {
    /// The request's line, without `\n`.
    pub fn line(&self) -> String {
        match self {
            Request::Reload { force: false } => "reload".into(),
            Request::Reload { force: true } => "reload force".into(),
            Request::Check => "check".into(),
            Request::Pause(branch) => format!("pause {branch}"),
            Request::Resume(branch) => format!("resume {branch}"),
        }
    }

    /// Parses a request line (without `\n`); `None` for anything else.
    pub fn parse(line: &str) -> Option<Request> {
        match line.split_once(' ') {
            Some(("pause", branch)) if branch_id(branch) => Some(Request::Pause(branch.into())),
            Some(("resume", branch)) if branch_id(branch) => Some(Request::Resume(branch.into())),
            _ => [
                Request::Reload { force: false },
                Request::Reload { force: true },
                Request::Check,
            ]
            .into_iter()
            .find(|request| request.line() == line),
        }
    }
}

/// The first word of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Done (or, for `check`, would be done).
    Ok,
    /// The reload guard refused the catalog file; the catalog in force is kept.
    Refused,
    /// The catalog file could not be read or is invalid, or the request was not understood.
    Error,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Refused => "refused",
            Status::Error => "error",
        }
    }
}

/// The router's answer: a status and a text for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// What happened.
    pub status: Status,
    /// What was loaded, or why not. One line.
    pub text: String,
}

impl Reply {
    /// An answer with `text` made fit for one line: line breaks become spaces, and it is cut
    /// (on a character boundary) to fit [`MAX_REPLY_BYTES`] with its status word.
    pub fn new(status: Status, text: impl fmt::Display) -> Reply {
        let mut text = text.to_string().replace(['\r', '\n'], " ");
        let room = MAX_REPLY_BYTES - status.word().len() - 1;
        if text.len() > room {
            let mut end = room;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        Reply { status, text }
    }

    /// Parses an answer line (without `\n`).
    pub fn parse(line: &str) -> Option<Reply> {
        let (word, text) = line.split_once(' ').unwrap_or((line, ""));
        let status = [Status::Ok, Status::Refused, Status::Error]
            .into_iter()
            .find(|s| s.word() == word)?;
        Some(Reply {
            status,
            text: text.to_owned(),
        })
    }

    /// The answer's line, with `\n`.
    fn encode(&self) -> String {
        format!("{} {}\n", self.status.word(), self.text)
    }
}

/// Why the control socket could not be set up, or a request not answered.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A live router already answers on the socket path: two routers share one configuration
    /// (or one `[admin] socket`).
    #[error(
        "another router already answers on the control socket {}: stop it, or give this one \
         another [admin] socket",
        path.display()
    )]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Nothing answers: there is no socket file, or no router listening on it.
    #[error(
        "no router answers on {} ({source}): is `branchgate run` running with this configuration?",
        path.display()
    )]
    NoRouter {
        /// The socket path.
        path: PathBuf,
        /// What connecting said.
        source: io::Error,
    },
    /// The path exists but is not a socket; it is left alone.
    #[error("{} exists and is not a socket; remove it or set [admin] socket", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Creating, connecting to, reading or writing the socket failed otherwise.
    #[error("control socket {}: {source}", path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The router did not answer in time.
    #[error("the router on {} did not answer within {} s", path.display(), timeout.as_secs())]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// The time limit.
        timeout: Duration,
    },
    /// The answer does not follow the protocol (too long, not UTF-8, unknown status, cut off).
    #[error("the router on {} sent an invalid answer: {reason}", path.display())]
    BadReply {
        /// The socket path.
        path: PathBuf,
        /// What was wrong.
        reason: &'static str,
    },
}

/// Sends `request` to the router listening at `path` and waits at most `timeout` in all for
/// its answer.
pub fn request(path: &Path, request: Request, timeout: Duration) -> Result<Reply, ControlError> {
    let deadline = Instant::now() + timeout;
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = connect(path, timeout).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ControlError::NoRouter {
            path: path.to_owned(),
            source,
        },
        _ if is_timeout(&source) => ControlError::Timeout {
            path: path.to_owned(),
            timeout,
        },
        _ => io(source),
    })?;
    stream
        .write_all(format!("{}\n", request.line()).as_bytes())
        .map_err(io)?;
    let bad = |reason| ControlError::BadReply {
        path: path.to_owned(),
        reason,
    };
    let line = read_line(&mut stream, MAX_REPLY_BYTES, deadline).map_err(|e| match e {
        LineError::Io(source) => io(source),
        LineError::Timeout => ControlError::Timeout {
            path: path.to_owned(),
            timeout,
        },
        LineError::TooLong => bad("longer than the limit"),
        LineError::NotUtf8 => bad("not UTF-8"),
        LineError::Eof => bad("the router closed the connection without a complete answer"),
    })?;
    Reply::parse(&line).ok_or_else(|| bad("unknown status"))
}

/// Connects to `path`. The send timeout also bounds the connect itself: a Unix socket whose
/// backlog is full makes connect wait for room that long.
fn connect(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_write_timeout(Some(timeout))?;
    socket.connect(&SockAddr::unix(path)?)?;
    Ok(socket.into())
}

/// A bound control socket. Dropping it removes the socket file, if that is still this socket.
#[derive(Debug)]
pub struct ControlListener {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file, to recognise it at removal.
    id: (u64, u64),
}

impl ControlListener {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlListener {
    fn drop(&mut self) {
        // Another router may have replaced a socket file that someone deleted under us.
        if fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Creates the control socket at `path` (mode 0600), replacing a socket file nobody answers
/// on. [`ControlError::InUse`] if a router answers on it.
pub fn bind(path: &Path) -> Result<ControlListener, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let listener = match bind_once(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let meta = fs::symlink_metadata(path).map_err(io)?;
            if !meta.file_type().is_socket() {
                return Err(ControlError::NotASocket {
                    path: path.to_owned(),
                });
            }
            match connect(path, PROBE_TIMEOUT) {
                Ok(_) => {
                    return Err(ControlError::InUse {
                        path: path.to_owned(),
                    })
                }
                // Nobody listens: the file is what a router that died left behind.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    fs::remove_file(path).map_err(io)?;
                    bind_once(path).map_err(io)?
                }
                Err(e) => return Err(io(e)),
            }
        }
        other => other.map_err(io)?,
    };
    let meta = fs::symlink_metadata(path).map_err(io)?;
    Ok(ControlListener {
        listener,
        path: path.to_owned(),
        id: (meta.dev(), meta.ino()),
    })
}

fn bind_once(path: &Path) -> io::Result<UnixListener> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&SockAddr::unix(path)?)?;
    // Owner only, set before listen(): until then a connect is refused, so there is no moment
    // at which the umask's mode lets another user in.
    let listening = fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .and_then(|()| socket.listen(LISTEN_BACKLOG))
        .and_then(|()| socket.set_nonblocking(true));
    if let Err(e) = listening {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(socket.into())
}

/// The thread answering on the control socket. [`ControlServer::stop`] ends it; so does dropping
/// it, without waiting.
#[derive(Debug)]
pub struct ControlServer {
    /// Dropping this end wakes the thread's poll: the signal to stop.
    stop: UnixStream,
    thread: JoinHandle<()>,
    path: PathBuf,
}

impl ControlServer {
    /// Starts answering on `listener`, one connection at a time, with `handler`.
    pub fn start<H>(listener: ControlListener, handler: H) -> io::Result<ControlServer>
    where
        H: FnMut(Request) -> Reply + Send + 'static,
    {
        let (stop, stopped) = UnixStream::pair()?;
        let path = listener.path.clone();
        let thread = std::thread::Builder::new()
            .name("branchgate-control".into())
            .spawn(move || serve(listener, stopped, handler))?;
        Ok(ControlServer { stop, thread, path })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops answering (after the connection being served, if any), waits for the thread, and
    /// removes the socket file.
    pub fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

fn serve<H: FnMut(Request) -> Reply>(
    listener: ControlListener,
    stopped: UnixStream,
    mut handler: H,
) {
    let mut fds = [
        libc::pollfd {
            fd: listener.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stopped.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is an array of two initialised pollfds, the length passed; both
        // descriptors stay open for the whole call (owned by `listener` and `stopped`).
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::warn!(%error, "control socket: poll failed; no longer answering");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            tracing::warn!("control socket: listener failed; no longer answering");
            return;
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        match listener.listener.accept() {
            Ok((stream, _)) => serve_one(stream, &mut handler),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => {
                tracing::warn!(%error, "control socket: accept failed");
                std::thread::sleep(ACCEPT_ERROR_BACKOFF);
            }
        }
    }
}

/// Reads one request from `stream`, answers it, and closes.
fn serve_one<H: FnMut(Request) -> Reply>(mut stream: UnixStream, handler: &mut H) {
    let deadline = Instant::now() + IO_TIMEOUT;
    // The listener is non-blocking; the accepted socket must block, with timeouts.
    if stream.set_nonblocking(false).is_err() {
        return;
    }
    let reply = match read_line(&mut stream, MAX_REQUEST_BYTES, deadline) {
        Ok(line) => match Request::parse(&line) {
            Some(request) => handler(request),
            None => Reply::new(
                Status::Error,
                format_args!("unknown request {line:?}: expected reload, reload force or check"),
            ),
        },
        // A client that connects and leaves (a starting router checking the socket is live).
        Err(LineError::Eof) => return,
        Err(LineError::TooLong) => Reply::new(Status::Error, "request too long"),
        Err(LineError::NotUtf8) => Reply::new(Status::Error, "request is not UTF-8"),
        Err(LineError::Timeout | LineError::Io(_)) => return,
    };
    let written = stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.write_all(reply.encode().as_bytes()))
        .and_then(|()| stream.shutdown(Shutdown::Write));
    if let Err(error) = written {
        tracing::debug!(%error, "control socket: could not answer");
        return;
    }
    // Closing with unread bytes (a request too long, bytes after the line) would reset the
    // connection, and the client could miss the answer: read what it sent, within bounds.
    let mut rest = [0u8; READ_CHUNK_BYTES];
    let mut drained = 0;
    while drained < MAX_DRAIN_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// Why no line was read.
#[derive(Debug)]
enum LineError {
    /// The peer closed before a whole line.
    Eof,
    /// More than the limit before a `\n`.
    TooLong,
    /// The line is not UTF-8.
    NotUtf8,
    /// The deadline passed.
    Timeout,
    /// Reading failed.
    Io(io::Error),
}

/// Reads one `\n`-terminated line of at most `max` bytes (without the `\n`) before `deadline`.
/// Never reads more than `max + 1` bytes; what follows the line is ignored (one request, or one
/// answer, per connection).
fn read_line(stream: &mut UnixStream, max: usize, deadline: Instant) -> Result<String, LineError> {
    let mut line = Vec::with_capacity(max.min(READ_CHUNK_BYTES));
    let mut chunk = [0u8; READ_CHUNK_BYTES];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(LineError::Timeout);
        }
        stream.set_read_timeout(Some(left)).map_err(LineError::Io)?;
        let room = (max + 1 - line.len()).min(READ_CHUNK_BYTES);
        let n = match stream.read(&mut chunk[..room]) {
            Ok(0) => return Err(LineError::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => return Err(LineError::Timeout),
            Err(e) => return Err(LineError::Io(e)),
        };
        let start = line.len();
        line.extend_from_slice(&chunk[..n]);
        if let Some(end) = line[start..].iter().position(|&b| b == b'\n') {
            line.truncate(start + end);
            return String::from_utf8(line).map_err(|_| LineError::NotUtf8);
        }
        if line.len() > max {
            return Err(LineError::TooLong);
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    // A socket timeout surfaces as WouldBlock on Unix and TimedOut elsewhere.
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn socket_path() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("branchgate.sock");
        (dir, path)
    }

    /// A server answering `ok <request line>` and reporting each request it handled.
    fn echo_server(path: &Path) -> (ControlServer, mpsc::Receiver<Request>) {
        let (tx, rx) = mpsc::channel();
        let listener = bind(path).expect("bind");
        let server = ControlServer::start(listener, move |request: Request| {
            let line = request.line();
            let _ = tx.send(request);
            Reply::new(Status::Ok, line)
        })
        .expect("start");
        (server, rx)
    }

    /// Sends raw bytes and returns the raw answer (until the router closes).
    fn raw_exchange(path: &Path, bytes: &[u8]) -> String {
        let mut stream = UnixStream::connect(path).expect("connect");
        stream.write_all(bytes).expect("write");
        let mut answer = String::new();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream.read_to_string(&mut answer).expect("read answer");
        answer
    }

    #[test]
    fn requests_round_trip() {
        for request in [
            Request::Reload { force: false },
            Request::Reload { force: true },
            Request::Check,
        ] {
            assert_eq!(Request::parse(&request.line()), Some(request));
        }
        assert_eq!(Request::parse("reload  force"), None);
        for request in [
            Request::Pause("b-1_x".into()),
            Request::Resume("main".into()),
        ] {
            assert_eq!(Request::parse(&request.line()), Some(request));
        }
        assert_eq!(Request::parse("pause"), None);
        assert_eq!(Request::parse("pause Main"), None);
        assert_eq!(Request::parse("pause a b"), None);
        assert_eq!(Request::parse(&format!("pause {}", "a".repeat(64))), None);
        assert_eq!(Request::parse("RELOAD"), None);
        assert_eq!(Request::parse(""), None);
    }

    #[test]
    fn replies_round_trip_on_one_bounded_line() {
        let reply = Reply::new(Status::Refused, "removes every branch (2 of 2)");
        assert_eq!(reply.encode(), "refused removes every branch (2 of 2)\n");
        assert_eq!(
            Reply::parse("refused removes every branch (2 of 2)"),
            Some(reply)
        );
        assert_eq!(
            Reply::parse("ok"),
            Some(Reply {
                status: Status::Ok,
                text: String::new()
            })
        );
        assert_eq!(Reply::parse("maybe so"), None);

        let reply = Reply::new(Status::Error, "catalog.toml:3: bad\nsecond line\r\n");
        assert_eq!(reply.text, "catalog.toml:3: bad second line  ");
        let long = Reply::new(Status::Error, "é".repeat(MAX_REPLY_BYTES));
        let encoded = long.encode();
        assert!(encoded.len() <= MAX_REPLY_BYTES + 1, "{}", encoded.len());
        assert_eq!(encoded.matches('\n').count(), 1);
    }

    #[test]
    fn serves_requests_and_stops() {
        let (_dir, path) = socket_path();
        let (server, handled) = echo_server(&path);
        let mode = fs::metadata(&path)
            .expect("socket file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the socket is owner-only");

        let timeout = Duration::from_secs(10);
        for request in [Request::Reload { force: true }, Request::Check] {
            let reply = super::request(&path, request.clone(), timeout).expect("answer");
            assert_eq!(reply, Reply::new(Status::Ok, request.line()));
            assert_eq!(handled.recv().expect("handled"), request);
        }

        server.stop();
        assert!(!path.exists(), "the socket file outlived the server");
        match super::request(&path, Request::Check, timeout) {
            Err(ControlError::NoRouter { .. }) => {}
            other => panic!("expected NoRouter, got {other:?}"),
        }
    }

    #[test]
    fn bad_requests_get_an_error_and_never_reach_the_handler() {
        let (_dir, path) = socket_path();
        let (server, handled) = echo_server(&path);
        let answer = raw_exchange(&path, b"reboot\n");
        assert!(
            answer.starts_with("error unknown request \"reboot\""),
            "{answer}"
        );
        let answer = raw_exchange(&path, &[b'x'; MAX_REQUEST_BYTES + 10]);
        assert_eq!(answer, "error request too long\n");
        let answer = raw_exchange(&path, b"\xff\n");
        assert_eq!(answer, "error request is not UTF-8\n");
        // A client that says nothing and leaves gets nothing, and the next one is served.
        drop(UnixStream::connect(&path).expect("connect"));
        assert_eq!(raw_exchange(&path, b"check\nextra"), "ok check\n");
        assert_eq!(handled.try_iter().collect::<Vec<_>>(), [Request::Check]);
        server.stop();
    }

    #[test]
    fn a_silent_client_is_dropped_after_the_timeout() {
        let (_dir, path) = socket_path();
        let (server, _handled) = echo_server(&path);
        let mut silent = UnixStream::connect(&path).expect("connect");
        let started = Instant::now();
        let mut answer = Vec::new();
        silent
            .set_read_timeout(Some(IO_TIMEOUT * 5))
            .expect("timeout");
        silent
            .read_to_end(&mut answer)
            .expect("closed by the router");
        assert!(answer.is_empty());
        assert!(started.elapsed() >= IO_TIMEOUT, "{:?}", started.elapsed());
        server.stop();
    }

    #[test]
    fn stale_sockets_are_replaced_live_ones_refused_files_kept() {
        let (dir, path) = socket_path();
        // A socket file nobody listens on: what a router that died leaves.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
        assert!(path.exists());
        let (server, _handled) = echo_server(&path);
        match bind(&path) {
            Err(ControlError::InUse { .. }) => {}
            other => panic!("a live socket must be refused, got {other:?}"),
        }
        let reply = request(&path, Request::Check, Duration::from_secs(10)).expect("answer");
        assert_eq!(reply.status, Status::Ok, "the live router still answers");
        server.stop();

        let file = dir.path().join("not-a-socket");
        fs::write(&file, "data").expect("write");
        match bind(&file) {
            Err(ControlError::NotASocket { .. }) => {}
            other => panic!("a regular file must be left alone, got {other:?}"),
        }
        assert_eq!(fs::read_to_string(&file).expect("read"), "data");
    }

    #[test]
    fn a_missing_router_and_a_bad_answer_are_told_apart() {
        let (_dir, path) = socket_path();
        match request(&path, Request::Check, Duration::from_secs(1)) {
            Err(e @ ControlError::NoRouter { .. }) => {
                assert!(e.to_string().contains("is `branchgate run` running"), "{e}")
            }
            other => panic!("expected NoRouter, got {other:?}"),
        }
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let fake = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut request = [0u8; 6];
            stream.read_exact(&mut request).expect("request");
            stream.write_all(b"maybe\n").expect("answer");
        });
        match request(&path, Request::Check, Duration::from_secs(10)) {
            Err(ControlError::BadReply { reason, .. }) => assert_eq!(reason, "unknown status"),
            other => panic!("expected BadReply, got {other:?}"),
        }
        fake.join().expect("fake router");
    }
}
