//! `PerCpuAlloc` installed as the global allocator: std collections,
//! alignments from 1 byte to 1 MiB, realloc chains across every class,
//! zeroed memory, zero and huge sizes, which per-CPU path is live, and
//! what the stats and `trim` report (docs/design.md sections 1 to 4 and 9).
//!
//! Every test holds `SERIAL`: some read per-CPU counts of the global
//! allocator, which other tests running at the same time would disturb.

mod common;

use std::alloc::{alloc, alloc_zeroed, dealloc, realloc, GlobalAlloc, Layout};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use common::{
    assert_within_caps, cached, check, cores, expect_pattern, fill, pin, serial, unpin, XorShift,
};
use percpu_alloc::{Config, Path, PerCpuAlloc, CLASS_SIZES, NUM_CLASSES};

#[global_allocator]
static ALLOC: PerCpuAlloc = PerCpuAlloc::new();

static SERIAL: Mutex<()> = Mutex::new(());

/// Alignments through `std::alloc`: every power of two up to a page, then
/// past what any size class can promise.
const ALIGNS: [usize; 16] = [
    1,
    2,
    4,
    8,
    16,
    32,
    64,
    128,
    256,
    512,
    1024,
    2048,
    4096,
    8192,
    65536,
    1 << 20,
];

enum Tree {
    Leaf(u32),
    Node(Box<Tree>, Box<Tree>, u32),
}

fn build(depth: u32, id: u32) -> Box<Tree> {
    if depth == 0 {
        Box::new(Tree::Leaf(id))
    } else {
        Box::new(Tree::Node(
            build(depth - 1, id.wrapping_mul(2)),
            build(depth - 1, id.wrapping_mul(2).wrapping_add(1)),
            id,
        ))
    }
}

/// (nodes, sum of ids): both known in closed form for a full tree.
fn walk(tree: &Tree) -> (u64, u64) {
    match tree {
        Tree::Leaf(id) => (1, *id as u64),
        Tree::Node(l, r, id) => {
            let (a, x) = walk(l);
            let (b, y) = walk(r);
            (a + b + 1, x + y + *id as u64)
        }
    }
}

#[test]
fn std_collections_under_heavy_use() {
    let _serial = serial(&SERIAL);
    let mut rng = XorShift::new(7);

    // Vec<String>: many small strings of every length up to ~100 bytes.
    let words: Vec<String> = (0..50_000)
        .map(|i| format!("w{i}:{}", "x".repeat(i % 97)))
        .collect();
    for (i, w) in words.iter().enumerate() {
        assert_eq!(w.len(), format!("w{i}:").len() + i % 97, "word {i}");
    }
    drop(words);

    // A BTreeMap and a HashMap kept in step under random inserts and
    // removals; each value's content is a function of its key.
    let value = |k: u64| vec![(k % 251) as u8; (k % 700) as usize];
    let mut tree: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut hash: HashMap<u64, String> = HashMap::new();
    for _ in 0..200_000 {
        let k = rng.below(20_000) as u64;
        if rng.chance(60) {
            tree.insert(k, value(k));
            hash.insert(k, k.to_string());
        } else {
            assert_eq!(tree.remove(&k).is_some(), hash.remove(&k).is_some());
        }
    }
    assert_eq!(tree.len(), hash.len());
    for (k, v) in &tree {
        assert_eq!(*v, value(*k), "tree value of {k}");
        assert_eq!(hash[k], k.to_string(), "hash value of {k}");
    }
    drop(tree);
    drop(hash);

    // A VecDeque as a FIFO of boxed slices: frees in allocation order.
    let mut queue: VecDeque<(u64, Box<[u64]>)> = VecDeque::new();
    let (mut pushed, mut popped) = (0u64, 0u64);
    for _ in 0..100_000 {
        if rng.chance(55) {
            let len = rng.log_size(2048);
            queue.push_back((pushed, vec![pushed; len].into_boxed_slice()));
            pushed += 1;
        } else if let Some((n, data)) = queue.pop_front() {
            assert_eq!(n, popped);
            assert!(data.iter().all(|&x| x == n), "queue entry {n} corrupted");
            popped += 1;
        }
    }
    while let Some((n, data)) = queue.pop_front() {
        assert_eq!(n, popped);
        assert!(data.iter().all(|&x| x == n), "queue entry {n} corrupted");
        popped += 1;
    }
    assert_eq!(pushed, popped);

    // Box trees (binary-trees): many same-class blocks, freed recursively.
    for depth in [4u32, 10, 16, 12] {
        let tree = build(depth, 1);
        let nodes = (1u64 << (depth + 1)) - 1;
        // Ids run 1 ..= nodes, one per node.
        assert_eq!(
            walk(&tree),
            (nodes, nodes * (nodes + 1) / 2),
            "depth {depth}"
        );
    }
    let forest: Vec<Box<Tree>> = (0..64).map(|i| build(8, i + 1)).collect();
    for (i, t) in forest.iter().enumerate().rev() {
        assert_eq!(walk(t).0, 511, "tree {i}");
    }
}

#[test]
fn alignments_through_std_alloc() {
    let _serial = serial(&SERIAL);
    for &align in &ALIGNS {
        let sizes = [
            1,
            7,
            8,
            15,
            16,
            24,
            33,
            100,
            128,
            1000,
            1024,
            1025,
            4095,
            4096,
            5000,
            14336,
            20000,
            align,
            align + 1,
            align * 3 - 1,
        ];
        for (si, &size) in sizes.iter().enumerate() {
            let layout = Layout::from_size_align(size, align).unwrap();
            let tag = (align as u64) << 32 | si as u64;
            // Several live at once, so they cannot all be the same block.
            let mut live = Vec::new();
            for k in 0..6 {
                // SAFETY: non-zero size.
                let p = unsafe {
                    if k % 2 == 0 {
                        alloc(layout)
                    } else {
                        alloc_zeroed(layout)
                    }
                };
                assert!(!p.is_null(), "alloc {size} bytes align {align}");
                assert_eq!(p as usize % align, 0, "{size} bytes align {align}: {p:p}");
                if k % 2 == 1 {
                    // SAFETY: `p` holds `size` bytes.
                    let bytes = unsafe { std::slice::from_raw_parts(p, size) };
                    assert!(bytes.iter().all(|&b| b == 0), "alloc_zeroed not zero");
                }
                // SAFETY: `p` holds `size` bytes.
                unsafe { fill(p, size, tag) };
                live.push(p);
            }
            for p in live {
                // SAFETY: allocated above with `layout`, filled, not freed.
                unsafe {
                    expect_pattern(p, size, tag, "aligned block");
                    dealloc(p, layout);
                }
            }
        }
    }
}

/// Exercises a type of alignment `align_of::<T>()` through `Box` and
/// `Vec`, which reach the allocator with that alignment.
fn exercise_aligned<T: Copy + PartialEq + std::fmt::Debug>(make: impl Fn(u8) -> T) {
    let align = std::mem::align_of::<T>();
    let boxes: Vec<Box<T>> = (0..16).map(|i| Box::new(make(i))).collect();
    for (i, b) in boxes.iter().enumerate() {
        let addr = &**b as *const T as usize;
        assert_eq!(addr % align, 0, "Box of align {align} at {addr:#x}");
        assert_eq!(**b, make(i as u8));
    }
    drop(boxes);
    // Growing by push reallocates with the type's alignment each time.
    let mut v: Vec<T> = Vec::new();
    for i in 0..40u8 {
        v.push(make(i));
        assert_eq!(v.as_ptr() as usize % align, 0, "Vec of align {align}");
    }
    v.truncate(3);
    v.shrink_to_fit();
    assert_eq!(
        v.as_ptr() as usize % align,
        0,
        "shrunk Vec of align {align}"
    );
    assert_eq!(v, [make(0), make(1), make(2)]);
}

macro_rules! aligned_types {
    ($($name:ident: $align:literal),* $(,)?) => {
        $(
            #[repr(C, align($align))]
            #[derive(Clone, Copy, Debug, PartialEq)]
            struct $name([u8; 24]);
        )*
        fn exercise_all_aligned_types() {
            $( exercise_aligned(|i| $name([i; 24])); )*
        }
    };
}

aligned_types!(
    A1: 1, A2: 2, A4: 4, A8: 8, A16: 16, A32: 32, A64: 64, A128: 128, A256: 256,
    A512: 512, A1K: 1024, A2K: 2048, A4K: 4096, A8K: 8192, A64K: 65536,
);

/// Too aligned to pass through the stack of a test thread: only ever in
/// the heap.
#[repr(C, align(1048576))]
struct A1M([u8; 64]);

#[test]
fn alignments_through_repr_align_types() {
    let _serial = serial(&SERIAL);
    exercise_all_aligned_types();

    let mut v: Vec<A1M> = Vec::with_capacity(3);
    assert_eq!(v.as_ptr() as usize % (1 << 20), 0);
    // SAFETY: the capacity is 3 elements, all of whose bytes we write
    // before `set_len` (A1M is plain bytes and padding).
    unsafe {
        std::ptr::write_bytes(v.as_mut_ptr(), 0x5a, 3);
        v.set_len(3);
    }
    assert!(v.iter().all(|x| x.0 == [0x5a; 64]));
}

/// Byte `i` of a block's content in a realloc chain: independent of the
/// address, so it must survive moves.
fn chain_byte(seed: u64, i: usize) -> u8 {
    (seed as usize ^ i.wrapping_mul(167) ^ (i >> 8)) as u8
}

/// Reallocates one block through `sizes` in turn with alignment `align`,
/// checking at each step that the common prefix survived and filling the
/// rest.
fn realloc_chain(align: usize, sizes: &[usize], seed: u64) {
    let mut layout = Layout::from_size_align(sizes[0], align).unwrap();
    // SAFETY: sizes are non-zero.
    let mut p = unsafe { alloc(layout) };
    assert!(!p.is_null());
    for i in 0..layout.size() {
        // SAFETY: within the block.
        unsafe { p.add(i).write(chain_byte(seed, i)) };
    }
    for &new_size in &sizes[1..] {
        let old_size = layout.size();
        // SAFETY: `p` is live with `layout`; `new_size` is non-zero and
        // far below isize::MAX.
        let q = unsafe { realloc(p, layout, new_size) };
        assert!(
            !q.is_null(),
            "realloc {old_size} -> {new_size} align {align}"
        );
        assert_eq!(q as usize % align, 0, "realloc lost alignment {align}");
        // SAFETY: `q` holds `new_size` bytes.
        let bytes = unsafe { std::slice::from_raw_parts_mut(q, new_size) };
        for (i, b) in bytes.iter().enumerate().take(old_size.min(new_size)) {
            assert_eq!(
                *b,
                chain_byte(seed, i),
                "realloc {old_size} -> {new_size} align {align}: byte {i} changed"
            );
        }
        for (i, b) in bytes.iter_mut().enumerate().skip(old_size) {
            *b = chain_byte(seed, i);
        }
        p = q;
        layout = Layout::from_size_align(new_size, align).unwrap();
    }
    // SAFETY: `p` is live with `layout`.
    unsafe { dealloc(p, layout) };
}

#[test]
fn realloc_chains_preserve_content() {
    let _serial = serial(&SERIAL);
    // Up through every class boundary (size - 1, size, size + 1) into the
    // large range, then back down the same way.
    let mut up: Vec<usize> = vec![1];
    for &c in CLASS_SIZES.iter() {
        up.extend([c - 1, c, c + 1].into_iter().filter(|&s| s > 0));
    }
    up.extend([16384, 20000, 32768, 40000, 65536]);
    up.dedup();
    let mut down = up.clone();
    down.reverse();
    for (k, &align) in [1usize, 8, 16, 32, 64, 128, 4096, 8192].iter().enumerate() {
        realloc_chain(align, &up, k as u64);
        realloc_chain(align, &down, k as u64 + 100);
        let mut both = up.clone();
        both.extend(&down);
        realloc_chain(align, &both, k as u64 + 200);
    }

    // Random jumps: same class, small to large, large to small, large to
    // large (jemalloc's in-place path).
    let mut rng = XorShift::new(99);
    for round in 0..20 {
        let sizes: Vec<usize> = (0..300).map(|_| rng.log_size(70_000)).collect();
        let align = 1 << rng.below(8);
        realloc_chain(align, &sizes, round);
    }

    // Vec growth and shrinking as programs do it.
    let mut v: Vec<u32> = Vec::new();
    for i in 0..200_000u32 {
        v.push(i ^ 0xa5a5);
    }
    while !v.is_empty() {
        let keep = v.len() / 3;
        v.truncate(keep);
        v.shrink_to_fit();
        for (i, &x) in v.iter().enumerate() {
            assert_eq!(
                x,
                i as u32 ^ 0xa5a5,
                "Vec element {i} after shrinking to {keep}"
            );
        }
    }
}

/// Sizes whose zeroing is checked: every class size, one byte less (the
/// layout is smaller than the block), and large sizes.
fn zeroed_sizes() -> Vec<usize> {
    let mut sizes = Vec::new();
    for &c in CLASS_SIZES.iter() {
        sizes.push(c);
        sizes.push(c - 1);
    }
    sizes.extend([16384, 65536, 1 << 20]);
    sizes.retain(|&s| s > 0);
    sizes
}

#[test]
fn alloc_zeroed_is_zero_even_from_dirty_cached_blocks() {
    let _serial = serial(&SERIAL);
    const N: usize = 24;
    for size in zeroed_sizes() {
        for align in [8, 16, 64] {
            let layout = Layout::from_size_align(size, align).unwrap();
            // Dirty N blocks of the class and free them: they go to the
            // cache (or jemalloc), ready to be handed out again.
            let dirty: Vec<*mut u8> = (0..N)
                .map(|_| {
                    // SAFETY: non-zero size.
                    let p = unsafe { alloc(layout) };
                    assert!(!p.is_null());
                    // SAFETY: `p` holds `size` bytes.
                    unsafe { std::ptr::write_bytes(p, 0xa5, size) };
                    p
                })
                .collect();
            for p in dirty {
                // SAFETY: allocated above with `layout`.
                unsafe { dealloc(p, layout) };
            }
            let zeroed: Vec<*mut u8> = (0..N)
                .map(|_| {
                    // SAFETY: non-zero size.
                    let p = unsafe { alloc_zeroed(layout) };
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0);
                    // SAFETY: `p` holds `size` bytes.
                    let bytes = unsafe { std::slice::from_raw_parts(p, size) };
                    if let Some(at) = bytes.iter().position(|&b| b != 0) {
                        panic!(
                            "alloc_zeroed({size}, {align}): byte {at} is {:#x}",
                            bytes[at]
                        );
                    }
                    p
                })
                .collect();
            for p in zeroed {
                // SAFETY: allocated above with `layout`.
                unsafe { dealloc(p, layout) };
            }
        }
    }
}

#[test]
fn alloc_zeroed_cache_hits_are_zeroed() {
    // The test above cannot tell a hit from a miss. Here a private
    // instance on a pinned CPU makes every alloc_zeroed a counted hit.
    let _serial = serial(&SERIAL);
    let a = PerCpuAlloc::new();
    let cpu = pin(cores()[0]);
    const N: u32 = 12;
    for class in (0..NUM_CLASSES).filter(|&c| served(c)) {
        let cap = Config::new().class_cap(class);
        let size = CLASS_SIZES[class];
        // The largest and the smallest request the class serves.
        let smallest = if class == 0 {
            1
        } else {
            CLASS_SIZES[class - 1] + 1
        };
        for layout_size in [size, smallest] {
            let layout = Layout::from_size_align(layout_size, 8).unwrap();
            // SAFETY: non-zero sizes; every block is freed with `layout`.
            let blocks: Vec<*mut u8> = (0..N).map(|_| unsafe { a.alloc(layout) }).collect();
            for &p in &blocks {
                assert!(!p.is_null());
                // SAFETY: `p` holds the whole class size.
                unsafe {
                    std::ptr::write_bytes(p, 0xff, size);
                    a.dealloc(p, layout);
                }
            }
            let before = a.counts(cpu, class).unwrap();
            if cap > 0 {
                assert_eq!(before.nr, N, "class {class}: frees should be cached");
            }
            for _ in 0..N {
                // SAFETY: non-zero size.
                let p = unsafe { a.alloc_zeroed(layout) };
                assert!(!p.is_null());
                // SAFETY: `p` holds `layout_size` bytes.
                let bytes = unsafe { std::slice::from_raw_parts(p, layout_size) };
                assert!(
                    bytes.iter().all(|&b| b == 0),
                    "class {class}: a zeroed hit of {layout_size} bytes is dirty"
                );
                // SAFETY: allocated just above with `layout`.
                unsafe { a.dealloc(p, layout) };
            }
            let after = a.counts(cpu, class).unwrap();
            // Each alloc_zeroed popped the block the dealloc before pushed.
            assert_eq!(after, before, "class {class}");
            // Empty the class again so the next round starts from zero.
            // SAFETY: as above.
            let again: Vec<*mut u8> = (0..N).map(|_| unsafe { a.alloc(layout) }).collect();
            assert_eq!(a.counts(cpu, class).unwrap().nr, 0, "class {class}");
            for p in again {
                // SAFETY: allocated just above; the cache holds it until
                // the instance is dropped.
                unsafe { a.dealloc(p, layout) };
            }
            a.trim();
        }
    }
    unpin();
}

#[test]
fn zero_size_layouts() {
    let _serial = serial(&SERIAL);
    let mut align = 1;
    while align <= 1 << 20 {
        let layout = Layout::from_size_align(0, align).unwrap();
        let mut live = Vec::new();
        for zeroed in [false, true, false, true] {
            // SAFETY: `GlobalAlloc` leaves zero-sized requests to the
            // implementation, and docs/design.md section 3 promises they never
            // crash: null or a block that `dealloc` takes back.
            let p = unsafe {
                if zeroed {
                    ALLOC.alloc_zeroed(layout)
                } else {
                    ALLOC.alloc(layout)
                }
            };
            if !p.is_null() {
                assert_eq!(p as usize % align, 0, "zero-size alloc, align {align}");
                live.push(p);
            }
        }
        // Non-null zero-size allocations are real blocks: two at the same
        // address would put one block on a free list twice.
        let mut sorted = live.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            live.len(),
            "zero-size blocks alias (align {align})"
        );
        for p in live {
            // SAFETY: from `ALLOC` with `layout`, not freed yet.
            unsafe { ALLOC.dealloc(p, layout) };
        }
        align *= 2;
    }
}

#[test]
fn alignments_up_to_2_pow_29() {
    let _serial = serial(&SERIAL);
    // Beyond what `alignments_through_std_alloc` covers: jemalloc maps such
    // requests with `mallocx(MALLOCX_ALIGN)`, reserving address space of
    // about the alignment: aligned, usable memory.
    for shift in 20..=29 {
        let align = 1usize << shift;
        for size in [1, 64, align, align + 1] {
            let layout = Layout::from_size_align(size, align).unwrap();
            for zeroed in [false, true] {
                // SAFETY: non-zero size.
                let p = unsafe {
                    if zeroed {
                        ALLOC.alloc_zeroed(layout)
                    } else {
                        ALLOC.alloc(layout)
                    }
                };
                // At most 1 GiB of address space, never touched but at
                // both ends: jemalloc has no reason to refuse.
                assert!(!p.is_null(), "alloc({size}, {align}) failed");
                assert_eq!(p as usize % align, 0, "alloc({size}, {align}) misaligned");
                // SAFETY: `p` holds `size` bytes.
                unsafe {
                    if zeroed {
                        assert_eq!(p.read(), 0);
                        assert_eq!(p.add(size - 1).read(), 0);
                    }
                    p.write(1);
                    p.add(size - 1).write(2);
                    ALLOC.dealloc(p, layout);
                }
            }
        }
    }
}

#[test]
fn huge_sizes_fail_cleanly() {
    let _serial = serial(&SERIAL);
    // Sizes no allocator can serve: past jemalloc's largest class, or
    // larger than the whole 47-bit user address space.
    let impossible = [
        (isize::MAX as usize - 4096, 8),
        (isize::MAX as usize - 4096, 16),
        (isize::MAX as usize - (1 << 20) * 2, 1 << 20),
        (1 << 62, 8),
        (1 << 47, 8),
        (1 << 47, 4096),
    ];
    for (size, align) in impossible {
        let layout = Layout::from_size_align(size, align).unwrap();
        // SAFETY: non-zero size; the result is only compared to null.
        let (p, z) = unsafe { (alloc(layout), alloc_zeroed(layout)) };
        assert!(p.is_null(), "alloc({size:#x}, {align}) = {p:p}");
        assert!(z.is_null(), "alloc_zeroed({size:#x}, {align}) = {z:p}");
    }

    // 1 TiB fits in the address space, and jemalloc maps with
    // MAP_NORESERVE where the kernel overcommits, so it may succeed: then
    // the block must be aligned and usable at both ends.
    for align in [8, 4096] {
        let layout = Layout::from_size_align(1 << 40, align).unwrap();
        // SAFETY: non-zero size.
        let p = unsafe { alloc(layout) };
        if !p.is_null() {
            assert_eq!(p as usize % align, 0);
            // SAFETY: `p` holds 1 TiB; touching two pages of it.
            unsafe {
                p.write(1);
                p.add((1 << 40) - 1).write(2);
                dealloc(p, layout);
            }
        }
    }

    // Realloc to an impossible size fails and leaves the block as it was,
    // whether it started small (cached) or large.
    for start in [100usize, 1024, 5000, 100_000] {
        let layout = Layout::from_size_align(start, 8).unwrap();
        // SAFETY: non-zero size.
        let p = unsafe { alloc(layout) };
        assert!(!p.is_null());
        // SAFETY: `p` holds `start` bytes.
        unsafe { fill(p, start, 1) };
        for new_size in [isize::MAX as usize - 4096, 1 << 62, 1 << 47] {
            // SAFETY: `p` is live with `layout`; `new_size` rounded up to 8
            // stays below isize::MAX.
            let q = unsafe { realloc(p, layout, new_size) };
            assert!(q.is_null(), "realloc({start} -> {new_size:#x}) = {q:p}");
            // SAFETY: the failed realloc left `p` live.
            unsafe { expect_pattern(p, start, 1, "block after a failed realloc") };
        }
        // SAFETY: still live with `layout`.
        unsafe { dealloc(p, layout) };
    }

    // The largest layouts `Layout` accepts, for every alignment up to 2^29:
    // size + alignment padding is exactly isize::MAX.
    for shift in 0..=29 {
        let align = 1usize << shift;
        let layout = Layout::from_size_align(isize::MAX as usize - (align - 1), align).unwrap();
        // SAFETY: non-zero size; the result is only compared to null.
        let (p, z) = unsafe { (ALLOC.alloc(layout), ALLOC.alloc_zeroed(layout)) };
        assert!(p.is_null() && z.is_null(), "largest layout, align {align}");
    }

    // A realloc whose new size, rounded up to the alignment, would pass
    // isize::MAX breaks the caller's side of the contract; the allocator
    // still answers null and keeps the block rather than wrap around.
    for (size, align) in [(8usize, 4096usize), (64, 64), (3000, 1 << 16)] {
        let layout = Layout::from_size_align(size, align).unwrap();
        // SAFETY: non-zero size.
        let p = unsafe { ALLOC.alloc(layout) };
        assert!(!p.is_null());
        // SAFETY: `p` holds `size` bytes.
        unsafe { fill(p, size, 2) };
        // SAFETY: see above: the point is that the contract is broken and
        // the allocator notices.
        let q = unsafe { ALLOC.realloc(p, layout, isize::MAX as usize - align / 2) };
        assert!(q.is_null(), "wrapping realloc, align {align}: {q:p}");
        // SAFETY: the failed realloc left `p` live.
        unsafe {
            expect_pattern(p, size, 2, "block after a wrapping realloc");
            ALLOC.dealloc(p, layout);
        }
    }

    // And through std: fallible reservations report the failure.
    let mut v = vec![7u8; 100];
    assert!(v.try_reserve(isize::MAX as usize - 4096).is_err());
    assert!(v.try_reserve(1 << 47).is_err());
    assert!(v.try_reserve_exact(1 << 62).is_err());
    assert_eq!(v, [7u8; 100]);
}

/// Whether glibc registered rseq for this process (and this crate has an
/// rseq path for the target).
#[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
fn glibc_registered_rseq() -> bool {
    extern "C" {
        static __rseq_size: u32;
    }
    // SAFETY: glibc 2.35+ defines it and never changes it after start-up.
    unsafe { __rseq_size > 0 }
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu")))]
fn glibc_registered_rseq() -> bool {
    false
}

#[test]
fn the_expected_path_is_live() {
    let _serial = serial(&SERIAL);
    let expected = match std::env::var("PERCPU_EXPECT_PATH").as_deref() {
        Ok("rseq") => Path::Rseq,
        Ok("fallback") => Path::Fallback,
        Ok(other) => panic!("PERCPU_EXPECT_PATH must be rseq or fallback, not {other:?}"),
        // Unset (a user's `cargo test`): whatever this system offers. CI
        // sets the variable, so there a missing rseq path fails.
        Err(_) => {
            if glibc_registered_rseq() {
                Path::Rseq
            } else {
                Path::Fallback
            }
        }
    };
    assert_eq!(ALLOC.path(), expected, "the global allocator's path");
    // A fresh instance decides the same way; a forced one never uses rseq.
    assert_eq!(PerCpuAlloc::new().path(), expected);
    assert_eq!(
        PerCpuAlloc::with_config(Config::new().with_force_fallback(true)).path(),
        Path::Fallback
    );
    eprintln!("per-CPU path: {}", ALLOC.path());
}

/// Fills the caches of the calling thread's CPU: for every cached class,
/// more blocks than the cap are allocated, then all freed.
/// Whether requests land in `class`: with the `hardened` feature 8-byte
/// requests are served from the 16-byte class, and the 8-byte class stays
/// empty.
fn served(class: usize) -> bool {
    !(cfg!(feature = "hardened") && class == 0)
}

fn fill_caches_here(rng: &mut XorShift) {
    for (class, &size) in CLASS_SIZES.iter().enumerate() {
        let cap = ALLOC.config().class_cap(class) as usize;
        if cap == 0 || !served(class) {
            continue;
        }
        let layout = Layout::from_size_align(size - rng.below(size.min(8)), 8).unwrap();
        let blocks: Vec<*mut u8> = (0..cap + 20)
            .map(|_| {
                // SAFETY: non-zero size.
                let p = unsafe { alloc(layout) };
                assert!(!p.is_null());
                // SAFETY: `p` holds `layout.size()` bytes.
                unsafe { fill(p, layout.size(), class as u64) };
                p
            })
            .collect();
        for p in blocks {
            // SAFETY: allocated above with `layout`.
            unsafe {
                expect_pattern(p, layout.size(), class as u64, "filler block");
                dealloc(p, layout);
            }
        }
    }
}

#[test]
fn snapshot_bounds_and_trim_matches_the_snapshot() {
    let _serial = serial(&SERIAL);
    let cores = cores();
    let mut rng = XorShift::new(3);
    let mut last = String::new();
    // Exact counts need a quiet process, and this one is only nearly so:
    // libtest's main thread records the previous test's result while this
    // one starts. A genuine mismatch repeats, so a few tries; the bounds
    // must hold every time.
    for attempt in 1..=5 {
        // Fill the caches of every CPU in turn; the trim below runs on the
        // first CPU and must still reach the others (docs/design.md section 4).
        let mut short = Vec::new();
        for &core in cores.iter().rev() {
            let cpu = pin(core);
            fill_caches_here(&mut rng);
            for class in 0..NUM_CLASSES {
                let c = ALLOC.counts(cpu, class).unwrap();
                assert_eq!(c.cap, ALLOC.config().class_cap(class), "class {class}");
                assert!(
                    c.nr + c.nr_sig <= c.cap + 1,
                    "CPU {cpu} class {class}: {c:?}"
                );
                if c.nr + c.nr_sig < c.cap && served(class) {
                    short.push(c);
                }
            }
        }
        assert_within_caps(&ALLOC);
        let (blocks, bytes) = cached(&ALLOC);
        let bytes_reported = ALLOC.cached_bytes();
        let report = ALLOC.trim();
        let (left, _) = cached(&ALLOC);
        assert_eq!(report.cpus_skipped, 0, "{report:?}");
        if short.is_empty()
            && report.blocks == blocks
            && report.bytes == bytes
            && bytes_reported == bytes
            && left == 0
        {
            eprintln!("trim matched the snapshot ({blocks} blocks) on attempt {attempt}");
            unpin();
            return;
        }
        last = format!(
            "lists short of their cap after overfilling: {short:?}; snapshot {blocks} blocks, \
             {bytes} bytes; cached_bytes {bytes_reported}; {report:?}; {left} blocks left after"
        );
    }
    panic!("5 attempts, the last: {last}");
}

#[test]
fn patterns_detect_corruption() {
    // The pattern check the other binaries rely on must be able to fail.
    let _serial = serial(&SERIAL);
    let mut buf = vec![0u8; 100];
    let p = buf.as_mut_ptr();
    // SAFETY: `buf` holds 100 bytes.
    unsafe {
        fill(p, 100, 5);
        assert_eq!(check(p, 100, 5), None);
        assert_eq!(check(p, 100, 6), Some(0), "another tag must not match");
        *p.add(97) ^= 1;
        assert_eq!(check(p, 100, 5), Some(97));
    }
}
