//! Where the external programs are, and free loopback ports.

use std::io::Write as _;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// PostgreSQL 15's binaries, named explicitly: Debian puts only wrappers on `PATH`.
pub const PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// Environment variable naming the Python interpreter that has psycopg (set by scripts/test).
pub const PYTHON_ENV: &str = "BRANCHGATE_PYTHON";

/// Path of a PostgreSQL 15 program (`postgres`, `initdb`, `pg_basebackup`, ...).
pub fn pg_bin(program: &str) -> PathBuf {
    Path::new(PG_BIN_DIR).join(program)
}

/// Path of PostgreSQL 15's `psql`.
pub fn psql_bin() -> PathBuf {
    pg_bin("psql")
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e crate lives inside the workspace")
        .to_path_buf()
}

/// The Python interpreter with psycopg: `$BRANCHGATE_PYTHON`, else `<workspace>/.venv/bin/python`.
///
/// Panics with a hint to run scripts/setup when it does not exist.
pub fn python() -> PathBuf {
    let path = match std::env::var_os(PYTHON_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join(".venv/bin/python"),
    };
    assert!(
        path.exists(),
        "python with psycopg not found at {}: run scripts/setup (or set {PYTHON_ENV})",
        path.display()
    );
    path
}

/// pgjdbc, from Debian's libpostgresql-jdbc-java (installed by scripts/setup).
pub const PGJDBC_JAR: &str = "/usr/share/java/postgresql.jar";

/// Runs the single-file Java program `source` (JDK 11's source launcher, so nothing is
/// compiled ahead) with pgjdbc on the class path, stdout and stderr piped.
pub fn spawn_java(source: &Path, args: &[&str]) -> Child {
    assert!(
        Path::new(PGJDBC_JAR).exists(),
        "pgjdbc not found at {PGJDBC_JAR}: run scripts/setup"
    );
    Command::new("java")
        .args([
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-cp",
            PGJDBC_JAR,
        ])
        .arg(source)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run java (scripts/setup installs openjdk-17-jdk-headless)")
}

/// Starts the Node.js script `tests/node/<script>` (which finds the drivers scripts/setup installs
/// in `tests/node/node_modules`) with `args`, stdout and stderr piped.
pub fn spawn_node(script: &str, args: &[&str]) -> Child {
    let dir = workspace_root().join("tests/node");
    assert!(
        dir.join("node_modules").exists(),
        "{}/node_modules missing: run scripts/setup",
        dir.display()
    );
    Command::new("node")
        .arg(dir.join(script))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node (scripts/setup installs it)")
}

/// Runs the Node.js script `tests/node/<script>` with `args` ([`spawn_node`]); returns its stdout,
/// panics with stderr when it fails or takes longer than `deadline`.
pub fn run_node(script: &str, args: &[&str], deadline: Duration) -> String {
    node_succeeded(spawn_node(script, args), script, deadline)
}

/// Waits for the node script `child` started as `script`; its stdout, or a panic with its stderr
/// when it fails or takes longer than `deadline`.
pub fn node_succeeded(child: Child, script: &str, deadline: Duration) -> String {
    succeeded(
        wait_with_deadline(child, script, deadline),
        &format!("node {script}"),
    )
}

/// The stdout of a client program that exited 0; panics with its stderr (and stdout) if not.
fn succeeded(output: Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n--- stdout:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8(output.stdout).unwrap_or_else(|_| panic!("{what} printed UTF-8"))
}

/// Runs `code` with [`python()`] and the given arguments (`sys.argv[1..]`) and returns its
/// stdout. Panics with stderr when it exits non-zero.
pub fn run_python(code: &str, args: &[&str]) -> String {
    let output = Command::new(python())
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("run python");
    succeeded(output, "python")
}

/// psql 15 with unaligned, tuples-only, quiet output, stopping at the first error; callers add
/// the connection and `-c`.
pub fn psql_command() -> Command {
    let mut command = Command::new(psql_bin());
    command.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"]);
    command
}

/// Runs a psql `command` with stdin closed: `Ok` holds stdout without its trailing newlines,
/// `Err` holds stderr.
pub fn psql_output(command: &mut Command) -> Result<String, String> {
    let output = command.stdin(Stdio::null()).output().expect("run psql");
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let text = String::from_utf8(output.stdout).expect("psql printed UTF-8");
    Ok(text.trim_end_matches('\n').to_owned())
}

/// Runs psql 15 ([`psql_command`]) on `conninfo` with `script` on stdin, going on past errors
/// unless `stop_on_error`; kills it and panics if it runs past `deadline`. (stdout, stderr).
pub fn psql_script(
    conninfo: &str,
    script: &str,
    stop_on_error: bool,
    deadline: Duration,
) -> (String, String) {
    let mut command = psql_command();
    if !stop_on_error {
        command.args(["-v", "ON_ERROR_STOP=0"]);
    }
    let mut child = command
        .env_clear()
        .args(["-f", "-", "-d", conninfo])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run psql");
    child
        .stdin
        .take()
        .expect("psql stdin")
        .write_all(script.as_bytes())
        .expect("write the psql script");
    let output = wait_with_deadline(child, "psql", deadline);
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Waits for a child process, killing it and panicking when it takes longer than `deadline`.
pub fn wait_with_deadline(mut child: Child, what: &str, deadline: Duration) -> Output {
    let end = Instant::now() + deadline;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("collect output");
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let output = child.wait_with_output().expect("collect output");
            panic!(
                "{what} did not finish within {deadline:?}:\n{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A loopback TCP port that was free a moment ago: bound to 127.0.0.1:0, read, released.
///
/// Another process may take it before it is used; servers started here retry on bind errors.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_is_a_real_port() {
        // Whether it is still free when used is a race with every other process on the machine,
        // which is why callers retry; only the value itself is checked here.
        assert_ne!(free_port(), 0);
    }

    #[test]
    fn pg_paths_are_absolute() {
        assert_eq!(psql_bin(), Path::new("/usr/lib/postgresql/15/bin/psql"));
        assert!(workspace_root().join("Cargo.toml").exists());
    }
}
