//! The `override` feature: this test binary's C `malloc` family is the
//! library's, served by `percpu_alloc::GLOBAL`, and Rust's default
//! allocator (`System`, which calls that `malloc`) ends there too.
//!
//! ```text
//! cargo test --release --features override --test override
//! ```
#![cfg(feature = "override")]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};

use percpu_alloc::GLOBAL;

// The tests pin themselves and use sizes (896 and 768 bytes) that the test
// harness, which allocates through the same caches, does not: a block
// freed here is the next one of its class handed out on this CPU.

#[test]
fn c_malloc_and_free_go_through_the_caches() {
    common::pin(common::cores()[0]);
    // (No trim here: it would race with the other tests' pops.)
    // SAFETY: plain C allocation calls on blocks this test owns.
    unsafe {
        let p = libc::malloc(896);
        assert!(!p.is_null());
        assert!(libc::malloc_usable_size(p) >= 896);
        libc::free(p);
        assert!(GLOBAL.cached_bytes() >= 896, "free cached the block");
        let q = libc::malloc(896);
        assert_eq!(q, p, "and malloc hands it out again");
        libc::free(q);
    }
}

#[test]
fn rusts_system_allocator_reaches_them_too() {
    common::pin(common::cores()[0]);
    let layout = Layout::from_size_align(768, 8).unwrap();
    // SAFETY: a valid layout; the block is freed with it.
    unsafe {
        let p = System.alloc(layout);
        assert!(!p.is_null());
        System.dealloc(p, layout);
        let q = System.alloc(layout);
        assert_eq!(q, p, "System's free and malloc went through the cache");
        System.dealloc(q, layout);
    }
}

#[test]
fn c_semantics_on_failure() {
    // black_box: the compiler knows `malloc` and would otherwise drop an
    // unused call and take its result as non-null.
    use std::hint::black_box;
    // SAFETY: calls that must fail cleanly, and frees of what succeeds.
    unsafe {
        *libc::__errno_location() = 0;
        assert!(black_box(libc::malloc(black_box(usize::MAX))).is_null());
        assert_eq!(*libc::__errno_location(), libc::ENOMEM);
        assert!(black_box(libc::calloc(black_box(usize::MAX / 2), 3)).is_null());
        let mut out = std::ptr::null_mut();
        assert_eq!(libc::posix_memalign(&mut out, 3, 8), libc::EINVAL);
        assert_eq!(libc::posix_memalign(&mut out, 64, 8), 0);
        assert_eq!(out as usize % 64, 0);
        libc::free(out);
        let p = libc::realloc(std::ptr::null_mut(), 10);
        assert!(!p.is_null());
        assert!(
            black_box(libc::realloc(p, black_box(0))).is_null(),
            "realloc(p, 0) frees, as glibc"
        );
    }
}
