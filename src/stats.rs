//! Introspection: which per-CPU path is live, what each cache holds, what
//! the caches did (event counters, with the `stats` feature), and what
//! trimming released. Everything here reads the caches in place and
//! allocates nothing, so it can be called from anywhere, including while
//! the allocator is the global one and other threads use it, and at exit.

use core::fmt::{self, Write as _};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::counters::{read, Event, COUNTING};
use crate::percpu::Path;
use crate::size_class::{Class, NUM_CLASSES};
use crate::stderr::{Buf, Stderr};
use crate::table::{Record, Table};

/// The lengths of one CPU's lists for one class.
///
/// ```
/// use std::alloc::{GlobalAlloc, Layout};
/// use percpu_alloc::PerCpuAlloc;
///
/// let alloc = PerCpuAlloc::new();
/// let layout = Layout::from_size_align(24, 8).unwrap();
/// // SAFETY: a valid layout; the block is freed with the same one.
/// unsafe { alloc.dealloc(alloc.alloc(layout), layout) };
/// for lists in alloc.snapshot() {
///     assert!(lists.nr + lists.nr_sig <= lists.cap + 1);
///     assert_eq!(lists.bytes(), (lists.nr + lists.nr_sig) as usize * lists.class_size);
/// }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListCounts {
    /// The CPU.
    pub cpu: usize,
    /// The class index (see [`CLASS_SIZES`](crate::CLASS_SIZES)).
    pub class: usize,
    /// The class's block size in bytes.
    pub class_size: usize,
    /// Blocks on the task list (`nr`).
    pub nr: u32,
    /// Blocks on the signal list (`nr_sig`).
    pub nr_sig: u32,
    /// The most blocks this class may hold on one CPU.
    pub cap: u32,
}

impl ListCounts {
    /// Bytes held by both lists.
    ///
    /// ```
    /// use percpu_alloc::ListCounts;
    ///
    /// let lists = ListCounts { cpu: 0, class: 3, class_size: 48, nr: 2, nr_sig: 1, cap: 256 };
    /// assert_eq!(lists.bytes(), 3 * 48);
    /// ```
    pub fn bytes(&self) -> usize {
        (self.nr as usize + self.nr_sig as usize) * self.class_size
    }
}

pub(crate) fn counts(table: &Table, cpu: usize, class: Class) -> ListCounts {
    let (nr, nr_sig) = table
        .record(cpu, class)
        .map_or((0, 0), |rec| (rec.task.load().len(), rec.sig.len()));
    ListCounts {
        cpu,
        class: class.index(),
        class_size: class.size(),
        nr,
        nr_sig,
        cap: table.cap(class),
    }
}

/// The non-empty lists of every CPU, one [`ListCounts`] per CPU and class,
/// read as the iterator goes (each entry is a moment's reading, not a
/// consistent cut). From [`PerCpuAlloc::snapshot`](crate::PerCpuAlloc::snapshot).
///
/// ```
/// use std::alloc::{GlobalAlloc, Layout};
/// use percpu_alloc::PerCpuAlloc;
///
/// let alloc = PerCpuAlloc::new();
/// assert_eq!(alloc.snapshot().count(), 0); // no caches made yet
/// let layout = Layout::from_size_align(40, 8).unwrap();
/// // SAFETY: a valid layout; the block is freed with the same one.
/// unsafe { alloc.dealloc(alloc.alloc(layout), layout) };
/// // At most the one 48-byte block, and only non-empty lists.
/// for lists in alloc.snapshot() {
///     assert_eq!((lists.class_size, lists.nr + lists.nr_sig), (48, 1));
/// }
/// assert!(alloc.snapshot().count() <= 1);
/// ```
pub struct Snapshot<'a> {
    table: Option<&'a Table>,
    cpu: usize,
    class: usize,
}

impl<'a> Snapshot<'a> {
    pub(crate) fn new(table: Option<&'a Table>) -> Self {
        Snapshot {
            table,
            cpu: 0,
            class: 0,
        }
    }
}

impl Iterator for Snapshot<'_> {
    type Item = ListCounts;

    fn next(&mut self) -> Option<ListCounts> {
        let table = self.table?;
        while self.cpu < table.header().ncpu as usize {
            while let Some(class) = Class::from_index(self.class) {
                self.class += 1;
                let c = counts(table, self.cpu, class);
                if c.nr + c.nr_sig > 0 {
                    return Some(c);
                }
            }
            self.class = 0;
            self.cpu += 1;
        }
        None
    }
}

/// What a [`trim`](crate::PerCpuAlloc::trim) gave back to jemalloc.
///
/// ```
/// use std::alloc::{GlobalAlloc, Layout};
/// use percpu_alloc::PerCpuAlloc;
///
/// let alloc = PerCpuAlloc::new();
/// let layout = Layout::from_size_align(100, 8).unwrap();
/// // SAFETY: a valid layout; the block is freed with the same one.
/// unsafe { alloc.dealloc(alloc.alloc(layout), layout) };
/// let report = alloc.trim();
/// assert_eq!(report.bytes, report.blocks * 112); // 100 bytes: the 112-byte class
/// assert_eq!(alloc.cached_bytes(), 0);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrimReport {
    /// Cached blocks (task and signal lists) returned.
    pub blocks: usize,
    /// Their bytes (class sizes).
    pub bytes: usize,
    /// Deferred blocks (signal-context frees past the cap) returned.
    pub deferred_blocks: usize,
    /// CPUs whose task lists could not be reached (see `trim`).
    pub cpus_skipped: usize,
}

/// Event counts of the cache (one CPU and class, or summed). All zero in a
/// build without the `stats` feature.
///
/// An alloc is exactly one of a hit, a splice or a miss; a free is
/// exactly one of a task, signal or other free, and may also be an
/// overflow (task context, the list at its cap: the block went to
/// jemalloc) or deferred (signal context at the cap: the block waits for
/// task context to give it to jemalloc).
///
/// ```
/// use std::alloc::{GlobalAlloc, Layout};
/// use percpu_alloc::{Config, PerCpuAlloc};
///
/// let alloc = PerCpuAlloc::with_config(Config::new().with_read_env(false));
/// let layout = Layout::from_size_align(64, 8).unwrap();
/// // SAFETY: a valid layout; the block is freed with the same one.
/// unsafe { alloc.dealloc(alloc.alloc(layout), layout) };
/// let totals = alloc.stats().totals;
/// if cfg!(feature = "stats") {
///     assert_eq!(totals.allocs(), 1); // a miss: the cache started empty
///     assert_eq!(totals.frees(), 1);
/// } else {
///     assert_eq!(totals, Default::default());
/// }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Allocs served from the task list.
    pub hits: u64,
    /// Allocs that spliced the signal list onto the empty task list.
    pub splices: u64,
    /// Allocs the cache could not serve: they went to jemalloc.
    pub misses: u64,
    /// Frees in task context.
    pub frees_task: u64,
    /// Frees in signal context.
    pub frees_signal: u64,
    /// Frees in other context (no CPU, or a CPU beyond the table): to
    /// jemalloc.
    pub frees_other: u64,
    /// Task-context frees that found the class at its cap: to jemalloc.
    pub overflows: u64,
    /// Signal-context frees that found the class at its cap: deferred.
    pub deferred: u64,
}

impl Counters {
    fn read(rec: &Record) -> Counters {
        let get = |e: Event| read(rec, e);
        Counters {
            hits: get(Event::Hit),
            splices: get(Event::Splice),
            misses: get(Event::Miss),
            frees_task: get(Event::FreeTask),
            frees_signal: get(Event::FreeSignal),
            frees_other: get(Event::FreeOther),
            overflows: get(Event::Overflow),
            deferred: get(Event::Deferred),
        }
    }

    /// Every alloc counted: hits, splices and misses.
    ///
    /// ```
    /// use percpu_alloc::Counters;
    ///
    /// let c = Counters { hits: 5, splices: 1, misses: 2, ..Counters::default() };
    /// assert_eq!(c.allocs(), 8);
    /// ```
    pub fn allocs(&self) -> u64 {
        self.hits + self.splices + self.misses
    }

    /// Every free counted, in any context.
    ///
    /// ```
    /// use percpu_alloc::Counters;
    ///
    /// // An overflow is also a task free: it is not counted twice.
    /// let c = Counters { frees_task: 3, frees_signal: 1, overflows: 2, ..Counters::default() };
    /// assert_eq!(c.frees(), 4);
    /// ```
    pub fn frees(&self) -> u64 {
        self.frees_task + self.frees_signal + self.frees_other
    }

    /// The share of allocs the cache served (hits and splices), 0 to 1.
    ///
    /// ```
    /// use percpu_alloc::Counters;
    ///
    /// let c = Counters { hits: 2, splices: 1, misses: 1, ..Counters::default() };
    /// assert_eq!(c.hit_rate(), 0.75);
    /// assert_eq!(Counters::default().hit_rate(), 0.0);
    /// ```
    pub fn hit_rate(&self) -> f64 {
        match self.allocs() {
            0 => 0.0,
            n => (self.hits + self.splices) as f64 / n as f64,
        }
    }
}

impl core::ops::AddAssign for Counters {
    fn add_assign(&mut self, o: Counters) {
        self.hits += o.hits;
        self.splices += o.splices;
        self.misses += o.misses;
        self.frees_task += o.frees_task;
        self.frees_signal += o.frees_signal;
        self.frees_other += o.frees_other;
        self.overflows += o.overflows;
        self.deferred += o.deferred;
    }
}

pub(crate) fn counters(table: &Table, cpu: usize, class: Class) -> Counters {
    table
        .record(cpu, class)
        .map_or_else(Counters::default, Counters::read)
}

/// One class over every CPU, in [`Stats`].
///
/// ```
/// use std::alloc::{GlobalAlloc, Layout};
/// use percpu_alloc::{Config, PerCpuAlloc, CLASS_SIZES};
///
/// let alloc = PerCpuAlloc::with_config(Config::new().with_cap(100).with_read_env(false));
/// let layout = Layout::from_size_align(64, 8).unwrap();
/// // SAFETY: a valid layout; the block is freed with the same one.
/// unsafe { alloc.dealloc(alloc.alloc(layout), layout) };
/// let class = CLASS_SIZES.iter().position(|&s| s == 64).unwrap();
/// let c = alloc.stats().classes[class];
/// assert_eq!((c.class_size, c.cap), (64, 100));
/// assert!(c.cached_blocks <= 1);
/// if cfg!(feature = "stats") {
///     assert!(c.counters.allocs() <= 1 && c.counters.frees() <= 1);
/// }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassStats {
    /// The class's block size in bytes (0 for a class not cached).
    pub class_size: usize,
    /// Its cap on one CPU.
    pub cap: u32,
    /// Its events, summed over CPUs.
    pub counters: Counters,
    /// Blocks cached now, over CPUs (task and signal lists).
    pub cached_blocks: u64,
}

/// One CPU over every class, in [`Stats`].
///
/// ```
/// use std::alloc::{GlobalAlloc, Layout};
///
/// let alloc = percpu_alloc::PerCpuAlloc::new();
/// let layout = Layout::from_size_align(200, 8).unwrap();
/// // SAFETY: a valid layout; the block is freed with the same one.
/// unsafe { alloc.dealloc(alloc.alloc(layout), layout) };
/// let stats = alloc.stats();
/// for cpu in stats.busiest_cpus() {
///     assert!(cpu.cpu < stats.cpus);
///     assert!(cpu.cached_bytes <= 224); // the one block, of the 224-byte class
/// }
/// // At most two CPUs did anything, so none was left out.
/// let bytes: u64 = stats.busiest_cpus().iter().map(|c| c.cached_bytes).sum();
/// assert_eq!(bytes, stats.cached_bytes);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// The CPU.
    pub cpu: usize,
    /// Its events, summed over classes.
    pub counters: Counters,
    /// Bytes cached on it now.
    pub cached_bytes: u64,
}

impl CpuStats {
    fn ops(&self) -> u64 {
        self.counters.allocs() + self.counters.frees()
    }
}

/// How many CPUs [`Stats::busiest_cpus`] keeps.
const BUSIEST: usize = 8;

/// A summary of the caches, collected without allocating: totals, every
/// class, and the busiest CPUs. From
/// [`PerCpuAlloc::stats`](crate::PerCpuAlloc::stats); its `Display` is a
/// table for people.
///
/// Each counter is read once as the collection goes, so while other
/// threads run the figures are a moment's reading, not a consistent cut.
///
/// ```
/// use std::alloc::{GlobalAlloc, Layout};
/// use percpu_alloc::PerCpuAlloc;
///
/// let alloc = PerCpuAlloc::new();
/// let layout = Layout::from_size_align(300, 8).unwrap();
/// // SAFETY: a valid layout; each block is freed with the same one.
/// unsafe {
///     let blocks: Vec<_> = (0..10).map(|_| alloc.alloc(layout)).collect();
///     for p in blocks {
///         alloc.dealloc(p, layout);
///     }
/// }
/// let stats = alloc.stats();
/// let class = percpu_alloc::CLASS_SIZES.iter().position(|&s| s == 320).unwrap();
/// assert_eq!(stats.classes[class].cached_blocks, stats.cached_blocks);
/// assert!(stats.cached_bytes as usize <= stats.cpu_bound_bytes * stats.cpus);
/// println!("{stats}");
/// ```
#[derive(Clone, Debug)]
pub struct Stats {
    /// Which per-CPU path is live.
    pub path: Path,
    /// Whether this build counts events (the `stats` feature). Without
    /// it every counter reads 0 and only the cached figures are real.
    pub counting: bool,
    /// CPUs covered by the caches.
    pub cpus: usize,
    /// The splice threshold in force.
    pub splice_threshold: u32,
    /// The largest cached size in force.
    pub max_cached_size: usize,
    /// The most bytes one CPU can cache.
    pub cpu_bound_bytes: usize,
    /// Every CPU and class.
    pub totals: Counters,
    /// Operations that found no usable CPU and went to jemalloc.
    pub no_cpu: u64,
    /// Blocks cached now, over every CPU and class.
    pub cached_blocks: u64,
    /// Their bytes.
    pub cached_bytes: u64,
    /// Blocks waiting on deferred lists.
    pub deferred_blocks: u64,
    /// Per class, indexed like [`CLASS_SIZES`](crate::CLASS_SIZES).
    pub classes: [ClassStats; NUM_CLASSES],
    busiest: [CpuStats; BUSIEST],
    busiest_len: usize,
}

impl Stats {
    /// Stats of an allocator whose table was never made.
    pub(crate) fn empty(path: Path) -> Stats {
        Stats {
            path,
            counting: COUNTING,
            cpus: 0,
            splice_threshold: 0,
            max_cached_size: 0,
            cpu_bound_bytes: 0,
            totals: Counters::default(),
            no_cpu: 0,
            cached_blocks: 0,
            cached_bytes: 0,
            deferred_blocks: 0,
            classes: [ClassStats::default(); NUM_CLASSES],
            busiest: [CpuStats::default(); BUSIEST],
            busiest_len: 0,
        }
    }

    pub(crate) fn collect(table: &Table) -> Stats {
        let header = table.header();
        let mut stats = Stats::empty(header.path);
        stats.cpus = header.ncpu as usize;
        stats.splice_threshold = header.threshold;
        stats.max_cached_size = header.max_size;
        stats.cpu_bound_bytes = header.config.cpu_bound_bytes();
        stats.no_cpu = header.no_cpu.load(Ordering::Relaxed);
        for (class, c) in Class::all().zip(stats.classes.iter_mut()) {
            c.class_size = class.size();
            c.cap = table.cap(class);
        }
        for cpu in table.cpus() {
            let mut this = CpuStats {
                cpu,
                ..CpuStats::default()
            };
            for class in table.classes() {
                let lists = counts(table, cpu, class);
                let blocks = (lists.nr + lists.nr_sig) as u64;
                let events = counters(table, cpu, class);
                this.counters += events;
                this.cached_bytes += lists.bytes() as u64;
                stats.classes[class.index()].counters += events;
                stats.classes[class.index()].cached_blocks += blocks;
                stats.cached_blocks += blocks;
            }
            stats.deferred_blocks += table.cpu(cpu).deferred.len() as u64;
            stats.totals += this.counters;
            stats.cached_bytes += this.cached_bytes;
            stats.keep_if_busy(this);
        }
        stats
    }

    /// Keeps the [`BUSIEST`] CPUs with the most operations (or, without
    /// counters, the most bytes cached), busiest first.
    fn keep_if_busy(&mut self, cpu: CpuStats) {
        let weight = |c: &CpuStats| (c.ops(), c.cached_bytes);
        if weight(&cpu) == (0, 0) {
            return;
        }
        let mut at = self.busiest_len;
        while at > 0 && weight(&self.busiest[at - 1]) < weight(&cpu) {
            at -= 1;
        }
        if at == BUSIEST {
            return;
        }
        let end = (self.busiest_len + 1).min(BUSIEST);
        self.busiest.copy_within(at..end - 1, at + 1);
        self.busiest[at] = cpu;
        self.busiest_len = end;
    }

    /// One row per class that did anything or holds anything.
    fn fmt_classes(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "  {:>5} {:>5} {:>4} {:>8}",
            "class", "size", "cap", "cached"
        )?;
        if self.counting {
            write!(
                f,
                " {:>12} {:>7} {:>9} {:>10} {:>12} {:>10}",
                "allocs", "hit", "splices", "misses", "frees", "overflows"
            )?;
        }
        writeln!(f)?;
        for (i, c) in self.classes.iter().enumerate() {
            let k = &c.counters;
            if k.allocs() + k.frees() + c.cached_blocks == 0 {
                continue;
            }
            write!(
                f,
                "  {:>5} {:>5} {:>4} {:>8}",
                i, c.class_size, c.cap, c.cached_blocks
            )?;
            if self.counting {
                write!(
                    f,
                    " {:>12} {:>7} {:>9} {:>10} {:>12} {:>10}",
                    k.allocs(),
                    Share(k.hits + k.splices, k.allocs()),
                    k.splices,
                    k.misses,
                    k.frees(),
                    k.overflows
                )?;
            }
            writeln!(f)?;
        }
        Ok(())
    }

    /// The busiest CPUs, one row each.
    fn fmt_cpus(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.busiest_cpus().is_empty() {
            return Ok(());
        }
        write!(f, "  {:>5} {:>10}", "cpu", "cached")?;
        if self.counting {
            write!(f, " {:>12} {:>12} {:>7}", "allocs", "frees", "hit")?;
        }
        writeln!(f)?;
        for c in self.busiest_cpus() {
            write!(f, "  {:>5} {:>10}", c.cpu, Bytes(c.cached_bytes))?;
            if self.counting {
                let k = &c.counters;
                write!(
                    f,
                    " {:>12} {:>12} {:>7}",
                    k.allocs(),
                    k.frees(),
                    Share(k.hits + k.splices, k.allocs())
                )?;
            }
            writeln!(f)?;
        }
        Ok(())
    }

    /// The busiest CPUs (most allocs and frees, or most bytes cached without
    /// counters), at most eight, busiest first.
    ///
    /// ```
    /// use std::alloc::{GlobalAlloc, Layout};
    ///
    /// let alloc = percpu_alloc::PerCpuAlloc::new();
    /// assert!(alloc.stats().busiest_cpus().is_empty()); // nothing happened yet
    /// let layout = Layout::from_size_align(32, 8).unwrap();
    /// // SAFETY: a valid layout; each block is freed with the same one.
    /// unsafe {
    ///     for _ in 0..100 {
    ///         alloc.dealloc(alloc.alloc(layout), layout);
    ///     }
    /// }
    /// let stats = alloc.stats();
    /// let busiest = stats.busiest_cpus();
    /// assert!(busiest.len() <= 8);
    /// let weight = |c: &percpu_alloc::CpuStats| {
    ///     (c.counters.allocs() + c.counters.frees(), c.cached_bytes)
    /// };
    /// assert!(busiest.windows(2).all(|w| weight(&w[0]) >= weight(&w[1])));
    /// ```
    pub fn busiest_cpus(&self) -> &[CpuStats] {
        &self.busiest[..self.busiest_len]
    }
}

/// Bytes as a person reads them.
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = Buf::<24>::new();
        let b = self.0;
        let _ = if b < 1024 {
            write!(buf, "{b} B")
        } else if b < 1 << 20 {
            write!(buf, "{:.1} KiB", b as f64 / 1024.0)
        } else {
            write!(buf, "{:.1} MiB", b as f64 / (1u64 << 20) as f64)
        };
        f.pad(buf.as_str())
    }
}

/// A share as a percentage, "-" when there is nothing to share.
struct Share(u64, u64);

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = Buf::<24>::new();
        let _ = match self.1 {
            0 => write!(buf, "-"),
            n => write!(buf, "{:.1}%", self.0 as f64 * 100.0 / n as f64),
        };
        f.pad(buf.as_str())
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.totals;
        writeln!(
            f,
            "percpu-alloc: {} path, {} CPUs, threshold {}, sizes up to {} cached",
            self.path, self.cpus, self.splice_threshold, self.max_cached_size
        )?;
        writeln!(
            f,
            "  cached now: {} blocks, {} (bound {} per CPU); deferred: {} blocks",
            self.cached_blocks,
            Bytes(self.cached_bytes),
            Bytes(self.cpu_bound_bytes as u64),
            self.deferred_blocks
        )?;
        if !self.counting {
            writeln!(f, "  counters: off (build with the `stats` feature)")?;
        } else {
            writeln!(
                f,
                "  allocs: {}  hits {}  splices {}  misses {}",
                t.allocs(),
                Share(t.hits, t.allocs()),
                Share(t.splices, t.allocs()),
                Share(t.misses, t.allocs())
            )?;
            writeln!(
                f,
                "  frees: {}  task {}  signal {}  other {}  overflows {}  deferred {}  no CPU {}",
                t.frees(),
                t.frees_task,
                t.frees_signal,
                t.frees_other,
                t.overflows,
                t.deferred,
                self.no_cpu
            )?;
        }
        self.fmt_classes(f)?;
        self.fmt_cpus(f)
    }
}

/// Has every registered table's [`Stats`] printed to standard error when
/// the process exits (`PERCPU_STATS`). Registers the exit handler once.
pub(crate) fn print_at_exit() {
    static REGISTERED: AtomicBool = AtomicBool::new(false);
    if !REGISTERED.swap(true, Ordering::AcqRel) {
        // SAFETY: registers a plain function with no preconditions. glibc
        // keeps its first 32 exit handlers in static storage, and beyond
        // them allocates with its own malloc, never with this allocator.
        unsafe { libc::atexit(print_registered) };
    }
}

extern "C" fn print_registered() {
    Table::for_each_registered(|table| {
        let mut out = Stderr::new();
        let _ = write!(out, "{}", Stats::collect(table));
    });
}
