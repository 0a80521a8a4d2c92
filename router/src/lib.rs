//! branchgate: a PostgreSQL edge router.
//!
//! A client connects over TLS with the user name `role.branch_id` (or `role.branch_id|replica`);
//! the router terminates TLS (direct SSL or SSLRequest), authenticates the client with
//! SCRAM-SHA-256 against the catalog, and relays the session to the branch's primary or replica.
//!
//! # Layout
//! - [`protocol`]: PostgreSQL wire codec: frames, startup packet, the few messages we decode, writers.
//! - [`auth`]: SCRAM-SHA-256 verifiers, the server side, and the client side that reuses a ClientKey.
//! - [`config`]: the router's own TOML configuration (parse, don't validate).
//! - [`catalog`]: the branch catalog (branches, addresses, role verifiers), reloadable, and the
//!   guard against reloads that would remove too much of it; from a file or from etcd
//!   (`catalog::etcd`: its key layout, the control-plane thread that follows it,
//!   `branchgate catalog import|export`).
//! - [`route`]: user name parsing (`role.branch[|replica]`) and backend selection.
//! - [`tls`]: rustls configuration and handshake, and in-place record protection after it.
//! - [`backend`]: connecting and authenticating to a PostgreSQL backend.
//! - [`front_door`]: every port's way in: the first byte (a balancer's PROXY header), TLS, the
//!   StartupMessage, SCRAM, until authenticated; then a direct session or a pooled client takes
//!   over.
//! - [`direct`]: a direct session (session-mode port): its own backend, relayed.
//! - [`pooled`]: a pooled client (transaction-mode port): a backend borrowed per transaction.
//! - [`relay`]: an established session's bytes, both ways, driven by readiness.
//! - [`cancel`]: CancelRequests: every session's key in one index, a per-source limit on guesses.
//! - [`worker`]: the thread-per-core runtime: pinned threads, io_uring, SO_REUSEPORT listeners.
//! - [`signal`]: one-shot events inside a worker (a session's kill, the end of the drain).
//! - [`mailbox`]: per-worker mailboxes (shutdown and sweep flags) that wake a monoio runtime.
//! - [`upstream`]: backend addresses: outstanding connections, health probes, replica choice.
//! - [`buf`]: reused per-connection buffers for monoio's owned-buffer I/O.
//! - [`error`]: router errors and their single mapping to ErrorResponse.
//! - [`fleet`]: routers sharing an etcd catalog as nodes: the registry on leases, the live set,
//!   acknowledgements of catalog revisions, per-branch limits split among the nodes, cancels
//!   forwarded between nodes.
//! - [`role`]: the `branchgate role create|reset` command (file or etcd catalog).
//! - [`router`]: starting, reloading and stopping the whole router ([`start`], [`Router`]).
//! - [`control`]: the control socket (`reload`, `check`) and its one-line protocol.
//! - [`throttle`]: rate-limited logging for warnings that repeat per connection.
//! - [`steering`]: which worker accepts a new connection: the eBPF `sk_reuseport` program.
//! - [`handoff`]: an authenticated client moved to the worker that owns its branch.

pub mod auth;
pub mod backend;
pub mod buf;
pub mod cancel;
pub mod catalog;
pub mod config;
pub mod control;
pub mod direct;
pub mod error;
pub mod fleet;
pub mod front_door;
pub mod handoff;
pub mod mailbox;
pub mod metrics;
pub mod pooled;
pub mod probes;
pub mod protocol;
pub mod relay;
pub mod role;
pub mod route;
pub mod router;
pub mod signal;
pub mod steering;
pub mod throttle;
pub mod tls;
pub mod upstream;
pub mod worker;

pub use router::{start, start_with, Router, StartError, StartOptions};
