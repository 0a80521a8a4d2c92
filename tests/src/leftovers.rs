//! Temporary directories removed at the test process's exit when their owner is never dropped.
//!
//! A fixture in a `static` (one PostgreSQL server, one set of certificates, one router, one etcd
//! per test binary) is never dropped, so its `TempDir` is never removed: every run of the suite
//! would leave one of each per test binary behind (an etcd member's directory is some 120 MB, a
//! PostgreSQL data directory some 80 MB). Owners register their directory when they make it and
//! [`forget`] it when dropped; at exit, `atexit(3)` stops the server still using each directory
//! left (SIGKILL: its data is thrown away) and removes it.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

/// How long the exit handler waits for a killed server before removing its directory anyway.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// A directory to remove at exit, and how to find the server still using it.
struct Leftover {
    dir: PathBuf,
    /// The server's pid, as its owner last recorded it.
    pid: Option<libc::pid_t>,
    /// A file under `dir` whose first line is the server's pid (PostgreSQL's
    /// `postmaster.pid`), read at exit.
    pid_file: Option<PathBuf>,
}

static LEFT_AT_EXIT: Mutex<Vec<Leftover>> = Mutex::new(Vec::new());

fn left() -> std::sync::MutexGuard<'static, Vec<Leftover>> {
    LEFT_AT_EXIT.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes `dir` at exit unless it is [`forget`]-ten first.
pub(crate) fn remove_at_exit(dir: &Path) {
    register(Leftover {
        dir: dir.to_owned(),
        pid: None,
        pid_file: None,
    });
}

/// As [`remove_at_exit`], first killing the process whose pid is the first line of
/// `dir/pid_file` (PostgreSQL's `postmaster.pid`, which names the running postmaster whichever
/// restart it came from).
pub(crate) fn remove_at_exit_with_pid_file(dir: &Path, pid_file: &Path) {
    register(Leftover {
        dir: dir.to_owned(),
        pid: None,
        pid_file: Some(dir.join(pid_file)),
    });
}

/// Records which child of this process now uses `dir` (registered before), `None` once it has
/// been stopped and reaped: the exit handler kills the one recorded before removing `dir`.
pub(crate) fn record_server(dir: &Path, pid: Option<u32>) {
    let pid = pid.and_then(|pid| libc::pid_t::try_from(pid).ok());
    if let Some(entry) = left().iter_mut().find(|e| e.dir == dir) {
        entry.pid = pid;
    }
}

/// Drops `dir` from the exit list: its owner was dropped and removed it.
pub(crate) fn forget(dir: &Path) {
    left().retain(|e| e.dir != dir);
}

fn register(entry: Leftover) {
    static REGISTERED: Once = Once::new();
    REGISTERED.call_once(|| {
        // SAFETY: atexit(3) with a function that takes no arguments and does not unwind.
        unsafe { libc::atexit(remove_leftovers) };
    });
    left().push(entry);
}

extern "C" fn remove_leftovers() {
    let entries = std::mem::take(&mut *left());
    for entry in entries {
        let from_file = entry.pid_file.as_ref().and_then(|file| {
            let text = fs::read_to_string(file).ok()?;
            text.lines().next()?.trim().parse::<libc::pid_t>().ok()
        });
        if let Some(pid) = from_file.or(entry.pid) {
            kill_and_reap(pid);
        }
        let _ = fs::remove_dir_all(&entry.dir);
    }
}

/// SIGKILLs our child `pid` and waits (bounded) until it is gone.
fn kill_and_reap(pid: libc::pid_t) {
    // SAFETY: kill(2) on a child of this process not reaped yet (owners clear the record when
    // they reap it; a postmaster.pid names the running postmaster), so no other process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + KILL_WAIT;
    // SAFETY: kill(pid, 0) only asks whether the process is still there.
    while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
        // SAFETY: reaps our child if it is gone (a zombie answers kill(pid, 0)).
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        thread::sleep(Duration::from_millis(5));
    }
}
