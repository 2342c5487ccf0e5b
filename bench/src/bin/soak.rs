//! Soak and stress runner: `PerCpuAlloc` as the global allocator under
//! random work, with faults injected while it runs, checking that no block
//! is corrupted, handed out twice or lost.
//!
//! ```text
//! cargo run --release -p percpu-bench --bin soak -- --seconds 60
//! GLIBC_TUNABLES=glibc.pthread.rseq=0 cargo run --release -p percpu-bench --bin soak -- --seconds 60
//! cargo run --release -p percpu-bench --bin soak -- --threads 8 --seconds 1800 --seed 7
//! cargo run --release -p percpu-bench --bin soak -- --no-signals --no-forks --no-migrate --no-churn
//! ```
//!
//! Workers allocate random sizes (every class and beyond, up to 256 KiB)
//! and alignments (up to 4096), some zeroed, and free, reallocate and pass
//! blocks to each other at random. Every live block carries a pattern
//! derived from its address and a generation number (bumped by each
//! realloc), checked before every free, after every realloc (the kept
//! prefix) and on receipt from another thread. A registry of live
//! addresses catches a block handed out twice the moment it happens.
//!
//! Faults, each on by default:
//! - signals: a thread sends SIGUSR1 to random workers; the handler (in
//!   signal context, through `install_signal_handler`) frees a block from
//!   the worker's stash and takes one with `alloc_cached`;
//! - forks: workers fork now and then; the child checks its copy of the
//!   worker's blocks, allocates, frees, trims and exits;
//! - migrations: a thread moves workers between CPUs with
//!   `sched_setaffinity`;
//! - churn: a thread keeps creating short-lived threads that allocate,
//!   free and hand blocks to workers.
//!
//! At the end every block is freed and the run checks: blocks allocated =
//! blocks freed, the registry is empty, `trim()` leaves nothing cached, and
//! jemalloc's allocated bytes are back to the baseline taken before the
//! workers started, within 64 KiB. The last line says `soak: OK` or the run
//! exits non-zero with what went wrong.

use std::alloc::{GlobalAlloc, Layout};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use percpu_alloc::{install_signal_handler, PerCpuAlloc};

#[global_allocator]
static ALLOC: PerCpuAlloc = PerCpuAlloc::new();

// ---------------------------------------------------------------------------
// Options.

struct Opts {
    threads: usize,
    seconds: u64,
    seed: u64,
    signals: bool,
    forks: bool,
    migrate: bool,
    churn: bool,
}

fn parse_args() -> Opts {
    let mut o = Opts {
        threads: 4,
        seconds: 60,
        seed: 1,
        signals: true,
        forks: true,
        migrate: true,
        churn: true,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let mut value = || -> u64 {
            rest.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| die(&format!("{arg} needs a number")))
        };
        match arg.as_str() {
            "--threads" => o.threads = value().max(1) as usize,
            "--seconds" => o.seconds = value(),
            "--seed" => o.seed = value(),
            "--no-signals" => o.signals = false,
            "--no-forks" => o.forks = false,
            "--no-migrate" => o.migrate = false,
            "--no-churn" => o.churn = false,
            other => die(&format!("unknown argument {other}")),
        }
    }
    o
}

fn die(msg: &str) -> ! {
    eprintln!("soak: {msg}");
    std::process::exit(2)
}

/// A failure found while other threads run: say it and leave at once,
/// without unwinding through threads that hold blocks.
fn fail(msg: &str) -> ! {
    eprintln!("soak: FAILED: {msg}");
    // SAFETY: ends the process; nothing after it runs.
    unsafe { libc::_exit(1) }
}

// ---------------------------------------------------------------------------
// Counters.

struct Counts {
    ops: AtomicU64,
    allocs: AtomicU64,
    frees: AtomicU64,
    reallocs: AtomicU64,
    zeroed: AtomicU64,
    transfers: AtomicU64,
    signals_sent: AtomicU64,
    signals_handled: AtomicU64,
    signal_frees: AtomicU64,
    signal_allocs: AtomicU64,
    forks: AtomicU64,
    migrations: AtomicU64,
    threads_spawned: AtomicU64,
}

static COUNTS: Counts = Counts {
    ops: AtomicU64::new(0),
    allocs: AtomicU64::new(0),
    frees: AtomicU64::new(0),
    reallocs: AtomicU64::new(0),
    zeroed: AtomicU64::new(0),
    transfers: AtomicU64::new(0),
    signals_sent: AtomicU64::new(0),
    signals_handled: AtomicU64::new(0),
    signal_frees: AtomicU64::new(0),
    signal_allocs: AtomicU64::new(0),
    forks: AtomicU64::new(0),
    migrations: AtomicU64::new(0),
    threads_spawned: AtomicU64::new(0),
};

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

static STOP: AtomicBool = AtomicBool::new(false);

fn stopping() -> bool {
    STOP.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------
// Blocks, patterns and the registry.

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// A live block and what it must contain.
#[derive(Clone, Copy)]
struct Block {
    addr: usize,
    size: usize,
    align: usize,
    gen: u64,
}

impl Block {
    fn layout(&self) -> Layout {
        Layout::from_size_align(self.size, self.align).unwrap()
    }

    fn byte(&self, i: usize) -> u8 {
        let word = mix(self.addr as u64 ^ self.gen.rotate_left(29) ^ (i / 8) as u64);
        (word >> ((i % 8) * 8)) as u8
    }

    fn fill(&self) {
        let p = self.addr as *mut u8;
        for i in 0..self.size {
            // SAFETY: the block holds `size` bytes and is ours.
            unsafe { p.add(i).write(self.byte(i)) };
        }
    }

    /// Checks the first `len` bytes against the pattern of generation
    /// `gen`.
    fn check(&self, len: usize, gen: u64, what: &str) {
        let p = self.addr as *const u8;
        let expected = Block { gen, ..*self };
        for i in 0..len.min(self.size) {
            // SAFETY: the block holds `size` bytes and is ours.
            let got = unsafe { p.add(i).read() };
            if got != expected.byte(i) {
                fail(&format!(
                    "{what}: block {:#x} ({} bytes, align {}, generation {gen}) corrupted at byte {i}",
                    self.addr, self.size, self.align
                ));
            }
        }
    }

    fn verify(&self, what: &str) {
        self.check(self.size, self.gen, what);
    }
}

/// Live addresses, sharded to keep the lock cheap.
struct Registry([Mutex<Option<HashSet<usize>>>; 64]);

static REGISTRY: Registry = Registry([const { Mutex::new(None) }; 64]);

impl Registry {
    fn shard(&self, addr: usize) -> std::sync::MutexGuard<'_, Option<HashSet<usize>>> {
        let i = (mix(addr as u64) % 64) as usize;
        self.0[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Made before the baseline, with room for the run, so its growth does
    /// not count as a leak.
    fn prepare(&self, per_shard: usize) {
        for shard in &self.0 {
            *shard.lock().unwrap() = Some(HashSet::with_capacity(per_shard));
        }
    }

    fn add(&self, addr: usize) {
        let mut shard = self.shard(addr);
        if !shard.get_or_insert_with(HashSet::new).insert(addr) {
            drop(shard);
            fail(&format!("block {addr:#x} handed out while still live"));
        }
    }

    fn remove(&self, addr: usize) {
        let mut shard = self.shard(addr);
        if !shard.as_mut().is_some_and(|s| s.remove(&addr)) {
            drop(shard);
            fail(&format!("freeing {addr:#x}, which is not live"));
        }
    }

    fn len(&self) -> usize {
        self.0
            .iter()
            .map(|s| s.lock().unwrap().as_ref().map_or(0, HashSet::len))
            .sum()
    }
}

// ---------------------------------------------------------------------------
// Allocation through the global allocator, checked.

fn random_layout(rng: &mut Rng) -> (usize, usize) {
    let size = match rng.below(100) {
        0..=69 => 1 + rng.below(1024),
        70..=89 => 1025 + rng.below(16 * 1024),
        90..=97 => 1 + rng.below(256 * 1024),
        _ => 8 << rng.below(8),
    };
    let align = if rng.chance(85) {
        8
    } else {
        [1, 16, 32, 64, 128, 4096][rng.below(6)]
    };
    (size, align)
}

fn alloc_block(rng: &mut Rng) -> Block {
    let (size, align) = random_layout(rng);
    let layout = Layout::from_size_align(size, align).unwrap();
    let zeroed = rng.chance(15);
    // SAFETY: a non-zero size.
    let p = unsafe {
        if zeroed {
            ALLOC.alloc_zeroed(layout)
        } else {
            ALLOC.alloc(layout)
        }
    };
    if p.is_null() {
        fail(&format!("alloc({size}, {align}) returned null"));
    }
    if !(p as usize).is_multiple_of(align) {
        fail(&format!("alloc({size}, {align}) = {p:p}, misaligned"));
    }
    bump(&COUNTS.allocs);
    REGISTRY.add(p as usize);
    if zeroed {
        bump(&COUNTS.zeroed);
        for i in 0..size {
            // SAFETY: the new block holds `size` bytes.
            if unsafe { p.add(i).read() } != 0 {
                fail(&format!("alloc_zeroed({size}, {align}): byte {i} not zero"));
            }
        }
    }
    let block = Block {
        addr: p as usize,
        size,
        align,
        gen: rng.next_u64(),
    };
    block.fill();
    block
}

fn free_block(block: Block, what: &str) {
    block.verify(what);
    REGISTRY.remove(block.addr);
    bump(&COUNTS.frees);
    // SAFETY: live, from ALLOC with this layout, verified ours.
    unsafe { ALLOC.dealloc(block.addr as *mut u8, block.layout()) };
}

fn realloc_block(block: Block, rng: &mut Rng) -> Block {
    block.verify("block before realloc");
    let (new_size, _) = random_layout(rng);
    REGISTRY.remove(block.addr);
    // SAFETY: live, from ALLOC with this layout; new size is non-zero and
    // small.
    let p = unsafe { ALLOC.realloc(block.addr as *mut u8, block.layout(), new_size) };
    if p.is_null() {
        fail(&format!(
            "realloc({} -> {new_size}) returned null",
            block.size
        ));
    }
    REGISTRY.add(p as usize);
    bump(&COUNTS.reallocs);
    let moved = Block {
        addr: p as usize,
        size: new_size,
        ..block
    };
    // The kept prefix still holds the old pattern, which was computed from
    // the old address.
    let old = Block {
        addr: block.addr,
        ..moved
    };
    for i in 0..block.size.min(new_size) {
        // SAFETY: the new block holds `new_size` bytes.
        let got = unsafe { (p as *const u8).add(i).read() };
        if got != old.byte(i) {
            fail(&format!(
                "realloc {:#x} ({} bytes) -> {p:p} ({new_size}): byte {i} not kept",
                block.addr, block.size
            ));
        }
    }
    let fresh = Block {
        gen: block.gen.wrapping_add(1),
        ..moved
    };
    fresh.fill();
    fresh
}

// ---------------------------------------------------------------------------
// Signals: a stash per worker that its handler frees from and refills.

const STASH_SLOTS: usize = 8;
const STASH_SIZE: usize = 64;
const STASH_GEN: u64 = 0x5157;

struct Stash([AtomicUsize; STASH_SLOTS]);

thread_local! {
    // Const-initialised, no destructor: a plain TLS read, safe in a handler.
    static MY_STASH: std::cell::Cell<*const Stash> = const { std::cell::Cell::new(std::ptr::null()) };
}

fn stash_layout() -> Layout {
    Layout::from_size_align(STASH_SIZE, 8).unwrap()
}

fn stash_block(addr: usize) -> Block {
    Block {
        addr,
        size: STASH_SIZE,
        align: 8,
        gen: STASH_GEN,
    }
}

/// Async-signal-safe failure: `write` and `_exit` only.
fn fail_in_handler(msg: &[u8]) -> ! {
    // SAFETY: writes a static buffer, then ends the process.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(1)
    }
}

/// Runs in signal context (the helper marks it). Touches only atomics,
/// the stash and the allocator's signal-safe paths.
fn on_signal(_sig: libc::c_int) {
    bump(&COUNTS.signals_handled);
    let stash = match MY_STASH.try_with(|s| s.get()) {
        Ok(p) if !p.is_null() => p,
        _ => return,
    };
    // SAFETY: a worker's stash outlives the worker's signal handling: the
    // worker clears `MY_STASH` before its stash goes away.
    let stash = unsafe { &*stash };
    for slot in &stash.0 {
        let addr = slot.swap(0, Ordering::AcqRel);
        if addr != 0 {
            let block = stash_block(addr);
            for i in 0..STASH_SIZE {
                // SAFETY: a stash block holds 64 bytes and is now ours.
                if unsafe { (addr as *const u8).add(i).read() } != block.byte(i) {
                    fail_in_handler(b"soak: FAILED: stash block corrupted (seen in a handler)\n");
                }
            }
            // SAFETY: from ALLOC with the stash layout; frees in signal
            // context go to the signal list.
            unsafe { ALLOC.dealloc(addr as *mut u8, stash_layout()) };
            bump(&COUNTS.signal_frees);
            bump(&COUNTS.frees);
            break;
        }
    }
    // SAFETY: a valid layout; `alloc_cached` never calls jemalloc.
    let p = unsafe { ALLOC.alloc_cached(stash_layout()) };
    if !p.is_null() {
        bump(&COUNTS.signal_allocs);
        bump(&COUNTS.allocs);
        let block = stash_block(p as usize);
        for i in 0..STASH_SIZE {
            // SAFETY: the new block holds 64 bytes.
            unsafe { p.add(i).write(block.byte(i)) };
        }
        let placed = stash.0.iter().any(|slot| {
            slot.compare_exchange(0, p as usize, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        });
        if !placed {
            // SAFETY: ours, with the stash layout.
            unsafe { ALLOC.dealloc(p, stash_layout()) };
            bump(&COUNTS.frees);
        }
    }
}

fn refill_stash(stash: &Stash) {
    for slot in &stash.0 {
        if slot.load(Ordering::Relaxed) != 0 {
            continue;
        }
        // SAFETY: a valid, non-zero layout.
        let p = unsafe { ALLOC.alloc(stash_layout()) };
        if p.is_null() {
            fail("stash alloc returned null");
        }
        bump(&COUNTS.allocs);
        stash_block(p as usize).fill();
        if slot
            .compare_exchange(0, p as usize, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            // A handler filled the slot meanwhile.
            // SAFETY: ours, with the stash layout.
            unsafe { ALLOC.dealloc(p, stash_layout()) };
            bump(&COUNTS.frees);
        }
    }
}

fn drain_stash(stash: &Stash) {
    for slot in &stash.0 {
        let addr = slot.swap(0, Ordering::AcqRel);
        if addr != 0 {
            stash_block(addr).verify("stash block at the end");
            // SAFETY: ours, with the stash layout.
            unsafe { ALLOC.dealloc(addr as *mut u8, stash_layout()) };
            bump(&COUNTS.frees);
        }
    }
}

// ---------------------------------------------------------------------------
// Forks.

/// In the child: check this thread's blocks (the child's copy), allocate,
/// free, trim, and leave with `_exit`. Touches no lock the parent's other
/// threads may have held (no registry, no stdio).
fn in_child(live: &[Block]) -> ! {
    for b in live.iter().take(200) {
        for i in 0..b.size.min(256) {
            // SAFETY: the child's copy of a block this thread owned.
            if unsafe { (b.addr as *const u8).add(i).read() } != b.byte(i) {
                fail_in_handler(b"soak: FAILED: a block's copy in a fork child is corrupted\n");
            }
        }
    }
    let boxes: Vec<Box<[u64; 6]>> = (0..2000u64).map(|i| Box::new([i; 6])).collect();
    let strings: Vec<String> = (0..500).map(|i| format!("child string {i}")).collect();
    let ok = boxes.iter().enumerate().all(|(i, b)| b[5] == i as u64)
        && strings
            .iter()
            .enumerate()
            .all(|(i, s)| s.ends_with(&i.to_string()));
    drop(boxes);
    drop(strings);
    let report = ALLOC.trim();
    let code = if !ok {
        4
    } else if ALLOC.cached_bytes() != 0 || report.cpus_skipped != 0 {
        5
    } else {
        0
    };
    // SAFETY: ends the child without running the parent's exit handlers.
    unsafe { libc::_exit(code) }
}

fn fork_and_check(live: &[Block]) {
    // SAFETY: the child runs only `in_child`, which ends in `_exit`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return; // Out of processes: not the allocator's fault.
    }
    if pid == 0 {
        in_child(live);
    }
    bump(&COUNTS.forks);
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waits for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
                fail(&format!("fork child failed: status {status:#x}"));
            }
            return;
        }
        if start.elapsed() > Duration::from_secs(20) {
            // SAFETY: our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            fail("a fork child hung for 20 s (a lock or slot left taken?)");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

// ---------------------------------------------------------------------------
// Workers.

fn gettid() -> i32 {
    // SAFETY: no arguments, no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

struct Worker {
    id: usize,
    rng: Rng,
    live: Vec<Block>,
    inbox: Receiver<Block>,
    peers: Vec<Sender<Block>>,
}

fn run_worker(mut w: Worker, opts: &Opts, tid: &AtomicI32, barrier: &Barrier) {
    tid.store(gettid(), Ordering::Release);
    let stash = Stash([const { AtomicUsize::new(0) }; STASH_SLOTS]);
    if opts.signals {
        MY_STASH.with(|s| s.set(&stash));
    }
    let target = 200 + w.rng.below(2000);
    let mut next_fork = 10_000 + w.rng.below(20_000);
    let mut n = 0usize;
    while !stopping() {
        n += 1;
        bump(&COUNTS.ops);
        while let Ok(b) = w.inbox.try_recv() {
            b.verify("block received from another thread");
            w.live.push(b);
        }
        let roll = w.rng.below(100);
        if w.live.is_empty() || (roll < 45 && w.live.len() < target) {
            let b = alloc_block(&mut w.rng);
            w.live.push(b);
        } else if roll < 85 {
            let at = w.rng.below(w.live.len());
            free_block(w.live.swap_remove(at), "block freed by its worker");
        } else if roll < 95 {
            let at = w.rng.below(w.live.len());
            let b = realloc_block(w.live.swap_remove(at), &mut w.rng);
            w.live.push(b);
        } else {
            let at = w.rng.below(w.live.len());
            let to = w.rng.below(w.peers.len());
            let b = w.live.swap_remove(at);
            if w.peers[to].send(b).is_err() {
                fail("a worker's inbox closed early");
            }
            bump(&COUNTS.transfers);
        }
        if opts.signals && n.is_multiple_of(16) {
            refill_stash(&stash);
        }
        if opts.forks && n == next_fork {
            fork_and_check(&w.live);
            next_fork += 10_000 + w.rng.below(20_000);
        }
    }
    // Phase 1 over: nobody sends any more once everyone is here.
    barrier.wait();
    while let Ok(b) = w.inbox.try_recv() {
        b.verify("block received at the end");
        w.live.push(b);
    }
    for b in w.live.drain(..) {
        free_block(b, "block freed at the end");
    }
    // Signals stopped before the barrier; clear the handler's view of the
    // stash before it goes away.
    MY_STASH.with(|s| s.set(std::ptr::null()));
    drain_stash(&stash);
    let _ = w.id;
}

/// Short-lived threads: allocate, free some, hand the rest to workers.
fn churn(peers: &[Sender<Block>], seed: u64) {
    let mut rng = Rng(seed | 1);
    while !stopping() {
        let peer = peers[rng.below(peers.len())].clone();
        let seed = rng.next_u64() | 1;
        std::thread::spawn(move || {
            let mut rng = Rng(seed);
            let mut mine: Vec<Block> = (0..50 + rng.below(300))
                .map(|_| alloc_block(&mut rng))
                .collect();
            let keep = mine.split_off(mine.len() / 2);
            for b in mine {
                free_block(b, "block freed by a short-lived thread");
            }
            for b in keep {
                if let Err(e) = peer.send(b) {
                    free_block(e.0, "block a worker could not take");
                } else {
                    bump(&COUNTS.transfers);
                }
            }
        })
        .join()
        .unwrap_or_else(|_| fail("a short-lived thread panicked"));
        bump(&COUNTS.threads_spawned);
    }
}

/// Sends SIGUSR1 to random workers.
fn signaller(tids: &[AtomicI32], seed: u64) {
    let mut rng = Rng(seed | 1);
    // SAFETY: no arguments, no preconditions.
    let pid = unsafe { libc::getpid() };
    while !stopping() {
        let tid = tids[rng.below(tids.len())].load(Ordering::Acquire);
        if tid > 0 {
            // SAFETY: signals a thread of this process that has a handler.
            let r = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGUSR1) };
            if r == 0 {
                bump(&COUNTS.signals_sent);
            }
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Moves random workers to random CPUs (or lets them run anywhere).
fn migrator(tids: &[AtomicI32], seed: u64) {
    let cpus: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    if cpus.len() < 2 {
        return;
    }
    let mut rng = Rng(seed | 1);
    while !stopping() {
        let tid = tids[rng.below(tids.len())].load(Ordering::Acquire);
        if tid > 0 {
            // SAFETY: cpu_set_t is a plain bit array; zeroes are the empty
            // set.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            let all = rng.chance(20);
            for &cpu in &cpus {
                if all || cpu == cpus[rng.below(cpus.len())] {
                    // SAFETY: `cpu` is an id the kernel gave us, below
                    // CPU_SETSIZE.
                    unsafe { libc::CPU_SET(cpu, &mut set) };
                }
            }
            let pick = cpus[rng.below(cpus.len())];
            // SAFETY: as above; one CPU at least is in the set.
            unsafe { libc::CPU_SET(pick, &mut set) };
            // SAFETY: a valid set for a thread of this process.
            let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
            if r == 0 {
                bump(&COUNTS.migrations);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn jemalloc_allocated() -> Option<usize> {
    // This thread's jemalloc cache counts as allocated; empty it first.
    // SAFETY: "thread.tcache.flush" takes no input and gives no output.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            c"thread.tcache.flush".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    tikv_jemalloc_ctl::stats::allocated::read().ok()
}

fn main() {
    let opts = parse_args();
    let path = ALLOC.path();
    if let Some(want) = std::env::var("PERCPU_EXPECT_PATH")
        .ok()
        .filter(|s| !s.is_empty())
    {
        if want != path.to_string() {
            die(&format!("expected the {want} path, but {path} is live"));
        }
    }
    if opts.signals {
        // SAFETY: the handler uses only atomics, the stash and the
        // allocator's signal-safe paths.
        unsafe { install_signal_handler(libc::SIGUSR1, on_signal) }
            .unwrap_or_else(|e| die(&format!("installing the handler: {e}")));
    }
    eprintln!(
        "soak: {} threads, {} s, seed {}, {path} path; signals {}, forks {}, migrations {}, churn {}",
        opts.threads, opts.seconds, opts.seed, opts.signals, opts.forks, opts.migrate, opts.churn
    );

    REGISTRY.prepare(8192);
    let (senders, inboxes): (Vec<_>, Vec<_>) = (0..opts.threads).map(|_| channel()).unzip();
    let tids: Vec<AtomicI32> = (0..opts.threads).map(|_| AtomicI32::new(0)).collect();
    let barrier = Barrier::new(opts.threads + 1);
    ALLOC.trim();
    let baseline = jemalloc_allocated();
    let start = Instant::now();

    // A deadlock must fail the run, not hang it.
    let limit = Duration::from_secs(opts.seconds + 120);
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        fail(&format!("still running after {limit:?}: deadlock?"));
    });

    std::thread::scope(|s| {
        let mut workers = Vec::new();
        for (id, inbox) in inboxes.into_iter().enumerate() {
            let w = Worker {
                id,
                rng: Rng(mix(opts.seed ^ id as u64) | 1),
                live: Vec::new(),
                inbox,
                peers: senders.clone(),
            };
            let (opts, tid, barrier) = (&opts, &tids[id], &barrier);
            workers.push(s.spawn(move || run_worker(w, opts, tid, barrier)));
        }
        let faults = s.spawn(|| {
            std::thread::scope(|f| {
                let mut threads = Vec::new();
                if opts.signals {
                    threads.push(f.spawn(|| signaller(&tids, opts.seed ^ 0x51)));
                }
                if opts.migrate {
                    threads.push(f.spawn(|| migrator(&tids, opts.seed ^ 0x4d)));
                }
                if opts.churn {
                    threads.push(f.spawn(|| churn(&senders, opts.seed ^ 0xc4)));
                }
                for t in threads {
                    t.join().unwrap_or_else(|_| fail("a fault thread panicked"));
                }
            })
        });
        let mut last = Instant::now();
        while start.elapsed() < Duration::from_secs(opts.seconds) {
            std::thread::sleep(Duration::from_millis(100));
            if last.elapsed() >= Duration::from_secs(10) {
                last = Instant::now();
                eprintln!(
                    "soak: {:>5} s  ops {}  signals {}  forks {}  migrations {}  threads {}",
                    start.elapsed().as_secs(),
                    COUNTS.ops.load(Ordering::Relaxed),
                    COUNTS.signals_handled.load(Ordering::Relaxed),
                    COUNTS.forks.load(Ordering::Relaxed),
                    COUNTS.migrations.load(Ordering::Relaxed),
                    COUNTS.threads_spawned.load(Ordering::Relaxed),
                );
            }
        }
        STOP.store(true, Ordering::Relaxed);
        // Faults (and the churn threads' sends) end before the workers'
        // final drain.
        faults
            .join()
            .unwrap_or_else(|_| fail("the fault threads failed"));
        barrier.wait();
        // Joined by hand: a scope's implicit wait ends when the closures
        // return, before the threads' exit (and jemalloc's thread-cache
        // flush) is over, which the byte count below would see.
        for w in workers {
            w.join().unwrap_or_else(|_| fail("a worker panicked"));
        }
    });
    let elapsed = start.elapsed();
    drop(senders);

    let c = |x: &AtomicU64| x.load(Ordering::Relaxed);
    let (allocs, frees) = (c(&COUNTS.allocs), c(&COUNTS.frees));
    if allocs != frees {
        fail(&format!(
            "{allocs} blocks allocated, {frees} freed: {} lost",
            allocs as i64 - frees as i64
        ));
    }
    if REGISTRY.len() != 0 {
        fail(&format!("{} blocks still registered live", REGISTRY.len()));
    }
    let trimmed = ALLOC.trim();
    let stats = ALLOC.stats();
    if trimmed.cpus_skipped != 0 || stats.cached_blocks != 0 || stats.deferred_blocks != 0 {
        fail(&format!(
            "after a full trim: {} CPUs skipped, {} blocks cached, {} deferred",
            trimmed.cpus_skipped, stats.cached_blocks, stats.deferred_blocks
        ));
    }
    let delta = match (baseline, jemalloc_allocated()) {
        (Some(before), Some(after)) => {
            let delta = after as i64 - before as i64;
            if delta.abs() > 64 << 10 {
                fail(&format!(
                    "jemalloc holds {delta} bytes more than before the run (tolerance 64 KiB)"
                ));
            }
            delta.to_string()
        }
        _ => "unknown".to_string(),
    };
    println!(
        "soak: OK  path={path} threads={} seconds={:.0} ops={} allocs={allocs} frees={frees} reallocs={} zeroed={} transfers={} \
         signals_sent={} signals_handled={} signal_frees={} signal_allocs={} forks={} migrations={} threads_spawned={} \
         corruptions=0 leaked=0 jemalloc_delta_bytes={delta}",
        opts.threads,
        elapsed.as_secs_f64(),
        c(&COUNTS.ops),
        c(&COUNTS.reallocs),
        c(&COUNTS.zeroed),
        c(&COUNTS.transfers),
        c(&COUNTS.signals_sent),
        c(&COUNTS.signals_handled),
        c(&COUNTS.signal_frees),
        c(&COUNTS.signal_allocs),
        c(&COUNTS.forks),
        c(&COUNTS.migrations),
        c(&COUNTS.threads_spawned),
    );
}
