//! branchgate-loadgen: measures branchgate against PgBouncer and PostgreSQL in one run.
//!
//! Its own PostgreSQL client (TCP, TLS by SSLRequest or direct SSL, SCRAM-SHA-256; simple,
//! extended and prepared queries) runs thread-per-core on monoio, so two cores drive tens of
//! thousands of connections. Several targets take turns in short slices of one run, so their results are
//! ratios measured under the same noise.
//!
//! # Layout
//! - [`cli`]: the command line (clap).
//! - [`settings`]: checked settings: targets parsed and resolved, query file read, plot file
//!   created.
//! - [`source`]: idle mode's spread of source addresses over 127.0.0.0/8.
//! - [`target`]: target URLs and their TLS settings.
//! - [`client`]: the PostgreSQL client: transport, TLS, startup and SCRAM, queries.
//! - [`dist`]: branch choice per connection, uniform or Zipf.
//! - [`probe`]: the check before a run: every target, every branch, every statement.
//! - [`plan`]: slices (which target runs when) and the open-loop pacer.
//! - [`runtime`]: worker threads, one monoio runtime each.
//! - [`timer`]: a microsecond-precise sleep for the open-loop schedules.
//! - [`modes`]: `connect`, `query` and `idle`.
//! - [`stats`]: HdrHistogram latencies and per-target counts.
//! - [`report`]: tables and JSON.
//! - [`plot`]: the SVG percentile chart.
//! - [`progress`]: the progress bar.
//! - [`sys`]: open-file limit, ephemeral port range, /proc memory readings (a process, or a
//!   process and its descendants), sockets the peer closed.
//! - [`cpu`]: another process's CPU time (its CPU clock, or /proc/PID/stat).
//! - [`sampler`]: each target's server CPU time, read at its slice boundaries.

pub mod cli;
pub mod client;
pub mod cpu;
pub mod dist;
pub mod modes;
pub mod plan;
pub mod plot;
pub mod probe;
pub mod progress;
pub mod report;
pub mod runtime;
pub mod sampler;
pub mod settings;
pub mod source;
pub mod stats;
pub mod sys;
pub mod target;
pub mod timer;

mod run;

pub use run::{run, Error, Outcome};
