//! p50/p99 decision latency (criterion reports means): times every decision one by one.
//!
//! `cargo bench -p meshward-proxy --bench authz_latency` prints a markdown table for
//! `docs/benchmarks.md`. Indexed: 100,000 decisions per size over 1,000 (principal, resource)
//! pairs after warming the slice cache, plus the cold first decision of each pair. Plain Cedar:
//! fewer decisions at large sizes, as each takes milliseconds.
//!
//! Instruction counts (repeatable on a loaded machine): build with `cargo bench -p
//! meshward-proxy --bench authz_latency --no-run`, then run the binary it names with
//! `--profile-decisions N [--policies P]` under `valgrind --tool=callgrind --collect-atstart=no
//! --toggle-collect='*profile_decisions*'`: it warms the slice cache of a `P`-policy set
//! (default 10,000) and makes `N` indexed decisions inside `profile_decisions` only.

#![allow(missing_docs, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use std::hint::black_box;
use std::time::{Duration, Instant};

use meshward_proxy::authz::{AuthzRequest, Mode, PolicySet};

fn main() {
    // `cargo bench` passes `--bench`; `--profile-decisions N` is for callgrind (see above).
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--profile-decisions") {
        let n: usize = args
            .get(at + 1)
            .and_then(|n| n.parse().ok())
            .expect("--profile-decisions takes a count");
        // `--policies P` for another set size (the evaluated slice is the same at every size).
        let size = args
            .iter()
            .position(|a| a == "--policies")
            .and_then(|at| args.get(at + 1))
            .map_or(10_000, |p| p.parse().expect("--policies takes a count"));
        let set = support::policy_set(size);
        let requests = support::requests(size);
        for r in &requests {
            black_box(set.decide(r, Mode::Enforce));
        }
        let allowed = profile_decisions(&set, &requests, n);
        println!("{n} decisions at {size} policies, {allowed} allowed");
        return;
    }
    println!(
        "| policies | load | indexed p50 | indexed p99 | cold (first call per pair) p50 / p99 | plain Cedar p50 | plain Cedar p99 | p99 speed-up |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for n in support::SIZES {
        // Parsing, validating and indexing the set (`PolicySet::from_sources`).
        let load = Instant::now();
        let set = support::policy_set(n);
        let load = load.elapsed();
        let requests = support::requests(n);
        let mut cold = time(&set, &requests, requests.len(), Decide::Indexed);
        let mut warm = time(&set, &requests, 100_000, Decide::Indexed);
        let plain_count = match n {
            10_000 => 200,
            1_000 => 2_000,
            _ => 20_000,
        };
        let mut plain = time(&set, &requests, plain_count, Decide::Plain);
        let (w50, w99) = (percentile(&mut warm, 50.0), percentile(&mut warm, 99.0));
        let (c50, c99) = (percentile(&mut cold, 50.0), percentile(&mut cold, 99.0));
        let (p50, p99) = (percentile(&mut plain, 50.0), percentile(&mut plain, 99.0));
        println!(
            "| {n} | {} | {} | {} | {} / {} | {} | {} | {:.0}x |",
            show(load),
            show(w50),
            show(w99),
            show(c50),
            show(c99),
            show(p50),
            show(p99),
            p99.as_secs_f64() / w99.as_secs_f64()
        );
    }
}

/// `n` warm indexed decisions; its own function so callgrind can count only these.
#[inline(never)]
fn profile_decisions(set: &PolicySet, requests: &[AuthzRequest], n: usize) -> usize {
    (0..n)
        .filter(|k| {
            set.decide(black_box(&requests[k % requests.len()]), Mode::Enforce)
                .allowed
        })
        .count()
}

#[derive(Clone, Copy)]
enum Decide {
    Indexed,
    Plain,
}

fn time(set: &PolicySet, requests: &[AuthzRequest], count: usize, how: Decide) -> Vec<Duration> {
    let mut out = Vec::with_capacity(count);
    for k in 0..count {
        let request = &requests[k % requests.len()];
        let start = Instant::now();
        let decision = match how {
            Decide::Indexed => set.decide(black_box(request), Mode::Enforce),
            Decide::Plain => set.decide_unindexed(black_box(request), Mode::Enforce),
        };
        out.push(start.elapsed());
        black_box(decision);
    }
    out
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.saturating_sub(1).min(samples.len() - 1)]
}

fn show(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.1} µs")
    }
}
