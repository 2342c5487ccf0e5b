use percpu_alloc::{Path, PerCpuAlloc};
use std::collections::{BTreeMap, HashMap};

#[global_allocator]
static ALLOC: PerCpuAlloc = PerCpuAlloc::new();

#[test]
fn collections_work_and_the_cache_fills() {
    let mut map = BTreeMap::new();
    let mut hash = HashMap::new();
    for i in 0..100_000u32 {
        map.insert(i.to_string(), vec![i as u8; (i % 300) as usize]);
        hash.insert(i, format!("value {i}"));
        if i % 3 == 0 {
            map.remove(&(i / 2).to_string());
        }
    }
    assert!(map.len() > 60_000);
    assert_eq!(hash[&77], "value 77");
    drop(map);
    let cached: u32 = ALLOC.snapshot().map(|c| c.nr + c.nr_sig).sum();
    eprintln!("path {:?}, cached blocks {cached}", ALLOC.path());
    assert!(cached > 0);
    let expected = std::env::var("PERCPU_EXPECT_PATH").unwrap_or_default();
    if expected == "fallback" {
        assert_eq!(ALLOC.path(), Path::Fallback);
    } else if expected == "rseq" {
        assert_eq!(ALLOC.path(), Path::Rseq);
    }
    let before = ALLOC.cached_bytes();
    let report = ALLOC.trim();
    eprintln!("trim {report:?}, before {before}");
    assert_eq!(report.cpus_skipped, 0);
}
