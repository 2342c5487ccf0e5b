//! The `hardened` feature: encoded links and a double-free check.
//!
//! Without the feature everything here is the identity or does nothing,
//! and compiles away.
//!
//! With it, a link (the first word of a linked block: the list word of the
//! rest of its list) is stored XORed with a per-process secret and the
//! block's own address, in the spirit of glibc's safe-linking, and checked
//! on every pop: a link is a list word, so its top bit is clear and its
//! head is 8-aligned, and where its list's count is exact (chains and
//! signal lists) the link counts one block fewer than its list. A block
//! held in a slot carries the encoded empty link, checked when the slot
//! hands it out, so a write after free into it is caught there too.
//! The secret has those four fixed bits set, so a stored value with any of
//! them clear, which is what a write after free of a pointer, a small
//! number, text or zeroes leaves, decodes to an impossible link and is
//! caught every time; other values are caught unless they decode to a
//! plausible link with the right count. A corrupted link aborts the
//! process with a message instead of handing out a wild pointer.
//!
//! Cached blocks also carry a key in their second word (the complement of
//! the secret XORed with the address, so never the encoded link of the
//! first word), which every allocation clears. A free
//! that finds the key finds a block that is cached already: a double free,
//! which aborts. So that every block has a second word, 8-byte requests are
//! served from the 16-byte class with this feature.

#[cfg(feature = "hardened")]
mod imp {
    use core::sync::atomic::{AtomicU64, Ordering};

    use super::{abort_with, corrupted};

    /// Bits every link has clear: the top bit (list words keep it free)
    /// and the low three (blocks are 8-aligned).
    /// The secret has them all set.
    const FIXED: u64 = 0x8000_0000_0000_0007;

    static SECRET: AtomicU64 = AtomicU64::new(0);

    /// Picks the secret, once, before the first table is used: eight
    /// bytes from `getrandom` (one system call, when the first table is
    /// made, never on an allocation's fast path). Where that fails, the
    /// kernel's per-process `AT_RANDOM` bytes stand in, mixed with a stack
    /// address: glibc derives its stack and pointer guards from those, so
    /// they are only the fallback.
    pub(crate) fn init() {
        if SECRET.load(Ordering::Acquire) != 0 {
            return;
        }
        let mut random = 0u64;
        // SAFETY: writes at most 8 bytes into `random`; GRND_NONBLOCK never
        // waits for the entropy pool.
        let got =
            unsafe { libc::getrandom((&mut random as *mut u64).cast(), 8, libc::GRND_NONBLOCK) };
        if got != 8 {
            // SAFETY: `getauxval` has no preconditions; `AT_RANDOM`, where
            // present, points at 16 bytes that live as long as the process.
            let aux = unsafe {
                let at = libc::getauxval(libc::AT_RANDOM) as *const u64;
                if at.is_null() {
                    0
                } else {
                    at.add(1).read_unaligned()
                }
            };
            let stack = &aux as *const u64 as u64;
            random = aux ^ stack.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
        }
        let secret = random | FIXED;
        let _ = SECRET.compare_exchange(0, secret, Ordering::AcqRel, Ordering::Acquire);
    }

    #[inline(always)]
    pub(crate) fn secret() -> u64 {
        SECRET.load(Ordering::Relaxed)
    }

    /// The value stored in `at`'s first word for the link `word`.
    #[inline(always)]
    pub(crate) fn encode(word: u64, at: *mut u8) -> u64 {
        word ^ secret() ^ at as u64
    }

    /// The link stored in `at`'s first word, checked.
    #[inline(always)]
    pub(crate) fn decode(stored: u64, at: *mut u8) -> u64 {
        let word = stored ^ secret() ^ at as u64;
        if word & FIXED != 0 {
            corrupted(at);
        }
        word
    }

    /// On a free of `block` (`size` bytes, its class size): aborts if it
    /// is cached already, else marks it cached ([`mark_cached`]).
    #[inline(always)]
    pub(crate) fn on_free(block: *mut u8, size: usize) {
        if !mark_cached(secret(), block, size) {
            double_free(block);
        }
    }

    /// On a free of `block` (`size` bytes, its class size): false if it
    /// is cached already (a double free), else marks it cached and gives
    /// it the encoded empty link that a slot's block carries.
    ///
    /// A task free's push does this first (`PerCpu::push`; the rseq path
    /// in its asm, the same steps), and a false goes to the free's one
    /// out-of-line call, which aborts. Every class has a second word here
    /// ([`served_size`] sends 8-byte requests to the 16-byte class), so
    /// there is no size test. The key is the complement of the encoded
    /// empty link, so the two words never read alike. `secret` is
    /// [`secret`], which the hit paths read from their table's header.
    ///
    /// [`served_size`]: crate::size_class::served_size
    #[inline(always)]
    pub(crate) fn mark_cached(secret: u64, block: *mut u8, size: usize) -> bool {
        debug_assert!(size >= 16, "a {size}-byte class under hardened");
        let empty = secret ^ block as u64;
        let key = !empty;
        let words = block as *mut u64;
        // SAFETY: the caller frees `block`, a block of at least 16 bytes
        // that it owns until the free completes.
        if unsafe { words.add(1).read() } == key {
            return false;
        }
        // SAFETY: as above.
        unsafe {
            words.add(1).write(key);
            words.write(empty);
        }
        true
    }

    /// On an allocation of `block` from a slot: checks the empty link
    /// [`on_free`] left, then clears the cached mark. The link must be the
    /// empty one exactly, so one compare covers what [`decode`] checks.
    #[inline(always)]
    pub(crate) fn on_slot_alloc(secret: u64, block: *mut u8, size: usize) {
        debug_assert!(size >= 16, "a {size}-byte class under hardened");
        // SAFETY: a slot's block of `size` bytes, just handed to us.
        if unsafe { (block as *const u64).read() } != secret ^ block as u64 {
            corrupted(block);
        }
        on_alloc(block, size);
    }

    /// On an allocation of `block` (`size` bytes): clears the cached mark,
    /// so that the block's one legitimate free does not find it.
    #[inline(always)]
    pub(crate) fn on_alloc(block: *mut u8, size: usize) {
        debug_assert!(size >= 16, "a {size}-byte class under hardened");
        // SAFETY: the block was just handed to us and holds `size` bytes,
        // at least 16.
        unsafe { (block as *mut u64).add(1).write(0) };
    }

    /// Aborts: `at` was freed while cached.
    #[cold]
    #[inline(never)]
    pub(crate) fn double_free(at: *mut u8) -> ! {
        abort_with("double free of cached block", at, "")
    }
}

#[cfg(not(feature = "hardened"))]
mod imp {
    #[inline(always)]
    pub(crate) fn init() {}

    #[inline(always)]
    pub(crate) fn encode(word: u64, _at: *mut u8) -> u64 {
        word
    }

    #[inline(always)]
    pub(crate) fn decode(stored: u64, _at: *mut u8) -> u64 {
        stored
    }

    #[inline(always)]
    pub(crate) fn on_free(_block: *mut u8, _size: usize) {}

    #[inline(always)]
    pub(crate) fn secret() -> u64 {
        0
    }

    #[inline(always)]
    pub(crate) fn mark_cached(_secret: u64, _block: *mut u8, _size: usize) -> bool {
        true
    }

    /// Never reached: only a `hardened` push answers `Push::Twice`.
    #[inline(always)]
    pub(crate) fn double_free(_at: *mut u8) {}

    #[inline(always)]
    pub(crate) fn on_slot_alloc(_secret: u64, _block: *mut u8, _size: usize) {}

    #[inline(always)]
    pub(crate) fn on_alloc(_block: *mut u8, _size: usize) {}
}

pub(crate) use imp::*;

/// Aborts: the link in `at` (null: not known) is not one this allocator
/// wrote. Only the `hardened` feature checks links.
#[cold]
#[inline(never)]
pub(crate) fn corrupted(at: *mut u8) -> ! {
    abort_with(
        "corrupted cached block (free-list link)",
        at,
        "(a write after free?)",
    )
}

/// Says what went wrong on stderr, without allocating, and aborts.
#[cold]
fn abort_with(what: &str, at: *mut u8, why: &str) -> ! {
    // Under `cfg(loom)` only the lists are built, without `stats`.
    #[cfg(not(loom))]
    {
        use core::fmt::Write;
        let mut err = crate::stderr::Stderr::new();
        let _ = write!(err, "percpu-alloc: {what}");
        if !at.is_null() {
            let _ = write!(err, " at {at:p}");
        }
        if !why.is_empty() {
            let _ = write!(err, " {why}");
        }
        let _ = writeln!(err, ": aborting");
    }
    #[cfg(loom)]
    let _ = (what, at, why);
    // SAFETY: ends the process; nothing after it runs.
    unsafe { libc::abort() }
}
