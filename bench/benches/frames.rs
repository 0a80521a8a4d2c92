//! Frame scan over 64 KiB of backend output (result sets of RowDescription, DataRows,
//! CommandComplete, ReadyForQuery): the work a pooled relay does per read to find message
//! boundaries and the ReadyForQuery status that frees a backend. Reported in bytes per second.

use std::hint::black_box;

use branchgate::protocol::backend::{TransactionStatus, READY_FOR_QUERY};
use branchgate::protocol::frame::{self, Frames};
use branchgate_bench::wire::result_set_stream;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Bytes scanned per iteration: a few reads' worth, larger than one TLS record.
const STREAM_BYTES: usize = 64 * 1024;
/// The frame size limit passed to the scanner (it only compares against it).
const MAX_FRAME_BYTES: usize = 1 << 20;

fn frames(c: &mut Criterion) {
    let stream = result_set_stream(STREAM_BYTES);
    let mut group = c.benchmark_group("frames");
    group.throughput(Throughput::Bytes(stream.len() as u64));

    group.bench_function("check_loop", |b| {
        b.iter(|| {
            let (mut at, mut count) = (0, 0usize);
            let buf = black_box(stream.as_slice());
            while let Ok(Some(header)) = frame::check(&buf[at..], MAX_FRAME_BYTES) {
                at += header.len;
                count += 1;
            }
            (at, count)
        })
    });

    group.bench_function("iterator_with_ready_for_query_status", |b| {
        b.iter(|| {
            let mut frames = Frames::new(black_box(&stream), MAX_FRAME_BYTES);
            let mut idle = 0usize;
            for (header, body) in frames.by_ref().map_while(Result::ok) {
                if header.tag == READY_FOR_QUERY
                    && TransactionStatus::parse(body) == Ok(TransactionStatus::Idle)
                {
                    idle += 1;
                }
            }
            (frames.consumed(), idle)
        })
    });
    group.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);
