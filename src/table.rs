//! The per-CPU caches: one anonymous mapping made on first use.
//!
//! ```text
//! Table (HEADER_AT bytes into a page-aligned mapping; the rseq sections
//! read the parts marked *, and take the header's fields as operands)
//! +0            Header        rseq_offset, size_limit, rec_off[class], caps[class], ...
//! +BY_SIZE      *by_size[size] u32: the record offset of each size's class, one load from size to record
//! +CAP_BY_SIZE  *cap_by_size[size] u64: the cap of each size's class, for the push to compare in place
//! +BASES        *bases[ncpu]  each CPU's region, so a section finds it in one load
//! +page         Region 0      CpuHead (the fallback's try-lock, the deferred list), then one Record per cached class
//! ...           Region 1, ... each `region_size` bytes, page-aligned
//!
//! Record (one CPU, one class), at region + rec_off[class]
//! +0   *task      TaskWord: how many blocks the slots hold, or a chain
//! +8   *sig       the signal list (a ListWord, pushed lock-free)
//! +16  (spare)
//! +32  counters   the `stats` feature's event counters (64 bytes), else absent
//! +REC_HDR *slots[cap]  the task list's blocks, bottom first
//! ```
//!
//! The rseq sections in `crate::rseq` read this layout; every offset they
//! use is a `const` operand taken from here.
//!
//! Zeroed memory is a valid table of empty caches, and the pages of CPUs
//! never used are never touched.
//!
//! Invariants, for every CPU and class (`|l|` is the length of list `l`):
//! - `nr == task.len()` (the slots below it, or the chain's length);
//! - `nr_sig == |sig|`, exact in the word;
//! - `nr + nr_sig <= cap`, but for the documented drift of one when a
//!   signal-list push races a task-list push from another thread
//!   ([`crate::rules`]);
//! - a block is on at most one list, in at most one slot below `nr`.

use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

use crate::config::Config;
#[cfg(feature = "stats")]
use crate::counters::EVENTS;
use crate::list::{AtomicList, ListWord, COUNT_SHIFT, PTR_MASK};
use crate::percpu::Path;
use crate::size_class::{
    class_of_aligned, lookup, served_size, Class, MAX_CACHEABLE_SIZE, NUM_CLASSES,
};

/// One task list, in one word. Written only by its CPU's owner: a
/// restartable sequence on that CPU or the holder of the CPU's slot (and a
/// drain that follows the drain-bit protocol, `crate::drain`).
///
/// ```text
/// slots:  [0:1][0:63 len]                   len blocks in the record's slots
/// chain:  [1][0][1][0:13 len][48 head]      a spliced signal list (SPECIAL | CHAIN | ListWord)
/// drain:  [1][1][chain?][...]               either of the above, taken by a drain
/// ```
///
/// Every state that is not a plain slot count has the top bit set, so the
/// hot sections need one signed test (pop: `word > 0`) or one unsigned
/// compare (push: `word + nr_sig < cap`) to refuse all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub(crate) struct TaskWord(u64);

/// Not a plain slot count.
pub(crate) const SPECIAL: u64 = 1 << 63;
/// A drain owns the list (with [`SPECIAL`]).
pub(crate) const DRAIN: u64 = 1 << 62;
/// The list is a chain of linked blocks, spliced from a signal list (with
/// [`SPECIAL`]).
pub(crate) const CHAIN: u64 = 1 << 61;
/// The length of a chain, in the 13 bits above its head, under [`CHAIN`].
pub(crate) const CHAIN_LEN_MASK: u64 = (1 << 13) - 1;
/// The bits of a chain's list word inside a task word.
pub(crate) const CHAIN_LIST: u64 = PTR_MASK | CHAIN_LEN_MASK << COUNT_SHIFT;
const _: () = assert!((Config::MAX_CAP as u64) < CHAIN_LEN_MASK);
/// The sections read the three flag bits as one number: the task word
/// shifted right by `FLAG_SHIFT` is [`CHAIN_FLAGS`] exactly for a chain no
/// drain owns.
pub(crate) const FLAG_SHIFT: u32 = 61;
pub(crate) const CHAIN_FLAGS: u64 = (SPECIAL | CHAIN) >> FLAG_SHIFT;
const _: () = assert!(
    (SPECIAL | DRAIN | CHAIN) >> FLAG_SHIFT == 0b111
        && CHAIN_LIST >> FLAG_SHIFT == 0
        && CHAIN_LEN_MASK << COUNT_SHIFT < CHAIN
);

impl TaskWord {
    /// No blocks.
    pub(crate) const EMPTY: TaskWord = TaskWord(0);

    /// `n` blocks in the slots.
    #[inline]
    pub(crate) const fn slots(n: u32) -> TaskWord {
        TaskWord(n as u64)
    }

    /// A chain: the task list is `list`, linked.
    #[inline]
    pub(crate) fn chain(list: ListWord) -> TaskWord {
        debug_assert!(list.bits() & !CHAIN_LIST == 0 && !list.is_empty());
        TaskWord(SPECIAL | CHAIN | list.bits())
    }

    /// The word as stored.
    #[inline]
    pub(crate) const fn bits(self) -> u64 {
        self.0
    }

    /// `nr`: the blocks on the list, however they are held, drained or not.
    #[inline]
    pub(crate) fn len(self) -> u32 {
        if self.0 & CHAIN != 0 {
            ListWord::from_bits(self.0 & CHAIN_LIST).len()
        } else {
            (self.0 & !(SPECIAL | DRAIN)) as u32
        }
    }

    /// The slot count, if the list is held in slots and no drain has it.
    #[inline]
    pub(crate) fn in_slots(self) -> Option<u32> {
        (self.0 & SPECIAL == 0).then_some(self.0 as u32)
    }

    /// The chain, if the list is one and no drain has it.
    #[inline]
    pub(crate) fn in_chain(self) -> Option<ListWord> {
        (self.0 & (SPECIAL | CHAIN | DRAIN) == SPECIAL | CHAIN)
            .then(|| ListWord::from_bits(self.0 & CHAIN_LIST))
    }

    /// Whether a drain owns the list.
    #[inline]
    pub(crate) const fn is_draining(self) -> bool {
        self.0 & DRAIN != 0
    }

    /// The word a drain stores to own this list.
    #[inline]
    pub(crate) const fn drained(self) -> TaskWord {
        TaskWord(self.0 | SPECIAL | DRAIN)
    }

    /// The list as it was before [`TaskWord::drained`].
    #[inline]
    pub(crate) fn undrained(self) -> TaskWord {
        if self.0 & CHAIN != 0 {
            TaskWord(self.0 & !DRAIN)
        } else {
            TaskWord(self.0 & !(SPECIAL | DRAIN))
        }
    }

    /// Whether a pop can take the top slot: there is one, and the list is
    /// plain. The rseq pop section tests exactly this (`test; jle`).
    #[inline(always)]
    pub(crate) const fn can_pop_slot(self) -> bool {
        (self.0 as i64) > 0
    }

    /// Whether a push can fill the next slot: the list is plain and
    /// `nr + nr_sig < cap` (rule 1 of free). The rseq push section tests
    /// exactly this (`add; cmp; jae`): a special word is at least 2^63, so
    /// no cap admits it.
    #[inline(always)]
    pub(crate) const fn can_push_slot(self, nr_sig: u32, cap: u64) -> bool {
        self.0 + (nr_sig as u64) < cap
    }
}

/// A task word in memory.
#[repr(transparent)]
#[derive(Default)]
pub(crate) struct AtomicTaskWord(AtomicU64);

impl AtomicTaskWord {
    #[inline]
    pub(crate) fn load(&self) -> TaskWord {
        TaskWord(self.0.load(Ordering::Acquire))
    }

    #[inline]
    pub(crate) fn store(&self, w: TaskWord) {
        self.0.store(w.0, Ordering::Release)
    }

    /// For drains only: the owner's stores are plain, so a drain marks the
    /// word with a CAS and then fences the owner (`crate::drain`).
    #[inline]
    pub(crate) fn compare_exchange(&self, old: TaskWord, new: TaskWord) -> bool {
        self.0
            .compare_exchange(old.0, new.0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }
}

/// One CPU's lists of one class. The slots follow it in memory.
#[repr(C)]
pub(crate) struct Record {
    /// The task list (kernel: `free_list`, `nr`).
    pub(crate) task: AtomicTaskWord,
    /// The signal list (kernel: `free_list_irq`, `nr_irq`).
    pub(crate) sig: AtomicList,
    _spare: [u64; 2],
    /// Event counters (the `stats` feature), indexed by
    /// [`Event`](crate::counters::Event).
    #[cfg(feature = "stats")]
    pub(crate) counters: [AtomicU64; EVENTS],
}

/// Bytes from a record to its first slot; the sections use it as an
/// operand.
pub(crate) const REC_HDR: usize = core::mem::size_of::<Record>();
const _: () = assert!(REC_HDR.is_multiple_of(8));
#[cfg(feature = "stats")]
const _: () = assert!(EVENTS * 8 <= 64);
/// Offsets of the record's words, as the sections address them.
pub(crate) const TASK_OFF: usize = core::mem::offset_of!(Record, task);
pub(crate) const SIG_OFF: usize = core::mem::offset_of!(Record, sig);
/// Where a CPU's deferred list is in its region.
pub(crate) const DEFERRED_OFF: usize = core::mem::offset_of!(CpuHead, deferred);
/// Where the `hardened` secret sits in the table, for the slot sections.
#[cfg(feature = "hardened")]
pub(crate) const SECRET_OFF: usize = core::mem::offset_of!(Header, secret);
const _: () = assert!(TASK_OFF == 0 && SIG_OFF == 8);

impl Record {
    /// Slot `i` of this record.
    ///
    /// # Safety
    /// `i` is below the record's cap (the layout gave it that many slots).
    #[inline]
    pub(crate) unsafe fn slot(&self, i: u32) -> &AtomicPtr<u8> {
        // SAFETY: the caller's contract; the slots follow the record in
        // the mapping, 8-aligned, and a zeroed or used slot is a valid
        // `AtomicPtr`.
        unsafe {
            &*((self as *const Record as *const u8).add(REC_HDR + 8 * i as usize)
                as *const AtomicPtr<u8>)
        }
    }
}

/// The start of each CPU's region.
#[repr(C, align(64))]
pub(crate) struct CpuHead {
    /// The fallback's try-lock.
    pub(crate) slot: AtomicU32,
    /// Blocks of any class freed in signal context past the cap: jemalloc
    /// is not async-signal-safe, so task context hands them back on its
    /// next miss or overflow on this CPU. Not cached, not counted in
    /// `nr + nr_sig`.
    pub(crate) deferred: AtomicList,
}

/// Where the lookup by size starts: the header's room.
const BY_SIZE: usize = 1024;
const _: () = assert!(core::mem::size_of::<Header>() <= BY_SIZE);
/// Entries of the lookups by size: every size up to the largest class.
const BY_SIZE_LEN: usize = MAX_CACHEABLE_SIZE + 1;
/// Where the caps by size start.
pub(crate) const CAP_BY_SIZE: usize = (BY_SIZE + 4 * BY_SIZE_LEN).next_multiple_of(64);
/// Where the bases start.
pub(crate) const BASES: usize = (CAP_BY_SIZE + 8 * BY_SIZE_LEN).next_multiple_of(64);
const PAGE: usize = 4096;

/// Where the table starts in its mapping: half a page in, so that the
/// header's first line, which every alloc and free reads, is not at page
/// offset 0. That is where the first block of every fresh jemalloc slab
/// is, so in a young process the hot blocks share their low 12 address
/// bits with it, and with the header there the hot pair took 1.16x as
/// long and a batch of 100 live blocks 1.3-1.5x in most processes
/// (docs/design.md, "Where the header sits").
const HEADER_AT: usize = PAGE / 2;

/// Tables never cover more CPUs than this (Linux's `NR_CPUS` maximum).
pub(crate) const MAX_CPUS: usize = 8192;

/// What the hot paths need, resolved once when the table is made.
#[repr(C, align(64))]
pub(crate) struct Header {
    /// Offset of the thread's rseq area from the thread pointer.
    pub(crate) rseq_offset: isize,
    /// Sizes below this are cached: one more than the largest cached size,
    /// or 0 when nothing is.
    pub(crate) size_limit: usize,
    /// The largest cached size (a class size, or 0).
    pub(crate) max_size: usize,
    /// The `hardened` feature's secret (0 without it), copied here so
    /// that the hit paths read it beside the words they read anyway.
    pub(crate) secret: u64,
    /// Where each class's record sits in a CPU's region (classes cached).
    pub(crate) rec_off: [usize; NUM_CLASSES],
    /// Per-class caps, 0 for classes not cached; 64-bit, as the push
    /// section compares them.
    pub(crate) caps: [u64; NUM_CLASSES],
    /// CPUs covered: on the rseq path every possible CPU; on the
    /// fallback a CPU number at or above it is "other" context.
    pub(crate) ncpu: u32,
    /// Splice threshold.
    pub(crate) threshold: u32,
    /// Classes with a record (the first `classes`).
    pub(crate) classes: usize,
    /// Which path is live.
    pub(crate) path: Path,
    /// Bytes per CPU region.
    region_size: usize,
    /// Length of the mapping.
    len: usize,
    /// The configuration in force: the allocator's, with the environment's
    /// overrides applied.
    pub(crate) config: Config,
    /// Operations that found no usable CPU, counted with the `stats`
    /// feature.
    pub(crate) no_cpu: AtomicU64,
}

/// The mapped table. Only ever used through a shared reference: all of its
/// mutable state is atomics.
#[repr(transparent)]
pub(crate) struct Table(Header);

/// The table an allocator points at before its own is made: its size
/// limit of 0 sends every request to the out-of-line paths, which make the
/// real one. Pointing at it instead of at null spares each hot path a null
/// test; nothing but the header's first words is ever read from it.
pub(crate) static UNMADE: Table = Table(Header {
    rseq_offset: 0,
    size_limit: 0,
    max_size: 0,
    secret: 0,
    rec_off: [0; NUM_CLASSES],
    caps: [0; NUM_CLASSES],
    ncpu: 0,
    threshold: 0,
    classes: 0,
    path: Path::Rseq,
    region_size: 0,
    len: 0,
    config: Config::new(),
    no_cpu: AtomicU64::new(0),
});

impl Table {
    /// [`UNMADE`] as the allocator stores it.
    #[inline(always)]
    pub(crate) const fn unmade() -> *mut Table {
        &raw const UNMADE as *mut Table
    }
}

/// A request the cache serves, as the hot paths carry it: where its
/// class's record sits in every CPU's region, and the request's size, from
/// which the out-of-line paths recover the class (through its
/// [`served_size`], which the hit paths never compute).
///
/// The size comes first, and the layout is C's, so that a site passed on
/// keeps the size in the register the request's size arrived in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct Site {
    /// A size whose served size is of the class.
    size: usize,
    /// The record's offset in a CPU's region.
    pub(crate) rec_off: usize,
}

impl Site {
    /// The class.
    #[inline(always)]
    pub(crate) fn class(self) -> Class {
        lookup(served_size(self.size))
    }

    /// A size of the class, non-zero: jemalloc serves and frees it as a
    /// block of the class.
    #[inline(always)]
    pub(crate) fn size(self) -> usize {
        served_size(self.size).max(1)
    }

    /// The size as the lookups by size index it (below the table's size
    /// limit, so in range): the request's own, since each entry holds its
    /// served class's.
    #[inline(always)]
    pub(crate) fn lookup_index(self) -> usize {
        self.size
    }
}

/// Where a configuration puts its records, and how long a region is.
struct Geometry {
    rec_off: [usize; NUM_CLASSES],
    caps: [u64; NUM_CLASSES],
    classes: usize,
    region_size: usize,
}

impl Geometry {
    fn of(config: &Config) -> Geometry {
        let mut g = Geometry {
            rec_off: [0; NUM_CLASSES],
            caps: [0; NUM_CLASSES],
            classes: config.cached_classes(),
            region_size: 0,
        };
        let mut at = core::mem::size_of::<CpuHead>();
        for class in Class::all().take(g.classes) {
            let cap = config.class_cap(class.index());
            g.caps[class.index()] = cap as u64;
            g.rec_off[class.index()] = at;
            // A line per record's words at least, so two records' words
            // never share one.
            at += (REC_HDR + 8 * cap as usize).next_multiple_of(64);
        }
        g.region_size = at.next_multiple_of(PAGE);
        g
    }
}

/// Sizes below this are cached: one more than the largest cached size, or
/// 0 when nothing is.
///
/// The hit paths compare a request's own size with it, not its
/// [`served_size`]: the two agree for every limit above 16, and with
/// `hardened` a limit of 16 or less (the 8-byte class alone, which that
/// feature never serves) caches nothing, so it is 0.
fn header_limit(g: &Geometry, config: &Config) -> usize {
    let max = config.max_cached_size();
    match g.classes {
        0 => 0,
        _ if served_size(max) > max => 0,
        _ => max + 1,
    }
}

impl Table {
    /// Maps and fills a new table for `ncpu` CPUs. Returns null if the
    /// mapping fails.
    pub(crate) fn create(
        config: &Config,
        path: Path,
        rseq_offset: isize,
        ncpu: usize,
    ) -> *mut Table {
        // Links written through any table use the secret: pick it before
        // the first table exists.
        crate::hardened::init();
        let ncpu = ncpu.clamp(1, MAX_CPUS);
        let g = Geometry::of(config);
        let regions = (HEADER_AT + BASES + 8 * ncpu).next_multiple_of(PAGE);
        let len = regions + ncpu * g.region_size;
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
        let header = Header {
            rseq_offset,
            size_limit: header_limit(&g, config),
            max_size: config.max_cached_size(),
            secret: crate::hardened::secret(),
            rec_off: g.rec_off,
            caps: g.caps,
            ncpu: ncpu as u32,
            threshold: config.splice_threshold(),
            classes: g.classes,
            path,
            region_size: g.region_size,
            len,
            config: *config,
            no_cpu: AtomicU64::new(0),
        };
        let mem = mem as *mut u8;
        // SAFETY: the mapping is fresh, page-aligned and holds, from
        // `HEADER_AT` on, the header, the lookup by size and the bases, and
        // from `regions` on `ncpu` regions; the zeroed rest is a valid set
        // of empty caches.
        unsafe {
            let base = mem.add(HEADER_AT);
            (base as *mut Header).write(header);
            let by_size = base.add(BY_SIZE) as *mut u32;
            let cap_by_size = base.add(CAP_BY_SIZE) as *mut u64;
            for size in 0..header_limit(&g, config) {
                let class = lookup(served_size(size)).index();
                by_size.add(size).write(g.rec_off[class] as u32);
                cap_by_size.add(size).write(g.caps[class]);
            }
            let bases = base.add(BASES) as *mut *mut u8;
            for cpu in 0..ncpu {
                bases.add(cpu).write(mem.add(regions + cpu * g.region_size));
            }
            base as *mut Table
        }
    }

    /// Unmaps a table.
    ///
    /// # Safety
    /// `table` came from [`Table::create`] and nothing uses it any more.
    pub(crate) unsafe fn destroy(table: *mut Table) {
        // SAFETY: the caller's contract; the mapping starts `HEADER_AT`
        // before the table and is `len` bytes long.
        unsafe {
            let len = (*table).0.len;
            libc::munmap((table as *mut u8).sub(HEADER_AT).cast(), len);
        }
    }

    /// The resolved configuration.
    #[inline(always)]
    pub(crate) fn header(&self) -> &Header {
        &self.0
    }

    /// The table's address, as the sections take it.
    #[inline(always)]
    pub(crate) fn addr(&self) -> *const u8 {
        self as *const Table as *const u8
    }

    /// The start of `cpu`'s region, which must be below `header().ncpu`.
    #[inline]
    fn region(&self, cpu: usize) -> *const u8 {
        debug_assert!(cpu < self.0.ncpu as usize);
        // SAFETY: the bases are at `BASES`, one per CPU, written once when
        // the table was made.
        unsafe { *(self.addr().add(BASES) as *const *const u8).add(cpu) }
    }

    /// The head of `cpu`'s region, which must be below `header().ncpu`.
    #[inline]
    pub(crate) fn cpu(&self, cpu: usize) -> &CpuHead {
        // SAFETY: each region starts with a `CpuHead`; zeroed or used, it is
        // valid (atomics only).
        unsafe { &*(self.region(cpu) as *const CpuHead) }
    }

    /// `cpu`'s record of `class`, if the class is cached; `cpu` must be
    /// below `header().ncpu`.
    #[inline]
    pub(crate) fn record(&self, cpu: usize, class: Class) -> Option<&Record> {
        if class.index() >= self.0.classes {
            return None;
        }
        Some(self.record_at(cpu, self.0.rec_off[class.index()]))
    }

    /// Where a request of `size` bytes aligned to at most 8 is cached, if
    /// it is: one compare and one load.
    #[inline(always)]
    pub(crate) fn site(&self, size: usize) -> Option<Site> {
        // The request's own size: see `header_limit`.
        if size >= self.0.size_limit {
            return None;
        }
        // SAFETY: `size_limit` is at most `BY_SIZE_LEN`, and every entry
        // below it was written when the table was made.
        let rec_off = unsafe { *(self.addr().add(BY_SIZE) as *const u32).add(size) } as usize;
        Some(Site { rec_off, size })
    }

    /// Where a request aligned to more than 8 is cached, if it is.
    #[inline]
    pub(crate) fn site_aligned(&self, size: usize, align: usize) -> Option<Site> {
        class_of_aligned(size, align, self.0.size_limit).map(|class| self.site_of(class))
    }

    /// Where a block of `class` is freed to, if this table caches it: for
    /// every class a block can be taken for, the site `site(class.size())`
    /// finds, without the lookup by size (with `hardened`, 8-byte requests
    /// are served by the 16-byte class, so no block is of the 8-byte one).
    #[cfg(any(feature = "override", test))]
    #[inline(always)]
    pub(crate) fn site_of_class(&self, class: Class) -> Option<Site> {
        // Below the limit, the class is cached (`header_limit`).
        (class.size() < self.0.size_limit).then(|| self.site_of(class))
    }

    /// Where blocks of `class`, a cached class, are.
    #[inline]
    pub(crate) fn site_of(&self, class: Class) -> Site {
        debug_assert!(class.index() < self.0.classes);
        Site {
            rec_off: self.0.rec_off[class.index()],
            size: class.size(),
        }
    }

    /// The record at `rec_off` in `cpu`'s region; `cpu` must be below
    /// `header().ncpu` and `rec_off` a cached class's.
    #[inline]
    pub(crate) fn record_at(&self, cpu: usize, rec_off: usize) -> &Record {
        // SAFETY: `Geometry::of` placed a record at this offset of every
        // region; zeroed or used, it is valid (atomics only).
        unsafe { &*(self.region(cpu).add(rec_off) as *const Record) }
    }

    /// The head of the region `rec` is in, `rec` being the record at
    /// `rec_off` of some CPU.
    #[inline]
    pub(crate) fn head_of<'t>(&'t self, rec: &'t Record, rec_off: usize) -> &'t CpuHead {
        // SAFETY: a record at `rec_off` of a region is `rec_off` bytes past
        // the region's start, where its `CpuHead` is.
        unsafe { &*((rec as *const Record as *const u8).sub(rec_off) as *const CpuHead) }
    }

    /// The cap of `class` (0 for a class not cached).
    #[inline]
    pub(crate) fn cap(&self, class: Class) -> u32 {
        self.0.caps[class.index()] as u32
    }

    /// The cached classes.
    #[inline]
    pub(crate) fn classes(&self) -> impl Iterator<Item = Class> {
        Class::all().take(self.0.classes)
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

impl CpuHead {
    /// Tries to take the slot. Never spins: a busy slot means someone on this
    /// CPU is in the middle of an operation (or was interrupted in one).
    #[inline]
    pub(crate) fn try_lock(&self) -> bool {
        self.slot
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Releases the slot taken by [`CpuHead::try_lock`].
    #[inline]
    pub(crate) fn unlock(&self) {
        self.slot.store(0, Ordering::Release);
    }
}

/// The number of possible CPUs (`nr_cpu_ids`), from sysfs, read with plain
/// system calls into a stack buffer: this runs inside the first `alloc`,
/// where glibc's helpers (which may allocate) must not be called. `None`
/// where sysfs cannot say, or says more than [`MAX_CPUS`].
pub(crate) fn possible_cpus() -> Option<usize> {
    let mut buf = [0u8; 512];
    let path = b"/sys/devices/system/cpu/possible\0";
    // SAFETY: `path` is NUL-terminated; `buf` is ours for `read`.
    let n = unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return None;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n
    };
    if n <= 0 {
        return None;
    }
    let max = highest_cpu(&buf[..n as usize])?;
    (max < MAX_CPUS).then_some(max + 1)
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
        assert!(possible_cpus().unwrap() > cpu as usize);
    }

    #[test]
    fn task_words_say_what_they_hold() {
        let block = 0x7000_0000_1230usize as *mut u8;
        let list = ListWord::new(block, 5);
        let chain = TaskWord::chain(list);
        assert_eq!(
            (chain.len(), chain.in_chain(), chain.in_slots()),
            (5, Some(list), None)
        );
        let slots = TaskWord::slots(7);
        assert_eq!(
            (slots.len(), slots.in_slots(), slots.in_chain()),
            (7, Some(7), None)
        );
        for w in [chain, slots, TaskWord::EMPTY] {
            let d = w.drained();
            assert!(d.is_draining() && d.in_slots().is_none() && d.in_chain().is_none());
            assert_eq!((d.len(), d.undrained()), (w.len(), w));
        }
    }

    #[test]
    fn the_hot_checks_refuse_every_special_word() {
        let chain = TaskWord::chain(ListWord::new(0x1000 as *mut u8, 1));
        for w in [
            chain,
            chain.drained(),
            TaskWord::slots(3).drained(),
            TaskWord::EMPTY.drained(),
        ] {
            assert!(!w.can_pop_slot() && !w.can_push_slot(0, u32::MAX as u64));
        }
        assert!(!TaskWord::EMPTY.can_pop_slot());
        assert!(TaskWord::slots(1).can_pop_slot());
        // Rule 1 of free at the boundary: nr + nr_sig against the cap.
        assert!(TaskWord::slots(200).can_push_slot(55, 256));
        assert!(!TaskWord::slots(200).can_push_slot(56, 256));
        assert!(!TaskWord::EMPTY.can_push_slot(0, 0));
    }

    /// `f` on a one-CPU table for each of a range of size limits, among
    /// them the 8-byte class alone, which `hardened` does not cache.
    fn for_each_limit(mut f: impl FnMut(usize, &Config, &Table)) {
        for max in [0, 8, 16, 24, 256, MAX_CACHEABLE_SIZE] {
            let config = Config::new().with_max_cached_size(max);
            let t = Table::create(&config, Path::Fallback, 0, 1);
            assert!(!t.is_null());
            // SAFETY: just made, destroyed below.
            f(max, &config, unsafe { &*t });
            // SAFETY: nothing else uses it.
            unsafe { Table::destroy(t) };
        }
    }

    #[test]
    fn every_cached_size_finds_its_served_class() {
        // The hit paths look up a request's own size; what they find must
        // be its served size's class, record and cap, and a size whose
        // served size is not cached must find nothing (with `hardened`, a
        // table of the 8-byte class alone caches nothing at all).
        for_each_limit(|max, config, table| {
            let g = Geometry::of(config);
            for size in 0..=MAX_CACHEABLE_SIZE + 1 {
                let served = served_size(size);
                let class = lookup(served.min(MAX_CACHEABLE_SIZE));
                let cached = served <= config.max_cached_size() && class.index() < g.classes;
                let site = table.site(size);
                assert_eq!(site.is_some(), cached, "max {max}, size {size}");
                let Some(site) = site else { continue };
                assert_eq!(site.rec_off, g.rec_off[class.index()], "size {size}");
                assert_eq!(site.class(), class, "size {size}");
                assert_eq!(lookup(site.size()), class, "size {size}");
                assert!(site.size() >= 16 || !cfg!(feature = "hardened"));
                // SAFETY: `lookup_index()` is below the limit, inside the caps.
                let cap = unsafe {
                    *(table.addr().add(CAP_BY_SIZE) as *const u64).add(site.lookup_index())
                };
                assert_eq!(cap, g.caps[class.index()], "size {size}");
            }
        });
    }

    #[test]
    fn a_class_finds_the_site_its_size_finds() {
        for_each_limit(|max, _, table| {
            for class in Class::all() {
                let by_size = table.site(class.size());
                let by_class = table.site_of_class(class);
                match by_size {
                    // `hardened`'s 8-byte requests: the 16-byte class, so
                    // no block is ever of the 8-byte one.
                    Some(site) if site.class() != class => {
                        assert!(cfg!(feature = "hardened") && class.size() == 8);
                    }
                    _ => assert_eq!(
                        by_class.map(|s| (s.rec_off, s.size())),
                        by_size.map(|s| (s.rec_off, s.size())),
                        "max {max}, class {}",
                        class.size()
                    ),
                }
            }
        });
    }

    #[test]
    fn every_record_gets_its_cap_in_slots() {
        for config in [
            Config::new(),
            Config::new()
                .with_cap(1000)
                .with_max_cached_size(1 << 20)
                .with_cpu_byte_budget(1 << 30),
            Config::new().with_cap(0),
        ] {
            let g = Geometry::of(&config);
            let mut end = core::mem::size_of::<CpuHead>();
            for class in Class::all().take(g.classes) {
                let i = class.index();
                assert_eq!(g.rec_off[i], end, "records are packed in order");
                assert_eq!(g.caps[i], config.class_cap(i) as u64);
                end = g.rec_off[i] + (REC_HDR + 8 * g.caps[i] as usize).next_multiple_of(64);
            }
            assert!(end <= g.region_size && g.region_size.is_multiple_of(PAGE));
        }
    }
}
