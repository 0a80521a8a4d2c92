//! The CPU time a target's server process has used: user + system, all its threads.
//!
//! Read from the process's CPU clock (`clock_getcpuclockid` + `clock_gettime`, nanoseconds;
//! Linux lets any process read another's), or where that fails from utime + stime in
//! `/proc/PID/stat` (clock ticks, usually 10 ms each).

use std::fs;
use std::io;
use std::time::Duration;

use crate::settings::Common;
use crate::sys::ProcError;

/// Why a target's CPU time cannot be measured.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// The target's pid file could not be read.
    #[error("target '{target}': {source}")]
    PidFile {
        /// The target.
        target: String,
        /// Why.
        source: ProcError,
    },
    /// The process's CPU time could not be read (no such process, or it has exited).
    #[error("target '{target}': cannot read the CPU time of process {pid}: {source}")]
    Unreadable {
        /// The target.
        target: String,
        /// Its process.
        pid: u32,
        /// Why.
        source: ClockError,
    },
}

/// Why one reading failed.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    /// clock_gettime on the process's CPU clock failed (the process has exited).
    #[error("clock_gettime: {0}")]
    Clock(io::Error),
    /// /proc/PID/stat could not be read.
    #[error("cannot read /proc/{pid}/stat: {source}")]
    Stat {
        /// The process.
        pid: u32,
        /// Why.
        source: io::Error,
    },
    /// /proc/PID/stat has no utime and stime where the kernel puts them.
    #[error("/proc/{0}/stat has no utime and stime")]
    BadStat(u32),
    /// sysconf(_SC_CLK_TCK) gave no tick rate.
    #[error("sysconf(_SC_CLK_TCK) gives no clock tick rate")]
    NoTickRate,
}

/// How one process's CPU time is read.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// Its CPU clock.
    Clock(libc::clockid_t),
    /// `/proc/PID/stat`, counted in ticks of this many per second.
    Stat { ticks_per_s: u64 },
}

/// The CPU time of one target's process.
#[derive(Debug)]
pub struct CpuClock {
    target: String,
    pid: u32,
    source: Source,
}

impl CpuClock {
    /// The clock of process `pid` (the process of `target`), read once to be sure it can be.
    pub fn open(target: &str, pid: u32) -> Result<CpuClock, CpuError> {
        let unreadable = |source| CpuError::Unreadable {
            target: target.to_owned(),
            pid,
            source,
        };
        let source = match process_clock(pid) {
            Some(clock) => Source::Clock(clock),
            None => Source::Stat {
                ticks_per_s: ticks_per_s().map_err(unreadable)?,
            },
        };
        let clock = CpuClock {
            target: target.to_owned(),
            pid,
            source,
        };
        clock.read()?;
        Ok(clock)
    }

    /// The process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The CPU time the process has used since it started.
    pub fn read(&self) -> Result<Duration, CpuError> {
        let time = match self.source {
            Source::Clock(clock) => clock_time(clock),
            Source::Stat { ticks_per_s } => stat_time(self.pid, ticks_per_s),
        };
        time.map_err(|source| CpuError::Unreadable {
            target: self.target.clone(),
            pid: self.pid,
            source,
        })
    }
}

/// The clock of each target's `--pid` process, in target order; pid files are read now.
pub fn open_clocks(common: &Common) -> Result<Vec<Option<CpuClock>>, CpuError> {
    common
        .targets
        .iter()
        .zip(&common.pids)
        .map(|(target, source)| {
            let Some(source) = source else {
                return Ok(None);
            };
            let pid = source.read().map_err(|source| CpuError::PidFile {
                target: target.name.clone(),
                source,
            })?;
            CpuClock::open(&target.name, pid).map(Some)
        })
        .collect()
}

/// The CPU clock of process `pid`, if it has one that can be read.
fn process_clock(pid: u32) -> Option<libc::clockid_t> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: clock_getcpuclockid writes one clockid_t to a valid pointer.
    if unsafe { libc::clock_getcpuclockid(pid, &mut clock) } != 0 {
        return None;
    }
    clock_time(clock).ok().map(|_| clock)
}

fn clock_time(clock: libc::clockid_t) -> Result<Duration, ClockError> {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    if unsafe { libc::clock_gettime(clock, &mut time) } != 0 {
        return Err(ClockError::Clock(io::Error::last_os_error()));
    }
    // A CPU clock is never negative; the kernel keeps tv_nsec below a second.
    let secs = u64::try_from(time.tv_sec).unwrap_or(0);
    let nanos = u32::try_from(time.tv_nsec).unwrap_or(0);
    Ok(Duration::new(secs, nanos))
}

/// Clock ticks per second, the unit of /proc/PID/stat's times.
fn ticks_per_s() -> Result<u64, ClockError> {
    // SAFETY: sysconf only returns a value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks)
        .ok()
        .filter(|&t| t > 0)
        .ok_or(ClockError::NoTickRate)
}

fn stat_time(pid: u32, ticks_per_s: u64) -> Result<Duration, ClockError> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|source| ClockError::Stat { pid, source })?;
    let ticks = parse_stat_ticks(&stat).ok_or(ClockError::BadStat(pid))?;
    let nanos = u128::from(ticks) * 1_000_000_000 / u128::from(ticks_per_s);
    Ok(Duration::from_nanos(
        u64::try_from(nanos).unwrap_or(u64::MAX),
    ))
}

/// utime + stime (fields 14 and 15) of /proc/PID/stat, in clock ticks. Field 2 is the process
/// name in parentheses, which may itself hold spaces and ')': fields count from the last ')'.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    // Field 3 (the state) comes first after the name.
    let mut fields = after_name.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hint::black_box;
    use std::time::Instant;

    #[test]
    fn stat_fixture() {
        let stat = "1234 (a b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1000 \
                    12345678 900 18446744073709551615\n";
        assert_eq!(parse_stat_ticks(stat), Some(300));
        assert_eq!(parse_stat_ticks("1234 (x) S 1 2 3"), None);
        assert_eq!(
            parse_stat_ticks("1234 x S 1 1 1 0 -1 0 0 0 0 0 250 50"),
            None
        );
        assert_eq!(
            parse_stat_ticks("1 (x) S 1 1 1 0 -1 0 0 0 0 0 250 fifty"),
            None
        );
    }

    /// Burns CPU on this thread until the process's clock has moved on by `much`.
    fn burn(clock: &CpuClock, much: Duration) -> Duration {
        let before = clock.read().expect("own clock");
        let give_up = Instant::now() + Duration::from_secs(10);
        let mut n = 0u64;
        while Instant::now() < give_up {
            for i in 0..10_000u64 {
                n = black_box(n.wrapping_mul(31).wrapping_add(i));
            }
            let now = clock.read().expect("own clock");
            if now - before >= much {
                return now - before;
            }
        }
        panic!("the CPU clock did not move in 10 s of busy loop");
    }

    #[test]
    fn own_cpu_time_rises_with_work() {
        let clock = CpuClock::open("self", std::process::id()).expect("own clock");
        assert!(matches!(clock.source, Source::Clock(_)), "{clock:?}");
        let used = burn(&clock, Duration::from_millis(30));
        assert!(used >= Duration::from_millis(30), "{used:?}");

        // /proc agrees, to within a few ticks.
        let ticks_per_s = ticks_per_s().expect("tick rate");
        let from_stat = stat_time(std::process::id(), ticks_per_s).expect("own stat");
        let from_clock = clock.read().expect("own clock");
        assert!(from_stat > Duration::ZERO);
        let tick = Duration::from_secs(1) / u32::try_from(ticks_per_s).expect("small");
        assert!(
            from_stat <= from_clock + tick * 2,
            "{from_stat:?} {from_clock:?}"
        );
    }

    #[test]
    fn a_missing_process_is_one_clear_error() {
        let error = CpuClock::open("bg", u32::MAX).expect_err("no such process");
        let text = error.to_string();
        assert!(
            text.starts_with("target 'bg': cannot read the CPU time of process 4294967295: "),
            "{text}"
        );
        assert!(!text.contains('\n'), "{text}");
    }
}
