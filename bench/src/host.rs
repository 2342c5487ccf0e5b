//! What the benchmark programs need to know of the machine and the
//! repository: where things are, what ran, and the median of a sample.

use std::fmt::Write as _;
use std::path::{Path as FsPath, PathBuf};
use std::process::Command;

/// The median of a sample (NaN for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The repository: this package is its `bench/` member.
pub fn repo_root() -> PathBuf {
    FsPath::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The target folder this program was built in (it runs from
/// `TARGET/release/`), so the nested builds reuse its artifacts.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| repo_root().join("target"))
}

/// The trimmed standard output of a command that succeeded with some.
pub fn command_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

/// The machine, date, compiler and crate versions, as Markdown bullets;
/// `commit` adds the commit the library was built at (the generated
/// document has it, the README summary does not).
pub fn machine_header(with_commit: bool) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_string());
    let date =
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_else(|| "unknown".into());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc = command_line(&rustc, &["--version"]).unwrap_or_else(|| "unknown".into());
    let commit = command_line(
        "git",
        &[
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    )
    .unwrap_or_else(|| "unknown".into());
    let lock = std::fs::read_to_string(repo_root().join("Cargo.lock")).unwrap_or_default();
    let crates: Vec<String> = [
        "percpu-alloc",
        "tikv-jemalloc-sys",
        "tikv-jemallocator",
        "mimalloc",
        "libmimalloc-sys",
        "serde_json",
    ]
    .iter()
    .filter_map(|name| {
        let at = lock.find(&format!("name = \"{name}\"\nversion = \""))?;
        let rest = &lock[at..].lines().nth(1)?;
        let version = rest.trim_start_matches("version = ").trim_matches('"');
        // tikv-jemalloc-sys carries jemalloc's git description after '-'.
        let version = version.split('-').next().unwrap_or(version);
        Some(format!("{name} {version}"))
    })
    .collect();
    let mut h = String::new();
    let _ = writeln!(
        h,
        "- Machine: {cpu}, {cores} CPUs available, Linux {kernel}, glibc {}",
        glibc_version()
    );
    let _ = writeln!(h, "- Date: {date}");
    let _ = writeln!(h, "- Compiler: {rustc}");
    let _ = writeln!(
        h,
        "- Crates: {}{}",
        crates.join(", "),
        if with_commit {
            format!(" (percpu-alloc at commit {commit})")
        } else {
            String::new()
        }
    );
    h
}

/// glibc's version, as it reports it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn glibc_version() -> String {
    // SAFETY: glibc returns a pointer to a static NUL-terminated string.
    let v = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
    v.to_string_lossy().into_owned()
}

/// Not glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn glibc_version() -> String {
    "none".into()
}
