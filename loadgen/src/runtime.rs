//! Thread-per-core: one monoio runtime (io_uring, epoll where io_uring is unavailable) per
//! thread, each owning its connections outright, like the router's workers. The calling thread
//! only watches: it draws the progress bar while the workers run.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::thread;
use std::time::{Duration, Instant};

/// io_uring submission queue entries per thread: enough for thousands of connections with a
/// read in flight each (completions beyond the queue are not lost, only batched).
pub const URING_ENTRIES: u32 = 4096;

/// How often the watching thread wakes up (progress bar redraws).
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// Why the worker threads could not run.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A thread or its runtime could not be started.
    #[error("cannot start a worker thread: {0}")]
    Start(#[from] io::Error),
    /// A worker thread panicked (a bug: the message went to stderr).
    #[error("a worker thread panicked")]
    Panicked,
}

/// Runs `future` to completion on a new monoio runtime on this thread.
pub fn block_on<F: Future>(future: F) -> io::Result<F::Output> {
    let mut runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .with_entries(URING_ENTRIES)
        .enable_timer()
        .build()?;
    Ok(runtime.block_on(future))
}

/// Runs `work(index)` on `threads` new threads and calls `watch` on this one every 100 ms until
/// they have all returned; then returns their results in thread order.
pub fn run_threads<T, F>(
    threads: usize,
    work: F,
    mut watch: impl FnMut(),
) -> Result<Vec<T>, RuntimeError>
where
    T: Send + 'static,
    F: Fn(usize) -> io::Result<T> + Send + Sync + 'static,
{
    let work = Arc::new(work);
    let mut handles = Vec::with_capacity(threads);
    for index in 0..threads {
        let work = work.clone();
        let handle = thread::Builder::new()
            .name(format!("loadgen-{index}"))
            .spawn(move || work(index))?;
        handles.push(handle);
    }
    while !handles.iter().all(|h| h.is_finished()) {
        watch();
        thread::sleep(WATCH_INTERVAL);
    }
    watch();
    let mut results = Vec::with_capacity(threads);
    for handle in handles {
        results.push(handle.join().map_err(|_| RuntimeError::Panicked)??);
    }
    Ok(results)
}

/// Sleeps until `deadline` (at once if it has passed).
pub async fn sleep_until(deadline: Instant) {
    if deadline > Instant::now() {
        monoio::time::sleep_until(monoio::time::Instant::from_std(deadline)).await;
    }
}

/// Counters the worker threads bump and the progress bar reads.
#[derive(Debug, Default)]
pub struct Counters {
    /// Operations completed (connections or queries).
    pub done: AtomicU64,
    /// Operations failed.
    pub errors: AtomicU64,
}

impl Counters {
    /// One more operation completed.
    pub fn done(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// One more operation failed.
    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// (done, errors).
    pub fn read(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

/// A counting semaphore for the tasks of one thread: bounds how many connections are being
/// set up at once.
#[derive(Debug)]
pub struct Gate {
    free: Cell<usize>,
    waiters: RefCell<VecDeque<Waker>>,
}

/// A place taken in a [`Gate`], given back on drop.
#[derive(Debug)]
pub struct Permit(Rc<Gate>);

impl Gate {
    /// A gate letting `places` tasks through at once.
    pub fn new(places: usize) -> Rc<Gate> {
        Rc::new(Gate {
            free: Cell::new(places.max(1)),
            waiters: RefCell::new(VecDeque::new()),
        })
    }

    /// Waits for a free place. Cancel-safe.
    pub async fn acquire(self: &Rc<Self>) -> Permit {
        poll_fn(|cx| {
            let free = self.free.get();
            if free > 0 {
                self.free.set(free - 1);
                Poll::Ready(Permit(self.clone()))
            } else {
                self.waiters.borrow_mut().push_back(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.free.set(self.0.free.get() + 1);
        if let Some(waker) = self.0.waiters.borrow_mut().pop_front() {
            waker.wake();
        }
    }
}

/// Awaits every task in `tasks`.
pub async fn join_all<T>(tasks: Vec<monoio::task::JoinHandle<T>>) -> Vec<T> {
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await);
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_bounds_concurrency() {
        let peak = block_on(async {
            let gate = Gate::new(3);
            let (running, peak) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
            let tasks = (0..20)
                .map(|_| {
                    let (gate, running, peak) = (gate.clone(), running.clone(), peak.clone());
                    monoio::spawn(async move {
                        let _permit = gate.acquire().await;
                        running.set(running.get() + 1);
                        peak.set(peak.get().max(running.get()));
                        monoio::time::sleep(Duration::from_millis(2)).await;
                        running.set(running.get() - 1);
                    })
                })
                .collect();
            join_all(tasks).await;
            peak.get()
        })
        .expect("runtime");
        assert_eq!(peak, 3);
    }

    #[test]
    fn threads_return_in_order() {
        let mut watched = 0;
        let results = run_threads(3, |i| Ok(i * 10), || watched += 1).expect("threads run");
        assert_eq!(results, [0, 10, 20]);
        assert!(watched >= 1);
        let failed = run_threads(1, |_| Err::<(), _>(io::Error::other("no")), || {});
        assert!(matches!(failed, Err(RuntimeError::Start(_))));
    }
}
