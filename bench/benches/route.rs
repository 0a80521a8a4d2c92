//! User name parsing: `role.branch_id[|replica]`, once per connection, split from the right.

use std::hint::black_box;

use branchgate::route::parse_user;
use criterion::{criterion_group, criterion_main, Criterion};

fn route(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_user");
    for user in ["app.b1", "my.dotted.role.branch_x|replica"] {
        group.bench_function(user, |b| b.iter(|| parse_user(black_box(user))));
    }
    group.finish();
}

criterion_group!(benches, route);
criterion_main!(benches);
