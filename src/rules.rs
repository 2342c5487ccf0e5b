//! The rules engine: what an alloc and a free do with the current CPU's
//! cache (`docs/design.md`, "The rules"), written once over the per-CPU
//! exclusion ([`PerCpu`]) and monomorphised for each path.
//!
//! alloc(class):
//! 1. task list empty and `nr_sig >= threshold`: splice (the signal list
//!    becomes the task list, in O(1)), then pop;
//! 2. task list has a block: pop it (a hit);
//! 3. otherwise: a miss, a block from jemalloc.
//!
//! free(block, class):
//! 1. `nr + nr_sig >= cap`: an overflow, back to jemalloc (deferred in
//!    signal context, which must not call jemalloc);
//! 2. task context: push on the task list;
//! 3. signal context: push on the signal list;
//! 4. any other context (no CPU): back to jemalloc.
//!
//! [`alloc`] and [`free`] are the hot halves: rule 2, inlined into
//! `GlobalAlloc`, one per-CPU operation each. Everything else is out of
//! line and named for what it does. The common refusals, a miss with
//! nothing to splice and an overflow with nothing deferred, go straight to
//! jemalloc from the first function they reach.
//!
//! The signal list and the deferred lists are lock-free ([`AtomicList`]),
//! so the signal-context rules are the same on both paths.
//!
//! `nr + nr_sig` can pass the cap by one at most: a task-list push and a
//! signal-list push may each check against the other's old count (on the
//! rseq path the signal push is another thread's, one that read this
//! CPU's number and moved; on the fallback path it can also be a handler
//! that interrupted the slot holder, or a free that found the slot busy).
//! Further pushes see the true total. A splice's install is the one
//! exception on the rseq path, docs/design.md section 1 ("Install").
//!
//! [`AtomicList`]: crate::list::AtomicList

use core::ptr;

use crate::backend;
use crate::context::{any_signal_context, current_context, Context};
use crate::counters::{count, Event, COUNTING};
use crate::hardened;
use crate::list::{fits, read_next, Chain};
use crate::percpu::{PerCpu, Pop, Push};
use crate::size_class::Class;
use crate::table::{CpuHead, Record, Site, Table, TaskWord};

/// alloc(class) on the current CPU: rule 2 here, rules 1 and 3 when the
/// task list has no slot to pop. `zero` bytes of a hit are zeroed
/// (`alloc_zeroed`); a miss is zeroed by jemalloc.
#[inline(always)]
pub(crate) fn alloc<P: PerCpu>(t: &Table, site: Site, zero: usize) -> *mut u8 {
    let pop = P::pop(t, site);
    if pop.block.is_null() {
        // One call site for every case but the hit, so that a copy of this
        // inlined into a caller's loop stays small.
        return alloc_refused::<P>(site, zero != 0, pop.plain_miss, pop.at(), t);
    }
    count(t, pop.record(), Event::Hit);
    if zero != 0 {
        // SAFETY: a cached block of this class holds at least `zero` bytes
        // (the layout's size).
        unsafe { ptr::write_bytes(pop.block, 0, zero) };
    }
    pop.block
}

/// free(block, class) on the current CPU: rule 2 here, the others out of
/// line.
///
/// # Safety
/// `block` is a block of `class` from this table's allocator, no longer
/// used.
#[inline(always)]
pub(crate) unsafe fn free<P: PerCpu>(t: &Table, site: Site, block: *mut u8) {
    if any_signal_context() {
        // SAFETY: our caller's block of the class.
        return unsafe { free_in_some_context::<P>(block, site, t) };
    }
    // SAFETY: as above; no thread is in signal context, this one included.
    unsafe { free_in_task::<P>(t, site, block) }
}

/// free(block, class) in task context: rule 2 here, the others out of
/// line.
///
/// # Safety
/// As [`free`], in task context.
#[inline(always)]
unsafe fn free_in_task<P: PerCpu>(t: &Table, site: Site, block: *mut u8) {
    // SAFETY: our caller's block; the push takes it only on `Done`, and
    // with `hardened` marks it first (`PerCpu::push`).
    match unsafe { P::push(t, site, block) } {
        Push::Done => {
            if COUNTING {
                count(t, here::<P>(t, site.class()), Event::FreeTask);
            }
        }
        // SAFETY: refused, so still our caller's block. One call site for
        // every refusal, as in `alloc`.
        refusal => unsafe { free_refused::<P>(block, site, t, refusal) },
    }
}

/// A free while some thread is in signal context: this one, or another.
///
/// # Safety
/// As [`free`].
#[cold]
#[inline(never)]
unsafe fn free_in_some_context<P: PerCpu>(block: *mut u8, site: Site, t: &Table) {
    // SAFETY: our caller's block of the class, in the context checked.
    unsafe {
        match current_context() {
            Context::Signal => free_in_signal::<P>(t, site.class(), block),
            Context::Task | Context::Other => free_in_task::<P>(t, site, block),
        }
    }
}

/// Rules 1 and 3 of alloc, after rule 2 found no slot to pop. A plain
/// miss (nothing to splice, nothing deferred) goes straight to jemalloc;
/// otherwise there is no CPU, or signal-context frees left something (a
/// signal list, a chain, deferred blocks), or a drain has the list.
#[cold]
#[inline(never)]
fn alloc_refused<P: PerCpu>(
    site: Site,
    zeroed: bool,
    plain: bool,
    at: isize,
    t: &Table,
) -> *mut u8 {
    // The pop's result comes in as scalars: as a struct it would go
    // through memory.
    let pop = Pop::new(ptr::null_mut(), at, plain);
    pop.corrupted();
    if plain {
        // 3. A miss with nothing else to do.
        count(t, pop.record(), Event::Miss);
        return fresh(site, zeroed);
    }
    match pop.record() {
        Some(rec) => refill::<P>(t, site, rec, zeroed),
        None => alloc_other(t, site, zeroed),
    }
}

/// No slot to pop, and something else to do first: pop a chain (rule 2,
/// the task list spliced earlier), splice (rule 1), or miss (rule 3),
/// handing back deferred blocks.
#[cold]
#[inline(never)]
fn refill<P: PerCpu>(t: &Table, site: Site, rec: &Record, zeroed: bool) -> *mut u8 {
    let class = site.class();
    let head = t.head_of(rec, site.rec_off);
    let (block, event) = take_cached::<P>(t, class, rec, head);
    if block.is_null() {
        return miss(t, site, rec, head, zeroed);
    }
    count(t, Some(rec), event);
    hardened::on_alloc(block, class.size());
    if zeroed {
        // SAFETY: a cached block of this class; zeroing all of it covers
        // any layout it serves.
        unsafe { ptr::write_bytes(block, 0, class.size()) };
    }
    block
}

/// A cached block without the slots: the chain's head, or a splice. Null
/// if neither applies. Never calls jemalloc.
fn take_cached<P: PerCpu>(
    t: &Table,
    class: Class,
    rec: &Record,
    head: &CpuHead,
) -> (*mut u8, Event) {
    let word = rec.task.load();
    if word.in_chain().is_some() {
        return (P::pop_chain(t, class), Event::Hit);
    }
    if word == TaskWord::EMPTY && rec.sig.len() >= t.header().threshold {
        return (splice::<P>(t, class, rec, head), Event::Splice);
    }
    (ptr::null_mut(), Event::Miss)
}

/// Rule 1 of alloc: the signal list, at the threshold, becomes the task
/// list in O(1). It is taken in one CAS, the first block kept, and the rest
/// installed as the task list of the CPU this thread is on *now*, if that
/// is still empty. If it is not (this thread moved, or the list filled
/// meanwhile), the rest is deferred: never lost, never handed out twice.
fn splice<P: PerCpu>(t: &Table, class: Class, rec: &Record, head: &CpuHead) -> *mut u8 {
    let list = rec.sig.take_if_at_least(t.header().threshold);
    let block = list.head();
    if block.is_null() {
        return block;
    }
    // SAFETY: the taken list is ours, and `block` heads it.
    let rest = unsafe { read_next(list) };
    // SAFETY: we own `rest` and give it up on success.
    if !rest.is_empty() && !unsafe { P::install(t, class, rest) } {
        // SAFETY: we still own `rest`, a proper chain.
        unsafe { head.deferred.push_chain(rest) };
    }
    block
}

/// Rule 3 of alloc: a fresh block from jemalloc, outside any critical
/// section or slot. Task context first hands back the deferred blocks.
fn miss(t: &Table, site: Site, rec: &Record, head: &CpuHead, zeroed: bool) -> *mut u8 {
    count(t, Some(rec), Event::Miss);
    if current_context() == Context::Task {
        hand_back_deferred(head);
    }
    fresh(site, zeroed)
}

/// An alloc with no usable CPU: other context, jemalloc.
#[cold]
#[inline(never)]
fn alloc_other(t: &Table, site: Site, zeroed: bool) -> *mut u8 {
    count(t, None, Event::Miss);
    fresh(site, zeroed)
}

/// A block of the site's class straight from jemalloc (which rounds the
/// site's size up to that class), from its zeroing path if asked.
#[inline(always)]
fn fresh(site: Site, zeroed: bool) -> *mut u8 {
    let block = backend::alloc_sized(site.size(), zeroed);
    #[cfg(feature = "override")]
    if !block.is_null() {
        crate::size_map::record(block, site.class());
    }
    if cfg!(feature = "hardened") && !block.is_null() {
        // jemalloc may hand back a block this cache once marked.
        hardened::on_alloc(block, site.class().size());
    }
    block
}

/// Task context, outside any critical section: a CPU's deferred blocks
/// go home.
fn hand_back_deferred(head: &CpuHead) {
    if head.deferred.word().is_empty() {
        return;
    }
    // SAFETY: the whole list is taken, so its blocks are ours.
    for block in unsafe { Chain::new(head.deferred.take()) } {
        // SAFETY: deferred blocks are live jemalloc blocks nobody uses.
        unsafe { backend::free_unsized(block) };
    }
}

/// Rules 1 and 4 of free, after rule 2 found no slot to fill. A plain
/// overflow (a list in slots at the cap, nothing deferred) goes straight
/// to jemalloc; otherwise there is no CPU, a chain, a drain, deferred
/// blocks, or (fallback) a busy slot.
///
/// # Safety
/// As [`free`].
#[cold]
#[inline(never)]
unsafe fn free_refused<P: PerCpu>(block: *mut u8, site: Site, t: &Table, why: Push) {
    // The overflow first, with a compare of its own and nothing else to
    // set up: as one arm of a `match` it sat behind a jump table and the
    // class lookup, and on the fallback path behind the register saves
    // the other cases need, which every free past the cap paid for.
    if why == Push::Overflow {
        // 1. Past the cap with nothing else to do.
        if COUNTING {
            let rec = here::<P>(t, site.class());
            count(t, rec, Event::FreeTask);
            count(t, rec, Event::Overflow);
        }
        // SAFETY: our caller's block, of the site's class.
        return unsafe { backend::free_sized(block, site.size()) };
    }
    // SAFETY: our caller's block, still.
    unsafe { free_refused_otherwise::<P>(block, site, t, why) }
}

/// A refusal other than a plain overflow: a busy slot (fallback), a
/// double free (`hardened`), or a list the slots alone do not settle
/// (no CPU, a chain, a drain, deferred blocks).
///
/// # Safety
/// As [`free`].
#[cold]
#[inline(never)]
unsafe fn free_refused_otherwise<P: PerCpu>(block: *mut u8, site: Site, t: &Table, why: Push) {
    let class = site.class();
    match why {
        // SAFETY: our caller's block.
        Push::Busy => return unsafe { free_busy::<P>(t, class, block) },
        Push::Twice => hardened::double_free(block),
        Push::Overflow | Push::Refused | Push::Done => {}
    }
    match here::<P>(t, class) {
        // SAFETY: our caller's block of `class`.
        Some(rec) => unsafe { free_slowly::<P>(t, site, block, rec) },
        None => {
            count(t, None, Event::FreeOther);
            // SAFETY: as above.
            unsafe { backend::free_sized(block, class.size()) }
        }
    }
}

/// Rule 2 of free onto a chain (the task list spliced earlier), else rule
/// 1, an overflow, handing back deferred blocks first.
///
/// # Safety
/// As [`free`].
#[cold]
#[inline(never)]
unsafe fn free_slowly<P: PerCpu>(t: &Table, site: Site, block: *mut u8, rec: &Record) {
    let class = site.class();
    count(t, Some(rec), Event::FreeTask);
    // SAFETY: our caller's block, which fits a list word.
    if rec.task.load().in_chain().is_some()
        && fits(block)
        && unsafe { P::push_chain(t, class, block) }
    {
        return;
    }
    count(t, Some(rec), Event::Overflow);
    hand_back_deferred(t.head_of(rec, site.rec_off));
    // SAFETY: refused, so still our caller's block of `class`.
    unsafe { backend::free_sized(block, class.size()) }
}

/// A task-context free that found the CPU's slot busy (fallback): the
/// process's analog of interrupt context, so the signal list takes it.
///
/// # Safety
/// As [`free`].
#[cold]
#[inline(never)]
unsafe fn free_busy<P: PerCpu>(t: &Table, class: Class, block: *mut u8) {
    // SAFETY: our caller's block.
    unsafe { free_to_signal_list::<P>(t, class, block, Event::FreeTask) }
}

/// Rules 1 and 3 of free in signal context: never jemalloc.
///
/// # Safety
/// As [`free`].
#[cold]
#[inline(never)]
unsafe fn free_in_signal<P: PerCpu>(t: &Table, class: Class, block: *mut u8) {
    hardened::on_free(block, class.size());
    // SAFETY: our caller's block.
    unsafe { free_to_signal_list::<P>(t, class, block, Event::FreeSignal) }
}

/// The signal list of the current CPU, or past the cap its deferred list.
/// Lock-free, never calls jemalloc, and safe against a handler that
/// interrupted any step of any operation. Without a CPU number, CPU 0's
/// lists take the block.
///
/// # Safety
/// As [`free`].
unsafe fn free_to_signal_list<P: PerCpu>(t: &Table, class: Class, block: *mut u8, by: Event) {
    let cpu = P::cpu_hint(t).unwrap_or(0);
    let (Some(rec), head) = (t.record(cpu, class), t.cpu(cpu)) else {
        return;
    };
    count(t, Some(rec), by);
    if !fits(block) {
        // A list word cannot hold an address above 2^48. jemalloc never
        // hands one out on Linux (see `crate::list`); if it ever did,
        // this context, which must not call jemalloc and has no list to put
        // it on, keeps it: a leak, not a corruption.
        return;
    }
    let cap = t.cap(class);
    let full = |nr_sig: u32| rec.task.load().len() + nr_sig >= cap;
    // SAFETY: our caller's block, which fits a list word.
    if !unsafe { rec.sig.push_unless(block, full) } {
        count(t, Some(rec), Event::Deferred);
        // SAFETY: refused, so still ours; the deferred list takes any
        // number.
        unsafe { head.deferred.push_saturating(block) };
    }
}

/// A signal-context free of a block whose class is not known (C's `free`
/// in a handler). Finding the class would ask jemalloc, which a handler
/// must not call, so the block goes to the current CPU's deferred list
/// (CPU 0's without a CPU number), which takes blocks of any class and
/// which task context hands back to jemalloc. Lock-free.
///
/// # Safety
/// `block` is a live block of this table's allocator, not used after.
pub(crate) unsafe fn defer_unsized<P: PerCpu>(t: &Table, block: *mut u8) {
    if !fits(block) {
        // As in `free_to_signal_list`: a leak, not a corruption.
        return;
    }
    let cpu = P::cpu_hint(t).unwrap_or(0);
    // SAFETY: our caller's block, which fits a list word.
    unsafe { t.cpu(cpu).deferred.push_saturating(block) };
}

/// The current CPU's record of `class`, if there is a current CPU.
#[inline]
fn here<P: PerCpu>(t: &Table, class: Class) -> Option<&Record> {
    t.record(P::cpu_hint(t)?, class)
}

/// A block from the current CPU's cache only (a slot, a chain or a
/// splice), or null. Never calls jemalloc: a signal handler may call it.
pub(crate) fn alloc_cached<P: PerCpu>(t: &Table, site: Site) -> *mut u8 {
    let class = site.class();
    let pop = P::pop(t, site);
    if !pop.block.is_null() {
        count(t, pop.record(), Event::Hit);
        return pop.block;
    }
    pop.corrupted();
    let Some(rec) = pop.record() else {
        return ptr::null_mut();
    };
    let (block, event) = take_cached::<P>(t, class, rec, t.head_of(rec, site.rec_off));
    if !block.is_null() {
        count(t, Some(rec), event);
        hardened::on_alloc(block, class.size());
    }
    block
}

#[cfg(all(test, target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
mod model_tests;
