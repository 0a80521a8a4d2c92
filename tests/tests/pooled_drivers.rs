//! The pooled port with the drivers whose habits most often break on a transaction pooler, run
//! for real against PostgreSQL 15 over TLS: asyncpg (PyPI; every statement prepared under names
//! every connection shares, `executemany` pipelines, binary COPY, a pool that resets each
//! connection at release) and pgjdbc (Debian's libpostgresql-jdbc-java; server-side statements
//! from the fifth execution, batches under one Sync, savepoints, portals fetched in pieces, the
//! CopyManager, `setTransactionIsolation`) and Postgres.js (npm; one pool of five connections
//! shared by concurrent tasks, so prepared statements are pipelined, a cursor fetched with row
//! limits and no Sync between them, COPY) and node-postgres (npm; its pipelined and serial
//! clients, the unnamed statement of every parameterised query, a named statement parsed once
//! per client, pg-cursor's portal read with Flush, pg-copy-streams; run on the direct port too,
//! so its lines are PostgreSQL's own answers). Several clients share a pool smaller than their
//! number; each checks its own results and prints one line per part, which the test compares.
//! And each driver across a DDL that changes a prepared statement's row type: it must get
//! PostgreSQL's 0A000 and prepare again (node-postgres never does, and keeps getting 0A000 as
//! on PostgreSQL), not rows it reads with the old description.
//!
//! One PostgreSQL server per binary; each test starts its own router (one worker, so that
//! `pool_size` is the branch's whole budget) and uses a role of its own, so that its backends
//! can be counted apart from the other test's.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use branchgate_e2e::pg::BackendSampler;
use branchgate_e2e::tools::{
    node_succeeded, python, run_node, spawn_java, spawn_node, wait_with_deadline,
};
use branchgate_e2e::{run_python, BranchSpec, Certs, PgServer, PoolSettings, TestRouter};

const BRANCH: &str = "b1";
/// asyncpg's role, as PostgreSQL knows it and with the branch as the router's clients name it.
const ASYNCPG_ROLE: &str = "apg";
const ASYNCPG_USER: &str = "apg.b1";
const ASYNCPG_PASSWORD: &str = "pscale_pw_drivers_apg_R7q";
/// asyncpg's role for the DDL test (which owns its table).
const SQLA_ROLE: &str = "sqla";
const SQLA_USER: &str = "sqla.b1";
const SQLA_PASSWORD: &str = "pscale_pw_drivers_sqla_T3w";
const DDL_ROLE: &str = "apgddl";
const DDL_USER: &str = "apgddl.b1";
const DDL_PASSWORD: &str = "pscale_pw_drivers_ddl_T3n";
/// Postgres.js's role.
const POSTGRESJS_ROLE: &str = "pjs";
const POSTGRESJS_USER: &str = "pjs.b1";
const POSTGRESJS_PASSWORD: &str = "pscale_pw_drivers_pjs_Q8v";
/// node-postgres's role (which owns its tables for the DDL part).
const NODE_PG_ROLE: &str = "npg";
const NODE_PG_USER: &str = "npg.b1";
const NODE_PG_PASSWORD: &str = "pscale_pw_drivers_npg_W5k";
/// pgjdbc's role.
const JDBC_ROLE: &str = "jdbc";
const JDBC_USER: &str = "jdbc.b1";
const JDBC_PASSWORD: &str = "pscale_pw_drivers_jdbc_M2x";

/// Backends in each test's pool, and the clients sharing them.
const POOL_SIZE: u32 = 2;
const CLIENTS: usize = 5;
/// Executions of each repeated statement per client (pgjdbc prepares from the fifth).
const ROUNDS: usize = 12;
/// How long a driver's client may run before the test calls it stuck.
const CLIENT_DEADLINE: Duration = Duration::from_secs(180);

/// asyncpg: the statement cache, prepared statements, transactions, executemany, binary COPY,
/// a cursor, an enum, SET and RESET, a multi-statement query, asyncpg's pool.
const ASYNCPG_WORK: &str = include_str!("clients/pooled_asyncpg.py");
/// asyncpg: a statement prepared before a DDL that changes its row shape, run again after it.
const ASYNCPG_DDL: &str = include_str!("clients/pooled_asyncpg_ddl.py");
/// SQLAlchemy's ORM on asyncpg: bulk inserts, selectinload, updates, a rollback.
const SQLALCHEMY_WORK: &str = include_str!("clients/pooled_sqlalchemy.py");

struct Fixture {
    certs: Certs,
    pg: PgServer,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let pg = PgServer::start_primary();
        pg.create_role(ASYNCPG_ROLE, ASYNCPG_PASSWORD);
        pg.create_role(JDBC_ROLE, JDBC_PASSWORD);
        pg.create_role(DDL_ROLE, DDL_PASSWORD);
        pg.create_role(SQLA_ROLE, SQLA_PASSWORD);
        pg.create_role(POSTGRESJS_ROLE, POSTGRESJS_PASSWORD);
        pg.create_role(NODE_PG_ROLE, NODE_PG_PASSWORD);
        pg.psql_admin(
            "CREATE TABLE pooled_items (client text NOT NULL, n int NOT NULL); \
             GRANT ALL ON pooled_items TO apg, jdbc, pjs, npg; \
             GRANT CREATE ON SCHEMA public TO apgddl, jdbc, pjs, npg, sqla; \
             CREATE TYPE mood AS ENUM ('sad', 'happy')",
        );
        pg.create_marked_schemas(&["s1", "s2"], "apg, jdbc");
        Fixture {
            certs: Certs::generate(),
            pg,
        }
    })
}

impl Fixture {
    /// A router of its own with a pool of [`POOL_SIZE`] for `role` on branch b1.
    fn router(&self, role: &str) -> TestRouter {
        let branch =
            BranchSpec::new(BRANCH, self.pg.addr()).role(role, &self.pg.role_verifier(role));
        PoolSettings::new(POOL_SIZE).start(&self.certs, &[branch])
    }
}

/// Waits for every client, checks it succeeded and printed `expected(k)`, and that `role` never
/// had more than the pool's backends while they ran.
fn check_clients(
    role: &str,
    sampler: BackendSampler,
    children: Vec<(usize, Child)>,
    expected: impl Fn(usize) -> String,
) {
    let mut failures = Vec::new();
    for (k, child) in children {
        let output = wait_with_deadline(child, &format!("{role} client {k}"), CLIENT_DEADLINE);
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || stdout != expected(k) {
            failures.push(format!(
                "client {k} ({}):\n--- stdout:\n{stdout}--- expected:\n{}--- stderr:\n{}",
                output.status,
                expected(k),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    let (peak, samples) = sampler.stop();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        (1..=POOL_SIZE as usize).contains(&peak),
        "{role}: {peak} backends at once ({samples} samples) for a pool of {POOL_SIZE}"
    );
}

/// Starts [`CLIENTS`] clients running the Python `script` against `router`'s pooled port, each
/// given the port, `user`, `password`, the CA file, its number k and [`ROUNDS`].
fn python_clients(
    f: &Fixture,
    router: &TestRouter,
    script: &str,
    user: &str,
    password: &str,
) -> Vec<(usize, Child)> {
    let port = router.pooled_addr().port().to_string();
    let ca = f.certs.ca_path();
    (1..=CLIENTS)
        .map(|k| {
            let child = Command::new(python())
                .arg("-c")
                .arg(script)
                .args([&port, user, password])
                .arg(&ca)
                .args([&k.to_string(), &ROUNDS.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run python");
            (k, child)
        })
        .collect()
}

#[test]
fn asyncpg_clients_sharing_a_pool_of_two_keep_their_statements_settings_and_copies() {
    let f = fixture();
    let router = f.router(ASYNCPG_ROLE);
    let sampler = BackendSampler::start(&f.pg, ASYNCPG_ROLE);
    let children = python_clients(f, &router, ASYNCPG_WORK, ASYNCPG_USER, ASYNCPG_PASSWORD);
    check_clients(ASYNCPG_ROLE, sampler, children, |k| {
        let moods = if k % 2 == 1 {
            "['happy', 'sad']"
        } else {
            "['sad']"
        };
        format!(
            "a{k} cached {ROUNDS}\n\
             a{k} prepared {ROUNDS} ['?column?', 'text']\n\
             a{k} transactions {ROUNDS} 22012\n\
             a{k} executemany {} 23502\n\
             a{k} copy 200 True\n\
             a{k} cursor True\n\
             a{k} enum {moods}\n\
             a{k} set True True\n\
             a{k} script 2\n\
             a{k} pool True {}\n",
            ROUNDS + 50,
            ROUNDS + 1
        )
    });
}

/// SQLAlchemy 2.0's ORM on asyncpg, the pairing PgBouncer users most often report prepared
/// statement errors with (asyncpg's names are the same in every client): five clients with
/// pools of their own on a router pool of two; each bulk-inserts 3,000 rows through
/// insertmanyvalues (a prepared INSERT of 3,000 parameters, its Parse over 20 KiB), then runs
/// ORM transactions (selectinload, filters, updates), AUTOCOMMIT statements (sqlalchemy
/// #12836) and a transaction that fails.
#[test]
fn sqlalchemy_asyncpg_clients_bulk_insert_and_query_through_a_pool_of_two() {
    let f = fixture();
    let router = f.router(SQLA_ROLE);
    let sampler = BackendSampler::start(&f.pg, SQLA_ROLE);
    let children = python_clients(f, &router, SQLALCHEMY_WORK, SQLA_USER, SQLA_PASSWORD);
    check_clients(SQLA_ROLE, sampler, children, |k| {
        format!(
            "q{k} bulk 3000\n\
             q{k} orm {ROUNDS}\n\
             q{k} autocommit {ROUNDS}\n\
             q{k} rollback 22012 0\n"
        )
    });
}

#[test]
fn pgjdbc_clients_sharing_a_pool_of_two_keep_their_statements_batches_and_isolation() {
    let f = fixture();
    let router = f.router(JDBC_ROLE);
    let sampler = BackendSampler::start(&f.pg, JDBC_ROLE);
    let port = router.pooled_addr().port().to_string();
    let ca = f.certs.ca_path();
    let ca = ca.to_str().expect("UTF-8 temp path");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/PooledJdbc.java");
    let children = (1..=CLIENTS)
        .map(|k| {
            let args = [
                port.as_str(),
                JDBC_USER,
                JDBC_PASSWORD,
                ca,
                &k.to_string(),
                &ROUNDS.to_string(),
            ];
            (k, spawn_java(&source, &args))
        })
        .collect();
    check_clients(JDBC_ROLE, sampler, children, |k| {
        format!(
            "j{k} prepared {ROUNDS}\n\
             j{k} transactions {} 22012\n\
             j{k} batch {} 23502\n\
             j{k} cursor true\n\
             j{k} copy 200 200 5000 5199\n\
             j{k} isolation true\n\
             j{k} set true jdbc-{k}\n\
             j{k} metadata [client, n]\n\
             j{k} ddl [{k}, {k}, {k}.5, {k}.5, {k}.5]\n",
            ROUNDS + 2,
            ROUNDS + 52
        )
    });
}

#[test]
fn asyncpg_prepares_again_after_a_ddl_changes_a_statements_row_type() {
    let f = fixture();
    let router = f.router(DDL_ROLE);
    let port = router.pooled_addr().port().to_string();
    let ca = f.certs.ca_path();
    let ca = ca.to_str().expect("UTF-8 temp path");
    let out = run_python(ASYNCPG_DDL, &[&port, DDL_USER, DDL_PASSWORD, ca]);
    // What asyncpg reads on PostgreSQL itself (its retry after 0A000 is silent outside a
    // block, and raised inside one).
    assert_eq!(
        out,
        "before [(1,)] True\n\
         after [(1.5,)]\n\
         in a block InvalidCachedStatementError 0A000\n\
         then [(Decimal('1.5'),)]\n\
         written [1.0, 1.0]\n"
    );
}

#[test]
fn postgresjs_pipelines_prepared_statements_transactions_cursors_and_copy_on_a_pool_of_two() {
    let f = fixture();
    let router = f.router(POSTGRESJS_ROLE);
    let sampler = BackendSampler::start(&f.pg, POSTGRESJS_ROLE);
    let port = router.pooled_addr().port().to_string();
    let ca = f.certs.ca_path();
    let ca = ca.to_str().expect("UTF-8 temp path");
    let tasks = "12";
    let args = [
        port.as_str(),
        POSTGRESJS_USER,
        POSTGRESJS_PASSWORD,
        ca,
        tasks,
    ];
    let out = run_node("pooled_postgresjs.mjs", &args, CLIENT_DEADLINE);
    let (peak, samples) = sampler.stop();
    // What Postgres.js reads on PostgreSQL itself (its retry after the DDL's 0A000 is silent).
    assert_eq!(
        out,
        "pipelined true 12\n\
         transactions 6 22012\n\
         cursor 500500\n\
         copy 200 5000 5199\n\
         script 2\n\
         ddl 1 1.5\n"
    );
    assert!(
        (1..=POOL_SIZE as usize).contains(&peak),
        "{peak} backends at once ({samples} samples) for a pool of {POOL_SIZE}"
    );
}

/// Runs node-postgres's script twice at once on `port`: a pool of pipelined clients over direct
/// SSL (rows tagged n1) and a pool of serial ones after an SSLRequest (n2); checks both printed
/// what PostgreSQL gives.
fn node_postgres_on(f: &Fixture, port: u16) {
    const SCRIPT: &str = "pooled_node_postgres.mjs";
    let port = port.to_string();
    let ca = f.certs.ca_path();
    let ca = ca.to_str().expect("UTF-8 temp path");
    let runs = [("direct", "n1", "pipeline"), ("postgres", "n2", "serial")];
    let children: Vec<_> = runs
        .iter()
        .map(|&(negotiation, tag, mode)| {
            let args = [
                port.as_str(),
                NODE_PG_USER,
                NODE_PG_PASSWORD,
                ca,
                negotiation,
                tag,
                mode,
                "12",
            ];
            spawn_node(SCRIPT, &args)
        })
        .collect();
    for (child, (_, tag, mode)) in children.into_iter().zip(runs) {
        let out = node_succeeded(child, SCRIPT, CLIENT_DEADLINE);
        assert_eq!(
            out,
            "unnamed true\n\
             named true\n\
             transactions 5 22012 25P02\n\
             script 2\n\
             settings T-lima=America/Lima/0 T-tokyo=Asia/Tokyo/4321ms\n\
             cursor 500500\n\
             copy 200 5000 5199\n\
             ddl 1 0A000 1.5 1.5\n",
            "{tag} ({mode}) on port {port}"
        );
    }
}

#[test]
fn node_postgres_pipelined_and_serial_pools_read_what_postgresql_answers_on_a_pool_of_two() {
    let f = fixture();
    let router = f.router(NODE_PG_ROLE);
    // The direct port first: a session per client, so PostgreSQL's own answers, the DDL's
    // 0A000 on every client that parsed the statement before it included.
    node_postgres_on(f, router.direct_addr().port());
    let sampler = BackendSampler::start(&f.pg, NODE_PG_ROLE);
    node_postgres_on(f, router.pooled_addr().port());
    let (peak, samples) = sampler.stop();
    assert!(
        (1..=POOL_SIZE as usize).contains(&peak),
        "{peak} backends at once ({samples} samples) for a pool of {POOL_SIZE}"
    );
}
