//! The hand-off (`steering = "userspace"`, two workers): an authenticated client accepted by
//! the worker that does not own its branch is moved to the owner, TLS session and all, and
//! neither it nor PostgreSQL notices. The kernel's hash chooses the accepting worker, so a
//! test that needs a handed-off client connects until `branchgate_handoffs_total` (scraped
//! from `/metrics`) says one was: each connection has an even chance.
//!
//! One PostgreSQL server per binary; every test starts its own router.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use branchgate::auth::{ClientCredentials, ScramClient};
use branchgate_e2e::metrics;
use branchgate_e2e::pg::BackendSampler;
use branchgate_e2e::raw::{self, Tls, MODES};
use branchgate_e2e::tokio_tls::{block_on, sqlstate, tp_connect_with, wait_active, MakeRustls};
use branchgate_e2e::tools::{psql_command, psql_output};
use branchgate_e2e::{
    BranchSpec, Certs, Conninfo, PgServer, PoolSettings, TestRouter, ADMIN_PASSWORD, ADMIN_USER,
};
use tokio_postgres::config::{SslMode, SslNegotiation as TpNegotiation};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls};

const BRANCH: &str = "handed";
const ROLE: &str = "mover";
const USER: &str = "mover.handed";
const PASSWORD: &str = "pscale_pw_handoff_Qe7";
/// The role of the test that counts backends, used by nothing else.
const COUNTED_ROLE: &str = "counted";
const COUNTED_USER: &str = "counted.handed";
const COUNTED_PASSWORD: &str = "pscale_pw_handoff_counted_Lm2";

/// The branch's pool size: the whole branch's, once its clients meet on one worker.
const POOL_SIZE: u32 = 2;
/// Pooled clients at once, on both workers.
const CLIENTS: usize = 16;
/// Transactions per pooled client.
const TRANSACTIONS: usize = 40;
/// Connections tried before a test gives up on getting one handed off (each has an even
/// chance: 2^-40 of failing for no reason).
const MAX_TRIES: usize = 40;

struct Fixture {
    certs: Certs,
    pg: PgServer,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let pg = PgServer::start_primary();
        pg.create_role(ROLE, PASSWORD);
        pg.create_role(COUNTED_ROLE, COUNTED_PASSWORD);
        pg.psql_admin(&format!(
            "CREATE TABLE moved (client int NOT NULL, n int NOT NULL); \
             GRANT ALL ON moved TO {ROLE}, {COUNTED_ROLE}"
        ));
        Fixture {
            certs: Certs::generate(),
            pg,
        }
    })
}

impl Fixture {
    /// A router with `steering` (`"userspace"` or `"off"`), two workers, the pooled port with
    /// [`POOL_SIZE`], and `/metrics`.
    fn router(&self, steering: &str) -> TestRouter {
        let branch = BranchSpec::new(BRANCH, self.pg.addr())
            .role(ROLE, &self.pg.role_verifier(ROLE))
            .role(COUNTED_ROLE, &self.pg.role_verifier(COUNTED_ROLE));
        let mut settings = PoolSettings::new(POOL_SIZE);
        settings.workers = 2;
        TestRouter::start_with_config(&self.certs, &[branch], |text| {
            // A startup timeout for a busy machine: SCRAM in a debug build is slow, and the
            // load tests log many clients in at once.
            let text = settings
                .apply(text)
                .replace(
                    "pooled = \"127.0.0.1:0\"\n",
                    "pooled = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n",
                )
                .replace("startup = \"3s\"\n", "startup = \"20s\"\n");
            assert!(
                text.contains("startup = \"20s\""),
                "router_toml changed: {text}"
            );
            format!("steering = \"{steering}\"\n{text}")
        })
    }

    fn tp_config_as(
        &self,
        addr: SocketAddr,
        negotiation: TpNegotiation,
        user: &str,
        password: &str,
    ) -> Config {
        let mut config = Config::new();
        config
            .host("localhost")
            .hostaddr(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .port(addr.port())
            .user(user)
            .password(password)
            .dbname("postgres")
            .ssl_mode(SslMode::Require)
            .ssl_negotiation(negotiation)
            .connect_timeout(Duration::from_secs(10));
        config
    }

    async fn tp_connect(&self, addr: SocketAddr, negotiation: TpNegotiation) -> Client {
        self.tp_connect_as(addr, negotiation, USER, PASSWORD).await
    }

    async fn tp_connect_as(
        &self,
        addr: SocketAddr,
        negotiation: TpNegotiation,
        user: &str,
        password: &str,
    ) -> Client {
        tp_connect_with(
            &self.tp_config_as(addr, negotiation, user, password),
            MakeRustls::new(self.certs.client_config()),
        )
        .await
        .expect("tokio-postgres connects through the router")
    }

    fn admin_dsn(&self) -> String {
        Conninfo::new(self.pg.addr())
            .user(ADMIN_USER)
            .password(ADMIN_PASSWORD)
            .no_tls()
            .to_string()
    }

    async fn tp_admin(&self) -> Client {
        let config: Config = self.admin_dsn().parse().expect("admin conninfo");
        let (client, connection) = config.connect(NoTls).await.expect("admin connects");
        tokio::spawn(connection);
        client
    }
}

/// The router's `/metrics` page.
fn scrape(router: &TestRouter) -> String {
    metrics::scrape(
        router
            .router()
            .admin_addr()
            .expect("the admin endpoint runs"),
    )
}

/// Hand-offs (out, in) on all workers, from `/metrics`.
fn handoffs(router: &TestRouter) -> (u64, u64) {
    let text = scrape(router);
    let sum = |direction: &str| -> u64 {
        let label = format!("direction=\"{direction}\"");
        let lines: Vec<u64> = text
            .lines()
            .filter(|line| line.starts_with("branchgate_handoffs_total{") && line.contains(&label))
            .map(|line| {
                let (_, value) = line.rsplit_once(' ').expect("a sample has a value");
                value.parse::<u64>().expect("a whole count")
            })
            .collect();
        assert_eq!(lines.len(), 2, "one sample per worker: {text}");
        lines.iter().sum()
    };
    (sum("out"), sum("in"))
}

/// Waits until every hand-off sent has been taken (the owner counts it when it does).
fn settled_handoffs(router: &TestRouter) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (out, into) = handoffs(router);
        if out == into || Instant::now() >= deadline {
            return (out, into);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `CLIENTS` pooled clients at once, each running `TRANSACTIONS` transactions (a block with an
/// insert and a read of its own rows, and an autocommit statement), half of them over direct
/// TLS, as `(user, password)`. Returns once all are done.
async fn pooled_load(f: &Fixture, router: &TestRouter, tag: i32, (user, password): (&str, &str)) {
    let addr = router.pooled_addr();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let negotiation = if c % 2 == 0 {
            TpNegotiation::Postgres
        } else {
            TpNegotiation::Direct
        };
        let mut client = f.tp_connect_as(addr, negotiation, user, password).await;
        let id = tag * 1000 + i32::try_from(c).expect("few clients");
        tasks.push(tokio::spawn(async move {
            for n in 0..TRANSACTIONS {
                let n = i32::try_from(n).expect("few transactions");
                let tx = client.transaction().await.expect("BEGIN");
                tx.execute("INSERT INTO moved VALUES ($1, $2)", &[&id, &n])
                    .await
                    .expect("insert");
                let count: i64 = tx
                    .query_one("SELECT count(*) FROM moved WHERE client = $1", &[&id])
                    .await
                    .expect("count")
                    .get(0);
                assert_eq!(count, i64::from(n) + 1, "client {id}: its own rows");
                tx.commit().await.expect("COMMIT");
                let echoed: i32 = client
                    .query_one("SELECT $1::int + 1", &[&n])
                    .await
                    .expect("autocommit")
                    .get(0);
                assert_eq!(echoed, n + 1);
            }
        }));
    }
    for task in tasks {
        task.await.expect("a client's transactions");
    }
}

#[test]
fn a_branchs_pooled_clients_share_one_pool_of_pool_size_backends_on_its_owner() {
    let f = fixture();
    let router = f.router("userspace");
    assert_eq!(
        router.router().steering().mode(),
        branchgate::steering::SteeringMode::Userspace
    );
    let sampler = BackendSampler::start(&f.pg, COUNTED_ROLE);
    block_on(pooled_load(f, &router, 1, (COUNTED_USER, COUNTED_PASSWORD)));
    let (peak, samples) = sampler.stop();
    assert!(samples > 10, "the sampler ran ({samples} samples)");
    assert!(
        peak <= POOL_SIZE as usize,
        "{peak} backends for the role: the branch's clients did not share one pool of \
         {POOL_SIZE} (pools per worker would allow {})",
        2 * POOL_SIZE
    );
    let (out, into) = settled_handoffs(&router);
    assert_eq!(out, into, "every hand-off sent was taken");
    assert!(
        out >= 1,
        "{CLIENTS} clients on two workers and none handed off"
    );
    assert!(
        out < CLIENTS as u64,
        "{out} of {CLIENTS} clients handed off: some must have landed on the owner"
    );
    // Each one taken over was timed, from leaving the accepting worker to arriving.
    let text = scrape(&router);
    let timed = metrics::sample(&text, "branchgate_handoff_seconds_count", &[]) as u64;
    assert_eq!(timed, into, "{text}");
    let seconds = metrics::sample(&text, "branchgate_handoff_seconds_sum", &[]);
    assert!(
        seconds > 0.0 && seconds < into as f64,
        "{into} hand-offs took {seconds} s"
    );
}

/// Connects with `connect` until a connection is handed off; returns it (the others are
/// dropped).
async fn handed_off<T, F, Fut>(router: &TestRouter, mut connect: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    for _ in 0..MAX_TRIES {
        let (before, _) = handoffs(router);
        let connection = connect().await;
        let (after, _) = handoffs(router);
        if after > before {
            return connection;
        }
    }
    panic!("{MAX_TRIES} connections and none handed off");
}

#[test]
fn a_handed_off_direct_session_relays_over_both_tls_modes_and_can_be_canceled() {
    let f = fixture();
    let router = f.router("userspace");
    let addr = router.direct_addr();
    block_on(async {
        let admin = f.tp_admin().await;
        for negotiation in [TpNegotiation::Postgres, TpNegotiation::Direct] {
            let client = handed_off(&router, || f.tp_connect(addr, negotiation)).await;
            // A session: the same backend throughout, its state kept.
            let pid: i32 = client
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .expect("pid")
                .get(0);
            client
                .batch_execute("SET application_name = 'moved'; CREATE TEMP TABLE t (v text)")
                .await
                .expect("session state");
            for n in 0..100 {
                let v = format!("row {n}");
                client
                    .execute("INSERT INTO t VALUES ($1)", &[&v])
                    .await
                    .expect("insert");
            }
            let row = client
                .query_one(
                    "SELECT pg_backend_pid(), current_setting('application_name'), count(*) \
                     FROM t",
                    &[],
                )
                .await
                .expect("read back");
            assert_eq!(row.get::<_, i32>(0), pid, "{negotiation:?}: one backend");
            assert_eq!(row.get::<_, &str>(1), "moved");
            assert_eq!(row.get::<_, i64>(2), 100);
            // Larger than a record both ways.
            let big = "x".repeat(100_000);
            let echoed: String = client
                .query_one("SELECT $1::text || 'y'", &[&big])
                .await
                .expect("echo")
                .get(0);
            assert_eq!(echoed.len(), big.len() + 1);
            // A cancel (a new connection, on any worker) reaches the handed-off session's
            // backend. (Each test sleeps for its own time: the pooled one finds its backend by
            // the query's text.)
            let client = Arc::new(client);
            let sleeper = tokio::spawn({
                let client = client.clone();
                async move { client.simple_query("SELECT pg_sleep(30)").await.map(drop) }
            });
            wait_active(&admin, pid, "SELECT pg_sleep(30)").await;
            client
                .cancel_token()
                .cancel_query(MakeRustls::new(f.certs.client_config()))
                .await
                .expect("send the cancel request");
            let error = tokio::time::timeout(Duration::from_secs(5), sleeper)
                .await
                .expect("the cancel ends the query")
                .expect("query task")
                .expect_err("the query is canceled");
            assert_eq!(
                sqlstate(&error),
                &SqlState::QUERY_CANCELED,
                "{negotiation:?}"
            );
            let after: i32 = client
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .expect("after the cancel")
                .get(0);
            assert_eq!(after, pid);
        }
    });
}

#[test]
fn a_handed_off_pooled_client_lives_through_many_transactions_and_can_be_canceled() {
    let f = fixture();
    let router = f.router("userspace");
    let addr = router.pooled_addr();
    block_on(async {
        let admin = f.tp_admin().await;
        for negotiation in [TpNegotiation::Postgres, TpNegotiation::Direct] {
            let mut client = handed_off(&router, || f.tp_connect(addr, negotiation)).await;
            let statement = client.prepare("SELECT $1::int * 2").await.expect("prepare");
            for n in 0..200i32 {
                let tx = client.transaction().await.expect("BEGIN");
                let doubled: i32 = tx
                    .query_one(&statement, &[&n])
                    .await
                    .expect("prepared statement across transactions")
                    .get(0);
                assert_eq!(doubled, 2 * n);
                tx.commit().await.expect("COMMIT");
            }
            let client = Arc::new(client);
            let sleeper = tokio::spawn({
                let client = client.clone();
                async move { client.simple_query("SELECT pg_sleep(31)").await.map(drop) }
            });
            let deadline = Instant::now() + Duration::from_secs(5);
            let pid: i32 = loop {
                let row = admin
                    .query_opt(
                        "SELECT pid FROM pg_stat_activity WHERE usename = $1 \
                         AND query = 'SELECT pg_sleep(31)' AND state = 'active'",
                        &[&ROLE],
                    )
                    .await
                    .expect("pg_stat_activity");
                if let Some(row) = row {
                    break row.get(0);
                }
                assert!(Instant::now() < deadline, "the sleep never ran");
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            client
                .cancel_token()
                .cancel_query(MakeRustls::new(f.certs.client_config()))
                .await
                .expect("send the cancel request");
            let error = tokio::time::timeout(Duration::from_secs(5), sleeper)
                .await
                .expect("the cancel ends the query")
                .expect("query task")
                .expect_err("the query is canceled");
            assert_eq!(sqlstate(&error), &SqlState::QUERY_CANCELED, "backend {pid}");
            let row = client
                .query_one("SELECT 'still here'", &[])
                .await
                .expect("after the cancel");
            assert_eq!(row.get::<_, &str>(0), "still here");
        }
    });
}

#[test]
fn psql_through_a_handed_off_direct_session() {
    let f = fixture();
    let router = f.router("userspace");
    let conninfo = Conninfo::new(router.direct_addr())
        .user(USER)
        .password(PASSWORD)
        .param("sslmode", "require")
        .to_string();
    let script = "CREATE TEMP TABLE p AS SELECT g FROM generate_series(1, 5000) g; \
                  SELECT count(*), sum(g) FROM p; SELECT length(repeat('z', 70000));";
    for _ in 0..MAX_TRIES {
        let (before, _) = handoffs(&router);
        let output = psql_output(
            psql_command()
                .env_clear()
                .args(["-d", &conninfo, "-c", script]),
        )
        .unwrap_or_else(|stderr| panic!("psql failed: {stderr}"));
        assert_eq!(output, "5000|12502500\n70000");
        let (after, _) = handoffs(&router);
        if after > before {
            return;
        }
    }
    panic!("{MAX_TRIES} psql sessions and none handed off");
}

/// Logs in by hand with a Query pipelined behind the last SCRAM message (in the same TLS
/// record), so that the front door has read bytes it does not use: they must move with the
/// connection. Returns the Query's answer.
fn login_with_a_pipelined_query(tls: &mut Tls, sql: &str) -> String {
    raw::start_sasl(tls, USER);
    let (mut scram, first) = ScramClient::new(ClientCredentials::Password(PASSWORD.to_owned()));
    tls.write_all(&raw::sasl_initial_response(raw::SCRAM_SHA_256, &first))
        .expect("send SASLInitialResponse");
    let server_first = raw::expect_auth(tls, raw::AUTH_SASL_CONTINUE, "server-first-message")
        .unwrap_or_else(|e| panic!("server-first-message: {e:?}"));
    let client_final = scram
        .handle_server_first(&server_first)
        .expect("valid server-first-message");
    let mut both = raw::message(b'p', &client_final);
    both.extend_from_slice(&raw::query(sql));
    tls.write_all(&both).expect("send SASLResponse and Query");
    raw::expect_auth(tls, raw::AUTH_SASL_FINAL, "server-final-message")
        .unwrap_or_else(|e| panic!("server-final-message: {e:?}"));
    raw::expect_auth(tls, raw::AUTH_OK, "AuthenticationOk")
        .unwrap_or_else(|e| panic!("AuthenticationOk: {e:?}"));
    let mut readies = 0;
    let mut value = None;
    while readies < 2 {
        match raw::next_message(tls, sql) {
            (b'Z', _) => readies += 1,
            (b'E', body) => panic!("{sql}: {:?}", raw::parse_error(&body)),
            (b'D', body) => {
                let len = i32::from_be_bytes(body[2..6].try_into().expect("4 bytes"));
                let len = usize::try_from(len).expect("not NULL");
                value = Some(String::from_utf8(body[6..6 + len].to_vec()).expect("UTF-8"));
            }
            _ => {}
        }
    }
    value.unwrap_or_else(|| panic!("{sql}: no row"))
}

/// Both ports, both TLS modes: a client whose first query came pipelined with its login is
/// handed off with it, and its TLS session goes on after the move, TLS 1.3 key updates (each
/// asking for the router's) included.
#[test]
fn pipelined_bytes_and_key_updates_survive_the_hand_off() {
    let f = fixture();
    let router = f.router("userspace");
    for addr in [router.direct_addr(), router.pooled_addr()] {
        for mode in MODES {
            let mut moved = None;
            for _ in 0..MAX_TRIES {
                let (before, _) = handoffs(&router);
                let mut tls = raw::connect_tls(addr, f.certs.client_config(), mode);
                let answer = login_with_a_pipelined_query(&mut tls, "SELECT 'pipelined'");
                assert_eq!(answer, "pipelined", "{addr} {mode:?}");
                let (after, _) = handoffs(&router);
                if after > before {
                    moved = Some(tls);
                    break;
                }
            }
            let mut tls =
                moved.unwrap_or_else(|| panic!("{MAX_TRIES} logins on {addr} and none handed off"));
            for round in 0..3 {
                tls.conn.refresh_traffic_keys().expect("client key update");
                let sql = format!("SELECT {round} + 1");
                assert_eq!(raw::query_one(&mut tls, &sql), (round + 1).to_string());
                let big = raw::query_one(&mut tls, "SELECT repeat('k', 40000)");
                assert_eq!(big.len(), 40_000, "{addr} {mode:?} round {round}");
            }
        }
    }
}

/// A shutdown drains handed-off clients like any other (they are registered on the worker that
/// serves them): at the end of the drain, each gets FATAL 57P01, on either port, mid-query.
#[test]
fn the_drain_ends_handed_off_sessions_with_57p01() {
    let f = fixture();
    let mut router = f.router("userspace");
    block_on(async {
        let mut sleepers = Vec::new();
        for addr in [router.direct_addr(), router.pooled_addr()] {
            let client = handed_off(&router, || f.tp_connect(addr, TpNegotiation::Postgres)).await;
            let sql = format!("SELECT pg_sleep(32), {}", addr.port());
            sleepers.push(tokio::spawn(async move {
                let error = client
                    .simple_query(&sql)
                    .await
                    .expect_err("the drain ends the query");
                (error, client)
            }));
        }
        // The sleeps run on their backends before the shutdown starts.
        let admin = f.tp_admin().await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let running: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 \
                     AND query LIKE 'SELECT pg_sleep(32), %' AND state = 'active'",
                    &[&ROLE],
                )
                .await
                .expect("pg_stat_activity")
                .get(0);
            if running == 2 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the sleeps never ran ({running})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let shutdown = router.shutdown_in_background();
        for sleeper in sleepers {
            let (error, _client) = tokio::time::timeout(Duration::from_secs(10), sleeper)
                .await
                .expect("the drain (1 s) ends the session")
                .expect("query task");
            assert_eq!(sqlstate(&error), &SqlState::ADMIN_SHUTDOWN, "{error:?}");
        }
        tokio::task::spawn_blocking(move || shutdown.join().expect("shutdown thread"))
            .await
            .expect("join");
    });
}

#[test]
fn with_steering_off_nothing_is_handed_off() {
    let f = fixture();
    let router = f.router("off");
    block_on(async {
        pooled_load(f, &router, 2, (USER, PASSWORD)).await;
        for _ in 0..8 {
            let client = f
                .tp_connect(router.direct_addr(), TpNegotiation::Postgres)
                .await;
            client.simple_query("SELECT 1").await.expect("query");
        }
    });
    assert_eq!(handoffs(&router), (0, 0));
}
