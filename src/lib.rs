//! A per-CPU object cache in front of jemalloc, as a Rust global allocator.
//!
//! [`PerCpuAlloc`] keeps, per CPU and per size class, a *task list* of
//! blocks freed by ordinary thread code and a *signal list* of blocks freed
//! inside signal handlers, with the rules of a Linux kernel per-CPU cache:
//! an alloc pops the task list; when that is empty and the signal list
//! holds at least the *splice threshold* (16), the whole signal list
//! becomes the task list in O(1); a free past the *cap* (256 blocks of a
//! class on a CPU) goes back to jemalloc. Misses, overflows and large
//! requests go to jemalloc.
//!
//! Each CPU's task lists are its own by Linux restartable sequences (rseq)
//! where glibc registered them, by a try-lock elsewhere ([`Path`]).
//!
//! ```
//! use percpu_alloc::PerCpuAlloc;
//!
//! # #[cfg(not(feature = "global"))] // the feature installs one already
//! #[global_allocator]
//! static ALLOC: PerCpuAlloc = PerCpuAlloc::new();
//!
//! fn main() {
//!     let words: Vec<String> = (0..100).map(|i| i.to_string()).collect();
//!     assert_eq!(words.len(), 100);
//! }
//! ```
//!
//! With the cargo feature `global`, this crate installs a default
//! `PerCpuAlloc` as the global allocator itself (`percpu_alloc::GLOBAL`).
//!
//! Signal handlers that free memory mark their scope with
//! [`enter_signal_context`] or are installed with
//! [`install_signal_handler`]; their frees then never call into jemalloc.
//!
//! Layout of the crate: `rules` (the rules engine), `percpu` (the per-CPU
//! exclusion it runs on) with its two implementations `rseq` and
//! `fallback`, `table` (the per-CPU records and their layout), `list`
//! (lists in one word), `size_class`, `context` (task, signal, other),
//! `backend` (jemalloc), `drain` (trim and teardown), `counters` (the
//! `stats` feature's event counts), `stats` (summaries), `env`
//! (configuration from the environment), `hardened`, `stderr`.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]
// Under `--cfg loom` (see `list::loom_tests`) only the lock-free
// lists are built, on loom's atomics. The rest of the crate keeps tables in
// zeroed mmap'd memory and atomics in statics, which loom's atomics (no
// `const fn new`, not valid when zeroed, larger) cannot be.
#![cfg_attr(loom, allow(dead_code, unused_imports))]

#[cfg(not(loom))]
mod allocator;
#[cfg(not(loom))]
mod backend;
#[cfg(not(loom))]
pub mod c_abi;
#[cfg(not(loom))]
mod config;
#[cfg(not(loom))]
mod context;
#[cfg(not(loom))]
mod counters;
#[cfg(not(loom))]
mod drain;
#[cfg(not(loom))]
mod env;
#[cfg(not(loom))]
mod fallback;
mod hardened;
mod list;
#[cfg(not(loom))]
mod percpu;
#[cfg(not(loom))]
mod rseq;
#[cfg(not(loom))]
mod rules;
#[cfg(not(loom))]
mod size_class;
#[cfg(not(loom))]
mod size_map;
#[cfg(not(loom))]
mod stats;
mod stderr;
#[cfg(not(loom))]
mod table;

#[cfg(not(loom))]
pub use allocator::PerCpuAlloc;
#[cfg(not(loom))]
pub use config::Config;
#[cfg(not(loom))]
pub use context::{
    current_context, enter_signal_context, install_signal_handler, Context, SignalGuard,
    SignalHandler,
};
#[cfg(not(loom))]
pub use percpu::Path;
#[cfg(not(loom))]
pub use size_class::{CLASS_SIZES, MAX_CACHEABLE_SIZE, NUM_CLASSES};
#[cfg(not(loom))]
pub use stats::{ClassStats, Counters, CpuStats, ListCounts, Snapshot, Stats, TrimReport};

/// The global allocator installed by the `global` feature: a default
/// [`PerCpuAlloc`]. Use it to read stats or trim:
/// `percpu_alloc::GLOBAL.trim()`. With the `override` feature it also
/// serves C's `malloc`, `free` and the rest (see [`c_abi`]), so a program
/// with both has one cache for its Rust and C allocations; with
/// `override` alone, Rust's default allocator (`System`) calls that
/// `malloc`, which ends in the same place.
///
/// ```
/// // Every allocation of this program goes through `GLOBAL`.
/// let words: Vec<String> = (0..100).map(|i| i.to_string()).collect();
/// assert_eq!(words.len(), 100);
/// let global = &percpu_alloc::GLOBAL;
/// assert!(global.cpus() >= 1);
/// assert!(global.cached_bytes() <= global.cpu_bound_bytes() * global.cpus());
/// global.trim_current_cpu();
/// ```
#[cfg(all(any(feature = "global", feature = "override"), not(loom)))]
#[cfg_attr(feature = "global", global_allocator)]
pub static GLOBAL: PerCpuAlloc = PerCpuAlloc::new();
