//! fork() while other threads churn through the allocator (docs/design.md
//! section 6, "Fork"): the child inherits the per-CPU caches mid-operation, with
//! only the forking thread left, and must still allocate, free and exit
//! cleanly.

mod common;

use std::alloc::{alloc, dealloc, Layout};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{check, expect_pattern, fill, Watchdog, XorShift};
use percpu_alloc::{PerCpuAlloc, CLASS_SIZES};

#[global_allocator]
static ALLOC: PerCpuAlloc = PerCpuAlloc::new();

const FORKS: usize = 50;
const CHURNERS: usize = 3;
const CHILD_LIMIT: Duration = Duration::from_secs(10);

/// Allocates and frees blocks of every size up to 64 KiB, checking each
/// block's pattern before its free, until `stop`.
fn churn(id: usize, stop: Arc<AtomicBool>, ops: Arc<AtomicUsize>) {
    let mut rng = XorShift::new(id as u64 + 11);
    let mut live: Vec<(usize, Layout, u64)> = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let layout = Layout::from_size_align(rng.log_size(64 * 1024), 8).unwrap();
        // SAFETY: non-zero size; freed below with the same layout.
        let p = unsafe { alloc(layout) };
        assert!(!p.is_null());
        let tag = (id as u64) << 48 | n;
        n += 1;
        // SAFETY: `p` holds `layout.size()` bytes.
        unsafe { fill(p, layout.size(), tag) };
        live.push((p as usize, layout, tag));
        if live.len() > 500 {
            for _ in 0..250 {
                let (p, layout, tag) = live.swap_remove(rng.below(live.len()));
                // SAFETY: live with `layout`, filled with `tag`.
                unsafe {
                    expect_pattern(p as *const u8, layout.size(), tag, "churned block");
                    dealloc(p as *mut u8, layout);
                }
            }
        }
        ops.fetch_add(1, Ordering::Relaxed);
    }
    for (p, layout, tag) in live {
        // SAFETY: as above.
        unsafe {
            expect_pattern(p as *const u8, layout.size(), tag, "churned block");
            dealloc(p as *mut u8, layout);
        }
    }
}

/// What the child checks; 0 when all is well, else which check failed.
/// Runs with one thread in a copy of a busy process: no locks that another
/// thread could have held, no output.
fn child_checks(round: usize) -> i32 {
    let v: Vec<u64> = (0..10_000).collect();
    if v.iter().sum::<u64>() != 49_995_000 {
        return 10;
    }
    let mut s = String::new();
    for k in 0..2_000 {
        s.push_str(&k.to_string());
        s.push(',');
    }
    if s.split(',').filter(|x| !x.is_empty()).count() != 2_000 {
        return 11;
    }
    let mut m: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    for k in 0..5_000u32 {
        m.insert(k, vec![k as u8; k as usize % 300]);
    }
    m.retain(|k, _| k % 2 == 1);
    if m.len() != 2_500 || m.iter().any(|(k, v)| v.len() != *k as usize % 300) {
        return 12;
    }
    drop((v, s, m));

    // Every class, from caches that other threads were using when the
    // process was copied.
    for (class, &size) in CLASS_SIZES.iter().enumerate() {
        let layout = Layout::from_size_align(size, 8).unwrap();
        let tag = (round as u64) << 32 | class as u64;
        let blocks: Vec<*mut u8> = (0..40)
            .map(|_| {
                // SAFETY: non-zero size.
                let p = unsafe { alloc(layout) };
                if !p.is_null() {
                    // SAFETY: `p` holds `size` bytes.
                    unsafe { fill(p, size, tag) };
                }
                p
            })
            .collect();
        for p in blocks {
            if p.is_null() {
                return 13;
            }
            // SAFETY: live with `layout`, filled with `tag`.
            if unsafe { check(p, size, tag) }.is_some() {
                return 14;
            }
            // SAFETY: as above.
            unsafe { dealloc(p, layout) };
        }
    }
    if ALLOC.snapshot().any(|c| c.nr + c.nr_sig > c.cap + 1) {
        return 15;
    }
    // A trim must reach every CPU in the child too: on the fallback path a
    // slot that another thread held at the fork is released by the crate's
    // fork handler, or that CPU's cache would be dead here.
    let report = ALLOC.trim();
    if report.cpus_skipped != 0 {
        return 16;
    }
    0
}

/// Waits for `pid` for at most CHILD_LIMIT; kills it if it hangs.
fn wait_for(pid: libc::pid_t, round: usize) -> libc::c_int {
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is a valid out-pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(rc >= 0, "waitpid: {}", std::io::Error::last_os_error());
        if rc == pid {
            return status;
        }
        if start.elapsed() > CHILD_LIMIT {
            // SAFETY: our own unreaped child; kill then reap it.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("child {round} hung for {CHILD_LIMIT:?} (deadlock after fork?)");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn fork_while_other_threads_churn() {
    let _watchdog = Watchdog::new("fork test", Duration::from_secs(120));
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicUsize::new(0));
    let churners: Vec<_> = (0..CHURNERS)
        .map(|id| {
            let (stop, ops) = (stop.clone(), ops.clone());
            std::thread::spawn(move || churn(id, stop, ops))
        })
        .collect();
    // Let the churn get going so that forks land in the middle of it.
    while ops.load(Ordering::Relaxed) < 10_000 {
        std::thread::yield_now();
    }
    let mut rng = XorShift::new(1);
    for round in 0..FORKS {
        // SAFETY: the child runs only `child_checks`, which uses the
        // allocator and collections but no lock another thread could
        // have held, then leaves with `_exit` (no atexit handlers, no
        // unwinding into the test harness).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = std::panic::catch_unwind(|| child_checks(round)).unwrap_or(99);
            // SAFETY: ends the child without running the parent's exit code.
            unsafe { libc::_exit(code) };
        }
        assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
        let status = wait_for(pid, round);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child {round}: status {status:#x} (exit code {}, signal {})",
            libc::WEXITSTATUS(status),
            if libc::WIFSIGNALED(status) {
                libc::WTERMSIG(status)
            } else {
                0
            }
        );
        // Vary where in the churn the next fork lands.
        std::thread::sleep(Duration::from_micros(rng.below(3000) as u64));
    }
    stop.store(true, Ordering::Relaxed);
    for c in churners {
        c.join().expect("a churning thread failed");
    }
    eprintln!(
        "{FORKS} forks during {} churn operations, {:?} path",
        ops.load(Ordering::Relaxed),
        ALLOC.path()
    );
}
