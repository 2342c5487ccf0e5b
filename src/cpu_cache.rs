//! The per-CPU caches and the table that holds them.
//!
//! The table is one anonymous mapping made on first use: a header with the
//! resolved configuration, then one [`CpuCache`] per possible CPU, each at a
//! power-of-two stride so a restartable sequence finds its CPU's cache with
//! a shift. Zeroed memory is a valid table of empty caches, and the pages of
//! CPUs never used are never touched.

use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

use crate::config::Config;
use crate::free_list::{AtomicList, FRONT_SLOTS};
use crate::size_class::NUM_CLASSES;
use crate::stats::EVENTS;
use crate::Path;

/// Per CPU, per class: the task list and the signal list, then the task
/// list's front slots. The rseq code relies on this layout (256 bytes).
#[repr(C, align(64))]
#[derive(Default)]
pub(crate) struct ClassLists {
    /// The task list (kernel: `free_list`, `nr`). Written only by its CPU's
    /// owner: a restartable sequence on that CPU or the slot holder.
    pub(crate) task: AtomicU64,
    /// The signal list (kernel: `free_list_irq`, `nr_irq`), beside the task
    /// list because a task-list push reads both to check the cap.
    pub(crate) sig: AtomicList,
    /// The rseq path's front slots: the top of the task list, up to
    /// [`FRONT_SLOTS`] blocks held by address beside the list word, whose
    /// bits 58..63 count them. A pop from a slot reads no block and a push
    /// writes none, so short bursts run at the speed of an array stack and
    /// an alloc that follows a free never waits for a link to come back
    /// from memory. Unused on the fallback path.
    pub(crate) front: [AtomicU64; FRONT_SLOTS as usize],
}

/// One CPU's cache.
#[repr(C, align(128))]
pub(crate) struct CpuCache {
    /// At offset 0, so a class's lists are at `class * 256`.
    pub(crate) lists: [ClassLists; NUM_CLASSES],
    /// The fallback path's try-lock.
    pub(crate) slot: AtomicU32,
    /// Blocks freed in signal context past the cap: jemalloc is not
    /// async-signal-safe, so task context hands them back later.
    pub(crate) deferred: AtomicList,
    /// Event counters per class (the `stats` feature; zero without it).
    /// After the lists, so a build without counters never touches their
    /// page.
    pub(crate) counters: [ClassCounters; NUM_CLASSES],
}

/// One class's event counters on one CPU, indexed by
/// [`Event`](crate::stats::Event): one cache line, written only by threads
/// running on that CPU (or just migrated off it).
#[repr(C, align(64))]
pub(crate) struct ClassCounters(pub(crate) [AtomicU64; EVENTS]);

/// log2 of the distance between two CPUs' caches.
pub(crate) const STRIDE_SHIFT: u32 = 14;
const _: () = assert!(core::mem::size_of::<CpuCache>() <= 1 << STRIDE_SHIFT);
const _: () = assert!(core::mem::size_of::<ClassLists>() == 256);
const _: () = assert!(FRONT_SLOTS < 32);
const _: () = assert!(core::mem::size_of::<ClassCounters>() == 64);

/// Bytes before the first CPU's cache.
const HEADER_SIZE: usize = 256;
const _: () = assert!(core::mem::size_of::<Header>() <= HEADER_SIZE);

/// Tables never cover more CPUs than this (Linux's `NR_CPUS` maximum);
/// a larger CPU number is "other" context.
pub(crate) const MAX_CPUS: usize = 8192;

/// What the hot path needs, resolved once when the table is made.
#[repr(C, align(64))]
pub(crate) struct Header {
    /// CPUs covered; a CPU number at or above it is "other" context.
    pub(crate) ncpu: u32,
    /// Splice threshold.
    pub(crate) threshold: u32,
    /// The largest cached size (a class size, or 0).
    pub(crate) max_size: usize,
    /// Offset of the thread's rseq area from the thread pointer.
    pub(crate) rseq_offset: isize,
    /// Which path is live.
    pub(crate) path: Path,
    /// Per-class caps, 0 for classes not cached.
    pub(crate) caps: [u16; NUM_CLASSES],
    /// Length of the mapping.
    len: usize,
    /// The configuration in force: the allocator's, with the environment's
    /// overrides applied.
    pub(crate) config: Config,
    /// Operations that found no usable CPU (no rseq area on the thread, or
    /// a CPU beyond the table), counted with the `stats` feature.
    pub(crate) no_cpu: AtomicU64,
}

impl Header {
    /// The cap of `class`; 0 (everything overflows) for an index out of
    /// range, which cannot happen but must not panic inside an allocator.
    #[inline]
    pub(crate) fn cap(&self, class: usize) -> u32 {
        self.caps.get(class).map_or(0, |&c| c as u32)
    }
}

/// The mapped table. Only ever used through a shared reference: all of its
/// mutable state is atomics.
#[repr(transparent)]
pub(crate) struct Table(Header);

impl Table {
    /// Maps and fills a new table. Returns null if the mapping fails.
    pub(crate) fn create(config: &Config, path: Path, rseq_offset: isize) -> *mut Table {
        // Links written through any table use the secret: pick it before
        // the first table exists.
        crate::hardened::init();
        let ncpu = possible_cpus();
        let len = HEADER_SIZE + (ncpu << STRIDE_SHIFT);
        // SAFETY: an anonymous private mapping asks nothing of its arguments.
        let mem = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if mem == libc::MAP_FAILED {
            return core::ptr::null_mut();
        }
        let mut caps = [0u16; NUM_CLASSES];
        for (class, cap) in caps.iter_mut().enumerate() {
            *cap = config.class_cap(class) as u16;
        }
        let header = Header {
            ncpu: ncpu as u32,
            threshold: config.threshold(),
            max_size: config.cached_size_limit(),
            rseq_offset,
            path,
            caps,
            len,
            config: *config,
            no_cpu: AtomicU64::new(0),
        };
        // SAFETY: the mapping is fresh, page-aligned and longer than the
        // header; the zeroed rest is a valid set of empty caches.
        unsafe { (mem as *mut Header).write(header) };
        mem as *mut Table
    }

    /// Unmaps a table.
    ///
    /// # Safety
    /// `table` came from [`Table::create`] and nothing uses it any more.
    pub(crate) unsafe fn destroy(table: *mut Table) {
        // SAFETY: the caller's contract; `len` is what was mapped.
        unsafe {
            let len = (*table).0.len;
            libc::munmap(table as *mut libc::c_void, len);
        }
    }

    /// The resolved configuration.
    #[inline]
    pub(crate) fn header(&self) -> &Header {
        &self.0
    }

    /// The cache of `cpu`, which must be below `header().ncpu`.
    #[inline]
    pub(crate) fn cpu(&self, cpu: usize) -> &CpuCache {
        debug_assert!(cpu < self.0.ncpu as usize);
        // SAFETY: the mapping covers `ncpu` caches after the header, and a
        // zeroed or used `CpuCache` is always valid (atomics only).
        unsafe { &*(self.cpus_base().add(cpu << STRIDE_SHIFT) as *const CpuCache) }
    }

    /// Address of CPU 0's cache; the rseq code adds `cpu << STRIDE_SHIFT`.
    #[inline]
    pub(crate) fn cpus_base(&self) -> *mut u8 {
        (self as *const Table as *mut u8).wrapping_add(HEADER_SIZE)
    }

    /// The lists of `class` on CPU 0, as the rseq sections take them (they
    /// add the CPU's offset).
    #[inline]
    pub(crate) fn class_base(&self, class: usize) -> *mut u8 {
        self.cpus_base()
            .wrapping_add(class * core::mem::size_of::<ClassLists>())
    }

    /// The CPU numbers this table covers.
    #[inline]
    pub(crate) fn cpus(&self) -> core::ops::Range<usize> {
        0..self.0.ncpu as usize
    }
}

/// Live tables, for the fork handler and the statistics printed at exit.
/// A table that finds no room still works; only those two miss it.
static REGISTRY: [AtomicPtr<Table>; 32] = [const { AtomicPtr::new(core::ptr::null_mut()) }; 32];

impl Table {
    /// Adds a published table to the registry.
    pub(crate) fn register(table: *mut Table) {
        for entry in &REGISTRY {
            let free = core::ptr::null_mut();
            if entry
                .compare_exchange(free, table, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }

    /// Removes a table from the registry before it is unmapped.
    pub(crate) fn unregister(table: *mut Table) {
        for entry in &REGISTRY {
            let _ = entry.compare_exchange(
                table,
                core::ptr::null_mut(),
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    /// Calls `f` on every registered table.
    ///
    /// Tables are unregistered before their allocator unmaps them (in its
    /// `Drop`, which needs `&mut`), so a table seen here stays mapped as
    /// long as no thread drops its allocator meanwhile: the callers run
    /// with one thread (after fork) or at exit.
    pub(crate) fn for_each_registered(mut f: impl FnMut(&Table)) {
        for entry in &REGISTRY {
            let table = entry.load(Ordering::Acquire);
            if !table.is_null() {
                // SAFETY: registered tables are mapped (see above).
                f(unsafe { &*table });
            }
        }
    }
}

impl CpuCache {
    /// Tries to take the slot. Never spins: a busy slot means someone on this
    /// CPU is in the middle of an operation (or was interrupted in one).
    #[inline]
    pub(crate) fn try_lock(&self) -> bool {
        self.slot
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Releases the slot taken by [`CpuCache::try_lock`].
    #[inline]
    pub(crate) fn unlock(&self) {
        self.slot.store(0, Ordering::Release);
    }
}

/// The number of possible CPUs (`nr_cpu_ids`), from sysfs, read with plain
/// system calls into a stack buffer: this runs inside the first `alloc`,
/// where glibc's helpers (which may allocate) must not be called.
fn possible_cpus() -> usize {
    const FALLBACK: usize = 1024;
    let mut buf = [0u8; 512];
    let path = b"/sys/devices/system/cpu/possible\0";
    // SAFETY: `path` is NUL-terminated; `buf` is ours for `read`.
    let n = unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return FALLBACK;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n
    };
    if n <= 0 {
        return FALLBACK;
    }
    match highest_cpu(&buf[..n as usize]) {
        Some(max) => (max + 1).min(MAX_CPUS),
        None => FALLBACK,
    }
}

/// The largest number in a CPU list such as `0-3,8-11\n`.
fn highest_cpu(list: &[u8]) -> Option<usize> {
    let mut max = None;
    let mut current: Option<usize> = None;
    for &b in list {
        if b.is_ascii_digit() {
            let digit = (b - b'0') as usize;
            current = Some(
                current
                    .unwrap_or(0)
                    .saturating_mul(10)
                    .saturating_add(digit),
            );
        } else {
            if let Some(n) = current.take() {
                max = Some(max.map_or(n, |m: usize| m.max(n)));
            }
            if !matches!(b, b'-' | b',' | b'\n' | b' ') {
                return None;
            }
        }
    }
    if let Some(n) = current {
        max = Some(max.map_or(n, |m: usize| m.max(n)));
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(highest_cpu(b"0-15\n"), Some(15));
        assert_eq!(highest_cpu(b"0\n"), Some(0));
        assert_eq!(highest_cpu(b"0-3,8-11"), Some(11));
        assert_eq!(highest_cpu(b"garbage"), None);
        assert_eq!(highest_cpu(b""), None);
    }

    #[test]
    fn this_machine_has_possible_cpus() {
        // SAFETY: sched_getcpu has no preconditions.
        let cpu = unsafe { libc::sched_getcpu() };
        assert!(possible_cpus() > cpu as usize);
    }
}
