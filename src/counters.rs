//! The event counters of the `stats` feature: one per CPU, class and
//! event, in the CPU's record of the class. Without the feature every
//! count compiles to nothing and the records have no counters.

use core::sync::atomic::Ordering;

use crate::table::{Record, Table};

/// What the caches count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub(crate) enum Event {
    Hit,
    Splice,
    Miss,
    FreeTask,
    FreeSignal,
    FreeOther,
    Overflow,
    Deferred,
}

/// How many kinds of [`Event`] there are: the counters each record holds.
/// `Deferred` is the last kind; a new one goes before it.
#[cfg(feature = "stats")]
pub(crate) const EVENTS: usize = Event::Deferred as usize + 1;

/// Whether this build counts events (the `stats` feature).
pub(crate) const COUNTING: bool = cfg!(feature = "stats");

/// Counts `event` in `rec` (`None`: no usable CPU, counted in the
/// table's header).
///
/// A relaxed `fetch_add`: the line is its CPU's own, so it is uncontended
/// but for a thread that moved between finding the record and counting,
/// and a count is never lost.
#[inline(always)]
pub(crate) fn count(t: &Table, rec: Option<&Record>, event: Event) {
    #[cfg(feature = "stats")]
    match rec {
        Some(rec) => rec.counters[event as usize].fetch_add(1, Ordering::Relaxed),
        None => t.header().no_cpu.fetch_add(1, Ordering::Relaxed),
    };
    #[cfg(not(feature = "stats"))]
    let _ = (t, rec, event);
}

/// The counter of `event` in `rec` (0 without the `stats` feature).
#[inline]
pub(crate) fn read(rec: &Record, event: Event) -> u64 {
    #[cfg(feature = "stats")]
    return rec.counters[event as usize].load(Ordering::Relaxed);
    #[cfg(not(feature = "stats"))]
    {
        let _ = (rec, event, Ordering::Relaxed);
        0
    }
}
