//! One transaction of a pooled client on its backend: the client's messages to the backend
//! (statement names rewritten) and the backend's to the client, both at once, while the
//! [`transaction`](mod@super::transaction) state machine follows what the backend still owes.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use monoio::net::tcp::TcpOwnedWriteHalf;
use monoio::time::Instant;

use crate::buf::{write_all_vec, ReadBuf};
use crate::error::KillReason;
use crate::protocol::backend::{self as be, ParameterStatus};
use crate::protocol::frame::HEADER_BYTES;
use crate::protocol::frontend as fe;
use crate::protocol::sqlstate::SqlState;
use crate::protocol::write;
use crate::tls;
use crate::worker::Worker;

use super::lost::{as_error, lost, LOST_BACKEND};
use super::params::{self, ClientParams, Synced};
use super::pool::Backend;
use super::prepared::{self, BackendStatements, ClientStatements, Taken, Transient, Translator};
use super::stream::{BadLength, MessageStream, Piece};
use super::transaction::{Reply, Resets, Send, Transaction};
use super::{readable, sleep_until, Client, End, BACKEND_FAILED};

/// One transaction on `backend`, until the state machine says it is over (the backend can go
/// back) or something ends the client or the backend.
pub(super) async fn transaction(
    worker: &Rc<Worker>,
    client: &mut Client,
    backend: &mut Backend,
) -> Result<Over, Broken> {
    let mut tx = Transaction::default();
    let mut to_backend: Vec<u8> = Vec::with_capacity(FIRST_CAPACITY);
    // What the client's statements parsed from here on are told apart by.
    client.follow_session();
    // The client's parameters on this backend.
    let mut sql = String::new();
    // A DDL changed a statement's result type under a backend of the pool: this one's
    // statements are dropped and prepared again as they are used.
    if backend.statements.behind(client.pool.plans_epoch.get()) {
        sql.push_str("DEALLOCATE ALL;");
        backend.statements.clear();
    }
    // The client's statements wait for the answer to SETs the backend may refuse.
    let answer_first = backend.params.sync_to(&client.params, &mut sql) == Synced::AnswerFirst;
    if !sql.is_empty() {
        tx.router_setup();
        write::query(&mut to_backend, &sql);
    }
    // After a lost backend: the transaction block it had, aborted, on this one (a query of its
    // own, whose failing statement is meant to fail).
    let mut refuse_first = None;
    if let Some(aborted) = client.aborted.take() {
        sql.clear();
        sql.push_str("BEGIN;");
        match aborted.error {
            Some(error) => refuse_first = Some(error),
            None => {
                sql.push_str(prepared::REFUSAL_SQL);
                sql.push(';');
            }
        }
        tx.router_query();
        write::query(&mut to_backend, &sql);
    }
    let setting_up = !to_backend.is_empty();
    client
        .cancel
        .hold(backend.addr, backend.pid, backend.secret, setting_up);
    // Cancels wait while the router's statements above (or a resync below) run
    // ([`PooledCancel::hold`]).
    let cancel = &client.cancel;
    let setting_up = Cell::new(setting_up);
    let state = RefCell::new(Linked {
        tx,
        client_at_rest: false,
        owed: false,
        transient: Transient::default(),
    });
    let settings = client.pool.settings();
    let max_prepared = settings.max_prepared_statements as usize;
    let pool = client.pool.clone();
    // The backend direction's wait for the client direction: replies of the router's own to
    // send, or messages forwarded, or the client at rest.
    let backend_waiting: Cell<Option<std::task::Waker>> = Cell::new(None);
    // A record is on its way to the client: the transaction cannot stop there.
    let writing = Cell::new(false);
    let write_done: Cell<Option<std::task::Waker>> = Cell::new(None);
    // Woken when replies owed went out (the client direction waits on it when too many are).
    let progress: Cell<Option<std::task::Waker>> = Cell::new(None);
    // A read from the backend is under way: stopping there could lose what it read.
    let reading = Cell::new(false);
    // What the backend's messages told about it.
    let found = RefCell::new(Findings::default());
    let Client {
        readiness,
        rd,
        wr,
        records,
        cipher,
        plain,
        messages,
        params,
        statements,
        handle,
        ..
    } = client;
    let statements = RefCell::new(statements);
    let backend_statements = RefCell::new(&mut backend.statements);
    let records = RefCell::new(&mut **records);
    let params = RefCell::new(params);
    let backend_params = RefCell::new(&mut backend.params);
    let buffers = &worker.buffers;
    let message_buffers = &worker.message_buffers;
    let settings_idle_tx = settings.idle_transaction_timeout;
    let queries = Cell::new(0);
    let (backend_rd, backend_wr) = (&mut backend.rd, &mut backend.wr);

    let client_to_backend = async {
        if answer_first {
            // SETs the backend may refuse: the client's statements go once they took.
            if let Err(error) = write_all_vec(backend_wr, &mut to_backend).await {
                return Step::BackendFailed(error.to_string());
            }
            until_tx(&state, &progress, |tx| !tx.setup_owed()).await;
        }
        let mut forwarded = false;
        loop {
            // The client's next messages begin a new transaction: the backend goes back first
            // (the client may well get it again), so clients in line, `server_lifetime` and
            // password resets are served at every transaction boundary, even for a client
            // that sends its next transaction the moment the last one ends.
            if forwarded
                && !plain.is_empty()
                && !messages.inside()
                && state.borrow().tx.releasable()
            {
                // The last ReadyForQuery may still be on its way to the client.
                std::future::poll_fn(|cx| {
                    if writing.get() {
                        write_done.set(Some(cx.waker().clone()));
                        std::task::Poll::Pending
                    } else {
                        std::task::Poll::Ready(())
                    }
                })
                .await;
                if state.borrow().tx.releasable() {
                    return Step::Released;
                }
            }
            forwarded = true;
            // Records read before but not opened then (no room beside a partial message).
            if !cipher.is_empty() {
                plain.attach(message_buffers);
                match tls::open_into(&mut records.borrow_mut(), cipher, plain) {
                    Ok(true) => {}
                    Ok(false) => return Step::ClientGone,
                    Err(error) => return Step::ClientFailed(error.to_string()),
                }
            }
            // A statement took one of the client's parameters back to the pool's default
            // while the client keeps the backend (`BEGIN; RESET TimeZone`): the client's
            // value goes first, as a real server would have it.
            if !messages.inside() && std::mem::take(&mut found.borrow_mut().resync) {
                let mut state = state.borrow_mut();
                let mut sql = String::new();
                if state.tx.status() != b'E'
                    && backend_params
                        .borrow_mut()
                        .sync_to(&params.borrow(), &mut sql)
                        .any()
                {
                    // Never waited for: in the client's block, a refusal aborts the block, so
                    // nothing the client sends after it runs.
                    cancel.setting_up();
                    setting_up.set(true);
                    state.tx.router_setup();
                    write::query(&mut to_backend, &sql);
                }
            }
            // Whole messages at hand go to the backend.
            let step = {
                let mut state = state.borrow_mut();
                let Linked { tx, transient, .. } = &mut *state;
                let side = ClientSide {
                    tx,
                    statements: &mut statements.borrow_mut(),
                    backend: &mut backend_statements.borrow_mut(),
                    max_prepared,
                    texts: &pool.texts,
                    transient,
                    refuse_first: &mut refuse_first,
                    queries: &queries,
                };
                client_messages(plain, messages, side, &mut to_backend)
            };
            // A message no server takes (a type it does not know, a malformed body) ends the
            // session, as PostgreSQL's FATAL does, but only once the messages before it are
            // answered: PostgreSQL runs them, and sends their replies ahead of the FATAL.
            let (stopped, invalid) = match step {
                Ok(stopped) => (stopped, None),
                Err(Step::Protocol(what)) => (Stopped::AtHand, Some(what)),
                Err(end) => return end,
            };
            {
                let mut state = state.borrow_mut();
                if state.tx.owes_synthesized() {
                    state.owed = true;
                }
                if state.tx.take_changed_shape() {
                    pool.plans_epoch.set(pool.plans_epoch.get() + 1);
                }
            }
            // The backend direction may have been waiting for this.
            if let Some(waker) = backend_waiting.take() {
                waker.wake();
            }
            if !to_backend.is_empty() {
                if let Err(error) = write_all_vec(backend_wr, &mut to_backend).await {
                    return Step::BackendFailed(error.to_string());
                }
            }
            match stopped {
                Stopped::AtHand => {}
                Stopped::Terminate => return Step::ClientGone,
                Stopped::Check => {
                    // The backend tells the row shape of its plan of a statement it was just
                    // given; the client's message that names it is translated again then.
                    until_tx(&state, &progress, |tx| !tx.checking()).await;
                    continue;
                }
            }
            if let Some(what) = invalid {
                if state.borrow().tx.pending() > 0 {
                    // Replies PostgreSQL keeps for a Sync are sent too: it flushes them with
                    // its FATAL.
                    write::flush(&mut to_backend);
                    if let Err(error) = write_all_vec(backend_wr, &mut to_backend).await {
                        return Step::BackendFailed(error.to_string());
                    }
                    until_answered(&state, &progress, &writing, &write_done).await;
                }
                return Step::Protocol(what);
            }
            // At rest: nothing half forwarded, nothing half written (what the client sent of
            // its next message waits in `plain` for the next transaction).
            let at_rest = !messages.inside();
            {
                let mut state = state.borrow_mut();
                if at_rest && state.tx.releasable() && !writing.get() {
                    return Step::Released;
                }
                state.client_at_rest = at_rest;
            }
            if at_rest {
                if let Some(waker) = backend_waiting.take() {
                    waker.wake();
                }
            }
            plain.detach(message_buffers);
            cipher.detach(buffers);
            // Backpressure: while this many replies are owed (a slow query ahead of a long
            // pipeline, or a client that does not read its replies), the client's next
            // messages wait in its socket, as they would in front of a busy PostgreSQL
            // backend; what the router answers itself cannot pile up either. The backend is
            // sent a Flush first: without one, PostgreSQL keeps small replies in its output
            // buffer until the Sync the client has not been let to send.
            if state.borrow().tx.pending() >= MAX_PENDING_REPLIES {
                write::flush(&mut to_backend);
                if let Err(error) = write_all_vec(backend_wr, &mut to_backend).await {
                    return Step::BackendFailed(error.to_string());
                }
            }
            std::future::poll_fn(|cx| {
                if state.borrow().tx.pending() < MAX_PENDING_REPLIES {
                    std::task::Poll::Ready(())
                } else {
                    progress.set(Some(cx.waker().clone()));
                    std::task::Poll::Pending
                }
            })
            .await;
            // A whole record is here already: open it before reading more. (It always fits:
            // `plain` has room for a record beside the largest message kept whole.)
            if let Ok(Some(len)) = records.borrow().record_len(cipher.data()) {
                if plain.is_empty() || plain.spare_mut().len() >= len {
                    continue;
                }
            }
            // Idle holding the backend: in a transaction block, in an extended-protocol batch
            // not synced yet (a Flush without Sync) or a COPY, with nothing owed by the backend
            // (a query running is not idle), or stopped halfway through a message too long to
            // wait for whole (part of it is on the backend, or gathered by the router, and the
            // client holds the backend as a transaction would).
            // While the backend still owes replies, the clock starts when it has sent the
            // last (the backend direction wakes `progress` after each batch of replies).
            let waited = loop {
                let idle = settings_idle_tx.is_some()
                    && (messages.inside() || state.borrow().tx.idle_holding());
                let idle_tx = settings_idle_tx
                    .filter(|_| idle)
                    .map(|limit| Instant::now() + limit);
                let watch = settings_idle_tx.is_some() && !idle;
                break monoio::select! {
                    readable = readiness.wait(rd) => readable.map_err(|e| Step::ClientFailed(e.to_string())),
                    () = sleep_until(idle_tx) => Err(Step::Fatal(
                        SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                        "idle transaction timeout",
                    )),
                    () = until_idle_holding(&state, &progress, watch) => continue,
                };
            };
            if let Err(step) = waited {
                return step;
            }
            state.borrow_mut().client_at_rest = false;
            cipher.attach(buffers);
            plain.attach(message_buffers);
            match cipher.fill_from(rd).await {
                Ok(0) => return Step::ClientGone,
                Ok(_) => {}
                Err(error) => return Step::ClientFailed(error.to_string()),
            }
            match tls::open_into(&mut records.borrow_mut(), cipher, plain) {
                Ok(true) => {}
                Ok(false) => return Step::ClientGone,
                Err(error) => return Step::ClientFailed(error.to_string()),
            }
        }
    };
    let backend_to_client = async {
        let mut from_backend = ReadBuf::detached();
        let mut backend_stream = MessageStream::default();
        let mut to_client: Vec<u8> = Vec::with_capacity(FIRST_CAPACITY);
        let mut sealed: Vec<u8> = Vec::with_capacity(FIRST_CAPACITY);
        let result = loop {
            // Nothing owed and no block open: the transaction is over once the client
            // direction is at rest. The backend has nothing to say until it is given more, so
            // it is not watched meanwhile (a poll started here would only be cancelled); the
            // client direction wakes this one when it moves on.
            std::future::poll_fn(|cx| {
                let state = state.borrow();
                if state.tx.releasable()
                    && !state.client_at_rest
                    && !state.owed
                    && !backend_stream.inside()
                {
                    backend_waiting.set(Some(cx.waker().clone()));
                    std::task::Poll::Pending
                } else {
                    std::task::Poll::Ready(())
                }
            })
            .await;
            {
                let state = state.borrow();
                if state.client_at_rest && state.tx.releasable() && !backend_stream.inside() {
                    break Step::Released;
                }
            }
            let owed = std::future::poll_fn(|cx| {
                if std::mem::take(&mut state.borrow_mut().owed) {
                    std::task::Poll::Ready(())
                } else {
                    backend_waiting.set(Some(cx.waker().clone()));
                    std::task::Poll::Pending
                }
            });
            // The backend answers next: its bytes are read as they come, with no readiness
            // wait first (the buffer is lent to the kernel only until the answer, which nothing
            // the router owes can overtake). Otherwise the router's own replies may be next.
            let readable = if state.borrow().tx.backend_next() {
                Some(Ok(()))
            } else {
                monoio::select! {
                    readable = readable(backend_rd) => Some(readable),
                    () = owed => None,
                }
            };
            match readable {
                Some(Err(error)) => break Step::BackendFailed(error.to_string()),
                Some(Ok(())) => {
                    from_backend.attach(buffers);
                    reading.set(true);
                    let read = from_backend.fill_from(backend_rd).await;
                    reading.set(false);
                    match read {
                        Ok(0) => break Step::BackendFailed("closed".into()),
                        Ok(_) => {}
                        Err(error) => break Step::BackendFailed(error.to_string()),
                    }
                    let done = {
                        let mut state = state.borrow_mut();
                        let done = backend_messages(
                            &mut from_backend,
                            &mut backend_stream,
                            &mut state.tx,
                            &mut params.borrow_mut(),
                            &mut backend_params.borrow_mut(),
                            &mut to_client,
                            &mut found.borrow_mut(),
                        );
                        if setting_up.get() && !state.tx.router_query_owed() {
                            setting_up.set(false);
                            cancel.set_up();
                        }
                        if std::mem::take(&mut found.borrow_mut().stale_plans) {
                            pool.plans_epoch.set(pool.plans_epoch.get() + 1);
                        }
                        for statement in state.tx.take_accepted() {
                            pool.known_good.add(&statement);
                        }
                        prepared::apply_described(
                            state.tx.take_described(),
                            &mut backend_statements.borrow_mut(),
                        );
                        for undo in state.tx.take_undo() {
                            undo.apply(
                                &mut statements.borrow_mut(),
                                &mut backend_statements.borrow_mut(),
                            );
                        }
                        done
                    };
                    if let Err(error) = done {
                        break Step::BackendProtocol(error);
                    }
                }
                None => state.borrow_mut().tx.take_synthesized(&mut to_client),
            }
            // Replies came: a client direction held back by too many owed may go on.
            if let Some(waker) = progress.take() {
                waker.wake();
            }
            if !to_client.is_empty() {
                if let Err(error) =
                    tls::seal_into(&mut records.borrow_mut(), &to_client, &mut sealed)
                {
                    break Step::ClientFailed(error.to_string());
                }
                to_client.clear();
                writing.set(true);
                let written = send_to_client(wr, &mut sealed, settings_idle_tx).await;
                writing.set(false);
                if let Some(waker) = write_done.take() {
                    waker.wake();
                }
                if let Err(error) = written {
                    if error.kind() == std::io::ErrorKind::TimedOut {
                        tracing::info!(%error, "pooled client closed by the router");
                    }
                    break Step::ClientFailed(error.to_string());
                }
            }
            // The replies before the refusal went out; whatever came after it stays unsent.
            if let Some(error) = found.borrow_mut().setup_refused.take() {
                break Step::SetupRefused(error);
            }
            from_backend.detach(buffers);
        };
        from_backend.release(buffers);
        result
    };
    let step = monoio::select! {
        step = client_to_backend => step,
        step = backend_to_client => step,
        reason = handle.kill.wait() => Step::Killed(reason),
    };
    worker.stats.queries.add(queries.get());
    // A backend whose session values the client may have changed is not lent again unread.
    let reusable = !state.borrow().tx.busy()
        && !state.borrow().tx.has_sets()
        && !state.borrow().tx.audit_owed()
        && !found.borrow().residue
        && !state.borrow().tx.residue_owed()
        && !writing.get()
        && !reading.get();
    let end = match step {
        Step::Released => {
            let mut state = state.borrow_mut();
            return Ok(Over {
                sets: state.tx.take_sets(),
                audit: state.tx.take_audit(),
                residue: found.borrow().residue || state.tx.take_residue(),
                overflow: state.tx.take_overflow(),
                untraceable: state.tx.take_untraceable(),
                resync: found.borrow().resync,
            });
        }
        Step::ClientGone => End::ClientClosed,
        Step::ClientFailed(error) => End::ClientFailed(error),
        Step::Fatal(code, message) => End::Fatal(code, message),
        Step::Protocol(what) => End::Protocol(what),
        Step::Killed(reason) => End::Killed(reason),
        Step::SetupRefused(error) => End::SetupRefused(error),
        Step::BackendProtocol(error) => {
            tracing::warn!(%error, "backend broke the protocol: closing it and its client");
            End::Fatal(SqlState::CONNECTION_FAILURE, LOST_BACKEND)
        }
        Step::BackendFailed(error) => {
            if let Some(suppressed) = BACKEND_FAILED.allow() {
                tracing::warn!(%error, suppressed, "backend failed during a transaction");
            }
            let tx = &state.borrow().tx;
            let writing_now = writing.get();
            return Err(Broken {
                end: lost(tx, found.borrow_mut().unsolicited.take(), writing_now),
                reusable: false,
            });
        }
    };
    Err(Broken { end, reusable })
}

/// A transaction that ended with its backend free to go back.
pub(super) struct Over {
    /// Parameters its statements may have given new session values (`SET name ...`).
    pub(super) sets: Vec<Box<str>>,
    /// The backend is still to be given the client's parameters (a `RESET name` outside a
    /// transaction block took it to the pool's default).
    pub(super) resync: bool,
    /// Its statements may have left cursors, `LISTEN`s or temporary tables in the backend's
    /// session: gone before the backend is lent again.
    pub(super) residue: bool,
    /// Its statements changed the session in ways the router cannot follow from their text:
    /// the session is read whole ([`readback::session_audit`](super::readback::session_audit)).
    pub(super) audit: bool,
    /// Its statements named more parameters than one client may have.
    pub(super) overflow: bool,
    /// Its statements changed a parameter the router cannot name: the backend is closed
    /// after the session read.
    pub(super) untraceable: bool,
}

/// Why a transaction ended other than with the backend released.
pub(super) struct Broken {
    pub(super) end: End,
    /// The backend is idle all the same (the client left between transactions): it can go
    /// back to the pool.
    pub(super) reusable: bool,
}

/// The state both directions of a transaction share.
struct Linked {
    tx: Transaction,
    /// The client direction has nothing half read or half written: the transaction may end.
    client_at_rest: bool,
    /// The router owes the client replies of its own (they reached the head of the queue).
    owed: bool,
    /// What the client's unnamed statement is doing in this transaction.
    transient: Transient,
}

/// How one direction of a transaction stopped.
#[derive(Debug)]
enum Step {
    Released,
    ClientGone,
    ClientFailed(String),
    Protocol(String),
    Fatal(SqlState, &'static str),
    Killed(KillReason),
    BackendFailed(String),
    BackendProtocol(String),
    /// The backend refused the router's `SET`s of the client's parameters: the FATAL the
    /// client gets.
    SetupRefused(Vec<u8>),
}

/// The client's view of one transaction's messages: what the router keeps across them.
struct ClientSide<'a> {
    tx: &'a mut Transaction,
    statements: &'a mut ClientStatements,
    backend: &'a mut BackendStatements,
    max_prepared: usize,
    /// The texts of the pool's clients' statements.
    texts: &'a prepared::SharedTexts,
    transient: &'a mut Transient,
    /// The error the client's first message gets in place of its answer.
    refuse_first: &'a mut Option<Box<[u8]>>,
    /// Simple queries and Executes the client sent (`/metrics`).
    queries: &'a Cell<u64>,
}

/// Room each of a transaction's outgoing byte vectors starts with: a point query, its reply,
/// or a sealed record of either fits without the vector growing.
const FIRST_CAPACITY: usize = 512;

/// Replies a transaction may owe before the client's next messages wait in its socket.
const MAX_PENDING_REPLIES: usize = 1024;

/// Bytes of a Bind the router needs before rewriting it: the header and both names.
const BIND_PREFIX: usize = HEADER_BYTES + 2 * (prepared::MAX_NAME_BYTES + 1);

/// Completes once every reply owed reached the client, or a COPY started (it would wait for
/// the client's data, which is not read any more).
async fn until_answered(
    state: &RefCell<Linked>,
    progress: &Cell<Option<std::task::Waker>>,
    writing: &Cell<bool>,
    write_done: &Cell<Option<std::task::Waker>>,
) {
    std::future::poll_fn(|cx| {
        let state = state.borrow();
        if state.tx.pending() > 0 && !state.tx.in_copy() {
            progress.set(Some(cx.waker().clone()));
            std::task::Poll::Pending
        } else if writing.get() {
            write_done.set(Some(cx.waker().clone()));
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await
}

/// Sends `sealed` to the client. With `idle_transaction_timeout` set, a client that does not
/// take it in that long (it stopped reading its replies, so the backend it holds waits on it)
/// fails: it is as idle as a client in a block that sends nothing, and the records may stop
/// halfway, so it is closed without a word.
async fn send_to_client(
    wr: &mut TcpOwnedWriteHalf,
    sealed: &mut Vec<u8>,
    limit: Option<std::time::Duration>,
) -> std::io::Result<()> {
    let Some(limit) = limit else {
        return write_all_vec(wr, sealed).await;
    };
    match monoio::time::timeout(limit, write_all_vec(wr, sealed)).await {
        Ok(written) => written,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client took none of its replies for idle_transaction_timeout",
        )),
    }
}

/// Completes once the backend owes nothing and cannot go back (the client idle holding it), if
/// `watch`; never otherwise.
async fn until_idle_holding(
    state: &RefCell<Linked>,
    progress: &Cell<Option<std::task::Waker>>,
    watch: bool,
) {
    if !watch {
        return std::future::pending().await;
    }
    until_tx(state, progress, Transaction::idle_holding).await
}

/// Completes once `done` holds for the transaction (the backend direction wakes `progress`
/// after each batch of replies).
async fn until_tx(
    state: &RefCell<Linked>,
    progress: &Cell<Option<std::task::Waker>>,
    done: impl Fn(&Transaction) -> bool,
) {
    std::future::poll_fn(|cx| {
        if done(&state.borrow().tx) {
            std::task::Poll::Ready(())
        } else {
            progress.set(Some(cx.waker().clone()));
            std::task::Poll::Pending
        }
    })
    .await
}

/// The next piece of the client's messages in `data`. Every message that fits a pool buffer
/// is kept whole (the rest of `plain` is room for a record beside it), so a client's message
/// reaches a backend all at once, never half: a client that stops in the middle of one holds
/// no backend. Longer ones are passed on in pieces once their first bytes (a Bind's names)
/// are here.
pub(super) fn client_piece(
    stream: &mut MessageStream,
    data: &[u8],
) -> Result<Option<Piece>, BadLength> {
    let prefix = if data.first() == Some(&fe::BIND) {
        BIND_PREFIX
    } else {
        HEADER_BYTES + 1
    };
    stream.next(data, crate::buf::POOL_BUFFER_BYTES, prefix, |_| true)
}

/// Where [`client_messages`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    /// Every message at hand went on (what is left is the start of the next one).
    AtHand,
    /// At the client's Terminate.
    Terminate,
    /// At a Bind or Describe that waits for the backend to tell the row shape of its plan of
    /// the statement ([`Taken::Check`]): it is left where it is.
    Check,
}

/// Moves the client's whole messages (and pieces of long ones) from `plain` to `out`, as the
/// state machine says, statement names rewritten for the backend.
fn client_messages(
    plain: &mut ReadBuf,
    stream: &mut MessageStream,
    side: ClientSide<'_>,
    out: &mut Vec<u8>,
) -> Result<Stopped, Step> {
    let ClientSide {
        tx,
        statements,
        backend,
        max_prepared,
        texts,
        transient,
        refuse_first,
        queries,
    } = side;
    let protocol = |e: prepared::Malformed| Step::Protocol(e.to_string());
    // The prepared-statement translator over this client's and backend's state.
    macro_rules! translator {
        () => {
            Translator {
                tx: &mut *tx,
                client: &mut *statements,
                backend: &mut *backend,
                max: max_prepared,
                texts,
                transient: &mut *transient,
                out: &mut *out,
            }
        };
    }
    loop {
        let piece =
            client_piece(stream, plain.data()).map_err(|e| Step::Protocol(e.to_string()))?;
        let data = plain.data();
        let (tag, len, whole) = match piece {
            None => return Ok(Stopped::AtHand),
            Some(Piece::Rest { len }) => {
                if stream.passing() {
                    out.extend_from_slice(&data[..len]);
                } else if transient.gathering() {
                    translator!()
                        .gathered_rest(&data[..len], !stream.inside())
                        .map_err(protocol)?;
                }
                plain.consume(len);
                continue;
            }
            Some(Piece::Whole { tag, len }) => (tag, len, true),
            Some(Piece::Start { tag, len }) => (tag, len, false),
        };
        if !fe::is_session_message(tag) {
            return Err(Step::Protocol(fe::invalid_type_message(tag)));
        }
        let message = &data[..len];
        tracing::trace!(tag = %char::from(tag), len, whole, "client message");
        if matches!(tag, fe::QUERY | fe::EXECUTE) {
            queries.set(queries.get() + 1);
        }
        let total = if whole {
            len
        } else {
            // The header's length, type byte included.
            usize::try_from(u32::from_be_bytes([data[1], data[2], data[3], data[4]]))
                .unwrap_or(usize::MAX)
                .saturating_add(1)
        };
        if let Some(error) = refuse_first.take() {
            let simple = tag == fe::QUERY;
            prepared::refuse(tx, out, error, simple);
            if simple || !matches!(tag, fe::SYNC | fe::FLUSH) {
                // In its place: the rest of it is dropped.
                if !whole {
                    stream.started(false);
                }
                plain.consume(len);
                continue;
            }
        }
        let mut translator = translator!();
        let pass_rest = {
            match tag {
                fe::TERMINATE => {
                    plain.consume(len);
                    return Ok(Stopped::Terminate);
                }
                fe::PARSE if whole => {
                    translator.parse(message).map_err(protocol)?;
                    false
                }
                fe::PARSE => translator.long_parse(message, total),
                fe::BIND | fe::DESCRIBE if tag == fe::BIND || whole => {
                    let taken = match tag {
                        fe::BIND => translator.bind(message, total),
                        _ => translator.describe(message),
                    };
                    match taken.map_err(protocol)? {
                        Taken::Passed => true,
                        Taken::Answered => false,
                        Taken::Check => {
                            if !whole {
                                stream.not_started();
                            }
                            return Ok(Stopped::Check);
                        }
                    }
                }
                fe::CLOSE if whole => {
                    translator.close(message).map_err(protocol)?;
                    false
                }
                fe::QUERY if whole => {
                    translator.query(message);
                    false
                }
                fe::QUERY => translator.long_query(message, total),
                _ => {
                    let kind = data.get(HEADER_BYTES).copied().unwrap_or(0);
                    let send = translator.tx.client(tag, kind) == Send::Forward;
                    if send {
                        out.extend_from_slice(message);
                    }
                    send
                }
            }
        };
        if !whole {
            stream.started(pass_rest);
        }
        plain.consume(len);
    }
}

/// Moves the backend's messages from `buf` to `out` (for the client) as the state machine
/// says, following the parameters it reports.
fn backend_messages(
    buf: &mut ReadBuf,
    stream: &mut MessageStream,
    tx: &mut Transaction,
    client: &mut ClientParams,
    backend: &mut params::BackendParams,
    out: &mut Vec<u8>,
    found: &mut Findings,
) -> Result<(), String> {
    loop {
        let capacity = buf.capacity();
        let piece = stream
            .next(buf.data(), capacity, HEADER_BYTES, |tag| {
                matches!(
                    tag,
                    be::READY_FOR_QUERY | be::ERROR_RESPONSE | be::PARAMETER_STATUS
                )
            })
            .map_err(|e| e.to_string())?;
        let data = buf.data();
        if matches!(piece, Some(Piece::Whole { .. } | Piece::Start { .. })) {
            // Replies the router owes that came before this message (the client direction
            // may have queued some since).
            tx.take_synthesized(out);
        }
        match piece {
            None => return Ok(()),
            Some(Piece::Whole { tag, len }) => {
                let body = &data[HEADER_BYTES..len];
                if tag == be::ERROR_RESPONSE && !tx.awaiting_backend() {
                    // Not an answer: the backend is going away. The client gets it when the
                    // router tells it the backend is lost.
                    found.unsolicited = Some(as_error(&data[..len]));
                    buf.consume(len);
                    continue;
                }
                if tag == be::ERROR_RESPONSE && stale_plan(body) {
                    found.stale_plans = true;
                }
                let resetting = tx.resetting();
                let mut reply = tx.backend(tag, body).map_err(|e| e.to_string())?;
                // A resync queued behind the client's own statement that aborted the block
                // fails with 25P02: not a refusal (the client has its own error, and the
                // block's rollback takes the backend back to the client's values).
                if tag == be::ERROR_RESPONSE && tx.take_setup_failed() && !in_failed_block(body) {
                    found.setup_refused = Some(refused_setup(body));
                    return Ok(());
                }
                if tag == be::PARAMETER_STATUS {
                    if let Ok(status) = ParameterStatus::parse(body) {
                        backend.reported(status.name, status.value);
                        let reset = match tx.may_have_reset(status.name) && !resetting {
                            true => client.reset_reported(status.name, status.value),
                            false => None,
                        };
                        if let Some(told) = reset {
                            // `RESET name` took the backend to the pool's default: the client
                            // is told of its own, and the backend is given it before more of
                            // the client's statements run there.
                            found.resync = true;
                            if reply == Reply::Forward {
                                reply = Reply::Swallow;
                                if let Some(value) = told {
                                    write::parameter_status(out, status.name, &value);
                                }
                            }
                        } else if !resetting {
                            // Swallowed but for a reset: the answer to the router's SET for
                            // this client, in the server's spelling of the client's value.
                            client.reported(status.name, status.value);
                        }
                    }
                }
                if tag == be::READY_FOR_QUERY {
                    // Unreported parameters a statement may have reset: the router no longer
                    // knows the backend's value, so the client's is given again.
                    for name in tx.take_resets() {
                        client.reset_unreported(&name);
                        if backend.forget_unreported(&name) {
                            found.resync = true;
                        }
                    }
                }
                let reset = match tag == be::READY_FOR_QUERY {
                    true => tx.take_reset_done(),
                    false => Resets::Nothing,
                };
                if reset != Resets::Nothing {
                    // The backend went back to the pool's defaults; the client, as on a real
                    // server, to its own (applied on its next backend, or this one next time).
                    // `RESET ALL` leaves the role.
                    let keep_role = reset == Resets::Parameters;
                    backend.reset(keep_role);
                    for (name, value) in client.reset_to_startup(keep_role) {
                        write::parameter_status(out, &name, &value);
                    }
                }
                if reply == Reply::Forward {
                    if tag == be::COMMAND_COMPLETE && leaves_session_state(body) {
                        found.residue = true;
                    }
                    out.extend_from_slice(&data[..len]);
                }
                tx.take_synthesized(out);
                buf.consume(len);
            }
            Some(Piece::Start { tag, len }) => {
                let reply = tx.backend(tag, &[]).map_err(|e| e.to_string())?;
                stream.started(reply == Reply::Forward);
                if reply == Reply::Forward {
                    out.extend_from_slice(&data[..len]);
                }
                buf.consume(len);
            }
            Some(Piece::Rest { len }) => {
                if stream.passing() {
                    out.extend_from_slice(&data[..len]);
                }
                buf.consume(len);
                if !stream.inside() {
                    tx.take_synthesized(out);
                }
            }
        }
    }
}

/// What a backend's messages told the router about the backend.
#[derive(Debug, Default)]
struct Findings {
    /// An ErrorResponse it sent unasked (its FATAL as it goes away), as an ERROR.
    unsolicited: Option<Vec<u8>>,
    /// One of its statements' plans went stale.
    stale_plans: bool,
    /// A statement took one of the client's parameters back to the pool's default on it: the
    /// backend is to be given the client's parameters again before the client's next messages.
    resync: bool,
    /// A statement left state in the backend's session that outlives the transaction
    /// ([`leaves_session_state`]).
    residue: bool,
    /// It refused the `SET`s that give it the client's parameters ([`refused_setup`]).
    setup_refused: Option<Vec<u8>>,
}

/// True for the CommandComplete of a statement that may leave state in the backend's session
/// past its transaction, for whichever client the backend serves next: a cursor (`DECLARE
/// ... WITH HOLD`), `LISTEN`, a temporary table, view, sequence or function. pg_doorman #20
/// had the next client find a WITH HOLD cursor; PgBouncer leaves all of them.
fn leaves_session_state(body: &[u8]) -> bool {
    const TAGS: [&[u8]; 6] = [
        b"DECLARE CURSOR",
        b"LISTEN",
        b"CREATE TABLE",
        // Temporary ones shadow any other of their name for the backend's next client: the
        // session's temporary schema is searched first, before pg_catalog.
        b"CREATE VIEW",
        b"CREATE SEQUENCE",
        b"CREATE FUNCTION",
    ];
    TAGS.iter().any(|tag| body.starts_with(tag))
}

/// What a client is told when a backend refused the `SET`s of its session's parameters (the
/// role it set was dropped, or its grant revoked, since another backend took it): the
/// backend's error as a FATAL, with a detail saying why the session ends. A real server keeps
/// a session's settings; the pooled port cannot give this one its own on any backend, and
/// running the client's statements with the backend's would be worse.
fn refused_setup(body: &[u8]) -> Vec<u8> {
    let fields = crate::protocol::backend::ErrorFields::parse(body).ok();
    let code = fields
        .map(|f| f.code)
        .filter(|code| code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or(SqlState::CONNECTION_FAILURE.as_str());
    let message = fields.map_or("server refused the session's settings", |f| f.message);
    if let Some(suppressed) = SETUP_REFUSED.allow() {
        tracing::warn!(
            code,
            message,
            suppressed,
            "a backend refused a pooled client's session parameters: closing the client"
        );
    }
    let mut out = Vec::new();
    write::error_response_with_code(
        &mut out,
        write::Severity::Fatal,
        code,
        message,
        Some(REFUSED_SETUP_DETAIL),
        None,
    );
    out
}

/// True for PostgreSQL's error for a statement in an aborted transaction block (25P02).
fn in_failed_block(body: &[u8]) -> bool {
    crate::protocol::backend::ErrorFields::parse(body).is_ok_and(|fields| fields.code == "25P02")
}

/// Logs each refusal (one per client, which it ends).
static SETUP_REFUSED: crate::throttle::LogThrottle = crate::throttle::LogThrottle::new();

/// The detail of [`refused_setup`]'s FATAL.
pub(super) const REFUSED_SETUP_DETAIL: &str = "The pooled port could not give a server \
     connection this session's settings (a role or object they name may have been dropped, or \
     a grant revoked): the session ends before its statements run without them.";

/// True for PostgreSQL's error for a prepared statement whose result type a DDL changed: the
/// statement stays broken on that backend until it is prepared again.
fn stale_plan(body: &[u8]) -> bool {
    crate::protocol::backend::ErrorFields::parse(body).is_ok_and(|fields| {
        fields.code == "0A000" && fields.message == "cached plan must not change result type"
    })
}
