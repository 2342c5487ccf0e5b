//! Draining: giving every cached block of every CPU back to jemalloc.
//!
//! A process gets no callback when a CPU goes offline or leaves its
//! cpuset, so a trim must reach the caches of CPUs it does not run on.
//!
//! The signal and deferred lists are atomics: any thread takes them whole.
//! A task list belongs to its CPU: on the fallback path a drain takes the
//! CPU's slot like any operation; on the rseq path the critical sections
//! store without atomics, so a drain first sets the list's drain bit (every
//! section refuses a list with it set), then has the kernel abort any
//! section in flight on that CPU (`membarrier` with
//! `MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ`). If the bit is still there
//! afterwards, no section can commit over it and the list is the drain's.
//!
//! A task list's front slots stay in the CPU's cache when its word is
//! taken, and its owner refills them as soon as the word is released. So
//! a drain copies them out while it still holds the list (slot, drain bit,
//! or exclusive access), and only then releases the word.

use core::sync::atomic::{AtomicU8, Ordering};

use crate::backend;
use crate::cpu_cache::{ClassLists, Table};
use crate::free_list::{front_len, Chain, DRAIN_BIT, FRONT_SLOTS};
use crate::size_class::{class_size, NUM_CLASSES};
use crate::stats::TrimReport;
use crate::Path;

const MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ: libc::c_int = 1 << 7;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ: libc::c_int = 1 << 8;
const MEMBARRIER_CMD_FLAG_CPU: libc::c_uint = 1 << 0;

/// Gives back everything cached, while other threads keep allocating.
pub(crate) fn trim(table: &Table) -> TrimReport {
    let mut report = TrimReport::default();
    for cpu in table.cpus() {
        trim_cpu(table, cpu, &mut report);
    }
    report
}

/// Gives back everything cached on one CPU.
pub(crate) fn trim_cpu(table: &Table, cpu: usize, report: &mut TrimReport) {
    let cache = table.cpu(cpu);
    let reached = match table.header().path {
        Path::Rseq => take_task_lists_rseq(table, cpu, report),
        Path::Fallback => take_task_lists_locked(table, cpu, report),
    };
    if !reached {
        report.cpus_skipped += 1;
    }
    for (class, lists) in cache.lists.iter().enumerate() {
        // SAFETY: a taken signal list is ours.
        free_chain(unsafe { Chain::new(lists.sig.take()) }, class, report);
    }
    // SAFETY: a taken deferred list is ours.
    for block in unsafe { Chain::new(cache.deferred.take()) } {
        report.deferred_blocks += 1;
        // SAFETY: deferred blocks are live jemalloc blocks nobody uses.
        unsafe { backend::free_unsized(block) };
    }
}

/// Gives back everything cached, with no other user of the table left
/// (teardown).
///
/// # Safety
/// Nothing else uses `table` now or later except through this call.
pub(crate) unsafe fn teardown(table: &Table) -> TrimReport {
    let mut report = TrimReport::default();
    for cpu in table.cpus() {
        let cache = table.cpu(cpu);
        for (class, lists) in cache.lists.iter().enumerate() {
            let word = lists.task.load(Ordering::Acquire);
            // SAFETY: no section or slot holder can be running (our caller's
            // contract), so the list is ours.
            let taken = unsafe { take_held(lists, word) };
            lists.task.store(0, Ordering::Release);
            free_taken(class, taken, &mut report);
        }
        if cache.slot.load(Ordering::Relaxed) != 0 {
            cache.unlock();
        }
    }
    let rest = trim(table);
    report.blocks += rest.blocks;
    report.bytes += rest.bytes;
    report.deferred_blocks += rest.deferred_blocks;
    report
}

/// A task list taken off its CPU: its word and a copy of its front slots.
struct Taken {
    word: u64,
    front: [*mut u8; FRONT_SLOTS as usize],
}

/// Copies the list `word` (the current task list of `lists`) with its front
/// slots, before the caller releases the word.
///
/// # Safety
/// The caller holds the list: no one can change the word or the slots
/// below its front count until the caller releases it.
unsafe fn take_held(lists: &ClassLists, word: u64) -> Taken {
    let mut front = [core::ptr::null_mut(); FRONT_SLOTS as usize];
    let n = (front_len(word) as usize).min(front.len());
    for (copy, slot) in front.iter_mut().zip(&lists.front[..n]) {
        *copy = slot.load(Ordering::Relaxed) as *mut u8;
    }
    Taken {
        word: word & !DRAIN_BIT,
        front,
    }
}

/// Gives a taken task list back to jemalloc: its front slots, then its
/// linked part.
fn free_taken(class: usize, taken: Taken, report: &mut TrimReport) {
    let n = (front_len(taken.word) as usize).min(taken.front.len());
    for &block in &taken.front[..n] {
        report.blocks += 1;
        report.bytes += class_size(class);
        // SAFETY: the slots below the front count held live blocks of
        // `class`, given up with the word.
        unsafe { backend::free_class(block, class) };
    }
    // SAFETY: the linked part was given up with the word too.
    free_chain(unsafe { Chain::new(taken.word) }, class, report);
}

fn free_chain(chain: Chain, class: usize, report: &mut TrimReport) {
    for block in chain {
        report.blocks += 1;
        report.bytes += class_size(class);
        // SAFETY: a listed block of `class` is a live jemalloc block of that
        // class size that nobody uses.
        unsafe { backend::free_class(block, class) };
    }
}

fn take_task_lists_locked(table: &Table, cpu: usize, report: &mut TrimReport) -> bool {
    let cache = table.cpu(cpu);
    // A slot is held for a few instructions; a holder that stays (preempted,
    // or gone in a forked child) is waited for only so long.
    let mut tries = 0;
    while !cache.try_lock() {
        tries += 1;
        if tries > 1000 {
            return false;
        }
        std::thread::yield_now();
    }
    let mut taken: [Option<Taken>; NUM_CLASSES] = [const { None }; NUM_CLASSES];
    for (slot, lists) in taken.iter_mut().zip(cache.lists.iter()) {
        let word = lists.task.load(Ordering::Relaxed);
        if word != 0 {
            // SAFETY: we hold the CPU's slot.
            *slot = Some(unsafe { take_held(lists, word) });
            lists.task.store(0, Ordering::Relaxed);
        }
    }
    cache.unlock();
    for (class, t) in taken.into_iter().enumerate() {
        if let Some(t) = t {
            free_taken(class, t, report);
        }
    }
    true
}

fn take_task_lists_rseq(table: &Table, cpu: usize, report: &mut TrimReport) -> bool {
    let cache = table.cpu(cpu);
    for (class, lists) in cache.lists.iter().enumerate() {
        let mut attempts = 0;
        let taken = loop {
            let word = lists.task.load(Ordering::Relaxed);
            if word == 0 || word & DRAIN_BIT != 0 {
                // Empty, or another drain has it.
                break None;
            }
            if lists
                .task
                .compare_exchange(word, word | DRAIN_BIT, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            if !abort_sections_on(cpu) {
                // Cannot fence: undo and leave the list.
                let _ = lists.task.compare_exchange(
                    word | DRAIN_BIT,
                    word,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                return false;
            }
            if lists.task.load(Ordering::Acquire) == word | DRAIN_BIT {
                // The bit survived the fence: no section can commit on this
                // list, and none writes its slots, until we release it.
                // SAFETY: held by the drain bit.
                let taken = unsafe { take_held(lists, word) };
                lists.task.store(0, Ordering::Release);
                break Some(taken);
            }
            // A section committed over the bit before the fence: try again.
            attempts += 1;
            if attempts > 100 {
                break None;
            }
        };
        if let Some(taken) = taken {
            free_taken(class, taken, report);
        }
    }
    true
}

/// Aborts every rseq critical section of this process in flight on `cpu`;
/// false where the kernel cannot (before Linux 5.10, or forbidden).
fn abort_sections_on(cpu: usize) -> bool {
    // 0: not tried, 1: registered, 2: unavailable.
    static STATE: AtomicU8 = AtomicU8::new(0);
    if STATE.load(Ordering::Acquire) == 0 {
        // SAFETY: membarrier takes plain integers.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ,
                0,
                0,
            )
        };
        STATE.store(if rc == 0 { 1 } else { 2 }, Ordering::Release);
    }
    if STATE.load(Ordering::Acquire) != 1 {
        return false;
    }
    // SAFETY: as above.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ,
            MEMBARRIER_CMD_FLAG_CPU,
            cpu as libc::c_int,
        )
    };
    rc == 0
}
