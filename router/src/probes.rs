//! USDT probes (SystemTap SDT notes, provider `branchgate`): a connection's life as the kernel's
//! tools see it, with no restart and no cost until one is attached (`bpftrace -p PID`, `perf
//! probe`).
//!
//! Each probe is a `nop` in the code and an ELF note naming it and where its arguments are;
//! its arguments are computed only while a tool is attached (the note's semaphore). Strings go
//! as a pointer and a length, for `str(argN, argM)`: they are not NUL-terminated. README lists
//! the probes with a bpftrace line for each.
//!
//! | probe | arguments |
//! |---|---|
//! | `accepted` | port (0 direct, 1 pooled), socket fd |
//! | `tls_done` | direct SSL (1) or SSLRequest (0), µs since accept |
//! | `authenticated` | branch ptr, branch len, role ptr, role len, µs since accept |
//! | `backend_connected` | backend pid, backend port, µs to connect and authenticate |
//! | `transaction_begin` | client pid (the router-issued one), backend pid |
//! | `transaction_end` | client pid, backend pid, µs the backend was held |
//! | `session_end` | port, client pid, µs since login |
//! | `handoff` | from worker, to worker (an authenticated client sent to its branch's owner) |

use monoio::time::Instant;
use probe::probe_lazy;

/// Which port a connection came in on, as the probes give it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ProbePort {
    /// 5432: a backend per client.
    Direct = 0,
    /// 6432: transaction pooling.
    Pooled = 1,
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// A connection was accepted.
#[inline]
pub fn accepted(port: ProbePort, fd: i32) {
    probe_lazy!(branchgate, accepted, port as u8, fd);
}

/// TLS is up.
#[inline]
pub fn tls_done(direct_ssl: bool, accepted: Instant) {
    probe_lazy!(branchgate, tls_done, u8::from(direct_ssl), micros(accepted));
}

/// The client proved its password.
#[inline]
pub fn authenticated(branch: &str, role: &str, accepted: Instant) {
    probe_lazy!(
        branchgate,
        authenticated,
        branch.as_ptr(),
        branch.len(),
        role.as_ptr(),
        role.len(),
        micros(accepted)
    );
}

/// A backend connection is ready (authenticated, ReadyForQuery read).
#[inline]
pub fn backend_connected(pid: u32, port: u16, started: Instant) {
    probe_lazy!(branchgate, backend_connected, pid, port, micros(started));
}

/// A pooled client was given a backend for a transaction.
#[inline]
pub fn transaction_begin(client_pid: u32, backend_pid: u32) {
    probe_lazy!(branchgate, transaction_begin, client_pid, backend_pid);
}

/// A pooled client's transaction is over and its backend released (or closed).
#[inline]
pub fn transaction_end(client_pid: u32, backend_pid: u32, began: Instant) {
    probe_lazy!(
        branchgate,
        transaction_end,
        client_pid,
        backend_pid,
        micros(began)
    );
}

/// A logged-in client's session ended.
#[inline]
pub fn session_end(port: ProbePort, client_pid: u32, logged_in: Instant) {
    probe_lazy!(
        branchgate,
        session_end,
        port as u8,
        client_pid,
        micros(logged_in)
    );
}

/// An authenticated client was handed over from worker `from` to worker `to`, the owner of its
/// branch ([`crate::handoff`]).
#[inline]
pub fn handoff(from: u32, to: u32) {
    probe_lazy!(branchgate, handoff, from, to);
}
