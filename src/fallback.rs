//! Per-CPU exclusion by a try-lock, where rseq is not available (disabled
//! with `GLIBC_TUNABLES=glibc.pthread.rseq=0`, an old kernel or libc,
//! another architecture).
//!
//! Each CPU's region has a slot ([`CpuHead`]); an operation takes it with
//! one CAS, does what the rseq section would, and releases it with a plain
//! store. The slot is never waited for: a busy slot means someone on this
//! CPU is mid-operation (another thread that read the same CPU number, or
//! the code a signal handler interrupted), and the operation is refused
//! with [`Push::Busy`] or an empty pop, for the rules to route.
//!
//! The CPU number is only a hint (the thread may move right after); the
//! slot is what makes the operation exclusive. On x86_64 it comes from
//! `RDPID`, which reads the number Linux keeps in `TSC_AUX` for the vDSO's
//! `getcpu` (one instruction, about a tenth of `sched_getcpu` without rseq
//! here), where the CPU has it and a check at start-up agrees with
//! `sched_getcpu`; elsewhere from `sched_getcpu`.
//!
//! After `fork()` the child has one thread, but a slot that another thread
//! of the parent held at that moment would stay taken forever, and that
//! CPU's cache would be dead in the child. A `pthread_atfork` child handler
//! frees every slot of every table (on the rseq path drains take them). That is safe: a slot holder
//! changes its list with one final store, so a list whose holder vanished
//! is intact (a block that holder was freeing is lost to the child, never
//! handed out twice).

use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use crate::list::{read_next, write_link, ListWord};
use crate::percpu::{PerCpu, Pop, Push};
use crate::size_class::Class;
use crate::table::{CpuHead, Record, Site, Table, TaskWord};

/// The fallback path.
pub(crate) struct Locked;

/// Runs `op` on `cpu`'s record at `rec_off` holding the CPU's slot;
/// `None` when the slot is busy.
#[inline(always)]
fn locked<R>(t: &Table, cpu: usize, rec_off: usize, op: impl FnOnce(&Record) -> R) -> Option<R> {
    let head: &CpuHead = t.cpu(cpu);
    let rec = t.record_at(cpu, rec_off);
    if !head.try_lock() {
        return None;
    }
    let out = op(rec);
    head.unlock();
    Some(out)
}

// SAFETY: every operation holds the CPU's slot for its whole length, and a
// drain takes the same slot (`crate::drain`).
unsafe impl PerCpu for Locked {
    #[inline(always)]
    fn pop(t: &Table, site: Site) -> Pop<'_> {
        let Some(cpu) = current_cpu(t.header().ncpu) else {
            return Pop::no_cpu();
        };
        let at = t.record_at(cpu, site.rec_off) as *const Record as isize;
        let popped = locked(t, cpu, site.rec_off, |rec| {
            let w = rec.task.load();
            if !w.can_pop_slot() {
                let plain = w == TaskWord::EMPTY
                    && rec.sig.word().is_empty()
                    && t.cpu(cpu).deferred.word().is_empty();
                return (core::ptr::null_mut(), plain);
            }
            let n = w.len() - 1;
            // SAFETY: slot `n` is below the list's length, so below the cap.
            let block = unsafe { rec.slot(n) }.load(Ordering::Relaxed);
            rec.task.store(TaskWord::slots(n));
            (block, false)
        });
        // A busy slot: a miss, not a plain one.
        let (block, plain_miss) = popped.unwrap_or((core::ptr::null_mut(), false));
        if !block.is_null() {
            crate::hardened::on_slot_alloc(t.header().secret, block, site.class().size());
        }
        Pop::new(block, at, plain_miss)
    }

    #[inline(always)]
    unsafe fn push(t: &Table, site: Site, block: *mut u8) -> Push {
        if !crate::hardened::mark_cached(t.header().secret, block, site.class().size()) {
            return Push::Twice;
        }
        let Some(cpu) = current_cpu(t.header().ncpu) else {
            return Push::Refused;
        };
        let cap = t.cap(site.class()) as u64;
        let pushed = locked(t, cpu, site.rec_off, |rec| {
            let w = rec.task.load();
            if !w.can_push_slot(rec.sig.len(), cap) {
                let plain = w.in_slots().is_some() && t.cpu(cpu).deferred.word().is_empty();
                return if plain { Push::Overflow } else { Push::Refused };
            }
            let n = w.len();
            // SAFETY: `n < cap` (checked above), so the slot exists; it is
            // above the list, so nobody else reads it.
            unsafe { rec.slot(n) }.store(block, Ordering::Relaxed);
            rec.task.store(TaskWord::slots(n + 1));
            Push::Done
        });
        pushed.unwrap_or(Push::Busy)
    }

    fn pop_chain(t: &Table, class: Class) -> *mut u8 {
        let Some(cpu) = current_cpu(t.header().ncpu) else {
            return core::ptr::null_mut();
        };
        locked(t, cpu, t.site_of(class).rec_off, |rec| {
            let Some(chain) = rec.task.load().in_chain() else {
                return core::ptr::null_mut();
            };
            // SAFETY: the slot gives us the task list, a chain we may walk.
            let rest = unsafe { read_next(chain) };
            rec.task.store(if rest.is_empty() {
                TaskWord::EMPTY
            } else {
                TaskWord::chain(rest)
            });
            chain.head()
        })
        .unwrap_or(core::ptr::null_mut())
    }

    unsafe fn push_chain(t: &Table, class: Class, block: *mut u8) -> bool {
        let Some(cpu) = current_cpu(t.header().ncpu) else {
            return false;
        };
        let cap = t.cap(class);
        locked(t, cpu, t.site_of(class).rec_off, |rec| {
            let Some(chain) = rec.task.load().in_chain() else {
                return false;
            };
            if chain.len() + rec.sig.len() >= cap {
                return false;
            }
            // SAFETY: the caller owns `block`; it fits a list word.
            unsafe { write_link(block, chain) };
            rec.task
                .store(TaskWord::chain(ListWord::new(block, chain.len() + 1)));
            true
        })
        .unwrap_or(false)
    }

    unsafe fn install(t: &Table, class: Class, chain: ListWord) -> bool {
        let Some(cpu) = current_cpu(t.header().ncpu) else {
            return false;
        };
        let cap = t.cap(class);
        locked(t, cpu, t.site_of(class).rec_off, |rec| {
            if rec.task.load() != TaskWord::EMPTY {
                return false;
            }
            #[cfg(test)]
            test_hook::run(test_hook::Point::BeforeInstall);
            // The chain goes in first and the signal list is counted after:
            // a signal free (a handler interrupting us here, or another
            // thread) checks the task word, so from the store on it counts
            // the chain, and one that landed before it is in this count.
            // Checked the other way round, every signal free between the
            // check and the store would pass the cap against an empty task
            // list, up to cap + the chain's length.
            rec.task.store(TaskWord::chain(chain));
            #[cfg(test)]
            test_hook::run(test_hook::Point::AfterInstall);
            if chain.len() + rec.sig.len() > cap {
                // Still ours: under the slot nothing pops a task list.
                rec.task.store(TaskWord::EMPTY);
                return false;
            }
            true
        })
        .unwrap_or(false)
    }

    #[inline]
    fn cpu_hint(t: &Table) -> Option<usize> {
        current_cpu(t.header().ncpu)
    }
}

/// Installs the fork handler, once. Called for each new table, after it
/// is registered ([`Table::register`]) and outside any slot.
pub(crate) fn watch_forks() {
    static INSTALLED: AtomicBool = AtomicBool::new(false);
    if !INSTALLED.swap(true, Ordering::AcqRel) {
        // SAFETY: registers a plain function; glibc may allocate its list
        // node through this allocator, whose table is already published.
        unsafe { libc::pthread_atfork(None, None, Some(release_slots_in_child)) };
    }
}

extern "C" fn release_slots_in_child() {
    // The child has a single thread, so no table can be unregistered now.
    // On the rseq path only drains take the slots, but one may have been
    // running in another thread of the parent.
    Table::for_each_registered(|table| {
        for cpu in table.cpus() {
            let head = table.cpu(cpu);
            // Read first: writing every slot would touch every CPU's page.
            if head.slot.load(Ordering::Relaxed) != 0 {
                head.unlock();
            }
        }
    });
}

/// How this process reads its CPU number: 0 not decided yet, 1 RDPID,
/// 2 `sched_getcpu`.
static CPU_READER: AtomicU8 = AtomicU8::new(0);

/// Decides how to read the CPU number, once, before the first fallback
/// table is used.
pub(crate) fn choose_cpu_reader(ncpu: usize) {
    if CPU_READER.load(Ordering::Acquire) == 0 {
        let rdpid = ncpu <= 4096 && rdpid_agrees();
        CPU_READER.store(if rdpid { 1 } else { 2 }, Ordering::Release);
    }
}

/// Whether RDPID is there and reads what `sched_getcpu` says. Linux keeps
/// `(node << 12) | cpu` in `TSC_AUX` on every CPU where RDTSCP or RDPID
/// exists; a hypervisor that passes RDPID through without that would show
/// here as disagreement. The thread may move between the two reads, so a
/// few tries must agree once.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn rdpid_agrees() -> bool {
    // CPUID leaf 7 exists on every x86_64 CPU that has RDPID; on older
    // ones it returns zeros, which reads as "no RDPID". The intrinsic is
    // safe in recent Rust and unsafe in the releases `rust-version`
    // allows, hence the allowance.
    #[allow(unused_unsafe)]
    // SAFETY: every x86_64 CPU has CPUID.
    let leaf7 = unsafe { core::arch::x86_64::__cpuid_count(7, 0) };
    if leaf7.ecx & (1 << 22) == 0 {
        return false;
    }
    (0..8).any(|_| {
        // SAFETY: sched_getcpu has no preconditions.
        let want = unsafe { libc::sched_getcpu() };
        want >= 0 && rdpid() == want as usize
    })
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn rdpid_agrees() -> bool {
    false
}

/// The CPU number from `TSC_AUX`.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[inline(always)]
fn rdpid() -> usize {
    let aux: u64;
    // SAFETY: only called once CPUID said RDPID exists; it reads a
    // register and touches no memory.
    unsafe {
        core::arch::asm!(
            "rdpid {aux}",
            aux = out(reg) aux,
            options(nomem, nostack, preserves_flags)
        )
    };
    (aux & 0xfff) as usize
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn rdpid() -> usize {
    0
}

/// The CPU this thread runs on, if below `ncpu`.
#[inline(always)]
pub(crate) fn current_cpu(ncpu: u32) -> Option<usize> {
    #[cfg(test)]
    if let Some(cpu) = test_cpu::get() {
        return (cpu < ncpu as usize).then_some(cpu);
    }
    let cpu = if CPU_READER.load(Ordering::Relaxed) == 1 {
        rdpid()
    } else {
        sched_cpu()?
    };
    (cpu < ncpu as usize).then_some(cpu)
}

#[cfg(target_os = "linux")]
fn sched_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    (cpu >= 0).then_some(cpu as usize)
}

#[cfg(not(target_os = "linux"))]
fn sched_cpu() -> Option<usize> {
    // No cheap CPU number: every thread shares slot 0 and the try-lock
    // sorts them out (a busy slot is a miss, never a wait).
    Some(0)
}

/// The unit tests' way to run code where a signal handler could interrupt
/// an install: a closure the test sets, run once at the point named.
#[cfg(test)]
pub(crate) mod test_hook {
    use std::cell::RefCell;

    /// Where in [`Locked::install`](super::Locked) the hook runs.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub(crate) enum Point {
        BeforeInstall,
        AfterInstall,
    }

    type Hook = (Point, Box<dyn FnOnce()>);

    thread_local! {
        static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Runs `f` the next time this thread reaches `point`.
    pub(crate) fn set(point: Point, f: impl FnOnce() + 'static) {
        HOOK.with(|h| *h.borrow_mut() = Some((point, Box::new(f))));
    }

    pub(crate) fn run(point: Point) {
        let hook = HOOK.with(|h| {
            let mut h = h.borrow_mut();
            match h.take() {
                Some((p, f)) if p == point => Some(f),
                other => {
                    *h = other;
                    None
                }
            }
        });
        if let Some(f) = hook {
            f();
        }
    }
}

/// The unit tests' way to run an operation "on" any CPU: a thread's
/// override of its CPU number.
#[cfg(test)]
pub(crate) mod test_cpu {
    use core::cell::Cell;

    thread_local! {
        static CPU: Cell<Option<usize>> = const { Cell::new(None) };
    }

    /// The override, if set.
    pub(crate) fn get() -> Option<usize> {
        CPU.with(Cell::get)
    }

    /// Sets the override (`Some(usize::MAX)`: no CPU) or clears it.
    pub(crate) fn set(cpu: Option<usize>) {
        CPU.with(|c| c.set(cpu));
    }
}
