//! The class of a block by the page it starts in, for C's `free`, which
//! has no size (the `override` feature).
//!
//! Asking jemalloc for a block's usable size (`sallocx`) costs about as
//! much as the whole cached pair. Instead, every block this allocator
//! takes from jemalloc for a cached class records its class in a byte for
//! the page it starts in ([`record`]), and every block of a cached class
//! goes back to jemalloc only after clearing that byte ([`clear`], in the
//! backend's frees). Blocks of no cached class write nothing, so a
//! `malloc` past the cache is a tail call to jemalloc.
//!
//! A byte cleared while other blocks of its page are still live only costs
//! those blocks the cache: their `free` finds no record and hands them to
//! jemalloc as they are, until a miss in that page records it again. What
//! must never be read is a byte that names a class for a page jemalloc has
//! given to another extent, and no such byte survives:
//!
//! - a record is written while its block is live, before that block goes
//!   back to jemalloc;
//! - the block goes back after a clear of its own, or after C's `free`
//!   found the page clear, which is then a clear later than the record;
//! - so every record is followed by a clear before its block is back, and
//!   jemalloc gives a page to another extent only once every block that
//!   starts in it is back: by then the page's last write is a clear, and
//!   the new extent's blocks read it or later records.
//!
//! A small extent holds blocks of one class, so a byte that names a class
//! names it for every block that starts in its page. Pages that were never
//! recorded read 0, and so does every page of a gigabyte with no recorded
//! block; the caller then gives the block to jemalloc as it is.
//!
//! Two levels: a static root of one pointer per gigabyte of the 47-bit
//! address space (1 MiB of zeroed `.bss`, touched only where used), and a
//! 256 KiB leaf per gigabyte, mapped on first use with `MAP_NORESERVE`, so
//! only the leaf pages of recorded pages become resident.

// Only the `override` feature's `free` reads it; its unit test runs always.
#![cfg_attr(not(feature = "override"), allow(dead_code))]

use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicU8, Ordering};

use crate::size_class::Class;

const PAGE_SHIFT: u32 = 12;
const REGION_SHIFT: u32 = 30;
const LEAF_LEN: usize = 1 << (REGION_SHIFT - PAGE_SHIFT);
const ROOT_LEN: usize = 1 << (47 - REGION_SHIFT);

static ROOT: [AtomicPtr<AtomicU8>; ROOT_LEN] =
    [const { AtomicPtr::new(ptr::null_mut()) }; ROOT_LEN];

/// The byte of `block`'s page, if its gigabyte has a leaf (or gets one,
/// with `make`).
#[inline]
fn slot(block: *const u8, make: bool) -> Option<&'static AtomicU8> {
    let a = block as usize;
    let root = ROOT.get(a >> REGION_SHIFT)?;
    let mut leaf = root.load(Ordering::Acquire);
    if leaf.is_null() {
        if !make {
            return None;
        }
        leaf = make_leaf(root)?;
    }
    // SAFETY: a leaf is LEAF_LEN bytes, mapped for good, and the index is
    // below LEAF_LEN.
    Some(unsafe { &*leaf.add((a >> PAGE_SHIFT) & (LEAF_LEN - 1)) })
}

#[cold]
fn make_leaf(root: &AtomicPtr<AtomicU8>) -> Option<*mut AtomicU8> {
    // SAFETY: an anonymous private mapping; zeroed memory is valid
    // `AtomicU8`s reading 0 (not recorded).
    let new = unsafe {
        libc::mmap(
            ptr::null_mut(),
            LEAF_LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if new == libc::MAP_FAILED {
        return None;
    }
    let new = new.cast::<AtomicU8>();
    match root.compare_exchange(ptr::null_mut(), new, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Some(new),
        Err(theirs) => {
            // SAFETY: ours, never published.
            unsafe { libc::munmap(new.cast(), LEAF_LEN) };
            Some(theirs)
        }
    }
}

/// `block`, just taken from jemalloc for `class`, starts in a page of that
/// class. (If no leaf can be mapped, nothing is recorded and nothing
/// stale can be read: that gigabyte reads "not recorded".)
#[inline]
pub(crate) fn record(block: *const u8, class: Class) {
    if let Some(s) = slot(block, true) {
        s.store(class.index() as u8 + 1, Ordering::Relaxed);
    }
}

/// `block`, of a cached class, is about to go back to jemalloc: its page
/// may start no cached block for all this map knows.
#[inline]
pub(crate) fn clear(block: *const u8) {
    if let Some(s) = slot(block, false) {
        s.store(0, Ordering::Relaxed);
    }
}

/// The class `block` was taken from jemalloc for, if recorded.
#[inline]
pub(crate) fn class_of_block(block: *const u8) -> Option<Class> {
    match slot(block, false)?.load(Ordering::Relaxed) {
        0 => None,
        k => Class::from_index(k as usize - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_clears_and_reads_nothing_elsewhere() {
        let class = Class::from_index(4).unwrap();
        // Far from where mmap places anything here (16 TiB), so no real
        // block of this process shares the page.
        let page = 0x1000_0000_0000usize as *const u8;
        assert_eq!(class_of_block(page), None);
        record(page, class);
        assert_eq!(class_of_block(page), Some(class));
        // Another address in the page, and the next page.
        assert_eq!(class_of_block(page.wrapping_add(100)), Some(class));
        assert_eq!(class_of_block(page.wrapping_add(4096)), None);
        clear(page);
        assert_eq!(class_of_block(page), None);
        // Beyond 47 bits: never recorded.
        let high = 1usize << 50;
        record(high as *const u8, class);
        assert_eq!(class_of_block(high as *const u8), None);
    }
}
