//! A real single-member etcd (Debian's `etcd-server`) in a temporary data directory, on free
//! loopback ports, for the etcd catalog tests.
//!
//! Started through the same spawner as PostgreSQL ([`crate::spawn`]): it dies with the test
//! process. Ready means its `/health` endpoint answers `"health":"true"`, polled with a
//! deadline; nothing waits a fixed time. `etcdctl` (Debian's `etcd-client`) reads and writes
//! keys for the tests.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::leftovers;
use crate::spawn::{give_to_server_user, spawn_server};
use crate::tools::free_port;

/// The etcd server binary (Debian's etcd-server).
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// The etcd command-line client (Debian's etcd-client).
pub const ETCDCTL_BIN: &str = "/usr/bin/etcdctl";
/// How long etcd may take to answer its health check.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stop may take before etcd is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between health probes.
const POLL: Duration = Duration::from_millis(50);
/// Tries with fresh ports when another process took the ones picked.
const BIND_ATTEMPTS: usize = 5;

/// One etcd member listening on `127.0.0.1`. Dropping it kills it and removes its data.
pub struct EtcdServer {
    /// Data directory and log, owned by the server user.
    dir: TempDir,
    /// Clients' port (gRPC and `/health`).
    client_port: u16,
    /// The (single) member's peer port.
    peer_port: u16,
    /// The running server; `None` while stopped.
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts a fresh etcd on free ports; returns once it is healthy.
    pub fn start() -> EtcdServer {
        assert!(
            Path::new(ETCD_BIN).exists(),
            "{ETCD_BIN} not found: run scripts/setup (it installs etcd-server)"
        );
        let dir = tempfile::Builder::new()
            .prefix("bg-etcd-")
            .tempdir()
            .expect("create temp dir");
        give_to_server_user(dir.path());
        leftovers::remove_at_exit(dir.path());
        let mut server = EtcdServer {
            dir,
            client_port: 0,
            peer_port: 0,
            child: None,
        };
        for _ in 0..BIND_ATTEMPTS {
            server.client_port = free_port();
            server.peer_port = loop {
                let port = free_port();
                if port != server.client_port {
                    break port;
                }
            };
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(log) if log.contains("address already in use") => continue,
                Err(log) => panic!("etcd did not start:\n{log}"),
            }
        }
        panic!("etcd found no free ports in {BIND_ATTEMPTS} attempts");
    }

    /// `127.0.0.1:<client port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// `etcd://127.0.0.1:<port><prefix>`: router.toml's `catalog` for a catalog under
    /// `prefix` (which starts with `/`).
    pub fn catalog_url(&self, prefix: &str) -> String {
        format!("etcd://{}{prefix}", self.addr())
    }

    /// Stops etcd (SIGTERM, then SIGKILL after a while), keeping its data.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on our own child, not reaped yet, so the pid names no other process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                leftovers::record_server(self.dir.path(), None);
                return;
            }
            thread::sleep(POLL);
        }
        let _ = child.kill();
        let _ = child.wait();
        leftovers::record_server(self.dir.path(), None);
    }

    /// Starts etcd again on the same ports with the same data, after [`EtcdServer::stop`].
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "start_again on a running etcd");
        if let Err(log) = self.spawn_and_wait() {
            panic!("etcd did not restart on port {}:\n{log}", self.client_port);
        }
    }

    /// Runs `etcdctl <args>` against this server (API v3).
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        Command::new(ETCDCTL_BIN)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints=http://{}", self.addr()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run etcdctl")
    }

    /// `etcdctl <args>`, which must succeed; its stdout.
    pub fn etcdctl_ok(&self, args: &[&str]) -> String {
        let output = self.etcdctl(args);
        assert!(
            output.status.success(),
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Puts `key` = `value`.
    pub fn put(&self, key: &str, value: &str) {
        // `--` so a value starting with '-' is not taken for an option.
        self.etcdctl_ok(&["put", "--", key, value]);
    }

    /// The value of `key`, if it exists.
    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.etcdctl_ok(&["get", "--print-value-only", "--", key]);
        let value = out.strip_suffix('\n').unwrap_or(&out);
        (!out.is_empty()).then(|| value.to_owned())
    }

    /// The keys under `prefix`, in order.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.etcdctl_ok(&["get", "--prefix", "--keys-only", "--", prefix])
            .lines()
            .filter(|line| !line.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The server's log (its stderr).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Spawns etcd and polls its health; `Err` with its log if it exits first.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log_path = self.log_path();
        let log_start = fs::metadata(&log_path).map_or(0, |m| m.len());
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open etcd log");
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new(ETCD_BIN);
        command
            .args(["--name", "bg-test"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("bg-test={peer}")])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log);
        let child = spawn_server(command).expect("spawn etcd");
        leftovers::record_server(self.dir.path(), Some(child.id()));
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    leftovers::record_server(self.dir.path(), None);
                    let text = fs::read(&log_path).unwrap_or_default();
                    let start = usize::try_from(log_start).unwrap_or(0).min(text.len());
                    return Err(format!(
                        "etcd exited ({status}):\n{}",
                        String::from_utf8_lossy(&text[start..])
                    ));
                }
            }
            if self.healthy() {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "etcd on port {} not healthy within {READY_TIMEOUT:?}:\n{}",
                self.client_port,
                self.log()
            );
            thread::sleep(POLL);
        }
    }

    /// `GET /health` answers `"health":"true"`.
    fn healthy(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(1))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let request = format!(
            "GET /health HTTP/1.0\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr()
        );
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.starts_with("HTTP/1.") && response.contains("\"health\":\"true\"")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        leftovers::forget(self.dir.path());
    }
}

/// What the etcd and fleet tests share in one test binary: a PostgreSQL primary, certificates
/// and an etcd member, started on first use ([`fleet_fixture`]).
pub struct FleetFixture {
    /// The branches' primary.
    pub pg: crate::PgServer,
    /// The routers' certificates.
    pub certs: crate::Certs,
    /// The catalog's etcd.
    pub etcd: EtcdServer,
}

impl FleetFixture {
    /// Creates `role` on the primary and returns its SCRAM verifier.
    pub fn server_role(&self, role: &str, password: &str) -> String {
        self.pg.create_role(role, password);
        self.pg.role_verifier(role)
    }
}

/// This test binary's [`FleetFixture`].
pub fn fleet_fixture() -> &'static FleetFixture {
    static FIXTURE: std::sync::OnceLock<FleetFixture> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| FleetFixture {
        pg: crate::PgServer::start_primary(),
        certs: crate::Certs::generate(),
        etcd: EtcdServer::start(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_starts_answers_and_restarts_with_its_data() {
        let mut etcd = EtcdServer::start();
        etcd.put("/bg/k", "v1");
        assert_eq!(etcd.get("/bg/k").as_deref(), Some("v1"));
        assert_eq!(etcd.get("/bg/missing"), None);
        etcd.stop();
        assert!(!etcd.healthy());
        etcd.start_again();
        assert_eq!(etcd.keys("/bg/"), ["/bg/k"]);
        assert!(etcd.catalog_url("/p").starts_with("etcd://127.0.0.1:"));
    }
}
