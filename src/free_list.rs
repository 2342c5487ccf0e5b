//! Intrusive free lists whose whole state is one 64-bit word.
//!
//! A list word packs the head block's address (low 48 bits) with the list's
//! length (the bits above; task list words also count their front slots,
//! see [`MAX_TASK_LIST`]). A free block's first eight bytes hold the list
//! word of the rest of the list, so a block carries its list's tail *and*
//! that tail's length. Three things follow:
//! - push and pop change one word, which is what lets a restartable
//!   sequence commit either with a single store;
//! - `nr` and `nr_sig` are exact: they are read from the same word the
//!   list is, never kept beside it;
//! - a splice is one word handed from the signal list to the task list, in
//!   O(1), with the counts already right in every link.
//!
//! User-space addresses on x86_64 and aarch64 Linux stay below 2^48 unless
//! a program asks `mmap` for more; a block above that is never cached
//! ([`fits`]).

use core::sync::atomic::Ordering;

// Under `--cfg loom` the lock-free lists run on loom's atomics, so that its
// model checker explores every interleaving of their loads and CASes
// (`loom_tests`). Nothing else changes: loom's `Ordering` is core's.
#[cfg(not(loom))]
use core::sync::atomic::AtomicU64;
#[cfg(loom)]
use loom::sync::atomic::AtomicU64;

/// The length lives above this bit.
pub(crate) const COUNT_SHIFT: u32 = 48;
/// The head address lives under this mask.
pub(crate) const PTR_MASK: u64 = (1 << COUNT_SHIFT) - 1;
/// The largest length a list word can hold. Bit 63 is kept free.
pub(crate) const MAX_COUNT: u32 = (1 << 15) - 1;
/// A task list word is `[drain:1][front:5][nr:10][head:48]`: `nr` counts
/// the whole task list, front slots and linked part. It must hold a
/// spliced signal list, which can pass the cap by one.
pub(crate) const MAX_TASK_LIST: u32 = (1 << 10) - 1;
/// Where a task list word counts its front slots (rseq path only).
pub(crate) const FRONT_SHIFT: u32 = 58;
/// Front slots per CPU and class: with the two list words, four cache
/// lines.
pub(crate) const FRONT_SLOTS: u32 = 30;
/// Set on a task list word while a drain owns the list (rseq path). It
/// makes the word negative, and every critical section refuses a negative
/// word: a push overflows, a pop misses.
pub(crate) const DRAIN_BIT: u64 = 1 << 63;

/// A task list's length (`nr`): front slots plus linked blocks.
#[inline]
pub(crate) fn task_len(word: u64) -> u32 {
    ((word >> COUNT_SHIFT) as u32) & MAX_TASK_LIST
}

/// The blocks in a task list word's front slots.
#[inline]
pub(crate) fn front_len(word: u64) -> u32 {
    ((word >> FRONT_SHIFT) as u32) & 0x1f
}

/// The blocks on a task list word's linked part.
#[inline]
pub(crate) fn list_len(word: u64) -> u32 {
    task_len(word) - front_len(word)
}

/// The head block of a list word (null when empty).
#[inline]
pub(crate) fn head(word: u64) -> *mut u8 {
    (word & PTR_MASK) as *mut u8
}

/// The length of a list word.
#[inline]
pub(crate) fn count(word: u64) -> u32 {
    ((word >> COUNT_SHIFT) as u32) & MAX_COUNT
}

/// The word of a list whose head is `block` and whose length is `n`.
#[inline]
pub(crate) fn pack(block: *mut u8, n: u32) -> u64 {
    block as u64 | (n as u64) << COUNT_SHIFT
}

/// Whether `block` can be linked: its address must fit in 48 bits.
#[inline]
pub(crate) fn fits(block: *mut u8) -> bool {
    (block as u64) >> COUNT_SHIFT == 0
}

/// Reads the link of a listed block (decoded and checked with the
/// `hardened` feature, which aborts on a link it did not write).
///
/// # Safety
/// `block` is on a list the caller owns (or has exclusive use of), so it is
/// valid, 8-aligned and at least 8 bytes long.
#[inline]
pub(crate) unsafe fn read_link(block: *mut u8) -> u64 {
    // SAFETY: the caller's contract.
    crate::hardened::decode(unsafe { (block as *const u64).read() }, block)
}

/// Reads the link of the head of `word`, a list whose count is exact (a
/// task or signal list, not a deferred one): the rest of the list, one
/// block shorter, which the `hardened` feature checks.
///
/// # Safety
/// As [`read_link`], for the head of `word`, which is not empty.
#[inline]
pub(crate) unsafe fn read_next(word: u64) -> u64 {
    let block = head(word);
    // SAFETY: the caller's contract.
    let link = unsafe { read_link(block) };
    if cfg!(feature = "hardened") && count(link) + 1 != count(word) {
        crate::hardened::corrupted(block);
    }
    link
}

/// Writes the link of a block about to be listed.
///
/// # Safety
/// The caller owns `block`, a cache block of at least 8 bytes, 8-aligned.
#[inline]
pub(crate) unsafe fn write_link(block: *mut u8, word: u64) {
    // SAFETY: the caller's contract.
    unsafe { (block as *mut u64).write(crate::hardened::encode(word, block)) }
}

/// The blocks of a list word that the caller has taken off every list.
/// Each link is read before its block is yielded, so the caller may free
/// the block at once.
pub(crate) struct Chain(u64);

impl Chain {
    /// # Safety
    /// The caller owns every block of `word`'s list.
    pub(crate) unsafe fn new(word: u64) -> Self {
        Chain(word & !DRAIN_BIT)
    }
}

impl Iterator for Chain {
    type Item = *mut u8;

    #[inline]
    fn next(&mut self) -> Option<*mut u8> {
        let block = head(self.0);
        if block.is_null() {
            return None;
        }
        // SAFETY: `Chain::new`'s caller owns the list, so its blocks are valid.
        self.0 = unsafe { read_link(block) };
        Some(block)
    }
}

/// A lock-free list: a push is a CAS of the word, and the only way to take
/// blocks off is to take the whole list. With no single-block pop there is
/// no ABA problem. Used for the signal lists and the deferred-return lists.
#[repr(transparent)]
#[derive(Default)]
pub(crate) struct AtomicList(AtomicU64);

impl AtomicList {
    /// An empty list.
    #[cfg(all(test, not(loom)))]
    pub(crate) const fn new() -> Self {
        AtomicList(AtomicU64::new(0))
    }

    /// An empty list (loom's atomics have no `const fn new`).
    #[cfg(all(test, loom))]
    pub(crate) fn new() -> Self {
        AtomicList(AtomicU64::new(0))
    }

    /// The current list word (its length is `count(word)`).
    #[inline]
    pub(crate) fn word(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// The current length.
    #[inline]
    pub(crate) fn len(&self) -> u32 {
        count(self.0.load(Ordering::Relaxed))
    }

    /// Pushes `block` unless `full(len)` says the list (with whatever the
    /// caller counts beside it) is full. Lock-free and async-signal-safe.
    /// Returns whether the block was pushed.
    ///
    /// # Safety
    /// The caller owns `block` (a cache block, [`fits`]) and gives it up on
    /// success.
    #[inline]
    pub(crate) unsafe fn push_unless(&self, block: *mut u8, full: impl Fn(u32) -> bool) -> bool {
        let mut word = self.0.load(Ordering::Relaxed);
        loop {
            let n = count(word);
            if n >= MAX_COUNT || full(n) {
                return false;
            }
            // SAFETY: the caller owns `block`; it is not on any list yet.
            unsafe { write_link(block, word) };
            // Release publishes the link to whoever takes the list.
            match self.0.compare_exchange_weak(
                word,
                pack(block, n + 1),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => word = now,
            }
        }
    }

    /// Pushes `block` with no limit. The length saturates at
    /// [`MAX_COUNT`]: for the deferred lists, whose lengths mean nothing.
    ///
    /// # Safety
    /// As [`AtomicList::push_unless`].
    pub(crate) unsafe fn push_saturating(&self, block: *mut u8) {
        let mut word = self.0.load(Ordering::Relaxed);
        loop {
            // SAFETY: the caller owns `block`.
            unsafe { write_link(block, word) };
            let n = (count(word) + 1).min(MAX_COUNT);
            match self.0.compare_exchange_weak(
                word,
                pack(block, n),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(now) => word = now,
            }
        }
    }

    /// Pushes a whole chain (a list word the caller owns) with no limit,
    /// the length saturating as in [`AtomicList::push_saturating`]. Walks
    /// the chain once to find its tail: for rare paths only.
    ///
    /// # Safety
    /// The caller owns every block of `chain` and gives them up.
    pub(crate) unsafe fn push_chain(&self, chain: u64) {
        // SAFETY: the caller owns the chain.
        let tail = match unsafe { Chain::new(chain) }.last() {
            Some(tail) => tail,
            None => return,
        };
        let mut word = self.0.load(Ordering::Relaxed);
        loop {
            // SAFETY: `tail` is ours; linking it to the list makes one chain.
            unsafe { write_link(tail, word) };
            let n = (count(chain) + count(word)).min(MAX_COUNT);
            match self.0.compare_exchange_weak(
                word,
                pack(head(chain), n),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(now) => word = now,
            }
        }
    }

    /// Takes the whole list; the caller owns what the word returned holds.
    #[inline]
    pub(crate) fn take(&self) -> u64 {
        if self.0.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.0.swap(0, Ordering::Acquire)
    }

    /// Takes the whole list if it holds at least `n` blocks, else nothing
    /// (returns 0). Exact: a list that dropped below `n` meanwhile is left.
    #[inline]
    pub(crate) fn take_if_at_least(&self, n: u32) -> u64 {
        let mut word = self.0.load(Ordering::Relaxed);
        while count(word) >= n && word != 0 {
            match self
                .0
                .compare_exchange_weak(word, 0, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return word,
                Err(now) => word = now,
            }
        }
        0
    }
}

#[cfg(all(test, loom))]
mod loom_tests;

// Plain threads on loom's atomics panic outside `loom::model`.
#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    // The field is never read by name: the lists write through raw pointers.
    #[allow(dead_code)]
    #[repr(align(16))]
    struct Block([u64; 2]);

    fn blocks(n: usize) -> Vec<Block> {
        // These lists have no table; pick the `hardened` secret as a
        // table would, before any link is written, so that a table made by
        // a test running beside these does not change it under them.
        crate::hardened::init();
        (0..n).map(|_| Block([0; 2])).collect()
    }

    #[test]
    fn words_pack_and_unpack() {
        let p = 0x7fff_dead_bee0usize as *mut u8;
        let w = pack(p, 300);
        assert_eq!(head(w), p);
        assert_eq!(count(w), 300);
        assert_eq!(task_len(w), 300);
        let with_front = w + (3 << FRONT_SHIFT) + (3 << COUNT_SHIFT);
        assert_eq!((front_len(with_front), list_len(with_front)), (3, 300));
        assert_eq!(task_len(with_front), 303);
        assert_eq!(head(with_front), p);
        assert_eq!(count(w | DRAIN_BIT), 300);
        assert!(fits(p));
        assert!(!fits((1u64 << 50) as *mut u8));
    }

    #[test]
    fn push_take_keeps_order_and_count() {
        let mut mem = blocks(20);
        let list = AtomicList::new();
        for b in mem.iter_mut() {
            // SAFETY: the test owns the blocks.
            assert!(unsafe { list.push_unless(b as *mut Block as *mut u8, |_| false) });
        }
        assert_eq!(list.len(), 20);
        assert_eq!(list.take_if_at_least(21), 0);
        let word = list.take_if_at_least(20);
        assert_eq!(count(word), 20);
        assert_eq!(list.len(), 0);
        // SAFETY: the list was taken whole.
        let taken: Vec<_> = unsafe { Chain::new(word) }.collect();
        let expected: Vec<_> = mem
            .iter_mut()
            .rev()
            .map(|b| b as *mut Block as *mut u8)
            .collect();
        assert_eq!(taken, expected);
        // Every link carries its own tail's length.
        // SAFETY: the blocks are ours again.
        assert_eq!(count(unsafe { read_link(taken[0]) }), 19);
    }

    #[test]
    fn push_respects_the_full_test() {
        let mut mem = blocks(3);
        let list = AtomicList::new();
        for b in mem.iter_mut() {
            // SAFETY: the test owns the blocks.
            unsafe { list.push_unless(b as *mut Block as *mut u8, |n| n >= 2) };
        }
        assert_eq!(list.len(), 2);
    }

    #[test]
    fn concurrent_pushes_and_takes_lose_nothing() {
        const THREADS: usize = 4;
        const PER: usize = 5000;
        let list = AtomicList::new();
        let mut mem = blocks(THREADS * PER);
        let addrs: Vec<usize> = mem.iter_mut().map(|b| b as *mut Block as usize).collect();
        let mut seen = std::thread::scope(|s| {
            for t in 0..THREADS {
                let list = &list;
                let mine = &addrs[t * PER..(t + 1) * PER];
                s.spawn(move || {
                    for &a in mine {
                        // SAFETY: each thread owns its own slice of blocks.
                        assert!(unsafe { list.push_unless(a as *mut u8, |_| false) });
                    }
                });
            }
            let taker = s.spawn(|| {
                let mut got = Vec::new();
                while got.len() < THREADS * PER / 2 {
                    let w = list.take_if_at_least(16);
                    // SAFETY: taken whole.
                    got.extend(unsafe { Chain::new(w) }.map(|p| p as usize));
                }
                got
            });
            taker.join().unwrap()
        });
        // SAFETY: every pusher has finished.
        seen.extend(unsafe { Chain::new(list.take()) }.map(|p| p as usize));
        seen.sort_unstable();
        let mut all = addrs.clone();
        all.sort_unstable();
        assert_eq!(seen, all);
    }
}
