//! The `branchgate` binary: its commands, and `branchgate run` as a child process whose log the
//! test reads.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::catalog::{router_toml, toml_string};
use crate::certs::Certs;
use crate::pg::ADMIN_PASSWORD;
use crate::tools::free_port;

/// The environment variable the `role` command reads the admin password from.
pub const ADMIN_PASSWORD_ENV: &str = "BRANCHGATE_ADMIN_PASSWORD";
/// How long `branchgate run` may take to start accepting.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at starting the binary on a free port (another process may take it first).
const BIND_ATTEMPTS: usize = 5;
/// Pause between polls.
const POLL: Duration = Duration::from_millis(50);
/// What the router logs once every worker accepts (and its control socket is bound).
const ACCEPTING: &str = "branchgate accepting";

/// Polls `probe` until it returns `Some`, panicking with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        thread::sleep(POLL);
    }
}

/// The `branchgate` binary built next to the running test (`target/<profile>/branchgate`).
pub fn branchgate_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("branchgate");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p branchgate`; scripts/test does)",
        bin.display()
    );
    bin
}

/// Runs `branchgate <args>` to completion, with the test server's admin password.
pub fn branchgate(args: &[&str]) -> Output {
    Command::new(branchgate_bin())
        .args(args)
        .env(ADMIN_PASSWORD_ENV, ADMIN_PASSWORD)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run branchgate")
}

/// `branchgate run`, killed if the test ends while it runs.
pub struct RouterProcess {
    child: Child,
    log: PathBuf,
    config: PathBuf,
    addr: SocketAddr,
    pooled_addr: SocketAddr,
}

impl RouterProcess {
    /// Writes router.toml in `dir` (its catalog is `dir/catalog.toml`, which must exist),
    /// starts `branchgate run` on free ports (retried when another process takes one),
    /// and returns once it accepts clients and answers on its control socket.
    pub fn spawn(dir: &Path, certs: &Certs) -> RouterProcess {
        RouterProcess::spawn_with(dir, certs, |text| text)
    }

    /// As [`RouterProcess::spawn`], with router.toml rewritten by `edit` first (e.g. a
    /// `steering` line put at its top).
    pub fn spawn_with(
        dir: &Path,
        certs: &Certs,
        edit: impl FnOnce(String) -> String,
    ) -> RouterProcess {
        let template = edit(router_toml(certs, "catalog.toml"));
        for _ in 0..BIND_ATTEMPTS {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let pooled_addr = loop {
                let pooled = SocketAddr::from(([127, 0, 0, 1], free_port()));
                if pooled != addr {
                    break pooled;
                }
            };
            let text = template.replace(
                "direct = \"127.0.0.1:0\"",
                &format!("direct = {}", toml_string(&addr.to_string())),
            );
            let text = text.replace(
                "pooled = \"127.0.0.1:0\"",
                &format!("pooled = {}", toml_string(&pooled_addr.to_string())),
            );
            assert!(
                text.contains(&format!("direct = \"{addr}\"\npooled = \"{pooled_addr}\"")),
                "router_toml changed its listen lines"
            );
            let config = dir.join("router.toml");
            fs::write(&config, text).expect("write router.toml");
            let (mut process, up) =
                RouterProcess::run(&config, dir.join("branchgate.log"), &[], addr, pooled_addr);
            if up {
                return process;
            }
            if process.log().contains("cannot listen") {
                continue;
            }
            let status = process.child.wait().expect("wait");
            panic!("branchgate run exited ({status}):\n{}", process.log())
        }
        panic!("branchgate run found no free ports in {BIND_ATTEMPTS} attempts");
    }

    /// `branchgate run --takeover` with this router's configuration: a new router that joins
    /// its listeners and has it stop accepting, drain and exit. Returns once the new one
    /// accepts; its log is `branchgate-<n>.log` beside the first's.
    pub fn take_over(&self) -> RouterProcess {
        let log = self.log.with_file_name(format!(
            "branchgate-{}.log",
            std::process::id() ^ self.child.id()
        ));
        let (mut process, up) = RouterProcess::run(
            &self.config,
            log,
            &["--takeover"],
            self.addr,
            self.pooled_addr,
        );
        if !up {
            let status = process.child.wait().expect("wait");
            panic!(
                "branchgate run --takeover exited ({status}):\n{}",
                process.log()
            )
        }
        process
    }

    /// Starts `branchgate run --config config args`, logging to `log`; with false if it exited
    /// before accepting.
    fn run(
        config: &Path,
        log: PathBuf,
        args: &[&str],
        addr: SocketAddr,
        pooled_addr: SocketAddr,
    ) -> (RouterProcess, bool) {
        let log_file = fs::File::create(&log).expect("create log");
        let mut command = Command::new(branchgate_bin());
        command
            .arg("run")
            .arg("--config")
            .arg(config)
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        // SAFETY: only prctl(2), async-signal-safe, runs between fork and exec. The router
        // dies with the test thread that started it, even if the test process is killed.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut process = RouterProcess {
            child: command.spawn().expect("spawn branchgate run"),
            log,
            config: config.to_owned(),
            addr,
            pooled_addr,
        };
        // The control socket is bound before the workers start, so once they accept, a
        // `branchgate reload` finds it.
        let up = wait_for("branchgate run to accept or exit", START_TIMEOUT, || {
            if let Ok(Some(_)) = process.child.try_wait() {
                return Some(false);
            }
            process.log().contains(ACCEPTING).then_some(true)
        });
        (process, up)
    }

    /// The router's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The direct port's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The pooled port's address.
    pub fn pooled_addr(&self) -> SocketAddr {
        self.pooled_addr
    }

    /// The router.toml it runs with.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// Its stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until a log line contains every one of `parts`, and returns that line.
    pub fn wait_for_log(&self, parts: &[&str], timeout: Duration) -> String {
        wait_for(&format!("a log line with {parts:?}"), timeout, || {
            self.log_lines(parts).into_iter().next()
        })
    }

    /// The address logged as `name=ADDR` on the first log line with every one of `parts`
    /// (waiting for it up to `timeout`).
    pub fn logged_addr(&self, parts: &[&str], name: &str, timeout: Duration) -> SocketAddr {
        let line = self.wait_for_log(parts, timeout);
        let key = format!("{name}=");
        line.split(key.as_str())
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    }

    /// Its `/metrics` page, from the admin endpoint whose address it logged.
    pub fn metrics(&self, timeout: Duration) -> String {
        crate::metrics::scrape(self.logged_addr(&["admin endpoint"], "addr", timeout))
    }

    /// The log lines that contain every one of `parts`.
    pub fn log_lines(&self, parts: &[&str]) -> Vec<String> {
        self.log()
            .lines()
            .filter(|line| parts.iter().all(|part| line.contains(part)))
            .map(str::to_owned)
            .collect()
    }

    /// Sends `signal` to the router.
    /// Sends SIGSTOP and waits until every thread of the router has stopped (kill(2) only
    /// queues the signal: a thread still running could accept meanwhile).
    pub fn stop(&self) {
        self.signal(libc::SIGSTOP);
        let tasks = format!("/proc/{}/task", self.child.id());
        wait_for(
            "the router's threads to stop",
            Duration::from_secs(10),
            || {
                let entries = std::fs::read_dir(&tasks).ok()?;
                let all_stopped = entries.flatten().all(|task| {
                    std::fs::read_to_string(task.path().join("stat"))
                        .ok()
                        .and_then(|stat| {
                            // The state follows the command name's closing parenthesis.
                            let after = stat.rsplit_once(')')?.1;
                            after.split_whitespace().next().map(|state| state == "T")
                        })
                        .unwrap_or(false)
                });
                all_stopped.then_some(())
            },
        );
    }

    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on our own child, which is not reaped until `Drop` or `wait_exit`.
        assert_eq!(
            unsafe { libc::kill(pid, signal) },
            0,
            "kill({pid}, {signal})"
        );
    }

    /// Waits for the router to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_for("branchgate to exit", timeout, || {
            self.child.try_wait().expect("try_wait")
        })
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
