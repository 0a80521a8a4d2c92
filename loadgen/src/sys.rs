//! The operating system: the open-file limit, the ephemeral port range, and another process's
//! resident memory.

use std::fs;
use std::io;
use std::path::Path;

/// Descriptors kept spare beyond the connections (runtime, stdio, files).
pub const SPARE_DESCRIPTORS: u64 = 256;

/// The open-file limit after [`raise_nofile`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nofile {
    /// The soft limit before.
    pub before: u64,
    /// The soft limit now.
    pub now: u64,
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit; if `wanted` is more than that, also
/// tries to raise the hard limit to `wanted` (root can, up to `fs.nr_open`).
pub fn raise_nofile(wanted: u64) -> io::Result<Nofile> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit to a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if wanted > limit.rlim_max {
        let more = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: wanted,
        };
        // SAFETY: setrlimit reads one rlimit from a valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &more) } == 0 {
            return Ok(Nofile {
                before,
                now: wanted,
            });
        }
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Nofile {
        before,
        now: limit.rlim_max,
    })
}

/// Where the kernel keeps the ephemeral port range (IPv6 uses the same one).
const PORT_RANGE_PATH: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Linux's default ephemeral port range, 32768 to 60999, for when /proc cannot be read.
pub const DEFAULT_EPHEMERAL_PORTS: u32 = 60999 - 32768 + 1;

/// How many ephemeral ports one source address has towards one server address and port.
pub fn ephemeral_ports() -> io::Result<u32> {
    let text = fs::read_to_string(PORT_RANGE_PATH)?;
    parse_port_range(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{PORT_RANGE_PATH}: '{}' is not FIRST LAST", text.trim()),
        )
    })
}

/// `32768\t60999` -> 28232.
fn parse_port_range(text: &str) -> Option<u32> {
    let mut words = text.split_whitespace();
    let first: u32 = words.next()?.parse().ok()?;
    let last: u32 = words.next()?.parse().ok()?;
    if words.next().is_some() || last < first {
        return None;
    }
    Some(last - first + 1)
}

/// Why a process's memory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The pid file could not be read.
    #[error("cannot read pid file {path}: {source}")]
    PidFile {
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The pid file does not start with a process id.
    #[error("pid file {0} does not hold a process id")]
    BadPidFile(String),
    /// /proc/PID/status could not be read (no such process?).
    #[error("cannot read /proc/{pid}/status: {source}")]
    Status {
        /// The process.
        pid: u32,
        /// Why.
        source: io::Error,
    },
    /// /proc/PID/status has no VmRSS line (a kernel thread, or a zombie).
    #[error("/proc/{0}/status has no VmRSS")]
    NoRss(u32),
}

/// The process id on the first line of a pid file (as PostgreSQL's postmaster.pid has it).
pub fn read_pid_file(path: &Path) -> Result<u32, ProcError> {
    let text = fs::read_to_string(path).map_err(|source| ProcError::PidFile {
        path: path.display().to_string(),
        source,
    })?;
    text.lines()
        .next()
        .and_then(|line| line.trim().parse().ok())
        .ok_or_else(|| ProcError::BadPidFile(path.display().to_string()))
}

/// Resident memory of process `pid`, in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> Result<u64, ProcError> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|source| ProcError::Status { pid, source })?;
    parse_vm_rss(&status).ok_or(ProcError::NoRss(pid))
}

/// The `VmRSS:   1234 kB` line of /proc/PID/status, in bytes.
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_fixture() {
        let status = "Name:\tbranchgate\nVmPeak:\t  9000 kB\nVmRSS:\t    2048 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(2 * 1024 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\tx kB\n"), None);
    }

    #[test]
    fn port_ranges() {
        assert_eq!(
            parse_port_range("32768\t60999\n"),
            Some(DEFAULT_EPHEMERAL_PORTS)
        );
        assert_eq!(parse_port_range("1024 1024"), Some(1));
        for bad in ["", "32768", "60999 32768", "a b", "1 2 3"] {
            assert_eq!(parse_port_range(bad), None, "{bad}");
        }
        assert!(ephemeral_ports().expect("readable on Linux") > 0);
    }

    #[test]
    fn own_memory_and_pid_files() {
        let rss = rss_bytes(std::process::id()).expect("own status");
        assert!(rss > 1024 * 1024, "{rss}");
        assert!(matches!(rss_bytes(u32::MAX), Err(ProcError::Status { .. })));

        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("x.pid");
        fs::write(&path, "4242\n/var/lib/postgresql\n").expect("write");
        assert_eq!(read_pid_file(&path).expect("pid"), 4242);
        fs::write(&path, "nope\n").expect("write");
        assert!(matches!(
            read_pid_file(&path),
            Err(ProcError::BadPidFile(_))
        ));
        assert!(matches!(
            read_pid_file(&dir.path().join("missing")),
            Err(ProcError::PidFile { .. })
        ));
    }

    #[test]
    fn nofile_soft_limit_reaches_the_hard_limit() {
        let limit = raise_nofile(0).expect("setrlimit");
        assert!(limit.now >= limit.before);
    }
}
