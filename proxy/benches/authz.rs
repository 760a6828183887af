//! Decision latency at 10 to 10,000 policies: the scope index against plain Cedar, same sets.
//!
//! `cargo bench -p meshward-proxy --bench authz` (criterion; means). For p50/p99 run
//! `cargo bench -p meshward-proxy --bench authz_latency`.

#![allow(missing_docs, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use meshward_proxy::authz::Mode;

fn decisions(c: &mut Criterion) {
    let mut group = c.benchmark_group("authz");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for n in support::SIZES {
        let set = support::policy_set(n);
        let requests = support::requests(n);
        // Warm the slice cache: the steady state of a sidecar.
        for r in &requests {
            set.decide(r, Mode::Enforce);
        }
        let mut k = 0;
        group.bench_with_input(BenchmarkId::new("indexed", n), &n, |b, _| {
            b.iter(|| {
                k = (k + 1) % requests.len();
                black_box(set.decide(black_box(&requests[k]), Mode::Enforce))
            })
        });
        let mut k = 0;
        group.bench_with_input(BenchmarkId::new("cedar", n), &n, |b, _| {
            b.iter(|| {
                k = (k + 1) % requests.len();
                black_box(set.decide_unindexed(black_box(&requests[k]), Mode::Enforce))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
