//! C's allocation functions over a [`PerCpuAlloc`], with glibc's semantics:
//! what the `override` feature exports as `malloc`, `free` and the rest,
//! and what the preloadable library (`capi/` in the repository) exports.
//!
//! Each function here takes the allocator it serves from; the exported
//! symbols pass `percpu_alloc::GLOBAL`. They follow what glibc's manual
//! and manual pages document, where it differs from bare C:
//!
//! - failures return null and set `errno` to `ENOMEM` (`EINVAL` for an
//!   impossible alignment: see [`aligned_alloc`] and [`memalign`]);
//!   `posix_memalign` returns the error instead and leaves `errno` alone;
//! - `malloc(0)` returns a unique block; `realloc(NULL, n)` is `malloc(n)`;
//!   `realloc(p, 0)` frees `p` and returns null, as glibc does;
//! - `calloc` and `reallocarray` return null on a product that overflows;
//! - `malloc_usable_size` is the block's class size, at least what was
//!   asked for, all of it writable;
//! - `memalign` rounds an alignment that is not a power of two up to one;
//!   `valloc` and `pvalloc` align to the page, `pvalloc` rounds the size
//!   up to whole pages.
//!
//! `malloc` asks for an alignment of 8: every class from 16 bytes up is a
//! multiple of 16 and so aligned to it, and only a block of at most 8
//! bytes, which no 16-aligned type fits in, can be aligned to 8 only
//! (jemalloc does the same).
//!
//! `free` has no size; the block's usable size is its class size, which
//! finds its class. With `override` the page's class record gives it (see
//! `size_map`), and a block whose page has none goes to jemalloc as it
//! is; without, jemalloc is asked (`PerCpuAlloc::dealloc_unsized`).
//! `free_sized` and `free_aligned_sized` (C23) take the size the program
//! gives and save that lookup.

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::{c_int, c_void};
use core::ptr;

use crate::PerCpuAlloc;

/// What `malloc` asks for (see the module's documentation).
const MALLOC_ALIGN: usize = 8;

fn set_errno(code: c_int) {
    // SAFETY: glibc's per-thread errno location is always valid.
    #[cfg(target_os = "linux")]
    unsafe {
        *libc::__errno_location() = code
    };
    #[cfg(not(target_os = "linux"))]
    let _ = code;
}

/// `p` as C wants it: null sets `errno` to `ENOMEM`.
fn or_enomem(p: *mut u8) -> *mut c_void {
    if p.is_null() {
        set_errno(libc::ENOMEM);
    }
    p.cast()
}

fn enomem() -> *mut c_void {
    set_errno(libc::ENOMEM);
    ptr::null_mut()
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        page as usize
    } else {
        4096
    }
}

/// `malloc(size)`.
///
/// # Safety
/// None beyond C's: the block is freed once, through this allocator.
#[inline(always)]
pub unsafe fn malloc(a: &PerCpuAlloc, size: usize) -> *mut c_void {
    match Layout::from_size_align(size, MALLOC_ALIGN) {
        // SAFETY: a valid layout; a zero size gets a block of its own.
        // A null has `errno` set already.
        Ok(_) => unsafe { a.alloc_for_c(size, false) }.cast(),
        Err(_) => enomem(),
    }
}

/// `calloc(n, size)`: zeroed, null on an overflowing product.
///
/// # Safety
/// As [`malloc`].
pub unsafe fn calloc(a: &PerCpuAlloc, n: usize, size: usize) -> *mut c_void {
    match n
        .checked_mul(size)
        .filter(|&total| Layout::from_size_align(total, MALLOC_ALIGN).is_ok())
    {
        // SAFETY: a valid layout, as for `malloc`.
        Some(total) => unsafe { a.alloc_for_c(total, true) }.cast(),
        None => enomem(),
    }
}

/// `free(p)`; null is ignored.
///
/// # Safety
/// `p` is null or a live block from this allocator's C functions, not used
/// after.
#[inline(always)]
pub unsafe fn free(a: &PerCpuAlloc, p: *mut c_void) {
    if !p.is_null() {
        // SAFETY: the caller's contract.
        unsafe { a.dealloc_unsized(p.cast()) }
    }
}

/// `free_sized(p, size)` (C23): `size` is what `malloc`, `calloc` (the
/// product) or `realloc` was asked for.
///
/// # Safety
/// As [`free`], and `size` as above.
pub unsafe fn free_sized(a: &PerCpuAlloc, p: *mut c_void, size: usize) {
    if !p.is_null() {
        // SAFETY: the block was allocated with this very layout (its size
        // made a valid one then), by `malloc`, `calloc` or `realloc`.
        unsafe {
            a.dealloc(
                p.cast(),
                Layout::from_size_align_unchecked(size, MALLOC_ALIGN),
            )
        }
    }
}

/// The layout of `aligned_alloc(align, size)` and its relatives: at least
/// `malloc`'s alignment.
fn aligned_layout(align: usize, size: usize) -> Option<Layout> {
    Layout::from_size_align(size, align.max(MALLOC_ALIGN)).ok()
}

/// `free_aligned_sized(p, align, size)` (C23), for a block of
/// `aligned_alloc(align, size)`.
///
/// # Safety
/// As [`free`], with `align` and `size` those of the `aligned_alloc`.
pub unsafe fn free_aligned_sized(a: &PerCpuAlloc, p: *mut c_void, align: usize, size: usize) {
    if p.is_null() {
        return;
    }
    match aligned_layout(align, size) {
        // SAFETY: the layout `aligned_alloc` allocated the block with.
        Some(layout) => unsafe { a.dealloc(p.cast(), layout) },
        // Not a layout `aligned_alloc` could have served: the program's
        // size is wrong, so trust the block's own.
        // SAFETY: the caller's contract.
        None => unsafe { a.dealloc_unsized(p.cast()) },
    }
}

/// `realloc(p, size)`: `malloc` for null, `free` and null for a zero size
/// (glibc's choice); on failure `p` is untouched.
///
/// # Safety
/// As [`free`] for `p`.
pub unsafe fn realloc(a: &PerCpuAlloc, p: *mut c_void, size: usize) -> *mut c_void {
    if p.is_null() {
        // SAFETY: forwarded.
        return unsafe { malloc(a, size) };
    }
    if size == 0 {
        // SAFETY: forwarded.
        unsafe { free(a, p) };
        return ptr::null_mut();
    }
    if Layout::from_size_align(size, MALLOC_ALIGN).is_err() {
        return enomem();
    }
    // SAFETY: a live jemalloc block (the caller's contract).
    let old = unsafe { a.usable_size(p.cast()) };
    // SAFETY: `old` is the block's class size, so the layout is the one a
    // `dealloc` of it takes (see `dealloc_unsized`); the new size makes a
    // valid layout (checked). Copying `old` bytes reads only the block.
    or_enomem(unsafe {
        a.realloc(
            p.cast(),
            Layout::from_size_align_unchecked(old, MALLOC_ALIGN),
            size,
        )
    })
}

/// `reallocarray(p, n, size)`: `realloc` of the product, null (and `p`
/// untouched) if it overflows.
///
/// # Safety
/// As [`realloc`].
pub unsafe fn reallocarray(a: &PerCpuAlloc, p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        // SAFETY: forwarded.
        Some(total) => unsafe { realloc(a, p, total) },
        None => enomem(),
    }
}

/// `posix_memalign(out, align, size)`: `EINVAL` unless `align` is a power
/// of two and a multiple of `sizeof(void *)`, `ENOMEM` if the block
/// cannot be had; `*out` is set only on success, `errno` never.
///
/// # Safety
/// `out` is valid for a write.
pub unsafe fn posix_memalign(
    a: &PerCpuAlloc,
    out: *mut *mut c_void,
    align: usize,
    size: usize,
) -> c_int {
    if !align.is_power_of_two() || !align.is_multiple_of(core::mem::size_of::<*mut c_void>()) {
        return libc::EINVAL;
    }
    let Some(layout) = aligned_layout(align, size) else {
        return libc::ENOMEM;
    };
    // SAFETY: a valid layout.
    let p = unsafe { a.alloc(layout) };
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller's contract.
    unsafe { *out = p.cast() };
    0
}

/// `aligned_alloc(align, size)`: `EINVAL` for an alignment that is not a
/// power of two (glibc 2.38's check; older glibc took any).
///
/// # Safety
/// As [`malloc`]; free with [`free`] or [`free_aligned_sized`].
pub unsafe fn aligned_alloc(a: &PerCpuAlloc, align: usize, size: usize) -> *mut c_void {
    if !align.is_power_of_two() {
        set_errno(libc::EINVAL);
        return ptr::null_mut();
    }
    match aligned_layout(align, size) {
        // SAFETY: a valid layout.
        Some(layout) => or_enomem(unsafe { a.alloc(layout) }),
        None => enomem(),
    }
}

/// `memalign(align, size)`, as glibc: an alignment that is not a power of
/// two is rounded up to one, and one past `SIZE_MAX / 2 + 1` is `EINVAL`.
/// (glibc passes alignments up to its 16-byte `MALLOC_ALIGNMENT` to
/// `malloc`, which gives 16 anyway; `malloc` here gives 8 to blocks of 8
/// bytes, so only 8 and less go to it.)
///
/// # Safety
/// As [`malloc`].
pub unsafe fn memalign(a: &PerCpuAlloc, align: usize, size: usize) -> *mut c_void {
    if align <= MALLOC_ALIGN {
        // SAFETY: forwarded.
        return unsafe { malloc(a, size) };
    }
    let Some(align) = align.checked_next_power_of_two() else {
        set_errno(libc::EINVAL);
        return ptr::null_mut();
    };
    match aligned_layout(align, size) {
        // SAFETY: a valid layout.
        Some(layout) => or_enomem(unsafe { a.alloc(layout) }),
        None => enomem(),
    }
}

/// `valloc(size)`: page-aligned.
///
/// # Safety
/// As [`malloc`].
pub unsafe fn valloc(a: &PerCpuAlloc, size: usize) -> *mut c_void {
    // SAFETY: forwarded.
    unsafe { memalign(a, page_size(), size) }
}

/// `pvalloc(size)`: page-aligned, the size rounded up to whole pages.
///
/// # Safety
/// As [`malloc`].
pub unsafe fn pvalloc(a: &PerCpuAlloc, size: usize) -> *mut c_void {
    let page = page_size();
    match size.checked_next_multiple_of(page) {
        // SAFETY: forwarded.
        Some(rounded) => unsafe { memalign(a, page, rounded) },
        None => enomem(),
    }
}

/// `malloc_usable_size(p)`: 0 for null, else the block's class size,
/// which the program may write to the end of.
///
/// # Safety
/// `p` is null or a live block from this allocator's C functions.
pub unsafe fn malloc_usable_size(a: &PerCpuAlloc, p: *mut c_void) -> usize {
    if p.is_null() {
        0
    } else {
        // SAFETY: the caller's contract.
        unsafe { a.usable_size(p.cast()) }
    }
}

/// The symbols: with the `override` feature in the library, and in the
/// preloadable library, which enables it. Each passes
/// [`GLOBAL`](crate::GLOBAL) to the function of the same name above.
#[cfg(feature = "override")]
mod exports {
    use core::ffi::{c_int, c_void};

    use crate::GLOBAL;

    /// C's `malloc`.
    ///
    /// # Safety
    /// As C's.
    #[no_mangle]
    pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
        // SAFETY: forwarded.
        unsafe { super::malloc(&GLOBAL, size) }
    }

    /// C's `calloc`.
    ///
    /// # Safety
    /// As C's.
    #[no_mangle]
    pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
        // SAFETY: forwarded.
        unsafe { super::calloc(&GLOBAL, n, size) }
    }

    /// C's `realloc`.
    ///
    /// # Safety
    /// As C's.
    #[no_mangle]
    pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
        // SAFETY: forwarded.
        unsafe { super::realloc(&GLOBAL, p, size) }
    }

    /// C's `reallocarray`.
    ///
    /// # Safety
    /// As C's.
    #[no_mangle]
    pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
        // SAFETY: forwarded.
        unsafe { super::reallocarray(&GLOBAL, p, n, size) }
    }

    /// C's `free`.
    ///
    /// # Safety
    /// As C's.
    #[no_mangle]
    pub unsafe extern "C" fn free(p: *mut c_void) {
        // SAFETY: forwarded.
        unsafe { super::free(&GLOBAL, p) }
    }

    /// C23's `free_sized`.
    ///
    /// # Safety
    /// As C's.
    #[no_mangle]
    pub unsafe extern "C" fn free_sized(p: *mut c_void, size: usize) {
        // SAFETY: forwarded.
        unsafe { super::free_sized(&GLOBAL, p, size) }
    }

    /// C23's `free_aligned_sized`.
    ///
    /// # Safety
    /// As C's.
    #[no_mangle]
    pub unsafe extern "C" fn free_aligned_sized(p: *mut c_void, align: usize, size: usize) {
        // SAFETY: forwarded.
        unsafe { super::free_aligned_sized(&GLOBAL, p, align, size) }
    }

    /// POSIX's `posix_memalign`.
    ///
    /// # Safety
    /// As POSIX's.
    #[no_mangle]
    pub unsafe extern "C" fn posix_memalign(
        out: *mut *mut c_void,
        align: usize,
        size: usize,
    ) -> c_int {
        // SAFETY: forwarded.
        unsafe { super::posix_memalign(&GLOBAL, out, align, size) }
    }

    /// C11's `aligned_alloc`.
    ///
    /// # Safety
    /// As C's.
    #[no_mangle]
    pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
        // SAFETY: forwarded.
        unsafe { super::aligned_alloc(&GLOBAL, align, size) }
    }

    /// glibc's `memalign`.
    ///
    /// # Safety
    /// As glibc's.
    #[no_mangle]
    pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
        // SAFETY: forwarded.
        unsafe { super::memalign(&GLOBAL, align, size) }
    }

    /// `valloc`.
    ///
    /// # Safety
    /// As glibc's.
    #[no_mangle]
    pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
        // SAFETY: forwarded.
        unsafe { super::valloc(&GLOBAL, size) }
    }

    /// glibc's `pvalloc`.
    ///
    /// # Safety
    /// As glibc's.
    #[no_mangle]
    pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
        // SAFETY: forwarded.
        unsafe { super::pvalloc(&GLOBAL, size) }
    }

    /// glibc's `malloc_usable_size`.
    ///
    /// # Safety
    /// As glibc's.
    #[no_mangle]
    pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
        // SAFETY: forwarded.
        unsafe { super::malloc_usable_size(&GLOBAL, p) }
    }

    /// Marks the calling thread as in signal context until the matching
    /// [`percpu_alloc_signal_leave`]: a C handler's frees then go to the
    /// signal lists and never into jemalloc. Async-signal-safe; nests.
    #[no_mangle]
    pub extern "C" fn percpu_alloc_signal_enter() {
        core::mem::forget(crate::enter_signal_context());
    }

    /// Ends the mark of the last [`percpu_alloc_signal_enter`].
    #[no_mangle]
    pub extern "C" fn percpu_alloc_signal_leave() {
        crate::context::leave_signal_context();
    }

    /// Gives every cached block back to jemalloc, from every CPU; returns
    /// the bytes released.
    #[no_mangle]
    pub extern "C" fn percpu_alloc_trim() -> usize {
        GLOBAL.trim().bytes
    }

    /// The bytes the per-CPU caches hold now.
    #[no_mangle]
    pub extern "C" fn percpu_alloc_cached_bytes() -> usize {
        GLOBAL.cached_bytes()
    }

    /// 1 on the rseq path, 0 on the fallback.
    #[no_mangle]
    pub extern "C" fn percpu_alloc_rseq() -> c_int {
        c_int::from(GLOBAL.path() == crate::Path::Rseq)
    }

    /// Writes the statistics table (`PerCpuAlloc::stats`) to standard
    /// error, without allocating.
    #[no_mangle]
    pub extern "C" fn percpu_alloc_print_stats() {
        use core::fmt::Write;
        let mut out = crate::stderr::Stderr::new();
        let _ = write!(out, "{}", GLOBAL.stats());
    }

    /// `struct percpu_alloc_stats` of `capi/include/percpu_alloc.h`, field
    /// for field: the process-wide figures of `PerCpuAlloc::stats`. New
    /// fields go at the end, so a program built against an older header
    /// reads a prefix of it.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct CStats {
        /// 1 on the rseq path, 0 on the fallback.
        pub rseq: c_int,
        /// 1 when the event counters count (the `stats` feature).
        pub counting: c_int,
        /// CPUs the caches cover.
        pub cpus: usize,
        /// Blocks cached now, every CPU and class.
        pub cached_blocks: u64,
        /// Their bytes.
        pub cached_bytes: u64,
        /// Blocks waiting on deferred lists.
        pub deferred_blocks: u64,
        /// Allocs served from a task list.
        pub hits: u64,
        /// Allocs that spliced a signal list onto an empty task list.
        pub splices: u64,
        /// Allocs that went to jemalloc.
        pub misses: u64,
        /// Frees in task context.
        pub frees_task: u64,
        /// Frees in signal context.
        pub frees_signal: u64,
        /// Frees with no usable CPU (to jemalloc).
        pub frees_other: u64,
        /// Task-context frees past the cap (to jemalloc).
        pub overflows: u64,
        /// Signal-context frees past the cap (deferred).
        pub deferred: u64,
        /// Operations that found no usable CPU.
        pub no_cpu: u64,
    }

    impl CStats {
        fn now() -> CStats {
            let s = GLOBAL.stats();
            let t = s.totals;
            CStats {
                rseq: c_int::from(s.path == crate::Path::Rseq),
                counting: c_int::from(s.counting),
                cpus: s.cpus,
                cached_blocks: s.cached_blocks,
                cached_bytes: s.cached_bytes,
                deferred_blocks: s.deferred_blocks,
                hits: t.hits,
                splices: t.splices,
                misses: t.misses,
                frees_task: t.frees_task,
                frees_signal: t.frees_signal,
                frees_other: t.frees_other,
                overflows: t.overflows,
                deferred: t.deferred,
                no_cpu: s.no_cpu,
            }
        }
    }

    /// Copies the first `size` bytes (at most the whole struct) of the
    /// statistics into `out` and returns the struct's size, so a caller
    /// passes `sizeof *out` and can tell how much this library knows.
    /// With a null `out` it only returns the size. Does not allocate.
    ///
    /// # Safety
    /// `out` is null or valid for writes of `size` bytes.
    #[no_mangle]
    pub unsafe extern "C" fn percpu_alloc_stats(out: *mut CStats, size: usize) -> usize {
        let whole = core::mem::size_of::<CStats>();
        if !out.is_null() {
            let s = CStats::now();
            // SAFETY: `s` is a whole `CStats`, and the caller gives `size`
            // writable bytes at `out`; at most the smaller is copied, and a
            // local cannot overlap the caller's memory.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    (&s as *const CStats).cast::<u8>(),
                    out.cast::<u8>(),
                    size.min(whole),
                )
            };
        }
        whole
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn stats_fill_what_the_caller_has_room_for_and_say_how_much_there_is() {
            let whole = core::mem::size_of::<CStats>();
            // SAFETY: a null `out` is only asked the size.
            assert_eq!(
                unsafe { percpu_alloc_stats(core::ptr::null_mut(), 0) },
                whole
            );
            let mut s = CStats {
                cpus: usize::MAX,
                ..CStats::default()
            };
            // SAFETY: `s` holds `whole` bytes; only its first two fields
            // (8 bytes) are asked for.
            assert_eq!(unsafe { percpu_alloc_stats(&mut s, 8) }, whole);
            assert_eq!(s.rseq, percpu_alloc_rseq());
            assert_eq!(s.counting, c_int::from(cfg!(feature = "stats")));
            assert_eq!(s.cpus, usize::MAX, "a field past `size` was written");
            // SAFETY: as above, the whole struct.
            unsafe { percpu_alloc_stats(&mut s, whole) };
            assert!(s.cpus >= 1);
            if s.counting == 0 {
                assert_eq!((s.hits, s.misses, s.frees_task), (0, 0, 0));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::hint::black_box;

    fn errno() -> c_int {
        // SAFETY: glibc's per-thread errno location is always valid.
        unsafe { *libc::__errno_location() }
    }

    // The functions over an instance of the tests' own, so none of this
    // needs the exported symbols.

    #[test]
    fn malloc_free_and_usable_size() {
        let a = PerCpuAlloc::new();
        // SAFETY: blocks of `a`, each freed once.
        unsafe {
            let (p, q) = (malloc(&a, 0), malloc(&a, 0));
            assert!(!p.is_null() && !q.is_null() && p != q);
            free(&a, p);
            free(&a, q);
            for size in [1, 8, 16, 17, 100, 1024, 1025, 5000, 1 << 20] {
                let p = malloc(&a, size);
                assert!(!p.is_null());
                if size >= 16 {
                    assert_eq!(p as usize % 16, 0, "malloc({size})");
                }
                let usable = malloc_usable_size(&a, p);
                assert!(usable >= size);
                p.cast::<u8>().write_bytes(0xA5, usable);
                free(&a, p);
            }
            free(&a, ptr::null_mut());
            assert_eq!(malloc_usable_size(&a, ptr::null_mut()), 0);
            assert!(malloc(&a, black_box(usize::MAX)).is_null());
            assert_eq!(errno(), libc::ENOMEM);
            // A size that makes a layout but that jemalloc refuses: its
            // `errno` is the one `malloc` leaves.
            *libc::__errno_location() = 0;
            assert!(malloc(&a, black_box(1 << 62)).is_null());
            assert_eq!(errno(), libc::ENOMEM);
        }
    }

    #[test]
    fn calloc_zeroes_and_refuses_overflow() {
        let a = PerCpuAlloc::new();
        // SAFETY: blocks of `a`, each freed once.
        unsafe {
            let dirty = malloc(&a, 200);
            dirty.cast::<u8>().write_bytes(0xFF, 200);
            free(&a, dirty);
            let p = calloc(&a, 10, 20).cast::<u8>();
            assert!((0..200).all(|i| *p.add(i) == 0));
            free(&a, p.cast());
            assert!(calloc(&a, black_box(usize::MAX / 2), 3).is_null());
            assert_eq!(errno(), libc::ENOMEM);
            *libc::__errno_location() = 0;
            assert!(calloc(&a, black_box(1 << 31), 1 << 31).is_null());
            assert_eq!(errno(), libc::ENOMEM);
        }
    }

    #[test]
    fn realloc_as_glibc() {
        let a = PerCpuAlloc::new();
        // SAFETY: blocks of `a`, each freed once.
        unsafe {
            let mut p = realloc(&a, ptr::null_mut(), 24).cast::<u8>();
            for i in 0..24 {
                *p.add(i) = i as u8;
            }
            for size in [40, 1000, 3000, 100_000, 500, 30] {
                p = realloc(&a, p.cast(), size).cast();
                assert!((0..24).all(|i| *p.add(i) == i as u8), "kept across {size}");
            }
            assert!(realloc(&a, p.cast(), black_box(usize::MAX / 2)).is_null());
            assert_eq!(errno(), libc::ENOMEM);
            assert_eq!(*p, 0, "a failed realloc leaves the block");
            assert!(reallocarray(&a, p.cast(), black_box(usize::MAX / 4), 8).is_null());
            assert!(realloc(&a, p.cast(), 0).is_null(), "realloc(p, 0) frees");
        }
    }

    #[test]
    fn aligned_functions() {
        let a = PerCpuAlloc::new();
        // SAFETY: blocks of `a`, each freed once; `out` is writable.
        unsafe {
            let mut out = ptr::null_mut();
            for bad in [0, 3, 4, 24] {
                assert_eq!(posix_memalign(&a, &mut out, bad, 8), libc::EINVAL);
            }
            for align in [8, 16, 64, 4096, 1 << 16] {
                assert_eq!(posix_memalign(&a, &mut out, align, 100), 0);
                assert_eq!(out as usize % align, 0);
                free(&a, out);
                let p = aligned_alloc(&a, align, 3 * align);
                assert_eq!(p as usize % align, 0);
                free_aligned_sized(&a, p, align, 3 * align);
            }
            assert!(aligned_alloc(&a, 3, 9).is_null());
            assert_eq!(errno(), libc::EINVAL);
            let m = memalign(&a, 24, 10);
            assert_eq!(m as usize % 32, 0, "24 rounds up to 32");
            free(&a, m);
            let m = memalign(&a, 16, 8);
            assert_eq!(m as usize % 16, 0);
            free_sized(&a, m, 8);
            let page = page_size();
            let v = pvalloc(&a, page + 1);
            assert_eq!(v as usize % page, 0);
            assert!(malloc_usable_size(&a, v) >= 2 * page);
            free(&a, v);
        }
    }

    /// A block of a cached class goes back to jemalloc only after its
    /// page's record is cleared (see `size_map`), by an overflow or a
    /// trim alike.
    #[cfg(feature = "override")]
    #[test]
    fn pages_name_no_class_once_their_blocks_are_back() {
        use crate::size_map::class_of_block;
        // A class only this test caches (the others keep the default limit
        // of 1024 bytes), so no other thread records it; a block of it
        // is the only one to start in its page. A cap of 4 makes most of
        // the frees overflows.
        const SIZE: usize = 5120;
        let a =
            PerCpuAlloc::with_config(crate::Config::new().with_max_cached_size(SIZE).with_cap(4));
        let named = |blocks: &[*mut c_void]| {
            blocks
                .iter()
                .filter(|&&p| class_of_block(p.cast()).map(|c| c.size()) == Some(SIZE))
                .count()
        };
        let mut blocks = [ptr::null_mut(); 32];
        // SAFETY: blocks of `a`, each freed once.
        unsafe {
            for p in &mut blocks {
                *p = malloc(&a, SIZE);
                assert!(!p.is_null());
            }
            assert_eq!(named(&blocks), blocks.len(), "every miss records its page");
            for &p in &blocks {
                free(&a, p);
            }
        }
        assert!(
            a.cached_bytes() < blocks.len() * SIZE,
            "some frees overflowed"
        );
        assert_eq!(
            named(&blocks) * SIZE,
            a.cached_bytes(),
            "the cached blocks keep their records, the ones back with jemalloc do not"
        );
        a.trim();
        assert_eq!(
            named(&blocks),
            0,
            "a trim clears the records of what it gives back"
        );
        // SAFETY: a block of `a`, freed once.
        unsafe {
            let large = malloc(&a, 64 << 10);
            assert!(!large.is_null());
            assert_eq!(class_of_block(large.cast()), None, "a large block's page");
            free(&a, large);
        }
    }

    #[test]
    fn a_handlers_free_does_not_ask_jemalloc() {
        let a = PerCpuAlloc::new();
        // SAFETY: blocks of `a`, each freed once.
        unsafe {
            let small = malloc(&a, 64);
            let large = malloc(&a, 64 << 10);
            let _signal = crate::enter_signal_context();
            free(&a, small);
            free(&a, large);
        }
        let report = a.trim();
        // A block of no cached class has nothing to name its class but
        // jemalloc: it waits on a deferred list until a trim hands it
        // back. So does the small one without the page records; with
        // them it takes the signal list, as a sized free in a handler
        // does, and the trim gives it back from there.
        if cfg!(feature = "override") {
            assert_eq!(report.deferred_blocks, 1, "{report:?}");
            assert_eq!(report.blocks, 1, "{report:?}");
        } else {
            assert_eq!(report.deferred_blocks, 2, "{report:?}");
        }
    }
}
