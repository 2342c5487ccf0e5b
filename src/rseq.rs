//! Per-CPU exclusion by restartable sequences (Linux rseq).
//!
//! glibc 2.35 and later registers an rseq area for every thread; we read
//! that one and never register again. Each task-list operation is one
//! critical section: it reads the CPU number, finds that CPU's record of
//! the class, and ends in a single store of the task word. If the thread
//! is preempted, migrated or signalled before that store, the kernel moves
//! it to the abort handler, which starts the sequence over. So no atomics
//! and no locks, and a signal handler can never see a half-done operation.
//!
//! The sections make no calls and no system calls, and touch only the rseq
//! area, the table and, for a chain, the block being linked or unlinked.
//! The two hot ones, [`Rseq::pop`] and [`Rseq::push`], touch no block at
//! all: the blocks of a task list are held in the record's slots.
//!
//! Every section has the same frame:
//! - 3: its descriptor `{version 0, flags 0, start 4f, length 5f-4f, abort
//!   6f}`, 32-byte aligned, in section `__rseq_cs`;
//! - 6: the abort handler, out of line after glibc's signature
//!   `0x53053053` (the operand of a `ud1`, a trap if it were ever run),
//!   jumping back to 2:;
//! - 2: the restart: store the descriptor's address into `rseq_cs` (the
//!   kernel clears it on abort);
//! - 4: the section: read `cpu_id` (negative when this thread has no rseq
//!   area; inside a section it is the CPU the section runs on, as
//!   `cpu_id_start` is, since any migration aborts the section), find the
//!   record through the table's bases, check, and commit with one store,
//!   the last instruction;
//! - 5: the end. A refusal leaves the section without storing, through
//!   out-of-line code where it needs any, so the hot path has no jump.
//!
//! The table covers every possible CPU (the only numbers the kernel puts in
//! `cpu_id`), so the sections do no bounds check. Labels start at 2: x86
//! assemblers read labels made of 0s and 1s as binary. Every offset and bit
//! the sections use is a `const` operand taken from `crate::table` and
//! `crate::list`.

use crate::list::ListWord;
use crate::percpu::{PerCpu, Pop, Push};
use crate::size_class::Class;
use crate::table::{Site, Table};

/// The rseq path.
pub(crate) struct Rseq;

#[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
mod imp {
    use super::*;
    use crate::list::{fits, COUNT_SHIFT, PTR_MASK};
    #[cfg(feature = "hardened")]
    use crate::table::SECRET_OFF;
    use crate::table::{
        BASES, CAP_BY_SIZE, CHAIN, CHAIN_FLAGS, CHAIN_LEN_MASK, CHAIN_LIST, DEFERRED_OFF,
        FLAG_SHIFT, REC_HDR, SIG_OFF, SPECIAL, TASK_OFF,
    };
    use core::arch::asm;

    extern "C" {
        // glibc's description of its rseq registration (glibc >= 2.35); not
        // in the libc crate.
        static __rseq_offset: isize;
        static __rseq_size: u32;
    }

    /// Offset of the threads' rseq areas from the thread pointer, if glibc
    /// registered rseq for this process.
    pub(crate) fn registered() -> Option<isize> {
        // SAFETY: glibc defines both symbols and sets them before `main`;
        // they never change afterwards.
        let (offset, size) = unsafe { (__rseq_offset, __rseq_size) };
        (size != 0).then_some(offset)
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
        (cpu >= 0).then_some(cpu as u32)
    }

    /// Code out of line, in a section of its own, so that the hot path
    /// runs straight through and only refusals jump.
    macro_rules! cold {
        ($($line:expr),* $(,)?) => {
            concat!(
                ".pushsection .text.unlikely.percpu_rseq, \"ax\", @progbits\n",
                $($line,)*
                "\n.popsection\n",
            )
        };
    }

    /// The descriptor (3:), the abort handler (6:, out of line after
    /// glibc's signature, jumping back to the restart), the restart (2::
    /// store the descriptor's address into `rseq_cs`, which the kernel
    /// clears on abort) and the way into a section (4:): `{r}` becomes the
    /// record of the current CPU, or the section leaves for `$nocpu` with
    /// nothing of use in `{r}`. `{r}` also carries the descriptor's address.
    macro_rules! section_start {
        ($nocpu:literal) => {
            concat!(
                ".pushsection __rseq_cs, \"aw\"\n",
                ".balign 32\n",
                "3:\n",
                ".long 0, 0\n",
                ".quad 4f, (5f - 4f), 6f\n",
                ".popsection\n",
                cold!(
                    // ud1 edi, [rip + 0x53053053]: the signature is the
                    // last four bytes before 6:, and a trap if ever run.
                    ".byte 0x0f, 0xb9, 0x3d\n",
                    ".long 0x53053053\n",
                    "6:\n",
                    "jmp 2f\n"
                ),
                "2:\n",
                "lea {r}, [rip + 3b]\n",
                "mov qword ptr fs:[{off} + 8], {r}\n",
                "4:\n",
                // cpu_id, zero-extended: negative (glibc's -1 or -2) when
                // this thread has no rseq area. A migration aborts the
                // section, so it is the CPU the section commits on.
                "mov {r:e}, dword ptr fs:[{off} + 4]\n",
                "test {r:e}, {r:e}\n",
                "js ",
                $nocpu,
                "\n",
                "mov {r}, qword ptr [{t} + {r} * 8 + {bases}]\n",
                "add {r}, {ro}\n",
            )
        };
    }

    // The `hardened` feature's additions to the chain sections (see
    // `crate::hardened`); empty without it.

    /// After a chain pop loaded the link of block `{p}` into `{x}`: decode
    /// it and check it is the list word of the rest of the chain (length
    /// one less than the task word `{w}`'s, no flag bits, an 8-aligned
    /// head); else leave through 8: with `{p}` = 1.
    #[cfg(feature = "hardened")]
    macro_rules! check_link {
        () => {
            concat!(
                "xor {x}, {key}\n",
                "xor {x}, {p}\n",
                "mov {y}, {w}\n",
                "shr {y}, {count_shift}\n",
                "and {y}, {len_mask}\n",
                "sub {y}, 1\n",
                "shl {y}, {count_shift}\n",
                "xor {y}, {x}\n",
                "shr {y}, {count_shift}\n",
                "jnz 8f\n",
                "test {x:e}, 7\n",
                "jnz 8f\n",
            )
        };
    }
    #[cfg(not(feature = "hardened"))]
    macro_rules! check_link {
        () => {
            ""
        };
    }

    /// The exit for a corrupted link: `{p}` = 1, which no block is.
    #[cfg(feature = "hardened")]
    macro_rules! corrupt_exit {
        () => {
            cold!("8:\n", "mov {p:e}, 1\n", "jmp 5b")
        };
    }
    #[cfg(not(feature = "hardened"))]
    macro_rules! corrupt_exit {
        () => {
            ""
        };
    }

    /// After a slot pop's commit (`hardened`): a block whose first word is
    /// not the encoded empty link leaves as a refusal, `{p}` null and `{r}`
    /// the block's address with its low bit set (see `Pop::corrupted`),
    /// so the hit path tests nothing more than a refusal; else its key is
    /// cleared, as [`on_slot_alloc`](crate::hardened::on_slot_alloc) does.
    /// The misses jump to `9:`, past the check.
    #[cfg(feature = "hardened")]
    macro_rules! slot_check {
        () => {
            concat!(
                "mov {w}, qword ptr [{t} + {secret}]\n",
                "xor {w}, {p}\n",
                "cmp qword ptr [{p}], {w}\n",
                "jne 22f\n",
                "mov qword ptr [{p} + 8], 0\n",
                "9:\n",
                cold!(
                    "22:\n",
                    "lea {r}, [{p} + 1]\n",
                    "xor {p:e}, {p:e}\n",
                    "mov {q:e}, 1\n",
                    "jmp 9b",
                ),
            )
        };
    }
    #[cfg(not(feature = "hardened"))]
    macro_rules! slot_check {
        () => {
            "9:\n"
        };
    }

    /// Before a push's section (`hardened`): `{twice}` if `{block}` holds
    /// the key of a cached block in its second word, else the key there
    /// and the encoded empty link in its first, as
    /// [`mark_cached`](crate::hardened::mark_cached) does. `{w}` and `{s}`
    /// are the section's scratch registers, free until it starts.
    #[cfg(feature = "hardened")]
    macro_rules! mark_cached {
        () => {
            concat!(
                "mov {w}, qword ptr [{t} + {secret}]\n",
                "xor {w}, {block}\n",
                "mov {s}, {w}\n",
                "not {s}\n",
                "cmp qword ptr [{block} + 8], {s}\n",
                "je {twice}\n",
                "mov qword ptr [{block} + 8], {s}\n",
                "mov qword ptr [{block}], {w}\n",
            )
        };
    }
    #[cfg(not(feature = "hardened"))]
    macro_rules! mark_cached {
        () => {
            ""
        };
    }

    /// Before a chain push stores the link `{x}` into `{block}`: encode it.
    #[cfg(feature = "hardened")]
    macro_rules! encode_link {
        () => {
            concat!("xor {x}, {key}\n", "xor {x}, {block}\n")
        };
    }
    #[cfg(not(feature = "hardened"))]
    macro_rules! encode_link {
        () => {
            ""
        };
    }

    /// What every section is given: the rseq area's offset, the table,
    /// and the record's offset in a CPU's region (the record of CPU `cpu`
    /// is at `bases[cpu] + rec_off`, `bases` at `t + BASES`).
    #[inline(always)]
    fn operands(t: &Table, rec_off: usize) -> (isize, *const u8, usize) {
        (t.header().rseq_offset, t.addr(), rec_off)
    }

    // SAFETY: every operation is one restartable sequence on the current
    // CPU's record that commits with its last instruction, and a drain's
    // bit makes each of them refuse (`crate::drain`).
    unsafe impl PerCpu for Rseq {
        /// Pops the top slot: `{p}` the block, `{r}` the record, and on a
        /// refusal `{q}` zero when the miss is plain (see [`Pop`]). With
        /// `hardened`, the block is checked after the commit
        /// (`slot_check!`).
        #[inline(always)]
        fn pop(t: &Table, site: Site) -> Pop<'_> {
            let (off, t, ro) = operands(t, site.rec_off);
            let block: *mut u8;
            let r: usize;
            let q: usize;
            // SAFETY: `off` is `__rseq_offset` and `t` a live table on the
            // rseq path, whose bases cover every possible CPU (the only
            // numbers `cpu_id` takes). Only `rseq_cs` and the task word are
            // written, the word last.
            macro_rules! section {
                ($($hardening:tt)*) => {
                asm!(
                    section_start!("8f"),
                    "mov {w}, qword ptr [{r} + {task}]",
                    // Zero is empty; every special word is negative.
                    "test {w}, {w}",
                    "jle 7f",
                    "mov {p}, qword ptr [{r} + {w} * 8 + {top}]",
                    "sub {w}, 1",
                    "mov qword ptr [{r} + {task}], {w}",
                    "5:",
                    slot_check!(),
                    cold!(
                        // Nothing popped. A plain miss: the task list
                        // empty, the signal list empty (so no splice is
                        // due) and nothing deferred on this CPU (whose
                        // region starts `ro` before the record).
                        "7:\n",
                        "xor {p:e}, {p:e}\n",
                        "mov {q}, {w}\n",
                        "or {q}, qword ptr [{r} + {sig}]\n",
                        "mov {w}, {r}\n",
                        "sub {w}, {ro}\n",
                        "or {q}, qword ptr [{w} + {deferred}]\n",
                        "jmp 9b\n",
                        // No CPU: not plain, and no record.
                        "8:\n",
                        "xor {p:e}, {p:e}\n",
                        "xor {r:e}, {r:e}\n",
                        "mov {q:e}, 1\n",
                        "jmp 9b",
                    ),
                    off = in(reg) off,
                    t = in(reg) t,
                    ro = in(reg) ro,
                    p = out(reg) block,
                    r = out(reg) r,
                    w = out(reg) _,
                    q = out(reg) q,
                    bases = const BASES,
                    task = const TASK_OFF,
                    sig = const SIG_OFF,
                    deferred = const DEFERRED_OFF,
                    top = const REC_HDR - 8,
                    $($hardening)*
                    options(nostack),
                )
                };
            }
            // SAFETY: as above; with `hardened` the popped block's second
            // word is written too, after the commit made it ours.
            unsafe {
                #[cfg(feature = "hardened")]
                section!(secret = const SECRET_OFF,);
                #[cfg(not(feature = "hardened"))]
                section!();
            }
            Pop::new(block, r as isize, q == 0)
        }

        /// Fills the next slot unless `nr + nr_sig >= cap`. With
        /// `hardened`, the block is checked and marked first, before the
        /// section (whose restarts begin after it): see [`PerCpu::push`].
        #[inline(always)]
        unsafe fn push(t: &Table, site: Site, block: *mut u8) -> Push {
            let (off, t, ro) = operands(t, site.rec_off);
            macro_rules! section {
                ($($hardening:tt)*) => {
                    asm!(
                        mark_cached!(),
                        section_start!("{refused}"),
                        "mov {w}, qword ptr [{r} + {task}]",
                        // nr_sig: bits 48..63 of the signal list's word.
                        "mov {s}, qword ptr [{r} + {sig}]",
                        "shr {s}, {count_shift}",
                        // nr + nr_sig against the cap of the size's class;
                        // a special word is at least 2^63 and never passes.
                        "add {s}, {w}",
                        "cmp {s}, qword ptr [{t} + {size} * 8 + {caps}]",
                        "jae 7f",
                        "mov qword ptr [{r} + {w} * 8 + {slots}], {block}",
                        "add {w}, 1",
                        "mov qword ptr [{r} + {task}], {w}",
                        "5:",
                        cold!(
                            // Not pushed. A plain overflow: a list in slots
                            // at the cap, nothing deferred on this CPU.
                            "7:\n",
                            "test {w}, {w}\n",
                            "js {refused}\n",
                            "mov {w}, {r}\n",
                            "sub {w}, {ro}\n",
                            "cmp qword ptr [{w} + {deferred}], 0\n",
                            "jne {refused}\n",
                            "jmp {overflow}",
                        ),
                        off = in(reg) off,
                        t = in(reg) t,
                        ro = in(reg) ro,
                        size = in(reg) site.lookup_index(),
                        block = in(reg) block,
                        r = out(reg) _,
                        w = out(reg) _,
                        s = out(reg) _,
                        bases = const BASES,
                        task = const TASK_OFF,
                        sig = const SIG_OFF,
                        caps = const CAP_BY_SIZE,
                        deferred = const DEFERRED_OFF,
                        slots = const REC_HDR,
                        count_shift = const COUNT_SHIFT,
                        refused = label {
                            return Push::Refused;
                        },
                        overflow = label {
                            return Push::Overflow;
                        },
                        $($hardening)*
                        options(nostack),
                    )
                };
            }
            // SAFETY: as in `pop`; the caller owns `block`. Besides
            // `rseq_cs` and the task word, only the slot at the task list's
            // top is written, which no list holds until the commit, and
            // with `hardened` the block's first two words, before the
            // section.
            unsafe {
                #[cfg(feature = "hardened")]
                section!(
                    secret = const SECRET_OFF,
                    twice = label {
                        return Push::Twice;
                    },
                );
                #[cfg(not(feature = "hardened"))]
                section!();
            }
            Push::Done
        }

        /// Takes the head of a chain.
        fn pop_chain(t: &Table, class: Class) -> *mut u8 {
            let (off, t, ro) = operands(t, t.site_of(class).rec_off);
            let block: *mut u8;
            macro_rules! section {
                ($($hardening:tt)*) => {
                    asm!(
                        section_start!("7f"),
                        "mov {w}, qword ptr [{r} + {task}]",
                        // SPECIAL | CHAIN and no DRAIN in the top three bits.
                        "mov {x}, {w}",
                        "shr {x}, {flag_shift}",
                        "cmp {x}, {chain_flags}",
                        "jne 7f",
                        "mov {p}, {w}",
                        "and {p}, {mask}",
                        "mov {x}, qword ptr [{p}]",
                        check_link!(),
                        // The rest of the chain, or empty slots when none.
                        "test {x}, {x}",
                        "jz 12f",
                        "or {x}, {flags}",
                        "12:",
                        "mov qword ptr [{r} + {task}], {x}",
                        "5:",
                        cold!("7:\n", "xor {p:e}, {p:e}\n", "jmp 5b"),
                        corrupt_exit!(),
                        off = in(reg) off,
                        t = in(reg) t,
                        ro = in(reg) ro,
                        mask = in(reg) PTR_MASK,
                        flags = in(reg) SPECIAL | CHAIN,
                        p = out(reg) block,
                        r = out(reg) _,
                        w = out(reg) _,
                        x = out(reg) _,
                        bases = const BASES,
                        task = const TASK_OFF,
                        flag_shift = const FLAG_SHIFT,
                        chain_flags = const CHAIN_FLAGS,
                        $($hardening)*
                        options(nostack),
                    )
                };
            }
            // SAFETY: as in `pop`. The head's link is read inside the
            // section, so it is the link of the block the commit unlinks.
            unsafe {
                #[cfg(feature = "hardened")]
                section!(
                    key = in(reg) crate::hardened::secret(),
                    y = out(reg) _,
                    count_shift = const COUNT_SHIFT,
                    len_mask = const CHAIN_LEN_MASK,
                );
                #[cfg(not(feature = "hardened"))]
                section!();
            }
            if cfg!(feature = "hardened") && block as usize == 1 {
                crate::hardened::corrupted(core::ptr::null_mut());
            }
            block
        }

        /// Links `block` on top of a chain unless `nr + nr_sig >= cap`.
        unsafe fn push_chain(t: &Table, class: Class, block: *mut u8) -> bool {
            debug_assert!(fits(block));
            let cap = t.header().caps[class.index()];
            let (off, t, ro) = operands(t, t.site_of(class).rec_off);
            macro_rules! section {
                ($($hardening:tt)*) => {
                    asm!(
                        section_start!("{refused}"),
                        "mov {w}, qword ptr [{r} + {task}]",
                        "mov {x}, {w}",
                        "shr {x}, {flag_shift}",
                        "cmp {x}, {chain_flags}",
                        "jne {refused}",
                        // The chain's length (13 bits) plus nr_sig, against
                        // the cap.
                        "mov {x}, {w}",
                        "shr {x}, {count_shift}",
                        "and {x}, {len_mask}",
                        "mov {s}, qword ptr [{r} + {sig}]",
                        "shr {s}, {count_shift}",
                        "add {s}, {x}",
                        "cmp {s}, {cap}",
                        "jae {refused}",
                        // The link: the chain as a list word.
                        "mov {x}, {w}",
                        "and {x}, {list}",
                        encode_link!(),
                        "mov qword ptr [{block}], {x}",
                        // The new word: one more, `block` on top.
                        "mov {x}, {w}",
                        "shr {x}, {count_shift}",
                        "add {x}, 1",
                        "shl {x}, {count_shift}",
                        "or {x}, {block}",
                        "mov qword ptr [{r} + {task}], {x}",
                        "5:",
                        off = in(reg) off,
                        t = in(reg) t,
                        ro = in(reg) ro,
                        cap = in(reg) cap,
                        block = in(reg) block,
                        list = in(reg) CHAIN_LIST,
                        r = out(reg) _,
                        w = out(reg) _,
                        x = out(reg) _,
                        s = out(reg) _,
                        bases = const BASES,
                        task = const TASK_OFF,
                        sig = const SIG_OFF,
                        count_shift = const COUNT_SHIFT,
                        flag_shift = const FLAG_SHIFT,
                        chain_flags = const CHAIN_FLAGS,
                        len_mask = const CHAIN_LEN_MASK,
                        refused = label {
                            return false;
                        },
                        $($hardening)*
                        options(nostack),
                    )
                };
            }
            // SAFETY: as in `push`; the caller owns `block`, whose link is
            // written before the commit makes it the chain's head.
            unsafe {
                #[cfg(feature = "hardened")]
                section!(key = in(reg) crate::hardened::secret(),);
                #[cfg(not(feature = "hardened"))]
                section!();
            }
            true
        }

        /// Makes `chain` the task list if that holds nothing.
        unsafe fn install(t: &Table, class: Class, chain: ListWord) -> bool {
            let word = crate::table::TaskWord::chain(chain).bits();
            let n = chain.len() as u64;
            let cap = t.header().caps[class.index()];
            let (off, t, ro) = operands(t, t.site_of(class).rec_off);
            // SAFETY: as in `pop`; the caller owns the chain. Only
            // `rseq_cs` and the task word are written.
            unsafe {
                asm!(
                    section_start!("{refused}"),
                    "cmp qword ptr [{r} + {task}], 0",
                    "jne {refused}",
                    "mov {w}, qword ptr [{r} + {sig}]",
                    "shr {w}, {count_shift}",
                    "add {w}, {n}",
                    "cmp {w}, {cap}",
                    "ja {refused}",
                    "mov qword ptr [{r} + {task}], {word}",
                    "5:",
                    off = in(reg) off,
                    t = in(reg) t,
                    ro = in(reg) ro,
                    cap = in(reg) cap,
                    n = in(reg) n,
                    word = in(reg) word,
                    r = out(reg) _,
                    w = out(reg) _,
                    bases = const BASES,
                    task = const TASK_OFF,
                    sig = const SIG_OFF,
                    count_shift = const COUNT_SHIFT,
                    refused = label {
                        return false;
                    },
                    options(nostack),
                );
            }
            true
        }

        #[inline]
        fn cpu_hint(t: &Table) -> Option<usize> {
            let cpu = cpu_id(t.header().rseq_offset)? as usize;
            (cpu < t.header().ncpu as usize).then_some(cpu)
        }
    }
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu")))]
mod imp {
    //! No rseq code for this target: the fallback is always used, and
    //! these are never reached, as no table is made on the rseq path.
    use super::*;

    pub(crate) fn registered() -> Option<isize> {
        None
    }

    pub(crate) fn cpu_id(_offset: isize) -> Option<u32> {
        None
    }

    // SAFETY: every operation refuses.
    unsafe impl PerCpu for Rseq {
        fn pop(_t: &Table, _site: Site) -> Pop<'_> {
            Pop::no_cpu()
        }

        unsafe fn push(_t: &Table, _site: Site, _block: *mut u8) -> Push {
            Push::Refused
        }

        fn pop_chain(_t: &Table, _class: Class) -> *mut u8 {
            core::ptr::null_mut()
        }

        unsafe fn push_chain(_t: &Table, _class: Class, _block: *mut u8) -> bool {
            false
        }

        unsafe fn install(_t: &Table, _class: Class, _chain: ListWord) -> bool {
            false
        }

        fn cpu_hint(_t: &Table) -> Option<usize> {
            None
        }
    }
}

pub(crate) use imp::registered;

/// An rseq area for the unit tests: the same layout as the kernel's, in
/// this thread's static TLS, so the sections can run "on" any CPU number a
/// test writes into it. The kernel does not know this area, so it never
/// aborts a section that uses it: only for single-threaded tests that send
/// no signals.
#[cfg(all(test, target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
pub(crate) mod fake {
    use core::cell::Cell;

    #[repr(C, align(32))]
    struct Area {
        cpu_id_start: Cell<u32>,
        cpu_id: Cell<i32>,
        rseq_cs: Cell<u64>,
        flags: Cell<u32>,
    }

    thread_local! {
        static AREA: Area = const {
            Area {
                cpu_id_start: Cell::new(0),
                cpu_id: Cell::new(-1),
                rseq_cs: Cell::new(0),
                flags: Cell::new(0),
            }
        };
    }

    /// The area's offset from the thread pointer, as `__rseq_offset` is
    /// glibc's.
    pub(crate) fn offset() -> isize {
        let tp: usize;
        // SAFETY: on x86_64 Linux the thread pointer's first word holds
        // the thread pointer itself; the load touches nothing else.
        unsafe {
            core::arch::asm!("mov {tp}, qword ptr fs:[0]", tp = out(reg) tp, options(nostack, readonly, preserves_flags));
        }
        AREA.with(|a| a as *const Area as usize).wrapping_sub(tp) as isize
    }

    /// Runs the next sections "on" `cpu` (`None`: no rseq area).
    pub(crate) fn set_cpu(cpu: Option<usize>) {
        AREA.with(|a| {
            let cpu = cpu.map_or(-1, |c| c as i32);
            a.cpu_id_start.set(cpu.max(0) as u32);
            a.cpu_id.set(cpu);
            let _ = (a.rseq_cs.get(), a.flags.get());
        });
    }
}

/// What the sections assume of glibc's real rseq area (docs/design.md
/// section 8), checked where this machine can: `cpu_id` names the CPU the
/// thread runs on, and nothing the crate does writes the ID fields, which
/// a kernel in rseq "V2" mode treats as read-only. (A kernel in legacy
/// mode rewrites them on every return to user space, so there the second
/// check can only catch a write made since the last one.)
#[cfg(all(test, target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
mod area_tests {
    use core::alloc::{GlobalAlloc, Layout};

    /// `cpu_id_start` and `cpu_id` of this thread's registered area.
    fn ids(offset: isize) -> (u32, i32) {
        let tp: usize;
        // SAFETY: the thread pointer's first word holds the thread pointer
        // itself on x86_64 Linux; the load touches nothing else.
        unsafe {
            core::arch::asm!("mov {tp}, qword ptr fs:[0]", tp = out(reg) tp, options(nostack, readonly, preserves_flags));
        }
        let area = tp.wrapping_add_signed(offset) as *const u32;
        // SAFETY: glibc registered an area of at least 20 bytes at this
        // offset for every thread (`registered` said so); volatile, since
        // the kernel writes it behind the compiler's back.
        unsafe {
            (
                area.read_volatile(),
                area.add(1).cast::<i32>().read_volatile(),
            )
        }
    }

    fn pin(cpu: usize) {
        // SAFETY: a zeroed cpu_set_t is an empty set; the calls only read
        // and write it and this thread's mask.
        unsafe {
            let mut set: libc::cpu_set_t = core::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            let rc = libc::sched_setaffinity(0, core::mem::size_of_val(&set), &set);
            assert_eq!(rc, 0, "cannot pin to CPU {cpu}");
        }
    }

    #[test]
    fn cpu_id_names_the_cpu_and_no_section_writes_the_ids() {
        let Some(offset) = super::registered() else {
            eprintln!("glibc registered no rseq area: nothing to check");
            return;
        };
        // SAFETY: as in `pin`.
        let allowed: Vec<usize> = unsafe {
            let mut set: libc::cpu_set_t = core::mem::zeroed();
            assert_eq!(
                libc::sched_getaffinity(0, core::mem::size_of_val(&set), &mut set),
                0
            );
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .collect()
        };
        let alloc = crate::PerCpuAlloc::new();
        let layout = Layout::from_size_align(64, 8).unwrap();
        for &cpu in &allowed {
            pin(cpu);
            // SAFETY: sched_getcpu has no preconditions.
            assert_eq!(unsafe { libc::sched_getcpu() }, cpu as i32);
            assert_eq!(
                super::imp::cpu_id(offset),
                Some(cpu as u32),
                "cpu_id on CPU {cpu}"
            );
            assert_eq!(ids(offset), (cpu as u32, cpu as i32), "before the sections");
            // A burst of every kind of section this path runs for one
            // class: pops and pushes past the cap, and a drain.
            let blocks: Vec<*mut u8> = (0..300)
                // SAFETY: a valid layout of non-zero size.
                .map(|_| unsafe { alloc.alloc(layout) })
                .collect();
            for &b in &blocks {
                assert!(!b.is_null());
                // SAFETY: allocated just above with this layout.
                unsafe { alloc.dealloc(b, layout) };
            }
            if alloc.path() == crate::Path::Rseq {
                alloc.trim();
            }
            assert_eq!(ids(offset), (cpu as u32, cpu as i32), "after the sections");
        }
    }
}
