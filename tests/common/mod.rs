//! Helpers shared by the integration test binaries: a PRNG, block patterns,
//! CPU pinning, a watchdog and checks over an allocator's stats.
//!
//! Each binary uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::alloc::{GlobalAlloc, Layout};

use percpu_alloc::{enter_signal_context, ListCounts, PerCpuAlloc};

/// xorshift64*: small, fast and good enough to pick sizes and victims.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        // A zero state would stay zero forever.
        XorShift(mix(seed) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    /// A size spread evenly over the powers of two in `1..=max`, so that
    /// every size class is visited, not just the largest ones.
    pub fn log_size(&mut self, max: usize) -> usize {
        let bits = usize::BITS - max.leading_zeros();
        let top = 1usize << self.below(bits as usize);
        (top + self.below(top)).clamp(1, max)
    }
}

/// splitmix64's finaliser.
pub const fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The word at index `i` of the pattern of a block at `addr` owned under
/// `tag`. Address and tag both go in, so a block handed out twice, or
/// handed back under the wrong owner, shows up as a mismatch.
#[inline]
fn pattern_word(addr: usize, tag: u64, i: usize) -> u64 {
    mix(addr as u64 ^ tag.rotate_left(23) ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

/// Fills `len` bytes at `ptr` with the pattern of (`ptr`, `tag`).
///
/// # Safety
/// `ptr` is valid for writes of `len` bytes.
#[inline]
pub unsafe fn fill(ptr: *mut u8, len: usize, tag: u64) {
    let addr = ptr as usize;
    let words = len / 8;
    for i in 0..words {
        // SAFETY: `i * 8 + 8 <= len`, within the caller's block.
        unsafe { (ptr.add(i * 8) as *mut u64).write_unaligned(pattern_word(addr, tag, i)) };
    }
    let last = pattern_word(addr, tag, words).to_le_bytes();
    for (j, byte) in last.iter().enumerate().take(len % 8) {
        // SAFETY: within the caller's block.
        unsafe { ptr.add(words * 8 + j).write(*byte) };
    }
}

/// The offset of the first byte at `ptr` that does not hold the pattern
/// of (`ptr`, `tag`), if any. Async-signal-safe: no allocation, no panic.
///
/// # Safety
/// `ptr` is valid for reads of `len` bytes.
#[inline]
pub unsafe fn check(ptr: *const u8, len: usize, tag: u64) -> Option<usize> {
    let addr = ptr as usize;
    let words = len / 8;
    for i in 0..words {
        // SAFETY: `i * 8 + 8 <= len`, within the caller's block.
        let got = unsafe { (ptr.add(i * 8) as *const u64).read_unaligned() };
        if got != pattern_word(addr, tag, i) {
            return Some(i * 8);
        }
    }
    let last = pattern_word(addr, tag, words).to_le_bytes();
    for (j, byte) in last.iter().enumerate().take(len % 8) {
        // SAFETY: within the caller's block.
        if unsafe { ptr.add(words * 8 + j).read() } != *byte {
            return Some(words * 8 + j);
        }
    }
    None
}

/// Panics with a readable message if the block's pattern is broken.
///
/// # Safety
/// As [`check`].
pub unsafe fn expect_pattern(ptr: *const u8, len: usize, tag: u64, what: &str) {
    // SAFETY: the caller's contract.
    if let Some(at) = unsafe { check(ptr, len, tag) } {
        panic!("{what}: block {ptr:p} of {len} bytes (tag {tag:#x}) corrupted at byte {at}");
    }
}

/// The CPU the calling thread runs on now.
pub fn current_cpu() -> usize {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    assert!(cpu >= 0, "sched_getcpu failed");
    cpu as usize
}

/// The CPUs the calling thread may run on: call it before pinning.
pub fn cores() -> Vec<core_affinity::CoreId> {
    let cores = core_affinity::get_core_ids().expect("no CPU affinity mask");
    assert!(!cores.is_empty());
    cores
}

/// Pins the calling thread to `core` and returns its CPU number, checking
/// that the thread really runs there now (per-CPU counts are only exact
/// for a thread that cannot move).
pub fn pin(core: core_affinity::CoreId) -> usize {
    assert!(
        core_affinity::set_for_current(core),
        "could not pin to CPU {}",
        core.id
    );
    let cpu = current_cpu();
    assert_eq!(
        cpu, core.id,
        "pinned to CPU {} but running on {cpu}",
        core.id
    );
    cpu
}

/// Lets the calling thread run anywhere again (the kernel keeps only the
/// CPUs the process's cpuset allows).
pub fn unpin() {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in 0..libc::CPU_SETSIZE as usize {
        // SAFETY: `cpu` is below CPU_SETSIZE, the size of `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: a valid set for the calling thread (pid 0).
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    assert_eq!(rc, 0, "sched_setaffinity failed");
}

/// Every list of `alloc` within the cap, allowing the one block of drift
/// that racing task and signal pushes may cause (docs/design.md section 1,
/// "The drift").
pub fn assert_within_caps(alloc: &PerCpuAlloc) {
    for c in alloc.snapshot() {
        assert!(
            c.nr + c.nr_sig <= c.cap + 1,
            "CPU {} class {} ({} bytes): nr {} + nr_sig {} > cap {} + 1",
            c.cpu,
            c.class,
            c.class_size,
            c.nr,
            c.nr_sig,
            c.cap
        );
    }
}

/// Blocks and bytes cached now, read without allocating.
pub fn cached(alloc: &PerCpuAlloc) -> (usize, usize) {
    alloc.snapshot().fold((0, 0), |(n, b), c| {
        (n + c.nr as usize + c.nr_sig as usize, b + c.bytes())
    })
}

/// The first non-empty list, if any (no allocation).
pub fn first_cached(alloc: &PerCpuAlloc) -> Option<ListCounts> {
    alloc.snapshot().next()
}

/// Serialises the tests of one binary that need the process quiet, or
/// that read per-CPU counts of the global allocator.
pub fn serial(lock: &'static Mutex<()>) -> MutexGuard<'static, ()> {
    // A failed test poisons the lock; the others should still run.
    lock.lock().unwrap_or_else(|e| e.into_inner())
}

/// Aborts the whole process if it is still alive after `limit`: a deadlock
/// must fail the run, not hang it. Disarmed on drop.
pub struct Watchdog {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn new(what: &'static str, limit: Duration) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            while !flag.load(Ordering::Acquire) {
                if start.elapsed() > limit {
                    eprintln!("watchdog: {what} still running after {limit:?}: deadlock?");
                    std::process::abort();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Watchdog {
            done,
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `n` blocks of `layout` from `a` (an instance, not the global allocator).
pub fn take(a: &PerCpuAlloc, layout: Layout, n: usize) -> Vec<*mut u8> {
    (0..n)
        .map(|_| {
            // SAFETY: layouts here are non-zero; the caller frees every
            // block with the same layout.
            let p = unsafe { a.alloc(layout) };
            assert!(!p.is_null());
            p
        })
        .collect()
}

/// Frees `blocks` to `a`, in signal context if `signal`.
pub fn give(a: &PerCpuAlloc, layout: Layout, blocks: &[*mut u8], signal: bool) {
    let _guard = signal.then(enter_signal_context);
    for &p in blocks {
        // SAFETY: each block came from `a` with `layout` and is live.
        unsafe { a.dealloc(p, layout) };
    }
}
