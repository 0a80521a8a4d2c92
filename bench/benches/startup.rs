//! StartupMessage handling, the first thing the router does with a (decrypted) connection:
//! `check_startup` finds the packet, `parse_startup` validates it, and the router then reads
//! `user` and `database` (each a scan of the parameter list) or walks every parameter to
//! forward them to the backend.

use std::hint::black_box;

use branchgate::protocol::startup::{check_startup, parse_startup, StartupPacket};
use branchgate_bench::wire::libpq_startup;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn startup(c: &mut Criterion) {
    let packet = libpq_startup();
    let mut group = c.benchmark_group("startup");
    group.throughput(Throughput::Bytes(packet.len() as u64));

    group.bench_function("check_and_parse", |b| {
        b.iter(|| {
            let buf = black_box(packet.as_slice());
            let len = check_startup(buf).ok().flatten()?;
            parse_startup(&buf[..len]).ok()
        })
    });

    group.bench_function("parse_then_user_and_database", |b| {
        b.iter(|| match parse_startup(black_box(&packet)) {
            Ok(StartupPacket::Startup(m)) => (m.user(), m.database()),
            _ => (None, None),
        })
    });

    let Ok(StartupPacket::Startup(message)) = parse_startup(&packet) else {
        panic!("fixture is not a StartupMessage");
    };
    group.bench_function("iterate_params", |b| {
        b.iter(|| {
            black_box(&message)
                .params()
                .map(|(name, value)| name.len() + value.len())
                .sum::<usize>()
        })
    });
    group.finish();
}

criterion_group!(benches, startup);
criterion_main!(benches);
