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
