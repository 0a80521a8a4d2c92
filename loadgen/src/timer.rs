//! A per-thread timer precise to microseconds, for sending on schedule.
//!
//! monoio's timer wheel rounds every deadline up to the next millisecond. An open-loop request
//! scheduled 0.3 ms from now would leave up to a millisecond late, and since latency counts
//! from the scheduled time, a loopback query of 50 µs would read as 1 ms. So the pacers sleep
//! here instead: one timerfd per thread, armed for the earliest deadline, with a driver task
//! that waits for it to fire and wakes every sleeper whose time has come.

use std::cell::{Cell, RefCell};
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::future::poll_fn;
use std::io;
use std::os::fd::FromRawFd;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use monoio::net::TcpStream;

/// One sleeper.
struct Entry {
    deadline: Instant,
    seq: u64,
    waker: Waker,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.seq) == (other.deadline, other.seq)
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.deadline, self.seq).cmp(&(other.deadline, other.seq))
    }
}

/// The thread's precise timer; lives as long as the runtime it was started on.
pub struct Timer {
    /// The timerfd. monoio only waits for readiness on its own stream types; a TcpStream
    /// wrapper is used for that alone (no socket call is ever made on it).
    fd: TcpStream,
    raw_fd: i32,
    sleepers: RefCell<BinaryHeap<Reverse<Entry>>>,
    /// The deadline the timerfd is set for.
    armed: Cell<Option<Instant>>,
    /// The driver task, when it waits for a first sleeper.
    idle_driver: RefCell<Option<Waker>>,
    seq: Cell<u64>,
}

impl std::fmt::Debug for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timer")
            .field("sleepers", &self.sleepers.borrow().len())
            .finish_non_exhaustive()
    }
}

impl Timer {
    /// Creates the timer and spawns its driver task; call inside a monoio runtime.
    pub fn start() -> io::Result<Rc<Timer>> {
        // SAFETY: plain syscall; the result is checked.
        let raw_fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw_fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw_fd` is a fresh descriptor that nothing else owns; the stream closes it.
        let fd = TcpStream::from_std(unsafe { std::net::TcpStream::from_raw_fd(raw_fd) })?;
        let timer = Rc::new(Timer {
            fd,
            raw_fd,
            sleepers: RefCell::new(BinaryHeap::new()),
            armed: Cell::new(None),
            idle_driver: RefCell::new(None),
            seq: Cell::new(0),
        });
        monoio::spawn(timer.clone().drive());
        Ok(timer)
    }

    /// Sleeps until `deadline` (not at all if it has passed). Cancel-safe.
    pub async fn sleep_until(&self, deadline: Instant) {
        poll_fn(|cx| {
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            self.register(deadline, cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    fn register(&self, deadline: Instant, waker: Waker) {
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        self.sleepers.borrow_mut().push(Reverse(Entry {
            deadline,
            seq,
            waker,
        }));
        if self.armed.get().is_none_or(|armed| deadline < armed) {
            self.arm(deadline);
        }
        if let Some(driver) = self.idle_driver.borrow_mut().take() {
            driver.wake();
        }
    }

    /// Sets the timerfd to fire at `deadline` (at once if it has passed).
    fn arm(&self, deadline: Instant) {
        // A zero it_value would disarm the timer: fire after 1 ns instead.
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: wait.as_secs() as libc::time_t,
                tv_nsec: wait.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: a valid timerfd and itimerspec; the old value is not asked for. Failure is
        // impossible with these arguments (EINVAL needs a bad fd or nanoseconds >= 1e9).
        unsafe { libc::timerfd_settime(self.raw_fd, 0, &spec, std::ptr::null_mut()) };
        self.armed.set(Some(deadline));
    }

    async fn drive(self: Rc<Self>) {
        loop {
            if self.sleepers.borrow().is_empty() {
                poll_fn(|cx| {
                    if self.sleepers.borrow().is_empty() {
                        *self.idle_driver.borrow_mut() = Some(cx.waker().clone());
                        Poll::Pending
                    } else {
                        Poll::Ready(())
                    }
                })
                .await;
                continue;
            }
            if self.fd.readable(false).await.is_err() {
                // Not expected for a timerfd; fall back to the coarse wheel for this round.
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
            self.drain();
            self.armed.set(None);
            let now = Instant::now();
            let mut due = Vec::new();
            {
                let mut sleepers = self.sleepers.borrow_mut();
                while sleepers.peek().is_some_and(|e| e.0.deadline <= now) {
                    if let Some(Reverse(entry)) = sleepers.pop() {
                        due.push(entry.waker);
                    }
                }
                if let Some(next) = sleepers.peek() {
                    self.arm(next.0.deadline);
                }
            }
            for waker in due {
                waker.wake();
            }
        }
    }

    /// Reads the expiration count so the descriptor stops being readable.
    fn drain(&self) {
        let mut count = [0u8; 8];
        // SAFETY: reads at most 8 bytes into an 8-byte buffer; the fd is non-blocking, so
        // EAGAIN (a spurious wake-up) just returns -1.
        unsafe { libc::read(self.raw_fd, count.as_mut_ptr().cast(), count.len()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{block_on, join_all};

    #[test]
    fn wakes_sleepers_on_time_and_in_order() {
        let lateness = block_on(async {
            let timer = Timer::start().expect("timerfd");
            let start = Instant::now();
            let order = Rc::new(RefCell::new(Vec::new()));
            // Deadlines out of order, some closer together than a millisecond.
            let offsets_us = [900u64, 300, 2500, 350, 1200, 50];
            let tasks = offsets_us
                .iter()
                .map(|&us| {
                    let (timer, order) = (timer.clone(), order.clone());
                    monoio::spawn(async move {
                        let deadline = start + Duration::from_micros(us);
                        timer.sleep_until(deadline).await;
                        let now = Instant::now();
                        assert!(now >= deadline, "woke early");
                        let late = now - deadline;
                        order.borrow_mut().push(us);
                        late
                    })
                })
                .collect();
            let lateness = join_all(tasks).await;
            assert_eq!(*order.borrow(), [50, 300, 350, 900, 1200, 2500]);
            // A deadline in the past returns at once.
            timer.sleep_until(start).await;
            lateness
        })
        .expect("runtime");
        let mut sorted = lateness.clone();
        sorted.sort();
        // The millisecond wheel would be 0.5 ms late on average; allow for a busy machine.
        assert!(
            sorted[sorted.len() / 2] < Duration::from_micros(600),
            "{lateness:?}"
        );
    }
}
