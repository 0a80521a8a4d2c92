//! Cross-thread mailboxes that wake a monoio runtime.
//!
//! Workers never share locks on the hot path; the rare cross-core traffic travels through one
//! [`Mailbox`] per worker, with an [`AtomicWaker`] (monoio's `sync` feature lets a waker fired on
//! another thread unpark the io_uring driver). What clients can cause (cancel requests) goes
//! through a bounded lock-free queue (crossbeam) that drops when full; what the router itself
//! asks for (shutdown, a sweep after the catalog changed) is a flag, so no flood of cancels can
//! crowd it out, and asking twice before the worker looks is asking once.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam_queue::ArrayQueue;

use crate::protocol::startup::CancelKey;

/// How many cancel requests may wait for one worker before more are dropped.
pub const CANCEL_QUEUE_CAPACITY: usize = 1024;

/// What a worker is asked to do, in the order it looks: shutdown first, cancels last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// Stop accepting, drain sessions for at most the configured time, then close the rest.
    Shutdown,
    /// The catalog changed roles' verifiers (or removed them): close every session whose
    /// verifier is no longer the one in force.
    Sweep,
    /// A CancelRequest received by another worker: cancel the session with this key if it is ours.
    Cancel(CancelKey),
}

/// The receiving side lives on one worker; senders are any thread.
#[derive(Debug)]
pub struct Mailbox {
    cancels: ArrayQueue<CancelKey>,
    sweep: AtomicBool,
    shutdown: AtomicBool,
    waker: AtomicWaker,
}

/// The cancel queue was full: the request was dropped.
#[derive(Debug, thiserror::Error)]
#[error("worker mailbox is full")]
pub struct MailboxFull;

impl Mailbox {
    /// An empty mailbox.
    pub fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            cancels: ArrayQueue::new(CANCEL_QUEUE_CAPACITY),
            sweep: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        })
    }

    /// Queue a cancel request and wake the worker. Never blocks.
    pub fn send_cancel(&self, key: CancelKey) -> Result<(), MailboxFull> {
        let result = self.cancels.push(key).map_err(|_| MailboxFull);
        self.waker.wake();
        result
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
        self.cancels.pop().map(Message::Cancel)
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

    fn key(pid: u32) -> CancelKey {
        CancelKey { pid, secret: 7 }
    }

    #[test]
    fn control_requests_survive_a_full_cancel_queue_and_come_first() {
        let mailbox = Mailbox::new();
        for pid in 0..CANCEL_QUEUE_CAPACITY {
            mailbox.send_cancel(key(pid as u32)).expect("room");
        }
        assert!(mailbox.send_cancel(key(u32::MAX)).is_err());
        mailbox.request_sweep();
        mailbox.request_sweep();
        mailbox.request_shutdown();
        assert_eq!(mailbox.take(), Some(Message::Shutdown));
        assert_eq!(mailbox.take(), Some(Message::Sweep));
        assert_eq!(mailbox.take(), Some(Message::Cancel(key(0))));
        for _ in 1..CANCEL_QUEUE_CAPACITY {
            assert!(matches!(mailbox.take(), Some(Message::Cancel(_))));
        }
        assert_eq!(mailbox.take(), None);
    }
}
