//! The `global` feature: this example declares no `#[global_allocator]`;
//! the crate installs `percpu_alloc::GLOBAL` itself.
//!
//! ```text
//! cargo run --release --features global --example global_feature
//! ```

use std::collections::BTreeMap;

fn main() {
    let mut map = BTreeMap::new();
    for i in 0..50_000u32 {
        map.insert(format!("key {i}"), vec![0u8; (i % 200) as usize]);
    }
    map.retain(|_, v| v.len() % 2 == 0);
    let cached: u32 = percpu_alloc::GLOBAL
        .snapshot()
        .map(|c| c.nr + c.nr_sig)
        .sum();
    // The global allocator is ours only if the feature put it there: its
    // caches fill as the map frees.
    assert!(cached > 0, "the global feature did not install PerCpuAlloc");
    println!(
        "global feature: PerCpuAlloc on the {} path, {} blocks cached, {} kept",
        percpu_alloc::GLOBAL.path(),
        cached,
        map.len()
    );
}
