//! One transaction of a pooled client on its backend: the client's messages to the backend
//! (statement names rewritten) and the backend's to the client, both at once, while the
//! [`transaction`](mod@super::transaction) state machine follows what the backend still owes.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

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
use super::params::{self, ClientParams};
use super::pool::Backend;
use super::prepared::{self, BackendStatements, ClientStatements, Transient, Translator};
use super::stream::{MessageStream, Piece};
use super::transaction::{Reply, Send, Transaction};
use super::{readable, sleep_until, Client, End, BACKEND_FAILED};

/// One transaction on `backend`, until the state machine says it is over (the backend can go
/// back) or something ends the client or the backend.
pub(super) async fn transaction(
    worker: &Rc<Worker>,
    client: &mut Client,
    backend: &mut Backend,
) -> Result<(), Broken> {
    let mut tx = Transaction::default();
    let mut to_backend: Vec<u8> = Vec::new();
    // The client's parameters on this backend.
    let mut sql = String::new();
    // A DDL changed a statement's result type under this backend: its statements are dropped
    // and prepared again as they are used (the client saw the error once).
    if backend.statements.take_stale() {
        sql.push_str("DEALLOCATE ALL;");
        backend.statements.clear();
    }
    backend.params.sync_to(&client.params, &mut sql);
    // After a lost backend: the transaction block it had, aborted, on this one (last: the
    // failing statement ends the query).
    let mut refuse_first = None;
    if let Some(aborted) = client.aborted.take() {
        sql.push_str("BEGIN;");
        match aborted.error {
            Some(error) => refuse_first = Some(error),
            None => {
                sql.push_str(prepared::REFUSAL_SQL);
                sql.push(';');
            }
        }
    }
    if !sql.is_empty() {
        tx.router_query();
        write::query(&mut to_backend, &sql);
    }
    client
        .cancel
        .hold(backend.addr, backend.pid, backend.secret);
    let state = RefCell::new(Linked {
        tx,
        client_at_rest: false,
        owed: false,
        transient: Transient::default(),
    });
    let settings = client.pool.settings();
    let max_prepared = settings.max_prepared_statements as usize;
    let pool = client.pool.clone();
    let owed_waker: Cell<Option<std::task::Waker>> = Cell::new(None);
    // A record is on its way to the client: the transaction cannot stop there.
    let writing = Cell::new(false);
    let write_done: Cell<Option<std::task::Waker>> = Cell::new(None);
    // A read from the backend is under way: stopping there could lose what it read.
    let reading = Cell::new(false);
    // What the backend's messages told about it.
    let found = RefCell::new(Findings::default());
    let Client {
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
    let settings_idle_tx = settings.idle_transaction_timeout;
    let (backend_rd, backend_wr) = (&mut backend.rd, &mut backend.wr);

    let client_to_backend = async {
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
            // Whole messages at hand go to the backend.
            let step = {
                let mut state = state.borrow_mut();
                let Linked { tx, transient, .. } = &mut *state;
                let side = ClientSide {
                    tx,
                    statements: &mut statements.borrow_mut(),
                    backend: &mut backend_statements.borrow_mut(),
                    max_prepared,
                    transient,
                    refuse_first: &mut refuse_first,
                };
                client_messages(plain, messages, side, &mut to_backend)
            };
            let terminated = match step {
                Ok(terminated) => terminated,
                Err(end) => return end,
            };
            {
                let mut state = state.borrow_mut();
                if state.tx.owes_synthesized() {
                    state.owed = true;
                    if let Some(waker) = owed_waker.take() {
                        waker.wake();
                    }
                }
            }
            if !to_backend.is_empty() {
                if let Err(error) = write_all_vec(backend_wr, &mut to_backend).await {
                    return Step::BackendFailed(error.to_string());
                }
            }
            if terminated {
                return Step::ClientGone;
            }
            // At rest: nothing half read, nothing half written.
            let at_rest = !messages.inside() && plain.is_empty();
            {
                let mut state = state.borrow_mut();
                if at_rest && state.tx.releasable() && !writing.get() {
                    return Step::Released;
                }
                state.client_at_rest = at_rest;
            }
            plain.detach(buffers);
            cipher.detach(buffers);
            let idle_tx = match settings_idle_tx {
                Some(limit) if state.borrow().tx.status() != b'I' => Some(Instant::now() + limit),
                _ => None,
            };
            let waited = monoio::select! {
                readable = readable(rd) => readable.map_err(|e| Step::ClientFailed(e.to_string())),
                () = sleep_until(idle_tx) => Err(Step::Fatal(
                    SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                    "idle transaction timeout",
                )),
            };
            if let Err(step) = waited {
                return step;
            }
            state.borrow_mut().client_at_rest = false;
            cipher.attach(buffers);
            plain.attach(buffers);
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
        let mut to_client: Vec<u8> = Vec::new();
        let mut sealed: Vec<u8> = Vec::new();
        let result = loop {
            let owed = std::future::poll_fn(|cx| {
                if std::mem::take(&mut state.borrow_mut().owed) {
                    std::task::Poll::Ready(())
                } else {
                    owed_waker.set(Some(cx.waker().clone()));
                    std::task::Poll::Pending
                }
            });
            let readable = monoio::select! {
                readable = readable(backend_rd) => Some(readable),
                () = owed => None,
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
                        if std::mem::take(&mut found.borrow_mut().stale_plans) {
                            backend_statements.borrow_mut().mark_stale();
                        }
                        for statement in state.tx.take_accepted() {
                            pool.known_good.add(&statement);
                        }
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
            if !to_client.is_empty() {
                if let Err(error) =
                    tls::seal_into(&mut records.borrow_mut(), &to_client, &mut sealed)
                {
                    break Step::ClientFailed(error.to_string());
                }
                to_client.clear();
                writing.set(true);
                let written = write_all_vec(wr, &mut sealed).await;
                writing.set(false);
                if let Some(waker) = write_done.take() {
                    waker.wake();
                }
                if let Err(error) = written {
                    break Step::ClientFailed(error.to_string());
                }
            }
            from_backend.detach(buffers);
            let state = state.borrow();
            if state.client_at_rest && state.tx.releasable() && !backend_stream.inside() {
                break Step::Released;
            }
        };
        from_backend.release(buffers);
        result
    };
    let step = monoio::select! {
        step = client_to_backend => step,
        step = backend_to_client => step,
        reason = handle.kill.wait() => Step::Killed(reason),
    };
    let reusable = !state.borrow().tx.busy() && !writing.get() && !reading.get();
    let end = match step {
        Step::Released => return Ok(()),
        Step::ClientGone => End::ClientClosed,
        Step::ClientFailed(error) => End::ClientFailed(error),
        Step::Fatal(code, message) => End::Fatal(code, message),
        Step::Protocol(what) => End::Protocol(what),
        Step::Killed(reason) => End::Killed(reason),
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
}

/// The client's view of one transaction's messages: what the router keeps across them.
struct ClientSide<'a> {
    tx: &'a mut Transaction,
    statements: &'a mut ClientStatements,
    backend: &'a mut BackendStatements,
    max_prepared: usize,
    transient: &'a mut Transient,
    /// The error the client's first message gets in place of its answer.
    refuse_first: &'a mut Option<Box<[u8]>>,
}

/// Bytes of a Bind the router needs before rewriting it: the header and both names.
const BIND_PREFIX: usize = HEADER_BYTES + 2 * (prepared::MAX_NAME_BYTES + 1);

/// Moves the client's whole messages (and pieces of long ones) from `plain` to `out`, as the
/// state machine says, statement names rewritten for the backend. Returns true if the client
/// sent Terminate.
fn client_messages(
    plain: &mut ReadBuf,
    stream: &mut MessageStream,
    side: ClientSide<'_>,
    out: &mut Vec<u8>,
) -> Result<bool, Step> {
    let ClientSide {
        tx,
        statements,
        backend,
        max_prepared,
        transient,
        refuse_first,
    } = side;
    let protocol = |e: prepared::Malformed| Step::Protocol(e.to_string());
    loop {
        let capacity = plain.capacity();
        let prefix = if plain.data().first() == Some(&fe::BIND) {
            BIND_PREFIX
        } else {
            HEADER_BYTES + 1
        };
        let piece = stream
            .next(plain.data(), capacity, prefix, |tag| {
                matches!(
                    tag,
                    fe::DESCRIBE | fe::CLOSE | fe::PARSE | fe::BIND | fe::QUERY
                )
            })
            .map_err(|e| Step::Protocol(e.to_string()))?;
        let data = plain.data();
        let (tag, len, whole) = match piece {
            None => return Ok(false),
            Some(Piece::Rest { len }) => {
                if stream.passing() {
                    out.extend_from_slice(&data[..len]);
                }
                plain.consume(len);
                continue;
            }
            Some(Piece::Whole { tag, len }) => (tag, len, true),
            Some(Piece::Start { tag, len }) => (tag, len, false),
        };
        let message = &data[..len];
        tracing::trace!(tag = %char::from(tag), len, whole, "client message");
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
        let mut translator = Translator {
            tx: &mut *tx,
            client: &mut *statements,
            backend: &mut *backend,
            max: max_prepared,
            transient: &mut *transient,
            out: &mut *out,
        };
        let pass_rest = {
            match tag {
                fe::TERMINATE => {
                    plain.consume(len);
                    return Ok(true);
                }
                fe::PARSE if whole => {
                    translator.parse(message).map_err(protocol)?;
                    false
                }
                fe::PARSE => translator.long_parse(message),
                fe::BIND => translator.bind(message, total).map_err(protocol)?,
                fe::DESCRIBE if whole => {
                    translator.describe(message).map_err(protocol)?;
                    false
                }
                fe::CLOSE if whole => {
                    translator.close(message).map_err(protocol)?;
                    false
                }
                fe::QUERY if whole => {
                    translator.query(message);
                    false
                }
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
                let reply = tx.backend(tag, body).map_err(|e| e.to_string())?;
                if tag == be::PARAMETER_STATUS {
                    if let Ok(status) = ParameterStatus::parse(body) {
                        backend.reported.set(status.name, status.value);
                        // Swallowed but for a reset: the answer to the router's SET for this
                        // client, in the server's spelling of the client's value.
                        if !resetting {
                            client.reported(status.name, status.value);
                        }
                    }
                }
                if tag == be::READY_FOR_QUERY && tx.take_reset_done() {
                    // The backend went back to the pool's defaults; the client, as on a real
                    // server, to its own (applied on its next backend, or this one next time).
                    backend.unreported = params::Params::default();
                    for (name, value) in client.reset_to_startup() {
                        write::parameter_status(out, &name, &value);
                    }
                }
                if reply == Reply::Forward {
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
}

/// True for PostgreSQL's error for a prepared statement whose result type a DDL changed: the
/// statement stays broken on that backend until it is prepared again.
fn stale_plan(body: &[u8]) -> bool {
    crate::protocol::backend::ErrorFields::parse(body).is_ok_and(|fields| {
        fields.code == "0A000" && fields.message == "cached plan must not change result type"
    })
}
