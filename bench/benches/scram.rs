//! SCRAM-SHA-256 on the router's side, once per connection. The client (PBKDF2 included) runs
//! once outside the timed loop; PBKDF2 is never on the server path, which costs two HMACs, one
//! SHA-256 and the message handling.
//!
//! - `server_exchange`: server-first and proof check, with a fixed server nonce so that the
//!   precomputed client-final-message stays valid.
//! - `server_start`: server-first as the router calls it, with 18 fresh random bytes (OsRng).
//! - `server_finish`: the proof check alone.

use std::hint::black_box;

use branchgate::auth::scram::{server_finish, server_start, server_start_with_nonce};
use branchgate_bench::scram::{ScramFixture, SERVER_NONCE};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

fn scram(c: &mut Criterion) {
    let fixture = ScramFixture::new().expect("client side of the exchange");
    let mut group = c.benchmark_group("scram");

    group.bench_function("server_exchange", |b| {
        b.iter(|| black_box(&fixture).server_side().is_ok())
    });

    group.bench_function("server_start", |b| {
        b.iter(|| server_start(black_box(&fixture.client_first), &fixture.verifier).is_ok())
    });

    group.bench_function("server_finish", |b| {
        b.iter_batched(
            || {
                server_start_with_nonce(&fixture.client_first, &fixture.verifier, SERVER_NONCE)
                    .expect("server-first")
                    .0
            },
            |state| server_finish(state, black_box(&fixture.client_final)).is_ok(),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, scram);
criterion_main!(benches);
