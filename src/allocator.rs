//! `PerCpuAlloc`: the `GlobalAlloc` that puts the per-CPU caches in front of
//! jemalloc.
//!
//! The path is chosen once, when the table is made, by which of two
//! pointers holds it. Every call reads the rseq one first, which until then
//! (and for good on the fallback path) points at a table that caches
//! nothing, so the size check every request makes anyway is all the
//! dispatch there is. The fallback and the table's making are out of line.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr;
use core::sync::atomic::{AtomicPtr, Ordering};

use crate::backend;
use crate::config::Config;
use crate::context::{self, Context};
use crate::drain;
use crate::env;
use crate::fallback::{self, Locked};
use crate::percpu::{Path, PerCpu};
use crate::rseq::{self, Rseq};
use crate::rules;
use crate::size_class::{class_of, Class};
use crate::stats::{self, Counters, ListCounts, Snapshot, Stats, TrimReport};
use crate::table::{possible_cpus, Site, Table};

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
    /// The table, while the rseq path is live; [`UNMADE`](crate::table::UNMADE) otherwise, so
    /// that the hot paths never test for null.
    rseq: AtomicPtr<Table>,
    /// The table, while the fallback path is live; null otherwise.
    locked: AtomicPtr<Table>,
    config: Config,
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
    /// static FALLBACK: PerCpuAlloc = PerCpuAlloc::with_config(Config::new().with_force_fallback(true));
    /// # assert_eq!(FALLBACK.path(), percpu_alloc::Path::Fallback);
    /// ```
    pub const fn with_config(config: Config) -> Self {
        PerCpuAlloc {
            rseq: AtomicPtr::new(Table::unmade()),
            locked: AtomicPtr::new(ptr::null_mut()),
            config,
        }
    }

    /// The configuration this allocator was made with.
    ///
    /// ```
    /// use percpu_alloc::{Config, PerCpuAlloc};
    ///
    /// let alloc = PerCpuAlloc::with_config(Config::new().with_cap(64));
    /// assert_eq!(alloc.config().cap(), 64);
    /// // The environment's overrides show in `active_config`, never here.
    /// assert!(alloc.config().read_env());
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
    /// let alloc = PerCpuAlloc::with_config(Config::new().with_cap(64).with_read_env(false));
    /// assert_eq!(alloc.active_config().cap(), 64);
    /// ```
    pub fn active_config(&self) -> Config {
        match self.table() {
            Some(table) => table.header().config,
            None => self.config,
        }
    }

    /// Which per-CPU path is live. Decided once, on first use (this call
    /// counts): rseq if glibc registered rseq for the process (a non-zero
    /// `__rseq_size`), the possible CPUs could be read and the fallback is
    /// not forced; else the fallback.
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
        let class = Class::from_index(class)?;
        (cpu < table.header().ncpu as usize).then(|| stats::counts(table, cpu, class))
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
        let class = Class::from_index(class)?;
        (cpu < table.header().ncpu as usize).then(|| stats::counters(table, cpu, class))
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
            let cpu = match table.header().path {
                Path::Rseq => Rseq::cpu_hint(table),
                Path::Fallback => Locked::cpu_hint(table),
            };
            if let Some(cpu) = cpu {
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
        let Some(table) = self.table_if_made() else {
            return ptr::null_mut();
        };
        let Some(site) = site_of(table, layout) else {
            return ptr::null_mut();
        };
        match table.header().path {
            Path::Rseq => rules::alloc_cached::<Rseq>(table, site),
            Path::Fallback => rules::alloc_cached::<Locked>(table, site),
        }
    }

    /// Frees a block without its layout, as C's `free` must: jemalloc's
    /// usable size of the block is its class size, and every block this
    /// allocator hands out, cached or not, has the class of that size
    /// (cached blocks are jemalloc blocks of exactly their class), so the
    /// block goes back where a `dealloc` with that size would send it.
    /// With `override` the size comes from the page's class record when
    /// it has one (see `size_map`).
    ///
    /// In signal context a block without a record would need jemalloc to
    /// name its size, which a handler must not ask, so it is deferred
    /// instead (see `rules::defer_unsized`); a recorded one goes to
    /// `dealloc`, which routes a signal-context free itself.
    ///
    /// # Safety
    /// `ptr` is a live block from this allocator (any layout), not used
    /// after.
    #[inline(always)]
    pub(crate) unsafe fn dealloc_unsized(&self, ptr: *mut u8) {
        // The signal-context test comes after the page lookup, which is
        // async-signal-safe: a recorded block's `dealloc` makes that test
        // anyway, so the hit path makes it once.
        #[cfg(feature = "override")]
        return match crate::size_map::class_of_block(ptr) {
            // SAFETY: the page's record names the block's class
            // (`size_map`); the rest is the caller's contract.
            Some(class) => unsafe { self.dealloc_of_class(ptr, class) },
            // SAFETY: forwarded.
            None => unsafe { self.dealloc_unrecorded(ptr) },
        };
        #[cfg(not(feature = "override"))]
        // SAFETY: forwarded.
        unsafe {
            self.dealloc_unrecorded(ptr)
        }
    }

    /// [`dealloc_unsized`](Self::dealloc_unsized) of a block whose page
    /// names its class: the rseq hit path with the class's site taken
    /// from the table directly, not through the class's size (a load
    /// fewer on the way to the section); otherwise what `dealloc` with the
    /// class size does when its lookup fails.
    ///
    /// # Safety
    /// As `dealloc_unsized`, and `ptr` is a block of `class`.
    #[cfg(feature = "override")]
    #[inline(always)]
    unsafe fn dealloc_of_class(&self, ptr: *mut u8, class: crate::size_class::Class) {
        // SAFETY: as in `dealloc`.
        let table = unsafe { &*self.rseq.load(Ordering::Acquire) };
        match table.site_of_class(class) {
            // SAFETY: a block of the site's class from this allocator.
            Some(site) => unsafe { rules::free::<Rseq>(table, site, ptr) },
            // Not cached on the rseq path (no table, the fallback, or a
            // class this table does not cache): where `dealloc`'s own
            // lookup of the class size would fail too (the two agree, see
            // `Table::site_of_class`), so straight to its out-of-line
            // half. Calling `dealloc` here inlined a second copy of its
            // lookup and section into C's `free`, one that could only
            // refuse. SAFETY: a block of `class`, so of the layout
            // (class size, 8), from this allocator.
            None => unsafe { dealloc_unserved(ptr, class.size(), 8, self) },
        }
    }

    /// [`dealloc_unsized`](Self::dealloc_unsized) of a block whose class is
    /// not known here: with `override`, a page with no record (a block of
    /// no cached class, as good as always); without, every block.
    ///
    /// # Safety
    /// As `dealloc_unsized`.
    #[inline(always)]
    unsafe fn dealloc_unrecorded(&self, ptr: *mut u8) {
        if context::any_signal_context() {
            // SAFETY: forwarded.
            return unsafe { self.dealloc_unrecorded_in_some_context(ptr) };
        }
        // SAFETY: forwarded.
        unsafe { self.dealloc_unrecorded_in_task(ptr) }
    }

    /// [`dealloc_unrecorded`](Self::dealloc_unrecorded) in task context.
    ///
    /// # Safety
    /// As `dealloc_unsized`.
    #[inline(always)]
    unsafe fn dealloc_unrecorded_in_task(&self, ptr: *mut u8) {
        // jemalloc takes any of its blocks, so with `override` it gets this
        // one without being asked its size first; a cached class's block
        // that lands here is merely not cached.
        #[cfg(feature = "override")]
        // SAFETY: the caller's contract: a live jemalloc block.
        unsafe {
            backend::free_unrecorded(ptr)
        }
        #[cfg(not(feature = "override"))]
        // SAFETY: the caller's contract: a live jemalloc block. The layout
        // is valid (a class size, align 8), and a block of that class or a
        // jemalloc block of that usable size is what `dealloc` with it
        // takes: a cached size goes to its class's lists, a larger one to
        // `sdallocx` with its own usable size.
        unsafe {
            let size = backend::usable_size(ptr);
            self.dealloc(ptr, Layout::from_size_align_unchecked(size, 8))
        }
    }

    /// [`dealloc_unrecorded`](Self::dealloc_unrecorded) while some thread
    /// holds a signal-context mark; out of line, since only this path
    /// reads the thread-local mark (a call to `__tls_get_addr` in a shared
    /// library).
    ///
    /// # Safety
    /// As `dealloc_unsized`.
    #[cold]
    #[inline(never)]
    unsafe fn dealloc_unrecorded_in_some_context(&self, ptr: *mut u8) {
        if context::current_context() == Context::Signal {
            if let Some(t) = self.table_if_made() {
                // SAFETY: the caller's contract.
                unsafe {
                    match t.header().path {
                        Path::Rseq => rules::defer_unsized::<Rseq>(t, ptr),
                        Path::Fallback => rules::defer_unsized::<Locked>(t, ptr),
                    }
                }
                return;
            }
        }
        // Another thread's mark, or no table to defer to.
        // SAFETY: forwarded.
        unsafe { self.dealloc_unrecorded_in_task(ptr) }
    }

    /// A live block's usable size: its class size for a cached class. With
    /// `override` the page's class record answers when it has one (see
    /// `size_map`), jemalloc otherwise.
    ///
    /// # Safety
    /// `ptr` is a live block from this allocator.
    #[inline(always)]
    pub(crate) unsafe fn usable_size(&self, ptr: *mut u8) -> usize {
        #[cfg(feature = "override")]
        if let Some(class) = crate::size_map::class_of_block(ptr) {
            return class.size();
        }
        // SAFETY: the caller's contract.
        unsafe { usable_size_from_jemalloc(ptr) }
    }

    /// The table if it has been made; never makes it.
    #[inline]
    fn table_if_made(&self) -> Option<&Table> {
        let mut table = self.rseq.load(Ordering::Acquire);
        if table == Table::unmade() {
            table = self.locked.load(Ordering::Acquire);
        }
        // SAFETY: a published table lives as long as `self`.
        (!table.is_null()).then(|| unsafe { &*table })
    }

    /// The table, made on first use; `None` if it cannot be made.
    #[inline]
    fn table(&self) -> Option<&Table> {
        self.table_if_made().or_else(|| self.make_table())
    }

    #[cold]
    #[inline(never)]
    fn make_table(&self) -> Option<&Table> {
        let (config, print_stats) = if self.config.read_env() {
            let overrides = env::overrides();
            (overrides.apply(self.config), overrides.print_stats)
        } else {
            (self.config, false)
        };
        // The rseq sections find a CPU's region with no bounds check, so
        // that path needs a table over every possible CPU.
        let cpus = possible_cpus();
        let (path, offset, ncpu) = match (config.force_fallback(), rseq::registered(), cpus) {
            (false, Some(offset), Some(ncpu)) => (Path::Rseq, offset, ncpu),
            _ => (Path::Fallback, 0, cpus.unwrap_or(1024)),
        };
        if path == Path::Fallback {
            fallback::choose_cpu_reader(ncpu);
        }
        let new = Table::create(&config, path, offset, ncpu);
        if new.is_null() {
            return None;
        }
        // Every thread of a process picks the same path, so racing makers
        // meet on the same pointer.
        let (slot, unmade) = match path {
            Path::Rseq => (&self.rseq, Table::unmade()),
            Path::Fallback => (&self.locked, ptr::null_mut()),
        };
        match slot.compare_exchange(unmade, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                Table::register(new);
                fallback::watch_forks();
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

    /// C's `malloc` (`zeroed`: `calloc`) of a size that makes a valid
    /// layout with `malloc`'s alignment of 8: `alloc_impl` with its
    /// unserved case split, so that a size past the cache goes from here
    /// straight to jemalloc in a tail call. The exported `malloc` cannot
    /// tail-call `alloc_unserved`: LLVM takes that one as able to unwind,
    /// and a C function aborts on an unwind, so the call would keep a
    /// frame, which cost a `malloc(4096)+free` pair 1.2 ns of 8
    /// (docs/design.md, "Requests the cache does not serve"). Only the
    /// fallback path and the call that makes the table stay calls.
    ///
    /// A null return has `errno` set: every null comes from jemalloc's
    /// `malloc` or `calloc`, which set `ENOMEM`.
    ///
    /// # Safety
    /// `size` and 8 make a valid `Layout`.
    #[inline(always)]
    pub(crate) unsafe fn alloc_for_c(&self, size: usize, zeroed: bool) -> *mut u8 {
        // SAFETY: as in `alloc_impl`.
        let table = unsafe { &*load_unfenced(&self.rseq) };
        if let Some(site) = table.site(size) {
            return rules::alloc::<Rseq>(table, site, if zeroed { size } else { 0 });
        }
        if !ptr::eq(table, Table::unmade()) {
            // Past every cached size.
            return alloc_uncached(size, 8, zeroed);
        }
        alloc_elsewhere(size, 8, zeroed, self)
    }

    /// An alloc on the rseq path, the one inlined into `__rust_alloc`.
    /// Until a table is made, and on the fallback path, the rseq pointer
    /// holds [`UNMADE`](crate::table::UNMADE), whose size limit of 0 sends every request out of
    /// line: that is the whole dispatch.
    #[inline(always)]
    unsafe fn alloc_impl(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        // SAFETY: `rseq` holds `UNMADE` or a published table, which lives
        // as long as `self`.
        let table = unsafe { &*load_unfenced(&self.rseq) };
        let (size, align) = (layout.size(), layout.align());
        alloc_on::<Rseq>(size, align, zeroed, table, || {
            alloc_unserved(size, align, zeroed, self)
        })
    }
}

/// `slot.load(Acquire)` as one `mov` in `asm!`, which LLVM does not take
/// for a fence.
///
/// The alloc is inlined into the program's own functions, and LLVM
/// treats every atomic load (`Relaxed` too) as if it might write any
/// memory, even stack temporaries nothing else can see. `Box::new(value)`
/// builds `value`, allocates, then moves it in; with an atomic load
/// between, LLVM built the value on the stack and copied it with `memcpy`
/// (docs/design.md, "An alloc the optimiser can see across").
///
/// An aligned 8-byte `mov` is an atomic load on x86_64, with acquire
/// ordering in hardware; marked `readonly`, the asm writes nothing as far
/// as LLVM knows. It is not `pure`: each read is made, none merged or
/// hoisted. Every use reads through the pointer, so no load of the table
/// can move above it. Elsewhere the rseq path does not exist, and this is
/// the atomic load.
#[inline(always)]
fn load_unfenced<T>(slot: &AtomicPtr<T>) -> *mut T {
    #[cfg(target_arch = "x86_64")]
    {
        let value: *mut T;
        // SAFETY: `slot` is a live, aligned, pointer-sized atomic, and an
        // aligned 8-byte load is atomic on x86_64. The asm reads that word
        // and writes nothing (`readonly`).
        unsafe {
            core::arch::asm!(
                "mov {value}, qword ptr [{slot}]",
                slot = in(reg) slot.as_ptr(),
                value = out(reg) value,
                options(nostack, readonly, preserves_flags),
            )
        };
        value
    }
    #[cfg(not(target_arch = "x86_64"))]
    slot.load(Ordering::Acquire)
}

// The out-of-line functions take the caller's arguments first, in the
// registers they arrive in, so that jumping to one moves nothing.

/// An alloc the rseq hit path did not look up: a large or over-aligned
/// layout on the rseq path, or no rseq table.
#[cold]
#[inline(never)]
fn alloc_unserved(size: usize, align: usize, zeroed: bool, alloc: &PerCpuAlloc) -> *mut u8 {
    let table = alloc.rseq.load(Ordering::Acquire);
    if table != Table::unmade() {
        if align <= 8 {
            // The inline lookup found no class: larger than every cached
            // size. Straight to jemalloc, with no second call on the way.
            return alloc_uncached(size, align, zeroed);
        }
        // SAFETY: a published table lives as long as `alloc`.
        return alloc_uncommon::<Rseq>(size, align, zeroed, unsafe { &*table });
    }
    alloc_elsewhere(size, align, zeroed, alloc)
}

/// An alloc on the fallback path, or before the table is made.
#[inline(never)]
fn alloc_elsewhere(size: usize, align: usize, zeroed: bool, alloc: &PerCpuAlloc) -> *mut u8 {
    let table = alloc.locked.load(Ordering::Acquire);
    if !table.is_null() {
        // SAFETY: a published table lives as long as `alloc`.
        let table = unsafe { &*table };
        return alloc_on::<Locked>(size, align, zeroed, table, || {
            alloc_uncommon::<Locked>(size, align, zeroed, table)
        });
    }
    match alloc.make_table() {
        // SAFETY: `size` and `align` came from a `Layout`; the table is
        // published now.
        Some(_) => unsafe {
            alloc.alloc_impl(Layout::from_size_align_unchecked(size, align), zeroed)
        },
        None => alloc_uncached(size, align, zeroed),
    }
}

/// The inline half of an alloc through `table`'s path `P`: a cached size
/// aligned to at most 8 goes to the rules, anything else to `other`, out
/// of line.
#[inline(always)]
fn alloc_on<P: PerCpu>(
    size: usize,
    align: usize,
    zeroed: bool,
    table: &Table,
    other: impl FnOnce() -> *mut u8,
) -> *mut u8 {
    if align <= 8 {
        if let Some(site) = table.site(size) {
            return rules::alloc::<P>(table, site, if zeroed { size } else { 0 });
        }
    }
    other()
}

/// A layout the inline path does not look up: aligned to more than 8
/// (rare, so the hot path never waits on its lookup), or larger than
/// every cached size, which goes straight to jemalloc. Out of line, so
/// that the layout-to-flags work stays out of every inlined copy.
#[cold]
#[inline(never)]
fn alloc_uncommon<P: PerCpu>(size: usize, align: usize, zeroed: bool, table: &Table) -> *mut u8 {
    if align > 8 {
        if let Some(site) = table.site_aligned(size, align) {
            return rules::alloc::<P>(table, site, if zeroed { size } else { 0 });
        }
    }
    alloc_uncached(size, align, zeroed)
}

/// jemalloc's usable size of a block, out of line: with `override` the
/// page records answer for nearly every cached block.
///
/// # Safety
/// `ptr` is a live jemalloc block.
#[cfg_attr(feature = "override", cold, inline(never))]
unsafe fn usable_size_from_jemalloc(ptr: *mut u8) -> usize {
    // SAFETY: the caller's contract.
    unsafe { backend::usable_size(ptr) }
}

/// Allocates from jemalloc a layout the cache does not serve. A zero size
/// is asked for as 1, so it still gets a block of its own (and jemalloc is
/// never handed a zero size); an alignment for which even that cannot be
/// a `Layout` gets null.
#[inline(always)]
fn alloc_uncached(size: usize, align: usize, zeroed: bool) -> *mut u8 {
    backend::alloc(size.max(1), align, zeroed)
}

/// Frees what [`alloc_uncached`] returned for this size and alignment.
///
/// # Safety
/// As `GlobalAlloc::dealloc`, for a block [`alloc_uncached`] made.
#[inline(always)]
unsafe fn free_uncached(ptr: *mut u8, size: usize, align: usize) {
    // SAFETY: `alloc_uncached` took the block from `backend::alloc` with
    // this size (as 1 if zero) and alignment; the rest is the caller's
    // contract.
    unsafe { backend::free(ptr, size.max(1), align) }
}

/// A free the rseq hit path did not look up, as [`alloc_unserved`].
///
/// # Safety
/// As `GlobalAlloc::dealloc`.
#[cold]
#[inline(never)]
unsafe fn dealloc_unserved(ptr: *mut u8, size: usize, align: usize, alloc: &PerCpuAlloc) {
    let table = alloc.rseq.load(Ordering::Acquire);
    if table != Table::unmade() {
        if align <= 8 {
            // As in `alloc_unserved`: `alloc` took it from jemalloc with
            // `alloc_uncached`.
            // SAFETY: forwarded contract.
            return unsafe { free_uncached(ptr, size, align) };
        }
        // SAFETY: a published table lives as long as `alloc`; forwarded
        // contract.
        return unsafe { dealloc_uncommon::<Rseq>(ptr, size, align, &*table) };
    }
    // SAFETY: forwarded contract.
    unsafe { dealloc_elsewhere(ptr, size, align, alloc) }
}

/// A free on the fallback path, or with no table.
///
/// # Safety
/// As `GlobalAlloc::dealloc`.
#[inline(never)]
unsafe fn dealloc_elsewhere(ptr: *mut u8, size: usize, align: usize, alloc: &PerCpuAlloc) {
    let table = alloc.locked.load(Ordering::Acquire);
    if !table.is_null() {
        // SAFETY: a published table lives as long as `alloc`.
        let table = unsafe { &*table };
        // SAFETY: forwarded contract, for either half.
        return unsafe {
            dealloc_on::<Locked>(ptr, size, align, table, || {
                dealloc_uncommon::<Locked>(ptr, size, align, table)
            })
        };
    }
    // SAFETY: with no table, `alloc` took every block from jemalloc with
    // `alloc_uncached`.
    unsafe { free_uncached(ptr, size, align) }
}

/// The inline half of a free through `table`'s path `P`, as [`alloc_on`]:
/// `other` takes what the rules do not.
///
/// # Safety
/// As `GlobalAlloc::dealloc`, for a block this allocator made with `table`;
/// `other` frees `ptr` with this size and alignment.
#[inline(always)]
unsafe fn dealloc_on<P: PerCpu>(
    ptr: *mut u8,
    size: usize,
    align: usize,
    table: &Table,
    other: impl FnOnce(),
) {
    if align <= 8 {
        if let Some(site) = table.site(size) {
            // SAFETY: `ptr` was allocated with this layout by this
            // allocator, so it is a block of the site's class.
            return unsafe { rules::free::<P>(table, site, ptr) };
        }
    }
    other()
}

/// A free of a layout the inline path does not look up, as
/// [`alloc_uncommon`].
///
/// # Safety
/// As [`dealloc_on`].
#[cold]
#[inline(never)]
unsafe fn dealloc_uncommon<P: PerCpu>(ptr: *mut u8, size: usize, align: usize, table: &Table) {
    if align > 8 {
        if let Some(site) = table.site_aligned(size, align) {
            // SAFETY: as in `dealloc_on`.
            return unsafe { rules::free::<P>(table, site, ptr) };
        }
    }
    // SAFETY: not a cached layout, so `alloc` took it from jemalloc with
    // `alloc_uncached`.
    unsafe { free_uncached(ptr, size, align) }
}

/// Where `table` caches `layout`, if it does.
#[inline]
fn site_of(table: &Table, layout: Layout) -> Option<Site> {
    match layout.align() {
        ..=8 => table.site(layout.size()),
        align => table.site_aligned(layout.size(), align),
    }
}

impl Default for PerCpuAlloc {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PerCpuAlloc {
    fn drop(&mut self) {
        for table in [*self.rseq.get_mut(), *self.locked.get_mut()] {
            if !table.is_null() && table != Table::unmade() {
                Table::unregister(table);
                // SAFETY: `&mut self`: no call into this allocator is
                // running, and none can start, so the table is ours to
                // empty and unmap.
                unsafe {
                    drain::teardown(&*table);
                    Table::destroy(table);
                }
            }
        }
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
        // A plain atomic load, not `load_unfenced`: no value waits across
        // a free to be moved, and in batch loops the asm's address operand
        // (a register LLVM then keeps for it) cost 5%.
        // SAFETY: as in `alloc_impl`.
        let table = unsafe { &*self.rseq.load(Ordering::Acquire) };
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: forwarded contract, for either half.
        unsafe {
            dealloc_on::<Rseq>(ptr, size, align, table, || {
                dealloc_unserved(ptr, size, align, self)
            })
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = match Layout::from_size_align(new_size, layout.align()) {
            Ok(l) => l,
            Err(_) => return ptr::null_mut(),
        };
        let limit = self.table_if_made().map_or(0, |t| t.header().size_limit);
        let old_class = class_of(layout.size(), layout.align(), limit);
        let new_class = class_of(new_size, layout.align(), limit);
        match (old_class, new_class) {
            // The block already holds `new_size` bytes with this alignment.
            (Some(a), Some(b)) if a == b => ptr,
            // Both large: jemalloc grows or shrinks in place when it can.
            // SAFETY: `ptr` came from `alloc_uncached` with this layout, a
            // zero size asked for as 1 (so that layout is valid too).
            (None, None) => unsafe {
                let old = Layout::from_size_align_unchecked(layout.size().max(1), layout.align());
                backend::realloc(ptr, old, new_size.max(1))
            },
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
