//! The fallback path's CPU number.
//!
//! Where rseq is not available (disabled with
//! `GLIBC_TUNABLES=glibc.pthread.rseq=0`, an old kernel or libc, another
//! architecture) each CPU's task lists are guarded by a try-lock in its
//! cache ([`crate::cpu_cache::CpuCache::try_lock`]) and the CPU comes from
//! `sched_getcpu()`. glibc answers that from the rseq area when there is
//! one and from the vDSO otherwise: no system call either way on x86_64.
//! The number is only a hint (the thread may move right after); the lock
//! is what makes the operation exclusive.
//!
//! After `fork()` the child has one thread, but a slot that another thread
//! of the parent held at that moment would stay taken forever, and that
//! CPU's cache would be dead in the child. A `pthread_atfork` child handler
//! frees every slot of every fallback table. That is safe: a slot holder
//! changes its list with one final store, so a list whose holder vanished
//! is intact (a block that holder was freeing is lost to the child, never
//! handed out twice).

use core::sync::atomic::{AtomicBool, Ordering};

use crate::cpu_cache::Table;
use crate::Path;

/// Installs the fork handler, once. Called for each new fallback table,
/// after it is registered ([`Table::register`]) and outside any slot.
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
    Table::for_each_registered(|table| {
        if table.header().path != Path::Fallback {
            return;
        }
        for cpu in table.cpus() {
            let cache = table.cpu(cpu);
            // Read first: writing every slot would touch every CPU's page.
            if cache.slot.load(Ordering::Relaxed) != 0 {
                cache.unlock();
            }
        }
    });
}

/// The CPU this thread runs on, if below `ncpu`.
#[inline]
pub(crate) fn current_cpu(ncpu: u32) -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sched_getcpu has no preconditions.
        let cpu = unsafe { libc::sched_getcpu() };
        if cpu >= 0 && (cpu as u32) < ncpu {
            Some(cpu as usize)
        } else {
            None
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        // No cheap CPU number: every thread shares slot 0 and the try-lock
        // sorts them out (a busy slot is a miss, never a wait).
        let _ = ncpu;
        Some(0)
    }
}
