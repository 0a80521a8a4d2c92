//! The router started in-process on `127.0.0.1:0`.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;

use tempfile::TempDir;

use crate::catalog::{catalog_toml, router_toml, BranchSpec};
use crate::certs::Certs;

/// The catalog's file name inside the router's directory.
const CATALOG_FILE: &str = "catalog.toml";
/// The router configuration's file name inside the router's directory.
const CONFIG_FILE: &str = "router.toml";

/// A router running in this process, with its config and catalog files in a temp dir.
///
/// Dropping it shuts the router down.
pub struct TestRouter {
    dir: TempDir,
    router: Option<branchgate::Router>,
}

impl TestRouter {
    /// Writes router.toml and catalog.toml for `branches` and starts the router.
    pub fn start(certs: &Certs, branches: &[BranchSpec]) -> TestRouter {
        TestRouter::start_with(certs, branches, "")
    }

    /// As [`TestRouter::start`], with `extra` appended to router.toml. router.toml ends inside
    /// its `[timeouts]` table, so `extra` may begin with more timeouts before its own tables:
    /// `"handshake = \"1s\"\n[limits]\nmax_client_connections = 5\n"`.
    pub fn start_with(certs: &Certs, branches: &[BranchSpec], extra: &str) -> TestRouter {
        TestRouter::start_with_config(certs, branches, |text| text + extra)
    }

    /// As [`TestRouter::start`], with router.toml rewritten by `edit` (e.g. a timeout replaced).
    pub fn start_with_config(
        certs: &Certs,
        branches: &[BranchSpec],
        edit: impl FnOnce(String) -> String,
    ) -> TestRouter {
        // BRANCHGATE_TEST_LOG=branchgate=debug shows the router's log (as BRANCHGATE_LOG does
        // for the binary), for a test being debugged.
        if let Ok(filter) = std::env::var("BRANCHGATE_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::Builder::new()
            .prefix("bg-router-")
            .tempdir()
            .expect("create temp dir");
        crate::leftovers::remove_at_exit(dir.path());
        fs::write(dir.path().join(CATALOG_FILE), catalog_toml(branches)).expect("write catalog");
        let text = edit(router_toml(certs, CATALOG_FILE));
        fs::write(dir.path().join(CONFIG_FILE), &text).expect("write router config");
        let config = branchgate::config::Config::parse(&text, dir.path(), CONFIG_FILE)
            .unwrap_or_else(|e| panic!("router config rejected: {e}\n{text}"));
        let router = branchgate::start(config).unwrap_or_else(|e| panic!("router start: {e}"));
        TestRouter {
            dir,
            router: Some(router),
        }
    }

    /// The direct (session) listener's address.
    pub fn direct_addr(&self) -> SocketAddr {
        self.router().direct_addr()
    }

    /// The pooled (transaction) listener's address.
    pub fn pooled_addr(&self) -> SocketAddr {
        self.router()
            .pooled_addr()
            .expect("router.toml configures the pooled port")
    }

    /// Rewrites the catalog and reloads it, panicking if the router rejects it.
    pub fn set_catalog(&self, branches: &[BranchSpec]) {
        fs::write(self.dir.path().join(CATALOG_FILE), catalog_toml(branches))
            .expect("write catalog");
        self.router()
            .reload_catalog()
            .unwrap_or_else(|e| panic!("catalog reload: {e}"));
    }

    /// The path of router.toml.
    pub fn config_path(&self) -> std::path::PathBuf {
        self.dir.path().join(CONFIG_FILE)
    }

    /// The running router.
    pub fn router(&self) -> &branchgate::Router {
        self.router.as_ref().expect("router already shut down")
    }

    /// Starts a graceful shutdown (stop accepting, drain, close the rest) on another thread;
    /// join the handle to wait for its end.
    pub fn shutdown_in_background(&mut self) -> std::thread::JoinHandle<()> {
        let router = self.router.take().expect("router already shut down");
        std::thread::spawn(move || router.shutdown())
    }

    /// The directory holding router.toml and catalog.toml.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestRouter {
    fn drop(&mut self) {
        if let Some(router) = self.router.take() {
            router.shutdown();
        }
        crate::leftovers::forget(self.dir.path());
    }
}
