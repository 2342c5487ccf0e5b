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
//! On this path the top of each task list is kept in up to 30 front
//! slots beside the list word (see [`crate::cpu_cache::ClassLists::front`]):
//! popping a slot needs no read of the block, so a free followed by an
//! alloc of the same class is not held up by the link the free just wrote.
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

/// The CPU a pop reports when it found a corrupted link (the `hardened`
/// feature); no real CPU has this number.
pub(crate) const CORRUPT: u32 = u32::MAX - 1;

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
    //   13: the one committing store, the last instruction of the section
    //      (every branch that commits meets there);
    //   5: the end of the section;
    //   6: the abort handler, after glibc's signature 0x53053053 (encoded as
    //      the operand of a `ud1` that is never executed).
    // Labels start at 2 and skip 10 and 11: x86 assemblers read labels of
    // only 0s and 1s as binary. The CPU's cache is `cpu << 14` bytes past
    // CPU 0's (STRIDE_SHIFT).
    //
    // A task list word is [drain:1][front:5][nr:10][head:48], where nr
    // counts front slots and linked blocks; the 30 front slots follow the
    // two list words. The constants below are 1 << 58 | 1 << 48 (one more
    // in front and in nr) and 30 << 48.

    /// The start of every section: its descriptor (3:), the store of the
    /// descriptor's address into rseq_cs with `$tmp` as scratch (2:, where
    /// the abort handler restarts), then the section itself (4:): the CPU
    /// read and checked into `{cpu}` (7: when unusable), and
    /// `{addr} = {lists} + cpu << 14`.
    macro_rules! section_start {
        ($tmp:literal) => {
            concat!(
                ".pushsection __rseq_cs, \"aw\"\n",
                ".balign 32\n",
                "3:\n",
                ".long 0, 0\n",
                ".quad 4f, (5f - 4f), 6f\n",
                ".popsection\n",
                "2:\n",
                "lea {",
                $tmp,
                "}, [rip + 3b]\n",
                "mov qword ptr fs:[{off} + 8], {",
                $tmp,
                "}\n",
                "4:\n",
                "mov {cpu}, qword ptr fs:[{off}]\n",
                "test {cpu}, {cpu}\n",
                "js 7f\n",
                "mov {cpu:e}, {cpu:e}\n",
                "cmp {cpu:e}, {ncpu:e}\n",
                "jae 7f\n",
                "mov {addr}, {cpu}\n",
                "shl {addr}, 14\n",
                "add {addr}, {lists}\n",
            )
        };
    }

    /// The abort handler (6:), after glibc's signature, jumping back to 2:.
    macro_rules! abort_handler {
        () => {
            concat!(
                ".byte 0x0f, 0xb9, 0x3d\n",
                ".long 0x53053053\n",
                "6:\n",
                "jmp 2b\n",
            )
        };
    }

    // The `hardened` feature's additions to the sections (see
    // `crate::hardened`); empty without it.

    /// Before a pop loads a link: keep the old word for the check.
    #[cfg(feature = "hardened")]
    macro_rules! keep_word {
        () => {
            "mov {t}, {w}\n"
        };
    }
    #[cfg(not(feature = "hardened"))]
    macro_rules! keep_word {
        () => {
            ""
        };
    }

    /// After a pop loaded the link of block `{p}` into `{w}`: decode it and
    /// check it is the word of the rest of the list (count one less than
    /// the old word's `{t}`, no drain or front bits, an 8-aligned head);
    /// else leave the section at 14:.
    #[cfg(feature = "hardened")]
    macro_rules! check_link {
        () => {
            concat!(
                "xor {w}, {key}\n",
                "xor {w}, {p}\n",
                "shr {t}, 48\n",
                "sub {t}, 1\n",
                "shl {t}, 48\n",
                "xor {t}, {w}\n",
                "shr {t}, 48\n",
                "jnz 14f\n",
                "test {w:e}, 7\n",
                "jnz 14f\n",
            )
        };
    }
    #[cfg(not(feature = "hardened"))]
    macro_rules! check_link {
        () => {
            ""
        };
    }

    /// A pop found a corrupted link: no block, CPU `CORRUPT`.
    #[cfg(feature = "hardened")]
    macro_rules! corrupt_exit {
        () => {
            concat!("14:\n", "mov {cpu:e}, -2\n", "jmp 8f\n")
        };
    }
    #[cfg(not(feature = "hardened"))]
    macro_rules! corrupt_exit {
        () => {
            ""
        };
    }

    /// Before a push stores the link `{t}` into block `{block}`: encode it.
    #[cfg(feature = "hardened")]
    macro_rules! encode_link {
        () => {
            concat!("xor {t}, {key}\n", "xor {t}, {block}\n")
        };
    }
    #[cfg(not(feature = "hardened"))]
    macro_rules! encode_link {
        () => {
            ""
        };
    }

    /// Pops a block from the task list of the current CPU: the last front
    /// slot if any, else the head of the linked part. `lists` is the class's
    /// lists on CPU 0 (task word, signal word, front slots).
    ///
    /// Returns the block and the CPU; a null block when the list is empty or
    /// draining; CPU `u32::MAX` when there is no usable CPU.
    ///
    /// # Safety
    /// `offset` is `__rseq_offset`; `lists` and `ncpu` describe a live
    /// table whose task lists are changed only by these sections (or by a
    /// drain that follows the drain-bit protocol).
    #[inline(always)]
    pub(crate) unsafe fn pop(offset: isize, lists: *mut u8, ncpu: u32) -> (*mut u8, u32) {
        let block: *mut u8;
        let cpu: u64;
        // One section, with the `hardened` feature's secret as an extra
        // operand where it is on.
        macro_rules! section {
            ($($hardening:tt)*) => {
                asm!(
                    section_start!("p"),
                    "mov {w}, qword ptr [{addr}]",
                    // Zero is empty; a set drain bit makes the word negative.
                    "test {w}, {w}",
                    "jle 8f",
                    "mov {p}, {w}",
                    "shr {p}, 58",
                    "jz 12f",
                    // Front slot `front - 1` (at byte 16 + 8 * slot); the
                    // word loses one from its front count and one from nr.
                    "mov {p}, qword ptr [{addr} + {p} * 8 + 8]",
                    "mov {t}, 0x0401000000000000",
                    "sub {w}, {t}",
                    "jmp 13f",
                    "12:",
                    // The linked part's head; its link is the new word.
                    // Warm the next head for the next pop.
                    "mov {p}, {w}",
                    "and {p}, {mask}",
                    keep_word!(),
                    "mov {w}, qword ptr [{p}]",
                    check_link!(),
                    "mov {t}, {w}",
                    "and {t}, {mask}",
                    "prefetcht0 byte ptr [{t}]",
                    "13:",
                    "mov qword ptr [{addr}], {w}",
                    "5:",
                    "jmp 9f",
                    abort_handler!(),
                    corrupt_exit!(),
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
                    w = out(reg) _,
                    t = out(reg) _,
                    $($hardening)*
                    options(nostack),
                )
            };
        }
        // SAFETY: see the function's contract. The only memory written is
        // the rseq area's rseq_cs field and the task list word. The block or
        // slot read belongs to this CPU's list until the commit hands it to
        // us; the prefetch cannot fault.
        unsafe {
            #[cfg(feature = "hardened")]
            section!(key = in(reg) crate::hardened::secret(),);
            #[cfg(not(feature = "hardened"))]
            section!();
        }
        (block, cpu as u32)
    }

    /// Pushes `block` on the task list of the current CPU, into a free front
    /// slot if there is one, else onto the linked part, unless the task list
    /// and the signal list together hold `cap` blocks already. Returns what
    /// happened and the CPU (`u32::MAX` for [`Done::NoCpu`]).
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
        // One section, with the `hardened` feature's secret as an extra
        // operand where it is on.
        macro_rules! section {
            ($($hardening:tt)*) => {
                asm!(
                    section_start!("t"),
                    "mov {w}, qword ptr [{addr}]",
                    "test {w}, {w}",
                    "js 8f",
                    // nr + nr_sig against the cap.
                    "mov {n}, qword ptr [{addr} + 8]",
                    "shr {n}, 48",
                    "mov {t}, {w}",
                    "shr {t}, 48",
                    "and {t}, 0x3ff",
                    "add {n}, {t}",
                    "cmp {n}, {cap}",
                    "jae 8f",
                    "mov {u}, {w}",
                    "shr {u}, 58",
                    "cmp {u}, 30",
                    "jae 12f",
                    // Into front slot `front` (at byte 16 + 8 * slot): one
                    // more in front, one more in nr.
                    "mov qword ptr [{addr} + {u} * 8 + 16], {block}",
                    "mov {t}, 0x0401000000000000",
                    "add {t}, {w}",
                    "jmp 13f",
                    "12:",
                    // Onto the linked part. The link is the word of the
                    // linked part alone: no front count, and nr less the 30
                    // in front.
                    "mov {t}, {w}",
                    "shl {t}, 6",
                    "shr {t}, 6",
                    "mov {u}, 0x001e000000000000",
                    "sub {t}, {u}",
                    encode_link!(),
                    "mov qword ptr [{block}], {t}",
                    // The new word: the block as head, nr plus one, the
                    // front count kept.
                    "mov {t}, {w}",
                    "shr {t}, 48",
                    "add {t}, 1",
                    "shl {t}, 48",
                    "or {t}, {block}",
                    "13:",
                    "mov qword ptr [{addr}], {t}",
                    "5:",
                    "xor {n:e}, {n:e}",
                    "jmp 9f",
                    abort_handler!(),
                    "7:",
                    "mov {cpu:e}, -1",
                    "8:",
                    "mov {n:e}, 1",
                    "9:",
                    off = in(reg) offset,
                    lists = in(reg) lists,
                    ncpu = in(reg) ncpu,
                    block = in(reg) block,
                    cap = in(reg) cap as u64,
                    n = out(reg) status,
                    cpu = out(reg) cpu,
                    w = out(reg) _,
                    t = out(reg) _,
                    u = out(reg) _,
                    addr = out(reg) _,
                    $($hardening)*
                    options(nostack),
                )
            };
        }
        // SAFETY: see the function's contract. Besides rseq_cs and the task
        // list word, only the block's link or the first free front slot is
        // written, neither part of any list until the commit.
        unsafe {
            #[cfg(feature = "hardened")]
            section!(key = in(reg) crate::hardened::secret(),);
            #[cfg(not(feature = "hardened"))]
            section!();
        }
        let cpu = cpu as u32;
        let done = match (status, cpu) {
            (0, _) => Done::Committed,
            (_, u32::MAX) => Done::NoCpu,
            _ => Done::Refused,
        };
        (done, cpu)
    }

    /// Installs the list `word` as the task list of the current CPU if that
    /// task list is empty (no front slots, no linked part) and the CPU's
    /// signal list plus the new list stay within `cap`. Finishes a splice.
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
                section_start!("n"),
                "cmp qword ptr [{addr}], 0",
                "jne 8f",
                "mov {n}, qword ptr [{addr} + 8]",
                "shr {n}, 48",
                "add {n}, {k}",
                "cmp {n}, {cap}",
                "ja 8f",
                "13:",
                "mov qword ptr [{addr}], {word}",
                "5:",
                "xor {n:e}, {n:e}",
                "jmp 9f",
                abort_handler!(),
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

#[cfg(all(test, target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::cpu_cache::Table;
    use crate::free_list::{front_len, list_len, task_len, FRONT_SLOTS};
    use crate::{backend, drain, Path};
    use core::sync::atomic::Ordering;

    /// A table on the rseq path with this thread pinned to its CPU, or
    /// `None` where glibc did not register rseq (the fallback CI run).
    fn pinned_table(config: Config) -> Option<(*mut Table, usize)> {
        let offset = match registered() {
            Some(offset) => offset,
            None => {
                assert_ne!(
                    std::env::var("PERCPU_EXPECT_PATH").as_deref(),
                    Ok("rseq"),
                    "rseq expected but not registered"
                );
                return None;
            }
        };
        // SAFETY: sched_getcpu and sched_setaffinity on a local set.
        let cpu = unsafe {
            let cpu = libc::sched_getcpu() as usize;
            let mut set: libc::cpu_set_t = core::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            assert_eq!(
                libc::sched_setaffinity(0, core::mem::size_of_val(&set), &set),
                0
            );
            cpu
        };
        let table = Table::create(&config, Path::Rseq, offset);
        assert!(!table.is_null());
        Some((table, cpu))
    }

    #[test]
    fn push_fills_front_slots_then_the_list_and_pop_takes_them_back() {
        let Some((table, cpu)) = pinned_table(Config::new()) else {
            return;
        };
        // SAFETY: mapped above, unmapped at the end of the test.
        let t = unsafe { &*table };
        let header = t.header();
        let class = 4; // 64 bytes
        let lists = t.class_base(class);
        let n = FRONT_SLOTS as usize + 4;
        let blocks: Vec<*mut u8> = (0..n).map(|_| backend::alloc_class(class, false)).collect();
        for &b in &blocks {
            // SAFETY: a live table on the rseq path; we own each block.
            let (done, on) = unsafe { push(header.rseq_offset, lists, header.ncpu, b, 256) };
            assert_eq!((done, on as usize), (Done::Committed, cpu));
        }
        let word = t.cpu(cpu).lists[class].task.load(Ordering::Relaxed);
        assert_eq!(
            (front_len(word), list_len(word), task_len(word)),
            (FRONT_SLOTS, 4, n as u32)
        );
        let mut popped = Vec::new();
        for _ in 0..n {
            // SAFETY: as above.
            let (b, on) = unsafe { pop(header.rseq_offset, lists, header.ncpu) };
            assert_eq!(on as usize, cpu);
            popped.push(b);
        }
        // Front slots last-in first, then the linked part last-in first.
        let front = FRONT_SLOTS as usize;
        let mut expected: Vec<_> = blocks[..front].iter().rev().copied().collect();
        expected.extend(blocks[front..].iter().rev());
        assert_eq!(popped, expected);
        // SAFETY: as above.
        let (b, _) = unsafe { pop(header.rseq_offset, lists, header.ncpu) };
        assert!(b.is_null(), "empty after taking everything");
        // Refill, then a drain must find them all, slots included.
        for &b in &blocks {
            // SAFETY: as above.
            unsafe { push(header.rseq_offset, lists, header.ncpu, b, 256) };
        }
        let report = drain::trim(t);
        assert_eq!((report.blocks, report.cpus_skipped), (n, 0));
        assert_eq!(t.cpu(cpu).lists[class].task.load(Ordering::Relaxed), 0);
        // SAFETY: nothing uses the table now.
        unsafe { Table::destroy(table) };
    }

    #[test]
    fn push_stops_at_the_cap_and_install_needs_an_empty_task_list() {
        let Some((table, cpu)) = pinned_table(Config::new()) else {
            return;
        };
        // SAFETY: mapped above, unmapped at the end of the test.
        let t = unsafe { &*table };
        let header = t.header();
        let class = 2;
        let lists = t.class_base(class);
        let blocks: Vec<*mut u8> = (0..12)
            .map(|_| backend::alloc_class(class, false))
            .collect();
        for (i, &b) in blocks.iter().enumerate() {
            // SAFETY: a live table on the rseq path; we own each block.
            let (done, _) = unsafe { push(header.rseq_offset, lists, header.ncpu, b, 10) };
            let expected = if i < 10 {
                Done::Committed
            } else {
                Done::Refused
            };
            assert_eq!(done, expected, "push {i} with cap 10");
        }
        // Not empty: no install.
        let extra = backend::alloc_class(class, false);
        // SAFETY: `extra` is ours; a one-block list word.
        unsafe { crate::free_list::write_link(extra, 0) };
        let one = crate::free_list::pack(extra, 1);
        // SAFETY: as above.
        let done = unsafe { install(header.rseq_offset, lists, header.ncpu, one, 256) };
        assert_eq!(done, Done::Refused);
        let report = drain::trim(t);
        assert_eq!(report.blocks, 10);
        // Empty now: the install commits and the block is the task list.
        // SAFETY: as above.
        let done = unsafe { install(header.rseq_offset, lists, header.ncpu, one, 256) };
        assert_eq!(done, Done::Committed);
        assert_eq!(t.cpu(cpu).lists[class].task.load(Ordering::Relaxed), one);
        assert_eq!(drain::trim(t).blocks, 1);
        for &b in &blocks[10..] {
            // SAFETY: refused blocks are still ours.
            unsafe { backend::free_class(b, class) };
        }
        // SAFETY: nothing uses the table now.
        unsafe { Table::destroy(table) };
    }

    #[test]
    fn a_splice_that_cannot_install_defers_the_rest() {
        let Some((table, cpu)) = pinned_table(Config::new()) else {
            return;
        };
        // SAFETY: mapped above, unmapped at the end of the test.
        let t = unsafe { &*table };
        let header = t.header();
        let class = 3; // 48 bytes
        let lists = t.class_base(class);
        // One block on the task list, so the install must be refused.
        let first = backend::alloc_class(class, false);
        // SAFETY: a live table on the rseq path; we own the block.
        let (done, _) = unsafe { push(header.rseq_offset, lists, header.ncpu, first, 256) };
        assert_eq!(done, Done::Committed);
        for _ in 0..20 {
            let b = backend::alloc_class(class, false);
            // SAFETY: we own the block.
            let f = unsafe { crate::rules::free_signal(t, t.cpu(cpu), class, b) };
            assert_eq!(f, crate::rules::Free::Signal);
        }
        let got = match crate::rules::splice_rseq(t, cpu, class) {
            crate::rules::Alloc::Spliced(b) => b,
            other => panic!("expected a splice, got {other:?}"),
        };
        let cache = t.cpu(cpu);
        assert_eq!(task_len(cache.lists[class].task.load(Ordering::Relaxed)), 1);
        assert_eq!(cache.lists[class].sig.len(), 0);
        // SAFETY: quiescent; walking reads links only.
        let deferred = unsafe { crate::free_list::Chain::new(cache.deferred.word()) }.count();
        assert_eq!(deferred, 19, "the 19 blocks left after the one handed out");
        // SAFETY: the spliced block is ours.
        unsafe { backend::free_class(got, class) };
        let report = drain::trim(t);
        assert_eq!((report.blocks, report.deferred_blocks), (1, 19));
        // SAFETY: nothing uses the table now.
        unsafe { Table::destroy(table) };
    }
}
