//! `PerCpuAlloc`: the `GlobalAlloc` that puts the per-CPU caches in front of
//! jemalloc.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr;
use core::sync::atomic::{AtomicPtr, Ordering};

use crate::backend;
use crate::config::Config;
use crate::context::{current_context, Context};
use crate::cpu_cache::Table;
use crate::drain;
use crate::env;
use crate::fallback;
use crate::free_list::fits;
use crate::hardened;
use crate::rseq::{self, Done};
use crate::rules::{self, Alloc, Free};
use crate::size_class::{class_of, class_size, Class};
use crate::stats::{self, Counters, Event, ListCounts, Path, Snapshot, Stats, TrimReport};

/// A global allocator with per-CPU, per-size-class caches in front of
/// jemalloc.
///
/// ```
/// use percpu_alloc::PerCpuAlloc;
///
/// # #[cfg(not(feature = "global"))] // the feature installs one already
/// #[global_allocator]
/// static ALLOC: PerCpuAlloc = PerCpuAlloc::new();
///
/// let v: Vec<u64> = (0..1000).collect();
/// assert_eq!(v.iter().sum::<u64>(), 499_500);
/// ```
///
/// Requests up to the largest cached size whose alignment a size class
/// guarantees are served from the current CPU's cache; everything else
/// (misses, overflows, large and over-aligned requests) goes to jemalloc.
/// The per-CPU table is mapped on first use; until then, and wherever
/// mapping it fails, requests go straight to jemalloc.
///
/// Other instances than the global one work too: each has its own caches,
/// and memory must be freed through the instance that allocated it.
/// Dropping an instance gives its cached blocks back to jemalloc.
pub struct PerCpuAlloc {
    config: Config,
    table: AtomicPtr<Table>,
}

impl PerCpuAlloc {
    /// An allocator with the default [`Config`]: splice threshold 16, cap
    /// 256, sizes up to 1 KiB cached within 1.5 MiB per CPU, rseq where
    /// available.
    ///
    /// ```
    /// use percpu_alloc::{Config, PerCpuAlloc};
    ///
    /// static ALLOC: PerCpuAlloc = PerCpuAlloc::new();
    /// assert_eq!(*ALLOC.config(), Config::new());
    /// ```
    pub const fn new() -> Self {
        Self::with_config(Config::new())
    }

    /// An allocator with `config`.
    ///
    /// ```
    /// use percpu_alloc::{Config, PerCpuAlloc};
    ///
    /// // Always use the try-lock fallback, even where rseq works.
    /// static FALLBACK: PerCpuAlloc = PerCpuAlloc::with_config(Config::new().force_fallback(true));
    /// # assert_eq!(FALLBACK.path(), percpu_alloc::Path::Fallback);
    /// ```
    pub const fn with_config(config: Config) -> Self {
        PerCpuAlloc {
            config,
            table: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// The configuration this allocator was made with.
    ///
    /// ```
    /// use percpu_alloc::{Config, PerCpuAlloc};
    ///
    /// let alloc = PerCpuAlloc::with_config(Config::new().cap(64));
    /// assert_eq!(alloc.config().base_cap(), 64);
    /// // The environment's overrides show in `active_config`, never here.
    /// assert!(alloc.config().reads_env());
    /// ```
    pub const fn config(&self) -> &Config {
        &self.config
    }

    /// The configuration in force: [`config`](Self::config) with the
    /// environment's overrides applied (see [`Config::read_env`]), as
    /// resolved when the caches were made (this call makes them).
    ///
    /// ```
    /// use percpu_alloc::{Config, PerCpuAlloc};
    ///
    /// let alloc = PerCpuAlloc::with_config(Config::new().cap(64).read_env(false));
    /// assert_eq!(alloc.active_config().base_cap(), 64);
    /// ```
    pub fn active_config(&self) -> Config {
        match self.table() {
            Some(table) => table.header().config,
            None => self.config,
        }
    }

    /// Which per-CPU path is live. Decided once, on first use (this call
    /// counts): rseq if glibc registered it for the calling thread and the
    /// fallback is not forced, else the fallback.
    ///
    /// ```
    /// let alloc = percpu_alloc::PerCpuAlloc::new();
    /// println!("per-CPU path: {}", alloc.path());
    /// ```
    pub fn path(&self) -> Path {
        match self.table() {
            Some(table) => table.header().path,
            None => Path::Fallback,
        }
    }

    /// How many CPUs the caches cover (`nr_cpu_ids`), 0 if the table could
    /// not be made.
    ///
    /// ```
    /// let alloc = percpu_alloc::PerCpuAlloc::new();
    /// let cpus = alloc.cpus();
    /// assert!(cpus >= 1);
    /// // CPU numbers run from 0 to `cpus - 1`.
    /// assert!(alloc.counts(cpus - 1, 0).is_some());
    /// assert!(alloc.counts(cpus, 0).is_none());
    /// ```
    pub fn cpus(&self) -> usize {
        self.table().map_or(0, |t| t.header().ncpu as usize)
    }

    /// The lengths of `cpu`'s lists for class index `class`, or `None` if
    /// either is out of range. Reads in place; allocates nothing.
    ///
    /// ```
    /// use std::alloc::{GlobalAlloc, Layout};
    /// use percpu_alloc::{PerCpuAlloc, CLASS_SIZES, NUM_CLASSES};
    ///
    /// let alloc = PerCpuAlloc::new();
    /// let layout = Layout::from_size_align(64, 8).unwrap();
    /// // SAFETY: a valid layout; the block is freed with the same one.
    /// unsafe { alloc.dealloc(alloc.alloc(layout), layout) };
    /// let class = CLASS_SIZES.iter().position(|&s| s == 64).unwrap();
    /// let cached: u32 = (0..alloc.cpus())
    ///     .map(|cpu| alloc.counts(cpu, class).unwrap())
    ///     .map(|lists| lists.nr + lists.nr_sig)
    ///     .sum();
    /// assert!(cached <= 1); // on whichever CPU the free ran, if it was kept
    /// assert!(alloc.counts(0, NUM_CLASSES).is_none());
    /// ```
    pub fn counts(&self, cpu: usize, class: usize) -> Option<ListCounts> {
        let table = self.table()?;
        if cpu >= table.header().ncpu as usize || class >= crate::NUM_CLASSES {
            return None;
        }
        Some(stats::counts(table, cpu, class))
    }

    /// Every non-empty list of every CPU, read as the iterator goes.
    /// Allocates nothing, so it can run with this allocator installed.
    ///
    /// ```
    /// use std::alloc::{GlobalAlloc, Layout};
    /// use percpu_alloc::PerCpuAlloc;
    ///
    /// let alloc = PerCpuAlloc::new();
    /// let layout = Layout::from_size_align(64, 8).unwrap();
    /// // SAFETY: a valid layout; the block is freed with the same one.
    /// unsafe { alloc.dealloc(alloc.alloc(layout), layout) };
    /// let cached: u32 = alloc.snapshot().map(|c| c.nr + c.nr_sig).sum();
    /// assert!(cached <= 1);
    /// ```
    pub fn snapshot(&self) -> Snapshot<'_> {
        Snapshot::new(self.table_if_made())
    }

    /// Bytes cached now over all CPUs (a moment's reading).
    ///
    /// ```
    /// use std::alloc::{GlobalAlloc, Layout};
    ///
    /// let alloc = percpu_alloc::PerCpuAlloc::new();
    /// assert_eq!(alloc.cached_bytes(), 0);
    /// let layout = Layout::from_size_align(100, 8).unwrap();
    /// // SAFETY: a valid layout; the block is freed with the same one.
    /// unsafe { alloc.dealloc(alloc.alloc(layout), layout) };
    /// // Kept as a block of the 112-byte class, or given back to jemalloc.
    /// assert!(matches!(alloc.cached_bytes(), 0 | 112));
    /// ```
    pub fn cached_bytes(&self) -> usize {
        self.snapshot().map(|c| c.bytes()).sum()
    }

    /// The most bytes one CPU can cache: the sum over classes of cap x
    /// class size, from the [configuration in force](Self::active_config).
    /// Multiply by [`cpus`](Self::cpus) for the process.
    ///
    /// ```
    /// let alloc = percpu_alloc::PerCpuAlloc::new();
    /// assert!(alloc.cpu_bound_bytes() <= 1536 * 1024);
    /// assert!(alloc.cached_bytes() <= alloc.cpu_bound_bytes() * alloc.cpus());
    /// ```
    pub fn cpu_bound_bytes(&self) -> usize {
        self.active_config().cpu_bound_bytes()
    }

    /// The event counters of `cpu` for class index `class` (all zero
    /// without the `stats` feature), or `None` if either is out of range.
    ///
    /// ```
    /// use std::alloc::{GlobalAlloc, Layout};
    /// use percpu_alloc::{PerCpuAlloc, CLASS_SIZES};
    ///
    /// let alloc = PerCpuAlloc::new();
    /// let layout = Layout::from_size_align(64, 8).unwrap();
    /// // SAFETY: a valid layout; the block is freed with the same one.
    /// unsafe { alloc.dealloc(alloc.alloc(layout), layout) };
    /// let class = CLASS_SIZES.iter().position(|&s| s == 64).unwrap();
    /// let ops: u64 = (0..alloc.cpus())
    ///     .map(|cpu| alloc.counters(cpu, class).unwrap())
    ///     .map(|c| c.allocs() + c.frees())
    ///     .sum();
    /// if cfg!(feature = "stats") {
    ///     // One alloc and one free, each counted on a CPU or as "no CPU".
    ///     assert_eq!(ops + alloc.stats().no_cpu, 2);
    /// } else {
    ///     assert_eq!(ops, 0);
    /// }
    /// assert!(alloc.counters(alloc.cpus(), class).is_none());
    /// ```
    pub fn counters(&self, cpu: usize, class: usize) -> Option<Counters> {
        let table = self.table()?;
        if cpu >= table.header().ncpu as usize || class >= crate::NUM_CLASSES {
            return None;
        }
        Some(stats::counters(table, cpu, class))
    }

    /// A summary of the caches: event totals (with the `stats` feature),
    /// every class, the busiest CPUs, and what is cached now. Allocates
    /// nothing; its `Display` is a table.
    ///
    /// ```
    /// use std::alloc::{GlobalAlloc, Layout};
    ///
    /// let alloc = percpu_alloc::PerCpuAlloc::new();
    /// let layout = Layout::from_size_align(64, 8).unwrap();
    /// // SAFETY: a valid layout; each block is freed with the same one.
    /// unsafe {
    ///     for _ in 0..3 {
    ///         alloc.dealloc(alloc.alloc(layout), layout);
    ///     }
    /// }
    /// let stats = alloc.stats();
    /// if stats.counting {
    ///     // One miss, then two hits (or misses where the cache was busy).
    ///     assert_eq!(stats.totals.allocs() + stats.no_cpu, 3);
    /// }
    /// eprintln!("{stats}");
    /// ```
    pub fn stats(&self) -> Stats {
        match self.table() {
            Some(table) => Stats::collect(table),
            None => Stats::empty(Path::Fallback),
        }
    }

    /// Gives every cached block of every CPU back to jemalloc, including
    /// CPUs this process no longer runs on, and the blocks deferred by
    /// signal handlers. Safe while other threads allocate: their operations
    /// meanwhile may miss or overflow, never lose a block.
    ///
    /// On the rseq path a CPU's task lists are reached with
    /// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ)` (Linux 5.10+);
    /// where that is refused they are left, and counted in
    /// [`TrimReport::cpus_skipped`].
    ///
    /// ```
    /// let alloc = percpu_alloc::PerCpuAlloc::new();
    /// let report = alloc.trim();
    /// assert_eq!(report.cpus_skipped, 0);
    /// ```
    pub fn trim(&self) -> TrimReport {
        match self.table_if_made() {
            Some(table) => drain::trim(table),
            None => TrimReport::default(),
        }
    }

    /// Gives the calling thread's current CPU's cached blocks back to
    /// jemalloc: the cheap trim, for a thread about to go idle. Safe while
    /// other threads allocate, like [`trim`](Self::trim). The thread may
    /// move meanwhile; the CPU it was on when it asked is the one trimmed.
    ///
    /// ```
    /// use std::alloc::{GlobalAlloc, Layout};
    ///
    /// let alloc = percpu_alloc::PerCpuAlloc::new();
    /// let layout = Layout::from_size_align(32, 8).unwrap();
    /// // SAFETY: a valid layout; the block is freed with the same one.
    /// unsafe { alloc.dealloc(alloc.alloc(layout), layout) };
    /// let report = alloc.trim_current_cpu();
    /// assert!(report.blocks <= 1);
    /// ```
    pub fn trim_current_cpu(&self) -> TrimReport {
        let mut report = TrimReport::default();
        if let Some(table) = self.table_if_made() {
            if let Some(cpu) = current_cpu(table) {
                drain::trim_cpu(table, cpu, &mut report);
            }
        }
        report
    }

    /// Allocates from the cache only: a block of the current CPU's task
    /// list (or its signal list, spliced), or null. Never calls jemalloc,
    /// never blocks, so a signal handler may call it; on the fallback path
    /// it returns null whenever the CPU's slot is busy.
    ///
    /// The block is freed as usual, with `dealloc` and the same layout.
    ///
    /// ```
    /// use std::alloc::{GlobalAlloc, Layout};
    ///
    /// let alloc = percpu_alloc::PerCpuAlloc::new();
    /// let layout = Layout::from_size_align(48, 16).unwrap();
    /// // SAFETY: a valid layout. Nothing is cached yet, so nothing comes back.
    /// assert!(unsafe { alloc.alloc_cached(layout) }.is_null());
    /// // SAFETY: a valid layout; the block is freed with the same one.
    /// unsafe { alloc.dealloc(alloc.alloc(layout), layout) };
    /// // SAFETY: a valid layout.
    /// let block = unsafe { alloc.alloc_cached(layout) };
    /// // The freed block, if this thread is still on its CPU and the cache
    /// // kept it; null otherwise.
    /// if !block.is_null() {
    ///     assert_eq!(block as usize % 16, 0);
    ///     // SAFETY: allocated by `alloc` with `layout`, not used after.
    ///     unsafe { alloc.dealloc(block, layout) };
    /// }
    /// ```
    ///
    /// # Safety
    /// As [`GlobalAlloc::alloc`].
    pub unsafe fn alloc_cached(&self, layout: Layout) -> *mut u8 {
        let table = match self.table_if_made() {
            Some(t) => t,
            None => return ptr::null_mut(),
        };
        match class_of(layout.size(), layout.align(), table.header().max_size) {
            Some(class) => take(table, class),
            None => ptr::null_mut(),
        }
    }

    /// The table, made on first use; `None` if it cannot be made.
    #[inline]
    fn table(&self) -> Option<&Table> {
        let table = self.table.load(Ordering::Acquire);
        if !table.is_null() {
            // SAFETY: a published table lives as long as `self`.
            return Some(unsafe { &*table });
        }
        self.make_table()
    }

    /// The table if it has been made; never makes it.
    #[inline]
    fn table_if_made(&self) -> Option<&Table> {
        let table = self.table.load(Ordering::Acquire);
        // SAFETY: a published table lives as long as `self`.
        (!table.is_null()).then(|| unsafe { &*table })
    }

    #[cold]
    #[inline(never)]
    fn make_table(&self) -> Option<&Table> {
        let (config, print_stats) = if self.config.reads_env() {
            let overrides = env::overrides();
            (overrides.apply(self.config), overrides.print_stats)
        } else {
            (self.config, false)
        };
        let (path, offset) = match (config.fallback_forced(), rseq::registered()) {
            (false, Some(offset)) => (Path::Rseq, offset),
            _ => (Path::Fallback, 0),
        };
        let new = Table::create(&config, path, offset);
        if new.is_null() {
            return None;
        }
        match self
            .table
            .compare_exchange(ptr::null_mut(), new, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                Table::register(new);
                if path == Path::Fallback {
                    fallback::watch_forks();
                }
                if print_stats {
                    stats::print_at_exit();
                }
                // SAFETY: just published; lives as long as `self`.
                Some(unsafe { &*new })
            }
            Err(theirs) => {
                // SAFETY: ours was never published.
                unsafe { Table::destroy(new) };
                // SAFETY: a published table lives as long as `self`.
                Some(unsafe { &*theirs })
            }
        }
    }

    #[inline(always)]
    unsafe fn alloc_impl(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        if let Some(table) = self.table() {
            let header = table.header();
            if let Some(class) = class_of(layout.size(), layout.align(), header.max_size) {
                let block = match header.path {
                    Path::Rseq => {
                        // SAFETY: the table is live and on the rseq path.
                        let (block, cpu) = unsafe {
                            rseq::pop(header.rseq_offset, table.class_base(class), header.ncpu)
                        };
                        if block.is_null() {
                            return alloc_slow_rseq(table, class, cpu, zeroed);
                        }
                        stats::count(table, Some(cpu as usize), class, Event::Hit);
                        hardened::on_alloc(block, class_size(class));
                        block
                    }
                    Path::Fallback => {
                        let (block, cpu) = take_locked(table, class);
                        if block.is_null() {
                            return miss(table, class, cpu, zeroed);
                        }
                        block
                    }
                };
                if zeroed {
                    // SAFETY: a cached block of this class holds at least
                    // `layout.size()` bytes.
                    unsafe { ptr::write_bytes(block, 0, layout.size()) };
                }
                return block;
            }
        }
        backend::alloc(layout.size().max(1), layout.align(), zeroed)
    }
}

impl Default for PerCpuAlloc {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PerCpuAlloc {
    fn drop(&mut self) {
        let table = *self.table.get_mut();
        if !table.is_null() {
            Table::unregister(table);
            // SAFETY: `&mut self`: no call into this allocator is running,
            // and none can start, so the table is ours to empty and unmap.
            unsafe {
                drain::teardown(&*table);
                Table::destroy(table);
            }
        }
    }
}

/// Takes a cached block of `class` on the current CPU: a hit, or a splice;
/// null on a miss. Never calls jemalloc (`alloc_cached`).
#[inline]
fn take(table: &Table, class: Class) -> *mut u8 {
    let header = table.header();
    match header.path {
        Path::Rseq => {
            // SAFETY: the table is live and on the rseq path.
            let (block, cpu) =
                unsafe { rseq::pop(header.rseq_offset, table.class_base(class), header.ncpu) };
            match cpu {
                u32::MAX => return block,
                rseq::CORRUPT => hardened::corrupted(ptr::null_mut()),
                _ => {}
            }
            if !block.is_null() {
                stats::count(table, Some(cpu as usize), class, Event::Hit);
                hardened::on_alloc(block, class_size(class));
                return block;
            }
            splice_if_due(table, class, cpu as usize)
        }
        Path::Fallback => take_locked(table, class).0,
    }
}

/// The rseq path found the task list empty (or had no CPU). In a program
/// that holds far more blocks than the cap every alloc comes here, so the
/// usual case (a CPU, no splice due, nothing deferred) is two loads and a
/// jump to jemalloc, with no registers to save; everything else is
/// [`alloc_rare_rseq`]. Marked cold all the same, so that the hit path is
/// the one laid out straight.
#[cold]
#[inline(never)]
fn alloc_slow_rseq(table: &Table, class: Class, cpu: u32, zeroed: bool) -> *mut u8 {
    let header = table.header();
    // No real CPU reaches `ncpu`; `u32::MAX` and `CORRUPT` are above it.
    if cpu < header.ncpu {
        let cache = table.cpu(cpu as usize);
        let splice_due = cache
            .lists
            .get(class)
            .map_or(true, |l| l.sig.len() >= header.threshold);
        if !splice_due && cache.deferred.word() == 0 {
            stats::count(table, Some(cpu as usize), class, Event::Miss);
            return fresh(class, zeroed);
        }
    }
    alloc_rare_rseq(table, class, cpu, zeroed)
}

/// [`alloc_slow_rseq`] when there is no CPU, a corrupted link, a splice
/// due, or deferred blocks to hand back first.
#[cold]
#[inline(never)]
fn alloc_rare_rseq(table: &Table, class: Class, cpu: u32, zeroed: bool) -> *mut u8 {
    match cpu {
        u32::MAX => return miss(table, class, None, zeroed),
        rseq::CORRUPT => hardened::corrupted(ptr::null_mut()),
        _ => {}
    }
    let block = splice_if_due(table, class, cpu as usize);
    if block.is_null() {
        return miss(table, class, Some(cpu as usize), zeroed);
    }
    if zeroed {
        // SAFETY: a cached block of this class; zeroing all of it covers
        // any layout it serves.
        unsafe { ptr::write_bytes(block, 0, crate::size_class::class_size(class)) };
    }
    block
}

/// Rule 1 of alloc on the rseq path, after the task list of `cpu` was found
/// empty: splice if the signal list has reached the threshold. The length
/// check is inline; the splice itself, rarely needed, is out of line.
#[inline]
fn splice_if_due(table: &Table, class: Class, cpu: usize) -> *mut u8 {
    let threshold = table.header().threshold;
    let due = table
        .cpu(cpu)
        .lists
        .get(class)
        .is_some_and(|l| l.sig.len() >= threshold);
    if due {
        splice_out_of_line(table, class, cpu)
    } else {
        ptr::null_mut()
    }
}

#[inline(never)]
fn splice_out_of_line(table: &Table, class: Class, cpu: usize) -> *mut u8 {
    match rules::splice_rseq(table, cpu, class) {
        Alloc::Spliced(block) => {
            stats::count(table, Some(cpu), class, Event::Splice);
            hardened::on_alloc(block, class_size(class));
            block
        }
        _ => ptr::null_mut(),
    }
}

/// The fallback path: pop (or splice) under the CPU's slot.
#[inline]
fn take_locked(table: &Table, class: Class) -> (*mut u8, Option<usize>) {
    let cpu = match fallback::current_cpu(table.header().ncpu) {
        Some(cpu) => cpu,
        None => return (ptr::null_mut(), None),
    };
    let (block, event) = match rules::alloc_locked(table, cpu, class) {
        Alloc::Hit(block) => (block, Event::Hit),
        Alloc::Spliced(block) => (block, Event::Splice),
        Alloc::Miss | Alloc::Busy => return (ptr::null_mut(), Some(cpu)),
    };
    stats::count(table, Some(cpu), class, event);
    hardened::on_alloc(block, class_size(class));
    (block, Some(cpu))
}

/// A miss: a fresh block from jemalloc, outside any critical section or
/// slot. Task context also hands back the CPU's deferred blocks first.
#[inline]
fn miss(table: &Table, class: Class, cpu: Option<usize>, zeroed: bool) -> *mut u8 {
    stats::count(table, cpu, class, Event::Miss);
    if let Some(cpu) = cpu {
        if current_context() == Context::Task {
            return_deferred(table, cpu);
        }
    }
    fresh(class, zeroed)
}

/// A block of `class` straight from jemalloc, from its zeroing path if
/// asked.
#[inline(always)]
fn fresh(class: Class, zeroed: bool) -> *mut u8 {
    let block = backend::alloc_class(class, zeroed);
    if !block.is_null() {
        // jemalloc may hand back a block this cache once marked.
        hardened::on_alloc(block, class_size(class));
    }
    block
}

/// Task context, outside any critical section: deferred blocks go home.
#[inline]
fn return_deferred(table: &Table, cpu: usize) {
    if let Some(chain) = rules::take_deferred(table, cpu) {
        for block in chain {
            // SAFETY: deferred blocks are live jemalloc blocks nobody uses.
            unsafe { backend::free_unsized(block) };
        }
    }
}

/// An overflow or an other-context free in task context: to jemalloc.
/// Past the cap every free comes here, so the usual case (nothing deferred)
/// is one load and a jump to jemalloc. Cold for the same reason as
/// [`alloc_slow_rseq`].
#[cold]
#[inline(never)]
unsafe fn overflow(table: &Table, class: Class, block: *mut u8, cpu: Option<usize>) {
    if let Some(cpu) = cpu {
        if table.cpu(cpu).deferred.word() != 0 {
            // SAFETY: our caller's block of `class`.
            return unsafe { overflow_after_deferred(table, class, block, cpu) };
        }
    }
    // SAFETY: our caller's block of `class`.
    unsafe { backend::free_class(block, class) };
}

/// [`overflow`] when `cpu` has deferred blocks: they go home first.
#[cold]
#[inline(never)]
unsafe fn overflow_after_deferred(table: &Table, class: Class, block: *mut u8, cpu: usize) {
    return_deferred(table, cpu);
    // SAFETY: our caller's block of `class`.
    unsafe { backend::free_class(block, class) };
}

/// Frees `block` of `class` into the current CPU's cache.
///
/// # Safety
/// `block` is a block of `class` from this table's allocator, no longer
/// used.
#[inline(always)]
unsafe fn give(table: &Table, class: Class, block: *mut u8) {
    let header = table.header();
    let ctx = current_context();
    if !fits(block) {
        // A list word cannot hold an address above 2^48. jemalloc never
        // hands one out on Linux (see `free_list`); if it ever did, task
        // context returns the block, and signal context, which must not call
        // jemalloc and has no list to put it on, keeps it (a leak, not a
        // corruption).
        if ctx != Context::Signal {
            // SAFETY: our caller's block of `class`.
            unsafe { backend::free_class(block, class) };
        }
        return;
    }
    hardened::on_free(block, class_size(class));
    match (header.path, ctx) {
        (Path::Rseq, Context::Task) => {
            // SAFETY: the table is live and on the rseq path; we own the
            // block and it fits a list word.
            let (done, cpu) = unsafe {
                rseq::push(
                    header.rseq_offset,
                    table.class_base(class),
                    header.ncpu,
                    block,
                    header.cap(class),
                )
            };
            let cpu = cpu as usize;
            match done {
                Done::Committed => stats::count(table, Some(cpu), class, Event::FreeTask),
                Done::Refused => {
                    stats::count(table, Some(cpu), class, Event::FreeTask);
                    stats::count(table, Some(cpu), class, Event::Overflow);
                    // SAFETY: the cache refused our block; it is still ours.
                    unsafe { overflow(table, class, block, Some(cpu)) };
                }
                Done::NoCpu => {
                    stats::count(table, None, class, Event::FreeOther);
                    // SAFETY: as above.
                    unsafe { overflow(table, class, block, None) };
                }
            }
        }
        (Path::Rseq, Context::Signal) => {
            // Signal context must not call jemalloc: with no CPU number,
            // CPU 0's lists take the block.
            let cpu = rseq::cpu_id(header.rseq_offset)
                .filter(|&c| c < header.ncpu)
                .unwrap_or(0) as usize;
            // SAFETY: we own the block and it fits a list word.
            let free = unsafe { rules::free_signal(table, table.cpu(cpu), class, block) };
            count_free(table, Some(cpu), class, ctx, free);
        }
        (Path::Fallback, _) | (_, Context::Other) => {
            let cpu = fallback::current_cpu(header.ncpu);
            let free = match (cpu, ctx) {
                // SAFETY: we own the block and it fits a list word.
                (Some(cpu), _) => unsafe { rules::free_locked(table, cpu, class, block, ctx) },
                // SAFETY: as above.
                (None, Context::Signal) => unsafe {
                    rules::free_signal(table, table.cpu(0), class, block)
                },
                (None, _) => Free::Other,
            };
            count_free(table, cpu, class, ctx, free);
            if let Free::Overflow | Free::Other = free {
                // SAFETY: the cache refused our block; it is still ours.
                unsafe { overflow(table, class, block, cpu) };
            }
        }
    }
}

/// Counts a free by its context and, past the cap, by what became of it.
#[inline(always)]
fn count_free(table: &Table, cpu: Option<usize>, class: Class, ctx: Context, free: Free) {
    let by_context = match (free, ctx) {
        // No CPU, or the context says so: other context either way.
        (Free::Other, _) | (_, Context::Other) => Event::FreeOther,
        (_, Context::Task) => Event::FreeTask,
        (_, Context::Signal) => Event::FreeSignal,
    };
    stats::count(table, cpu, class, by_context);
    match free {
        Free::Overflow => stats::count(table, cpu, class, Event::Overflow),
        Free::Deferred => stats::count(table, cpu, class, Event::Deferred),
        Free::Task | Free::Signal | Free::Other => {}
    }
}

/// The CPU the calling thread runs on now, by the table's path.
fn current_cpu(table: &Table) -> Option<usize> {
    let header = table.header();
    match header.path {
        Path::Rseq => rseq::cpu_id(header.rseq_offset)
            .filter(|&c| c < header.ncpu)
            .map(|c| c as usize),
        Path::Fallback => fallback::current_cpu(header.ncpu),
    }
}

// SAFETY: every method either returns null or memory that satisfies the
// layout: cached blocks come from jemalloc as blocks of a class whose size
// is at least the layout's and whose alignment is at least the layout's
// (`class_of`), and each block is on at most one list or with one user at
// a time (the rules). Nothing here unwinds.
unsafe impl GlobalAlloc for PerCpuAlloc {
    #[inline(always)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { self.alloc_impl(layout, false) }
    }

    #[inline(always)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { self.alloc_impl(layout, true) }
    }

    #[inline(always)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(table) = self.table_if_made() {
            if let Some(class) = class_of(layout.size(), layout.align(), table.header().max_size) {
                // SAFETY: `ptr` was allocated with `layout` by this
                // allocator, so it is a block of `class`.
                return unsafe { give(table, class, ptr) };
            }
        }
        // SAFETY: not a cacheable layout, so `alloc_impl` took it from
        // jemalloc with this size and alignment.
        unsafe { backend::free(ptr, layout.size().max(1), layout.align()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = match Layout::from_size_align(new_size, layout.align()) {
            Ok(l) => l,
            Err(_) => return ptr::null_mut(),
        };
        let max = self.table_if_made().map_or(0, |t| t.header().max_size);
        let old_class = class_of(layout.size(), layout.align(), max);
        let new_class = class_of(new_size, layout.align(), max);
        match (old_class, new_class) {
            // The block already holds `new_size` bytes with this alignment.
            (Some(a), Some(b)) if a == b => ptr,
            // Both large: jemalloc grows or shrinks in place when it can.
            // SAFETY: `ptr` came from `backend::alloc` with this alignment.
            (None, None) => unsafe { backend::realloc(ptr, layout.align(), new_size.max(1)) },
            _ => {
                // SAFETY: `new_layout` is valid (checked above).
                let new = unsafe { self.alloc(new_layout) };
                if !new.is_null() {
                    // SAFETY: both blocks hold at least the smaller size and
                    // are distinct (the old one is still live).
                    unsafe {
                        ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                }
                new
            }
        }
    }
}
