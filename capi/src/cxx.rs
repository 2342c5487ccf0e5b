//! C++'s replaceable `operator new` and `operator delete`, all twenty of
//! them (plain, array, nothrow, sized, aligned), over the library's C
//! functions.
//!
//! libstdc++'s own operators already end in `malloc` and `free`, so a
//! program gets the caches without these. Defining them saves its wrapper
//! a call each way, and lets a sized `delete` (`-fsized-deallocation`,
//! the default from C++14 on) reach `free_sized`, which needs no page
//! lookup: libstdc++'s sized `delete` drops the size and calls `free`.
//!
//! A `new` that gets no memory hands the request to the next definition
//! of the same operator (libstdc++'s, found with `dlsym(RTLD_NEXT)`),
//! which retries through this library's `malloc` and does what the
//! standard asks of a failure: it calls the program's `new_handler` while
//! one is installed, then throws `std::bad_alloc` (or returns null, for
//! the `nothrow` forms). So these functions are `extern "C-unwind"`: that
//! exception passes through them to the caller.

use core::ffi::{c_void, CStr};

use percpu::{c_abi, GLOBAL};

/// The definition of `name` after this library's, for a `new` that got
/// no memory. A C++ program that calls these has libstdc++ loaded, so
/// there is one; without it there is nothing to do but stop.
#[cold]
fn next(name: &CStr) -> *mut c_void {
    // SAFETY: `name` is NUL-terminated; RTLD_NEXT searches the objects
    // loaded after this one.
    let f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    if f.is_null() {
        // SAFETY: abort has no preconditions.
        unsafe { libc::abort() }
    }
    f
}

/// `operator new` and its forms: this library's block, or what the next
/// definition of the same symbol makes of the failure.
macro_rules! new {
    ($(#[$doc:meta] $name:ident($($arg:ident: $ty:ty),*) => $alloc:expr;)*) => {$(
        #[$doc]
        ///
        /// # Safety
        /// As C++'s.
        #[no_mangle]
        pub unsafe extern "C-unwind" fn $name($($arg: $ty),*) -> *mut c_void {
            // SAFETY: a C allocation function of this library.
            let p = unsafe { $alloc };
            if !p.is_null() {
                return p;
            }
            const NAME: &CStr =
                match CStr::from_bytes_with_nul(concat!(stringify!($name), "\0").as_bytes()) {
                    Ok(name) => name,
                    Err(_) => panic!("a symbol's name has no NUL"),
                };
            // SAFETY: the next definition of this operator has this very
            // signature (the symbol's name says it).
            unsafe {
                let f: unsafe extern "C-unwind" fn($($ty),*) -> *mut c_void =
                    core::mem::transmute(next(NAME));
                f($($arg),*)
            }
        }
    )*};
}

/// `operator delete` and its forms.
macro_rules! delete {
    ($(#[$doc:meta] $name:ident($($arg:ident: $ty:ty),*) => $free:expr;)*) => {$(
        #[$doc]
        ///
        /// # Safety
        /// As C++'s: `p` is null or from the matching `new`.
        #[no_mangle]
        pub unsafe extern "C-unwind" fn $name($($arg: $ty),*) {
            // SAFETY: the caller's contract.
            unsafe { $free }
        }
    )*};
}

new! {
    /// `operator new(size_t)`.
    _Znwm(size: usize) => c_abi::malloc(&GLOBAL, size);
    /// `operator new[](size_t)`.
    _Znam(size: usize) => c_abi::malloc(&GLOBAL, size);
    /// `operator new(size_t, const std::nothrow_t&)`.
    _ZnwmRKSt9nothrow_t(size: usize, _nothrow: *const c_void) => c_abi::malloc(&GLOBAL, size);
    /// `operator new[](size_t, const std::nothrow_t&)`.
    _ZnamRKSt9nothrow_t(size: usize, _nothrow: *const c_void) => c_abi::malloc(&GLOBAL, size);
    /// `operator new(size_t, std::align_val_t)`.
    _ZnwmSt11align_val_t(size: usize, align: usize) => c_abi::aligned_alloc(&GLOBAL, align, size);
    /// `operator new[](size_t, std::align_val_t)`.
    _ZnamSt11align_val_t(size: usize, align: usize) => c_abi::aligned_alloc(&GLOBAL, align, size);
    /// `operator new(size_t, std::align_val_t, const std::nothrow_t&)`.
    _ZnwmSt11align_val_tRKSt9nothrow_t(size: usize, align: usize, _nothrow: *const c_void) =>
        c_abi::aligned_alloc(&GLOBAL, align, size);
    /// `operator new[](size_t, std::align_val_t, const std::nothrow_t&)`.
    _ZnamSt11align_val_tRKSt9nothrow_t(size: usize, align: usize, _nothrow: *const c_void) =>
        c_abi::aligned_alloc(&GLOBAL, align, size);
}

delete! {
    /// `operator delete(void*)`.
    _ZdlPv(p: *mut c_void) => c_abi::free(&GLOBAL, p);
    /// `operator delete[](void*)`.
    _ZdaPv(p: *mut c_void) => c_abi::free(&GLOBAL, p);
    /// `operator delete(void*, const std::nothrow_t&)`.
    _ZdlPvRKSt9nothrow_t(p: *mut c_void, _nothrow: *const c_void) => c_abi::free(&GLOBAL, p);
    /// `operator delete[](void*, const std::nothrow_t&)`.
    _ZdaPvRKSt9nothrow_t(p: *mut c_void, _nothrow: *const c_void) => c_abi::free(&GLOBAL, p);
    /// `operator delete(void*, size_t)`: the size `new` was given.
    _ZdlPvm(p: *mut c_void, size: usize) => c_abi::free_sized(&GLOBAL, p, size);
    /// `operator delete[](void*, size_t)`.
    _ZdaPvm(p: *mut c_void, size: usize) => c_abi::free_sized(&GLOBAL, p, size);
    /// `operator delete(void*, std::align_val_t)`.
    _ZdlPvSt11align_val_t(p: *mut c_void, _align: usize) => c_abi::free(&GLOBAL, p);
    /// `operator delete[](void*, std::align_val_t)`.
    _ZdaPvSt11align_val_t(p: *mut c_void, _align: usize) => c_abi::free(&GLOBAL, p);
    /// `operator delete(void*, std::align_val_t, const std::nothrow_t&)`.
    _ZdlPvSt11align_val_tRKSt9nothrow_t(p: *mut c_void, _align: usize, _nothrow: *const c_void) =>
        c_abi::free(&GLOBAL, p);
    /// `operator delete[](void*, std::align_val_t, const std::nothrow_t&)`.
    _ZdaPvSt11align_val_tRKSt9nothrow_t(p: *mut c_void, _align: usize, _nothrow: *const c_void) =>
        c_abi::free(&GLOBAL, p);
    /// `operator delete(void*, size_t, std::align_val_t)`.
    _ZdlPvmSt11align_val_t(p: *mut c_void, size: usize, align: usize) =>
        c_abi::free_aligned_sized(&GLOBAL, p, align, size);
    /// `operator delete[](void*, size_t, std::align_val_t)`.
    _ZdaPvmSt11align_val_t(p: *mut c_void, size: usize, align: usize) =>
        c_abi::free_aligned_sized(&GLOBAL, p, align, size);
}
