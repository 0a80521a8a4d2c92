//! Setup shared by the integration tests: one PostgreSQL primary behind the in-process router.

use branchgate_e2e::{BranchSpec, Certs, PgServer, TestRouter};

/// The login role the tests use, on the server and (as `app.<branch>`) through the router.
pub const ROLE: &str = "app";

/// A primary with [`ROLE`] behind a router that serves it as each branch. Fields drop in order:
/// the router stops before the server does.
pub struct Setup {
    /// The router, TLS with [`Setup::certs`].
    pub router: TestRouter,
    /// The router's certificates.
    pub certs: Certs,
    /// The primary.
    #[allow(
        dead_code,
        reason = "each test binary compiles this; only some read the server"
    )]
    pub pg: PgServer,
}

/// Starts a primary with [`ROLE`] (password `password`) and a router serving it as `branches`.
pub fn router_on_primary(password: &str, branches: &[&str]) -> Setup {
    let pg = PgServer::start_primary();
    pg.create_role(ROLE, password);
    let verifier = pg.role_verifier(ROLE);
    let certs = Certs::generate();
    let specs: Vec<BranchSpec> = branches
        .iter()
        .map(|id| BranchSpec::new(id, pg.addr()).role(ROLE, &verifier))
        .collect();
    let router = TestRouter::start(&certs, &specs);
    Setup { router, certs, pg }
}
