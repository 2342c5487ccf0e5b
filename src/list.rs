//! Intrusive lists whose whole state is one 64-bit word: the signal lists,
//! the deferred-return lists, and a task list spliced from a signal list
//! (its *chain*, see [`crate::table::TaskWord`]).
//!
//! A [`ListWord`] packs the head block's address (low 48 bits) with the
//! list's length (the bits above). A listed block's first eight bytes hold
//! the list word of the rest of the list, so every link carries its tail's
//! length too. Three things follow:
//! - a push or a take changes one word, so the lists can be lock-free
//!   (one CAS) and a restartable sequence can commit a chain pop with a
//!   single store;
//! - `nr_sig` is exact: it is read from the word the list is, never kept
//!   beside it;
//! - a splice hands one word from the signal list to the task list, in
//!   O(1), with the lengths already right in every link.
//!
//! User-space addresses on x86_64 and aarch64 Linux stay below 2^48 unless
//! a program asks `mmap` for more; a block above that is never linked
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
/// The largest length a list word can hold. Bit 63 is kept free, so a
/// list word is never negative (the task word's flags rely on it).
pub(crate) const MAX_COUNT: u32 = (1 << 15) - 1;

/// A list: `[0:1][len:15][head:48]`; zero is the empty list.
///
/// ```text
///  word ──► block A ──► block B ──► block C
///  (A, 3)   [(B, 2)]    [(C, 1)]    [(0, 0)]     [link] = first 8 bytes
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub(crate) struct ListWord(u64);

impl ListWord {
    /// The empty list.
    pub(crate) const EMPTY: ListWord = ListWord(0);

    /// The list whose head is `block` and whose length is `n`.
    #[inline]
    pub(crate) fn new(block: *mut u8, n: u32) -> ListWord {
        debug_assert!(fits(block) && n <= MAX_COUNT);
        ListWord(block as u64 | (n as u64) << COUNT_SHIFT)
    }

    /// The word as stored (in an atomic, a link, or a task word's chain).
    #[inline]
    pub(crate) const fn bits(self) -> u64 {
        self.0
    }

    /// A word read back from [`ListWord::bits`].
    #[inline]
    pub(crate) const fn from_bits(bits: u64) -> ListWord {
        ListWord(bits)
    }

    /// The head block (null when empty).
    #[inline]
    pub(crate) fn head(self) -> *mut u8 {
        (self.0 & PTR_MASK) as *mut u8
    }

    /// The length.
    #[inline]
    pub(crate) const fn len(self) -> u32 {
        ((self.0 >> COUNT_SHIFT) as u32) & MAX_COUNT
    }

    /// Whether the list is empty.
    #[inline]
    pub(crate) const fn is_empty(self) -> bool {
        self.0 == 0
    }
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
pub(crate) unsafe fn read_link(block: *mut u8) -> ListWord {
    // SAFETY: the caller's contract.
    ListWord(crate::hardened::decode(
        unsafe { (block as *const u64).read() },
        block,
    ))
}

/// Reads the link of the head of `list`, a list whose length is exact (a
/// signal list or a chain, not a deferred one): the rest of the list, one
/// block shorter, which the `hardened` feature checks.
///
/// # Safety
/// As [`read_link`], for the head of `list`, which is not empty.
#[inline]
pub(crate) unsafe fn read_next(list: ListWord) -> ListWord {
    let block = list.head();
    // SAFETY: the caller's contract.
    let link = unsafe { read_link(block) };
    if cfg!(feature = "hardened") && link.len() + 1 != list.len() {
        crate::hardened::corrupted(block);
    }
    link
}

/// Writes the link of a block about to be listed.
///
/// # Safety
/// The caller owns `block`, a cache block of at least 8 bytes, 8-aligned.
#[inline]
pub(crate) unsafe fn write_link(block: *mut u8, rest: ListWord) {
    // SAFETY: the caller's contract.
    unsafe { (block as *mut u64).write(crate::hardened::encode(rest.0, block)) }
}

/// The blocks of a list that the caller has taken off every list. Each
/// link is read before its block is yielded, so the caller may free the
/// block at once.
pub(crate) struct Chain(ListWord);

impl Chain {
    /// # Safety
    /// The caller owns every block of `list`.
    pub(crate) unsafe fn new(list: ListWord) -> Self {
        Chain(list)
    }
}

impl Iterator for Chain {
    type Item = *mut u8;

    #[inline]
    fn next(&mut self) -> Option<*mut u8> {
        let block = self.0.head();
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

    /// The current list (a moment's reading; the blocks are not the
    /// caller's).
    #[inline]
    pub(crate) fn word(&self) -> ListWord {
        ListWord(self.0.load(Ordering::Acquire))
    }

    /// The current length.
    #[inline]
    pub(crate) fn len(&self) -> u32 {
        ListWord(self.0.load(Ordering::Relaxed)).len()
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
        let mut word = ListWord(self.0.load(Ordering::Relaxed));
        loop {
            let n = word.len();
            if n >= MAX_COUNT || full(n) {
                return false;
            }
            // SAFETY: the caller owns `block`; it is not on any list yet.
            unsafe { write_link(block, word) };
            // Release publishes the link to whoever takes the list.
            match self.0.compare_exchange_weak(
                word.0,
                ListWord::new(block, n + 1).0,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => word = ListWord(now),
            }
        }
    }

    /// Pushes `block` with no limit. The length saturates at
    /// [`MAX_COUNT`]: for the deferred lists, whose lengths mean nothing.
    ///
    /// # Safety
    /// As [`AtomicList::push_unless`].
    pub(crate) unsafe fn push_saturating(&self, block: *mut u8) {
        let mut word = ListWord(self.0.load(Ordering::Relaxed));
        loop {
            // SAFETY: the caller owns `block`.
            unsafe { write_link(block, word) };
            let n = (word.len() + 1).min(MAX_COUNT);
            match self.0.compare_exchange_weak(
                word.0,
                ListWord::new(block, n).0,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(now) => word = ListWord(now),
            }
        }
    }

    /// Pushes a whole chain (a list the caller owns) with no limit, the
    /// length saturating as in [`AtomicList::push_saturating`]. Walks the
    /// chain once to find its tail: for rare paths only.
    ///
    /// # Safety
    /// The caller owns every block of `chain` and gives them up.
    pub(crate) unsafe fn push_chain(&self, chain: ListWord) {
        // SAFETY: the caller owns the chain.
        let tail = match unsafe { Chain::new(chain) }.last() {
            Some(tail) => tail,
            None => return,
        };
        let mut word = ListWord(self.0.load(Ordering::Relaxed));
        loop {
            // SAFETY: `tail` is ours; linking it to the list makes one chain.
            unsafe { write_link(tail, word) };
            let n = (chain.len() + word.len()).min(MAX_COUNT);
            match self.0.compare_exchange_weak(
                word.0,
                ListWord::new(chain.head(), n).0,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(now) => word = ListWord(now),
            }
        }
    }

    /// Takes the whole list; the caller owns what it returns.
    #[inline]
    pub(crate) fn take(&self) -> ListWord {
        if self.0.load(Ordering::Relaxed) == 0 {
            return ListWord::EMPTY;
        }
        ListWord(self.0.swap(0, Ordering::Acquire))
    }

    /// Takes the whole list if it holds at least `n` blocks, else nothing.
    /// Exact: a list that dropped below `n` meanwhile is left.
    #[inline]
    pub(crate) fn take_if_at_least(&self, n: u32) -> ListWord {
        let mut word = ListWord(self.0.load(Ordering::Relaxed));
        while word.len() >= n && !word.is_empty() {
            match self
                .0
                .compare_exchange_weak(word.0, 0, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return word,
                Err(now) => word = ListWord(now),
            }
        }
        ListWord::EMPTY
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
        let w = ListWord::new(p, 300);
        assert_eq!(w.head(), p);
        assert_eq!(w.len(), 300);
        assert_eq!(ListWord::from_bits(w.bits()), w);
        assert!(w.bits() < 1 << 63, "a list word is never negative");
        assert!(ListWord::EMPTY.is_empty() && !w.is_empty());
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
        assert!(list.take_if_at_least(21).is_empty());
        let word = list.take_if_at_least(20);
        assert_eq!(word.len(), 20);
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
        assert_eq!(unsafe { read_link(taken[0]) }.len(), 19);
        // SAFETY: as above.
        assert_eq!(unsafe { read_next(word) }.len(), 19);
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
    fn a_pushed_chain_keeps_every_block() {
        let mut mem = blocks(5);
        let addrs: Vec<*mut u8> = mem.iter_mut().map(|b| b as *mut Block as *mut u8).collect();
        let list = AtomicList::new();
        // SAFETY: the test owns the blocks.
        unsafe { list.push_saturating(addrs[0]) };
        let mut chain = ListWord::EMPTY;
        for &b in &addrs[1..] {
            // SAFETY: as above.
            unsafe { write_link(b, chain) };
            chain = ListWord::new(b, chain.len() + 1);
        }
        // SAFETY: the chain is the test's.
        unsafe { list.push_chain(chain) };
        assert_eq!(list.len(), 5);
        // SAFETY: taken whole.
        let mut got: Vec<_> = unsafe { Chain::new(list.take()) }.collect();
        got.sort();
        let mut want = addrs.clone();
        want.sort();
        assert_eq!(got, want);
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
