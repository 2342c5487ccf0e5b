//! Introspection: which per-CPU path is live, what each cache holds, and
//! what trimming released. Everything here reads the caches in place and
//! allocates nothing, so it can be called from anywhere, including while
//! the allocator is the global one and other threads use it.

use core::sync::atomic::Ordering;

use crate::cpu_cache::Table;
use crate::free_list::task_len;
use crate::size_class::{class_size, Class, NUM_CLASSES};

/// How the allocator keeps each CPU's task lists to itself.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    /// Restartable sequences: no locks, no atomics on the task lists.
    Rseq,
    /// A try-lock per CPU, CPU from `sched_getcpu()`.
    Fallback,
}

impl core::fmt::Display for Path {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Path::Rseq => "rseq",
            Path::Fallback => "fallback",
        })
    }
}

/// The lengths of one CPU's lists for one class.
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
    pub fn bytes(&self) -> usize {
        (self.nr as usize + self.nr_sig as usize) * self.class_size
    }
}

pub(crate) fn counts(table: &Table, cpu: usize, class: Class) -> ListCounts {
    let lists = &table.cpu(cpu).lists[class];
    ListCounts {
        cpu,
        class,
        class_size: class_size(class),
        nr: task_len(lists.task.load(Ordering::Relaxed)),
        nr_sig: lists.sig.len(),
        cap: table.header().caps[class] as u32,
    }
}

/// The non-empty lists of every CPU, one [`ListCounts`] per CPU and class,
/// read as the iterator goes (each entry is a moment's reading, not a
/// consistent cut). From [`PerCpuAlloc::snapshot`](crate::PerCpuAlloc::snapshot).
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
            while self.class < NUM_CLASSES {
                let class = self.class;
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
