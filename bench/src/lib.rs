//! Fixtures for branchgate's criterion benches (`bench/benches/`): realistic inputs, built once
//! outside the timed loops and unit-tested here, so a bench measures the router and not its
//! own set-up.
//!
//! Run all benches with `cargo bench -p branchgate-bench`, one with `--bench NAME`, a quick
//! look with `-- --quick`; add `--features ring` for the ring TLS provider.
//!
//! # Layout
//! - [`wire`]: a libpq StartupMessage and a stream of result-set frames.
//! - [`catalog`]: catalog TOML with any number of branches.
//! - [`scram`]: one SCRAM exchange precomputed on the client side.
//! - [`tls`]: certificates, rustls configurations like the router's, and an in-memory handshake.
//! - [`router_tls`]: the router's own handshake and record layer, in memory.

pub mod catalog;
pub mod router_tls;
pub mod scram;
pub mod tls;
pub mod wire;
