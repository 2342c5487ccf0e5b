//! `libpercpu_alloc.so`: percpu-alloc's caches in front of jemalloc as the
//! C `malloc` of any dynamically linked program.
//!
//! ```text
//! cargo build --profile capi -p percpu-alloc-capi
//! LD_PRELOAD=target/capi/libpercpu_alloc.so some-program
//! ```
//!
//! The C symbols come from the library's `override` feature
//! (`percpu_alloc::c_abi`): `malloc`, `free`, `calloc`, `realloc`,
//! `reallocarray`, `posix_memalign`, `aligned_alloc`, `memalign`,
//! `valloc`, `pvalloc`, `malloc_usable_size`, `free_sized`,
//! `free_aligned_sized`, and the calls declared in
//! `include/percpu_alloc.h`. This crate adds C++'s `operator new` and
//! `operator delete` (module `cxx`), as jemalloc's, mimalloc's and
//! tcmalloc's preloadable libraries do.

// Linked for its exported symbols; nothing here names them.
use percpu as _;

pub mod cxx;
