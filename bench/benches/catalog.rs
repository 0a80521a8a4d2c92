//! The branch catalog with 1000 branches: parsing it (every reload; not per connection) and
//! the per-connection lookups, branch by id then role by name.

use std::hint::black_box;

use branchgate::catalog::Catalog;
use branchgate_bench::catalog::{branch_id, catalog_toml, ROLES};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const BRANCHES: usize = 1000;

fn catalog(c: &mut Criterion) {
    let text = catalog_toml(BRANCHES);
    let mut group = c.benchmark_group("catalog");

    group.throughput(Throughput::Bytes(text.len() as u64));
    // Milliseconds per iteration: fewer samples keep the run short.
    group.sample_size(20);
    group.bench_function("parse_1000_branches", |b| {
        b.iter(|| Catalog::parse(black_box(&text), "bench.toml").map(|c| c.branches().len()))
    });

    let catalog = Catalog::parse(&text, "bench.toml").expect("generated catalog is valid");
    // Every branch and role in turn, so lookups do not all hit one warm cache line.
    let keys: Vec<(String, &str)> = (0..BRANCHES)
        .flat_map(|i| ROLES.map(|role| (branch_id(i), role)))
        .collect();
    group.throughput(Throughput::Elements(1));
    group.sample_size(100);
    let mut next = 0;
    group.bench_function("branch_then_role_lookup", |b| {
        b.iter(|| {
            let (id, role) = &keys[next];
            next = (next + 1) % keys.len();
            let branch = catalog.branch(black_box(id))?;
            branch.role(black_box(role)).map(|v| v.iterations)
        })
    });
    group.bench_function("unknown_branch_lookup", |b| {
        b.iter(|| catalog.branch(black_box("br_99999")).is_some())
    });
    group.finish();
}

criterion_group!(benches, catalog);
criterion_main!(benches);
