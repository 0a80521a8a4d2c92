//! Full TLS 1.3 handshakes in memory (no sockets): rustls client and server exchanging flights
//! through a buffer, ALPN `postgresql`, verify-full client, no resumption, as with libpq.
//!
//! For every provider (see `branchgate_bench::tls::providers`; `--features ring` adds ring)
//! and key type (ECDSA P-256, RSA-2048):
//! - `server`: only the time inside the server's rustls calls, the router's CPU per handshake;
//! - `both_sides`: the whole exchange, client certificate verification included.
//!
//! The RSA-2048 rows show why DESIGN.md prefers ECDSA P-256: the server's RSA signature
//! dominates the handshake.
//!
//! The router's own path (`branchgate_bench::router_tls`): rustls's unbuffered handshake in
//! `branchgate::tls::ServerHandshake`, then the in-place `RecordLayer`:
//! - `router_handshake`: ECDSA P-256, TLS 1.3, `server` and `both_sides` as above, with the
//!   router's suite order (AES-128-GCM) and with the client's (AES-256-GCM-SHA384);
//! - `router_records`: `seal` and `open` of one record in place, a 64-byte query and a full
//!   16 KiB record, for each TLS 1.3 suite (the client offering only that one).

use std::hint::black_box;
use std::time::{Duration, Instant};

use branchgate_bench::router_tls::TLS13_SUITES;
use branchgate_bench::router_tls::{connected_records, in_client_order, router_config};
use branchgate_bench::router_tls::{open_records, seal_records, RouterHandshake, SealInPlace};
use branchgate_bench::tls::{client_config, providers, server_config, InMemoryHandshake};
use branchgate_bench::tls::{KeyKind, Pki};
use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};

/// Benches one handshake runner twice: `server` times only the server's share (what `handshake`
/// returns), `both_sides` the whole call.
fn server_and_both_sides(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: &str,
    mut handshake: impl FnMut() -> Duration,
) {
    group.bench_function(BenchmarkId::new("server", id), |b| {
        b.iter_custom(|iters| (0..iters).map(|_| handshake()).sum())
    });
    group.bench_function(BenchmarkId::new("both_sides", id), |b| {
        b.iter(&mut handshake)
    });
}

fn tls(c: &mut Criterion) {
    let mut group = c.benchmark_group("tls13_handshake");
    // A millisecond per RSA handshake: 100 samples would not fit a short measurement time.
    group.sample_size(20);
    for kind in KeyKind::ALL {
        let pki = Pki::generate(kind).expect("certificates");
        for p in providers() {
            let server = server_config(p.provider.clone(), &pki).expect("server config");
            let client = client_config(p.provider.clone(), &pki).expect("client config");
            let mut handshake = InMemoryHandshake::new(server, client);
            let id = format!("{}/{}", p.name, kind.label());
            server_and_both_sides(&mut group, &id, || {
                handshake.run().expect("handshake").server_busy
            });
        }
    }
    group.finish();
}

fn router_handshake(c: &mut Criterion) {
    let mut group = c.benchmark_group("router_handshake");
    let pki = Pki::generate(KeyKind::EcdsaP256).expect("certificates");
    let router = router_config(&pki).expect("router config");
    let client = client_config(providers().remove(0).provider, &pki).expect("client config");
    for (order, server) in [
        ("server-order-aes-128-gcm", router.clone()),
        ("client-order-aes-256-gcm", in_client_order(&router)),
    ] {
        let mut handshake = RouterHandshake::new(server, client.clone());
        let id = format!("{}/{order}", KeyKind::EcdsaP256.label());
        server_and_both_sides(&mut group, &id, || {
            handshake.run().expect("handshake").server_busy
        });
    }
    group.finish();
}

/// Ciphertext the client seals ahead of each timed stretch of `open`s: enough records that the
/// clock's overhead vanishes, few enough to stay in cache like a freshly read socket buffer.
const OPEN_BATCH_BYTES: usize = 64 * 1024;

fn router_records(c: &mut Criterion) {
    let mut group = c.benchmark_group("router_records");
    let pki = Pki::generate(KeyKind::EcdsaP256).expect("certificates");
    for (label, suite) in TLS13_SUITES {
        let mut records = connected_records(&pki, suite).expect("connection");
        for len in [64, branchgate::tls::MAX_PLAINTEXT] {
            group.throughput(Throughput::Bytes(len as u64));
            let id = format!("{label}/{len}");

            let mut seal = SealInPlace::new(&records.server, len);
            group.bench_function(BenchmarkId::new("seal", &id), |b| {
                b.iter(|| seal.seal(&mut records.server).expect("seal").len())
            });

            // A connection's first record after it went quiet: both keys were shed
            // (`RecordLayer::shed_keys`), the sending one is rebuilt, then the record sealed.
            if len == 64 {
                group.bench_function(BenchmarkId::new("seal_after_shed", &id), |b| {
                    b.iter(|| {
                        records.server.shed_keys();
                        seal.seal(&mut records.server).expect("seal").len()
                    })
                });
            }

            let plain = vec![0x5a; len];
            let per_batch = (OPEN_BATCH_BYTES / len).max(1) as u64;
            let mut batch = Vec::with_capacity(OPEN_BATCH_BYTES + 64 * 1024);
            group.bench_function(BenchmarkId::new("open", &id), |b| {
                b.iter_custom(|iters| {
                    let mut busy = Duration::ZERO;
                    let mut left = iters;
                    while left > 0 {
                        let count = left.min(per_batch);
                        seal_records(&mut records.client, &plain, count as usize, &mut batch)
                            .expect("client seals");
                        let started = Instant::now();
                        let opened = open_records(&mut records.server, black_box(&mut batch));
                        busy += started.elapsed();
                        black_box(opened.expect("open"));
                        left -= count;
                    }
                    busy
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, tls, router_handshake, router_records);
criterion_main!(benches);
