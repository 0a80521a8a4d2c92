//! Test support: real PostgreSQL servers, certificates, real clients, and the router in-process.
//!
//! # Layout
//! - [`pg`]: [`PgServer`], a PostgreSQL 15 primary or streaming replica in a temp dir.
//! - [`etcd`]: [`EtcdServer`], a real etcd member on free ports in a temp dir, and `etcdctl`.
//! - [`certs`]: [`Certs`], a throwaway CA and a `localhost`/`127.0.0.1` server certificate.
//! - [`clients`]: libpq connection strings and queries through psycopg.
//! - [`catalog`]: the router's catalog and configuration files as text.
//! - [`tools`]: paths of PostgreSQL's programs and the Python venv, free ports.
//! - [`spawn`]: starting servers that die with the test process.
//! - `leftovers`: temp directories of fixtures never dropped, removed at the process's exit.
//! - [`router`]: `TestRouter`, the router started in-process.
//! - [`binary`]: the `branchgate` binary's commands, and `branchgate run` as a child process.
//! - [`metrics`]: the admin endpoint's `/metrics` over HTTP, and the samples in it.
//! - [`pool_config`]: [`PoolSettings`], the pooled listener and `[pool]` table of router.toml.
//! - [`raw`]: hand-built protocol messages over raw sockets and sync rustls, for bad input and
//!   for extended-protocol sequences no client library produces on demand.
//! - [`tokio_tls`]: tokio-postgres over tokio-rustls.
//! - [`tp_cancel`]: the cancel key of a tokio-postgres client.
//! - [`tp_session`]: a tokio-postgres session held open from synchronous code.
//!
//! Servers are real processes: run `scripts/setup` once to install PostgreSQL 15 and the venv.
//! As root, servers run as the `postgres` OS user.

pub mod binary;
pub mod catalog;
pub mod certs;
pub mod clients;
pub mod etcd;
mod leftovers;
pub mod metrics;
pub mod pg;
pub mod pool_config;
pub mod raw;
pub mod router;
pub mod spawn;
pub mod tokio_tls;
pub mod tools;
pub mod tp_cancel;
pub mod tp_session;

pub use catalog::BranchSpec;
pub use certs::Certs;
pub use clients::{psycopg_query, ClientError, Conninfo, SslNegotiation};
pub use etcd::EtcdServer;
pub use pg::{PgServer, ADMIN_PASSWORD, ADMIN_USER};
pub use pool_config::PoolSettings;
pub use router::TestRouter;
pub use tools::{free_port, pg_bin, psql_bin, python, run_python};
