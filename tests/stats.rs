//! Observability: the event counters (exact, with the `stats` feature; all
//! zero without it), the `Stats` summary and its table, that collecting it
//! allocates nothing, and `trim_current_cpu` against `trim`.
//!
//! Run both ways: `cargo test --release --test stats` and
//! `cargo test --release --features stats --test stats` (CI does both, on
//! both per-CPU paths).

mod common;

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::fmt::Write;
use std::sync::Mutex;

use common::{cores, give, pin, serial, take, unpin};
use percpu_alloc::{Config, Counters, Path, PerCpuAlloc, CLASS_SIZES};

/// The global allocator, wrapped to count this thread's allocations.
struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

static INNER: PerCpuAlloc = PerCpuAlloc::new();

// SAFETY: forwards every call unchanged to a `GlobalAlloc`.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: our caller's contract, passed on.
        unsafe { INNER.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: our caller's contract, passed on.
        unsafe { INNER.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: our caller's contract, passed on.
        unsafe { INNER.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

static SERIAL: Mutex<()> = Mutex::new(());

const COUNTING: bool = cfg!(feature = "stats");

fn class_of(size: usize) -> usize {
    CLASS_SIZES.iter().position(|&s| s == size).unwrap()
}

/// A small instance, so the cap and the threshold are quick to reach, and
/// deaf to the environment, so the figures below hold whatever it says.
fn instance(fallback: bool) -> PerCpuAlloc {
    PerCpuAlloc::with_config(
        Config::new()
            .with_cap(32)
            .with_splice_threshold(4)
            .with_force_fallback(fallback)
            .with_read_env(false),
    )
}

/// Drives one pinned CPU through every rule and checks each counter.
fn counters_follow_the_rules(fallback: bool) {
    let _serial = serial(&SERIAL);
    let a = instance(fallback);
    if !fallback && a.path() != Path::Rseq {
        eprintln!("rseq not registered here; the fallback test covers this one");
        return;
    }
    let cpu = pin(cores()[0]);
    let layout = Layout::from_size_align(64, 8).unwrap();
    let class = class_of(64);
    let read = || a.counters(cpu, class).unwrap();

    // A fresh cache misses, then a free stays and the next alloc hits.
    give(&a, layout, &take(&a, layout, 1), false);
    give(&a, layout, &take(&a, layout, 1), false);
    let mut want = Counters {
        misses: 1,
        hits: 1,
        frees_task: 2,
        ..Counters::default()
    };
    // 40 blocks (1 hit, 39 misses) back in task context: 32 stay (the
    // cap), 8 overflow to jemalloc.
    let blocks = take(&a, layout, 40);
    give(&a, layout, &blocks, false);
    want.hits += 1;
    want.misses += 39;
    want.frees_task += 40;
    want.overflows += 8;
    // Take all 32 and 9 more, keeping one aside; free 5 in signal context
    // and 35 in task context: 27 stay on the task list, 8 overflow, and the
    // CPU holds its cap of 32.
    let mut blocks = take(&a, layout, 41);
    want.hits += 32;
    want.misses += 9;
    let aside = blocks.pop().unwrap();
    give(&a, layout, &blocks.split_off(35), true);
    give(&a, layout, &blocks, false);
    want.frees_signal += 5;
    want.frees_task += 35;
    want.overflows += 8;
    // Past the cap in signal context: deferred.
    give(&a, layout, &[aside], true);
    want.frees_signal += 1;
    want.deferred += 1;
    // Empty the task list (27 hits); the next alloc splices the 5
    // signal-list blocks (one splice) and 4 more hit what it brought.
    let blocks = take(&a, layout, 27 + 1 + 4);
    want.hits += 27 + 4;
    want.splices += 1;
    give(&a, layout, &blocks, false);
    want.frees_task += 32;

    let got = read();
    if COUNTING {
        assert_eq!(got, want, "counters of CPU {cpu}, 64-byte class");
        let stats = a.stats();
        assert!(stats.counting);
        assert_eq!(stats.totals, want, "only this class and CPU were used");
        assert_eq!(stats.classes[class].counters, want);
        assert_eq!(stats.busiest_cpus()[0].cpu, cpu);
        assert_eq!(stats.no_cpu, 0);
    } else {
        assert_eq!(
            got,
            Counters::default(),
            "counters move without the feature"
        );
        assert!(!a.stats().counting);
    }
    // The cached figures are real either way.
    let stats = a.stats();
    let (blocks, bytes) = common::cached(&a);
    assert_eq!(stats.cached_blocks as usize, blocks);
    assert_eq!(stats.cached_bytes as usize, bytes);
    assert_eq!(stats.cpu_bound_bytes, a.cpu_bound_bytes());
    drop(a);
    unpin();
}

#[test]
fn counters_follow_the_rules_rseq() {
    counters_follow_the_rules(false);
}

#[test]
fn counters_follow_the_rules_fallback() {
    counters_follow_the_rules(true);
}

/// A `fmt::Write` that keeps nothing, so formatting allocates nothing of
/// its own.
struct Discard(usize);

impl Write for Discard {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0 += s.len();
        Ok(())
    }
}

#[test]
fn collecting_and_printing_stats_allocates_nothing() {
    let _serial = serial(&SERIAL);
    // Give the global caches something to show.
    let v: Vec<Box<[u8; 48]>> = (0..1000).map(|_| Box::new([1; 48])).collect();
    drop(v);
    let before = ALLOCS.with(Cell::get);
    let stats = INNER.stats();
    let mut out = Discard(0);
    write!(out, "{stats}").unwrap();
    let snapshot_len = INNER.snapshot().count();
    let after = ALLOCS.with(Cell::get);
    assert_eq!(after, before, "stats() or its Display allocated");
    assert!(out.0 > 100 && snapshot_len > 0);
}

#[test]
fn the_table_shows_totals_classes_and_cpus() {
    let _serial = serial(&SERIAL);
    let a = instance(false);
    let layout = Layout::from_size_align(200, 8).unwrap();
    give(&a, layout, &take(&a, layout, 10), false);
    let text = a.stats().to_string();
    assert!(text.starts_with("percpu-alloc: "), "{text}");
    assert!(text.contains("cached now: 10 blocks, 2.2 KiB"), "{text}");
    // The 224-byte class's row: class index, size, and its 10 blocks.
    let row = text
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("224"))
        .unwrap_or_else(|| panic!("no 224-byte row in\n{text}"));
    assert_eq!(row.split_whitespace().nth(3), Some("10"), "{row}");
    if COUNTING {
        assert!(text.contains("allocs: 10  hits 0.0%"), "{text}");
        assert!(text.contains("misses 100.0%"), "{text}");
        assert!(text.contains("frees: 10  task 10"), "{text}");
    } else {
        assert!(text.contains("counters: off"), "{text}");
    }
}

#[test]
fn trim_current_cpu_takes_this_cpu_only_and_trim_takes_the_rest() {
    let _serial = serial(&SERIAL);
    let cores = cores();
    for fallback in [false, true] {
        let a = instance(fallback);
        let layouts = [16, 100, 512].map(|s| Layout::from_size_align(s, 8).unwrap());
        // Fill the last core's caches first (the process then leaves it),
        // then the first core's.
        let fill = |core| {
            let cpu = pin(core);
            for layout in layouts {
                give(&a, layout, &take(&a, layout, 20), false);
            }
            cpu
        };
        let other = (cores.len() > 1).then(|| fill(*cores.last().unwrap()));
        let here = fill(cores[0]);
        let on = |cpu| {
            a.snapshot()
                .filter(|c| c.cpu == cpu)
                .map(|c| c.nr as usize + c.nr_sig as usize)
                .sum::<usize>()
        };
        assert_eq!(on(here), 60);
        let report = a.trim_current_cpu();
        assert_eq!(report.blocks, 60, "fallback {fallback}");
        assert_eq!(report.bytes, 20 * (16 + 112 + 512));
        assert_eq!(on(here), 0);
        if let Some(other) = other {
            assert_eq!(on(other), 60, "trim_current_cpu reached another CPU");
            let report = a.trim();
            assert_eq!((report.blocks, report.cpus_skipped), (60, 0));
            assert_eq!(on(other), 0);
        }
        unpin();
    }
}
