//! The hand-off of an authenticated client between two workers (`branchgate::handoff`), through
//! the router's own code: `ClientConn::into_moving` (the socket's descriptor duplicated out of
//! the runtime, the buffered bytes copied out, the record layer taken), `Inbox::send` (a bounded
//! channel, and a wake-up of the receiving runtime through its io_uring driver's eventfd),
//! `Inbox::recv` on the receiving worker, and `ClientConn::from_moving` (the socket registered
//! with that runtime, the bytes put back into that worker's buffers).
//!
//! Two threads run a monoio runtime each, built as the router builds its workers': worker A,
//! which accepted a real TLS connection over loopback (the router's `ClientConn::accept_tls`
//! against a blocking rustls client on a third thread), and worker B. Each has its own `Inbox`
//! and `BufPool`, and waits for its next message asleep in its runtime, as a worker does.
//!
//! One iteration is a **round trip, two hand-offs** (A to B, B back to A), and the group's
//! throughput counts hand-offs (`Elements(2)`):
//! - `round_trip/*`: the connection, its buffers empty (the usual case right after SCRAM);
//! - `round_trip_with_pipelined_bytes/*`: the connection holding [`PIPELINED_BYTES`] of opened
//!   plaintext the client sent ahead, copied out of one worker's buffers and into the other's
//!   at each hand-off;
//! - `inbox_wake/*`: a small value instead of a connection, through the same inboxes: the two
//!   cross-thread wake-ups alone, to tell them apart from the socket, TLS and buffer work (and
//!   the box each hand-off travels in, as the router's `Box<Handoff>` does).
//!
//! Each runs with A and B pinned to cores two ways (a [`Placement`]), since where they run
//! decides what a wake-up costs, and left to the scheduler they flip between the two:
//! - `*/two_cores`: a core each, as the router pins its workers (`pin_workers`, the default):
//!   each hand-off wakes a worker asleep on another core, which costs an inter-processor
//!   interrupt and that core's way out of idle (in a virtual machine, a trip through the host);
//! - `*/one_core`: both on one core, as unpinned workers may end up: each hand-off is a context
//!   switch, close to the CPU the hand-off itself takes.
//!
//! To tell the runtime's share of `inbox_wake/two_cores` from the machine's, compare it with a
//! plain futex ping-pong between two threads pinned to the same cores.
//!
//! Worker A times each sample itself, from its first send to its last receipt (criterion's
//! `iter_custom`), so the wake-ups that carry the driving thread's command and A's answer are
//! not counted. The driving and client threads, unpinned, sleep while A and B run.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use branchgate::buf::BufPool;
use branchgate::front_door::conn::Moving;
use branchgate::front_door::ClientConn;
use branchgate::handoff::Inbox;
use branchgate_bench::router_tls::router_config;
use branchgate_bench::tls::{client_config, providers, server_name, KeyKind, Pki};
use core_affinity::CoreId;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use monoio::time::TimeDriver;
use monoio::{FusionRuntime, IoUringDriver, LegacyDriver};
use rustls::{ClientConfig, ServerConfig};

/// Opened plaintext waiting in the connection for `round_trip_with_pipelined_bytes`: a few
/// pipelined messages' worth, well under one record, so that the client sends it as one.
const PIPELINED_BYTES: usize = 4 * 1024;

/// Hand-offs per iteration: A to B, then B back to A.
const HANDOFFS_PER_ROUND_TRIP: u64 = 2;

/// Room in each inbox: one message is ever in flight, and the end-of-run messages.
const INBOX_CAPACITY: usize = 4;

/// A worker's runtime: what `monoio::RuntimeBuilder::<FusionDriver>` with a timer builds.
type WorkerRuntime = FusionRuntime<TimeDriver<IoUringDriver>, TimeDriver<LegacyDriver>>;

/// The cores workers A and B are pinned to.
#[derive(Clone, Copy, Debug)]
struct Placement {
    /// The bench id's parameter.
    label: &'static str,
    /// Worker A's core.
    a: CoreId,
    /// Worker B's core.
    b: CoreId,
}

impl Placement {
    /// A core each when there are two to run on, the router's case, first; then one core for
    /// both.
    fn all() -> Vec<Placement> {
        let cores = core_affinity::get_core_ids().expect("the cores this process may run on");
        let first = *cores.first().expect("at least one core");
        let mut placements = Vec::with_capacity(2);
        match cores.get(1) {
            Some(&second) => placements.push(Placement {
                label: "two_cores",
                a: first,
                b: second,
            }),
            None => eprintln!("handoff: one core to run on, no two_cores rows"),
        }
        placements.push(Placement {
            label: "one_core",
            a: first,
            b: first,
        });
        placements
    }
}

/// Pins the calling thread, as the router pins a worker's thread before it builds its runtime.
fn pin(core: CoreId, worker: &str) {
    assert!(
        core_affinity::set_for_current(core),
        "cannot pin worker {worker} to core {}",
        core.id
    );
}

/// What the driving thread asks worker A to do; each is answered with the time it took.
#[derive(Debug)]
enum Command {
    /// Hand the connection to B and take it back this many times.
    RoundTrips(u64),
    /// Send B a small value and wait for its answer this many times.
    Pings(u64),
    /// Read from the client until this many bytes of opened plaintext wait in the connection.
    ReadPipelined(usize),
    /// Close the connection, stop B, and return.
    Stop,
}

/// What worker B is sent.
#[derive(Debug)]
enum ToB {
    /// The connection, to take in and send back (boxed, as the router boxes a `Handoff`).
    Conn(Box<Moving>),
    /// A small value to send back.
    Ping(u64),
    /// The end of the run: B returns.
    Stop,
}

/// What worker A is sent back.
#[derive(Debug)]
enum ToA {
    /// The connection, back from B.
    Conn(Box<Moving>),
    /// The value B was sent.
    Pong(u64),
    /// B panicked: without this A would wait for it for ever.
    BPanicked,
}

/// Builds a runtime as the router builds a worker's (`router::run_worker`), and says which
/// driver it got: without io_uring, monoio falls back to epoll, and so does the router.
fn worker_runtime(name: &str) -> WorkerRuntime {
    let runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .with_entries(branchgate::worker::URING_ENTRIES)
        .enable_timer()
        .build()
        .expect("a worker's monoio runtime");
    let driver = match &runtime {
        FusionRuntime::Uring(_) => "io_uring",
        FusionRuntime::Legacy(_) => "legacy (epoll): io_uring unavailable",
    };
    eprintln!("handoff: worker {name} runs on {driver}");
    runtime
}

/// Takes `conn` out of this worker's runtime, boxed for an inbox.
fn leave(conn: ClientConn<'_>) -> Box<Moving> {
    match conn.into_moving() {
        Ok(moving) => Box::new(moving),
        Err((_, error)) => panic!("the connection cannot leave its worker: {error}"),
    }
}

/// Worker A: accepts the client's connection and brings TLS up the way the front door does for
/// direct SSL, then runs the driving thread's commands until [`Command::Stop`].
fn worker_a(
    core: CoreId,
    listener: std::net::TcpListener,
    tls: Arc<ServerConfig>,
    inboxes: Inboxes,
    answers: mpsc::Sender<Duration>,
) {
    pin(core, "A");
    let pool = BufPool::default();
    let mut runtime = worker_runtime("A");
    runtime.block_on(async {
        let listener =
            monoio::net::TcpListener::from_std(listener).expect("the listener joins runtime A");
        let (tcp, _) = listener.accept().await.expect("accept the client");
        tcp.set_nodelay(true).expect("TCP_NODELAY");
        let mut conn = ClientConn::new(tcp, &pool);
        // The ClientHello's first bytes, which the front door reads before it chooses TLS.
        conn.fill_raw().await.expect("the client's first bytes");
        conn.accept_tls(tls)
            .await
            .expect("the router's TLS handshake");
        answers
            .send(Duration::ZERO)
            .expect("the driving thread waits");
        loop {
            let command = inboxes.commands.recv().await;
            // After the command's arrival: its wake-up is the driving thread's, not measured.
            let started = Instant::now();
            match command {
                Command::RoundTrips(count) => {
                    let buffered = conn.plain().len();
                    for _ in 0..count {
                        send(&inboxes.to_b, ToB::Conn(leave(conn)));
                        conn = match inboxes.to_a.recv().await {
                            ToA::Conn(moving) => ClientConn::from_moving(*moving, &pool)
                                .expect("the connection enters worker A"),
                            other => panic!("worker A expected the connection, got {other:?}"),
                        };
                    }
                    assert_eq!(
                        conn.plain().len(),
                        buffered,
                        "the pipelined bytes travel with the connection"
                    );
                }
                Command::Pings(count) => {
                    for n in 0..count {
                        send(&inboxes.to_b, ToB::Ping(n));
                        match inboxes.to_a.recv().await {
                            ToA::Pong(back) if back == n => {}
                            other => panic!("worker A expected pong {n}, got {other:?}"),
                        }
                    }
                }
                Command::ReadPipelined(bytes) => {
                    while conn.plain().len() < bytes {
                        conn.read_more()
                            .await
                            .expect("the client's pipelined bytes");
                    }
                }
                Command::Stop => break,
            }
            answers
                .send(started.elapsed())
                .expect("the driving thread waits");
        }
        // close_notify, and a bounded wait for the client to close its end.
        conn.close().await;
        send(&inboxes.to_b, ToB::Stop);
    });
}

/// Worker B: takes in each connection it is sent and sends it straight back, answers each
/// ping, until [`ToB::Stop`].
fn worker_b(core: CoreId, inboxes: Inboxes) {
    let _notice = NoticeOnPanic(&inboxes.to_a);
    pin(core, "B");
    let pool = BufPool::default();
    let mut runtime = worker_runtime("B");
    runtime.block_on(async {
        loop {
            match inboxes.to_b.recv().await {
                ToB::Conn(moving) => {
                    let conn = ClientConn::from_moving(*moving, &pool)
                        .expect("the connection enters worker B");
                    send(&inboxes.to_a, ToA::Conn(leave(conn)));
                }
                ToB::Ping(n) => send(&inboxes.to_a, ToA::Pong(n)),
                ToB::Stop => break,
            }
        }
    });
}

/// Sends on an inbox that has room (one message is in flight at a time) and is never closed.
fn send<T: std::fmt::Debug>(inbox: &Inbox<T>, item: T) {
    inbox.send(item).expect("an inbox with room");
}

/// Tells worker A that B panicked, when dropped while B's thread unwinds.
struct NoticeOnPanic<'a>(&'a Inbox<ToA>);

impl Drop for NoticeOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.0.send(ToA::BPanicked);
        }
    }
}

/// The client: connects to worker A, finishes the TLS handshake, sends the pipelined bytes if it
/// is given them, then reads until the router's close_notify and closes.
fn client(addr: SocketAddr, tls: Arc<ClientConfig>, pipelined: mpsc::Receiver<Vec<u8>>) {
    let tcp = std::net::TcpStream::connect(addr).expect("connect to worker A");
    tcp.set_nodelay(true).expect("TCP_NODELAY");
    let conn = rustls::ClientConnection::new(tls, server_name()).expect("a rustls client");
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .expect("the client's TLS handshake");
    }
    // The client's Finished, which the router's handshake waits for.
    while stream.conn.wants_write() {
        stream
            .conn
            .write_tls(&mut stream.sock)
            .expect("the client's Finished");
    }
    // Nothing comes if the driving thread stops without asking for them.
    if let Ok(bytes) = pipelined.recv() {
        stream.write_all(&bytes).expect("send the pipelined bytes");
        stream.flush().expect("flush the pipelined bytes");
    }
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .expect("read until the router's close_notify");
}

/// Starts a named thread (the name shows in a panic's message).
fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(body)
        .expect("spawn a thread")
}

/// The inboxes of both workers, as every thread sees them.
#[derive(Clone)]
struct Inboxes {
    /// The driving thread's commands to worker A.
    commands: Arc<Inbox<Command>>,
    /// Worker B's hand-offs and pings.
    to_b: Arc<Inbox<ToB>>,
    /// Worker A's hand-offs and pongs, back from B.
    to_a: Arc<Inbox<ToA>>,
}

/// The running workers and client, seen from the driving thread.
struct Workers {
    /// Worker A's commands (an inbox: A sleeps in its runtime between samples too).
    commands: Arc<Inbox<Command>>,
    /// Worker A's answers: the time each command took.
    answers: mpsc::Receiver<Duration>,
    /// The bytes the client is to pipeline; `None` once they went out (or the client was told
    /// none will).
    pipelined: Option<mpsc::Sender<Vec<u8>>>,
    /// Workers A and B and the client, joined by [`Workers::stop`].
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts both workers where `placement` says and the client, and waits until TLS is up.
    fn start(placement: Placement) -> Workers {
        let pki = Pki::generate(KeyKind::EcdsaP256).expect("certificates");
        let server = router_config(&pki).expect("the router's TLS configuration");
        let client_tls =
            client_config(providers().remove(0).provider, &pki).expect("client configuration");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
        let addr = listener.local_addr().expect("the listener's address");
        let inboxes = Inboxes {
            commands: Arc::new(Inbox::with_capacity(INBOX_CAPACITY)),
            to_b: Arc::new(Inbox::with_capacity(INBOX_CAPACITY)),
            to_a: Arc::new(Inbox::with_capacity(INBOX_CAPACITY)),
        };
        let (answer, answers) = mpsc::channel();
        let (pipelined, pipelined_rx) = mpsc::channel();
        let threads = vec![
            spawn("worker-b", {
                let inboxes = inboxes.clone();
                move || worker_b(placement.b, inboxes)
            }),
            spawn("worker-a", {
                let inboxes = inboxes.clone();
                move || worker_a(placement.a, listener, server, inboxes, answer)
            }),
            spawn("client", move || client(addr, client_tls, pipelined_rx)),
        ];
        let workers = Workers {
            commands: inboxes.commands,
            answers,
            pipelined: Some(pipelined),
            threads,
        };
        workers
            .answers
            .recv()
            .expect("worker A brings TLS up (or its thread panicked)");
        workers
    }

    /// Has worker A run `command`; returns the time it took, measured by A.
    fn run(&self, command: Command) -> Duration {
        self.commands
            .send(command)
            .expect("worker A's command inbox has room");
        self.answers
            .recv()
            .expect("worker A answers (or its thread panicked)")
    }

    /// Has the client pipeline [`PIPELINED_BYTES`] and worker A read them into the connection.
    fn pipeline(&mut self) {
        let pipelined = self.pipelined.take().expect("pipelined only once");
        // A simple query's frame (`Q`, length, text) for realism; only the length matters.
        let mut bytes = vec![b' '; PIPELINED_BYTES];
        bytes[0] = b'Q';
        let len = u32::try_from(PIPELINED_BYTES - 1).expect("a small frame");
        bytes[1..5].copy_from_slice(&len.to_be_bytes());
        bytes[PIPELINED_BYTES - 1] = 0;
        pipelined.send(bytes).expect("the client waits");
        self.run(Command::ReadPipelined(PIPELINED_BYTES));
    }

    /// Stops worker A (which closes the connection and stops B) and the client, and joins them.
    fn stop(mut self) {
        // The client stops waiting for pipelined bytes, and reads until the close_notify.
        self.pipelined = None;
        self.commands
            .send(Command::Stop)
            .expect("worker A's command inbox has room");
        for thread in self.threads {
            thread.join().expect("a bench thread ended in a panic");
        }
    }
}

/// For each placement, a fresh pair of workers and TLS connection, and the three benches.
fn handoff(c: &mut Criterion) {
    let mut group = c.benchmark_group("handoff");
    group.throughput(Throughput::Elements(HANDOFFS_PER_ROUND_TRIP));
    for placement in Placement::all() {
        let mut workers = Workers::start(placement);
        group.bench_function(BenchmarkId::new("round_trip", placement.label), |b| {
            b.iter_custom(|iters| workers.run(Command::RoundTrips(iters)))
        });
        workers.pipeline();
        let id = BenchmarkId::new("round_trip_with_pipelined_bytes", placement.label);
        group.bench_function(id, |b| {
            b.iter_custom(|iters| workers.run(Command::RoundTrips(iters)))
        });
        group.bench_function(BenchmarkId::new("inbox_wake", placement.label), |b| {
            b.iter_custom(|iters| workers.run(Command::Pings(iters)))
        });
        workers.stop();
    }
    group.finish();
}

criterion_group!(benches, handoff);
criterion_main!(benches);
