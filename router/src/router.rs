//! Starting, reloading and stopping the router.
//!
//! [`start`] binds one SO_REUSEPORT listener per worker and port (direct, and pooled when
//! configured) and the control socket on the calling thread (so a bad address fails synchronously and port 0 resolves to one port shared by all
//! workers), then starts the pinned worker threads and the helper threads (replica health
//! probes, catalog file watch or etcd follower, control socket). Reloads are in
//! `router/reload.rs`.

use crate::metrics::admin::AdminServer;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};

use crate::catalog::etcd::follow::FirstReadError;
use crate::catalog::etcd::{Follower, Latest, Layout};
use crate::catalog::source::SourceState;
use crate::catalog::{Catalog, CatalogError};
use crate::config::{CatalogSource, Config, NodeConfig, NodeIdSource};
use crate::control::{self, ControlError, ControlServer, Reply, Request, Status};
use crate::fleet::registry::NodeSetup;
use crate::fleet::{Ack, Fleet, NodeRecord};
use crate::mailbox::Mailbox;
use crate::steering::{Steering, SteeringError};
use crate::tls::TlsError;
use crate::upstream::Upstreams;
use crate::worker::{Shared, Worker};

mod reload;

pub use reload::{ReloadError, Reloaded};
use reload::{Reloader, Source, Stamp, Trigger, Watch};

/// Listen backlog per worker socket.
const LISTEN_BACKLOG: i32 = 4096;

/// How often the catalog file's modification time and size are checked. A change is reloaded
/// once two checks in a row see the same new stamp, so a file an editor is still writing in
/// place is not read half-written (the `role` command replaces it atomically anyway).
const CATALOG_WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The catalog file is missing or invalid, or the catalog in etcd is invalid.
    #[error("catalog: {0}")]
    Catalog(#[from] CatalogError),
    /// The etcd follower's thread (or its runtime) could not start, or ended before it read
    /// the catalog.
    #[error("catalog: cannot follow etcd: {0}")]
    Etcd(std::io::Error),
    /// The node id file (`[node]`, beside router.toml) cannot be read or created.
    #[error("node id: {0}")]
    NodeId(#[from] crate::fleet::node::NodeIdFileError),
    /// The node could not register in etcd: another live router has its id.
    #[error("fleet: {0}")]
    Registry(#[from] crate::fleet::registry::RegistryError),
    /// `[node] secret_file` cannot be read or is too short.
    #[error("[node] secret_file: {0}")]
    PeerSecret(#[from] crate::fleet::wire::SecretError),
    /// The cancel-forwarding thread could not start.
    #[error(transparent)]
    Peer(#[from] crate::fleet::peer::PeerError),
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
    /// `steering = "ebpf"` was asked for and the program could not be loaded.
    #[error("steering = \"ebpf\": {0}")]
    Steering(#[from] SteeringError),
    /// A worker thread could not start its runtime.
    #[error(transparent)]
    Admin(#[from] crate::metrics::admin::AdminError),
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
    /// `/metrics` and `/healthz`, if `[listen] admin` is set.
    admin: Option<AdminServer>,
    /// How a `takeover` request stops [`Router::run_until_signalled`].
    stop_hook: Arc<StopHook>,
    /// The etcd control-plane thread, when the catalog is in etcd.
    follower: Option<Follower>,
}

/// Ends [`Router::run_until_signalled`]'s wait for a signal from another thread (the control
/// socket's `takeover`); empty when the router is not run that way.
#[derive(Debug, Default)]
pub struct StopHook(std::sync::Mutex<Option<signal_hook::iterator::Handle>>);

impl StopHook {
    fn set(&self, handle: signal_hook::iterator::Handle) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
    }

    fn take(&self) -> Option<signal_hook::iterator::Handle> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// How a router starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartOptions {
    /// `branchgate run --takeover`: another router runs with this configuration; join its
    /// listeners, take the new connections (the steering program's socket arrays), then ask it
    /// over the control socket to stop accepting, drain and exit.
    pub takeover: bool,
}

/// How long a takeover waits for the old router's answer, and then for its control socket.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

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
    start_with(config, StartOptions::default())
}

/// [`start`], with `options` (`branchgate run --takeover`).
pub fn start_with(config: Config, options: StartOptions) -> Result<Router, StartError> {
    let tls = crate::tls::server_config(&config.tls.cert, &config.tls.key)?;
    let mock_secret = crate::auth::mock_secret::load_or_create(&config.auth.mock_secret_file)?;
    let peering = peering(&config)?;
    // Last of the checks that need nothing running: waiting for etcd may take a while.
    let Loaded {
        catalog,
        stamp: loaded,
        source,
        state: catalog_source,
        mut follower,
        fleet,
    } = match &config.catalog {
        CatalogSource::File(path) => Loaded {
            // Stamped before reading, as every reload does (see `reload::Reloader`).
            stamp: reload::stamp(path),
            catalog: Catalog::load(path)?,
            source: Source::File(path.clone()),
            state: Arc::new(SourceState::file()),
            follower: None,
            fleet: Arc::new(Fleet::single()),
        },
        CatalogSource::Etcd(url) => load_from_etcd(
            url,
            &config.node,
            peering.as_ref().and_then(|p| p.peer_addr()),
        )?,
    };
    let workers = config.workers.get();
    let ports = 1 + usize::from(config.listen.pooled.is_some());
    raise_open_file_limit(
        config.limits.max_client_connections.get(),
        workers.saturating_mul(ports),
    );
    let (direct, direct_addr) = bind_reuseport(config.listen.direct, workers)?;
    let (pooled, pooled_addr) = match config.listen.pooled {
        Some(addr) => {
            let (listeners, local) = bind_reuseport(addr, workers)?;
            (Some(listeners), Some(local))
        }
        None => (None, None),
    };
    let admin_listener = config
        .listen
        .admin
        .map(crate::metrics::admin::bind)
        .transpose()?;
    // A takeover finds the old router on the socket: it binds it once the old one has let go.
    let mut taking_over = false;
    let control_listener = match control::bind(&config.admin.socket) {
        Ok(listener) => Some(listener),
        Err(ControlError::InUse { .. }) if options.takeover => {
            taking_over = true;
            None
        }
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
    // After the control socket: a second router started with this configuration stops there,
    // before it attaches its program to the first one's reuseport groups.
    let steering = Steering::start(
        config.steering,
        &crate::steering::ebpf::pin_name(direct_addr),
        &direct,
        pooled.as_deref(),
    )?;
    let pooled: Vec<Option<TcpListener>> = match pooled {
        Some(listeners) => listeners.into_iter().map(Some).collect(),
        None => (0..workers).map(|_| None).collect(),
    };

    let upstreams = Upstreams::default();
    upstreams.sync(&catalog);
    let shared = Arc::new(Shared {
        catalog: ArcSwap::from_pointee(catalog),
        catalog_source,
        tls,
        mailboxes: (0..workers).map(|_| Mailbox::new()).collect(),
        upstreams,
        sessions: AtomicU32::new(0),
        mock_secret,
        cancels: Default::default(),
        branch_clients: Default::default(),
        stats: (0..workers).map(|_| Arc::default()).collect(),
        steering,
        inboxes: (0..workers).map(|_| Default::default()).collect(),
        fleet,
        config,
    });
    if let Some(revision) = shared.catalog_source.revision() {
        // The catalog this node starts with: a `role` command waiting for it is answered.
        shared.fleet.acknowledge(Ack {
            revision,
            refused: None,
        });
    }

    let cores = if shared.config.pin_workers {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
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
        steering = ?shared.steering.mode(),
        "branchgate accepting"
    );

    let stopping = Arc::new(AtomicBool::new(false));
    let reloader = Arc::new(Reloader::new(shared.clone(), source, loaded));
    if let Some(follower) = &mut follower {
        let reloader = reloader.clone();
        follower.follow(Box::new(move || {
            // Logged by the reload (applied, refused or invalid); the follower goes on.
            let _ = reloader.reload(Trigger::Etcd, false);
        }));
    }
    let stop_hook = Arc::new(StopHook::default());
    let control = control_listener
        .and_then(|listener| serve_control(listener, &reloader, &shared, &stop_hook));
    let mut router = Router {
        shared,
        direct_addr,
        pooled_addr,
        workers: handles,
        helpers: Vec::new(),
        stopping,
        reloader,
        control,
        admin: None,
        stop_hook,
        follower,
    };
    if taking_over {
        router.take_over();
    } else if options.takeover {
        tracing::info!("--takeover: no router answers on the control socket, nothing to take over");
    }
    if let Some(listener) = admin_listener {
        match AdminServer::start(listener, router.shared.clone(), router.stopping.clone()) {
            Ok(admin) => {
                tracing::info!(addr = %admin.addr(), "admin endpoint: /metrics and /healthz");
                router.admin = Some(admin);
            }
            Err(error) => tracing::error!(%error, "running without the admin endpoint"),
        }
    }
    router.helpers.push(router.spawn_health_probes());
    if let Some(Peering { secret, listener }) = peering {
        let thread = crate::fleet::peer::start(
            router.shared.clone(),
            secret,
            listener,
            router.stopping.clone(),
        )?;
        tracing::info!("cancels that match no session here are forwarded to the other nodes");
        router.helpers.push(thread);
    }
    if let CatalogSource::File(path) = &router.shared.config.catalog {
        let watch = router.spawn_catalog_watch(path.clone());
        router.helpers.push(watch);
    }
    if let Some(every) = router.shared.config.rebalance {
        if router.shared.steering.hands_off() {
            router.helpers.push(router.spawn_rebalancer(every));
        } else {
            tracing::info!("rebalance is set, but this steering mode hands nothing off: ignored");
        }
    }
    Ok(router)
}

/// The catalog a router starts with, and where its reloads read the next one.
struct Loaded {
    /// The catalog to start with.
    catalog: Catalog,
    /// The file's stamp when it was read (`None` for etcd).
    stamp: Option<Stamp>,
    /// Where reloads read the catalog.
    source: Source,
    /// What `/metrics` says about the source.
    state: Arc<SourceState>,
    /// The etcd control-plane thread, for an etcd catalog.
    follower: Option<Follower>,
    /// The fleet this router is a node of (of one, for a catalog file).
    fleet: Arc<Fleet>,
}

/// What forwarding cancels between nodes needs before the router starts: the fleet's secret
/// and, with `[node] peer`, the listener there (bound now, so a bad address fails the start and
/// port 0 resolves before the node registers its address).
struct Peering {
    /// `[node] secret_file`'s secret.
    secret: crate::fleet::wire::PeerSecret,
    /// Bound to `[node] peer`, if set.
    listener: Option<TcpListener>,
}

impl Peering {
    /// The address the listener has (the configured one, its port resolved).
    fn peer_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// The [`Peering`] of `config`: only with an etcd catalog (a fleet) and a secret file; a
/// `[node] peer` without a secret forwards nothing and says so (an unauthenticated channel is
/// never opened).
fn peering(config: &Config) -> Result<Option<Peering>, StartError> {
    if !matches!(config.catalog, CatalogSource::Etcd(_)) {
        return Ok(None);
    }
    let Some(path) = &config.node.secret_file else {
        if config.node.peer.is_some() {
            tracing::warn!(
                "[node] peer is set but [node] secret_file is not: cancels are not forwarded \
                 between nodes (the channel needs the fleet's shared secret)"
            );
        }
        return Ok(None);
    };
    let secret = crate::fleet::wire::PeerSecret::load(path)?;
    let listener = match config.node.peer {
        Some(addr) => {
            Some(TcpListener::bind(addr).map_err(|source| StartError::Listen { addr, source })?)
        }
        None => None,
    };
    Ok(Some(Peering { secret, listener }))
}

/// Registers this router as a node of the fleet ([`crate::fleet`]), starts the etcd follower
/// and waits until it has read the catalog: for as long as etcd is unreachable (a router
/// without a catalog cannot serve anyone; the follower logs each retry).
fn load_from_etcd(
    url: &crate::catalog::etcd::EtcdUrl,
    node: &NodeConfig,
    bound_peer: Option<SocketAddr>,
) -> Result<Loaded, StartError> {
    let id = match &node.id {
        NodeIdSource::Configured(id) => id.clone(),
        NodeIdSource::File(path) => crate::fleet::node::load_or_create_id(path)?,
    };
    // The peer listener's own address when it is bound (its port resolved), else as configured.
    let peer = bound_peer.or(node.peer);
    tracing::info!(node = %id, peer = peer.map(tracing::field::display), "fleet node");
    let fleet = Arc::new(Fleet::node(id.clone()));
    let setup = NodeSetup {
        record: NodeRecord::new(id, peer),
        ttl: node.lease_ttl,
        fleet: fleet.clone(),
    };
    let latest = Arc::new(Latest::new(Layout::new(url.prefix())));
    let state = Arc::new(SourceState::etcd());
    let (follower, first) =
        Follower::start(url.clone(), latest.clone(), state.clone(), Some(setup))
            .map_err(StartError::Etcd)?;
    match first.wait() {
        Ok(()) => {}
        Err(FirstReadError::Registry(error)) => {
            follower.stop();
            return Err(error.into());
        }
        Err(error @ FirstReadError::Ended) => {
            return Err(StartError::Etcd(std::io::Error::other(error.to_string())))
        }
    }
    let (catalog, revision) = match latest.catalog() {
        Ok(loaded) => loaded,
        Err(error) => {
            follower.stop();
            return Err(error.into());
        }
    };
    state.set_revision(revision);
    Ok(Loaded {
        catalog,
        stamp: None,
        source: Source::Etcd(latest),
        state,
        follower: Some(follower),
        fleet,
    })
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

/// `nodes`: one line naming the live nodes (this one marked), or saying there is no fleet.
fn describe_fleet(fleet: &Fleet) -> String {
    let Some(own) = fleet.id() else {
        return "not a fleet node: the catalog is a file (1 node)".into();
    };
    let nodes = fleet.nodes();
    let list: Vec<String> = nodes
        .nodes
        .iter()
        .map(|node| {
            let mut text = node.id.to_string();
            if node.id == *own {
                text.push_str(" (this node)");
            }
            if let Some(peer) = node.peer {
                text.push_str(&format!(" peer {peer}"));
            }
            text
        })
        .collect();
    format!(
        "{} live nodes, limits divided by {}: {}",
        nodes.nodes.len(),
        fleet.count(),
        list.join(", ")
    )
}

/// Starts answering on the control socket; `None` (logged) if its thread cannot start.
fn serve_control(
    listener: control::ControlListener,
    reloader: &Arc<Reloader>,
    shared: &Arc<Shared>,
    stop_hook: &Arc<StopHook>,
) -> Option<ControlServer> {
    let reloader = reloader.clone();
    let shared = shared.clone();
    let stop_hook = stop_hook.clone();
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
        Request::Nodes => Reply::new(Status::Ok, describe_fleet(&shared.fleet)),
        Request::Takeover => {
            let Some(stop) = stop_hook.take() else {
                return Reply::new(
                    Status::Error,
                    "this router cannot be taken over: it is not run by `branchgate run`",
                );
            };
            // The new router pinned its maps where ours were: they are its now.
            shared.steering.disown_pins();
            tracing::info!("taken over by a new router: stopping accepting, draining, exiting");
            stop.close();
            Reply::new(Status::Ok, "stopping: the new router accepts now")
        }
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
    let [deferred, cooperative, plain] = crate::worker::uring_builders();
    let runtime = build(deferred)
        .map(|runtime| (runtime, "io_uring, deferred task running"))
        .or_else(|_| {
            build(cooperative).map(|runtime| (runtime, "io_uring, cooperative task running"))
        })
        .or_else(|_| build(plain).map(|runtime| (runtime, "io_uring")));
    let (mut runtime, setup) = match runtime {
        Ok(built) => built,
        Err(source) => {
            let _ = ready.send(Err((id, source)));
            return;
        }
    };
    let driver = match &runtime {
        monoio::FusionRuntime::Uring(_) => setup,
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

    /// Which worker accepts new connections: the eBPF program's maps, per-worker accept counts.
    pub fn steering(&self) -> &Steering {
        &self.shared.steering
    }

    /// Where the catalog comes from: its file, or its etcd URL.
    pub fn catalog_source(&self) -> &CatalogSource {
        &self.shared.config.catalog
    }

    /// Whether the catalog's source answers, and (etcd) the revision in force: what `/metrics`
    /// says as `branchgate_catalog_source_up` and `branchgate_catalog_revision`.
    pub fn catalog_state(&self) -> &SourceState {
        &self.shared.catalog_source
    }

    /// The admin endpoint's address (`/metrics`, `/healthz`), if it runs.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::addr)
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

    /// Every `rebalance`, moves at most one branch slot to a lighter worker
    /// ([`crate::steering::Steering::rebalance`]).
    fn spawn_rebalancer(&self, every: Duration) -> JoinHandle<()> {
        let shared = self.shared.clone();
        let stopping = self.stopping.clone();
        std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                std::thread::park_timeout(every);
                if let Some(moved) = shared.steering.rebalance() {
                    tracing::info!(
                        slot = moved.slot,
                        sessions = moved.sessions,
                        from = moved.from,
                        to = moved.to,
                        "rebalance: branch slot moved to a lighter worker (new sessions go there)"
                    );
                }
            }
        })
    }

    fn spawn_catalog_watch(&self, path: PathBuf) -> JoinHandle<()> {
        let reloader = self.reloader.clone();
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
        // Before the workers stop, for the same reason.
        if let Some(follower) = self.follower {
            follower.stop();
        }
        self.stopping.store(true, Ordering::Relaxed);
        // No hand-off once the workers stop: each serves (and drains) what it has.
        for inbox in &self.shared.inboxes {
            inbox.close();
        }
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
        // Hand-offs sent as the workers stopped, which nobody took: their sockets close here
        // (no worker thread is left to send more).
        let dropped: usize = self.shared.inboxes.iter().map(|i| i.discard_all()).sum();
        if dropped > 0 {
            tracing::info!(connections = dropped, "closed hand-offs no worker took");
        }
        // Last: /healthz said 503 for the whole drain.
        if let Some(admin) = self.admin {
            admin.stop();
        }
        self.shared.steering.unpin();
        tracing::info!("stopped");
    }

    /// This router accepts (its listeners are in the reuseport groups, its program chooses among
    /// them): the old one is asked to stop accepting, then its control socket is taken.
    fn take_over(&mut self) {
        let path = self.shared.config.admin.socket.clone();
        match control::request(&path, Request::Takeover, TAKEOVER_WAIT) {
            Ok(reply) => tracing::info!(old = %reply.text, "took over from the running router"),
            Err(error) => tracing::warn!(%error, "the old router did not answer the takeover"),
        }
        let deadline = std::time::Instant::now() + TAKEOVER_WAIT;
        let listener = loop {
            match control::bind(&path) {
                Ok(listener) => break Some(listener),
                Err(ControlError::InUse { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(error) => {
                    tracing::warn!(%error, "running without a control socket after the takeover");
                    break None;
                }
            }
        };
        self.control = listener.and_then(|listener| {
            serve_control(listener, &self.reloader, &self.shared, &self.stop_hook)
        });
    }

    /// Run until SIGTERM or SIGINT (then shut down gracefully), or until a new router takes
    /// this one over (`takeover` on the control socket); SIGHUP reloads the catalog.
    pub fn run_until_signalled(self) -> std::io::Result<()> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM])?;
        self.stop_hook.set(signals.handle());
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
