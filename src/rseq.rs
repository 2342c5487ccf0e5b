//! Per-CPU exclusion by restartable sequences (Linux rseq).
//!
//! glibc 2.35 and later registers an rseq area for every thread; we read
//! that one and never register again. Each task-list operation is one
//! critical section: it reads `cpu_id_start`, finds that CPU's lists, and
//! ends in a single store of the list word. If the thread is preempted,
//! migrated or signalled before that store, the kernel moves it to the abort
//! handler, which starts the sequence over. So no atomics and no locks, and a
//! signal handler can never see a half-done operation.
//!
//! The sections make no calls and no system calls, and touch only the rseq
//! area, the cache table and the block being pushed or popped.
//!
//! Everything else (splice, signal list, deferred returns, jemalloc) happens
//! outside the sections, in [`crate::rules`].

/// What a critical section did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Done {
    /// It committed.
    Committed,
    /// It found the list unable to take the operation on `cpu` (empty for a
    /// pop, full for a push, not empty for an install), or draining.
    Refused,
    /// This thread has no usable rseq area, or runs on a CPU beyond the
    /// table: "other" context.
    NoCpu,
}

#[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
mod imp {
    use super::Done;
    use core::arch::asm;

    extern "C" {
        // glibc's description of its rseq registration (glibc >= 2.35); not
        // in the libc crate.
        static __rseq_offset: isize;
        static __rseq_size: u32;
    }

    /// Offset of the calling thread's rseq area from the thread pointer, if
    /// glibc registered one and it is live on this thread.
    pub(crate) fn registered() -> Option<isize> {
        // SAFETY: glibc defines both symbols and sets them before `main`;
        // they never change afterwards.
        let (offset, size) = unsafe { (__rseq_offset, __rseq_size) };
        if size == 0 {
            return None;
        }
        cpu_id(offset).map(|_| offset)
    }

    /// The CPU this thread runs on now, from `cpu_id`; `None` when the area
    /// is not registered. Only a hint outside a critical section.
    #[inline]
    pub(crate) fn cpu_id(offset: isize) -> Option<u32> {
        let cpu: i32;
        // SAFETY: `offset` is glibc's `__rseq_offset`, so `fs:[offset]` is
        // this thread's rseq area; `cpu_id` is at byte 4.
        unsafe {
            asm!(
                "mov {cpu:e}, dword ptr fs:[{off} + 4]",
                off = in(reg) offset,
                cpu = lateout(reg) cpu,
                options(nostack, readonly, preserves_flags),
            );
        }
        if cpu >= 0 {
            Some(cpu as u32)
        } else {
            None
        }
    }

    // Each section below has the same frame:
    //   3: its descriptor {version 0, flags 0, start 4f, length 5f-4f,
    //      abort 6f}, 32-byte aligned, in section __rseq_cs;
    //   2: store the descriptor's address into rseq_cs (area + 8); the abort
    //      handler comes back here because the kernel clears rseq_cs;
    //   4: read cpu_id_start and cpu_id in one load; a negative cpu_id means
    //      the area is not registered, and a CPU beyond the table is "other";
    //   5: the end of the section, right after the committing store;
    //   6: the abort handler, after glibc's signature 0x53053053 (encoded as
    //      the operand of a `ud1` that is never executed).
    // Labels start at 2: x86 assemblers read 0 and 1 as binary.

    /// Pops the head of the task list of the current CPU's `lists` (class
    /// lists of CPU 0; CPU n's are `n << 10` bytes on).
    ///
    /// Returns the popped block and the CPU, or a null block when the list
    /// is empty or draining, or CPU `u32::MAX` when there is no usable CPU.
    ///
    /// # Safety
    /// `offset` is `__rseq_offset`; `lists` and `ncpu` describe a live table
    /// whose task lists on each CPU are changed only by these sections (or
    /// by a drain that follows the drain-bit protocol).
    #[inline(always)]
    pub(crate) unsafe fn pop(offset: isize, lists: *mut u8, ncpu: u32) -> (*mut u8, u32) {
        let block: *mut u8;
        let cpu: u64;
        // SAFETY: see the function's contract. The only memory written is
        // the rseq area's rseq_cs field and the task list word; the block
        // read is the list's head, which this CPU's list owns until the
        // commit hands it to us.
        unsafe {
            asm!(
                ".pushsection __rseq_cs, \"aw\"",
                ".balign 32",
                "3:",
                ".long 0, 0",
                ".quad 4f, (5f - 4f), 6f",
                ".popsection",
                "2:",
                "lea {p}, [rip + 3b]",
                "mov qword ptr fs:[{off} + 8], {p}",
                "4:",
                "mov {cpu}, qword ptr fs:[{off}]",
                "test {cpu}, {cpu}",
                "js 7f",
                "mov {cpu:e}, {cpu:e}",
                "cmp {cpu:e}, {ncpu:e}",
                "jae 7f",
                "mov {addr}, {cpu}",
                "shl {addr}, 10",
                "add {addr}, {lists}",
                "mov {p}, qword ptr [{addr}]",
                // Zero is empty; a set drain bit makes the word negative.
                "test {p}, {p}",
                "jle 8f",
                "and {p}, {mask}",
                "mov {next}, qword ptr [{p}]",
                "mov qword ptr [{addr}], {next}",
                "5:",
                "jmp 9f",
                ".byte 0x0f, 0xb9, 0x3d",
                ".long 0x53053053",
                "6:",
                "jmp 2b",
                "7:",
                "mov {cpu:e}, -1",
                "8:",
                "xor {p:e}, {p:e}",
                "9:",
                off = in(reg) offset,
                lists = in(reg) lists,
                ncpu = in(reg) ncpu,
                mask = in(reg) crate::free_list::PTR_MASK,
                p = out(reg) block,
                cpu = out(reg) cpu,
                addr = out(reg) _,
                next = out(reg) _,
                options(nostack),
            );
        }
        (block, cpu as u32)
    }

    /// Pushes `block` on the task list of the current CPU's `lists`, unless
    /// that list and its signal list together hold `cap` blocks already.
    /// Returns what happened and the CPU (`u32::MAX` for [`Done::NoCpu`]).
    ///
    /// # Safety
    /// As [`pop`]; and the caller owns `block`, a cache block whose address
    /// fits in 48 bits, and gives it up on [`Done::Committed`].
    #[inline(always)]
    pub(crate) unsafe fn push(
        offset: isize,
        lists: *mut u8,
        ncpu: u32,
        block: *mut u8,
        cap: u32,
    ) -> (Done, u32) {
        let status: u64;
        let cpu: u64;
        // SAFETY: see the function's contract. Besides rseq_cs and the task
        // list word, only the block's link is written, and the block is ours
        // until the commit.
        unsafe {
            asm!(
                ".pushsection __rseq_cs, \"aw\"",
                ".balign 32",
                "3:",
                ".long 0, 0",
                ".quad 4f, (5f - 4f), 6f",
                ".popsection",
                "2:",
                "lea {w}, [rip + 3b]",
                "mov qword ptr fs:[{off} + 8], {w}",
                "4:",
                "mov {cpu}, qword ptr fs:[{off}]",
                "test {cpu}, {cpu}",
                "js 7f",
                "mov {cpu:e}, {cpu:e}",
                "cmp {cpu:e}, {ncpu:e}",
                "jae 7f",
                "mov {addr}, {cpu}",
                "shl {addr}, 10",
                "add {addr}, {lists}",
                "mov {w}, qword ptr [{addr}]",
                // nr + nr_sig, from the two words' top bits; the drain bit
                // makes nr look larger than any cap.
                "mov {n}, qword ptr [{addr} + 8]",
                "shr {n}, 48",
                "mov {t}, {w}",
                "shr {t}, 48",
                "add {n}, {t}",
                "cmp {n}, {cap}",
                "jae 8f",
                "mov qword ptr [{block}], {w}",
                // The new word: the old count, plus one, plus the block.
                "shl {t}, 48",
                "add {t}, {block1}",
                "mov qword ptr [{addr}], {t}",
                "5:",
                "xor {n:e}, {n:e}",
                "jmp 9f",
                ".byte 0x0f, 0xb9, 0x3d",
                ".long 0x53053053",
                "6:",
                "jmp 2b",
                "7:",
                "mov {cpu:e}, -1",
                "8:",
                "mov {n:e}, 1",
                "9:",
                off = in(reg) offset,
                lists = in(reg) lists,
                ncpu = in(reg) ncpu,
                block = in(reg) block,
                block1 = in(reg) block as u64 + (1 << crate::free_list::COUNT_SHIFT),
                cap = in(reg) cap as u64,
                n = out(reg) status,
                cpu = out(reg) cpu,
                w = out(reg) _,
                t = out(reg) _,
                addr = out(reg) _,
                options(nostack),
            );
        }
        let cpu = cpu as u32;
        let done = match (status, cpu) {
            (0, _) => Done::Committed,
            (_, u32::MAX) => Done::NoCpu,
            _ => Done::Refused,
        };
        (done, cpu)
    }

    /// Installs the list `word` as the task list of the current CPU's
    /// `lists` if that task list is empty and the CPU's signal list plus the
    /// new list stay within `cap`. Used to finish a splice.
    ///
    /// # Safety
    /// As [`pop`]; and the caller owns every block of `word`, and gives them
    /// up on [`Done::Committed`].
    #[inline(always)]
    pub(crate) unsafe fn install(
        offset: isize,
        lists: *mut u8,
        ncpu: u32,
        word: u64,
        cap: u32,
    ) -> Done {
        let status: u64;
        let cpu: u64;
        let n_new = crate::free_list::count(word) as u64;
        // SAFETY: see the function's contract; only rseq_cs and the task
        // list word are written.
        unsafe {
            asm!(
                ".pushsection __rseq_cs, \"aw\"",
                ".balign 32",
                "3:",
                ".long 0, 0",
                ".quad 4f, (5f - 4f), 6f",
                ".popsection",
                "2:",
                "lea {n}, [rip + 3b]",
                "mov qword ptr fs:[{off} + 8], {n}",
                "4:",
                "mov {cpu}, qword ptr fs:[{off}]",
                "test {cpu}, {cpu}",
                "js 7f",
                "mov {cpu:e}, {cpu:e}",
                "cmp {cpu:e}, {ncpu:e}",
                "jae 7f",
                "mov {addr}, {cpu}",
                "shl {addr}, 10",
                "add {addr}, {lists}",
                "cmp qword ptr [{addr}], 0",
                "jne 8f",
                "mov {n}, qword ptr [{addr} + 8]",
                "shr {n}, 48",
                "add {n}, {k}",
                "cmp {n}, {cap}",
                "ja 8f",
                "mov qword ptr [{addr}], {word}",
                "5:",
                "xor {n:e}, {n:e}",
                "jmp 9f",
                ".byte 0x0f, 0xb9, 0x3d",
                ".long 0x53053053",
                "6:",
                "jmp 2b",
                "7:",
                "mov {cpu:e}, -1",
                "8:",
                "mov {n:e}, 1",
                "9:",
                off = in(reg) offset,
                lists = in(reg) lists,
                ncpu = in(reg) ncpu,
                word = in(reg) word,
                k = in(reg) n_new,
                cap = in(reg) cap as u64,
                n = out(reg) status,
                cpu = out(reg) cpu,
                addr = out(reg) _,
                options(nostack),
            );
        }
        match (status, cpu as u32) {
            (0, _) => Done::Committed,
            (_, u32::MAX) => Done::NoCpu,
            _ => Done::Refused,
        }
    }
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu")))]
mod imp {
    //! No rseq code for this target: the fallback is always used, and these
    //! are never reached with a table on the rseq path.
    use super::Done;

    pub(crate) fn registered() -> Option<isize> {
        None
    }

    pub(crate) fn cpu_id(_offset: isize) -> Option<u32> {
        None
    }

    pub(crate) unsafe fn pop(_offset: isize, _lists: *mut u8, _ncpu: u32) -> (*mut u8, u32) {
        (core::ptr::null_mut(), u32::MAX)
    }

    pub(crate) unsafe fn push(
        _offset: isize,
        _lists: *mut u8,
        _ncpu: u32,
        _block: *mut u8,
        _cap: u32,
    ) -> (Done, u32) {
        (Done::NoCpu, u32::MAX)
    }

    pub(crate) unsafe fn install(
        _offset: isize,
        _lists: *mut u8,
        _ncpu: u32,
        _word: u64,
        _cap: u32,
    ) -> Done {
        Done::NoCpu
    }
}

pub(crate) use imp::{cpu_id, install, pop, push, registered};
