//! Signal context (docs/design.md sections 1, 2 and 9): a storm of signals whose
//! handler frees (past the cap) and allocates from the cache while its
//! target threads are inside the allocator, and the signal-list rules
//! checked step by step on private instances pinned to one CPU, on both
//! per-CPU paths.

mod common;

use std::alloc::{alloc, dealloc, GlobalAlloc, Layout};
use std::cell::Cell;
use std::collections::HashSet;
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{
    assert_within_caps, check, cores, expect_pattern, fill, first_cached, pin, serial, unpin,
    Watchdog, XorShift,
};
use percpu_alloc::{
    current_context, enter_signal_context, install_signal_handler, Config, Context, Path,
    PerCpuAlloc, CLASS_SIZES,
};

#[global_allocator]
static ALLOC: PerCpuAlloc = PerCpuAlloc::new();

/// The storm checks the whole process's caches at its end.
static SERIAL: Mutex<()> = Mutex::new(());

const TARGETS: usize = 3;
/// Blocks prepared per target: more than the cap of their class (256), so
/// a handler that frees them all must defer some.
const SLOTS: usize = 320;
/// Signals the handler should run before the storm ends...
const GOAL: usize = 100_000;
/// ... unless this much time passes first (a loaded machine schedules the
/// targets rarely, and each pending signal waits for its target to run)...
const STORM_TIME: Duration = Duration::from_secs(25);
/// ... in which case at least this many must have been handled.
const MIN_HANDLED: usize = 3_000;

const fn layout(size: usize) -> Layout {
    match Layout::from_size_align(size, 8) {
        Ok(l) => l,
        Err(_) => panic!("bad layout"),
    }
}

/// The prepared blocks' layout (one class: 64 bytes).
const SLOT_LAYOUT: Layout = layout(64);
const SLOT_TAG: u64 = 0x5107_b10c;
/// What the handler asks `alloc_cached` for.
const CACHED_LAYOUTS: [Layout; 5] = [
    layout(64),
    layout(32),
    layout(48),
    layout(256),
    layout(1024),
];

/// Per target, blocks for its handler to free (0: empty slot).
static PREPARED: [[AtomicUsize; SLOTS]; TARGETS] =
    [const { [const { AtomicUsize::new(0) }; SLOTS] }; TARGETS];
/// Per target: all its slots are full. The handler frees the prepared
/// blocks only then, all in one go, so that each sweep passes the cap.
static ARMED: [AtomicBool; TARGETS] = [const { AtomicBool::new(false) }; TARGETS];
static SWEEPS: AtomicUsize = AtomicUsize::new(0);
/// Per target, its `pthread_t` once it runs (0: not yet).
static TIDS: [AtomicUsize; TARGETS] = [const { AtomicUsize::new(0) }; TARGETS];
static STOP: AtomicBool = AtomicBool::new(false);
static DELIVERED: AtomicUsize = AtomicUsize::new(0);
/// Per target, signals its handler has run.
static HANDLED: [AtomicUsize; TARGETS] = [const { AtomicUsize::new(0) }; TARGETS];
static HANDLER_FREES: AtomicUsize = AtomicUsize::new(0);
static HANDLER_HITS: AtomicUsize = AtomicUsize::new(0);
static CORRUPT: AtomicUsize = AtomicUsize::new(0);
static WRONG_CONTEXT: AtomicUsize = AtomicUsize::new(0);

/// Signals that arrived while their target was inside `alloc`/`dealloc`.
static INSIDE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // const-initialised, no destructor: readable from a handler.
    static TARGET: Cell<usize> = const { Cell::new(usize::MAX) };
    static IN_ALLOCATOR: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as inside (or outside) an allocator call, for the
/// handler to count. The fences keep the mark where it is written: the
/// compiler may assume the allocator does not read it.
fn in_allocator(inside: bool) {
    compiler_fence(Ordering::SeqCst);
    IN_ALLOCATOR.with(|c| c.set(inside));
    compiler_fence(Ordering::SeqCst);
}

/// `alloc` as the targets call it, marked.
fn marked_alloc(l: Layout) -> *mut u8 {
    in_allocator(true);
    // SAFETY: every layout here has a non-zero size.
    let p = unsafe { alloc(l) };
    in_allocator(false);
    assert!(!p.is_null());
    p
}

/// `dealloc` as the targets call it, marked.
///
/// # Safety
/// As `std::alloc::dealloc`.
unsafe fn marked_dealloc(p: *mut u8, l: Layout) {
    in_allocator(true);
    // SAFETY: the caller's contract.
    unsafe { dealloc(p, l) };
    in_allocator(false);
}

/// The storm's handler. Async-signal-safe: atomics, a const thread-local,
/// pattern checks, frees through the allocator in signal context and
/// `alloc_cached`; no locks, no output, no jemalloc, no panics.
fn on_signal(_sig: libc::c_int) {
    DELIVERED.fetch_add(1, Ordering::Relaxed);
    if current_context() != Context::Signal {
        WRONG_CONTEXT.fetch_add(1, Ordering::Relaxed);
    }
    let me = TARGET.try_with(Cell::get).unwrap_or(usize::MAX);
    if IN_ALLOCATOR.try_with(Cell::get).unwrap_or(false) {
        INSIDE.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(handled) = HANDLED.get(me) {
        handled.fetch_add(1, Ordering::Release);
    }
    let armed = ARMED
        .get(me)
        .is_some_and(|a| a.swap(false, Ordering::Acquire));
    if let (true, Some(slots)) = (armed, PREPARED.get(me)) {
        SWEEPS.fetch_add(1, Ordering::Relaxed);
        for slot in slots {
            let p = slot.swap(0, Ordering::Acquire) as *mut u8;
            if p.is_null() {
                continue;
            }
            // SAFETY: the target filled the block before publishing it, and
            // the swap made it ours alone.
            if unsafe { check(p, SLOT_LAYOUT.size(), SLOT_TAG) }.is_some() {
                CORRUPT.fetch_add(1, Ordering::Relaxed);
            }
            // SAFETY: allocated by the target with SLOT_LAYOUT; freeing in
            // signal context never calls jemalloc.
            unsafe { dealloc(p, SLOT_LAYOUT) };
            HANDLER_FREES.fetch_add(1, Ordering::Relaxed);
        }
    }
    for l in CACHED_LAYOUTS {
        // SAFETY: a valid layout; the block, if any, is freed below with it.
        let p = unsafe { ALLOC.alloc_cached(l) };
        if !p.is_null() {
            // Scribble over all of it: if the cache handed out a block that
            // someone else holds, their pattern check catches it.
            // SAFETY: `p` holds `l.size()` bytes and is ours.
            unsafe {
                std::ptr::write_bytes(p, 0xee, l.size());
                dealloc(p, l);
            }
            HANDLER_HITS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn block_signal(how: libc::c_int) {
    // SAFETY: a local, valid signal set; pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        assert_eq!(
            libc::pthread_sigmask(how, &set, std::ptr::null_mut()),
            0,
            "pthread_sigmask"
        );
    }
}

/// A target: keeps its prepared slots full and churns blocks of its own,
/// checking their patterns, until told to stop.
fn target(me: usize, core: core_affinity::CoreId) -> usize {
    pin(core);
    TARGET.with(|t| t.set(me));
    // SAFETY: pthread_self has no preconditions.
    TIDS[me].store(unsafe { libc::pthread_self() } as usize, Ordering::Release);
    let mut rng = XorShift::new(me as u64 + 77);
    let mut live: Vec<(usize, usize, u64)> = Vec::new();
    let mut rounds = 0;
    while !STOP.load(Ordering::Acquire) {
        // Disarmed while refilling: a sweep in the middle of this loop would
        // empty slots behind it.
        ARMED[me].store(false, Ordering::Release);
        for slot in &PREPARED[me] {
            if slot.load(Ordering::Relaxed) == 0 {
                let p = marked_alloc(SLOT_LAYOUT);
                // SAFETY: `p` holds 64 bytes; filled before it is published,
                // and only this thread's own handler takes it.
                unsafe { fill(p, SLOT_LAYOUT.size(), SLOT_TAG) };
                slot.store(p as usize, Ordering::Release);
            }
        }
        ARMED[me].store(true, Ordering::Release);
        for i in 0..200 {
            let size = rng.log_size(2048);
            let tag = (me as u64) << 40 | (rounds as u64) << 8 | i;
            let p = marked_alloc(layout(size));
            // SAFETY: `p` holds `size` bytes.
            unsafe { fill(p, size, tag) };
            live.push((p as usize, size, tag));
            if live.len() > 300 {
                let (p, size, tag) = live.swap_remove(rng.below(live.len()));
                // SAFETY: live with this layout, filled with `tag`.
                unsafe {
                    expect_pattern(p as *const u8, size, tag, "target's own block");
                    marked_dealloc(p as *mut u8, layout(size));
                }
            }
        }
        rounds += 1;
    }
    // No more signals here: the rest is freed in task context.
    block_signal(libc::SIG_BLOCK);
    ARMED[me].store(false, Ordering::Relaxed);
    for slot in &PREPARED[me] {
        let p = slot.swap(0, Ordering::Acquire) as *mut u8;
        if !p.is_null() {
            // SAFETY: a prepared block nobody else can take now.
            unsafe {
                expect_pattern(p, SLOT_LAYOUT.size(), SLOT_TAG, "prepared block");
                dealloc(p, SLOT_LAYOUT);
            }
        }
    }
    for (p, size, tag) in live {
        // SAFETY: as above.
        unsafe {
            expect_pattern(p as *const u8, size, tag, "target's own block at the end");
            dealloc(p as *mut u8, layout(size));
        }
    }
    rounds
}

/// Sends SIGUSR1 to the targets until the handler has run GOAL times (or
/// STORM_TIME passes). A target gets its next signal only once it handled
/// the last: a second one sent before would just merge with the pending one.
fn sender(core: core_affinity::CoreId) -> usize {
    pin(core);
    let tids: Vec<libc::pthread_t> = TIDS
        .iter()
        .map(|t| loop {
            let tid = t.load(Ordering::Acquire);
            if tid != 0 {
                break tid as libc::pthread_t;
            }
            std::thread::yield_now();
        })
        .collect();
    let mut rng = XorShift::new(5);
    let deadline = Instant::now() + STORM_TIME;
    let mut sent = [0usize; TARGETS];
    while DELIVERED.load(Ordering::Relaxed) < GOAL && Instant::now() < deadline {
        let mut any = false;
        for (t, &tid) in tids.iter().enumerate() {
            if HANDLED[t].load(Ordering::Acquire) < sent[t] {
                continue;
            }
            // SAFETY: the targets run until STOP, which is only set after
            // this thread is joined, so `tid` names a live thread.
            let rc = unsafe { libc::pthread_kill(tid, libc::SIGUSR1) };
            assert_eq!(rc, 0, "pthread_kill");
            sent[t] += 1;
            any = true;
        }
        if any {
            // A varying pause, so signals land at varying points of the
            // targets' allocator calls.
            for _ in 0..rng.below(500) {
                std::hint::spin_loop();
            }
        } else {
            // Every target has one pending: let them run.
            std::thread::yield_now();
        }
    }
    sent.iter().sum()
}

#[test]
fn signal_storm_frees_and_allocates_inside_the_allocator() {
    let _serial = serial(&SERIAL);
    let _watchdog = Watchdog::new("signal storm", Duration::from_secs(60));
    // SAFETY: on_signal only does async-signal-safe work (see its comment).
    unsafe { install_signal_handler(libc::SIGUSR1, on_signal) }.expect("install handler");
    // The sender on one CPU, the targets on another: a signal to the
    // target running there is delivered at once, wherever it is.
    let cores = cores();
    let (sender_core, target_core) = (cores[0], *cores.last().unwrap());
    let start = Instant::now();
    let targets: Vec<_> = (0..TARGETS)
        .map(|i| std::thread::spawn(move || target(i, target_core)))
        .collect();
    let sent = std::thread::spawn(move || sender(sender_core))
        .join()
        .expect("sender failed");
    STOP.store(true, Ordering::Release);
    let rounds: Vec<usize> = targets
        .into_iter()
        .map(|t| t.join().expect("a target failed"))
        .collect();
    let delivered = DELIVERED.load(Ordering::Relaxed);
    let sweeps = SWEEPS.load(Ordering::Relaxed);
    let inside = INSIDE.load(Ordering::Relaxed);
    eprintln!(
        "{sent} signals sent, {delivered} handled ({inside} inside alloc/dealloc), \
         {sweeps} sweeps, {} handler frees, \
         {} cached allocs, target rounds {rounds:?}, {:?}, {:?} path",
        HANDLER_FREES.load(Ordering::Relaxed),
        HANDLER_HITS.load(Ordering::Relaxed),
        start.elapsed(),
        ALLOC.path()
    );
    assert!(
        delivered >= MIN_HANDLED,
        "only {delivered} signals handled in {STORM_TIME:?}"
    );
    assert_eq!(
        CORRUPT.load(Ordering::Relaxed),
        0,
        "prepared blocks corrupted"
    );
    assert_eq!(
        WRONG_CONTEXT.load(Ordering::Relaxed),
        0,
        "handler not in signal context"
    );
    assert!(sweeps > 0, "the handler never found its slots full");
    assert!(inside > 0, "no signal landed inside the allocator");
    assert_eq!(
        HANDLER_FREES.load(Ordering::Relaxed),
        sweeps * SLOTS,
        "each sweep frees every prepared block"
    );
    assert!(
        HANDLER_HITS.load(Ordering::Relaxed) > 0,
        "alloc_cached never hit"
    );

    // Everything joined and freed: nothing allocates now but this thread.
    assert_within_caps(&ALLOC);
    let report = ALLOC.trim();
    assert_eq!(report.cpus_skipped, 0, "{report:?}");
    assert_eq!(first_cached(&ALLOC), None, "cached after trim");
}

fn class_of_64() -> usize {
    CLASS_SIZES.iter().position(|&s| s == 64).unwrap()
}

/// Allocates `n` blocks of 64 bytes from `a`.
fn take(a: &PerCpuAlloc, n: usize) -> Vec<*mut u8> {
    (0..n)
        .map(|_| {
            // SAFETY: a valid layout; every block is freed with it.
            let p = unsafe { a.alloc(SLOT_LAYOUT) };
            assert!(!p.is_null());
            p
        })
        .collect()
}

/// Frees `blocks` to `a`, in signal context if `signal`.
fn give(a: &PerCpuAlloc, blocks: &[*mut u8], signal: bool) {
    let _guard = signal.then(enter_signal_context);
    for &p in blocks {
        // SAFETY: each block came from `a` with SLOT_LAYOUT and is live.
        unsafe { a.dealloc(p, SLOT_LAYOUT) };
    }
}

/// The signal-list rules on `a`, from this thread pinned to one CPU, so
/// every count is exact (docs/design.md section 1, at the boundaries section 9 lists).
fn signal_list_rules(a: &PerCpuAlloc, what: &str) {
    let cores = cores();
    let cpu = pin(*cores.last().unwrap());
    let class = class_of_64();
    let counts = |a: &PerCpuAlloc| {
        let c = a.counts(cpu, class).unwrap();
        (c.nr, c.nr_sig)
    };
    assert_eq!(a.counts(cpu, class).unwrap().cap, 256, "{what}");
    a.trim();
    assert_eq!(counts(a), (0, 0), "{what}");

    // 15 signal-context frees: all on the signal list.
    let blocks = take(a, 16);
    give(a, &blocks[..15], true);
    assert_eq!(counts(a), (0, 15), "{what}: after 15 signal frees");
    // Below the threshold: no splice, a miss (a fresh block).
    let missed = take(a, 1);
    assert!(
        !blocks[..15].contains(&missed[0]),
        "{what}: a listed block handed out"
    );
    assert_eq!(counts(a), (0, 15), "{what}: 15 must not splice");
    // The 16th reaches the threshold: the next alloc splices all 16 and
    // takes one.
    give(a, &blocks[15..], true);
    assert_eq!(counts(a), (0, 16), "{what}");
    let freed: HashSet<*mut u8> = blocks.iter().copied().collect();
    let spliced = take(a, 1);
    assert!(
        freed.contains(&spliced[0]),
        "{what}: splice handed out a stranger"
    );
    assert_eq!(counts(a), (15, 0), "{what}: after the splice");
    // The other 15 are hits, each one of the freed blocks, none twice.
    let hits = take(a, 15);
    let mut seen: HashSet<*mut u8> = hits.iter().copied().collect();
    seen.insert(spliced[0]);
    assert_eq!(seen, freed, "{what}: the spliced blocks, each once");
    assert_eq!(counts(a), (0, 0), "{what}");

    // No splice while the task list has blocks.
    give(a, &hits[..2], false);
    give(a, &hits[2..], true);
    give(a, &spliced, true);
    assert_eq!(counts(a), (2, 14), "{what}");
    give(a, &missed, true);
    assert_eq!(counts(a), (2, 15), "{what}");
    let more = take(a, 5);
    give(a, &more[..1], true);
    // (Three misses above drew on jemalloc; one went back to the signal list.)
    assert_eq!(
        counts(a),
        (0, 16),
        "{what}: two hits, then misses, no splice"
    );
    let all = take(a, 16);
    assert_eq!(
        counts(a),
        (0, 0),
        "{what}: splice once the task list is empty"
    );
    give(a, &all, false);
    give(a, &more[1..], false);
    assert_eq!(counts(a), (20, 0), "{what}");
    a.trim();

    // The cap counts both lists; a signal-context free past it is
    // deferred (never given to jemalloc there), and trim returns it.
    let many = take(a, 260);
    give(a, &many, true);
    assert_eq!(counts(a), (0, 256), "{what}: signal frees stop at the cap");
    let report = a.trim();
    assert_eq!(
        (report.blocks, report.deferred_blocks, report.cpus_skipped),
        (256, 4, 0),
        "{what}: {report:?}"
    );
    let many = take(a, 260);
    give(a, &many[..200], false);
    give(a, &many[200..], true);
    assert_eq!(
        counts(a),
        (200, 56),
        "{what}: task then signal frees up to the cap"
    );
    let report = a.trim();
    assert_eq!(
        (report.blocks, report.deferred_blocks),
        (256, 4),
        "{what}: {report:?}"
    );

    // Deferred blocks go back to jemalloc at task context's next miss on
    // that CPU, without waiting for a trim.
    let many = take(a, 257);
    give(a, &many, true);
    // SAFETY: a valid layout; a miss (nothing of 32 bytes cached), in task
    // context; freed just below.
    unsafe {
        let l = layout(32);
        let p = a.alloc(l);
        assert!(!p.is_null());
        a.dealloc(p, l);
    }
    let report = a.trim();
    assert_eq!(
        (report.blocks, report.deferred_blocks),
        (257, 0),
        "{what}: the miss should have returned the deferred block: {report:?}"
    );
    unpin();
}

#[test]
fn signal_list_rules_on_the_default_path() {
    let _serial = serial(&SERIAL);
    let a = PerCpuAlloc::with_config(Config::new());
    signal_list_rules(&a, "default instance");
}

#[test]
fn signal_list_rules_on_the_fallback_path() {
    let _serial = serial(&SERIAL);
    let a = PerCpuAlloc::with_config(Config::new().with_force_fallback(true));
    assert_eq!(a.path(), Path::Fallback);
    signal_list_rules(&a, "fallback instance");
}

static SEEN_CONTEXT: AtomicUsize = AtomicUsize::new(0);
/// Where a local of the last `record_context` was.
static SEEN_STACK: AtomicUsize = AtomicUsize::new(0);

fn record_context(_sig: libc::c_int) {
    let code = match current_context() {
        Context::Task => 1,
        Context::Signal => 2,
        Context::Other => 3,
    };
    SEEN_CONTEXT.store(code, Ordering::Relaxed);
    let here = 0u8;
    SEEN_STACK.store(
        std::hint::black_box(&here) as *const u8 as usize,
        Ordering::Relaxed,
    );
}

#[test]
fn contexts_and_handler_installation() {
    let _serial = serial(&SERIAL);
    assert_eq!(current_context(), Context::Task);
    {
        let _outer = enter_signal_context();
        assert_eq!(current_context(), Context::Signal);
        {
            let _inner = enter_signal_context();
            assert_eq!(current_context(), Context::Signal);
        }
        assert_eq!(current_context(), Context::Signal, "guards nest");
    }
    assert_eq!(current_context(), Context::Task);

    // SAFETY: record_context only reads a thread-local and stores an atomic.
    unsafe { install_signal_handler(libc::SIGUSR2, record_context) }.expect("install");
    // SAFETY: we handle SIGUSR2; raise runs the handler before returning.
    assert_eq!(unsafe { libc::raise(libc::SIGUSR2) }, 0);
    assert_eq!(
        SEEN_CONTEXT.load(Ordering::Relaxed),
        2,
        "handler ran in signal context"
    );
    assert_eq!(
        current_context(),
        Context::Task,
        "the mark ends with the handler"
    );
    // On this thread's own stack, a few KiB below us (the kernel's signal
    // frame, the trampoline), not on the small alternate stack std gives
    // each thread, which a debug build's free overflowed.
    let here = 0u8;
    let ours = std::hint::black_box(&here) as *const u8 as usize;
    let theirs = SEEN_STACK.load(Ordering::Relaxed);
    assert!(
        theirs < ours && ours - theirs < 64 * 1024,
        "handler's stack at {theirs:#x}, the thread's at {ours:#x}"
    );

    for bad in [0, -1, 65, 1000] {
        // SAFETY: the signal number is invalid, so nothing is installed.
        let err = unsafe { install_signal_handler(bad, record_context) }.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "signal {bad}");
    }
    // SIGKILL cannot be caught: sigaction's error comes back.
    // SAFETY: the kernel refuses it, so nothing is installed.
    assert!(unsafe { install_signal_handler(libc::SIGKILL, record_context) }.is_err());
}
