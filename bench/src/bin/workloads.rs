//! Whole-program workloads, run under whichever global allocator this
//! build was given, for `bench/src/bin/report.rs` to compare.
//!
//! A process has one global allocator, fixed when it is linked, so the
//! comparison needs one binary per allocator; the cargo features pick it,
//! exactly the switch an application would copy:
//!
//! ```text
//! cargo build --release -p percpu-bench --bin workloads # system malloc
//! cargo build --release -p percpu-bench --bin workloads --features global-jemalloc # tikv-jemallocator
//! cargo build --release -p percpu-bench --bin workloads --features global-mimalloc # mimalloc
//! cargo build --release -p percpu-bench --bin workloads --features global-percpu # PerCpuAlloc
//! ```
//!
//! The percpu build declares its `#[global_allocator]` here, as the README
//! shows an application doing, so that rustc can inline the hot path into
//! this crate's callers as it would into an application's. (The crate's
//! own `global` feature installs the same allocator from inside the
//! library; a program's calls then reach it through `__rust_alloc`.)
//!
//! The percpu build runs on the rseq path where glibc registered rseq; run
//! it with `GLIBC_TUNABLES=glibc.pthread.rseq=0` for the try-lock fallback.
//! `expect-path=rseq|fallback` makes the program refuse to run on the other
//! path, so a report row can never carry the wrong path's figures.
//!
//! ```text
//! workloads WORKLOAD [key=value ...]
//! workloads scaling threads=8 ops=200000
//! workloads json file=../shared/data/json/twitter.json iters=5
//! ```
//!
//! Workloads (and their keys): `prodcons` (pairs, blocks), `scaling`
//! (threads, ops), `many_threads` (threads, hold, steps), `json` (file or
//! none for a generated document, iters, records), `binary_trees` (depth,
//! threads), `btree` (ops), `vec_box` (ops), `strings` (ops), `pair` (ops,
//! size = 16, 64 or 256, init = `zeroed` for `Box::new([0; size])` or
//! `none` for `Box::new_uninit`), `batch` (live, ops, sizes = `mixed` or a
//! byte count, order = `random`, `lifo` or `fifo`).
//!
//! `pair` and `batch` are the in-process micro kernels of the report
//! (`bench/src/micro.rs`) as a program writes them, so that the
//! allocator is reached through `__rust_alloc` and inlined as it is in
//! any Rust binary. Their timed loops allocate nothing but the blocks
//! they measure, and `ops` counts alloc+free pairs.
//!
//! Each one checks its own result (checksums, block patterns) and fails
//! loudly rather than report a time for wrong work. The last line of
//! output is the result:
//!
//! ```text
//! result workload=scaling alloc=percpu path=rseq ns=.. ops=.. maxrss_kib=.. hwm_kib=.. je_allocated=.. je_resident=.. cached=.. check=..
//! ```
//!
//! `ns` is the wall time of the workload alone (not process start, input
//! loading or exit). `maxrss_kib` is `getrusage(RUSAGE_SELF).ru_maxrss`;
//! `hwm_kib` is `VmHWM` from `/proc/self/status`, the peak of this
//! process's own memory, which the report uses (see [`peak_hwm_kib`]). `je_*` are jemalloc's `stats.allocated` and
//! `stats.resident` at the end of the workload, for the builds where
//! jemalloc serves the program (jemalloc, percpu); `cached` is what the
//! per-CPU caches held then (percpu only); `-` where a field does not apply.

#[cfg(any(
    all(feature = "global-percpu", feature = "global-jemalloc"),
    all(feature = "global-percpu", feature = "global-mimalloc"),
    all(feature = "global-jemalloc", feature = "global-mimalloc"),
    all(feature = "global", feature = "global-jemalloc"),
    all(feature = "global", feature = "global-mimalloc"),
    all(feature = "global", feature = "global-percpu"),
))]
compile_error!("pick one allocator: global, global-percpu, global-jemalloc and global-mimalloc exclude each other");

#[cfg(feature = "global-percpu")]
#[global_allocator]
static ALLOC: percpu_alloc::PerCpuAlloc = percpu_alloc::PerCpuAlloc::new();

#[cfg(feature = "global-jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(feature = "global-mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::process::ExitCode;
use std::sync::{mpsc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use percpu_bench::rng::Rng;

/// The allocator this build serves with; with the feature `global` the
/// library installed `percpu_alloc::GLOBAL`, with `global-percpu` this
/// example installed `ALLOC`.
const ALLOCATOR: &str = if cfg!(any(feature = "global", feature = "global-percpu")) {
    "percpu"
} else if cfg!(feature = "global-jemalloc") {
    "jemalloc"
} else if cfg!(feature = "global-mimalloc") {
    "mimalloc"
} else {
    "system"
};

/// The percpu allocator serving this process, in a percpu build.
fn percpu() -> Option<&'static percpu_alloc::PerCpuAlloc> {
    #[cfg(feature = "global")]
    return Some(&percpu_alloc::GLOBAL);
    #[cfg(feature = "global-percpu")]
    return Some(&ALLOC);
    #[cfg(not(any(feature = "global", feature = "global-percpu")))]
    None
}

/// The per-CPU path that serves this process, for the percpu build.
fn path() -> Option<String> {
    percpu().map(|a| a.path().to_string())
}

fn cached_bytes() -> Option<usize> {
    percpu().map(|a| a.cached_bytes())
}

/// jemalloc's own view of the heap, where jemalloc is the backend; its
/// counters are cached per thread and summed on an epoch advance, so the
/// epoch moves first.
fn jemalloc_stats() -> Option<(usize, usize)> {
    if !(cfg!(any(feature = "global", feature = "global-percpu"))
        || cfg!(feature = "global-jemalloc"))
    {
        return None;
    }
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    let allocated = tikv_jemalloc_ctl::stats::allocated::read().ok()?;
    let resident = tikv_jemalloc_ctl::stats::resident::read().ok()?;
    Some((allocated, resident))
}

/// The peak resident set of this program's own address space (`VmHWM`).
/// `ru_maxrss` is printed too, but on Linux it carries over an `execve`
/// the high-water mark of the address space that made the call, and
/// `std::process::Command` spawns with `vfork` semantics, so a child's
/// `ru_maxrss` is never below its parent's RSS.
fn peak_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn peak_rss_kib() -> u64 {
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable `rusage` for the call to fill.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc == 0 {
        // Linux reports ru_maxrss in KiB.
        usage.ru_maxrss.max(0) as u64
    } else {
        0
    }
}

// ---------------------------------------------------------------------------
// Helpers shared by the workloads.

/// A block whose content tells its length, so a block handed out twice or
/// written by someone else is caught when it is checked.
fn filled(len: usize) -> Box<[u8]> {
    vec![len as u8; len].into_boxed_slice()
}

fn check_filled(b: &[u8]) -> bool {
    let tag = b.len() as u8;
    b.first().is_none_or(|&x| x == tag) && b.last().is_none_or(|&x| x == tag)
}

/// What a workload hands back: operations done and a checksum of its
/// result, printed so that the work cannot be optimised away.
struct Done {
    ops: u64,
    check: u64,
    /// The time of the measured loop where the workload has setup of its
    /// own to leave out; otherwise the whole call is timed.
    timed: Option<Duration>,
}

type Params = HashMap<String, String>;

fn param(params: &Params, key: &str, default: usize) -> Result<usize, String> {
    match params.get(key) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| format!("{key}={v:?} is not a number")),
    }
}

// ---------------------------------------------------------------------------
// Workloads.

/// `pairs` producer threads each allocate `blocks` boxes (8..=256 bytes),
/// in batches of 64, and send them through a bounded channel to their own
/// consumer thread, which checks and frees them: every free is on another
/// thread than the alloc.
fn prodcons(pairs: usize, blocks: usize) -> Result<Done, String> {
    const BATCH: usize = 64;
    let batches = blocks.div_ceil(BATCH);
    let mut handles = Vec::new();
    for p in 0..pairs {
        let (tx, rx) = mpsc::sync_channel::<Vec<Box<[u8]>>>(8);
        let producer = thread::spawn(move || {
            let mut rng = Rng(0x5EED_1000 + p as u64);
            let mut sent = 0u64;
            for _ in 0..batches {
                let batch: Vec<Box<[u8]>> =
                    (0..BATCH).map(|_| filled(8 + rng.below(249))).collect();
                sent += batch.iter().map(|b| b.len() as u64).sum::<u64>();
                if tx.send(batch).is_err() {
                    break;
                }
            }
            sent
        });
        let consumer = thread::spawn(move || {
            let (mut received, mut bad) = (0u64, 0u64);
            for batch in rx {
                for b in batch {
                    bad += u64::from(!check_filled(&b));
                    received += b.len() as u64;
                }
            }
            (received, bad)
        });
        handles.push((producer, consumer));
    }
    let mut check = 0;
    for (producer, consumer) in handles {
        let sent = producer.join().map_err(|_| "a producer panicked")?;
        let (received, bad) = consumer.join().map_err(|_| "a consumer panicked")?;
        if bad != 0 || sent != received {
            return Err(format!(
                "sent {sent} bytes, received {received}, {bad} blocks overwritten"
            ));
        }
        check += sent;
    }
    Ok(Done {
        ops: (pairs * batches * BATCH) as u64,
        check,
        timed: None,
    })
}

/// Joins workers that return (checksum, overwritten blocks): the summed
/// checksum, or what went wrong.
fn join_checked(workers: Vec<thread::JoinHandle<(u64, u64)>>) -> Result<u64, String> {
    let mut check = 0;
    for w in workers {
        let (sum, bad) = w.join().map_err(|_| "a worker panicked")?;
        if bad != 0 {
            return Err(format!("{bad} blocks were overwritten"));
        }
        check += sum;
    }
    Ok(check)
}

/// `threads` threads each replace a random one of 64 live blocks
/// (8..=512 bytes) `ops` times, checking the block it drops.
fn scaling(threads: usize, ops: usize) -> Result<Done, String> {
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            thread::spawn(move || {
                let mut rng = Rng(0x5EED_2000 + t as u64);
                let mut ring: Vec<Box<[u8]>> =
                    (0..64).map(|_| filled(8 + rng.below(505))).collect();
                let mut bad = 0u64;
                let mut sum = 0u64;
                for _ in 0..ops {
                    let i = rng.below(ring.len());
                    let fresh = filled(8 + rng.below(505));
                    let old = std::mem::replace(&mut ring[i], fresh);
                    bad += u64::from(!check_filled(&old));
                    sum += old.len() as u64;
                }
                (sum, bad)
            })
        })
        .collect();
    let check = join_checked(workers)?;
    Ok(Done {
        ops: (threads * ops) as u64,
        check,
        timed: None,
    })
}

/// Many more threads than cores, all alive at once: each holds `hold`
/// blocks (16..=256 bytes), churns them `steps` times, and waits for the
/// others before it frees them and exits, so the peak RSS sees every
/// thread's blocks and whatever each allocator keeps per thread or per CPU.
fn many_threads(threads: usize, hold: usize, steps: usize) -> Result<Done, String> {
    let barrier = std::sync::Arc::new(Barrier::new(threads));
    let mut workers = Vec::with_capacity(threads);
    for t in 0..threads {
        let barrier = barrier.clone();
        let w = thread::Builder::new()
            .stack_size(128 << 10)
            .spawn(move || {
                let mut rng = Rng(0x5EED_3000 + t as u64);
                let mut held: Vec<Box<[u8]>> =
                    (0..hold).map(|_| filled(16 + rng.below(241))).collect();
                barrier.wait();
                let mut bad = 0u64;
                let mut sum = 0u64;
                for _ in 0..steps {
                    let i = rng.below(held.len());
                    let fresh = filled(16 + rng.below(241));
                    let old = std::mem::replace(&mut held[i], fresh);
                    bad += u64::from(!check_filled(&old));
                    sum += old.len() as u64;
                }
                barrier.wait();
                bad += held.iter().filter(|b| !check_filled(b)).count() as u64;
                (sum, bad)
            })
            .map_err(|e| format!("cannot start thread {t}: {e}"))?;
        workers.push(w);
    }
    let check = join_checked(workers)?;
    Ok(Done {
        ops: (threads * (hold + steps)) as u64,
        check,
        timed: None,
    })
}

/// A JSON document made here, for when no corpus is given: `records`
/// objects with strings, numbers, arrays and a nested object, the mix of
/// a typical API response.
fn generated_json(records: usize) -> String {
    let mut rng = Rng(0x5EED_4000);
    let items: Vec<serde_json::Value> = (0..records)
        .map(|i| {
            let tags: Vec<String> = (0..rng.below(6))
                .map(|j| format!("tag-{}", (i + j) % 37))
                .collect();
            serde_json::json!({
                "id": i,
                "name": format!("user {i} {}", "x".repeat(rng.below(24))),
                "active": i % 3 == 0,
                "score": rng.below(1_000_000) as f64 / 1000.0,
                "tags": tags,
                "location": {"lat": rng.below(180_000) as f64 / 1000.0 - 90.0,
                             "lon": rng.below(360_000) as f64 / 1000.0 - 180.0,
                             "city": format!("city-{}", rng.below(500))},
                "history": (0..rng.below(8)).map(|_| rng.below(10_000)).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::to_string(&serde_json::json!({"version": 1, "items": items}))
        .expect("a Value always serializes")
}

/// serde_json parse into a `Value` and serialize back, `iters` times; the
/// output must have the same length every time and be a fixed point of
/// parse-and-serialize.
fn json(text: &str, iters: usize) -> Result<Done, String> {
    let parse = |t: &str| serde_json::from_str::<serde_json::Value>(t).map_err(|e| e.to_string());
    let mut first_len = None;
    let mut check = 0u64;
    let mut last = String::new();
    for _ in 0..iters {
        let value = parse(text)?;
        let out = serde_json::to_string(&value).map_err(|e| e.to_string())?;
        if *first_len.get_or_insert(out.len()) != out.len() {
            return Err("serialized output changed between iterations".into());
        }
        check += out.len() as u64;
        last = out;
    }
    // The output, parsed and written again, must come out the same: a
    // block overwritten or handed out twice would show as a difference.
    if iters > 0 {
        let again = serde_json::to_string(&parse(&last)?).map_err(|e| e.to_string())?;
        if let Some(at) = again.bytes().zip(last.bytes()).position(|(a, b)| a != b) {
            let near = |t: &str| {
                t.get(at.saturating_sub(40)..(at + 40).min(t.len()))
                    .unwrap_or("")
                    .to_string()
            };
            return Err(format!(
                "the serialized document does not parse back to itself at byte {at}: {:?} vs {:?}",
                near(&last),
                near(&again)
            ));
        }
    }
    Ok(Done {
        ops: iters as u64,
        check,
        timed: None,
    })
}

/// One `Box` per node (two child pointers, 16 bytes).
struct Node {
    left: Option<Box<Node>>,
    right: Option<Box<Node>>,
}

fn build(depth: u32) -> Box<Node> {
    if depth == 0 {
        Box::new(Node {
            left: None,
            right: None,
        })
    } else {
        Box::new(Node {
            left: Some(build(depth - 1)),
            right: Some(build(depth - 1)),
        })
    }
}

fn count(node: &Node) -> u64 {
    1 + node.left.as_deref().map_or(0, count) + node.right.as_deref().map_or(0, count)
}

/// The binary-trees benchmark: a long-lived tree of the maximum depth
/// stays while, for each smaller depth, many short-lived trees are built,
/// counted and dropped, their iterations split over `threads` threads.
fn binary_trees(max_depth: u32, threads: usize) -> Result<Done, String> {
    const MIN_DEPTH: u32 = 4;
    let long_lived = build(max_depth);
    let mut total = 0;
    for depth in (MIN_DEPTH..=max_depth).step_by(2) {
        let iterations = 1u64 << (max_depth - depth + MIN_DEPTH);
        let per_thread = iterations.div_ceil(threads as u64);
        let nodes: u64 = thread::scope(|s| {
            let workers: Vec<_> = (0..threads as u64)
                .map(|t| {
                    s.spawn(move || {
                        let mine = per_thread.min(iterations.saturating_sub(t * per_thread));
                        (0..mine).map(|_| count(&build(depth))).sum::<u64>()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
        });
        let expected = iterations * ((1u64 << (depth + 1)) - 1);
        if nodes != expected {
            return Err(format!("depth {depth}: {nodes} nodes, expected {expected}"));
        }
        total += nodes;
    }
    let long = count(&long_lived);
    if long != (1u64 << (max_depth + 1)) - 1 {
        return Err(format!("the long-lived tree has {long} nodes"));
    }
    Ok(Done {
        ops: total + long,
        check: total + long,
        timed: None,
    })
}

/// Insert/remove churn on a `BTreeMap<String, Vec<u8>>` over 20 000 keys:
/// node splits and merges, key strings and values of 0..128 bytes.
fn btree(ops: usize) -> Result<Done, String> {
    let mut rng = Rng(0x5EED_5000);
    let mut map: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    // What the map should hold, kept apart from it.
    let mut bytes = 0usize;
    for _ in 0..ops {
        let key = format!("key-{:08x}", rng.below(20_000) * 0x9E37);
        if rng.below(3) < 2 {
            let len = rng.below(128);
            bytes += len;
            if let Some(old) = map.insert(key, vec![len as u8; len]) {
                bytes -= old.len();
            }
        } else if let Some(old) = map.remove(&key) {
            bytes -= old.len();
        }
    }
    let mut held = 0usize;
    for v in map.values() {
        if v.iter().any(|&x| x != v.len() as u8) {
            return Err("a map value was overwritten".into());
        }
        held += v.len();
    }
    if held != bytes {
        return Err(format!(
            "the map holds {held} value bytes, expected {bytes}"
        ));
    }
    Ok(Done {
        ops: ops as u64,
        check: (map.len() + held) as u64,
        timed: None,
    })
}

/// Random pushes and removals on a `Vec<Box<[u8]>>` of 1..=256-byte
/// blocks, its length drifting between empty and a few thousand, so the
/// live set of a class sometimes fits the per-CPU cap and sometimes not.
fn vec_box(ops: usize) -> Result<Done, String> {
    let mut rng = Rng(0x5EED_6000);
    let mut live: Vec<Box<[u8]>> = Vec::new();
    let mut target = 0;
    let mut freed = 0u64;
    for step in 0..ops {
        if step % 20_000 == 0 {
            target = rng.below(6000);
        }
        if live.len() < target || (live.len() == target && rng.next_u64() & 1 == 0) {
            live.push(filled(1 + rng.below(256)));
        } else if !live.is_empty() {
            let b = if rng.next_u64() & 3 == 0 {
                live.pop().unwrap_or_default()
            } else {
                live.swap_remove(rng.below(live.len()))
            };
            if !check_filled(&b) {
                return Err(format!("a block of {} bytes was overwritten", b.len()));
            }
            freed += b.len() as u64;
        }
    }
    let kept: u64 = live.iter().map(|b| b.len() as u64).sum();
    Ok(Done {
        ops: ops as u64,
        check: freed + kept,
        timed: None,
    })
}

fn digits(mut n: usize) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// Strings built piece by piece with `format!` and `push_str`, so they
/// grow through realloc; a window of recent ones stays alive so that the
/// frees are not strictly LIFO.
fn strings(ops: usize) -> Result<Done, String> {
    let mut window: Vec<String> = Vec::with_capacity(64);
    let (mut total, mut expected) = (0u64, 0u64);
    for i in 0..ops {
        let mut s = String::new();
        for j in 0..(i % 16) {
            s.push_str(&format!("{i}-{j};"));
            expected += (digits(i) + digits(j) + 2) as u64;
        }
        s.push_str("end");
        expected += 3;
        total += s.len() as u64;
        if window.len() == 64 {
            window.swap_remove(i % 64);
        }
        window.push(s);
    }
    if total != expected {
        return Err(format!(
            "built {total} bytes of strings, expected {expected}"
        ));
    }
    Ok(Done {
        ops: ops as u64,
        check: total,
        timed: None,
    })
}

/// One `Box<[u8; SIZE]>` made and dropped `ops` times, the layout a
/// constant as for any `Box<T>`. The block is read back through
/// `black_box`, so neither the allocation nor the reads can be folded
/// away; its first and last bytes must be the zeros `Box::new` wrote (or
/// `alloc_zeroed` promised, where the compiler fused the two), which
/// catches a cache that hands out a block still holding its list link.
#[inline(never)]
fn pair_const<const SIZE: usize>(ops: usize) -> Result<Done, String> {
    let start = Instant::now();
    let mut dirty = 0u64;
    for _ in 0..ops {
        let b = Box::new([0u8; SIZE]);
        let seen = black_box(&b);
        dirty += u64::from(seen[0] | seen[SIZE - 1] != 0);
        drop(b);
    }
    let timed = start.elapsed();
    if dirty != 0 {
        return Err(format!(
            "{dirty} of {ops} blocks of {SIZE} bytes were not zeroed"
        ));
    }
    Ok(Done {
        ops: ops as u64,
        check: (ops * SIZE) as u64,
        timed: Some(timed),
    })
}

/// One `Box<[u8; SIZE]>` made uninitialised (`Box::new_uninit`) and
/// dropped `ops` times: the alloc and the free alone, with no stores into
/// the block to share the loop's store bandwidth. A byte is written and
/// read back through `black_box`, so the block must be real memory.
#[inline(never)]
fn pair_uninit_const<const SIZE: usize>(ops: usize) -> Result<Done, String> {
    let start = Instant::now();
    let mut wrong = 0u64;
    for i in 0..ops {
        let mut b = Box::<[u8; SIZE]>::new_uninit();
        let p = b.as_mut_ptr() as *mut u8;
        // SAFETY: the box holds SIZE >= 1 bytes; the byte is written
        // before it is read.
        let seen = unsafe {
            p.write(i as u8);
            black_box(p).read()
        };
        wrong += u64::from(seen != i as u8);
        drop(black_box(b));
    }
    let timed = start.elapsed();
    if wrong != 0 {
        return Err(format!(
            "{wrong} of {ops} blocks of {SIZE} bytes read back wrong"
        ));
    }
    Ok(Done {
        ops: ops as u64,
        check: (ops * SIZE) as u64,
        timed: Some(timed),
    })
}

fn pair(size: usize, ops: usize, zeroed: bool) -> Result<Done, String> {
    match (size, zeroed) {
        (16, true) => pair_const::<16>(ops),
        (64, true) => pair_const::<64>(ops),
        (256, true) => pair_const::<256>(ops),
        (16, false) => pair_uninit_const::<16>(ops),
        (64, false) => pair_uninit_const::<64>(ops),
        (256, false) => pair_uninit_const::<256>(ops),
        _ => Err(format!("pair: size={size} is not one of 16, 64, 256")),
    }
}

/// The order a batch is freed in.
#[derive(Clone, Copy)]
enum FreeOrder {
    Random,
    Lifo,
    Fifo,
}

/// A tag per block and round, so that a block handed out twice, or one
/// left over from an earlier round, shows as a wrong pattern.
fn batch_tag(block: usize, round: usize) -> u8 {
    (block.wrapping_mul(31) ^ round) as u8
}

/// Writes `tag` into the first and last byte of the `len` bytes reserved
/// by `v`, leaving the rest untouched (and `v` empty) as a program that
/// fills a buffer only partly would.
fn mark(v: &mut Vec<u8>, len: usize, tag: u8) {
    let spare = v.spare_capacity_mut();
    spare[0].write(tag);
    spare[len - 1].write(tag);
}

/// Whether the bytes `mark` wrote are still there. Takes the `Vec`, not a
/// slice: its (empty) slice would give a pointer valid for no bytes.
///
/// # Safety
///
/// `mark(v, len, _)` was called on `v` and `v` was not changed since, so
/// its bytes 0 and `len - 1` are initialised.
unsafe fn marked(v: &Vec<u8>, len: usize, tag: u8) -> bool {
    if len == 0 || v.capacity() < len {
        return false;
    }
    let p = v.as_ptr();
    // SAFETY: `p` is the start of `v`'s live allocation of at least `len`
    // bytes (checked above), and the caller promises bytes 0 and
    // `len - 1` were initialised.
    unsafe { p.read() == tag && p.add(len - 1).read() == tag }
}

/// Rounds of: allocate `live` buffers with `Vec::<u8>::with_capacity`
/// (`size` bytes each, or for `None` 8..=256 bytes spread over the small
/// classes), mark each, then check and free them all in `order`. The
/// sizes, the order and the holder are made before the clock starts, so
/// the timed loop allocates only the buffers.
fn batch(live: usize, ops: usize, size: Option<usize>, order: FreeOrder) -> Result<Done, String> {
    if live == 0 || size == Some(0) {
        return Err("batch: live and sizes must be at least 1".into());
    }
    let rounds = ops / live;
    if rounds == 0 {
        return Err(format!("batch: ops={ops} is less than live={live}"));
    }
    // 37 and 249 are coprime: every run of 249 blocks takes each size of
    // 8..=256 once, and neighbours fall in different classes.
    let sizes: Vec<usize> = (0..live)
        .map(|i| size.unwrap_or(8 + (i * 37) % 249))
        .collect();
    let mut free_order: Vec<usize> = (0..live).collect();
    match order {
        FreeOrder::Fifo => {}
        FreeOrder::Lifo => free_order.reverse(),
        FreeOrder::Random => {
            let mut rng = Rng(0x5EED_7000);
            for i in (1..live).rev() {
                free_order.swap(i, rng.below(i + 1));
            }
        }
    }
    let mut held: Vec<Vec<u8>> = (0..live).map(|_| Vec::new()).collect();
    let (mut bad, mut bytes) = (0u64, 0u64);
    let start = Instant::now();
    for round in 0..rounds {
        for (i, (slot, &len)) in held.iter_mut().zip(&sizes).enumerate() {
            let mut v = Vec::with_capacity(len);
            mark(&mut v, len, batch_tag(i, round));
            *slot = v;
        }
        for &i in &free_order {
            let v = std::mem::take(&mut held[i]);
            // SAFETY: the loop above marked every held buffer with its
            // size, and nothing touched them since.
            bad += u64::from(!unsafe { marked(&v, sizes[i], batch_tag(i, round)) });
            bytes += v.capacity() as u64;
        }
    }
    let timed = start.elapsed();
    if bad != 0 {
        return Err(format!("{bad} blocks were overwritten"));
    }
    let expected = rounds as u64 * sizes.iter().map(|&s| s as u64).sum::<u64>();
    if bytes != expected {
        return Err(format!("freed {bytes} bytes, expected {expected}"));
    }
    Ok(Done {
        ops: (rounds * live) as u64,
        check: bytes,
        timed: Some(timed),
    })
}

// ---------------------------------------------------------------------------

/// `sizes=mixed` (the default) or one size in bytes.
fn batch_sizes(params: &Params) -> Result<Option<usize>, String> {
    match params.get("sizes").map(String::as_str) {
        None | Some("mixed") => Ok(None),
        Some(_) => param(params, "sizes", 0).map(Some),
    }
}

fn free_order(params: &Params) -> Result<FreeOrder, String> {
    match params.get("order").map(String::as_str) {
        None | Some("random") => Ok(FreeOrder::Random),
        Some("lifo") => Ok(FreeOrder::Lifo),
        Some("fifo") => Ok(FreeOrder::Fifo),
        Some(other) => Err(format!("order={other:?} is not one of random, lifo, fifo")),
    }
}

fn run(workload: &str, params: &Params) -> Result<(), String> {
    let threads_default = thread::available_parallelism().map_or(2, |n| n.get());
    // Inputs are read or generated before the clock starts.
    let json_text = if workload == "json" {
        Some(match params.get("file") {
            Some(file) => {
                std::fs::read_to_string(file).map_err(|e| format!("cannot read {file}: {e}"))?
            }
            None => generated_json(param(params, "records", 5_000)?),
        })
    } else {
        None
    };
    // Made before timing, so that mapping the per-CPU table is not timed.
    let path = path();
    if let Some(expected) = params.get("expect-path") {
        if path.as_deref() != Some(expected.as_str()) {
            return Err(format!(
                "expected the {expected} path, but this {ALLOCATOR} build runs on {}",
                path.as_deref().unwrap_or("no per-CPU path")
            ));
        }
    }
    let start = Instant::now();
    let done = match workload {
        "prodcons" => prodcons(
            param(params, "pairs", 1)?,
            param(params, "blocks", 200_000)?,
        ),
        "scaling" => scaling(
            param(params, "threads", threads_default)?,
            param(params, "ops", 200_000)?,
        ),
        "many_threads" => many_threads(
            param(params, "threads", 512)?,
            param(params, "hold", 64)?,
            param(params, "steps", 2_000)?,
        ),
        "json" => json(
            json_text.as_deref().unwrap_or_default(),
            param(params, "iters", 5)?,
        ),
        "binary_trees" => binary_trees(
            param(params, "depth", 16)? as u32,
            param(params, "threads", threads_default)?.max(1),
        ),
        "btree" => btree(param(params, "ops", 300_000)?),
        "vec_box" => vec_box(param(params, "ops", 3_000_000)?),
        "strings" => strings(param(params, "ops", 90_000)?),
        "pair" => pair(
            param(params, "size", 64)?,
            param(params, "ops", 100_000_000)?,
            match params.get("init").map(String::as_str) {
                None | Some("zeroed") => true,
                Some("none") => false,
                Some(other) => return Err(format!("pair: init={other} is not zeroed or none")),
            },
        ),
        "batch" => batch(
            param(params, "live", 100)?,
            param(params, "ops", 20_000_000)?,
            batch_sizes(params)?,
            free_order(params)?,
        ),
        other => return Err(format!("unknown workload {other:?}")),
    }?;
    let elapsed = start.elapsed();
    let ns = done.timed.unwrap_or(elapsed).as_nanos();
    let maxrss_kib = peak_rss_kib();
    let hwm_kib = peak_hwm_kib().map_or_else(|| "-".into(), |k| k.to_string());
    let (je_allocated, je_resident) = match jemalloc_stats() {
        Some((a, r)) => (a.to_string(), r.to_string()),
        None => ("-".into(), "-".into()),
    };
    let cached = cached_bytes().map_or_else(|| "-".into(), |c| c.to_string());
    println!(
        "result workload={workload} alloc={ALLOCATOR} path={} ns={ns} ops={} \
         maxrss_kib={maxrss_kib} hwm_kib={hwm_kib} je_allocated={je_allocated} je_resident={je_resident} \
         cached={cached} check={}",
        path.as_deref().unwrap_or("-"),
        done.ops,
        done.check
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(workload) = args.first() else {
        eprintln!(
            "usage: workloads WORKLOAD [key=value ...] (see the top of bench/src/bin/workloads.rs)"
        );
        return ExitCode::FAILURE;
    };
    let mut params = Params::new();
    for arg in &args[1..] {
        match arg.split_once('=') {
            Some((k, v)) => {
                params.insert(k.to_string(), v.to_string());
            }
            None => {
                eprintln!("workloads: expected key=value, got {arg:?}");
                return ExitCode::FAILURE;
            }
        }
    }
    match run(workload, &params) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("workloads ({ALLOCATOR}, {workload}): {e}");
            ExitCode::FAILURE
        }
    }
}
