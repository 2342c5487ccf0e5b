//! Instances other than the global one (docs/design.md sections 1, 3 and 4):
//! configured caps and thresholds seen through `counts`, the per-CPU byte
//! bound, cross-thread use of a shared instance, layouts that bypass the
//! cache, and dropping an instance giving its blocks back.

mod common;

use std::alloc::Layout;
use std::collections::HashSet;
use std::sync::{mpsc, Mutex};

use common::{
    assert_within_caps, cached, cores, expect_pattern, fill, first_cached, give, pin, serial, take,
    unpin, XorShift,
};
use percpu_alloc::{Config, Path, PerCpuAlloc, CLASS_SIZES, MAX_CACHEABLE_SIZE, NUM_CLASSES};

#[global_allocator]
static ALLOC: PerCpuAlloc = PerCpuAlloc::new();

/// Tests that pin threads or measure the process's memory run alone.
static SERIAL: Mutex<()> = Mutex::new(());

fn class_of(size: usize) -> usize {
    CLASS_SIZES.iter().position(|&s| s == size).unwrap()
}

#[test]
fn paths_and_table_geometry() {
    let _serial = serial(&SERIAL);
    let forced = PerCpuAlloc::with_config(Config::new().with_force_fallback(true));
    assert_eq!(forced.path(), Path::Fallback);
    let plain = PerCpuAlloc::new();
    assert_eq!(
        plain.path(),
        ALLOC.path(),
        "instances decide the path alike"
    );

    // The table covers every possible CPU, not just the online ones.
    let possible = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    let highest: usize = possible
        .trim()
        .split([',', '-'])
        .map(|n| n.parse::<usize>().unwrap())
        .max()
        .unwrap();
    for a in [&forced, &plain] {
        assert_eq!(a.cpus(), highest + 1);
        assert!(a.counts(a.cpus() - 1, 0).is_some());
        assert_eq!(a.counts(a.cpus(), 0), None);
        assert_eq!(a.counts(0, NUM_CLASSES), None);
        for (class, &size) in CLASS_SIZES.iter().enumerate() {
            let c = a.counts(0, class).unwrap();
            assert_eq!(
                (c.cap, c.class_size),
                (Config::new().class_cap(class), size)
            );
        }
    }

    // A fresh instance has nothing to report and nothing to trim.
    let fresh = PerCpuAlloc::new();
    assert_eq!(first_cached(&fresh), None);
    assert_eq!(fresh.cached_bytes(), 0);
    assert_eq!(fresh.trim(), Default::default());
}

/// Cap and threshold on `a`, configured as `cap` and `threshold`, from a
/// thread pinned to one CPU.
fn cap_and_threshold(a: &PerCpuAlloc, cap: u32, threshold: u32, what: &str) {
    let cpu = pin(cores()[0]);
    let layout = Layout::from_size_align(64, 8).unwrap();
    let class = class_of(64);
    let counts = |a: &PerCpuAlloc| {
        let c = a.counts(cpu, class).unwrap();
        (c.nr, c.nr_sig)
    };
    assert_eq!(a.counts(cpu, class).unwrap().cap, cap, "{what}");

    // Task frees stop at the cap: cap - 1 and cap are kept, cap + 1 is not.
    let blocks = take(a, layout, cap as usize + 5);
    give(a, layout, &blocks[..cap as usize - 1], false);
    assert_eq!(counts(a), (cap - 1, 0), "{what}");
    give(a, layout, &blocks[cap as usize - 1..cap as usize], false);
    assert_eq!(counts(a), (cap, 0), "{what}");
    give(a, layout, &blocks[cap as usize..], false);
    assert_eq!(counts(a), (cap, 0), "{what}: never more than the cap");
    // Hits come back last-freed first from what was kept.
    let kept: HashSet<*mut u8> = blocks[..cap as usize].iter().copied().collect();
    let hits = take(a, layout, cap as usize);
    assert!(
        hits.iter().all(|p| kept.contains(p)),
        "{what}: hit from outside the cache"
    );
    assert_eq!(
        hits.iter().collect::<HashSet<_>>().len(),
        cap as usize,
        "{what}: handed out twice"
    );
    assert_eq!(counts(a), (0, 0), "{what}");

    // The threshold: one short is a miss, reaching it splices.
    give(a, layout, &hits[..threshold as usize - 1], true);
    assert_eq!(counts(a), (0, threshold - 1), "{what}");
    let missed = take(a, layout, 1);
    assert_eq!(
        counts(a),
        (0, threshold - 1),
        "{what}: no splice below the threshold"
    );
    give(
        a,
        layout,
        &hits[threshold as usize - 1..threshold as usize],
        true,
    );
    let spliced = take(a, layout, 1);
    assert!(kept.contains(&spliced[0]), "{what}");
    assert_eq!(counts(a), (threshold - 1, 0), "{what}: spliced");

    // The signal list stops at the cap as well (the rest is deferred).
    let rest = take(a, layout, threshold as usize - 1);
    give(a, layout, &rest, false);
    give(a, layout, &spliced, false);
    give(a, layout, &missed, false);
    give(a, layout, &hits[threshold as usize..], true);
    let report = a.trim();
    assert_eq!(report.blocks, cap as usize, "{what}: {report:?}");
    unpin();
}

#[test]
fn configured_cap_and_threshold() {
    let _serial = serial(&SERIAL);
    for (cap, threshold) in [(8, 3), (256, 16), (40, 40), (2, 1)] {
        let config = Config::new().with_cap(cap).with_splice_threshold(threshold);
        let a = PerCpuAlloc::with_config(config);
        cap_and_threshold(
            &a,
            cap,
            threshold,
            &format!("cap {cap} threshold {threshold}"),
        );
        let f = PerCpuAlloc::with_config(config.with_force_fallback(true));
        cap_and_threshold(
            &f,
            cap,
            threshold,
            &format!("fallback, cap {cap} threshold {threshold}"),
        );
    }
}

/// Fills every class on one pinned CPU past its cap, checking after each
/// class that the CPU's cached bytes stay within `cpu_bound_bytes()`.
/// Returns what the CPU caches at the end.
fn fill_one_cpu(a: &PerCpuAlloc, cpu: usize) -> usize {
    let on_cpu = |a: &PerCpuAlloc| -> usize {
        a.snapshot()
            .filter(|c| c.cpu == cpu)
            .map(|c| c.bytes())
            .sum()
    };
    for (class, &size) in CLASS_SIZES.iter().enumerate() {
        let cap = a.config().class_cap(class) as usize;
        let layout = Layout::from_size_align(size, 8).unwrap();
        let blocks = take(a, layout, cap + 5);
        give(a, layout, &blocks, false);
        let c = a.counts(cpu, class).unwrap();
        assert_eq!(c.nr as usize, cap, "class {class} filled to its cap");
        assert!(
            on_cpu(a) <= a.cpu_bound_bytes(),
            "CPU {cpu} past its bound at class {class}"
        );
    }
    on_cpu(a)
}

#[test]
fn the_byte_budget_bounds_one_cpu() {
    let _serial = serial(&SERIAL);
    let cpu = pin(cores()[0]);
    let default = PerCpuAlloc::new();
    assert!(
        default.cpu_bound_bytes() <= 1536 * 1024,
        "default bound above 1.5 MiB"
    );
    assert_eq!(default.cpu_bound_bytes(), Config::new().cpu_bound_bytes());
    // A full CPU caches exactly its bound: every class at its cap.
    assert_eq!(fill_one_cpu(&default, cpu), default.cpu_bound_bytes());
    assert_eq!(default.cached_bytes(), default.cpu_bound_bytes());
    assert_eq!(default.trim().bytes, default.cpu_bound_bytes());

    for config in [
        Config::new().with_cpu_byte_budget(64 * 1024),
        Config::new().with_max_cached_size(MAX_CACHEABLE_SIZE),
        Config::new()
            .with_max_cached_size(4096)
            .with_cpu_byte_budget(256 * 1024),
        Config::new().with_max_cached_size(100),
    ] {
        assert!(
            config.cpu_bound_bytes() <= config.cpu_byte_budget(),
            "{config:?}"
        );
        let a = PerCpuAlloc::with_config(config);
        assert_eq!(
            fill_one_cpu(&a, cpu),
            config.cpu_bound_bytes(),
            "{config:?}"
        );
        assert_eq!(a.trim().bytes, config.cpu_bound_bytes(), "{config:?}");
    }
    unpin();
}

#[test]
fn layouts_the_cache_does_not_serve_bypass_it() {
    let _serial = serial(&SERIAL);
    let a = PerCpuAlloc::new();
    let wide = PerCpuAlloc::with_config(Config::new().with_max_cached_size(MAX_CACHEABLE_SIZE));
    for (alloc, size, align, expect_cached) in [
        (&a, 1025, 8, false),      // past the default 1 KiB
        (&a, 64, 4096, false),     // needs the 4 KiB class, not cached by default
        (&a, 64, 8192, false),     // no class promises more than a page
        (&a, 100, 64, true),       // the 128-byte class is 64-aligned
        (&wide, 64, 4096, true),   // the 4 KiB class, cached here
        (&wide, 14336, 8, true),   // jemalloc's largest small class
        (&wide, 14337, 8, false),  // large
        (&wide, 100, 8192, false), // over-aligned
    ] {
        let layout = Layout::from_size_align(size, align).unwrap();
        let p = take(alloc, layout, 1);
        assert_eq!(p[0] as usize % align, 0);
        // SAFETY: `p[0]` holds `size` bytes.
        unsafe { fill(p[0], size, 3) };
        // SAFETY: as above.
        unsafe { expect_pattern(p[0], size, 3, "bypass block") };
        alloc.trim();
        give(alloc, layout, &p, false);
        let (blocks, _) = cached(alloc);
        assert_eq!(blocks, expect_cached as usize, "{size} bytes align {align}");
        alloc.trim();
    }
}

/// Shared by the threads below: tiny caps so that overflows and splices
/// happen all the time.
static SMALL: PerCpuAlloc = PerCpuAlloc::with_config(
    Config::new()
        .with_cap(4)
        .with_splice_threshold(2)
        .with_max_cached_size(512),
);

#[test]
fn a_shared_small_instance_across_threads() {
    let _serial = serial(&SERIAL);
    const THREADS: usize = 4;
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..THREADS)
        .map(|_| mpsc::channel::<(usize, usize, u64)>())
        .unzip();
    let cores = cores();
    let handles: Vec<_> = receivers
        .into_iter()
        .enumerate()
        .map(|(id, rx)| {
            let peers = senders.clone();
            let cores = cores.clone();
            std::thread::spawn(move || {
                let mut rng = XorShift::new(id as u64 + 1000);
                for i in 0..100_000u64 {
                    if i % 10_000 == 0 {
                        let core = cores[(id + i as usize / 10_000) % cores.len()];
                        assert!(core_affinity::set_for_current(core));
                    }
                    let size = rng.log_size(700);
                    let layout = Layout::from_size_align(size, 8).unwrap();
                    let p = take(&SMALL, layout, 1)[0];
                    let tag = (id as u64) << 32 | i;
                    // SAFETY: `p` holds `size` bytes.
                    unsafe { fill(p, size, tag) };
                    peers[rng.below(THREADS)]
                        .send((p as usize, size, tag))
                        .unwrap();
                    while let Ok((p, size, tag)) = rx.try_recv() {
                        let p = p as *mut u8;
                        // SAFETY: a live block of `size` bytes from SMALL,
                        // now ours.
                        unsafe { expect_pattern(p, size, tag, "shared instance block") };
                        let layout = Layout::from_size_align(size, 8).unwrap();
                        // Some frees in signal context: the signal lists
                        // and splices of a threshold of 2.
                        give(&SMALL, layout, &[p], rng.chance(30));
                    }
                }
                drop(peers);
                for (p, size, tag) in rx {
                    let p = p as *mut u8;
                    // SAFETY: as above.
                    unsafe { expect_pattern(p, size, tag, "shared instance block") };
                    give(
                        &SMALL,
                        Layout::from_size_align(size, 8).unwrap(),
                        &[p],
                        false,
                    );
                }
            })
        })
        .collect();
    drop(senders);
    for h in handles {
        h.join().expect("a thread failed");
    }
    assert_within_caps(&SMALL);
    for c in SMALL.snapshot() {
        assert_eq!(c.cap, 4, "{c:?}");
    }
    let report = SMALL.trim();
    assert_eq!(report.cpus_skipped, 0, "{report:?}");
    assert_eq!(first_cached(&SMALL), None);
}

/// Resident memory of this process, in bytes.
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn dropping_an_instance_gives_its_blocks_back() {
    // If teardown leaked, every round would strand about a CPU bound
    // (about 1.5 MiB) per CPU filled: 60 rounds would grow the process by
    // well over 100 MiB. Blocks given back are reused by the next round.
    let _serial = serial(&SERIAL);
    let cores = cores();
    let mut baseline = 0;
    for round in 0..60 {
        let a = PerCpuAlloc::new();
        for &core in &cores {
            let cpu = pin(core);
            for (class, &size) in CLASS_SIZES.iter().enumerate() {
                let cap = a.config().class_cap(class) as usize;
                let layout = Layout::from_size_align(size, 8).unwrap();
                let blocks = take(&a, layout, cap + 4);
                // Half task list, half signal list, and a few deferred.
                give(&a, layout, &blocks[..cap / 2], false);
                give(&a, layout, &blocks[cap / 2..], true);
                if cap > 0 {
                    let c = a.counts(cpu, class).unwrap();
                    assert_eq!(c.nr + c.nr_sig, cap as u32, "class {class}");
                }
            }
        }
        drop(a);
        if round == 4 {
            baseline = rss();
        }
    }
    unpin();
    let grown = rss().saturating_sub(baseline);
    eprintln!(
        "RSS {} KiB after round 4, grew by {} KiB since",
        baseline >> 10,
        grown >> 10
    );
    assert!(
        grown < 32 << 20,
        "RSS grew by {} MiB over 55 rounds",
        grown >> 20
    );
}

/// An allocator made in a `const` (copied wherever it is used) works like
/// one made in a `static`: each copy makes its own table on first use.
#[test]
fn an_allocator_from_a_const_item() {
    use std::alloc::GlobalAlloc;
    // What clippy warns of is the point: a const copied into each use.
    #[allow(clippy::declare_interior_mutable_const)]
    const MADE: PerCpuAlloc = PerCpuAlloc::with_config(Config::new().with_read_env(false));
    let a = MADE;
    let layout = Layout::from_size_align(64, 8).unwrap();
    // SAFETY: a valid layout; the block is freed with the same one.
    unsafe {
        let p = a.alloc(layout);
        assert!(!p.is_null());
        p.write_bytes(0xa5, 64);
        a.dealloc(p, layout);
    }
    assert!(a.cpus() >= 1);
    assert!(a.cached_bytes() <= 64);
}
