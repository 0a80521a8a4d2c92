//! Cross-thread mailboxes that wake a monoio runtime.
//!
//! Workers never share locks on the hot path; the rare cross-core requests travel through one
//! [`Mailbox`] per worker, with an [`AtomicWaker`] (monoio's `sync` feature lets a waker fired on
//! another thread unpark the io_uring driver). What the router asks of a worker (shutdown, a
//! sweep after the catalog changed) is a flag, so asking twice before the worker looks is asking
//! once, and nothing a client does can crowd it out. (Cancel requests need no mailbox: any
//! worker finds a session's backend in [`crate::cancel::CancelIndex`].)

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use atomic_waker::AtomicWaker;

/// What a worker is asked to do, in the order it looks: shutdown first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// Stop accepting, drain sessions for at most the configured time, then close the rest.
    Shutdown,
    /// The catalog changed roles' verifiers (or removed them): close every session whose
    /// verifier is no longer the one in force.
    Sweep,
}

/// The receiving side lives on one worker; senders are any thread.
#[derive(Debug)]
pub struct Mailbox {
    sweep: AtomicBool,
    shutdown: AtomicBool,
    waker: AtomicWaker,
}

impl Mailbox {
    /// An empty mailbox.
    pub fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            sweep: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        })
    }

    /// Ask the worker to sweep its sessions against the current catalog.
    pub fn request_sweep(&self) {
        self.sweep.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ask the worker to shut down.
    pub fn request_shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn take(&self) -> Option<Message> {
        if self.shutdown.swap(false, Ordering::AcqRel) {
            return Some(Message::Shutdown);
        }
        if self.sweep.swap(false, Ordering::AcqRel) {
            return Some(Message::Sweep);
        }
        None
    }

    /// Wait for the next message. Cancel-safe: a message is only taken when it is returned.
    pub async fn recv(&self) -> Message {
        poll_fn(|cx| {
            if let Some(message) = self.take() {
                return Poll::Ready(message);
            }
            self.waker.register(cx.waker());
            // A sender may have pushed between the take and the register.
            match self.take() {
                Some(message) => Poll::Ready(message),
                None => Poll::Pending,
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_comes_first_and_repeated_requests_are_one() {
        let mailbox = Mailbox::new();
        assert_eq!(mailbox.take(), None);
        mailbox.request_sweep();
        mailbox.request_sweep();
        mailbox.request_shutdown();
        assert_eq!(mailbox.take(), Some(Message::Shutdown));
        assert_eq!(mailbox.take(), Some(Message::Sweep));
        assert_eq!(mailbox.take(), None);
    }
}
