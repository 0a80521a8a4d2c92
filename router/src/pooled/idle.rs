//! A pooled client between transactions: it waits holding no backend and no buffer, and the
//! router answers the messages that need no backend.

use monoio::time::Instant;

use crate::buf::ReadBuf;
use crate::protocol::frontend as fe;
use crate::protocol::sqlstate::SqlState;
use crate::tls;
use crate::worker::Worker;

use super::exchange::client_piece;
use super::prepared;
use super::stream::MessageStream;
use super::{send_plain, Client, End};

/// Waits, holding no backend and no buffer, until the client sends messages that need a
/// backend; answers those that need none on the way.
pub(super) async fn next_batch(worker: &Worker, client: &mut Client) -> Result<(), End> {
    loop {
        let settings = client.pool.settings();
        // Records read before but not opened then (no room beside what the last transaction
        // left).
        if !client.cipher.is_empty() {
            client.plain.attach(&worker.message_buffers);
            match tls::open_into(&mut client.records, &mut client.cipher, &mut client.plain) {
                Ok(true) => {}
                Ok(false) => return Err(End::ClientClosed),
                Err(error) => return Err(End::ClientFailed(error.to_string())),
            }
        }
        // Idle: nothing held but the socket (and a partial message, if the client sent one).
        client.cipher.detach(&worker.buffers);
        client.plain.detach(&worker.message_buffers);
        if !ready(&client.plain) {
            let idle_deadline = settings.client_idle_timeout.map(|t| Instant::now() + t);
            // Quiet for a second or more: the expanded TLS keys go (about 1.2 KiB), and the
            // next record rebuilds them.
            client.handle.quiet.begin(worker.quiet_rounds());
            loop {
                let quiet = monoio::select! {
                    readable = client.readiness.wait(&client.rd) => {
                        client.handle.quiet.end();
                        readable.map_err(|e| End::ClientFailed(e.to_string()))?;
                        false
                    },
                    reason = client.handle.kill.wait() => return Err(End::Killed(reason)),
                    () = idle_timeout(idle_deadline) => return Err(End::Fatal(
                        SqlState::IDLE_SESSION_TIMEOUT,
                        "client_idle_timeout",
                    )),
                    () = client.handle.quiet.due() => true,
                };
                if !quiet {
                    break;
                }
                client.handle.quiet.end();
                client.records.shed_keys();
                tracing::trace!("quiet pooled client shed its TLS keys");
            }
            // Boxed, as what it sends below: the wait above is what an idle client holds.
            let reading = Box::pin(read_client(worker, client));
            if !reading.await? {
                return Err(End::ClientClosed);
            }
            if !ready(&client.plain) {
                continue;
            }
        }
        match client.plain.data().first() {
            Some(&fe::TERMINATE) => return Err(End::ClientClosed),
            // Refused before it costs a backend, as PostgreSQL refuses it.
            Some(&tag) if !fe::is_session_message(tag) => {
                return Err(End::Protocol(fe::invalid_type_message(tag)))
            }
            _ => {}
        }
        // Messages the router answers itself need no backend (a driver closing or preparing
        // a statement between transactions, with its Sync), unless the client is in a
        // transaction block its lost backend aborted: that block is re-created on the next
        // backend, which answers them as a server in it does (25P02, ReadyForQuery `E`).
        if client.aborted.is_some() {
            return Ok(());
        }
        let mut answer = Vec::new();
        client.follow_session();
        let answered = prepared::answer_idle(
            &mut client.plain,
            &mut client.statements,
            &client.pool.known_good,
            &client.pool.texts,
            settings.max_prepared_statements as usize,
            &mut answer,
        );
        if !answer.is_empty() {
            let sending = Box::pin(send_plain(client, &answer));
            sending.await?;
        }
        if !answered {
            return Ok(());
        }
    }
}

/// True if `plain` holds what a transaction can start with: a whole message, or the first
/// bytes of one too long to wait for whole (or one that breaks the protocol, for the
/// transaction to refuse). A client that has sent part of a message holds no backend.
fn ready(plain: &ReadBuf) -> bool {
    !matches!(
        client_piece(&mut MessageStream::default(), plain.data()),
        Ok(None)
    )
}

/// Completes at `deadline`, if there is one. The timer is boxed: monoio's `Sleep` is 768 bytes
/// (aligned to 128), which every idle client's wait would otherwise hold, with or without a
/// `client_idle_timeout`.
async fn idle_timeout(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => Box::pin(monoio::time::sleep_until(deadline)).await,
        None => std::future::pending().await,
    }
}

/// Reads what the client sent and opens it. `Ok(false)`: the client closed.
async fn read_client(worker: &Worker, client: &mut Client) -> Result<bool, End> {
    client.cipher.attach(&worker.buffers);
    client.plain.attach(&worker.message_buffers);
    let n = client
        .cipher
        .fill_from(&mut client.rd)
        .await
        .map_err(|e| End::ClientFailed(e.to_string()))?;
    if n == 0 {
        return Ok(false);
    }
    match tls::open_into(&mut client.records, &mut client.cipher, &mut client.plain) {
        Ok(open) => Ok(open),
        Err(error) => Err(End::ClientFailed(error.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::mem::{align_of, size_of};
    use std::net::SocketAddr;

    use monoio::net::TcpStream;
    use monoio::time::Instant;

    use super::super::*;
    use crate::worker::{LiveGuard, StartupSlot};

    fn future_of<'a, F: Future>(
        _: impl FnOnce(&'a Rc<Worker>, &'a mut Client) -> F,
    ) -> (usize, usize) {
        (size_of::<F>(), align_of::<F>())
    }

    fn task_of<F: Future>(
        _: impl FnOnce(Rc<Worker>, TcpStream, SocketAddr, LiveGuard, StartupSlot, Instant) -> F,
    ) -> usize {
        size_of::<F>()
    }

    /// What an idle pooled client holds (BENCHMARKS.md, "Idle pooled clients"), so it cannot
    /// grow unnoticed: its task (with monoio's 48-byte task header), its life's box (the
    /// client), the serving loop's box and the boxed wait, and the client's parts.
    #[test]
    fn an_idle_client_stays_small() {
        assert!(task_of(session) + 48 <= 160, "task {}", task_of(session));
        fn life_of<'a, F: Future>(
            _: impl FnOnce(&'a Rc<Worker>, Client, SocketAddr, Instant) -> F,
        ) -> usize {
            size_of::<F>()
        }
        // The client's life, boxed: in mimalloc's 512-byte class.
        assert!(life_of(life) <= 512, "life {}", life_of(life));
        let (wait, wait_align) = future_of(|w, c| next_batch(w, c));
        assert!(wait <= 384, "the idle wait is {wait} bytes");
        // No timer in place: monoio's `Sleep` is 768 bytes, aligned to 128.
        assert!(wait_align <= 16, "the idle wait is aligned to {wait_align}");
        assert!(future_of(serve).0 <= 48);
        // 392 since its session slot names its branch slot for `rebalance`, 400 since its
        // statements count their bytes (the per-client bound).
        assert!(size_of::<Client>() <= 400, "Client {}", size_of::<Client>());
        assert!(size_of::<ClientParams>() <= 80);
        assert!(size_of::<ClientStatements>() <= 80);
        // One for each named statement a client keeps (2,000 clients with 50 each: 100,000).
        let statement = size_of::<super::super::prepared::Statement>();
        assert!(statement <= 64, "Statement {statement}");
        assert!(size_of::<crate::worker::SessionHandle>() <= 136);
    }

    /// The wait for a backend, allocated and moved into its box once per transaction: its rare
    /// parts (connecting a backend, the pause and failover waits) are boxed apart.
    #[test]
    fn a_transactions_wait_for_a_backend_stays_small() {
        fn acquire_of<'a, F: Future>(
            _: impl FnOnce(
                &'a Rc<Worker>,
                &'a mut Client,
                &'a pool::Pool,
                crate::config::PoolSettings,
            ) -> F,
        ) -> usize {
            size_of::<F>()
        }
        let size = acquire_of(acquire::acquire);
        // Two of monoio's 768-byte timers (query_wait_timeout and the queued NOTICE); it was
        // 4,096 bytes with a backend's connect inside.
        assert!(size <= 3072, "acquire is {size} bytes");
    }
}
