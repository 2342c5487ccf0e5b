//! The backend: jemalloc, through tikv-jemalloc-sys.
//!
//! Cached classes are jemalloc's own size classes, so a miss asks jemalloc
//! for exactly the class size and a flush is a sized free of it: calls
//! without flags, which jemalloc serves on its fast path, made directly
//! through tikv-jemalloc-sys (a deferred return has no size at all).
//! Larger layouts aligned to at most 8 take the same two calls
//! ([`alloc`], [`free`]); over-aligned layouts the cache does not take go
//! through tikv-jemallocator's `Jemalloc`, which already maps a layout to
//! flags.

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::c_void;
use tikv_jemalloc_sys as je;
use tikv_jemallocator::Jemalloc;

/// A fresh block of the class jemalloc rounds `size` up to (for a cached
/// size, our class: the classes are jemalloc's), zeroed if asked, aligned
/// to 8 at least. `size` is non-zero.
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
/// possibly through the cache, or for `size` itself. With `override` the
/// block's page record is cleared first (see `size_map`).
///
/// # Safety
/// `block` is a live jemalloc block of the class of `size`, no longer used.
#[inline(always)]
pub(crate) unsafe fn free_sized(block: *mut u8, size: usize) {
    #[cfg(feature = "override")]
    crate::size_map::clear(block);
    // SAFETY: the caller's contract; jemalloc only needs the size's class.
    unsafe { je::sdallocx(block as *mut c_void, size, 0) }
}

/// Returns a block whose class is not known here (a deferred return),
/// clearing its page record first, as [`free_sized`] does.
///
/// # Safety
/// `block` is a live jemalloc allocation no longer used.
#[inline]
pub(crate) unsafe fn free_unsized(block: *mut u8) {
    // `free`, not `dallocx(block, 0)`: jemalloc 5.3's `free` tries its
    // thread cache's fast path (`free_fastpath`) first, where `dallocx`
    // goes straight to the general `ifree`.
    #[cfg(feature = "override")]
    crate::size_map::clear(block);
    // SAFETY: the caller's contract.
    unsafe { je::free(block as *mut c_void) }
}

/// Returns a block whose page has no class record (`override`'s C
/// `free`): nothing to clear.
///
/// # Safety
/// As [`free_unsized`].
#[cfg(feature = "override")]
#[inline(always)]
pub(crate) unsafe fn free_unrecorded(block: *mut u8) {
    // SAFETY: the caller's contract.
    unsafe { je::free(block as *mut c_void) }
}

/// The usable size of a live jemalloc block: its class size for every
/// block of a cached class, so the block's class can be found from it.
///
/// # Safety
/// `block` is a live jemalloc allocation.
#[inline(always)]
pub(crate) unsafe fn usable_size(block: *const u8) -> usize {
    // SAFETY: the caller's contract.
    unsafe { je::sallocx(block as *const c_void, 0) }
}

/// Allocates a layout the cache does not serve (larger than every cached
/// size, or over-aligned). An alignment of at most 8 is one jemalloc gives
/// every block, so that is [`alloc_sized`]'s `malloc`, with no flags to
/// work out; a larger one goes through tikv-jemallocator, whose
/// `GlobalAlloc` maps it to jemalloc's flags. Null where `size` and
/// `align` make no `Layout`. `size` is non-zero.
#[inline(always)]
pub(crate) fn alloc(size: usize, align: usize, zeroed: bool) -> *mut u8 {
    if align <= 8 {
        return alloc_sized(size, zeroed);
    }
    match Layout::from_size_align(size, align) {
        // SAFETY: a valid layout of non-zero size; jemalloc returns null
        // for what it cannot serve.
        Ok(layout) => unsafe {
            if zeroed {
                Jemalloc.alloc_zeroed(layout)
            } else {
                Jemalloc.alloc(layout)
            }
        },
        Err(_) => core::ptr::null_mut(),
    }
}

/// Frees what [`alloc`] returned for the same size and alignment.
///
/// # Safety
/// `ptr` came from [`alloc`] with this `size` and `align`, and is no
/// longer used.
#[inline(always)]
pub(crate) unsafe fn free(ptr: *mut u8, size: usize, align: usize) {
    if align <= 8 {
        // No page record to clear: `alloc` records none. SAFETY: `alloc`
        // took the block from `alloc_sized` for `size`.
        return unsafe { je::sdallocx(ptr as *mut c_void, size, 0) };
    }
    // SAFETY: `alloc` made the block with this layout, so it is a valid
    // one; the rest is the caller's contract.
    unsafe { Jemalloc.dealloc(ptr, Layout::from_size_align_unchecked(size, align)) }
}

/// Resizes what [`alloc`] returned, in place when jemalloc can.
///
/// # Safety
/// As `GlobalAlloc::realloc`, with non-zero sizes.
#[inline]
pub(crate) unsafe fn realloc(ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
    // SAFETY: the caller's contract.
    unsafe { Jemalloc.realloc(ptr, layout, new_size) }
}
