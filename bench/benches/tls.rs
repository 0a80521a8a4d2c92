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

use std::time::Duration;

use branchgate_bench::tls::{client_config, providers, server_config, InMemoryHandshake};
use branchgate_bench::tls::{KeyKind, Pki};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

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

            group.bench_function(BenchmarkId::new("server", &id), |b| {
                b.iter_custom(|iters| {
                    let mut busy = Duration::ZERO;
                    for _ in 0..iters {
                        busy += handshake.run().expect("handshake").server_busy;
                    }
                    busy
                })
            });
            group.bench_function(BenchmarkId::new("both_sides", &id), |b| {
                b.iter(|| handshake.run().expect("handshake").server_busy)
            });
        }
    }
    group.finish();
}

criterion_group!(benches, tls);
criterion_main!(benches);
