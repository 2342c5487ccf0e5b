//! Side-by-side comparison of system malloc, jemalloc, mimalloc and
//! percpu-alloc (on the rseq path and on the forced try-lock fallback), each
//! installed as the process's global allocator, on a few allocation-heavy
//! workloads.
//!
//! ```text
//! cargo run --release --example compare                   # about a minute
//! cargo run --release --example compare -- --quick        # smaller, 3 rounds
//! cargo run --release --example compare -- --rounds 9
//! cargo run --release --example compare -- --workload binary_trees
//! ```
//!
//! Workloads: `vec_box` (random pushes and removals of small boxed slices),
//! `btree_strings` (`BTreeMap<String, Vec<u8>>` insert/remove churn),
//! `binary_trees` (one `Box` per node), `strings` (`format!` and
//! `push_str`), `threads_xfer` (a producer thread allocating, a consumer
//! freeing, two more threads churning on their own).
//!
//! A binary has one global allocator, so this one installs a switch
//! ([`Switch`]) that forwards every call to the allocator named by
//! `PERCPU_COMPARE_ALLOC` (`system`, `jemalloc`, `mimalloc`, `percpu`,
//! `percpu-fallback`; unset means `system`), read once on the first
//! allocation. Run without `--child`, the program is the parent: it
//! re-executes itself once per (round, workload, allocator), the
//! allocators interleaved within each round so that drift in the machine's
//! load hits all of them alike, reads each child's one result line, and
//! prints a Markdown table of the medians over rounds, the ratios to system
//! malloc and to jemalloc, and each allocator's peak RSS.
//!
//! Run with `--child WORKLOAD`, the program is a child: it runs one
//! workload, checks its result, and prints
//! `result alloc=.. path=.. workload=.. ns=.. maxrss_kib=.. cached_kib=..`.
//! A percpu child also checks its caches against their caps at the end and
//! trims them empty.
//!
//! The times are wall-clock times of the workload alone (not process start
//! or exit), on whatever machine this is; quote the ratios, not the times.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use percpu_alloc::{Config, Path, PerCpuAlloc};
use tikv_jemallocator::Jemalloc;

// ---------------------------------------------------------------------------
// The allocator switch.

const ENV_VAR: &str = "PERCPU_COMPARE_ALLOC";
/// The same name, NUL-terminated for `getenv`.
const ENV_VAR_C: &[u8] = b"PERCPU_COMPARE_ALLOC\0";

/// The allocators compared, in table order: (switch value, name).
const ALLOCATORS: [(u8, &str); 5] = [
    (SYSTEM_ID, "system"),
    (JEMALLOC_ID, "jemalloc"),
    (MIMALLOC_ID, "mimalloc"),
    (PERCPU_ID, "percpu"),
    (FALLBACK_ID, "percpu-fallback"),
];

const SYSTEM_ID: u8 = 0;
const JEMALLOC_ID: u8 = 1;
const PERCPU_ID: u8 = 2;
const FALLBACK_ID: u8 = 3;
const MIMALLOC_ID: u8 = 4;
/// `PERCPU_COMPARE_ALLOC` named no allocator; system malloc serves, and a
/// child refuses to run.
const UNKNOWN_ID: u8 = 254;
const UNSET: u8 = 255;

static CHOICE: AtomicU8 = AtomicU8::new(UNSET);

static SYSTEM: System = System;
static JEMALLOC: Jemalloc = Jemalloc;
static MIMALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
static PERCPU: PerCpuAlloc = PerCpuAlloc::new();
static PERCPU_FALLBACK: PerCpuAlloc = PerCpuAlloc::with_config(Config::new().force_fallback(true));

/// Forwards to the allocator chosen at startup.
///
/// Every allocator, system malloc included, sits behind the same relaxed
/// load and `match`, so the switch adds the same small cost to each of
/// them and the ratios are fair.
struct Switch;

#[global_allocator]
static GLOBAL: Switch = Switch;

impl Switch {
    #[inline(always)]
    fn choice() -> u8 {
        match CHOICE.load(Ordering::Relaxed) {
            UNSET => Self::choose(),
            c => c,
        }
    }

    /// Reads the environment on the first allocation, which may come
    /// before `main`, so it must not allocate: no `std::env`.
    #[cold]
    #[inline(never)]
    fn choose() -> u8 {
        // SAFETY: `ENV_VAR_C` is NUL-terminated. Nothing in this program
        // calls `setenv` (the parent sets children's variables through
        // `Command`, which builds a separate environment), so `getenv`
        // does not race a writer.
        let value = unsafe { libc::getenv(ENV_VAR_C.as_ptr().cast()) };
        let choice = if value.is_null() {
            SYSTEM_ID
        } else {
            // SAFETY: `getenv` returned a NUL-terminated string that lives
            // as long as the environment is not modified (see above).
            let bytes = unsafe { std::ffi::CStr::from_ptr(value) }.to_bytes();
            ALLOCATORS
                .iter()
                .find(|(_, name)| name.as_bytes() == bytes)
                .map_or(UNKNOWN_ID, |&(id, _)| id)
        };
        // Threads racing here read the same environment and store the same
        // value, so whichever store wins, the choice never changes once an
        // allocation has been made with it.
        CHOICE.store(choice, Ordering::Relaxed);
        choice
    }

    /// The chosen allocator's name, or `None` if the variable named none.
    fn name() -> Option<&'static str> {
        let choice = Self::choice();
        ALLOCATORS
            .iter()
            .find(|&&(id, _)| id == choice)
            .map(|&(_, name)| name)
    }

    /// The chosen allocator, if it is a `PerCpuAlloc`.
    fn percpu() -> Option<&'static PerCpuAlloc> {
        match Self::choice() {
            PERCPU_ID => Some(&PERCPU),
            FALLBACK_ID => Some(&PERCPU_FALLBACK),
            _ => None,
        }
    }
}

/// Forwards one `GlobalAlloc` call to the chosen allocator. An unknown
/// choice is served by system malloc, like an unset one, because an
/// allocator must not panic; the child stops at once in `main`.
macro_rules! forward {
    ($method:ident($($arg:expr),*)) => {
        match Switch::choice() {
            JEMALLOC_ID => JEMALLOC.$method($($arg),*),
            MIMALLOC_ID => MIMALLOC.$method($($arg),*),
            PERCPU_ID => PERCPU.$method($($arg),*),
            FALLBACK_ID => PERCPU_FALLBACK.$method($($arg),*),
            _ => SYSTEM.$method($($arg),*),
        }
    };
}

// SAFETY: every call goes to one allocator, fixed before the first
// allocation and never changed (see `choose`), so each block is freed or
// reallocated by the allocator that made it, and each method inherits that
// allocator's guarantees.
unsafe impl GlobalAlloc for Switch {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract (see the impl).
        unsafe { forward!(alloc(layout)) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract (see the impl).
        unsafe { forward!(alloc_zeroed(layout)) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract (see the impl).
        unsafe { forward!(dealloc(ptr, layout)) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract (see the impl).
        unsafe { forward!(realloc(ptr, layout, new_size)) }
    }
}

// ---------------------------------------------------------------------------
// Workloads. Each returns a checksum that the child verifies, so the work
// cannot be optimised away and a misbehaving allocator is caught.

const WORKLOADS: [&str; 5] = [
    "vec_box",
    "btree_strings",
    "binary_trees",
    "strings",
    "threads_xfer",
];

/// xorshift64 with a fixed seed per workload: every allocator sees the same
/// sequence of requests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A boxed slice of `len` bytes whose content the holder can check later.
fn filled(len: usize) -> Box<[u8]> {
    vec![len as u8; len].into_boxed_slice()
}

fn check_filled(b: &[u8]) -> bool {
    let tag = b.len() as u8;
    b.first().map_or(true, |&x| x == tag) && b.last().map_or(true, |&x| x == tag)
}

/// Random pushes and removals on a `Vec<Box<[u8]>>` of 1..=256-byte
/// blocks, its length drifting between empty and a few thousand, so the
/// live set of a class sometimes fits the per-CPU cap and sometimes not.
fn vec_box(scale: usize) -> Result<u64, String> {
    let mut rng = Rng(0x5EED_0001);
    let mut live: Vec<Box<[u8]>> = Vec::new();
    let mut target = 0;
    let mut freed = 0u64;
    for step in 0..12_000_000 / scale {
        if step % 20_000 == 0 {
            target = rng.below(6000);
        }
        if live.len() < target || (live.len() == target && rng.next() & 1 == 0) {
            live.push(filled(1 + rng.below(256)));
        } else if !live.is_empty() {
            let b = if rng.next() & 3 == 0 {
                live.pop().unwrap()
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
    Ok(freed + kept)
}

/// Insert/remove churn on a `BTreeMap<String, Vec<u8>>` over a key space
/// of 20 000 keys: node splits and merges, key strings and values.
fn btree_strings(scale: usize) -> Result<u64, String> {
    let mut rng = Rng(0x5EED_0002);
    let mut map: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    // What the map should hold, kept independently of it.
    let mut bytes = 0usize;
    for _ in 0..600_000 / scale {
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
    Ok(map.len() as u64 + held as u64)
}

/// A binary tree with one `Box` per node (16 bytes: two child pointers).
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
/// while many short-lived trees of each smaller depth are built, counted
/// and dropped.
fn binary_trees(scale: usize) -> Result<u64, String> {
    const MIN_DEPTH: u32 = 4;
    let max_depth: u32 = if scale > 1 { 14 } else { 16 };
    let long_lived = build(max_depth);
    let mut total = 0;
    for depth in (MIN_DEPTH..=max_depth).step_by(2) {
        let iterations = 1u64 << (max_depth - depth + MIN_DEPTH);
        let mut nodes = 0;
        for _ in 0..iterations {
            nodes += count(&build(depth));
        }
        let expected = iterations * ((1u64 << (depth + 1)) - 1);
        if nodes != expected {
            return Err(format!("depth {depth}: {nodes} nodes, expected {expected}"));
        }
        total += nodes;
    }
    let long = count(&long_lived);
    if long != (1u64 << (max_depth + 1)) - 1 {
        return Err(format!("long-lived tree has {long} nodes"));
    }
    Ok(total + long)
}

fn digits(mut n: usize) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// Strings built piece by piece with `format!` and `push_str` (growing
/// through realloc), a window of recent ones kept alive so frees are not
/// strictly LIFO.
fn strings(scale: usize) -> Result<u64, String> {
    let mut window: Vec<String> = Vec::with_capacity(64);
    let mut total = 0u64;
    let mut expected = 0u64;
    for i in 0..360_000 / scale {
        let mut s = String::new();
        for j in 0..(i % 16) {
            let piece = format!("{i}-{j};");
            s.push_str(&piece);
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
    Ok(total)
}

/// Two threads hand batches of boxes through a bounded channel, one
/// allocating and one freeing (every free is a cross-thread free), while
/// two more churn privately.
fn threads_xfer(scale: usize) -> Result<u64, String> {
    const BATCH: usize = 32;
    let batches = 40_000 / scale;
    let (tx, rx) = mpsc::sync_channel::<Vec<Box<[u8]>>>(16);
    let producer = thread::spawn(move || {
        let mut rng = Rng(0x5EED_0005);
        let mut sent = 0u64;
        for _ in 0..batches {
            let batch: Vec<Box<[u8]>> = (0..BATCH).map(|_| filled(1 + rng.below(256))).collect();
            sent += batch.iter().map(|b| b.len() as u64).sum::<u64>();
            tx.send(batch).expect("the consumer hung up");
        }
        sent
    });
    let consumer = thread::spawn(move || {
        let mut received = 0u64;
        let mut bad = 0u64;
        for batch in rx {
            for b in batch {
                bad += u64::from(!check_filled(&b));
                received += b.len() as u64;
            }
        }
        (received, bad)
    });
    let churners: Vec<_> = (0..2u64)
        .map(|t| {
            thread::spawn(move || {
                let mut rng = Rng(0x5EED_0050 + t);
                let mut live: Vec<Box<[u8]>> = Vec::new();
                let mut bad = 0u64;
                for _ in 0..(batches * BATCH) {
                    if live.len() < 512 && rng.next() & 1 == 0 {
                        live.push(filled(1 + rng.below(256)));
                    } else if !live.is_empty() {
                        let b = live.swap_remove(rng.below(live.len()));
                        bad += u64::from(!check_filled(&b));
                    }
                }
                bad
            })
        })
        .collect();
    let sent = producer.join().map_err(|_| "the producer panicked")?;
    let (received, mut bad) = consumer.join().map_err(|_| "the consumer panicked")?;
    for churner in churners {
        bad += churner.join().map_err(|_| "a churner panicked")?;
    }
    if bad != 0 {
        return Err(format!("{bad} blocks were overwritten"));
    }
    if sent != received {
        return Err(format!("sent {sent} bytes, received {received}"));
    }
    Ok(sent)
}

fn run_workload(name: &str, scale: usize) -> Result<u64, String> {
    match name {
        "vec_box" => vec_box(scale),
        "btree_strings" => btree_strings(scale),
        "binary_trees" => binary_trees(scale),
        "strings" => strings(scale),
        "threads_xfer" => threads_xfer(scale),
        other => Err(format!("unknown workload {other:?}")),
    }
}

// ---------------------------------------------------------------------------
// Child: one workload, one result line.

fn child(workload: &str, scale: usize) -> Result<(), String> {
    let alloc = Switch::name().ok_or_else(|| {
        format!(
            "{ENV_VAR}={:?} names no allocator (system, jemalloc, mimalloc, percpu, percpu-fallback)",
            std::env::var_os(ENV_VAR).unwrap_or_default()
        )
    })?;
    // Made before timing, so the percpu table's mapping is not timed.
    let path = Switch::percpu().map_or_else(|| "-".to_string(), |p| p.path().to_string());
    let start = Instant::now();
    let check = run_workload(workload, scale)?;
    let ns = start.elapsed().as_nanos();
    std::hint::black_box(check);
    let maxrss_kib = peak_rss_kib();
    let cached_kib = match Switch::percpu() {
        Some(percpu) => check_cache(percpu)? / 1024,
        None => 0,
    };
    println!(
        "result alloc={alloc} path={path} workload={workload} ns={ns} \
         maxrss_kib={maxrss_kib} cached_kib={cached_kib}"
    );
    Ok(())
}

/// Checks what the per-CPU caches hold once the workload is done (only this
/// thread is left): no list past its cap, and a trim that empties them all.
/// On the rseq path the signal lists must also be empty, as no workload
/// frees in a signal handler; the fallback rightly puts a free that finds
/// its CPU's slot busy (another thread there holds it) on the signal list.
/// Returns the bytes that were cached.
fn check_cache(percpu: &PerCpuAlloc) -> Result<usize, String> {
    let rseq = percpu.path() == Path::Rseq;
    let cached = percpu.cached_bytes();
    if cached > percpu.cpus() * percpu.cpu_bound_bytes() {
        return Err(format!("{cached} bytes cached, above the bound"));
    }
    for c in percpu.snapshot() {
        if c.nr + c.nr_sig > c.cap || (rseq && c.nr_sig != 0) {
            return Err(format!("cache out of its rules: {c:?}"));
        }
    }
    let report = percpu.trim();
    let left = percpu.cached_bytes();
    if report.cpus_skipped == 0 && (left != 0 || report.bytes != cached) {
        return Err(format!(
            "trim gave back {} of {cached} cached bytes, {left} left",
            report.bytes
        ));
    }
    Ok(cached)
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
// Parent: run the children, gather, print.

struct Sample {
    ns: u64,
    maxrss_kib: u64,
    /// What the per-CPU caches held when the workload ended (0 for the
    /// others).
    cached_kib: u64,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Runs one child and returns its sample and reported path.
fn spawn_child(
    exe: &std::path::Path,
    alloc: &str,
    workload: &str,
    quick: bool,
) -> Result<(Sample, String), String> {
    let mut cmd = Command::new(exe);
    cmd.env(ENV_VAR, alloc).args(["--child", workload]);
    if quick {
        cmd.arg("--quick");
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{alloc} / {workload}: child failed ({})\n{}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let line = stdout
        .lines()
        .find(|l| l.starts_with("result "))
        .ok_or_else(|| format!("{alloc} / {workload}: no result line in {stdout:?}"))?;
    let parse = |key| -> Result<u64, String> {
        field(line, key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{alloc} / {workload}: bad {key} in {line:?}"))
    };
    if field(line, "alloc") != Some(alloc) {
        return Err(format!("asked for {alloc}, the child ran {line:?}"));
    }
    let sample = Sample {
        ns: parse("ns")?,
        maxrss_kib: parse("maxrss_kib")?,
        cached_kib: parse("cached_kib")?,
    };
    Ok((sample, field(line, "path").unwrap_or("?").to_string()))
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

struct Options {
    rounds: usize,
    quick: bool,
    workloads: Vec<&'static str>,
}

const USAGE: &str = "usage: compare [--quick] [--rounds N] [--workload NAME]...
  --quick          a quarter of each workload, 3 rounds unless --rounds says
  --rounds N       rounds of every (workload, allocator) pair; default 7
  --workload NAME  only this workload (repeatable): vec_box, btree_strings,
                   binary_trees, strings, threads_xfer";

/// The parent's options, or `None` for `--help`.
fn parse_parent_args(args: &[String]) -> Result<Option<Options>, String> {
    let mut opts = Options {
        rounds: 0,
        quick: false,
        workloads: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => opts.quick = true,
            "--rounds" => {
                opts.rounds = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or("--rounds needs a positive number")?;
            }
            "--workload" => {
                let name = it.next().ok_or("--workload needs a name")?;
                let w = WORKLOADS
                    .iter()
                    .find(|w| *w == name)
                    .ok_or_else(|| format!("unknown workload {name:?}; one of {WORKLOADS:?}"))?;
                opts.workloads.push(w);
            }
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if opts.rounds == 0 {
        opts.rounds = if opts.quick { 3 } else { 7 };
    }
    if opts.workloads.is_empty() {
        opts.workloads = WORKLOADS.to_vec();
    }
    Ok(Some(opts))
}

fn parent(opts: &Options) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let nproc = thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "# percpu-alloc compare: {nproc} CPUs available, {}{}",
        plural(opts.rounds, "round"),
        if opts.quick { ", quick sizes" } else { "" }
    );
    println!();

    // samples[workload][allocator]
    let mut samples: Vec<Vec<Vec<Sample>>> = (0..opts.workloads.len())
        .map(|_| (0..ALLOCATORS.len()).map(|_| Vec::new()).collect())
        .collect();
    let mut paths: Vec<Vec<String>> = vec![Vec::new(); ALLOCATORS.len()];
    let started = Instant::now();
    for round in 0..opts.rounds {
        eprint!("round {}/{}:", round + 1, opts.rounds);
        for (w, workload) in opts.workloads.iter().enumerate() {
            eprint!(" {workload}");
            // Interleaved, and each round starts one allocator later, so
            // neither a slow drift in the machine's load nor being the first
            // child after another workload favours one allocator.
            for k in 0..ALLOCATORS.len() {
                let a = (round + k) % ALLOCATORS.len();
                let alloc = ALLOCATORS[a].1;
                let (sample, path) = spawn_child(&exe, alloc, workload, opts.quick)?;
                samples[w][a].push(sample);
                if !paths[a].contains(&path) {
                    paths[a].push(path);
                }
            }
        }
        eprintln!();
    }

    for (a, &(id, alloc)) in ALLOCATORS.iter().enumerate() {
        if id == PERCPU_ID || id == FALLBACK_ID {
            let seen = paths[a].join(", ");
            println!("- {alloc}: per-CPU path {seen}");
            if id == PERCPU_ID && seen != Path::Rseq.to_string() {
                println!("  (rseq is not registered here, so this row measures the fallback too)");
            }
        }
    }
    println!();
    println!(
        "| workload | allocator | median ms | min–max ms | vs system | vs jemalloc \
         | peak RSS MiB | cached at exit KiB |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (w, workload) in opts.workloads.iter().enumerate() {
        let med: Vec<u64> = samples[w]
            .iter()
            .map(|s| median(s.iter().map(|x| x.ns).collect()))
            .collect();
        for (a, &(_, alloc)) in ALLOCATORS.iter().enumerate() {
            let s = &samples[w][a];
            let min = s.iter().map(|x| x.ns).min().unwrap_or(0);
            let max = s.iter().map(|x| x.ns).max().unwrap_or(0);
            let rss = median(s.iter().map(|x| x.maxrss_kib).collect());
            let cached = if matches!(ALLOCATORS[a].0, PERCPU_ID | FALLBACK_ID) {
                median(s.iter().map(|x| x.cached_kib).collect()).to_string()
            } else {
                "-".to_string()
            };
            println!(
                "| {workload} | {alloc} | {:.1} | {:.1}–{:.1} | {:.2} | {:.2} | {:.1} | {cached} |",
                ms(med[a]),
                ms(min),
                ms(max),
                med[a] as f64 / med[0] as f64,
                med[a] as f64 / med[1] as f64,
                rss as f64 / 1024.0,
            );
        }
    }
    println!();
    println!(
        "Times: median over {} of each child's workload time (process start and exit not \
         included), the allocators interleaved in each round, starting one later each round; \
         ratios below 1 are faster than the reference.",
        plural(opts.rounds, "round")
    );
    println!(
        "Peak RSS: median of each child's ru_maxrss (the whole process). Cached at exit: what \
         the per-CPU caches held when the workload ended (median), checked against the caps, \
         then emptied by trim()."
    );
    println!(
        "Every allocator runs behind the same dispatch switch (one atomic load and a match per \
         call), so the switch adds the same cost to each. The whole compare took {:.1} s.",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().position(|a| a == "--child") {
        Some(i) => match args.get(i + 1) {
            Some(workload) => {
                let quick = args.iter().any(|a| a == "--quick");
                child(workload, if quick { 4 } else { 1 })
            }
            None => Err("--child needs a workload".into()),
        },
        None => match parse_parent_args(&args) {
            Ok(Some(opts)) => parent(&opts),
            Ok(None) => {
                println!("{USAGE}");
                Ok(())
            }
            Err(e) => Err(format!("{e}\n{USAGE}")),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("compare: {e}");
            ExitCode::FAILURE
        }
    }
}
