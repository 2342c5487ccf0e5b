//! The hot-path workloads of `benches/hot_path.rs`, measured as ratios that
//! survive a noisy machine: each allocator runs a short chunk in turn
//! (system, jemalloc, mimalloc, percpu rseq, percpu fallback, again and
//! again), and
//! the report is the median over rounds of each chunk's time divided by
//! jemalloc's chunk of the same round. Slow phases of a shared host hit
//! every allocator of a round alike, so the ratios move much less than the
//! absolute times (which are printed too, as medians).
//!
//! ```text
//! cargo run --release --example hot_ratio            # 25 rounds
//! cargo run --release --example hot_ratio -- 101     # more rounds
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::time::Instant;

use mimalloc::MiMalloc;
use percpu_alloc::{Config, Path, PerCpuAlloc};
use tikv_jemallocator::Jemalloc;

static PERCPU: PerCpuAlloc = PerCpuAlloc::new();
static FALLBACK: PerCpuAlloc = PerCpuAlloc::with_config(Config::new().force_fallback(true));

/// Operations (alloc + free) per chunk: a few milliseconds each.
const CHUNK: usize = 1 << 20;

#[inline(never)]
fn pair<A: GlobalAlloc>(a: &A, n: usize) {
    let layout = Layout::from_size_align(64, 8).unwrap();
    for _ in 0..n {
        // SAFETY: a valid layout; the block is freed with it at once.
        unsafe {
            let p = a.alloc(layout);
            black_box(p);
            a.dealloc(p, layout);
        }
    }
}

#[inline(never)]
fn batch<A: GlobalAlloc>(
    a: &A,
    rounds: usize,
    layouts: &[Layout],
    order: &[usize],
    held: &mut Vec<*mut u8>,
) {
    for _ in 0..rounds {
        held.clear();
        for &layout in layouts {
            // SAFETY: valid non-zero layouts; each block is freed below
            // with its own layout.
            unsafe {
                let p = a.alloc(layout);
                p.write(1);
                held.push(p);
            }
        }
        for &i in order {
            // SAFETY: allocated above with `layouts[i]`, freed once.
            unsafe { a.dealloc(held[i], layouts[i]) };
        }
    }
}

/// One chunk of a workload (`n` blocks a batch; 1 is the hot pair) on
/// allocator `a`, in nanoseconds per alloc+free.
fn chunk<A: GlobalAlloc>(
    a: &A,
    n: usize,
    layouts: &[Layout],
    order: &[usize],
    held: &mut Vec<*mut u8>,
) -> f64 {
    let start = Instant::now();
    if n == 1 {
        pair(a, CHUNK);
    } else {
        batch(a, CHUNK / n, layouts, order, held);
    }
    start.elapsed().as_nanos() as f64 / ((CHUNK / n) * n) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(25)
        .max(1);
    assert_eq!(FALLBACK.path(), Path::Fallback);
    println!(
        "hot path, interleaved: {rounds} rounds of {CHUNK} alloc+free per allocator; percpu on the {} path",
        PERCPU.path()
    );
    println!();
    println!("| workload | system ns | jemalloc ns | mimalloc ns | percpu rseq ns | percpu fallback ns | rseq / jemalloc | rseq / system | rseq / mimalloc | fallback / jemalloc |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    // A fixed-seed xorshift: the same sizes and free order every run.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for n in [1usize, 100, 1000] {
        // Sizes 32..=64 bytes: at 1000 about half of each class is past
        // the cap of 256 (misses and overflows), at 100 none is.
        let layouts: Vec<Layout> = (0..n)
            .map(|_| Layout::from_size_align(32 + (next() % 33) as usize, 8).unwrap())
            .collect();
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, (next() % (i as u64 + 1)) as usize);
        }
        let mut held = Vec::with_capacity(n);
        let mut times: [Vec<f64>; 5] = Default::default();
        let mut ratios: [Vec<f64>; 4] = Default::default();
        for _ in 0..rounds {
            let s = chunk(&System, n, &layouts, &order, &mut held);
            let j = chunk(&Jemalloc, n, &layouts, &order, &mut held);
            let m = chunk(&MiMalloc, n, &layouts, &order, &mut held);
            let p = chunk(&PERCPU, n, &layouts, &order, &mut held);
            let f = chunk(&FALLBACK, n, &layouts, &order, &mut held);
            for (v, t) in times.iter_mut().zip([s, j, m, p, f]) {
                v.push(t);
            }
            ratios[0].push(p / j);
            ratios[1].push(p / s);
            ratios[2].push(p / m);
            ratios[3].push(f / j);
        }
        let name = if n == 1 {
            "hot pair, 64 B".to_string()
        } else {
            format!("batch of {n}")
        };
        let [s, j, m, p, f] = times.map(median);
        let [pj, ps, pm, fj] = ratios.map(median);
        println!(
            "| {name} | {s:.1} | {j:.1} | {m:.1} | {p:.1} | {f:.1} | {pj:.2} | {ps:.2} | {pm:.2} | {fj:.2} |"
        );
    }
}
