//! Real PostgreSQL 15 servers, one per temporary directory.
//!
//! The postmaster is a direct child of the test process (no `pg_ctl`), forked by the spawner
//! thread with a parent-death signal, so no server outlives the tests. When the tests run as root
//! the servers run as the `postgres` OS user, which owns the temporary directory.

mod admin;
mod sampler;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::leftovers;
use crate::spawn::{as_server_user, give_to_server_user, spawn_server};
use crate::tools::{free_port, pg_bin};

pub use admin::{quote_ident, quote_literal, SCRAM_VERIFIER_PREFIX};
pub use sampler::BackendSampler;

/// The superuser every test server is created with.
pub const ADMIN_USER: &str = "postgres";
/// The superuser's password (TCP connections use scram-sha-256; the unix socket trusts).
pub const ADMIN_PASSWORD: &str = "postgres-admin-pw";

/// How long a server may take to accept connections (or a replica to start streaming).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fast or immediate shutdown may take before the postmaster is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Tries with a fresh port when another process took the one we picked.
const BIND_ATTEMPTS: usize = 5;
/// Log lines quoted in a panic message.
const LOG_TAIL_LINES: usize = 40;

/// Settings shared by primaries and replicas (a replica copies them with the data directory).
/// The port and socket directory are per server, so they go on the command line instead.
const SERVER_CONF: &str = "
# branchgate-e2e test server
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 5
# Replicas cloned at the same time from one primary: one clone's checkpoint must not recycle a
# WAL segment another still has to stream (seen as 'requested WAL segment ... has already been
# removed' on a loaded machine).
wal_keep_size = '128MB'
hot_standby = on
fsync = off
full_page_writes = off
synchronous_commit = off
shared_buffers = 16MB
max_connections = 200
logging_collector = off
";

/// A PostgreSQL 15 server listening on `127.0.0.1:<port>` and on a unix socket in its temp dir.
///
/// Dropping it stops the server (immediate shutdown) and removes its directory.
pub struct PgServer {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl PgServer {
    /// Creates (initdb) and starts a new primary on a free port.
    pub fn start_primary() -> PgServer {
        let dir = server_dir();
        let pwfile = dir.path().join("pwfile");
        fs::write(&pwfile, ADMIN_PASSWORD).expect("write pwfile");
        give_to_server_user(&pwfile);
        let data = dir.path().join("data");
        let mut initdb = Command::new(pg_bin("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                ADMIN_USER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"]);
        run_as_server(&mut initdb, dir.path(), "initdb");
        fs::remove_file(&pwfile).expect("remove pwfile");
        let mut conf = OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("open postgresql.conf");
        conf.write_all(SERVER_CONF.as_bytes())
            .expect("append to postgresql.conf");
        start_on_free_port(dir)
    }

    /// Clones `primary` with `pg_basebackup -R` and starts it as a streaming hot standby.
    ///
    /// Returns once the replica is in recovery and its WAL receiver is streaming.
    pub fn start_replica(primary: &PgServer) -> PgServer {
        let dir = server_dir();
        let mut basebackup = Command::new(pg_bin("pg_basebackup"));
        primary
            .as_admin(&mut basebackup)
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
        run_as_server(&mut basebackup, dir.path(), "pg_basebackup");
        let replica = start_on_free_port(dir);
        replica.wait_for_value(
            "SELECT pg_is_in_recovery()::text || ' ' || \
             coalesce((SELECT status FROM pg_stat_wal_receiver), 'none')",
            "true streaming",
        );
        replica
    }

    /// The TCP address, `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The TCP port (also the number in the unix socket's name).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the unix socket `.s.PGSQL.<port>` (also the server's temp dir).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's log file (its stderr, appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        log_path(self.dir.path())
    }

    /// The last `lines` lines of the server log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path(), 0, lines)
    }

    /// Whether the postmaster is running (it has not been stopped and has not exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Fast shutdown (SIGINT), waiting for the postmaster to exit. Does nothing when stopped.
    pub fn stop(&mut self) {
        self.shutdown(libc::SIGINT);
    }

    /// Starts the server again on the same port, after [`stop`](Self::stop).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "start_again on a running server");
        let log_start = log_len(&self.log_path());
        self.child = Some(spawn_postmaster(self.dir.path(), self.port));
        if let Err(exit) = self.wait_ready(log_start) {
            panic!("postgres did not restart on port {}: {exit}", self.port);
        }
    }

    fn shutdown(&mut self, signal: libc::c_int) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on our own child's pid, which has not been reaped, so it cannot name
        // another process.
        unsafe { libc::kill(pid, signal) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => thread::sleep(POLL_INTERVAL),
            }
        }
        eprintln!(
            "postgres on port {} ignored signal {signal}; killing it",
            self.port
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Polls until the server accepts connections. `Err` carries why it will never be ready
    /// (the postmaster exited), with the log written since `log_start`.
    fn wait_ready(&mut self, log_start: u64) -> Result<(), StartFailure> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = self
                .child
                .as_mut()
                .expect("waiting for a server that was not started");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                let log = log_tail(&self.log_path(), log_start, LOG_TAIL_LINES);
                return Err(StartFailure {
                    status: status.to_string(),
                    log,
                });
            }
            if self.pg_isready() {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "postgres on port {} not ready after {READY_TIMEOUT:?}; log:\n{}",
                self.port,
                self.log_tail(LOG_TAIL_LINES)
            );
            thread::sleep(POLL_INTERVAL);
        }
    }

    fn pg_isready(&self) -> bool {
        self.as_admin(Command::new(pg_bin("pg_isready")).arg("-q"))
            .args(["-d", "postgres", "-t", "2"])
            .stdin(Stdio::null())
            .status()
            .expect("run pg_isready")
            .success()
    }

    /// Adds the options that reach this server over its unix socket as [`ADMIN_USER`].
    pub(crate) fn as_admin<'c>(&self, command: &'c mut Command) -> &'c mut Command {
        command.arg("-h").arg(self.socket_dir()).args([
            "-p",
            &self.port.to_string(),
            "-U",
            ADMIN_USER,
        ])
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // Immediate shutdown: the directory is deleted next, so a checkpoint would be wasted.
        self.shutdown(libc::SIGQUIT);
        leftovers::forget(self.dir.path());
    }
}

/// Why a postmaster exited before accepting connections.
#[derive(Debug)]
struct StartFailure {
    /// The exit status, as text.
    status: String,
    /// The log lines written by this start attempt.
    log: String,
}

impl StartFailure {
    /// Whether another process holds the port, which a retry on a new port fixes.
    fn is_port_taken(&self) -> bool {
        self.log.contains("could not bind") || self.log.contains("Address already in use")
    }
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "postmaster exited ({}); log:\n{}", self.status, self.log)
    }
}

/// A fresh temp dir owned by the server user.
fn server_dir() -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("bg-pg-")
        .tempdir()
        .expect("create temp dir");
    give_to_server_user(dir.path());
    leftovers::remove_at_exit_with_pid_file(dir.path(), Path::new("data/postmaster.pid"));
    dir
}

/// Starts the postmaster for the data dir in `dir` on a free port, retrying on port clashes.
fn start_on_free_port(dir: TempDir) -> PgServer {
    let mut server = PgServer {
        dir,
        port: 0,
        child: None,
    };
    for _ in 0..BIND_ATTEMPTS {
        server.port = free_port();
        let log_start = log_len(&server.log_path());
        server.child = Some(spawn_postmaster(server.dir.path(), server.port));
        match server.wait_ready(log_start) {
            Ok(()) => return server,
            Err(failure) if failure.is_port_taken() => continue,
            Err(failure) => panic!("postgres did not start: {failure}"),
        }
    }
    panic!("postgres found no free port in {BIND_ATTEMPTS} attempts");
}

fn spawn_postmaster(dir: &Path, port: u16) -> Child {
    let log_path = log_path(dir);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .expect("open server log");
    give_to_server_user(&log_path);
    let mut command = Command::new(pg_bin("postgres"));
    command
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-p", &port.to_string()])
        .arg("-k")
        .arg(dir)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log fd"))
        .stderr(log);
    spawn_server(command).expect("spawn postgres")
}

/// Runs a short-lived PostgreSQL tool as the server user, panicking with its output on failure.
fn run_as_server(command: &mut Command, cwd: &Path, what: &str) {
    // The server user may not be allowed into the test's working directory.
    let output = as_server_user(command)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("postgres.log")
}

fn log_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The last `lines` lines of the log after byte offset `from`.
fn log_tail(path: &Path, from: u64, lines: usize) -> String {
    let Ok(bytes) = fs::read(path) else {
        return format!("(no log at {})", path.display());
    };
    let start = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[start..]);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    #[test]
    fn log_tail_reads_only_new_lines() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("log");
        fs::write(&path, "old 1\nold 2\n").expect("write");
        let from = log_len(&path);
        File::options()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"new 1\nnew 2\nnew 3\n"))
            .expect("append");
        assert_eq!(log_tail(&path, from, 2), "new 2\nnew 3");
        assert_eq!(log_tail(&path, 0, 10), "old 1\nold 2\nnew 1\nnew 2\nnew 3");
        assert!(log_tail(&dir.path().join("missing"), 0, 1).starts_with("(no log"));
    }

    #[test]
    fn port_clash_is_recognised() {
        let failure = StartFailure {
            status: "exit status: 1".into(),
            log: "LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use".into(),
        };
        assert!(failure.is_port_taken());
        let other = StartFailure {
            status: "exit status: 1".into(),
            log: "FATAL: bad".into(),
        };
        assert!(!other.is_port_taken());
    }
}
