//! Starting, reloading and stopping the router.
//!
//! [`start`] binds one SO_REUSEPORT listener per worker and port (direct, and pooled when
//! configured) and the control socket on the calling thread (so a bad address fails synchronously and port 0 resolves to one port shared by all
//! workers), then starts the pinned worker threads and the helper threads (replica health
//! probes, catalog file watch, control socket). Reloads are in `router/reload.rs`.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};

use crate::catalog::{Catalog, CatalogError};
use crate::config::Config;
use crate::control::{self, ControlError, ControlServer, Reply, Request, Status};
use crate::mailbox::Mailbox;
use crate::tls::TlsError;
use crate::upstream::Upstreams;
use crate::worker::{Shared, Worker};

mod reload;

pub use reload::{ReloadError, Reloaded};
use reload::{Reloader, Trigger, Watch};

/// Listen backlog per worker socket.
const LISTEN_BACKLOG: i32 = 4096;

/// How often the catalog file's modification time and size are checked. A change is reloaded
/// once two checks in a row see the same new stamp, so a file an editor is still writing in
/// place is not read half-written (the `role` command replaces it atomically anyway).
const CATALOG_WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The catalog file is missing or invalid.
    #[error("catalog: {0}")]
    Catalog(#[from] CatalogError),
    /// Certificate or key unusable.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The fake-SCRAM secret file cannot be read or created.
    #[error("auth: {0}")]
    MockSecret(#[from] crate::auth::mock_secret::MockSecretError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Another router answers on the control socket (`[admin] socket`): two routers were
    /// started with one configuration.
    #[error(transparent)]
    ControlSocketInUse(ControlError),
    /// A worker thread could not start its runtime.
    #[error("worker {worker}: {source}")]
    Worker {
        /// Worker index.
        worker: usize,
        /// Why.
        source: std::io::Error,
    },
}

/// A running router. Dropping it without [`Router::shutdown`] leaves the workers running (but
/// closes the control socket).
#[derive(Debug)]
pub struct Router {
    shared: Arc<Shared>,
    direct_addr: SocketAddr,
    pooled_addr: Option<SocketAddr>,
    workers: Vec<JoinHandle<()>>,
    helpers: Vec<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
    reloader: Arc<Reloader>,
    /// `None` when the socket could not be created (logged): the router runs without it.
    control: Option<ControlServer>,
}

/// Descriptors a session holds: the client's socket and its backend's.
const FDS_PER_SESSION: u64 = 2;
/// Descriptors beyond the sessions and the listeners: io_uring, logs, health probes, cancels.
const SPARE_FDS: u64 = 256;

/// Raises the soft RLIMIT_NOFILE to the hard limit (the default soft limit, often 1024, would
/// cap the router at a few hundred sessions), and says so if even that is too few for
/// `max_clients` sessions beside `listeners` listening sockets.
fn raise_open_file_limit(max_clients: u32, listeners: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit to a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit from a valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    let listeners = u64::try_from(listeners).unwrap_or(u64::MAX);
    let needed = (u64::from(max_clients) * FDS_PER_SESSION)
        .saturating_add(listeners)
        .saturating_add(SPARE_FDS);
    if limit.rlim_cur < needed {
        tracing::warn!(
            open_files = limit.rlim_cur,
            needed,
            "open-file limit too low for limits.max_client_connections: raise the hard limit \
             (LimitNOFILE=, ulimit -Hn) or lower max_client_connections"
        );
    }
}

/// Start the router described by `config`: returns once every worker is accepting.
pub fn start(config: Config) -> Result<Router, StartError> {
    // Stamped before reading, as every reload does (see `reload::Reloader`).
    let loaded = reload::stamp(&config.catalog_path);
    let catalog = Catalog::load(&config.catalog_path)?;
    let tls = crate::tls::server_config(&config.tls.cert, &config.tls.key)?;
    let mock_secret = crate::auth::mock_secret::load_or_create(&config.auth.mock_secret_file)?;
    let workers = config.workers.get();
    let ports = 1 + usize::from(config.listen.pooled.is_some());
    raise_open_file_limit(
        config.limits.max_client_connections.get(),
        workers.saturating_mul(ports),
    );
    let (direct, direct_addr) = bind_reuseport(config.listen.direct, workers)?;
    let (pooled, pooled_addr): (Vec<Option<TcpListener>>, _) = match config.listen.pooled {
        Some(addr) => {
            let (listeners, local) = bind_reuseport(addr, workers)?;
            (listeners.into_iter().map(Some).collect(), Some(local))
        }
        None => ((0..workers).map(|_| None).collect(), None),
    };
    let control_listener = match control::bind(&config.admin.socket) {
        Ok(listener) => Some(listener),
        Err(error @ ControlError::InUse { .. }) => {
            return Err(StartError::ControlSocketInUse(error))
        }
        Err(error) => {
            tracing::warn!(
                %error,
                "running without a control socket: `branchgate reload` will not reach this \
                 router, and `branchgate role` will not wait for it"
            );
            None
        }
    };

    let upstreams = Upstreams::default();
    upstreams.sync(&catalog);
    let shared = Arc::new(Shared {
        catalog: ArcSwap::from_pointee(catalog),
        tls,
        mailboxes: (0..workers).map(|_| Mailbox::new()).collect(),
        upstreams,
        sessions: AtomicU32::new(0),
        mock_secret,
        cancels: Default::default(),
        branch_clients: Default::default(),
        config,
    });

    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut handles = Vec::with_capacity(workers);
    let per_worker = direct.into_iter().zip(pooled);
    for (id, (direct, pooled)) in per_worker.enumerate() {
        let listeners = Listeners { direct, pooled };
        let shared = shared.clone();
        let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
        let ready = ready_tx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("branchgate-w{id}"))
            .spawn(move || run_worker(id, shared, listeners, core, ready))
            .map_err(|source| StartError::Worker { worker: id, source })?;
        handles.push(handle);
    }
    drop(ready_tx);
    for _ in 0..workers {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err((worker, source))) => return Err(StartError::Worker { worker, source }),
            Err(_) => {
                return Err(StartError::Worker {
                    worker: 0,
                    source: std::io::Error::other("worker thread exited during start"),
                })
            }
        }
    }
    tracing::info!(
        %direct_addr,
        pooled_addr = pooled_addr.map(tracing::field::display),
        workers,
        "branchgate accepting"
    );

    let stopping = Arc::new(AtomicBool::new(false));
    let reloader = Arc::new(Reloader::new(shared.clone(), loaded));
    let control = control_listener.and_then(|listener| serve_control(listener, &reloader, &shared));
    let mut router = Router {
        shared,
        direct_addr,
        pooled_addr,
        workers: handles,
        helpers: Vec::new(),
        stopping,
        reloader,
        control,
    };
    router.helpers.push(router.spawn_health_probes());
    router.helpers.push(router.spawn_catalog_watch());
    Ok(router)
}

/// How long `branchgate pause` waits for the branch's running transactions to finish before it
/// answers (they go on finishing after; new ones wait either way).
pub const PAUSE_WAIT: Duration = Duration::from_secs(5);

/// `pause BRANCH`: new pooled transactions of the branch wait; answers once the running ones
/// have finished, or after [`PAUSE_WAIT`] with how many still run.
fn pause(shared: &Shared, branch: &str) -> Reply {
    if shared.catalog.load().branch(branch).is_none() {
        return Reply::new(
            Status::Error,
            format_args!("no branch {branch:?} in the catalog"),
        );
    }
    let entry = shared.branch_clients.pause(branch);
    tracing::info!(%branch, "branch paused: new pooled transactions wait until resumed");
    let deadline = std::time::Instant::now() + PAUSE_WAIT;
    while entry.active() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    match entry.active() {
        0 => Reply::new(
            Status::Ok,
            format_args!("paused branch {branch}: no transaction is running"),
        ),
        n => Reply::new(
            Status::Ok,
            format_args!(
                "paused branch {branch}: {n} transaction(s) still running after {PAUSE_WAIT:?}, \
                 new ones wait"
            ),
        ),
    }
}

/// Starts answering on the control socket; `None` (logged) if its thread cannot start.
fn serve_control(
    listener: control::ControlListener,
    reloader: &Arc<Reloader>,
    shared: &Arc<Shared>,
) -> Option<ControlServer> {
    let reloader = reloader.clone();
    let shared = shared.clone();
    let not_loaded = |error: ReloadError| match error {
        ReloadError::Refused(refusal) => Reply::new(Status::Refused, refusal),
        ReloadError::Catalog(error) => Reply::new(Status::Error, error),
    };
    let handler = move |request| match request {
        Request::Reload { force } => match reloader.reload(Trigger::ControlSocket, force) {
            Ok(reloaded) => Reply::new(Status::Ok, format_args!("reloaded: {reloaded}")),
            Err(error) => not_loaded(error),
        },
        Request::Check => match reloader.check() {
            Ok(reloaded) => Reply::new(Status::Ok, format_args!("a reload would load {reloaded}")),
            Err(error) => not_loaded(error),
        },
        Request::Pause(branch) => pause(&shared, &branch),
        Request::Resume(branch) => {
            if shared.catalog.load().branch(&branch).is_none() {
                return Reply::new(
                    Status::Error,
                    format_args!("no branch {branch:?} in the catalog"),
                );
            }
            let was = shared.branch_clients.resume(&branch);
            tracing::info!(%branch, "branch resumed");
            Reply::new(
                Status::Ok,
                if was {
                    format_args!("resumed branch {branch}").to_string()
                } else {
                    format!("branch {branch} was not paused")
                },
            )
        }
    };
    match ControlServer::start(listener, handler) {
        Ok(server) => Some(server),
        Err(error) => {
            tracing::warn!(%error, "running without a control socket: its thread did not start");
            None
        }
    }
}

/// Binds `count` SO_REUSEPORT listeners on `addr`, and says which address they share (the port
/// the kernel chose when `addr` has port 0).
fn bind_reuseport(
    addr: SocketAddr,
    count: usize,
) -> Result<(Vec<TcpListener>, SocketAddr), StartError> {
    let failed = |source| StartError::Listen { addr, source };
    let mut listeners: Vec<TcpListener> = Vec::with_capacity(count);
    let mut bind_addr = addr;
    for _ in 0..count {
        let listener = (|| {
            let socket = Socket::new(
                Domain::for_address(bind_addr),
                Type::STREAM,
                Some(Protocol::TCP),
            )?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&bind_addr.into())?;
            socket.listen(LISTEN_BACKLOG)?;
            Ok::<_, std::io::Error>(TcpListener::from(socket))
        })()
        .map_err(failed)?;
        if let Ok(local) = listener.local_addr() {
            // Port 0: every further worker binds the port the first one got.
            bind_addr = local;
        }
        listeners.push(listener);
    }
    let local = match listeners.first() {
        Some(listener) => listener.local_addr().map_err(failed)?,
        None => addr,
    };
    Ok((listeners, local))
}

/// One worker's listening sockets, one per port.
struct Listeners {
    direct: TcpListener,
    pooled: Option<TcpListener>,
}

type Ready = mpsc::Sender<Result<(), (usize, std::io::Error)>>;

fn run_worker(
    id: usize,
    shared: Arc<Shared>,
    listeners: Listeners,
    core: Option<core_affinity::CoreId>,
    ready: Ready,
) {
    if let Some(core) = core {
        if !core_affinity::set_for_current(core) {
            tracing::warn!(
                worker = id,
                core = core.id,
                "could not pin worker to its core"
            );
        }
    }
    let build = |uring: io_uring::Builder| {
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .with_entries(crate::worker::URING_ENTRIES)
            .uring_builder(uring)
            .enable_timer()
            .build()
    };
    let runtime = build(crate::worker::uring_builder())
        .or_else(|_| build(crate::worker::plain_uring_builder()));
    let mut runtime = match runtime {
        Ok(runtime) => runtime,
        Err(source) => {
            let _ = ready.send(Err((id, source)));
            return;
        }
    };
    let driver = match &runtime {
        monoio::FusionRuntime::Uring(_) => "io_uring",
        monoio::FusionRuntime::Legacy(_) => "legacy (epoll): io_uring unavailable",
    };
    tracing::info!(
        worker = id,
        core = core.map(|c| c.id),
        driver,
        "worker started"
    );
    runtime.block_on(async move {
        let Listeners { direct, pooled } = listeners;
        let listeners = monoio::net::TcpListener::from_std(direct).and_then(|direct| {
            let pooled = pooled.map(monoio::net::TcpListener::from_std).transpose()?;
            Ok((direct, pooled))
        });
        let (direct, pooled) = match listeners {
            Ok(listeners) => listeners,
            Err(source) => {
                let _ = ready.send(Err((id, source)));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        Worker::new(id, shared).run(direct, pooled).await;
    });
}

impl Router {
    /// The address of the direct (session) port, with the real port if 0 was configured.
    pub fn direct_addr(&self) -> SocketAddr {
        self.direct_addr
    }

    /// The address of the pooled (transaction) port, if configured, with the real port if 0
    /// was configured.
    pub fn pooled_addr(&self) -> Option<SocketAddr> {
        self.pooled_addr
    }

    /// Path of the catalog file in use.
    pub fn catalog_path(&self) -> PathBuf {
        self.shared.config.catalog_path.clone()
    }

    /// The control socket the router answers on, if it could create one.
    pub fn control_socket(&self) -> Option<&Path> {
        self.control.as_ref().map(ControlServer::path)
    }

    /// Re-read the catalog (what SIGHUP does). An invalid file is rejected, a file the reload
    /// guard refuses (it removes every branch or role, or more than `[reload]
    /// max_removed_percent` of them) is refused, either logged, and the old catalog stays in
    /// force. Sessions of roles whose verifier changed or vanished are closed.
    pub fn reload_catalog(&self) -> Result<Reloaded, ReloadError> {
        self.reloader.reload(Trigger::Api, false)
    }

    /// As [`Router::reload_catalog`], past the reload guard: any valid file is applied.
    pub fn reload_catalog_forced(&self) -> Result<Reloaded, ReloadError> {
        self.reloader.reload(Trigger::Api, true)
    }

    fn spawn_health_probes(&self) -> JoinHandle<()> {
        let shared = self.shared.clone();
        let stopping = self.stopping.clone();
        std::thread::spawn(move || {
            let interval = shared.config.timeouts.health_check_interval;
            while !stopping.load(Ordering::Relaxed) {
                shared.upstreams.probe_all(&stopping);
                std::thread::park_timeout(interval);
            }
        })
    }

    fn spawn_catalog_watch(&self) -> JoinHandle<()> {
        let reloader = self.reloader.clone();
        let path = self.shared.config.catalog_path.clone();
        let stopping = self.stopping.clone();
        std::thread::spawn(move || {
            let mut watch = Watch::new(reload::stamp(&path));
            while !stopping.load(Ordering::Relaxed) {
                std::thread::park_timeout(CATALOG_WATCH_INTERVAL);
                if let Some(now) = watch.look(reload::stamp(&path), reloader.last_read()) {
                    reloader.reload_if_unread(now);
                }
            }
        })
    }

    /// Stop accepting, let sessions finish for at most `timeouts.drain`, close the rest with
    /// FATAL 57P01, and wait for every thread to end.
    pub fn shutdown(self) {
        tracing::info!("shutting down");
        // First, so that no reload starts while the router stops; removes the socket file.
        if let Some(control) = self.control {
            control.stop();
        }
        self.stopping.store(true, Ordering::Relaxed);
        for mailbox in &self.shared.mailboxes {
            mailbox.request_shutdown();
        }
        for handle in self.helpers {
            handle.thread().unpark();
            let _ = handle.join();
        }
        for handle in self.workers {
            let _ = handle.join();
        }
        tracing::info!("stopped");
    }

    /// Run until SIGTERM or SIGINT (then shut down gracefully); SIGHUP reloads the catalog.
    pub fn run_until_signalled(self) -> std::io::Result<()> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM])?;
        for signal in signals.forever() {
            match signal {
                SIGHUP => {
                    tracing::info!("SIGHUP: reloading catalog");
                    let _ = self.reloader.reload(Trigger::Signal, false);
                }
                _ => break,
            }
        }
        self.shutdown();
        Ok(())
    }
}
