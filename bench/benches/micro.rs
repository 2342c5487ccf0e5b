//! The micro workloads of the benchmark report (hot alloc+free per size
//! class, batches below and past the cap in three free orders, realloc
//! growth) under criterion, for its statistics. Every allocator's
//! `GlobalAlloc` is called side by side in this one binary; the bench's
//! own global allocator (system malloc) only serves criterion.
//!
//! Criterion measures one allocator after another, so on a noisy host its
//! ratios drift with the host; `cargo run --release -p percpu-bench --bin report`
//! interleaves the same kernels and is the one to quote.
//!
//! ```text
//! cargo bench -p percpu-bench --bench micro                 # everything, a couple of minutes
//! cargo bench -p percpu-bench --bench micro -- hot_pair/64  # criterion's usual filter
//! ```

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use percpu_alloc::{Config, Path, PerCpuAlloc};
use tikv_jemallocator::Jemalloc;

use percpu_bench::micro::{self, Batch, Growth, Order, BATCH_SIZES, PAIR_SIZES};

static SYSTEM: std::alloc::System = std::alloc::System;
static JEMALLOC: Jemalloc = Jemalloc;
static MIMALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
static PERCPU: PerCpuAlloc = PerCpuAlloc::new();
static PERCPU_FALLBACK: PerCpuAlloc =
    PerCpuAlloc::with_config(Config::new().with_force_fallback(true));

/// Runs `$body` once per allocator with `$a` bound to its static, so each
/// call site is monomorphised and all five get the same code around them.
macro_rules! for_each_allocator {
    (|$name:ident, $a:ident| $body:block) => {{
        {
            let ($name, $a) = ("system", &SYSTEM);
            $body
        }
        {
            let ($name, $a) = ("jemalloc", &JEMALLOC);
            $body
        }
        {
            let ($name, $a) = ("mimalloc", &MIMALLOC);
            $body
        }
        {
            let ($name, $a) = ("percpu-rseq", &PERCPU);
            $body
        }
        {
            let ($name, $a) = ("percpu-fallback", &PERCPU_FALLBACK);
            $body
        }
    }};
}

/// A forced-fallback instance must be on the fallback path, and the default
/// one on rseq where glibc registered it; say so rather than pass off one
/// path's figures as the other's.
fn check_paths() {
    assert_eq!(
        PERCPU_FALLBACK.path(),
        Path::Fallback,
        "force_fallback was ignored"
    );
    if PERCPU.path() != Path::Rseq {
        eprintln!("warning: rseq is not registered here; percpu-rseq measures the fallback");
    }
}

fn hot_pair(c: &mut Criterion) {
    check_paths();
    let mut group = c.benchmark_group("hot_pair");
    group.throughput(Throughput::Elements(1));
    for size in PAIR_SIZES {
        for_each_allocator!(|name, a| {
            group.bench_function(BenchmarkId::new(size.to_string(), name), |b| {
                b.iter(|| micro::pair(a, size, 1))
            });
        });
    }
    group.finish();
}

fn batches(c: &mut Criterion) {
    check_paths();
    let mut group = c.benchmark_group("batch");
    for n in BATCH_SIZES {
        for order in Order::ALL {
            let mut batch = Batch::new(n, order);
            group.throughput(Throughput::Elements(batch.blocks() as u64));
            let id = format!("{n}_{}", order.name());
            for_each_allocator!(|name, a| {
                group.bench_function(BenchmarkId::new(&id, name), |b| b.iter(|| batch.run(a, 1)));
            });
        }
    }
    group.finish();
}

fn growth(c: &mut Criterion) {
    check_paths();
    let mut group = c.benchmark_group("realloc_growth");
    for g in Growth::ALL {
        group.throughput(Throughput::Elements(g.calls() as u64));
        for_each_allocator!(|name, a| {
            group.bench_function(BenchmarkId::new(g.name(), name), |b| b.iter(|| g.run(a, 1)));
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Short on purpose: 155 benchmarks stay at a few minutes on a shared
    // two-core machine. Command-line flags (--measurement-time, ...) still
    // override these.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(500))
        .sample_size(10);
    targets = hot_pair, batches, growth
}
criterion_main!(benches);
