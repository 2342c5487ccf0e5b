//! A probe binary for the machine-code shape check.
//!
//! It installs `PerCpuAlloc` exactly as a user would, so that rustc emits
//! `__rust_alloc` and `__rust_dealloc` shims that inline the allocator's hot
//! path. The program itself does next to nothing; it exists so that CI can
//! disassemble those two functions and check them with `shape_check`:
//!
//! ```text
//! cargo build --release -p percpu-bench --bin shape_probe
//! cargo run --release -p percpu-bench --bin shape_check -- target/release/shape_probe
//! ```
//!
//! It also holds `shape_probe_box_of_zeros`, for the checker's second
//! check: that a value built before the alloc is still written straight
//! into the block once the hit path is inlined around it.
//!
//! With the `global` feature the crate installs its own global allocator
//! (`percpu_alloc::GLOBAL`), and a second `#[global_allocator]` would not
//! compile; the static is left out then, and the probe disassembles the
//! crate's own one instead, which is the same type.

use std::hint::black_box;

#[cfg(not(feature = "global"))]
#[global_allocator]
static ALLOC: percpu_alloc::PerCpuAlloc = percpu_alloc::PerCpuAlloc::new();

/// `Box::new` of a value built before the allocation, with the hit path
/// inlined between the two, as in any function of the crate that declares
/// the global allocator. The zeros must go straight into the block; a
/// `memcpy` here means the inlined alloc kept LLVM from seeing that
/// nothing between could change the stack copy (see `load_unfenced` in
/// the crate's `src/allocator.rs`).
#[no_mangle]
#[inline(never)]
pub fn shape_probe_box_of_zeros() -> Box<[u8; 256]> {
    Box::new([0u8; 256])
}

fn main() {
    // A small fixed-size box, allocated and freed in a loop: the cache's hit
    // path once it is warm.
    let mut sum = 0u64;
    for i in 0..1000u64 {
        let b = black_box(Box::new([0u8; 64]));
        sum += u64::from(b[(i % 64) as usize]) + i;
        drop(b);
    }
    // A few sizes, so more than one size class (and the large-size path) is
    // reached; black_box keeps them from being optimised away.
    for &len in &[1usize, 24, 100, 500, 4096, 100_000] {
        let v: Vec<u8> = black_box(vec![1u8; len]);
        sum += v.len() as u64;
    }
    let zeros = black_box(shape_probe_box_of_zeros());
    sum += u64::from(zeros[0] | zeros[255]);
    println!("shape_probe: {}", black_box(sum));
}
