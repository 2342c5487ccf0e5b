//! Configuration from the environment: each case runs this test binary
//! again as a child with the variables set (they are read once, by the
//! process's first allocation, so only a fresh process shows them), and the
//! child checks what its global allocator resolved.

use std::process::Command;

use percpu_alloc::{Config, Path, PerCpuAlloc};

#[global_allocator]
static ALLOC: PerCpuAlloc = PerCpuAlloc::new();

/// Unaffected by the environment, whatever it says.
static DEAF: PerCpuAlloc =
    PerCpuAlloc::with_config(Config::new().with_cap(40).with_read_env(false));

const CHILD: &str = "PERCPU_ENV_TEST_CHILD";

/// Runs `case` in a child with `vars` set; returns its stderr.
fn child(case: &str, vars: &[(&str, &str)]) -> String {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([case, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1");
    for var in [
        "PERCPU_SPLICE_THRESHOLD",
        "PERCPU_CAP",
        "PERCPU_MAX_CACHED_SIZE",
        "PERCPU_CPU_BYTE_BUDGET",
        "PERCPU_FORCE_FALLBACK",
        "PERCPU_STATS",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(vars.iter().copied());
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child {case} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("1 passed"),
        "child {case} ran no test\n{stdout}"
    );
    stderr
}

fn in_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

#[test]
fn every_variable_overrides_the_const_config() {
    if in_child() {
        let c = ALLOC.active_config();
        assert_eq!(c.splice_threshold(), 8);
        assert_eq!(c.cap(), 100);
        assert_eq!(c.max_cached_size(), 512);
        assert_eq!(c.cpu_byte_budget(), 256 << 10);
        assert!(c.force_fallback());
        assert_eq!(ALLOC.path(), Path::Fallback);
        assert!(ALLOC.cpu_bound_bytes() <= 256 << 10);
        // The const config is still what the static says.
        assert_eq!(ALLOC.config(), &Config::new());
        assert_eq!(
            DEAF.active_config(),
            Config::new().with_cap(40).with_read_env(false)
        );
        return;
    }
    let stderr = child(
        "every_variable_overrides_the_const_config",
        &[
            ("PERCPU_SPLICE_THRESHOLD", "8"),
            ("PERCPU_CAP", "100"),
            ("PERCPU_MAX_CACHED_SIZE", "512"),
            ("PERCPU_CPU_BYTE_BUDGET", "256k"),
            ("PERCPU_FORCE_FALLBACK", "yes"),
        ],
    );
    assert!(!stderr.contains("percpu-alloc:"), "{stderr}");
}

#[test]
fn bad_values_are_reported_and_ignored() {
    if in_child() {
        let c = ALLOC.active_config();
        assert_eq!(c.splice_threshold(), Config::DEFAULT_SPLICE_THRESHOLD);
        assert_eq!(c.cap(), Config::DEFAULT_CAP);
        assert_eq!(c.max_cached_size(), 1024);
        assert_eq!(c.cpu_byte_budget(), Config::DEFAULT_CPU_BYTE_BUDGET);
        assert!(!c.force_fallback());
        return;
    }
    let stderr = child(
        "bad_values_are_reported_and_ignored",
        &[
            ("PERCPU_SPLICE_THRESHOLD", "0"),
            ("PERCPU_CAP", "1001"),
            ("PERCPU_MAX_CACHED_SIZE", "1M"),
            ("PERCPU_CPU_BYTE_BUDGET", "lots"),
            ("PERCPU_FORCE_FALLBACK", "perhaps"),
        ],
    );
    for expected in [
        "ignoring PERCPU_SPLICE_THRESHOLD=\"0\": expected a whole number from 1 to 1000",
        "ignoring PERCPU_CAP=\"1001\": expected a whole number from 0 to 1000",
        "ignoring PERCPU_MAX_CACHED_SIZE=\"1M\": expected a whole number from 0 to 14336",
        "ignoring PERCPU_CPU_BYTE_BUDGET=\"lots\"",
        "ignoring PERCPU_FORCE_FALLBACK=\"perhaps\": expected 1/0, true/false, yes/no or on/off",
    ] {
        assert_eq!(
            stderr.matches(expected).count(),
            1,
            "want once: {expected}\nin:\n{stderr}"
        );
    }
}

#[test]
fn percpu_stats_prints_the_table_at_exit() {
    if in_child() {
        let v: Vec<Box<[u8; 100]>> = (0..50).map(|_| Box::new([7; 100])).collect();
        drop(v);
        return;
    }
    let stderr = child(
        "percpu_stats_prints_the_table_at_exit",
        &[("PERCPU_STATS", "1")],
    );
    // One table per registered allocator: the global one, and `DEAF` if
    // it was used (it was not).
    assert_eq!(stderr.matches("percpu-alloc: ").count(), 1, "{stderr}");
    assert!(stderr.contains(" path, "), "{stderr}");
    assert!(stderr.contains("cached now: "), "{stderr}");
    // The 112-byte class held the 50 boxes at some point; its row is there.
    assert!(
        stderr
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("112")),
        "{stderr}"
    );
    let quiet = child("percpu_stats_prints_the_table_at_exit", &[]);
    assert!(!quiet.contains("percpu-alloc: "), "{quiet}");
}
