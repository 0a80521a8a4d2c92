//! Starting server processes that die with the test process.
//!
//! Servers are started with `PR_SET_PDEATHSIG`, so the kernel sends them SIGQUIT (PostgreSQL's
//! immediate shutdown) when their parent goes away, even if the test process is killed or a
//! fixture held in a `static` is never dropped. The kernel tracks the parent *thread*, not the
//! process, and the test harness ends each test's thread when the test finishes, so every server
//! is forked from one spawner thread that lives as long as the process.

use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread;

/// The OS account PostgreSQL and PgBouncer run as when the tests run as root (both refuse root).
pub const SERVER_USER: &str = "postgres";

/// One request to the spawner thread: the command and where to send its outcome.
type SpawnRequest = (Command, Sender<io::Result<Child>>);

static SPAWNER: OnceLock<Mutex<Sender<SpawnRequest>>> = OnceLock::new();

/// Spawns `command` from the long-lived spawner thread, as the server user when running as root,
/// with SIGQUIT as its parent-death signal. The returned `Child` may be waited on from any thread.
pub fn spawn_server(mut command: Command) -> io::Result<Child> {
    as_server_user(&mut command);
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which is
    // async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        command.pre_exec(|| {
            // std applies uid/gid before pre_exec closures, which matters: changing credentials
            // clears the parent-death signal.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner()
        .lock()
        .expect("spawner channel lock poisoned")
        .send((command, reply_tx))
        .expect("spawner thread is gone");
    reply_rx.recv().expect("spawner thread dropped a request")
}

fn spawner() -> &'static Mutex<Sender<SpawnRequest>> {
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("server-spawner".into())
            .spawn(move || {
                // The sender lives in a static, so this loop ends only with the process.
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("cannot start the server spawner thread");
        Mutex::new(tx)
    })
}

/// Makes `command` run as the server user when we are root; otherwise leaves it as is.
pub fn as_server_user(command: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = server_ids() {
        command.uid(uid).gid(gid);
    }
    command
}

/// Hands `path` to the server user when we are root, so the servers can use what the tests wrote.
pub fn give_to_server_user(path: &std::path::Path) {
    if let Some((uid, gid)) = server_ids() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {} to {SERVER_USER}: {e}", path.display()));
    }
}

/// The uid and gid of the server user when running as root, `None` when not root.
pub fn server_ids() -> Option<(u32, u32)> {
    static IDS: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *IDS.get_or_init(|| {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
        let ids = passwd_ids(&passwd, SERVER_USER).unwrap_or_else(|| {
            panic!("running as root but there is no `{SERVER_USER}` user: run scripts/setup")
        });
        Some(ids)
    })
}

/// Finds `user`'s uid and gid in the text of /etc/passwd.
fn passwd_ids(passwd: &str, user: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != user {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some((uid, gid))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lookup_finds_the_user() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      postgres:x:101:104:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\n";
        assert_eq!(passwd_ids(passwd, "postgres"), Some((101, 104)));
        assert_eq!(passwd_ids(passwd, "root"), Some((0, 0)));
        assert_eq!(passwd_ids(passwd, "post"), None);
        assert_eq!(passwd_ids("postgres:x:oops:1:::\n", "postgres"), None);
    }

    #[test]
    fn spawned_child_outlives_the_calling_thread() {
        // The child must survive the end of the thread that asked for it (PDEATHSIG is tied to
        // the spawner thread, not to the caller).
        let mut child = thread::spawn(|| {
            let mut command = Command::new("sleep");
            command.arg("30");
            spawn_server(command).expect("spawn sleep")
        })
        .join()
        .expect("spawning thread panicked");
        thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "child died with its caller"
        );
        child.kill().expect("kill");
        child.wait().expect("wait");
    }
}
