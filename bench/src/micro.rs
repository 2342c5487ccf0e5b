//! Micro-benchmark kernels shared by `src/bin/report.rs` (interleaved
//! ratios) and `benches/micro.rs` (criterion), so that both measure the
//! same code. Each kernel is generic over the allocator and calls its
//! `GlobalAlloc` methods directly, so every allocator runs in one binary,
//! monomorphised, with no dispatch on the measured path.

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;

/// jemalloc's small classes up to the per-CPU cache's largest cached size
/// (1024), then two sizes just past it, which percpu-alloc hands straight
/// to jemalloc.
pub const PAIR_SIZES: [usize; 23] = [
    8, 16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896,
    1024, 1280, 2048,
];

/// Live blocks per batch: below, at and past the cap of 256 blocks per
/// class per CPU.
pub const BATCH_SIZES: [usize; 4] = [100, 256, 1000, 10_000];

/// The size of every block of a batch: one class, so "past the cap" is
/// exact (64 bytes keeps the full cap of 256 under the byte budget).
pub const BATCH_BLOCK: usize = 64;

/// One alloc and its free, `n` times, with a layout known at compile time
/// (as for any `Box<T>`), so the class lookup folds as it does in real code.
#[inline(never)]
fn pair_const<A: GlobalAlloc, const SIZE: usize>(a: &A, n: usize) {
    let layout = match Layout::from_size_align(SIZE, 8) {
        Ok(layout) => layout,
        Err(_) => return,
    };
    for _ in 0..n {
        // SAFETY: a valid non-zero layout; the block is freed at once with
        // the same layout through the same allocator.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            a.dealloc(black_box(p), layout);
        }
    }
}

/// The hot pair for one of [`PAIR_SIZES`], `n` times.
pub fn pair<A: GlobalAlloc>(a: &A, size: usize, n: usize) {
    macro_rules! sizes {
        ($($s:literal)*) => {
            match size {
                $($s => pair_const::<A, $s>(a, n),)*
                _ => panic!("no hot-pair kernel for {size} bytes"),
            }
        };
    }
    sizes!(8 16 32 48 64 80 96 112 128 160 192 224 256 320 384 448 512 640 768 896 1024 1280 2048);
}

/// The order a batch is freed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Last allocated, first freed.
    Lifo,
    /// First allocated, first freed.
    Fifo,
    /// A fixed random permutation.
    Random,
}

impl Order {
    /// All orders, in table order.
    pub const ALL: [Order; 3] = [Order::Lifo, Order::Fifo, Order::Random];

    /// The name used in tables and bench ids.
    pub fn name(self) -> &'static str {
        match self {
            Order::Lifo => "LIFO",
            Order::Fifo => "FIFO",
            Order::Random => "random",
        }
    }
}

/// `n` live blocks of [`BATCH_BLOCK`] bytes, allocated, touched, then
/// freed in a given order. Holds its pointer buffer so that a run makes no
/// allocation of its own.
pub struct Batch {
    order: Vec<usize>,
    held: Vec<*mut u8>,
}

const BATCH_LAYOUT: Layout = match Layout::from_size_align(BATCH_BLOCK, 8) {
    Ok(layout) => layout,
    Err(_) => panic!("64 bytes, align 8, is a valid layout"),
};

impl Batch {
    /// A batch of `n` blocks freed in `order` (random orders come from a
    /// fixed seed, the same for every allocator and run).
    pub fn new(n: usize, order: Order) -> Batch {
        let mut idx: Vec<usize> = (0..n).collect();
        match order {
            Order::Lifo => idx.reverse(),
            Order::Fifo => {}
            Order::Random => {
                let mut rng = crate::rng::Rng(0x9E37_79B9_7F4A_7C15);
                for i in (1..n).rev() {
                    idx.swap(i, rng.below(i + 1));
                }
            }
        }
        Batch {
            order: idx,
            held: vec![std::ptr::null_mut(); n],
        }
    }

    /// Blocks per run.
    pub fn blocks(&self) -> usize {
        self.held.len()
    }

    /// `reps` times: allocate every block, write to it, free them all.
    #[inline(never)]
    pub fn run<A: GlobalAlloc>(&mut self, a: &A, reps: usize) {
        for _ in 0..reps {
            for slot in self.held.iter_mut() {
                // SAFETY: a valid non-zero layout; each block is freed
                // below, once, with the same layout and allocator.
                let p = unsafe { a.alloc(BATCH_LAYOUT) };
                assert!(!p.is_null());
                // SAFETY: `p` is a live block of 64 bytes. Touching it
                // makes every allocator pay for the faults its placement
                // causes.
                unsafe { p.write(1) };
                *slot = black_box(p);
            }
            for &i in &self.order {
                // SAFETY: `held[i]` was allocated above with this layout
                // and `order` is a permutation, so each block is freed
                // exactly once.
                unsafe { a.dealloc(self.held[i], BATCH_LAYOUT) };
            }
        }
    }
}

/// The realloc patterns of growing containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Growth {
    /// `Vec` growth: 8 bytes doubled to 4096 (9 reallocs, crossing from
    /// cached classes to jemalloc's own sizes).
    VecDoubling,
    /// `String` built by short appends with exact reserves: 8 bytes grown
    /// 8 at a time to 512 (63 reallocs, many within one class).
    StringAppend,
}

impl Growth {
    /// Both patterns, in table order.
    pub const ALL: [Growth; 2] = [Growth::VecDoubling, Growth::StringAppend];

    /// The name used in tables and bench ids.
    pub fn name(self) -> &'static str {
        match self {
            Growth::VecDoubling => "Vec doubling 8 B to 4 KiB",
            Growth::StringAppend => "String +8 B to 512 B",
        }
    }

    /// The allocator calls in one growth: one alloc, the reallocs, one free.
    pub fn calls(self) -> usize {
        match self {
            Growth::VecDoubling => 11,
            Growth::StringAppend => 65,
        }
    }

    /// `reps` growths from the first size to the last, checking that
    /// realloc kept the contents, then the free.
    #[inline(never)]
    pub fn run<A: GlobalAlloc>(self, a: &A, reps: usize) {
        let (first, last) = match self {
            Growth::VecDoubling => (8, 4096),
            Growth::StringAppend => (8, 512),
        };
        for _ in 0..reps {
            let mut size = first;
            let mut layout = Layout::from_size_align(size, 8).expect("valid layout");
            // SAFETY: a valid non-zero layout.
            let mut p = unsafe { a.alloc(layout) };
            assert!(!p.is_null());
            // SAFETY: `p` is a live block of `size` >= 8 bytes.
            unsafe { p.write(0xA5) };
            while size < last {
                size = match self {
                    Growth::VecDoubling => size * 2,
                    Growth::StringAppend => size + 8,
                };
                // SAFETY: `p` is live and was allocated with `layout`;
                // `size` is non-zero and small, so it cannot overflow
                // `isize` when rounded to the alignment.
                p = unsafe { a.realloc(p, layout, size) };
                assert!(!p.is_null());
                // SAFETY: realloc returned a live block of `size` bytes
                // that kept the first byte written above.
                assert_eq!(unsafe { p.read() }, 0xA5);
                layout = Layout::from_size_align(size, 8).expect("valid layout");
            }
            // SAFETY: `p` is live with `layout`, freed once.
            unsafe { a.dealloc(black_box(p), layout) };
        }
    }
}
