//! Per-CPU exclusion: how one CPU's task lists are kept to one operation
//! at a time (the kernel's `get_cpu()`/`put_cpu()`).
//!
//! [`PerCpu`] is the mechanism: a handful of task-list operations on the
//! calling thread's current CPU, each of which either happens whole or is
//! refused. The policy, which operation to try and what a refusal means,
//! is the rules engine's ([`crate::rules`]), written once over this trait
//! and monomorphised for each of its two implementations:
//! - [`Rseq`](crate::rseq::Rseq): each operation is one restartable
//!   sequence, with no atomics and no locks;
//! - [`Locked`](crate::fallback::Locked): each operation holds the CPU's
//!   slot, taken with a try-lock that never waits.

use core::marker::PhantomData;

use crate::list::ListWord;
use crate::size_class::Class;
use crate::table::{Record, Site, Table};

/// How the allocator keeps each CPU's task lists to itself.
///
/// ```
/// use percpu_alloc::{Config, Path, PerCpuAlloc};
///
/// let forced = PerCpuAlloc::with_config(Config::new().with_force_fallback(true));
/// assert_eq!(forced.path(), Path::Fallback);
/// assert_eq!(forced.path().to_string(), "fallback");
/// ```
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    /// Restartable sequences: no locks, no atomics on the task lists.
    Rseq,
    /// A try-lock per CPU, CPU from RDPID or `sched_getcpu()`.
    Fallback,
}

impl core::fmt::Display for Path {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Path::Rseq => "rseq",
            Path::Fallback => "fallback",
        })
    }
}

/// What a pop found.
#[derive(Clone, Copy)]
pub(crate) struct Pop<'t> {
    /// The block taken, or null: the top slot was not there to take.
    pub(crate) block: *mut u8,
    /// The record the pop looked at, as the section left it: null or
    /// negative when the thread had no usable CPU. Kept raw so that a hit,
    /// which never needs the record, never pays to make it an `Option`.
    at: isize,
    /// With a null block: whether the miss is plain, the task list and the
    /// signal list both empty and nothing deferred on the CPU, so that rule
    /// 3 has nothing to do but ask jemalloc.
    pub(crate) plain_miss: bool,
    _table: PhantomData<&'t Record>,
}

impl<'t> Pop<'t> {
    /// A pop that looked at `at` (null or negative: no CPU).
    #[inline(always)]
    pub(crate) fn new(block: *mut u8, at: isize, plain_miss: bool) -> Pop<'t> {
        Pop {
            block,
            at,
            plain_miss,
            _table: PhantomData,
        }
    }

    /// What [`Pop::new`] took as `at`.
    #[inline(always)]
    pub(crate) fn at(&self) -> isize {
        self.at
    }

    /// A pop that found no usable CPU.
    #[inline(always)]
    pub(crate) fn no_cpu() -> Pop<'t> {
        Pop::new(core::ptr::null_mut(), 0, false)
    }

    /// Aborts if the pop refused a corrupted block: with `hardened`, the
    /// rseq path's slot check leaves as a refusal whose `at` is the
    /// block's address with its low bit set, which no record's is
    /// (records are 64-aligned). A refusal's handler calls this first.
    #[inline(always)]
    pub(crate) fn corrupted(&self) {
        if cfg!(feature = "hardened") && self.at & 1 != 0 {
            crate::hardened::corrupted((self.at - 1) as *mut u8);
        }
    }

    /// The record the pop looked at; `None` when the thread had no usable
    /// CPU.
    #[inline(always)]
    pub(crate) fn record(&self) -> Option<&'t Record> {
        // SAFETY: a positive `at` is a record of the table the pop ran on,
        // which lives for `'t` (`PerCpu::pop`).
        (self.at > 0).then(|| unsafe { &*(self.at as *const Record) })
    }
}

/// What a push did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Push {
    /// The block is on the task list.
    Done,
    /// Not taken, because of the cap alone: a list in slots at the cap,
    /// and nothing deferred on the CPU. The caller still owns the block.
    Overflow,
    /// Not taken for any other reason: a list that is not in slots,
    /// deferred blocks, a drain, or no CPU. The caller still owns the
    /// block.
    Refused,
    /// Someone else holds the CPU (fallback only): the process's analog of
    /// interrupt context. The caller still owns the block.
    Busy,
    /// Not tried: the `hardened` check found the block cached already, a
    /// double free. It shares the refusals' out-of-line call, which
    /// aborts; without `hardened` no push answers it.
    Twice,
}

/// The task-list operations, on the calling thread's current CPU. None of
/// them allocates, blocks, or calls jemalloc.
///
/// # Safety
/// Implementations must make each operation exclusive with every other
/// operation on the same CPU's task list of the same table, and with the
/// drains of `crate::drain`.
pub(crate) unsafe trait PerCpu {
    /// Rule 2 of alloc: takes the top slot of `site`'s task list.
    ///
    /// With `hardened`, the block it returns is checked and its key
    /// cleared
    /// ([`hardened::on_slot_alloc`](crate::hardened::on_slot_alloc)), in
    /// the rseq path's asm for the reason given at [`PerCpu::push`].
    fn pop(t: &Table, site: Site) -> Pop<'_>;

    /// Rules 1 and 2 of free: fills the next slot of `site`'s task list
    /// unless `nr + nr_sig >= cap`.
    ///
    /// With `hardened`, it first checks and marks the block
    /// ([`hardened::mark_cached`](crate::hardened::mark_cached)): a block
    /// cached already is [`Push::Twice`], and every other outcome leaves
    /// it marked. The check is the push's so that the rseq path can make
    /// it in its asm, where the caller's loop does not see a load: one
    /// there made LLVM build the caller's values on the stack and copy
    /// them, which cost batches of frees more than the check itself.
    ///
    /// # Safety
    /// The caller owns `block`, a block of `site`'s class, and gives it up
    /// on [`Push::Done`].
    unsafe fn push(t: &Table, site: Site, block: *mut u8) -> Push;

    /// Rule 2 of alloc when the task list is a chain: takes its head.
    /// Null when it is not a chain (any more).
    fn pop_chain(t: &Table, class: Class) -> *mut u8;

    /// Rules 1 and 2 of free when the task list is a chain: links `block`
    /// on top unless `nr + nr_sig >= cap` (the header's cap). False when
    /// refused.
    ///
    /// # Safety
    /// As [`PerCpu::push`], and `block` fits a list word.
    unsafe fn push_chain(t: &Table, class: Class, block: *mut u8) -> bool;

    /// The second half of a splice: makes `chain` the task list if that is
    /// empty and `chain.len() + nr_sig <= cap` (the header's cap). False
    /// when refused.
    ///
    /// # Safety
    /// The caller owns every block of `chain` and gives them up on success.
    unsafe fn install(t: &Table, class: Class, chain: ListWord) -> bool;

    /// The CPU this thread runs on now, if the table covers it: a hint,
    /// never a promise (the thread may move right after).
    fn cpu_hint(t: &Table) -> Option<usize>;
}
