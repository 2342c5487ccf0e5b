//! The rules engine: what an alloc or a free does with one CPU's cache.
//!
//! These are the kernel per-CPU cache rules (`DESIGN.md` section 1), as
//! plain Rust over the table. Nothing here calls jemalloc: each function
//! says what happened, and a caller in task context acts on a miss or an
//! overflow. That keeps the rules testable with an explicit CPU and context,
//! without the global allocator installed.
//!
//! alloc(class):
//! 1. task list empty and `nr_sig >= threshold`: splice (signal list becomes
//!    the task list, in O(1));
//! 2. task list has a block: pop it (hit);
//! 3. otherwise: miss.
//!
//! free(block, class):
//! 1. `nr + nr_sig >= cap`: overflow (back to jemalloc, or deferred in
//!    signal context, which must not call jemalloc);
//! 2. task context: push on the task list;
//! 3. signal context: push on the signal list;
//! 4. other context: back to jemalloc.
//!
//! On the fallback path the task list is guarded by the CPU's slot, taken
//! with a try-lock; a free that finds the slot busy is in the process's
//! analog of interrupt context and takes the signal list. On the rseq path
//! the task-list operations are restartable sequences ([`crate::rseq`]) and
//! only the splice and the signal list live here.

use core::sync::atomic::Ordering;

use crate::context::Context;
use crate::cpu_cache::{CpuCache, Table};
use crate::free_list::{head, list_len, pack, read_next, task_len, write_link, Chain};
use crate::size_class::Class;

/// What an alloc did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Alloc {
    /// Popped from the task list.
    Hit(*mut u8),
    /// Spliced the signal list, then popped.
    Spliced(*mut u8),
    /// Nothing cached to take: the caller asks jemalloc.
    Miss,
    /// The slot was busy (fallback): a miss.
    Busy,
}

/// What a free did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Free {
    /// Pushed on the task list.
    Task,
    /// Pushed on the signal list.
    Signal,
    /// Over the cap in signal context: on the deferred list, for task
    /// context to hand back to jemalloc.
    Deferred,
    /// Over the cap in task context: the caller hands it to jemalloc.
    Overflow,
    /// Other context: the caller hands it to jemalloc.
    Other,
}

/// Alloc on `cpu`'s cache under its slot (fallback path).
#[inline]
pub(crate) fn alloc_locked(table: &Table, cpu: usize, class: Class) -> Alloc {
    let cache = table.cpu(cpu);
    // Classes come from the size-class table and are always in range; an
    // allocator must still not panic, so a bad one is a miss.
    let Some(lists) = cache.lists.get(class) else {
        return Alloc::Miss;
    };
    if !cache.try_lock() {
        return Alloc::Busy;
    }
    let mut word = lists.task.load(Ordering::Relaxed);
    let mut spliced = false;
    if word == 0 {
        word = lists.sig.take_if_at_least(table.header().threshold);
        spliced = true;
    }
    let block = head(word);
    if !block.is_null() {
        // SAFETY: the slot gives us the task list, and a taken signal list
        // is ours; either way `block` heads a list we own.
        let rest = unsafe { read_next(word) };
        lists.task.store(rest, Ordering::Relaxed);
    }
    cache.unlock();
    match (block.is_null(), spliced) {
        (true, _) => Alloc::Miss,
        (false, false) => Alloc::Hit(block),
        (false, true) => Alloc::Spliced(block),
    }
}

/// Free on `cpu`'s cache in context `ctx` (fallback path).
///
/// # Safety
/// The caller owns `block`, a block of `class` whose address fits a list
/// word, and gives it up unless the result is `Overflow` or `Other`.
#[inline]
pub(crate) unsafe fn free_locked(
    table: &Table,
    cpu: usize,
    class: Class,
    block: *mut u8,
    ctx: Context,
) -> Free {
    let cache = table.cpu(cpu);
    match ctx {
        Context::Other => Free::Other,
        // SAFETY: passed on from our caller.
        Context::Signal => unsafe { free_signal(table, cache, class, block) },
        Context::Task => {
            let Some(lists) = cache.lists.get(class) else {
                return Free::Other;
            };
            if !cache.try_lock() {
                // Someone on this CPU is mid-operation (a thread preempted
                // holding the slot, or the code this signal interrupted).
                // SAFETY: passed on from our caller.
                return unsafe { free_signal(table, cache, class, block) };
            }
            let word = lists.task.load(Ordering::Relaxed);
            // The fallback path keeps no front slots: the list is all of it.
            let n = list_len(word);
            let cap = table.header().cap(class);
            let result = if n + lists.sig.len() >= cap {
                Free::Overflow
            } else {
                // SAFETY: we own `block` and hold the slot.
                unsafe { write_link(block, word) };
                lists.task.store(pack(block, n + 1), Ordering::Relaxed);
                Free::Task
            };
            cache.unlock();
            result
        }
    }
}

/// A free in signal context (or finding the slot busy): the signal list,
/// or past the cap the deferred list. Lock-free, never calls jemalloc, and
/// safe against a handler that interrupted any step of any operation here.
///
/// `nr + nr_sig` can pass the cap by one at most: a task-list push and a
/// signal-list push may each check against the other's old count. Further
/// pushes see the true total. (A test checks this bound.)
///
/// # Safety
/// As [`free_locked`].
pub(crate) unsafe fn free_signal(
    table: &Table,
    cache: &CpuCache,
    class: Class,
    block: *mut u8,
) -> Free {
    let Some(lists) = cache.lists.get(class) else {
        // Cannot happen (see `alloc_locked`); signal context must not call
        // jemalloc, so the block waits on the deferred list.
        // SAFETY: passed on from our caller.
        unsafe { cache.deferred.push_saturating(block) };
        return Free::Deferred;
    };
    let cap = table.header().cap(class);
    let full = |n_sig: u32| task_len(lists.task.load(Ordering::Relaxed)) + n_sig >= cap;
    // SAFETY: passed on from our caller.
    if unsafe { lists.sig.push_unless(block, full) } {
        Free::Signal
    } else {
        // SAFETY: as above; the deferred list takes any number.
        unsafe { cache.deferred.push_saturating(block) };
        Free::Deferred
    }
}

/// The slow half of an rseq-path alloc, after the task list of `cpu` was
/// found empty: splice the signal list if it is at the threshold. Returns
/// the block for the caller, or `Miss`.
///
/// The signal list is taken in one CAS, the first block kept, and the rest
/// installed as the task list by a restartable sequence if the task list of
/// the CPU we are on *now* is still empty. If it is not (this thread moved,
/// or another filled it meanwhile), the rest goes to the deferred list:
/// never lost, never handed out twice.
#[inline]
pub(crate) fn splice_rseq(table: &Table, cpu: usize, class: Class) -> Alloc {
    let cache = table.cpu(cpu);
    let Some(lists) = cache.lists.get(class) else {
        return Alloc::Miss;
    };
    let word = lists.sig.take_if_at_least(table.header().threshold);
    let block = head(word);
    if block.is_null() {
        return Alloc::Miss;
    }
    // SAFETY: the taken list is ours, and `block` heads it.
    let rest = unsafe { read_next(word) };
    if rest != 0 {
        let header = table.header();
        // SAFETY: the table is live and on the rseq path; we own `rest`.
        let done = unsafe {
            crate::rseq::install(
                header.rseq_offset,
                table.class_base(class),
                header.ncpu,
                rest,
                header.cap(class),
            )
        };
        if done != crate::rseq::Done::Committed {
            // SAFETY: we own `rest`, a proper chain.
            unsafe { cache.deferred.push_chain(rest) };
        }
    }
    Alloc::Spliced(block)
}

/// Takes `cpu`'s deferred returns, for task context to free to jemalloc.
#[inline]
pub(crate) fn take_deferred(table: &Table, cpu: usize) -> Option<Chain> {
    let cache = table.cpu(cpu);
    if cache.deferred.word() == 0 {
        return None;
    }
    // SAFETY: the whole list is taken, so its blocks are ours.
    Some(unsafe { Chain::new(cache.deferred.take()) })
}

#[cfg(test)]
mod model_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::size_class::class_size;
    use crate::Path;
    use std::collections::HashSet;

    /// A table on the fallback path with blocks from a plain `Vec`, so the
    /// rules run without jemalloc, the global allocator, or the real CPU.
    struct Rig {
        table: *mut Table,
        // Boxed so blocks keep their addresses while the Vec grows.
        #[allow(clippy::vec_box)]
        pool: Vec<Box<[u64; 4]>>,
        handed_out: HashSet<usize>,
    }

    impl Rig {
        fn new(config: Config) -> Rig {
            let table = Table::create(&config, Path::Fallback, 0);
            assert!(!table.is_null());
            Rig {
                table,
                pool: Vec::new(),
                handed_out: HashSet::new(),
            }
        }

        fn table(&self) -> &Table {
            // SAFETY: mapped in `new`, unmapped only in `drop`.
            unsafe { &*self.table }
        }

        /// A block as the user would hold it: fresh or from the cache.
        fn fresh(&mut self) -> *mut u8 {
            self.pool.push(Box::new([0; 4]));
            let p = self.pool.last_mut().unwrap().as_mut_ptr() as *mut u8;
            assert!(self.handed_out.insert(p as usize));
            p
        }

        fn alloc(&mut self, cpu: usize, class: Class) -> Alloc {
            let a = alloc_locked(self.table(), cpu, class);
            if let Alloc::Hit(p) | Alloc::Spliced(p) = a {
                assert!(self.handed_out.insert(p as usize), "handed out twice");
            }
            a
        }

        fn free(&mut self, cpu: usize, class: Class, p: *mut u8, ctx: Context) -> Free {
            assert!(self.handed_out.remove(&(p as usize)));
            // SAFETY: the rig owns the block and its class is irrelevant to
            // the list (32 bytes, 8-aligned).
            unsafe { free_locked(self.table(), cpu, class, p, ctx) }
        }

        fn counts(&self, cpu: usize, class: Class) -> (u32, u32) {
            let lists = &self.table().cpu(cpu).lists[class];
            (
                task_len(lists.task.load(Ordering::Relaxed)),
                lists.sig.len(),
            )
        }

        fn walk(&self, word: u64) -> usize {
            // SAFETY: the lists are quiescent in a test, and walking reads
            // links only.
            unsafe { Chain::new(word) }.count()
        }

        fn deferred(&self, cpu: usize) -> usize {
            self.walk(self.table().cpu(cpu).deferred.word())
        }

        /// Every count matches its list's real length.
        fn check_counts(&self) {
            for cpu in self.table().cpus().take(4) {
                for lists in &self.table().cpu(cpu).lists {
                    let task = lists.task.load(Ordering::Relaxed);
                    assert_eq!(self.walk(task), task_len(task) as usize);
                    assert_eq!(self.walk(lists.sig.word()), lists.sig.len() as usize);
                }
            }
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            // SAFETY: nothing else uses the table.
            unsafe { Table::destroy(self.table) };
        }
    }

    const C: Class = 2; // 32-byte blocks

    fn fill(rig: &mut Rig, cpu: usize, n: usize, ctx: Context) -> Vec<Free> {
        (0..n)
            .map(|_| {
                let p = rig.fresh();
                rig.free(cpu, C, p, ctx)
            })
            .collect()
    }

    #[test]
    fn task_frees_are_popped_lifo() {
        let mut rig = Rig::new(Config::new());
        let a = rig.fresh();
        let b = rig.fresh();
        assert_eq!(rig.free(0, C, a, Context::Task), Free::Task);
        assert_eq!(rig.free(0, C, b, Context::Task), Free::Task);
        assert_eq!(rig.counts(0, C), (2, 0));
        assert_eq!(rig.alloc(0, C), Alloc::Hit(b));
        assert_eq!(rig.alloc(0, C), Alloc::Hit(a));
        assert_eq!(rig.alloc(0, C), Alloc::Miss);
        rig.check_counts();
    }

    #[test]
    fn splice_needs_the_threshold_15_is_a_miss_16_splices() {
        let mut rig = Rig::new(Config::new());
        fill(&mut rig, 0, 15, Context::Signal);
        assert_eq!(rig.counts(0, C), (0, 15));
        assert_eq!(rig.alloc(0, C), Alloc::Miss);
        assert_eq!(rig.counts(0, C), (0, 15), "no splice below the threshold");
        fill(&mut rig, 0, 1, Context::Signal);
        assert!(matches!(rig.alloc(0, C), Alloc::Spliced(_)));
        assert_eq!(rig.counts(0, C), (15, 0), "16 moved, one handed out");
        rig.check_counts();
    }

    #[test]
    fn threshold_is_configurable() {
        let mut rig = Rig::new(Config::new().splice_threshold(3));
        fill(&mut rig, 0, 2, Context::Signal);
        assert_eq!(rig.alloc(0, C), Alloc::Miss);
        fill(&mut rig, 0, 1, Context::Signal);
        assert!(matches!(rig.alloc(0, C), Alloc::Spliced(_)));
        assert_eq!(rig.counts(0, C), (2, 0));
    }

    #[test]
    fn no_splice_while_the_task_list_has_blocks() {
        let mut rig = Rig::new(Config::new());
        fill(&mut rig, 0, 2, Context::Task);
        fill(&mut rig, 0, 20, Context::Signal);
        assert!(matches!(rig.alloc(0, C), Alloc::Hit(_)));
        assert_eq!(rig.counts(0, C), (1, 20));
        assert!(matches!(rig.alloc(0, C), Alloc::Hit(_)));
        assert_eq!(rig.counts(0, C), (0, 20));
        assert!(matches!(rig.alloc(0, C), Alloc::Spliced(_)));
        assert_eq!(rig.counts(0, C), (19, 0));
        rig.check_counts();
    }

    #[test]
    fn cap_255_is_kept_256_overflows() {
        let mut rig = Rig::new(Config::new());
        assert_eq!(rig.table().header().caps[C], 256);
        let outcomes = fill(&mut rig, 0, 255, Context::Task);
        assert!(outcomes.iter().all(|f| *f == Free::Task));
        assert_eq!(rig.counts(0, C), (255, 0));
        assert_eq!(fill(&mut rig, 0, 1, Context::Task), [Free::Task]);
        assert_eq!(rig.counts(0, C), (256, 0));
        assert_eq!(fill(&mut rig, 0, 1, Context::Task), [Free::Overflow]);
        assert_eq!(
            rig.counts(0, C),
            (256, 0),
            "a cache never holds more than cap"
        );
        rig.check_counts();
    }

    #[test]
    fn the_cap_counts_both_lists() {
        let mut rig = Rig::new(Config::new());
        fill(&mut rig, 0, 200, Context::Task);
        fill(&mut rig, 0, 55, Context::Signal);
        assert_eq!(rig.counts(0, C), (200, 55));
        assert_eq!(fill(&mut rig, 0, 1, Context::Signal), [Free::Signal]);
        // 256 now: a task free overflows, a signal free is deferred.
        assert_eq!(fill(&mut rig, 0, 1, Context::Task), [Free::Overflow]);
        assert_eq!(fill(&mut rig, 0, 1, Context::Signal), [Free::Deferred]);
        assert_eq!(rig.counts(0, C), (200, 56));
        assert_eq!(rig.deferred(0), 1, "deferred blocks are not counted");
        rig.check_counts();
    }

    #[test]
    fn caps_follow_the_byte_budget() {
        let mut rig = Rig::new(Config::new().cpu_byte_budget(21 * 64 * 1024));
        let class = 20; // 1 KiB blocks: 64 KiB share -> cap 64
        assert_eq!(rig.table().header().caps[class], 64);
        for _ in 0..64 {
            let p = rig.fresh();
            assert_eq!(rig.free(0, class, p, Context::Task), Free::Task);
        }
        let p = rig.fresh();
        assert_eq!(rig.free(0, class, p, Context::Task), Free::Overflow);
        assert_eq!(class_size(class), 1024);
    }

    #[test]
    fn contexts_route_frees() {
        let mut rig = Rig::new(Config::new());
        assert_eq!(fill(&mut rig, 1, 1, Context::Task), [Free::Task]);
        assert_eq!(fill(&mut rig, 1, 1, Context::Signal), [Free::Signal]);
        assert_eq!(fill(&mut rig, 1, 1, Context::Other), [Free::Other]);
        assert_eq!(rig.counts(1, C), (1, 1));
        assert_eq!(rig.counts(0, C), (0, 0), "CPUs are separate");
    }

    #[test]
    fn a_busy_slot_sends_frees_to_the_signal_list_and_allocs_to_jemalloc() {
        let mut rig = Rig::new(Config::new());
        fill(&mut rig, 0, 1, Context::Task);
        assert!(rig.table().cpu(0).try_lock());
        assert_eq!(fill(&mut rig, 0, 1, Context::Task), [Free::Signal]);
        assert_eq!(rig.alloc(0, C), Alloc::Busy);
        rig.table().cpu(0).unlock();
        assert_eq!(rig.counts(0, C), (1, 1));
    }

    #[test]
    fn deferred_blocks_come_back_once() {
        let mut rig = Rig::new(Config::new().cap(2));
        fill(&mut rig, 0, 2, Context::Signal);
        assert_eq!(fill(&mut rig, 0, 3, Context::Signal), [Free::Deferred; 3]);
        let taken: Vec<_> = take_deferred(rig.table(), 0).unwrap().collect();
        assert_eq!(taken.len(), 3);
        assert!(take_deferred(rig.table(), 0).is_none());
    }

    #[test]
    fn racing_pushes_pass_the_cap_by_one_at_most() {
        // Task pushes on CPU 0 race signal pushes from other threads (a
        // signal-context free that read CPU 0, then moved). The bound in
        // `free_signal`'s doc must hold however they interleave.
        for round in 0..20 {
            let rig = Rig::new(Config::new().cap(64));
            let table = rig.table();
            let mut mem: Vec<[u64; 4]> = vec![[0; 4]; 4 * 200];
            let addrs: Vec<usize> = mem.iter_mut().map(|b| b.as_mut_ptr() as usize).collect();
            std::thread::scope(|s| {
                for chunk in addrs.chunks(200) {
                    s.spawn(move || {
                        for (i, &a) in chunk.iter().enumerate() {
                            let ctx = if i % 2 == round % 2 {
                                Context::Task
                            } else {
                                Context::Signal
                            };
                            // SAFETY: each thread owns its chunk; a block the
                            // cache refuses is simply dropped by the test.
                            let _ = unsafe { free_locked(table, 0, C, a as *mut u8, ctx) };
                        }
                    });
                }
            });
            let (nr, nr_sig) = rig.counts(0, C);
            assert!(nr + nr_sig <= 64 + 1, "nr {nr} + nr_sig {nr_sig}");
            rig.check_counts();
            drop(mem);
        }
    }
}
