//! CancelRequest routing.
//!
//! The key a client holds is (backend pid, router-issued secret). A CancelRequest may arrive on
//! any worker, in plaintext or over TLS. The receiving worker looks in its own registry first;
//! if the session is not there it asks every other worker through its mailbox (cancels are rare,
//! so a broadcast costs nothing and keeps all 32 bits of the secret random). The owner compares
//! the secret in constant time and sends a real CancelRequest with the backend's own key.
//! A wrong secret does nothing and the client is told nothing, as in PostgreSQL.

use std::rc::Rc;

use crate::protocol::startup::CancelKey;
use crate::worker::Worker;

/// Handle a CancelRequest received by `worker`.
pub fn handle(worker: &Rc<Worker>, key: CancelKey) {
    if cancel_local(worker, key) {
        return;
    }
    for (id, mailbox) in worker.shared.mailboxes.iter().enumerate() {
        if id != worker.id && mailbox.send_cancel(key).is_err() {
            tracing::debug!(worker = id, "mailbox full: cancel request dropped");
        }
    }
}

/// Cancel the matching session if this worker owns it. Returns true if it did.
pub fn cancel_local(worker: &Rc<Worker>, key: CancelKey) -> bool {
    let Some(session) = worker.find_by_key(key) else {
        return false;
    };
    let addr = session.backend_addr;
    let backend = session.backend_key;
    let timeout = worker.shared.config.timeouts.connect;
    monoio::spawn(async move {
        let sent = monoio::time::timeout(
            timeout,
            crate::backend::cancel(addr, backend.pid, backend.secret),
        )
        .await;
        match sent {
            Ok(Ok(())) => tracing::debug!(%addr, pid = backend.pid, "cancel request sent"),
            Ok(Err(error)) => {
                tracing::warn!(%addr, %error, "sending cancel request to backend failed")
            }
            Err(_) => tracing::warn!(%addr, "cancel request to backend timed out"),
        }
    });
    true
}
