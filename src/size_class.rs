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
/// let all = Config::new().max_cached_size(usize::MAX);
/// assert_eq!(all.cached_size_limit(), MAX_CACHEABLE_SIZE);
/// ```
pub const MAX_CACHEABLE_SIZE: usize = CLASS_SIZES[NUM_CLASSES - 1];

/// Small regions sit at multiples of their size from a page-aligned slab,
/// so no class promises more than a page.
const PAGE: usize = 4096;

/// Index of a size class in [`CLASS_SIZES`].
pub type Class = usize;

/// `LOOKUP[(size + 7) / 8]` is the class of `size`; entry 0 (size 0) maps to
/// the smallest class, so a zero-sized request still gets a real block.
/// A `const`, not a `static`: where the size is known at compile time (a
/// `Box<T>`), the compiler folds the lookup away. Padded to a power of two
/// so that [`lookup`] indexes it with a mask instead of a bounds check,
/// which leaves no panic path in `alloc` and `dealloc`.
const LOOKUP: [u8; LOOKUP_LEN] = build_lookup();
const LOOKUP_LEN: usize = 2048;
const _: () = assert!(MAX_CACHEABLE_SIZE / 8 < LOOKUP_LEN);

const fn build_lookup() -> [u8; LOOKUP_LEN] {
    let mut table = [0u8; LOOKUP_LEN];
    let mut i = 0;
    let mut class = 0;
    while i < table.len() {
        // Past the largest class (padding, never looked up) stay there.
        while class + 1 < NUM_CLASSES && CLASS_SIZES[class] < i * 8 {
            class += 1;
        }
        table[i] = class as u8;
        i += 1;
    }
    table
}

/// The class of `size`, which must be at most [`MAX_CACHEABLE_SIZE`].
#[inline(always)]
fn lookup(size: usize) -> Class {
    LOOKUP[((size + 7) >> 3) & (LOOKUP_LEN - 1)] as Class
}

/// The size of blocks of `class`; 0 for a number that is no class. Classes
/// only come from [`class_of`], so that never happens, but it keeps a panic
/// branch out of every caller on the allocation path.
#[inline]
pub const fn class_size(class: Class) -> usize {
    if class < NUM_CLASSES {
        CLASS_SIZES[class]
    } else {
        0
    }
}

/// The alignment every block of `class` has: the largest power of two that
/// divides its size, at most a page.
#[inline]
pub const fn class_align(class: Class) -> usize {
    let natural = 1usize << CLASS_SIZES[class].trailing_zeros();
    if natural < PAGE {
        natural
    } else {
        PAGE
    }
}

/// The class serving a request of `size` bytes, or `None` past the largest.
#[inline]
pub fn class_of_size(size: usize) -> Option<Class> {
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
const fn served_size(size: usize) -> usize {
    if cfg!(feature = "hardened") && size < 16 {
        16
    } else {
        size
    }
}

/// The class for a layout, if one of at most `max_size` bytes guarantees
/// its alignment; `None` sends the request to jemalloc unchanged.
///
/// `alloc` and `dealloc` both call this with the same layout, so a block is
/// always returned to the class it came from.
#[inline]
pub fn class_of(size: usize, align: usize, max_size: usize) -> Option<Class> {
    if align <= 8 {
        // Every class is at least 8-aligned: the common case is one lookup.
        if size <= max_size {
            // `max_size` is a class size, at most MAX_CACHEABLE_SIZE.
            return Some(lookup(served_size(size)));
        }
        return None;
    }
    class_of_aligned(size, align, max_size)
}

#[cold]
fn class_of_aligned(size: usize, align: usize, max_size: usize) -> Option<Class> {
    if align > PAGE || size > max_size {
        return None;
    }
    // As jemalloc does for aligned small requests: round the size up to a
    // multiple of the alignment, then take the class of that.
    let rounded = (size.max(1) + align - 1) & !(align - 1);
    if rounded > max_size {
        return None;
    }
    let class = class_of_size(rounded)?;
    if class_align(class) >= align {
        Some(class)
    } else {
        None
    }
}

/// The largest class whose size is at most `max_size`, if any.
pub const fn last_class_within(max_size: usize) -> Option<Class> {
    let mut class = NUM_CLASSES;
    while class > 0 {
        if CLASS_SIZES[class - 1] <= max_size {
            return Some(class - 1);
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
            assert!(class_size(class) >= size.max(1));
            if class > 0 {
                assert!(class_size(class - 1) < size, "size {size}");
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
    fn aligned_layouts_get_a_class_that_honours_them() {
        let mut align = 1;
        while align <= 8192 {
            for size in [
                0, 1, 7, 8, 9, 33, 100, 129, 500, 1000, 1024, 3000, 4096, 9000,
            ] {
                match class_of(size, align, MAX_CACHEABLE_SIZE) {
                    Some(class) => {
                        assert!(class_size(class) >= size);
                        assert!(class_align(class) >= align, "size {size} align {align}");
                    }
                    None => assert!(align > 8 || size > MAX_CACHEABLE_SIZE),
                }
            }
            align *= 2;
        }
        // Aligned small requests land where jemalloc puts them.
        assert_eq!(class_of(100, 64, 4096).map(class_size), Some(128));
        assert_eq!(class_of(1, 16, 4096).map(class_size), Some(16));
        assert_eq!(class_of(320, 64, 4096).map(class_size), Some(320));
    }

    #[test]
    fn max_size_limits_caching() {
        assert_eq!(class_of(1024, 8, 1024).map(class_size), Some(1024));
        assert_eq!(class_of(1025, 8, 1024), None);
        assert_eq!(last_class_within(1024).map(class_size), Some(1024));
        assert_eq!(last_class_within(1000).map(class_size), Some(896));
        assert_eq!(last_class_within(7), None);
    }
}
