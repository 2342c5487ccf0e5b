//! The `hardened` feature: a write after free into a cached block (held in
//! a slot, or linked on a signal list or a chain), and a double free, abort
//! the process with a message instead of handing out a wild pointer. Each
//! case runs in a child (this test binary again), whose death the parent
//! checks.
//!
//! `cargo test --release --features hardened --test hardened`

#![cfg(feature = "hardened")]

use std::alloc::{GlobalAlloc, Layout};
use std::process::Command;

use percpu_alloc::{enter_signal_context, Config, Path, PerCpuAlloc};

const CHILD: &str = "PERCPU_HARDENED_TEST_CHILD";

fn in_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

/// Runs `case` in a child; returns (exited cleanly, stderr).
fn child(case: &str) -> (bool, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([case, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        assert!(stdout.contains("1 passed"), "child {case} ran no test");
    }
    (out.status.success(), stderr)
}

/// Runs `case` in a child and checks it aborted saying `message`; returns
/// its stderr, or `None` where the case does not apply here.
fn expect_abort(case: &str, message: &str) -> Option<String> {
    if case.ends_with("_rseq") && PerCpuAlloc::new().path() != Path::Rseq {
        eprintln!("no rseq here (glibc did not register it): {case} skipped");
        return None;
    }
    let (ok, stderr) = child(case);
    assert!(!ok, "child {case} survived\n{stderr}");
    assert!(
        stderr.contains(message),
        "child {case}: no {message:?} in\n{stderr}"
    );
    Some(stderr)
}

fn instance(fallback: bool) -> PerCpuAlloc {
    PerCpuAlloc::with_config(
        Config::new()
            .with_force_fallback(fallback)
            .with_read_env(false),
    )
}

/// Frees 40 blocks of 64 bytes (in signal context if `linked`, so they are
/// linked on the signal list, which the first alloc below splices; else
/// into the task list's slots), lets `corrupt` write into one (the last
/// one freed, handed out first; if linked, the one after it, which the
/// chain's first pop reads), then allocates them all back.
fn free_corrupt_realloc(fallback: bool, linked: bool, corrupt: impl Fn(*mut u8)) {
    let a = instance(fallback);
    if !fallback && a.path() != Path::Rseq {
        eprintln!("no rseq here: nothing to check");
        return;
    }
    // Keep the thread on one CPU, so every free and alloc meets the same
    // lists.
    let cpu = core_affinity::get_core_ids().unwrap()[0];
    assert!(core_affinity::set_for_current(cpu));
    let layout = Layout::from_size_align(64, 8).unwrap();
    // SAFETY: a valid layout; every block is freed with it.
    let blocks: Vec<*mut u8> = (0..40).map(|_| unsafe { a.alloc(layout) }).collect();
    let signal = linked.then(enter_signal_context);
    for &p in &blocks {
        // SAFETY: from `a` with `layout`.
        unsafe { a.dealloc(p, layout) };
    }
    drop(signal);
    // The write after free.
    let victim = blocks[if linked { 38 } else { 39 }];
    eprintln!("corrupting the block at {victim:p}");
    corrupt(victim);
    // SAFETY: as above; all are freed again below.
    let again: Vec<*mut u8> = (0..40).map(|_| unsafe { a.alloc(layout) }).collect();
    for p in again {
        // SAFETY: from `a` with `layout`.
        unsafe { a.dealloc(p, layout) };
    }
}

fn zero_link(p: *mut u8) {
    // SAFETY: the block is cached, not freed to the OS: the write lands in
    // mapped memory (which is the bug being simulated).
    unsafe { (p as *mut u64).write(0) };
}

fn pointer_in_link(p: *mut u8) {
    // An attacker's classic: point the list at memory of their choosing.
    let fake = Box::leak(Box::new([0u64; 8])).as_mut_ptr() as u64;
    // SAFETY: as in `zero_link`.
    unsafe { (p as *mut u64).write(fake) };
}

fn text_over_block(p: *mut u8) {
    // SAFETY: as in `zero_link`; 64 bytes is the block's class size.
    unsafe { std::ptr::copy_nonoverlapping(b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".as_ptr(), p, 32) };
}

macro_rules! child_case {
    ($name:ident, $fallback:expr, $linked:expr, $corrupt:expr) => {
        #[test]
        fn $name() {
            if in_child() {
                free_corrupt_realloc($fallback, $linked, $corrupt);
                return;
            }
            let Some(stderr) = expect_abort(stringify!($name), "corrupted cached block") else {
                return;
            };
            // A block handed out by a slot is named in the message (the
            // rseq path checks it in its asm and passes the address back
            // as a refusal, its low bit set); a chain's link is checked
            // without it.
            if !$linked {
                let victim = stderr
                    .lines()
                    .find_map(|l| l.strip_prefix("corrupting the block at "))
                    .expect("the child names its victim");
                assert!(
                    stderr.contains(&format!("(free-list link) at {victim} ")),
                    "{stderr}"
                );
            }
        }
    };
}

child_case!(zeroed_link_rseq, false, false, zero_link);
child_case!(zeroed_link_fallback, true, false, zero_link);
child_case!(forged_pointer_rseq, false, false, pointer_in_link);
child_case!(forged_pointer_fallback, true, false, pointer_in_link);
child_case!(text_over_block_rseq, false, false, text_over_block);
child_case!(text_over_block_fallback, true, false, text_over_block);
child_case!(zeroed_link_spliced_rseq, false, true, zero_link);
child_case!(zeroed_link_spliced_fallback, true, true, zero_link);
child_case!(forged_pointer_spliced_rseq, false, true, pointer_in_link);
child_case!(forged_pointer_spliced_fallback, true, true, pointer_in_link);

#[test]
fn untouched_blocks_pass() {
    // The control: the same run without the write completes, so the cases
    // above die of the write, not of the harness.
    if in_child() {
        for linked in [false, true] {
            free_corrupt_realloc(false, linked, |_| {});
            free_corrupt_realloc(true, linked, |_| {});
        }
        return;
    }
    let (ok, stderr) = child("untouched_blocks_pass");
    assert!(ok, "{stderr}");
}

fn double_free(fallback: bool) {
    let a = instance(fallback);
    // The smallest request: served from the 16-byte class, so it has room
    // for the key too.
    let layout = Layout::from_size_align(8, 8).unwrap();
    // SAFETY: a valid layout. The second free is the bug under test.
    unsafe {
        let p = a.alloc(layout);
        a.dealloc(p, layout);
        a.dealloc(p, layout);
    }
}

#[test]
fn double_free_rseq() {
    if in_child() {
        double_free(false);
        return;
    }
    expect_abort("double_free_rseq", "double free of cached block");
}

#[test]
fn double_free_fallback() {
    if in_child() {
        double_free(true);
        return;
    }
    expect_abort("double_free_fallback", "double free of cached block");
}

/// A block freed in signal context on top of another (so linked on the
/// signal list, its first word a link to that one, not the empty link)
/// and then freed again in task context.
fn double_free_listed(fallback: bool) {
    let a = instance(fallback);
    let layout = Layout::from_size_align(64, 8).unwrap();
    // SAFETY: a valid layout. The second free of `p` is the bug under test.
    unsafe {
        let (p, q) = (a.alloc(layout), a.alloc(layout));
        let signal = enter_signal_context();
        a.dealloc(q, layout);
        a.dealloc(p, layout);
        drop(signal);
        a.dealloc(p, layout);
    }
}

#[test]
fn double_free_of_a_listed_block_rseq() {
    if in_child() {
        double_free_listed(false);
        return;
    }
    expect_abort(
        "double_free_of_a_listed_block_rseq",
        "double free of cached block",
    );
}

#[test]
fn double_free_of_a_listed_block_fallback() {
    if in_child() {
        double_free_listed(true);
        return;
    }
    expect_abort(
        "double_free_of_a_listed_block_fallback",
        "double free of cached block",
    );
}

#[test]
fn a_freed_and_reallocated_block_frees_once_without_complaint() {
    // The mark must not outlive the cache: a block allocated again and
    // left untouched is freed once, legitimately.
    for fallback in [false, true] {
        let a = instance(fallback);
        let layout = Layout::from_size_align(128, 8).unwrap();
        for _ in 0..1000 {
            // SAFETY: a valid layout; each block is freed once.
            unsafe {
                let p = a.alloc(layout);
                a.dealloc(p, layout);
            }
        }
    }
}
