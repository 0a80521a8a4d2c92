//! One-shot events inside one worker thread: [`Signal`] has one waiter and carries a value (a
//! session's kill reason); [`Broadcast`] wakes any number of waiters (the end of the drain, for
//! every connection still starting).

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// A one-shot local signal carrying a value, with a single waiter.
#[derive(Debug)]
pub struct Signal<T: Copy> {
    value: Cell<Option<T>>,
    waker: RefCell<Option<Waker>>,
}

impl<T: Copy> Default for Signal<T> {
    fn default() -> Self {
        Self {
            value: Cell::new(None),
            waker: RefCell::new(None),
        }
    }
}

impl<T: Copy> Signal<T> {
    /// Fire (the first value wins) and wake the waiter.
    pub fn fire(&self, value: T) {
        if self.value.get().is_none() {
            self.value.set(Some(value));
        }
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    /// Wakes the waiter without firing, to look at what else it waits for (its poll
    /// registers again).
    pub fn nudge(&self) {
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    /// Wait until fired. Cancel-safe.
    pub async fn wait(&self) -> T {
        poll_fn(|cx| match self.value.get() {
            Some(value) => Poll::Ready(value),
            None => {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// A one-shot local event with any number of waiters. Each waiter keeps one slot (its waker,
/// replaced on every poll and removed when the waiter is dropped), so waiters that come and go
/// for the life of a worker leave nothing behind.
#[derive(Debug, Default)]
pub struct Broadcast {
    fired: Cell<bool>,
    waiters: RefCell<Slots>,
}

#[derive(Debug, Default)]
struct Slots {
    wakers: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl Broadcast {
    /// Fire, waking every waiter; later waiters complete at once.
    pub fn fire(&self) {
        self.fired.set(true);
        let wakers: Vec<Waker> = {
            let mut slots = self.waiters.borrow_mut();
            slots.free.clear();
            slots.wakers.drain(..).flatten().collect()
        };
        for waker in wakers {
            waker.wake();
        }
    }

    /// True once fired.
    pub fn is_fired(&self) -> bool {
        self.fired.get()
    }

    /// Wait until fired. Cancel-safe.
    pub fn wait(&self) -> BroadcastWait<'_> {
        BroadcastWait {
            event: self,
            slot: None,
        }
    }

    /// Waiters currently registered.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.waiters
            .borrow()
            .wakers
            .iter()
            .filter(|w| w.is_some())
            .count()
    }
}

/// The future of [`Broadcast::wait`].
#[derive(Debug)]
pub struct BroadcastWait<'a> {
    event: &'a Broadcast,
    slot: Option<usize>,
}

impl Future for BroadcastWait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let event = self.event;
        if event.fired.get() {
            // `fire` emptied the slots.
            self.slot = None;
            return Poll::Ready(());
        }
        let mut slots = event.waiters.borrow_mut();
        let waker = Some(cx.waker().clone());
        match self.slot {
            Some(slot) => slots.wakers[slot] = waker,
            None => {
                let slot = match slots.free.pop() {
                    Some(slot) => {
                        slots.wakers[slot] = waker;
                        slot
                    }
                    None => {
                        slots.wakers.push(waker);
                        slots.wakers.len() - 1
                    }
                };
                self.slot = Some(slot);
            }
        }
        Poll::Pending
    }
}

impl Drop for BroadcastWait<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            if self.event.fired.get() {
                return;
            }
            let mut slots = self.event.waiters.borrow_mut();
            if let Some(waker) = slots.wakers.get_mut(slot) {
                *waker = None;
                slots.free.push(slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn broadcast_wakes_every_waiter_and_forgets_dropped_ones() {
        let event = Broadcast::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);

        let mut waiters: Vec<_> = (0..3).map(|_| Box::pin(event.wait())).collect();
        for waiter in &mut waiters {
            // Polled twice: still one slot each.
            assert!(waiter.as_mut().poll(&mut cx).is_pending());
            assert!(waiter.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(event.waiting(), 3);
        drop(waiters.pop());
        assert_eq!(event.waiting(), 2);
        // The freed slot is reused.
        let mut late = Box::pin(event.wait());
        assert!(late.as_mut().poll(&mut cx).is_pending());
        assert_eq!(event.waiters.borrow().wakers.len(), 3);

        event.fire();
        assert_eq!(count.0.load(Ordering::Relaxed), 3);
        for waiter in waiters.iter_mut().chain([&mut late]) {
            assert!(waiter.as_mut().poll(&mut cx).is_ready());
        }
        assert!(Box::pin(event.wait()).as_mut().poll(&mut cx).is_ready());
        assert_eq!(event.waiting(), 0);
    }
}
