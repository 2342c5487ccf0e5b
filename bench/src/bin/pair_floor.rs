//! How far the hot pair can go: the parts of its time that no allocator
//! design removes, measured on this machine for the report.
//!
//! The hot uninitialised pair of `workloads` (`pair init=none`) costs a
//! program its own loop (the `Box` glue, the byte written and read back
//! through `black_box`, the loop) plus the allocator's alloc and free.
//! This program measures two of those parts:
//!
//! - `loop`: the same loop under a global allocator that does nothing (it
//!   hands out one static block and frees nothing), so the time is the
//!   program's own;
//! - `sections`: two bare rseq-style sections per pair, as the hit paths
//!   run them and nothing else: the `rseq_cs` store, the `cpu_id` load,
//!   the CPU's record from a table, the count and the slot;
//! - `chain`: the count word alone, read and written back by the pop and
//!   the push, the one chain of latencies a pair carries from one to the
//!   next (each load waits for the store before it);
//! - `locks`: for the try-lock fallback, two takes and releases of a slot
//!   per pair (a compare-and-swap and a release store each), which every
//!   fallback pair pays before any list work.
//!
//! Their sum against jemalloc's pair estimates the floor of `percpu /
//! jemalloc`: both parts are bound by instruction throughput, not by a
//! chain of latencies, so they add, and a hit path with no instruction
//! beyond its section would still cost that much. The report runs this
//! beside the whole programs and prints it.
//!
//! ```text
//! cargo run --release -p percpu-bench --bin pair_floor -- ops=100000000
//! result workload=pair_floor loop_ns=.. sections_ns=.. chain_ns=.. locks_ns=.. ops=..
//! ```
//!
//! `sections` needs x86_64 Linux with glibc's rseq registration, and reads
//! `-` elsewhere. With the bench crate's `global` feature (the library's
//! own global allocator) the null allocator cannot be installed, and the
//! program says so and stops.

// With `global` the null allocator is not installed, and only `main`'s
// refusal is left of the program.
#![cfg_attr(feature = "global", allow(dead_code))]

use std::time::Instant;

#[cfg(not(feature = "global"))]
#[global_allocator]
static NULL: Null = Null;

/// A global allocator that serves the pair's 64-byte box from one static
/// block and everything else (the runtime's start-up) from a bump region
/// it never reuses; nothing is freed.
struct Null;

/// The hot block at the start; the bump region after it.
#[repr(C, align(4096))]
struct Arena(std::cell::UnsafeCell<[u8; ARENA_LEN]>);

const ARENA_LEN: usize = 4 << 20;

// SAFETY: the hot block is only used by the one thread that runs the
// pair; bump allocations are disjoint (an atomic hands them out).
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(std::cell::UnsafeCell::new([0; ARENA_LEN]));
static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(4096);

// SAFETY: the hot block (64 bytes, 4096-aligned) serves only 64-byte
// byte-aligned layouts, which only the timed loop asks for, one at a time;
// every other layout gets fresh bump memory aligned to a page (alignments
// above a page, or the region running out, get null).
unsafe impl std::alloc::GlobalAlloc for Null {
    #[inline(always)]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let base = ARENA.0.get() as *mut u8;
        // `Box<[u8; 64]>` alone: byte-aligned, so no object of the
        // runtime's (word-aligned) that lives on can get the hot block.
        if layout.size() == 64 && layout.align() == 1 {
            return base;
        }
        if layout.align() > 4096 {
            return std::ptr::null_mut();
        }
        let len = layout.size().next_multiple_of(4096);
        let at = NEXT.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        if at.saturating_add(len) > ARENA_LEN {
            return std::ptr::null_mut();
        }
        // SAFETY: `at + len` is within the arena (checked above).
        unsafe { base.add(at) }
    }

    #[inline(always)]
    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: std::alloc::Layout) {}
}

/// The loop of `workloads`' `pair_uninit_const::<64>`, statement for
/// statement, so that it compiles to the same code around the allocator.
/// A copy, not a shared function: called from the bench library as a
/// generic, the same loop took 3-4% longer under percpu (LLVM hoisted
/// fewer loads out of it), which would move the report's pair row.
#[inline(never)]
fn pair_loop(ops: usize) -> u64 {
    let mut wrong = 0u64;
    for i in 0..ops {
        let mut b = Box::<[u8; 64]>::new_uninit();
        let p = b.as_mut_ptr() as *mut u8;
        // SAFETY: the box holds 64 bytes; the byte is written before it is
        // read.
        let seen = unsafe {
            p.write(i as u8);
            std::hint::black_box(p).read()
        };
        wrong += u64::from(seen != i as u8);
        drop(std::hint::black_box(b));
    }
    wrong
}

#[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
mod sections {
    use core::arch::asm;

    extern "C" {
        static __rseq_offset: isize;
        static __rseq_size: u32;
    }

    /// A record as the sections see it: the count, then the slots.
    #[repr(C, align(64))]
    struct Record {
        count: u64,
        slots: [u64; 15],
    }

    /// `ops` pairs of the count word's round trips: load, subtract,
    /// store; load, add, store.
    pub(super) fn chain(ops: usize) {
        let mut count = 1u64;
        let at: *mut u64 = &mut count;
        for _ in 0..ops {
            // SAFETY: `at` is `count`, a live local.
            unsafe {
                asm!(
                    "mov {w}, qword ptr [{at}]",
                    "sub {w}, 1",
                    "mov qword ptr [{at}], {w}",
                    "mov {w}, qword ptr [{at}]",
                    "add {w}, 1",
                    "mov qword ptr [{at}], {w}",
                    at = in(reg) at,
                    w = out(reg) _,
                    options(nostack),
                );
            }
        }
        // SAFETY: as above.
        assert_eq!(unsafe { at.read() }, 1, "the chain lost count");
    }

    /// What both sections start with: the `rseq_cs` store, `cpu_id`, the
    /// CPU's record into `{r}` and its count into `{w}`.
    macro_rules! enter {
        () => {
            concat!(
                "mov qword ptr fs:[{off} + 8], 0\n",
                "mov {c:e}, dword ptr fs:[{off} + 4]\n",
                "and {c:e}, 4095\n",
                "mov {r}, qword ptr [{bases} + {c} * 8]\n",
                "add {r}, {ro}\n",
                "mov {w}, qword ptr [{r}]\n",
            )
        };
    }

    /// `ops` pairs of bare sections; `None` without an rseq area.
    ///
    /// Each stores 0 into `rseq_cs` (no critical section: the cost of the
    /// store, without a descriptor the kernel would act on), loads
    /// `cpu_id`, finds the CPU's record in a table, and pops a slot or
    /// pushes it back. Nothing is allocated; the record is this thread's.
    pub(super) fn pairs(ops: usize) -> Option<()> {
        // SAFETY: glibc's exported description of its rseq registration.
        let (off, size) = unsafe { (__rseq_offset, __rseq_size) };
        if size == 0 {
            return None;
        }
        // SAFETY: the area is registered: cpu_id is at offset 4.
        let cpu: u32 = unsafe {
            let cpu: u32;
            asm!("mov {c:e}, dword ptr fs:[{off} + 4]", off = in(reg) off, c = out(reg) cpu);
            cpu
        };
        if (cpu as i32) < 0 {
            return None;
        }
        let mut record = Record {
            count: 1,
            slots: [0; 15],
        };
        // Every CPU number the thread may meet leads to the same record.
        let at: *mut Record = &mut record;
        let bases: Vec<*mut Record> = vec![at; 4096];
        let zero = 0usize;
        for _ in 0..ops {
            // SAFETY: `off` is the thread's rseq area (registered, checked
            // above), whose rseq_cs may be 0 and whose cpu_id is below
            // 4096 (Linux's CPU numbers fit `bases` on the machines this
            // runs on: checked with a mask); the record holds the count
            // (1 before a pop, 0 before the push) and 15 slots.
            unsafe {
                asm!(
                    enter!(),
                    "mov {p}, qword ptr [{r} + {w} * 8]",
                    "sub {w}, 1",
                    "mov qword ptr [{r}], {w}",
                    enter!(),
                    "mov qword ptr [{r} + {w} * 8 + 8], {p}",
                    "add {w}, 1",
                    "mov qword ptr [{r}], {w}",
                    off = in(reg) off,
                    bases = in(reg) bases.as_ptr(),
                    ro = in(reg) zero,
                    c = out(reg) _,
                    r = out(reg) _,
                    w = out(reg) _,
                    p = out(reg) _,
                    options(nostack),
                );
            }
        }
        // SAFETY: the sections are done; `at` is `record`, still live.
        assert_eq!(unsafe { (*at).count }, 1, "the sections lost count");
        Some(())
    }
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu")))]
mod sections {
    pub(super) fn pairs(_ops: usize) -> Option<()> {
        None
    }

    pub(super) fn chain(_ops: usize) {}
}

/// `ops` pairs of try-lock takes and releases on one slot word.
#[inline(never)]
fn locks(ops: usize) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let slot = AtomicU64::new(0);
    let slot = std::hint::black_box(&slot);
    for _ in 0..ops {
        for _ in 0..2 {
            let taken = slot
                .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok();
            assert!(taken, "nobody else holds this slot");
            slot.store(0, Ordering::Release);
        }
    }
}

fn main() -> std::process::ExitCode {
    if cfg!(feature = "global") {
        eprintln!("pair_floor: the global feature installs percpu-alloc; build without it");
        return std::process::ExitCode::FAILURE;
    }
    let mut ops = 100_000_000usize;
    for arg in std::env::args().skip(1) {
        match arg.strip_prefix("ops=").map(str::parse) {
            Some(Ok(n)) if n > 0 => ops = n,
            _ => {
                eprintln!("usage: pair_floor [ops=N]");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let start = Instant::now();
    let wrong = pair_loop(ops);
    let loop_ns = start.elapsed().as_nanos();
    if wrong != 0 {
        eprintln!("pair_floor: {wrong} of {ops} bytes read back wrong");
        return std::process::ExitCode::FAILURE;
    }
    let start = Instant::now();
    let sections = sections::pairs(ops);
    let sections_ns = start.elapsed().as_nanos();
    let start = Instant::now();
    sections::chain(ops);
    let chain_ns = start.elapsed().as_nanos();
    let start = Instant::now();
    locks(ops);
    let locks_ns = start.elapsed().as_nanos();
    let or_dash = |ns: u128| sections.map_or_else(|| "-".to_string(), |()| ns.to_string());
    println!(
        "result workload=pair_floor loop_ns={loop_ns} sections_ns={} chain_ns={} locks_ns={locks_ns} ops={ops}",
        or_dash(sections_ns),
        or_dash(chain_ns)
    );
    std::process::ExitCode::SUCCESS
}
