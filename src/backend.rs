//! The backend: jemalloc, through tikv-jemalloc-sys.
//!
//! Cached classes are jemalloc's own size classes, so a miss asks jemalloc
//! for exactly the class size and a flush is a sized free of it. Everything
//! the cache does not take (large, over-aligned) is passed through with
//! jemalloc's alignment flag, as tikv-jemallocator does.

use core::ffi::{c_int, c_void};
use tikv_jemalloc_sys as je;

/// Alignment that jemalloc gives every allocation of at least this size
/// without being asked (its quantum on x86_64 and aarch64).
const QUANTUM: usize = 16;

/// jemalloc flags for a layout: ask for the alignment only where jemalloc
/// would not give it anyway.
#[inline]
fn flags(size: usize, align: usize) -> c_int {
    if align <= QUANTUM && align <= size {
        0
    } else {
        align.trailing_zeros() as c_int
    }
}

/// A fresh block of the class jemalloc rounds `size` up to (our class:
/// the classes are jemalloc's), zeroed if asked. `size` is non-zero.
#[inline(always)]
pub(crate) fn alloc_sized(size: usize, zeroed: bool) -> *mut u8 {
    // SAFETY: `size` is non-zero.
    unsafe {
        if zeroed {
            je::calloc(1, size) as *mut u8
        } else {
            je::malloc(size) as *mut u8
        }
    }
}

/// Returns a block of the class of `size` (`sdallocx` without flags has a
/// fast path): one that [`alloc_sized`] made for a size of that class,
/// possibly through the cache.
///
/// # Safety
/// `block` is a live jemalloc block of the class of `size`, no longer used.
#[inline(always)]
pub(crate) unsafe fn free_sized(block: *mut u8, size: usize) {
    // SAFETY: the caller's contract; jemalloc only needs the size's class.
    unsafe { je::sdallocx(block as *mut c_void, size, 0) }
}

/// Returns a block whose class is not known here (a deferred return).
///
/// # Safety
/// `block` is a live jemalloc allocation no longer used.
#[inline]
pub(crate) unsafe fn free_unsized(block: *mut u8) {
    // SAFETY: the caller's contract.
    unsafe { je::dallocx(block as *mut c_void, 0) }
}

/// Allocates a layout the cache does not serve. `size` is non-zero.
#[inline]
pub(crate) fn alloc(size: usize, align: usize, zeroed: bool) -> *mut u8 {
    let flags = flags(size, align);
    // SAFETY: `size` is non-zero and `align` a power of two (a `Layout`'s);
    // jemalloc returns null for what it cannot serve. Without flags, the
    // calls with a fast path (see `alloc_sized`).
    unsafe {
        match (flags, zeroed) {
            (0, false) => je::malloc(size) as *mut u8,
            (0, true) => je::calloc(1, size) as *mut u8,
            (_, false) => je::mallocx(size, flags) as *mut u8,
            (_, true) => je::mallocx(size, flags | je::MALLOCX_ZERO) as *mut u8,
        }
    }
}

/// Frees what [`alloc`] returned for the same size and alignment.
///
/// # Safety
/// As `GlobalAlloc::dealloc`.
#[inline]
pub(crate) unsafe fn free(ptr: *mut u8, size: usize, align: usize) {
    // SAFETY: the caller's contract.
    unsafe { je::sdallocx(ptr as *mut c_void, size, flags(size, align)) }
}

/// Resizes what [`alloc`] returned, in place when jemalloc can.
///
/// # Safety
/// As `GlobalAlloc::realloc`, with `new_size` non-zero.
#[inline]
pub(crate) unsafe fn realloc(ptr: *mut u8, align: usize, new_size: usize) -> *mut u8 {
    // SAFETY: the caller's contract.
    unsafe { je::rallocx(ptr as *mut c_void, new_size, flags(new_size, align)) as *mut u8 }
}
