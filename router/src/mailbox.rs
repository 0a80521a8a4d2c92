//! Bounded cross-thread mailboxes that wake a monoio runtime.
//!
//! Workers never share locks on the hot path; the rare cross-core traffic (cancel requests,
//! sessions to close after a password reset, shutdown) travels through one [`Mailbox`] per worker:
//! a bounded lock-free queue (crossbeam) plus an [`AtomicWaker`]. monoio's `sync` feature lets a
//! waker fired on another thread unpark the io_uring driver.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam_queue::ArrayQueue;

/// How many messages may wait for one worker before senders are refused.
pub const MAILBOX_CAPACITY: usize = 1024;

/// A message for one worker.
#[derive(Debug, Clone)]
pub enum Message {
    /// A CancelRequest received by another worker: cancel the session with this key if it is ours.
    Cancel(crate::protocol::startup::CancelKey),
    /// The verifier of `role` in `branch` changed or was removed: close its sessions.
    CloseRole {
        /// Branch id.
        branch: Arc<str>,
        /// Role name (without the branch suffix).
        role: Arc<str>,
    },
    /// Stop accepting, drain sessions for at most the configured time, then close the rest.
    Shutdown,
}

/// The receiving side lives on one worker; senders are any thread.
#[derive(Debug)]
pub struct Mailbox {
    queue: ArrayQueue<Message>,
    waker: AtomicWaker,
}

/// The mailbox was full: the message was dropped.
#[derive(Debug, thiserror::Error)]
#[error("worker mailbox is full")]
pub struct MailboxFull(pub Message);

impl Mailbox {
    /// An empty mailbox holding at most [`MAILBOX_CAPACITY`] messages.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            queue: ArrayQueue::new(MAILBOX_CAPACITY),
            waker: AtomicWaker::new(),
        })
    }

    /// Queue a message and wake the worker. Never blocks.
    pub fn send(&self, message: Message) -> Result<(), MailboxFull> {
        let result = self.queue.push(message).map_err(MailboxFull);
        self.waker.wake();
        result
    }

    /// Wait for the next message. Cancel-safe: a message is only taken when it is returned.
    pub async fn recv(&self) -> Message {
        poll_fn(|cx| {
            if let Some(message) = self.queue.pop() {
                return Poll::Ready(message);
            }
            self.waker.register(cx.waker());
            // A sender may have pushed between the pop and the register.
            match self.queue.pop() {
                Some(message) => Poll::Ready(message),
                None => Poll::Pending,
            }
        })
        .await
    }
}
