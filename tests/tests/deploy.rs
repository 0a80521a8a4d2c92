//! deploy/branchgate.service: the unit passes `systemd-analyze verify`, and the router run the way
//! it runs there (an unprivileged user holding only CAP_BPF, CAP_NET_ADMIN and
//! CAP_NET_BIND_SERVICE, through setpriv) loads the steering program and listens on a port below
//! 1024; without the capabilities it falls back to userspace steering, as README says.
//!
//! Changing users needs root (as CI runs); run as another user, the second test says why it did
//! nothing and passes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use branchgate_e2e::binary::{branchgate_bin, wait_for};
use branchgate_e2e::catalog::catalog_toml;
use branchgate_e2e::{BranchSpec, Certs};

/// How long the router may take to start.
const START: Duration = Duration::from_secs(15);
/// The user the router runs as (`branchgate` in the unit; `nobody` exists everywhere).
const USER: &str = "nobody";
/// The capabilities the unit grants.
const CAPS: &str = "+bpf,+net_admin,+net_bind_service";

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/branchgate.service")
}

#[test]
fn the_systemd_unit_verifies() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: no systemd-analyze on this machine");
        return;
    }
    let unit = fs::read_to_string(unit_path()).expect("read deploy/branchgate.service");
    // The unit names /usr/local/bin/branchgate; verify checks that ExecStart exists.
    assert!(
        unit.contains("ExecStart=/usr/local/bin/branchgate run"),
        "{unit}"
    );
    for needed in [
        "User=branchgate",
        "AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "LimitNOFILE=",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.contains(needed), "the unit lacks {needed}");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let local = dir.path().join("branchgate.service");
    let bin = branchgate_bin();
    fs::write(
        &local,
        unit.replace(
            "/usr/local/bin/branchgate",
            bin.to_str().expect("UTF-8 path"),
        ),
    )
    .expect("write the unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&local)
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("branchgate.service"))
        .collect();
    assert!(complaints.is_empty(), "systemd-analyze verify:\n{stderr}");
}

/// A port below 1024 nothing listens on (tried by binding it), for CAP_NET_BIND_SERVICE.
fn free_privileged_port() -> u16 {
    (900..1000)
        .find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("a free port in 900..1000")
}

/// A directory the unprivileged user owns, with router.toml, its catalog and certificate.
fn router_dir(certs: &Certs, direct: u16) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("bg-deploy-")
        .tempdir()
        .expect("temp dir");
    let path = dir.path();
    fs::copy(certs.cert_path(), path.join("server.crt")).expect("copy cert");
    fs::copy(certs.key_path(), path.join("server.key")).expect("copy key");
    let primary = "127.0.0.1:1".parse().expect("addr");
    fs::write(
        path.join("catalog.toml"),
        catalog_toml(&[BranchSpec::new("deployed", primary)]),
    )
    .expect("write catalog");
    fs::write(
        path.join("router.toml"),
        format!(
            "catalog = \"catalog.toml\"\nworkers = 2\n[tls]\ncert = \"server.crt\"\n\
             key = \"server.key\"\n[listen]\ndirect = \"127.0.0.1:{direct}\"\n\
             [limits]\nmax_client_connections = 100\n"
        ),
    )
    .expect("write router.toml");
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{USER}:"))
        .arg(path)
        .status()
        .expect("run chown");
    assert!(status.success());
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// `branchgate run` as [`USER`] through setpriv, with `caps` inherited and ambient (or none).
fn run_as_user(dir: &Path, caps: Option<&str>) -> (Child, PathBuf) {
    let log = dir.join("branchgate.log");
    let log_file = fs::File::create(&log).expect("create log");
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={USER}"))
        .arg("--regid=nogroup")
        .arg("--clear-groups");
    match caps {
        Some(caps) => command
            .arg(format!("--inh-caps={caps}"))
            .arg(format!("--ambient-caps={caps}")),
        None => command.arg("--inh-caps=-all"),
    };
    let child = command
        .arg("--")
        .arg(branchgate_bin())
        .arg("run")
        .arg("--config")
        .arg("router.toml")
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("run setpriv (util-linux)");
    (child, log)
}

/// Waits for the router to accept (or exit), then stops it; returns its log.
fn started_log(mut child: Child, log: &Path) -> String {
    let read = || fs::read_to_string(log).unwrap_or_default();
    let up = wait_for("branchgate to accept or exit", START, || {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(Err(status));
        }
        read().contains("branchgate accepting").then_some(Ok(()))
    });
    let _ = child.kill();
    let _ = child.wait();
    let text = read();
    if let Err(status) = up {
        panic!("branchgate exited ({status}):\n{text}");
    }
    text
}

#[test]
fn the_units_capabilities_are_enough_and_without_them_steering_falls_back() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: changing users needs root");
        return;
    }
    let certs = Certs::generate();
    let port = free_privileged_port();
    let dir = router_dir(&certs, port);
    let (child, log) = run_as_user(dir.path(), Some(CAPS));
    let text = started_log(child, &log);
    assert!(text.contains("eBPF steering loaded"), "{text}");
    assert!(text.contains("steering=Ebpf"), "{text}");
    assert!(
        text.contains(&format!("direct_addr=127.0.0.1:{port}")),
        "listening below 1024 with CAP_NET_BIND_SERVICE:\n{text}"
    );

    // No capabilities (and a port it may bind): one line, then userspace steering.
    let dir = router_dir(&certs, 0);
    let (child, log) = run_as_user(dir.path(), None);
    let text = started_log(child, &log);
    assert!(
        text.contains("eBPF steering unavailable, falling back to steering = \"userspace\""),
        "{text}"
    );
    assert!(text.contains("steering=Userspace"), "{text}");
}
