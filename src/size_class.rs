//! jemalloc's small size classes, and the mapping from a `Layout` to one.
//!
//! The cache only ever holds blocks of exactly the size jemalloc would have
//! handed out for the same request. That keeps a flush a plain sized free of
//! the class size, and it means the cache changes no block's size, so the
//! memory a program uses is what it would use under jemalloc alone.

/// The small size classes of jemalloc 5 on x86_64 and aarch64 with 4 KiB
/// pages (`LG_QUANTUM = 4`, `LG_PAGE = 12`): one tiny class, then four
/// classes per doubling. A test checks each against jemalloc's `nallocx`.
///
/// ```
/// use percpu_alloc::{CLASS_SIZES, NUM_CLASSES};
///
/// assert_eq!(CLASS_SIZES.len(), NUM_CLASSES);
/// assert!(CLASS_SIZES.windows(2).all(|w| w[0] < w[1]));
/// // A 100-byte request is served by a 112-byte block.
/// assert_eq!(CLASS_SIZES.iter().find(|&&size| size >= 100), Some(&112));
/// ```
pub const CLASS_SIZES: [usize; NUM_CLASSES] = [
    8, 16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896,
    1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192, 10240, 12288,
    14336,
];

/// How many small classes there are; the largest cacheable size is the last.
///
/// ```
/// use percpu_alloc::{PerCpuAlloc, NUM_CLASSES};
///
/// let alloc = PerCpuAlloc::new();
/// assert!(alloc.counts(0, NUM_CLASSES - 1).is_some());
/// assert!(alloc.counts(0, NUM_CLASSES).is_none());
/// ```
pub const NUM_CLASSES: usize = 36;

/// The largest size the cache can be configured to hold (jemalloc's largest
/// small class). Everything above it is a large allocation in jemalloc.
///
/// ```
/// use percpu_alloc::{Config, CLASS_SIZES, MAX_CACHEABLE_SIZE};
///
/// assert_eq!(MAX_CACHEABLE_SIZE, *CLASS_SIZES.last().unwrap());
/// let all = Config::new().with_max_cached_size(usize::MAX);
/// assert_eq!(all.max_cached_size(), MAX_CACHEABLE_SIZE);
/// ```
pub const MAX_CACHEABLE_SIZE: usize = CLASS_SIZES[NUM_CLASSES - 1];

/// Small regions sit at multiples of their size from a page-aligned slab,
/// so no class promises more than a page.
const PAGE: usize = 4096;

/// A size class: an index into [`CLASS_SIZES`] that only [`class_of`]
/// (and [`Class::from_index`] for the introspection API) can make, so
/// every `Class` is in range and nothing that takes one needs a branch
/// for one that is not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Class(u8);

impl Class {
    /// Class `i`, if there is one.
    #[inline]
    pub(crate) const fn from_index(i: usize) -> Option<Class> {
        if i < NUM_CLASSES {
            Some(Class(i as u8))
        } else {
            None
        }
    }

    /// Every class, smallest first.
    pub(crate) fn all() -> impl Iterator<Item = Class> {
        (0..NUM_CLASSES as u8).map(Class)
    }

    /// Its index in [`CLASS_SIZES`].
    #[inline(always)]
    pub(crate) const fn index(self) -> usize {
        let i = self.0 as usize;
        // SAFETY: a `Class` is only made below `NUM_CLASSES` (see above).
        unsafe { core::hint::assert_unchecked(i < NUM_CLASSES) };
        i
    }

    /// The size of its blocks.
    #[inline(always)]
    pub(crate) const fn size(self) -> usize {
        CLASS_SIZES[self.index()]
    }

    /// The alignment every block of the class has: the largest power of
    /// two that divides its size, at most a page.
    #[inline]
    pub(crate) const fn align(self) -> usize {
        let natural = 1usize << self.size().trailing_zeros();
        if natural < PAGE {
            natural
        } else {
            PAGE
        }
    }
}

/// `LOOKUP[(size + 7) / 8]` is the class of `size`; entry 0 (size 0) maps to
/// the smallest class, so a zero-sized request still gets a real block.
/// A `const`, not a `static`: where the size is known at compile time (a
/// `Box<T>`), the compiler folds the lookup away.
const LOOKUP: [u8; LOOKUP_LEN] = build_lookup();
const LOOKUP_LEN: usize = MAX_CACHEABLE_SIZE / 8 + 1;

const fn build_lookup() -> [u8; LOOKUP_LEN] {
    let mut table = [0u8; LOOKUP_LEN];
    let mut i = 0;
    let mut class = 0;
    while i < table.len() {
        while CLASS_SIZES[class] < i * 8 {
            class += 1;
        }
        table[i] = class as u8;
        i += 1;
    }
    table
}

/// Where `size`, at most [`MAX_CACHEABLE_SIZE`], is in [`LOOKUP`].
#[inline(always)]
fn size_index(size: usize) -> usize {
    let i = (size + 7) >> 3;
    debug_assert!(size <= MAX_CACHEABLE_SIZE);
    // SAFETY: callers pass at most MAX_CACHEABLE_SIZE, so `i` is at most
    // MAX_CACHEABLE_SIZE / 8, the last entry: this drops the bounds checks
    // and their panic branches from the allocation path.
    unsafe { core::hint::assert_unchecked(i < LOOKUP_LEN) };
    i
}

/// The class of `size`, which must be at most [`MAX_CACHEABLE_SIZE`].
#[inline(always)]
pub(crate) fn lookup(size: usize) -> Class {
    Class(LOOKUP[size_index(size)])
}

/// The class serving a request of `size` bytes, or `None` past the largest.
#[inline]
pub(crate) fn class_of_size(size: usize) -> Option<Class> {
    if size <= MAX_CACHEABLE_SIZE {
        Some(lookup(size))
    } else {
        None
    }
}

/// The size a request is served with: the `hardened` feature keeps a key
/// in every cached block's second word, so it serves 8-byte requests from
/// the 16-byte class.
#[inline(always)]
pub(crate) const fn served_size(size: usize) -> usize {
    if cfg!(feature = "hardened") && size < 16 {
        16
    } else {
        size
    }
}

/// The class for a layout, if one whose size is below `limit` (one more
/// than the largest cached size, or 0 when nothing is cached) guarantees
/// its alignment; `None` sends the request to jemalloc unchanged.
///
/// `alloc` and `dealloc` both call this with the same layout, so a block is
/// always returned to the class it came from.
#[inline(always)]
pub(crate) fn class_of(size: usize, align: usize, limit: usize) -> Option<Class> {
    if align <= 8 {
        // Every class is at least 8-aligned: the common case is one lookup.
        let size = served_size(size);
        if size < limit {
            // `limit` is at most MAX_CACHEABLE_SIZE + 1.
            debug_assert!(limit <= MAX_CACHEABLE_SIZE + 1);
            return Some(lookup(size));
        }
        return None;
    }
    class_of_aligned(size, align, limit)
}

#[cold]
pub(crate) fn class_of_aligned(size: usize, align: usize, limit: usize) -> Option<Class> {
    if align > PAGE || size >= limit {
        return None;
    }
    // As jemalloc does for aligned small requests: round the size up to a
    // multiple of the alignment, then take the class of that.
    let rounded = (size.max(1) + align - 1) & !(align - 1);
    if rounded >= limit {
        return None;
    }
    let class = class_of_size(rounded)?;
    if class.align() >= align {
        Some(class)
    } else {
        None
    }
}

/// The largest class whose size is at most `max_size`, if any.
pub(crate) const fn last_class_within(max_size: usize) -> Option<Class> {
    let mut class = NUM_CLASSES;
    while class > 0 {
        if CLASS_SIZES[class - 1] <= max_size {
            return Some(Class((class - 1) as u8));
        }
        class -= 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_rounds_up_to_the_next_class() {
        for size in 0..=MAX_CACHEABLE_SIZE {
            let class = class_of_size(size).unwrap();
            assert!(class.size() >= size.max(1));
            if class.index() > 0 {
                let below = Class::from_index(class.index() - 1).unwrap();
                assert!(below.size() < size, "size {size}");
            }
        }
        assert_eq!(class_of_size(MAX_CACHEABLE_SIZE + 1), None);
    }

    #[test]
    fn classes_match_jemalloc() {
        for (class, &size) in CLASS_SIZES.iter().enumerate() {
            // SAFETY: nallocx only computes a size; it touches no memory.
            let usable = unsafe { tikv_jemalloc_sys::nallocx(size, 0) };
            assert_eq!(usable, size, "class {class}");
            if class + 1 < NUM_CLASSES {
                // SAFETY: as above.
                let next = unsafe { tikv_jemalloc_sys::nallocx(size + 1, 0) };
                assert_eq!(next, CLASS_SIZES[class + 1]);
            }
        }
    }

    #[test]
    fn classes_are_in_range_and_only_there() {
        assert_eq!(Class::all().count(), NUM_CLASSES);
        assert!(Class::all().all(|c| Class::from_index(c.index()) == Some(c)));
        assert_eq!(Class::from_index(NUM_CLASSES), None);
    }

    #[test]
    fn aligned_layouts_get_a_class_that_honours_them() {
        let mut align = 1;
        while align <= 8192 {
            for size in [
                0, 1, 7, 8, 9, 33, 100, 129, 500, 1000, 1024, 3000, 4096, 9000,
            ] {
                match class_of(size, align, MAX_CACHEABLE_SIZE + 1) {
                    Some(class) => {
                        assert!(class.size() >= size);
                        assert!(class.align() >= align, "size {size} align {align}");
                    }
                    None => assert!(align > 8 || size > MAX_CACHEABLE_SIZE),
                }
            }
            align *= 2;
        }
        // Aligned small requests land where jemalloc puts them.
        assert_eq!(class_of(100, 64, 4097).map(Class::size), Some(128));
        assert_eq!(class_of(1, 16, 4097).map(Class::size), Some(16));
        assert_eq!(class_of(320, 64, 4097).map(Class::size), Some(320));
    }

    #[test]
    fn max_size_limits_caching() {
        assert_eq!(class_of(1024, 8, 1025).map(Class::size), Some(1024));
        assert_eq!(class_of(1025, 8, 1025), None);
        // Nothing cached: not even a zero-sized request.
        assert_eq!(class_of(0, 8, 0), None);
        assert_eq!(class_of(0, 64, 0), None);
        // The `hardened` feature serves 8 bytes from the 16-byte class,
        // which a limit of 9 does not cache.
        assert_eq!(class_of(8, 8, 9).is_some(), !cfg!(feature = "hardened"));
        assert_eq!(last_class_within(1024).map(Class::size), Some(1024));
        assert_eq!(last_class_within(1000).map(Class::size), Some(896));
        assert_eq!(last_class_within(7), None);
    }
}
