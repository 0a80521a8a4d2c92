//! The operating system: the open-file limit, the ephemeral port range, another process's
//! resident memory (or that of a process and all its descendants), and sockets the peer has
//! closed.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::RawFd;
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
    /// /proc/PID/smaps_rollup could not be read (another user's process needs root or
    /// CAP_SYS_PTRACE).
    #[error("cannot read /proc/{pid}/smaps_rollup: {source}")]
    Smaps {
        /// The process.
        pid: u32,
        /// Why.
        source: io::Error,
    },
    /// /proc/PID/smaps_rollup has no Pss line, or /proc/PID/status no VmPTE line.
    #[error("/proc/{0} has no Pss or VmPTE (a kernel thread, or a zombie)")]
    NoPss(u32),
    /// /proc could not be listed.
    #[error("cannot list /proc: {0}")]
    ListProc(io::Error),
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
    parse_kb_line(status, "VmRSS:")
}

/// The `KEY   1234 kB` line of a /proc file (`status`, `smaps_rollup`), in bytes.
fn parse_kb_line(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let mut words = line[key.len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

/// The memory of a process and all its descendants (children, their children, ...), for a
/// server that forks a process per connection (PostgreSQL): its own VmRSS says nothing of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeMemory {
    /// Processes in the tree, the root included.
    pub processes: u64,
    /// Their proportional set sizes summed, bytes: every resident page once in all, a page
    /// shared by k of them counted 1/k in each (so pages a child still shares with the
    /// postmaster after fork, and shared memory, are not counted once per process as a sum of
    /// VmRSS would count them). Kernel memory is not in it.
    pub pss_bytes: u64,
    /// Their page tables summed (VmPTE), bytes: kernel memory each process costs beyond its
    /// pages, which a server with one process for all connections does not pay per connection.
    pub page_table_bytes: u64,
}

/// Reads [`TreeMemory`] of `root` and its descendants. A descendant that exits meanwhile is
/// left out; the root must be readable.
pub fn tree_memory(root: u32) -> Result<TreeMemory, ProcError> {
    let mut total = TreeMemory::default();
    for pid in descendants(root)? {
        match process_memory(pid) {
            Ok((pss, page_tables)) => {
                total.processes += 1;
                total.pss_bytes += pss;
                total.page_table_bytes += page_tables;
            }
            // Gone, or a zombie that holds no memory any more.
            Err(ProcError::Status { source, .. } | ProcError::Smaps { source, .. })
                if pid != root && gone(&source) => {}
            Err(ProcError::NoPss(_)) if pid != root => {}
            Err(error) => return Err(error),
        }
    }
    Ok(total)
}

/// Whether reading a process's /proc file failed because it exited meanwhile.
fn gone(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::NotFound || error.raw_os_error() == Some(libc::ESRCH)
}

/// Pss (smaps_rollup) and VmPTE (status) of one process, bytes.
fn process_memory(pid: u32) -> Result<(u64, u64), ProcError> {
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .map_err(|source| ProcError::Smaps { pid, source })?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|source| ProcError::Status { pid, source })?;
    match (
        parse_kb_line(&rollup, "Pss:"),
        parse_kb_line(&status, "VmPTE:"),
    ) {
        (Some(pss), Some(page_tables)) => Ok((pss, page_tables)),
        _ => Err(ProcError::NoPss(pid)),
    }
}

/// `root` and every process descending from it, root first, from the parent of each process
/// in /proc/PID/stat.
fn descendants(root: u32) -> Result<Vec<u32>, ProcError> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in fs::read_dir("/proc").map_err(ProcError::ListProc)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes come and go while /proc is listed; one that is gone has no children here.
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some(parent) = parse_parent(&stat) {
            children.entry(parent).or_default().push(pid);
        }
    }
    let mut tree = vec![root];
    let mut next = 0;
    while next < tree.len() {
        if let Some(kids) = children.get(&tree[next]) {
            tree.extend(kids);
        }
        next += 1;
    }
    Ok(tree)
}

/// The parent pid in /proc/PID/stat: `pid (comm) state ppid ...`, where comm may itself hold
/// spaces and parentheses, so the fields are counted from the last `)`.
fn parse_parent(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Which of `fds` the peer has closed (its FIN or RST arrived), without reading from them:
/// poll(2) with no wait, for POLLRDHUP (POLLHUP and POLLERR come unasked). Bytes the server
/// sent and left unread do not count as a close.
pub fn peer_closed(fds: &[RawFd]) -> io::Result<Vec<bool>> {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        })
        .collect();
    let len = libc::nfds_t::try_from(polls.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors"))?;
    loop {
        // SAFETY: `polls` is a valid array of `len` pollfd structures, written in place.
        let n = unsafe { libc::poll(polls.as_mut_ptr(), len, 0) };
        if n >= 0 {
            break;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    Ok(polls
        .iter()
        .map(|p| p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
        .collect())
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
    fn smaps_and_stat_fixtures() {
        let rollup = "56417f0fd000-7fff835f0000 ---p 00000000 00:00 0  [rollup]\nRss:  1772 kB\nPss:  458 kB\nPss_Dirty:  116 kB\n";
        assert_eq!(parse_kb_line(rollup, "Pss:"), Some(458 * 1024));
        assert_eq!(
            parse_kb_line("VmPTE:\t  44 kB\n", "VmPTE:"),
            Some(44 * 1024)
        );
        assert_eq!(parse_kb_line(rollup, "VmPTE:"), None);
        assert_eq!(parse_parent("42 (postgres) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parse_parent("43 (a) b (c) R 9 43"), Some(9));
        assert_eq!(parse_parent("44 (x"), None);
    }

    #[test]
    fn a_tree_counts_its_children() {
        let me = std::process::id();
        let alone = tree_memory(me).expect("own tree");
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("spawn sleep");
        let with_child = tree_memory(me).expect("own tree");
        let _ = child.kill();
        let _ = child.wait();
        assert!(alone.processes >= 1 && alone.pss_bytes > 0, "{alone:?}");
        assert!(alone.page_table_bytes > 0, "{alone:?}");
        assert!(
            with_child.processes > alone.processes,
            "{alone:?} {with_child:?}"
        );
        assert!(matches!(
            tree_memory(u32::MAX),
            Err(ProcError::Smaps { .. })
        ));
    }

    #[test]
    fn closed_sockets_are_seen_without_reading() {
        use std::io::Write;
        use std::net::{TcpListener, TcpStream};
        use std::os::fd::AsRawFd;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let pair = || {
            let client = TcpStream::connect(addr).expect("connect");
            (client, listener.accept().expect("accept").0)
        };
        let ((silent, _s1), (talked, mut s2), (closed, s3)) = (pair(), pair(), pair());
        s2.write_all(b"N").expect("write");
        drop(s3);
        let fds = [silent.as_raw_fd(), talked.as_raw_fd(), closed.as_raw_fd()];
        std::thread::sleep(std::time::Duration::from_millis(20));
        // Unread bytes are not a close; a FIN is, read or not.
        assert_eq!(peer_closed(&fds).expect("poll"), [false, false, true]);
        drop(s2);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(peer_closed(&fds).expect("poll"), [false, true, true]);
        assert!(peer_closed(&[]).expect("nothing").is_empty());
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
