//! A pooled client between transactions: it waits holding no backend and no buffer, and the
//! router answers the messages that need no backend.

use monoio::time::Instant;

use crate::buf::ReadBuf;
use crate::protocol::frontend as fe;
use crate::protocol::sqlstate::SqlState;
use crate::tls;
use crate::worker::Worker;

use super::prepared;
use super::{readable, send_plain, sleep_until, Client, End};

/// Waits, holding no backend and no buffer, until the client sends messages that need a
/// backend; answers those that need none on the way.
pub(super) async fn next_batch(worker: &Worker, client: &mut Client) -> Result<(), End> {
    loop {
        let settings = client.pool.settings();
        // Idle: nothing held but the socket (and a partial message, if the client sent one).
        client.cipher.detach(&worker.buffers);
        client.plain.detach(&worker.buffers);
        if !has_message(&client.plain) {
            let idle_deadline = settings.client_idle_timeout.map(|t| Instant::now() + t);
            monoio::select! {
                readable = readable(&client.rd) => readable.map_err(|e| End::ClientFailed(e.to_string()))?,
                reason = client.handle.kill.wait() => return Err(End::Killed(reason)),
                () = sleep_until(idle_deadline) => return Err(End::Fatal(
                    SqlState::IDLE_SESSION_TIMEOUT,
                    "client_idle_timeout",
                )),
            }
            // Boxed, as what it sends below: the wait above is what an idle client holds.
            let reading = Box::pin(read_client(worker, client));
            if !reading.await? {
                return Err(End::ClientClosed);
            }
            if !has_message(&client.plain) {
                continue;
            }
        }
        if client.plain.data().first() == Some(&fe::TERMINATE) {
            return Err(End::ClientClosed);
        }
        // Messages the router answers itself need no backend (a driver closing or preparing
        // a statement between transactions, with its Sync).
        let mut answer = Vec::new();
        let answered = prepared::answer_idle(
            &mut client.plain,
            &mut client.statements,
            &client.pool.known_good,
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

/// True if `plain` holds at least a message header (a message has begun).
fn has_message(plain: &ReadBuf) -> bool {
    plain.len() >= crate::protocol::frame::HEADER_BYTES
}

/// Reads what the client sent and opens it. `Ok(false)`: the client closed.
async fn read_client(worker: &Worker, client: &mut Client) -> Result<bool, End> {
    client.cipher.attach(&worker.buffers);
    client.plain.attach(&worker.buffers);
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
