//! The load generator's PostgreSQL client against real PostgreSQL (plaintext, SCRAM) and
//! through the router (TLS by SSLRequest and direct SSL, SCRAM end to end). That the two TLS
//! modes really differ on the wire is proven in `tls.rs`.

use std::cell::RefCell;

use branchgate::auth::scram::SaltedPasswordCache;
use branchgate_e2e::{Certs, PgServer};
use branchgate_loadgen::client::query::{Outcome, Request};
use branchgate_loadgen::client::{connect, ClientError, Conn, ConnectOptions, Timings};
use branchgate_loadgen::runtime::block_on;
use branchgate_loadgen::target::Target;

mod common;

use common::router_on_primary;

const PASSWORD: &str = "pscale_pw_loadgen_test";

fn target(spec: &str) -> Target {
    Target::parse(spec).unwrap_or_else(|(name, e)| panic!("target {name}: {e}"))
}

async fn open(
    target: &Target,
    user: &str,
    cache: &RefCell<SaltedPasswordCache>,
) -> Result<(Conn, Timings), ClientError> {
    let options = ConnectOptions {
        target,
        user,
        source: None,
    };
    connect(options, cache).await
}

/// SELECT 1 by the simple, extended and prepared protocols (with and without parameters),
/// then an error the connection survives.
async fn queries_work(conn: &mut Conn) {
    let mut simple = Request::simple("SELECT 1");
    assert_eq!(
        conn.run(&mut simple).await.expect("simple query"),
        Outcome::Done { rows: 1 }
    );
    conn.prepare("s1", "SELECT 1").await.expect("prepare");
    let mut prepared = Request::prepared("s1", &[]);
    for _ in 0..3 {
        assert_eq!(
            conn.run(&mut prepared).await.expect("execute"),
            Outcome::Done { rows: 1 }
        );
    }
    let mut extended =
        Request::extended("SELECT g FROM generate_series(1, $1::int) g", &["3".into()]);
    for _ in 0..2 {
        assert_eq!(
            conn.run(&mut extended).await.expect("extended"),
            Outcome::Done { rows: 3 }
        );
    }
    conn.prepare("s3", "SELECT $1::int / $2::int")
        .await
        .expect("prepare with parameters");
    let mut divide = Request::prepared("s3", &["6".into(), "3".into()]);
    assert_eq!(
        conn.run(&mut divide).await.expect("bind parameters"),
        Outcome::Done { rows: 1 }
    );
    let mut by_zero = Request::prepared("s3", &["6".into(), "0".into()]);
    assert_eq!(
        conn.run(&mut by_zero).await.expect("error reply"),
        Outcome::Failed("22012: division by zero".into())
    );
    let mut bad = Request::simple("SELECT 1/0");
    assert_eq!(
        conn.run(&mut bad).await.expect("error reply"),
        Outcome::Failed("22012: division by zero".into())
    );
    let mut many = Request::simple("SELECT repeat('x', 20000) FROM generate_series(1, 50)");
    assert_eq!(
        conn.run(&mut many)
            .await
            .expect("rows larger than the buffer are skipped"),
        Outcome::Done { rows: 50 }
    );
    assert_eq!(
        conn.run(&mut prepared).await.expect("still usable"),
        Outcome::Done { rows: 1 }
    );
    let error = conn
        .prepare("s2", "SELEC 1")
        .await
        .expect_err("syntax error");
    assert!(error.to_string().contains("42601"), "{error}");
}

/// The phases follow each other; `ssl_request` is there only for SSLRequest, `tls` for TLS.
fn assert_ordered(t: &Timings, tls: bool, ssl_request: bool) {
    assert!(t.start <= t.tcp && t.tcp <= t.handshake_start(), "{t:?}");
    assert!(t.channel_ready() <= t.auth && t.auth <= t.ready, "{t:?}");
    assert_eq!(t.ssl_request.is_some(), ssl_request, "{t:?}");
    assert_eq!(t.tls.is_some(), tls, "{t:?}");
    if let Some(done) = t.tls {
        assert!(done > t.handshake_start(), "{t:?}");
    }
    assert!(
        t.auth > t.channel_ready(),
        "SCRAM takes two round trips: {t:?}"
    );
}

#[test]
fn plaintext_scram_to_postgres() {
    let pg = PgServer::start_primary();
    pg.create_role("app", PASSWORD);
    let addr = pg.addr();
    let plain = target(&format!(
        "pg=postgres://app:{PASSWORD}@{addr}/postgres?sslmode=disable"
    ));
    let wrong = target(&format!(
        "pg=postgres://app:wrong@{addr}/postgres?sslmode=disable"
    ));
    let tls = target(&format!("pg=postgres://app:{PASSWORD}@{addr}/postgres"));
    block_on(async {
        let cache = RefCell::new(SaltedPasswordCache::new());
        let (mut conn, timings) = open(&plain, "app", &cache).await.expect("login");
        assert_ordered(&timings, false, false);
        queries_work(&mut conn).await;
        conn.terminate().await;
        // The second login reuses the salted password: one cache entry.
        let (conn, _) = open(&plain, "app", &cache).await.expect("second login");
        conn.terminate().await;
        assert_eq!(cache.borrow().len(), 1);

        let error = open(&wrong, "app", &cache)
            .await
            .expect_err("wrong password");
        let ClientError::Server { code, .. } = &error else {
            panic!("not a server error: {error}");
        };
        assert_eq!(code, "28P01");
        let error = open(&tls, "app", &cache)
            .await
            .expect_err("no TLS on this server");
        assert!(matches!(error, ClientError::TlsRefused), "{error}");
    })
    .expect("runtime");
}

#[test]
fn tls_both_modes_through_the_router() {
    let setup = router_on_primary(PASSWORD, &["b1"]);
    let addr = setup.router.direct_addr();
    let ca = setup.certs.ca_path();
    let ca = ca.to_str().expect("UTF-8 path");
    let url = |params: &str| {
        target(&format!(
            "bg=postgres://app.{{branch}}:{PASSWORD}@localhost:{}/postgres?{params}",
            addr.port()
        ))
    };
    let targets = [
        url(&format!("sslmode=verify-full&sslrootcert={ca}")),
        url(&format!(
            "sslmode=verify-full&sslrootcert={ca}&sslnegotiation=direct"
        )),
        url("sslmode=require&sslnegotiation=direct"),
        url("sslmode=require"),
    ];
    block_on(async {
        let cache = RefCell::new(SaltedPasswordCache::new());
        for target in &targets {
            let user = target.user(Some("b1"));
            let (mut conn, timings) = open(target, &user, &cache)
                .await
                .unwrap_or_else(|e| panic!("{:?}: {e}", target.url));
            let direct = target.tls.as_ref().is_some_and(|t| t.direct);
            assert_ordered(&timings, true, !direct);
            queries_work(&mut conn).await;
            conn.terminate().await;
        }
        let user = targets[0].user(Some("nope"));
        let error = open(&targets[0], &user, &cache)
            .await
            .expect_err("unknown branch");
        assert!(matches!(error, ClientError::Server { .. }), "{error}");

        let plain = url("sslmode=disable");
        let error = open(&plain, "app.b1", &cache)
            .await
            .expect_err("router needs TLS");
        assert!(matches!(error, ClientError::Server { .. }), "{error}");
    })
    .expect("runtime");
}

#[test]
fn verify_full_rejects_an_unknown_ca() {
    let setup = router_on_primary(PASSWORD, &["b1"]);
    let other = Certs::generate();
    let spec = format!(
        "bg=postgres://app.b1:{PASSWORD}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        setup.router.direct_addr().port(),
        other.ca_path().display()
    );
    let target = target(&spec);
    block_on(async {
        let cache = RefCell::new(SaltedPasswordCache::new());
        let error = open(&target, "app.b1", &cache)
            .await
            .expect_err("untrusted");
        assert!(matches!(error, ClientError::Tls(_)), "{error}");
    })
    .expect("runtime");
}
