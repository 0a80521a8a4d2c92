//! The hand-off: an authenticated client moved to the worker that owns its branch.
//!
//! The kernel (SO_REUSEPORT's hash, or the eBPF program for a client it does not know yet)
//! chooses the worker that accepts a connection before anyone knows its branch. So that a
//! branch's clients meet on one worker, and share its pools there (`pool_size` backends per
//! branch, not per worker), the front door hands an authenticated client over to the branch's
//! owner ([`crate::steering::Steering::owner`]) when that is another worker and steering is not
//! `"off"` ([`hand_off`], called by [`crate::front_door::enter`]).
//!
//! What moves ([`Handoff`]): the socket (a descriptor out of the accepting worker's runtime),
//! the TLS state (the [`crate::tls::RecordLayer`] with its keys and sequence numbers, and the
//! bytes read but not yet opened or used, copied out of the worker's buffers), the
//! [`Authenticated`] client, its session slot, its port, peer address and accept time. It
//! travels in the owner's [`Inbox`], a bounded crossbeam channel, whose [`AtomicWaker`] wakes
//! the owner's runtime (monoio's `sync` feature unparks its io_uring driver through its
//! eventfd: no polling), as the [`crate::mailbox`] does. The owner's [`receive`] task rebuilds
//! the connection in its runtime and goes on where the accepting worker stopped:
//! [`crate::direct::after_front_door`] or `pooled::login::after_front_door`. The client
//! notices nothing: the same TLS session, the same bytes.
//!
//! The per-worker counts move with the client: the accepting worker's
//! [`crate::worker::LiveGuard`] and startup slot are given up there, the owner takes a live
//! guard of its own ([`Worker::adopt`]); the session slot is router-wide and travels.
//!
//! # When a client stays
//! Never refused for want of a hand-off: if the owner's inbox is full ([`INBOX_CAPACITY`]) or
//! the owner is stopping, or the socket cannot be taken out of the runtime, the accepting
//! worker serves the client itself (logged, throttled). While the router shuts down nothing is
//! handed off.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use monoio::time::Instant;

use crate::front_door::conn::Moving;
use crate::front_door::{Authenticated, ClientConn, Entered, Port};
use crate::throttle::LogThrottle;
use crate::worker::{SessionSlot, Worker};

/// Hand-offs waiting for one worker. Past it, clients stay where they were accepted.
pub const INBOX_CAPACITY: usize = 1024;

/// An authenticated client on its way to the worker that owns its branch.
#[derive(Debug)]
pub struct Handoff {
    from: usize,
    port: Port,
    peer: SocketAddr,
    accepted: Instant,
    conn: Moving,
    auth: Box<Authenticated>,
    slot: SessionSlot,
    /// When the accepting worker began the hand-off: the owner observes the time to
    /// [`Handoff::arrive`] (`branchgate_handoff_seconds`).
    began: std::time::Instant,
}

impl Handoff {
    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// When the accepting worker accepted the connection.
    pub fn accepted(&self) -> Instant {
        self.accepted
    }

    /// The connection in `worker`'s runtime, as [`crate::front_door::enter`] gives it: what
    /// follows the front door takes it from here. `None` if the socket could not be taken in
    /// (logged; the connection is closed).
    pub fn arrive(self, worker: &Worker) -> Option<Entered<'_>> {
        let Handoff {
            from,
            peer,
            conn,
            auth,
            slot,
            began,
            ..
        } = self;
        match ClientConn::from_moving(conn, &worker.buffers) {
            Ok(conn) => {
                worker.stats.handoff_time.observe(began.elapsed());
                Some(Entered { conn, auth, slot })
            }
            Err(error) => {
                if let Some(suppressed) = LOST.allow() {
                    tracing::warn!(
                        %peer,
                        from,
                        to = worker.id,
                        %error,
                        suppressed,
                        "handed-off connection lost"
                    );
                }
                None
            }
        }
    }
}

/// One worker's incoming hand-offs (`T`: a [`Handoff`], boxed). Any thread sends; the
/// worker's [`receive`] task takes.
#[derive(Debug)]
pub struct Inbox<T = Box<Handoff>> {
    sender: Sender<T>,
    receiver: Receiver<T>,
    waker: AtomicWaker,
    /// False once the worker stops: nothing more is sent to it.
    open: AtomicBool,
}

impl<T> Default for Inbox<T> {
    fn default() -> Self {
        Self::with_capacity(INBOX_CAPACITY)
    }
}

impl<T> Inbox<T> {
    /// An open inbox with room for `capacity` hand-offs.
    pub fn with_capacity(capacity: usize) -> Self {
        let (sender, receiver) = crossbeam_channel::bounded(capacity);
        Self {
            sender,
            receiver,
            waker: AtomicWaker::new(),
            open: AtomicBool::new(true),
        }
    }

    /// No more hand-offs to this worker (it stops).
    pub fn close(&self) {
        self.open.store(false, Ordering::Release);
    }

    /// True until [`Inbox::close`].
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// True when a send would find no room.
    fn is_full(&self) -> bool {
        self.sender.is_full()
    }

    /// Queues `item` and wakes the worker; gives it back if the inbox is full or closed.
    /// Public for the hand-off bench (`bench/benches/handoff.rs`), which drives inboxes itself.
    pub fn send(&self, item: T) -> Result<(), T> {
        if !self.is_open() {
            return Err(item);
        }
        match self.sender.try_send(item) {
            Ok(()) => {
                self.waker.wake();
                Ok(())
            }
            Err(TrySendError::Full(item) | TrySendError::Disconnected(item)) => Err(item),
        }
    }

    /// The next hand-off. Cancel-safe: one is taken only when it is returned. Public for the
    /// hand-off bench, as [`Inbox::send`].
    pub async fn recv(&self) -> T {
        std::future::poll_fn(|cx| {
            if let Ok(item) = self.receiver.try_recv() {
                return Poll::Ready(item);
            }
            self.waker.register(cx.waker());
            // A sender may have sent between the first look and the register.
            match self.receiver.try_recv() {
                Ok(item) => Poll::Ready(item),
                Err(_) => Poll::Pending,
            }
        })
        .await
    }

    /// Drops what is still queued (closing handed-off sockets nobody took), and says how many.
    /// For when every worker has stopped: a queued [`Handoff`] holds the router's shared state
    /// (its session slot), which holds the inbox.
    pub fn discard_all(&self) -> usize {
        self.receiver.try_iter().count()
    }
}

/// Hand-offs given up on because the owner was full or stopping (the client stays).
static OWNER_UNAVAILABLE: LogThrottle = LogThrottle::new();
/// Sockets that could not leave or enter a runtime.
static LOST: LogThrottle = LogThrottle::new();

/// Hands `entered` over to the worker that owns its branch, if that is another worker and
/// steering hands off. `Some` when the client stays here (the owner is this worker, or could
/// not take it: logged); `None` when it left, or was lost on the way back (logged).
///
/// Synchronous: a hand-off is a `dup`, a few copies and a channel send.
pub fn hand_off<'w>(
    worker: &'w Worker,
    entered: Entered<'w>,
    peer: SocketAddr,
    port: Port,
    accepted: Instant,
) -> Option<Entered<'w>> {
    let shared = &worker.shared;
    if !shared.steering.hands_off() {
        return Some(entered);
    }
    let slot = crate::steering::branch_slot(&entered.auth.branch.id);
    let owner = shared.steering.owner(slot) as usize;
    let (Some(inbox), Some(own)) = (shared.inboxes.get(owner), shared.inboxes.get(worker.id))
    else {
        return Some(entered);
    };
    // This worker stops: the router shuts down, and nothing moves any more.
    if owner == worker.id || !own.is_open() {
        return Some(entered);
    }
    if !inbox.is_open() || inbox.is_full() {
        unavailable(worker.id, owner, peer);
        return Some(entered);
    }
    let began = std::time::Instant::now();
    let Entered { conn, auth, slot } = entered;
    let conn = match conn.into_moving() {
        Ok(moving) => moving,
        Err((conn, error)) => {
            if let Some(suppressed) = LOST.allow() {
                tracing::warn!(%peer, %error, suppressed, "hand-off failed, serving here");
            }
            return Some(Entered {
                conn: *conn,
                auth,
                slot,
            });
        }
    };
    let handoff = Box::new(Handoff {
        from: worker.id,
        port,
        peer,
        accepted,
        conn,
        auth,
        slot,
        began,
    });
    match inbox.send(handoff) {
        Ok(()) => {
            worker.stats.handoffs_out.inc();
            crate::probes::handoff(
                u32::try_from(worker.id).unwrap_or(u32::MAX),
                u32::try_from(owner).unwrap_or(u32::MAX),
            );
            tracing::debug!(%peer, from = worker.id, to = owner, "handed off to the branch's owner");
            None
        }
        // Full or closed since the look above: serve it here after all.
        Err(handoff) => {
            unavailable(worker.id, owner, peer);
            (*handoff).arrive(worker)
        }
    }
}

#[cold]
fn unavailable(from: usize, owner: usize, peer: SocketAddr) {
    if let Some(suppressed) = OWNER_UNAVAILABLE.allow() {
        tracing::warn!(
            %peer,
            from,
            owner,
            suppressed,
            "branch owner's hand-off queue full or worker stopping: serving the client on the \
             worker that accepted it"
        );
    }
}

/// The owner's side: takes each hand-off from this worker's inbox, in this worker's budget of
/// live connections, and starts what follows its front door. Runs for the worker's life (also
/// through the drain: a client handed over then is served, and drained, like any other).
pub async fn receive(worker: Rc<Worker>) {
    let shared = worker.shared.clone();
    let Some(inbox) = shared.inboxes.get(worker.id) else {
        return;
    };
    loop {
        let handoff = inbox.recv().await;
        worker.stats.handoffs_in.inc();
        let live = worker.adopt();
        match handoff.port {
            Port::Direct => {
                monoio::spawn(crate::direct::handed_over(worker.clone(), live, handoff));
            }
            Port::Pooled => {
                monoio::spawn(crate::pooled::handed_over(worker.clone(), live, handoff));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn assert_send<T: Send>() {}

    #[test]
    fn a_handoff_can_cross_threads() {
        assert_send::<Box<Handoff>>();
    }

    #[test]
    fn a_full_or_closed_inbox_gives_the_hand_off_back() {
        let inbox = Inbox::with_capacity(2);
        assert_eq!((inbox.send(1), inbox.send(2)), (Ok(()), Ok(())));
        assert!(inbox.is_full());
        assert_eq!(inbox.send(3), Err(3));
        assert_eq!(inbox.discard_all(), 2);
        assert!(!inbox.is_full());
        inbox.close();
        assert!(!inbox.is_open());
        assert_eq!(inbox.send(4), Err(4));
        assert_eq!(inbox.discard_all(), 0);
    }

    /// The receiving runtime sleeps in io_uring (or epoll) with nothing else to do: a send
    /// from another thread must wake it (monoio's `sync` feature: its driver's eventfd).
    #[test]
    fn a_send_from_another_thread_wakes_the_receiving_runtime() {
        let inbox = std::sync::Arc::new(Inbox::with_capacity(4));
        let mut runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime");
        let sender = std::thread::spawn({
            let inbox = inbox.clone();
            move || {
                for n in 0..3 {
                    std::thread::sleep(Duration::from_millis(30));
                    inbox.send(n).expect("room");
                }
            }
        });
        let received = runtime.block_on(async {
            let mut received = Vec::new();
            for _ in 0..3 {
                let next = monoio::time::timeout(Duration::from_secs(5), inbox.recv()).await;
                received.push(next.expect("woken within 5 s"));
            }
            received
        });
        sender.join().expect("sender thread");
        assert_eq!(received, [0, 1, 2]);
    }
}
