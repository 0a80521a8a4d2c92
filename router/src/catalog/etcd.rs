//! The catalog in etcd: one catalog for a fleet of routers (`catalog = "etcd://..."`).
//!
//! - [`url`]: the `etcd://host:2379,host:2379/prefix` URL of router.toml's `catalog`.
//! - [`layout`]: the keys under the prefix, and how they make a [`Catalog`](super::Catalog)
//!   (through the same builder as a file) or a TOML catalog file.
//! - [`store`]: the reads and guarded writes: a snapshot of the catalog, a role's verifier set
//!   under a lock and its key's revision, a file imported in one transaction.
//! - [`follow`]: the control-plane thread of a running router: one range read, then a watch from
//!   the next revision; every change goes through the router's one reload path (and its guard).
//! - [`command`]: `branchgate catalog import|export`.
//!
//! The etcd client is tonic on tokio. It runs only on the control-plane thread (and in the
//! short-lived commands), each with a current-thread runtime of its own: the workers stay on
//! monoio and never see a tokio type.

pub mod command;
pub mod follow;
pub mod layout;
pub mod store;
pub mod url;

pub use follow::{FirstRead, Follower, Latest};
pub use layout::{CatalogKey, Entry, Layout, Snapshot};
pub use store::{EtcdError, Store};
pub use url::{Endpoint, EtcdUrl, EtcdUrlError};
