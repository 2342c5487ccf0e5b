//! The allocator's hot path against system malloc, jemalloc and mimalloc, side by side
//! in one run (on a shared machine only the ratios mean much: docs/benchmarks.md,
//! "How it was measured").
//!
//! Every allocator is called through its `GlobalAlloc` impl on a static of
//! its own; the bench binary's global allocator (system malloc) only serves
//! criterion and the precomputed inputs.
//!
//! ```text
//! cargo bench -p percpu-bench --bench hot_path               # every group
//! cargo bench -p percpu-bench --bench hot_path -- batch_1000 # criterion's usual filter
//! ```
//!
//! One throughput element is one alloc *and* its free, so "elem/s" reads as
//! alloc+free pairs per second in every group.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use percpu_alloc::{Config, Path, PerCpuAlloc};
use percpu_bench::rng::Rng;
use tikv_jemallocator::Jemalloc;

static SYSTEM: System = System;
static JEMALLOC: Jemalloc = Jemalloc;
static MIMALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
static PERCPU: PerCpuAlloc = PerCpuAlloc::new();
static PERCPU_FALLBACK: PerCpuAlloc =
    PerCpuAlloc::with_config(Config::new().with_force_fallback(true));

/// Runs `$body` once per allocator with `$a` bound to the static, so each
/// call site is monomorphised (no `dyn` call on the measured path) and the
/// four allocators get exactly the same code around them.
macro_rules! for_each_allocator {
    (|$name:ident, $a:ident| $body:block) => {{
        {
            let $name = "system";
            let $a = &SYSTEM;
            $body
        }
        {
            let $name = "jemalloc";
            let $a = &JEMALLOC;
            $body
        }
        {
            let $name = "mimalloc";
            let $a = &MIMALLOC;
            $body
        }
        {
            let $name = "percpu-rseq";
            let $a = &PERCPU;
            $body
        }
        {
            let $name = "percpu-fallback";
            let $a = &PERCPU_FALLBACK;
            $body
        }
    }};
}

/// Makes both per-CPU tables up front and checks that each instance is on
/// the path its name claims, so a run where rseq is unavailable cannot pass
/// off fallback figures as rseq ones.
fn check_paths() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(check_paths_now);
}

fn check_paths_now() {
    let rseq = PERCPU.path();
    let fallback = PERCPU_FALLBACK.path();
    eprintln!("percpu-rseq runs on path {rseq}, percpu-fallback on path {fallback}");
    assert_eq!(fallback, Path::Fallback, "force_fallback was ignored");
    if rseq != Path::Rseq {
        eprintln!("warning: rseq is not registered here; percpu-rseq measures the fallback");
    }
}

fn hot_pair_64(c: &mut Criterion) {
    check_paths();
    let layout = Layout::from_size_align(64, 8).unwrap();
    let mut group = c.benchmark_group("hot_pair_64");
    group.throughput(Throughput::Elements(1));
    for_each_allocator!(|name, a| {
        group.bench_function(name, |b| {
            b.iter(|| {
                // SAFETY: a valid non-zero layout; the block is freed at once
                // through the same allocator with the same layout.
                unsafe {
                    let p = a.alloc(black_box(layout));
                    assert!(!p.is_null());
                    a.dealloc(black_box(p), layout);
                }
            })
        });
    });
    group.finish();
}

/// `n` layouts with sizes uniform in 32..=64 (align 8) and a random
/// permutation of 0..n to free them in.
fn batch_inputs(n: usize) -> (Vec<Layout>, Vec<usize>) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let layouts = (0..n)
        .map(|_| Layout::from_size_align(32 + rng.below(33), 8).unwrap())
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    (layouts, order)
}

// Sizes 32..=64 fall in jemalloc's classes 32 (1 size in 33), 48 and 64
// (16 sizes in 33 each). With N = 1000 each of 48 and 64 gets about 485
// blocks per batch, so past the cap of 256 about half of them miss on alloc
// and overflow back to jemalloc on free; with N = 100 every class stays well
// within the cap and, once warm, every alloc is a hit.
fn batch(c: &mut Criterion, n: usize) {
    check_paths();
    let (layouts, order) = batch_inputs(n);
    let mut ptrs = vec![std::ptr::null_mut::<u8>(); n];
    let mut group = c.benchmark_group(format!("batch_{n}"));
    group.throughput(Throughput::Elements(n as u64));
    for_each_allocator!(|name, a| {
        group.bench_function(name, |b| {
            b.iter(|| {
                for (slot, &layout) in ptrs.iter_mut().zip(&layouts) {
                    // SAFETY: valid non-zero layouts; every block is freed
                    // below, once, through the same allocator and layout.
                    let p = unsafe { a.alloc(layout) };
                    assert!(!p.is_null());
                    // SAFETY: `p` is a live block of at least 32 bytes.
                    // Touching it makes every allocator pay for the page
                    // and cache-line faults its placement causes.
                    unsafe { p.write(layout.size() as u8) };
                    *slot = black_box(p);
                }
                for &i in &order {
                    // SAFETY: `ptrs[i]` was allocated above with
                    // `layouts[i]` and `order` is a permutation, so each
                    // block is freed exactly once.
                    unsafe { a.dealloc(ptrs[i], layouts[i]) };
                }
            })
        });
    });
    group.finish();
}

fn batch_100(c: &mut Criterion) {
    batch(c, 100);
}

fn batch_1000(c: &mut Criterion) {
    batch(c, 1000);
}

criterion_group! {
    name = benches;
    // Short on purpose: the whole bench stays around a minute on a shared
    // two-core machine. Command-line flags (--measurement-time, ...) still
    // override these, since criterion applies the arguments afterwards.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = hot_pair_64, batch_100, batch_1000
}
criterion_main!(benches);
