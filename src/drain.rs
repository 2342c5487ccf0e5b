//! Draining: giving every cached block of every CPU back to jemalloc.
//!
//! A process gets no callback when a CPU goes offline or leaves its
//! cpuset, so a trim must reach the caches of CPUs it does not run on.
//!
//! The signal and deferred lists are atomics: any thread takes them whole.
//! A task list belongs to its CPU: on the fallback path a drain takes the
//! CPU's slot like any operation; on the rseq path the critical sections
//! store without atomics, so a drain first sets the drain bit of each task
//! word it wants (every section refuses a word with it set), then has the
//! kernel abort any section in flight on that CPU (`membarrier` with
//! `MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ`). A word that still has the bit
//! afterwards is the drain's: no section can commit over it, and none
//! writes its slots, until the drain stores the empty word. One fence
//! serves every class of the CPU.
//!
//! jemalloc is called with the drain bit held (nobody waits on it: the
//! CPU's sections miss or overflow meanwhile). On the fallback path the
//! drain takes blocks out under the slot and frees them after releasing
//! it; on the rseq path drains of one CPU take turns on its slot, which
//! nothing else there takes, and hold it while they free, so only another
//! drain can wait for it.

use core::sync::atomic::{AtomicU8, Ordering};

use crate::backend;
use crate::list::Chain;
use crate::percpu::Path;
use crate::size_class::{Class, NUM_CLASSES};
use crate::stats::TrimReport;
use crate::table::{Record, Table, TaskWord};

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
    let reached = match table.header().path {
        Path::Rseq => take_task_lists_rseq(table, cpu, report),
        Path::Fallback => table
            .classes()
            .all(|class| take_task_list_locked(table, cpu, class, report)),
    };
    if !reached {
        report.cpus_skipped += 1;
    }
    take_lists(table, cpu, report);
}

/// The signal lists and the deferred list of a CPU, which any thread may
/// take.
fn take_lists(table: &Table, cpu: usize, report: &mut TrimReport) {
    for class in table.classes() {
        if let Some(rec) = table.record(cpu, class) {
            // SAFETY: a taken signal list is ours.
            free_cached(unsafe { Chain::new(rec.sig.take()) }, class, report);
        }
    }
    // SAFETY: a taken deferred list is ours.
    for block in unsafe { Chain::new(table.cpu(cpu).deferred.take()) } {
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
        for class in table.classes() {
            let Some(rec) = table.record(cpu, class) else {
                continue;
            };
            let word = rec.task.load();
            if word != TaskWord::EMPTY {
                // SAFETY: no section or slot holder can be running (our
                // caller's contract), so the list is ours.
                unsafe { free_task_list(rec, word.undrained(), class, &mut report) };
                rec.task.store(TaskWord::EMPTY);
            }
        }
        take_lists(table, cpu, &mut report);
    }
    report
}

/// Gives the blocks of a task list that the caller holds back to
/// jemalloc: the slots below its length, or its chain.
///
/// # Safety
/// The caller holds the list (exclusive use, the drain bit after the
/// fence, or the slot): nobody changes the word or the slots below it.
unsafe fn free_task_list(rec: &Record, word: TaskWord, class: Class, report: &mut TrimReport) {
    if let Some(chain) = word.in_chain() {
        // SAFETY: the chain was given up with the word.
        return free_cached(unsafe { Chain::new(chain) }, class, report);
    }
    for i in 0..word.in_slots().unwrap_or(0) {
        // SAFETY: slots below the length exist and hold live blocks.
        let block = unsafe { rec.slot(i) }.load(Ordering::Relaxed);
        free_one(block, class, report);
    }
}

fn free_cached(chain: Chain, class: Class, report: &mut TrimReport) {
    for block in chain {
        free_one(block, class, report);
    }
}

fn free_one(block: *mut u8, class: Class, report: &mut TrimReport) {
    report.blocks += 1;
    report.bytes += class.size();
    // SAFETY: a cached block of `class` is a live jemalloc block of that
    // class size that nobody uses.
    unsafe { backend::free_sized(block, class.size()) };
}

/// The fallback path: the task list of one class under the CPU's slot, a
/// few blocks at a time, so the slot is never held across jemalloc.
fn take_task_list_locked(table: &Table, cpu: usize, class: Class, report: &mut TrimReport) -> bool {
    const BATCH: usize = 64;
    let (Some(rec), head) = (table.record(cpu, class), table.cpu(cpu)) else {
        return true;
    };
    loop {
        if !lock_for_drain(table, cpu) {
            return false;
        }
        let word = rec.task.load();
        let mut batch = [core::ptr::null_mut(); BATCH];
        let mut taken = 0;
        let mut chain = None;
        if let Some(list) = word.in_chain() {
            chain = Some(list);
            rec.task.store(TaskWord::EMPTY);
        } else if let Some(n) = word.in_slots() {
            taken = (n as usize).min(BATCH);
            for (i, b) in batch.iter_mut().take(taken).enumerate() {
                // SAFETY: below the length; we hold the slot.
                *b = unsafe { rec.slot(n - 1 - i as u32) }.load(Ordering::Relaxed);
            }
            rec.task.store(TaskWord::slots(n - taken as u32));
        }
        head.unlock();
        if let Some(list) = chain {
            // SAFETY: the chain was given up with the word.
            free_cached(unsafe { Chain::new(list) }, class, report);
        }
        for &block in &batch[..taken] {
            free_one(block, class, report);
        }
        if chain.is_none() && taken < BATCH {
            return true;
        }
    }
}

/// The rseq path: every class of one CPU, behind one fence per round.
///
/// Drains of one CPU take turns, on the slot the fallback path would use
/// (idle on this path): a task word holds only a count, so a drain that
/// marked `n` and a second drain that marked `n` again after the owner
/// popped and pushed would each take the list for its own.
fn take_task_lists_rseq(table: &Table, cpu: usize, report: &mut TrimReport) -> bool {
    let head = table.cpu(cpu);
    // Only drains take it here, each for a bounded time, so waiting for
    // one is safe (a fork child finds it free: `crate::fallback`).
    while !head.try_lock() {
        std::thread::yield_now();
    }
    let reached = take_task_lists_fenced(table, cpu, report);
    head.unlock();
    reached
}

/// Takes `cpu`'s slot on the fallback path, waiting a bounded time: a
/// slot is held for a few instructions, and a holder that stays (preempted,
/// or gone in a forked child) makes the drain skip the CPU.
fn lock_for_drain(table: &Table, cpu: usize) -> bool {
    let head = table.cpu(cpu);
    let mut tries = 0;
    while !head.try_lock() {
        tries += 1;
        if tries > 1000 {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

/// [`take_task_lists_rseq`] with the CPU's drains excluded.
fn take_task_lists_fenced(table: &Table, cpu: usize, report: &mut TrimReport) -> bool {
    let mut marked: [Option<TaskWord>; NUM_CLASSES] = [None; NUM_CLASSES];
    for _round in 0..100 {
        let mut any = false;
        for class in table.classes() {
            let Some(rec) = table.record(cpu, class) else {
                continue;
            };
            let slot = &mut marked[class.index()];
            let word = rec.task.load();
            // Empty, or another drain has it.
            if word == TaskWord::EMPTY || word.is_draining() {
                continue;
            }
            if rec.task.compare_exchange(word, word.drained()) {
                *slot = Some(word);
                any = true;
            }
        }
        if !any && marked.iter().all(Option::is_none) {
            return true;
        }
        if !abort_sections_on(cpu) {
            // Cannot fence: undo and leave the lists.
            for class in table.classes() {
                if let (Some(word), Some(rec)) = (marked[class.index()], table.record(cpu, class)) {
                    rec.task.compare_exchange(word.drained(), word);
                }
            }
            return false;
        }
        for class in table.classes() {
            let Some(word) = marked[class.index()].take() else {
                continue;
            };
            let Some(rec) = table.record(cpu, class) else {
                continue;
            };
            if rec.task.load() == word.drained() {
                // The bit survived the fence: the list is ours.
                // SAFETY: held by the drain bit.
                unsafe { free_task_list(rec, word, class, report) };
                rec.task.store(TaskWord::EMPTY);
            }
            // Else a section committed over the bit before the fence: the
            // next round marks the new word.
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
