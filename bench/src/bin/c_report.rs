//! The field's classic C allocator benchmarks, run the way the field runs
//! them: each program under glibc's malloc (no preload), Debian's
//! libjemalloc2, libmimalloc2.0 and libtcmalloc-minimal4, and
//! libpercpu_alloc.so on the rseq path, on the fallback and with its
//! caches off (`PERCPU_MAX_CACHED_SIZE=0`, which separates what the caches
//! do from what the jemalloc build behind them does), by `LD_PRELOAD`,
//! interleaved over rounds.
//!
//! ```text
//! cargo run --release -p percpu-bench --bin c_report                 # target/c-report/
//! cargo run --release -p percpu-bench --bin c_report -- --docs       # docs/c-benchmarks.md and the README summary
//! cargo run --release -p percpu-bench --bin c_report -- --rounds 5 --bench-c DIR --quick
//! ```
//!
//! The programs' sources are in `../shared/bench-c` beside the repository
//! (`--bench-c DIR` elsewhere); they are built from there into
//! `TARGET/c-report/bin` with the build lines of that folder's README, and
//! the project does not need them for anything else. Missing Debian
//! libraries are installed with `apt-get` when this runs as root; an
//! allocator whose library is still missing is left out, and the report
//! says so.
//!
//! Each figure is the median over rounds of the per-round ratio to
//! jemalloc of the program's own throughput where it reports one (larson,
//! xmalloc-test, rptest, glibc-thread run for a fixed time or report
//! operations per second), else of its wall time; peak RSS is the child's
//! `ru_maxrss` from `wait4`. The program `pairs` (this package's
//! `bench/c/pairs.c`) times malloc+free pairs of 64 bytes, and with
//! `free_sized` where the allocator has it: what finding a block's size
//! costs a preloaded free.

use std::fmt::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use percpu_bench::host::{machine_header, median, repo_root, target_dir};

/// Where Debian puts the allocators compared.
const LIBDIR: &str = "/usr/lib/x86_64-linux-gnu";

/// The allocator column of libpercpu_alloc.so with its caches off.
const NO_CACHE: &str = "percpu no cache";

struct Alloc {
    name: &'static str,
    /// The library to preload (none: glibc).
    lib: Option<PathBuf>,
    /// Extra environment.
    env: &'static [(&'static str, &'static str)],
}

/// How a program's result is read.
#[derive(Clone, Copy)]
enum Metric {
    /// Wall time, lower is better.
    Wall,
    /// A throughput the program prints after this word, higher is better.
    Rate(&'static str),
    /// `pairs`: ns per pair, and per sized pair.
    Pairs,
}

struct Program {
    label: String,
    bin: &'static str,
    args: Vec<String>,
    metric: Metric,
}

#[derive(Clone, Copy, Default)]
struct Sample {
    /// Seconds for `Wall`, the rate for `Rate`, ns per pair for `Pairs`.
    value: f64,
    /// ns per sized pair (`Pairs` only).
    sized: Option<f64>,
    rss_kib: f64,
}

struct Options {
    rounds: usize,
    out: PathBuf,
    readme: Option<PathBuf>,
    bench_c: PathBuf,
    quick: bool,
    install: bool,
}

const USAGE: &str =
    "usage: c_report [--rounds N] [--out DIR] [--readme FILE] [--docs] [--bench-c DIR]
                [--quick] [--no-install]
  --rounds N     interleaved rounds (3)
  --out DIR      where c-benchmarks.md and its chart go (target/c-report/)
  --readme FILE  also rewrite FILE's summary between its
                 <!-- c-benchmark-summary:begin/end --> lines
  --docs         the repository's copy: --out docs --readme README.md
  --bench-c DIR  the benchmark sources (../shared/bench-c)
  --quick        shorter runs (larson and xmalloc-test 2 s, rptest 100 loops)
  --no-install   do not apt-get missing allocator libraries";

fn parse_args() -> Result<Option<Options>, String> {
    let mut o = Options {
        rounds: 3,
        out: target_dir().join("c-report"),
        readme: None,
        bench_c: repo_root().join("../shared/bench-c"),
        quick: false,
        install: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rounds" => {
                o.rounds = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or("--rounds needs a positive number")?
            }
            "--out" => o.out = it.next().ok_or("--out needs a folder")?.into(),
            "--readme" => o.readme = Some(it.next().ok_or("--readme needs a file")?.into()),
            "--docs" => {
                o.out = repo_root().join("docs");
                o.readme = Some(repo_root().join("README.md"));
            }
            "--bench-c" => o.bench_c = it.next().ok_or("--bench-c needs a folder")?.into(),
            "--quick" => o.quick = true,
            "--no-install" => o.install = false,
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some(o))
}

fn run_ok(cmd: &mut Command) -> Result<(), String> {
    let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed ({status})"))
    }
}

/// Installs the Debian allocator packages that are missing, if this can.
fn install_libraries(wanted: &[(&str, &str)]) {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(lib, _)| !FsPath::new(LIBDIR).join(lib).exists())
        .map(|&(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        return;
    }
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        eprintln!(
            "c_report: not root, so not installing {}",
            missing.join(" ")
        );
        return;
    }
    eprintln!("c_report: installing {}", missing.join(" "));
    let _ = Command::new("apt-get").arg("update").arg("-qq").status();
    let _ = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .status();
}

/// Builds the programs from the benchmark folder, and `pairs`.
fn build_programs(src: &FsPath, bin: &FsPath) -> Result<(), String> {
    std::fs::create_dir_all(bin).map_err(|e| format!("{}: {e}", bin.display()))?;
    let o = |name: &str| bin.join(name);
    let cc = |compiler: &str, out: PathBuf, args: &[&str]| -> Result<(), String> {
        run_ok(
            Command::new(compiler)
                .current_dir(src)
                .arg("-O2")
                .arg("-o")
                .arg(&out)
                .args(args)
                .stderr(Stdio::null()),
        )
    };
    cc(
        "g++",
        o("larson"),
        &["-DCPP=1", "larson/larson.cpp", "-lpthread"],
    )?;
    cc(
        "g++",
        o("larson-sized"),
        &[
            "-DCPP=1",
            "-fsized-deallocation",
            "-DSIZED=1",
            "larson/larson.cpp",
            "-lpthread",
        ],
    )?;
    cc(
        "gcc",
        o("xmalloc-test"),
        &["xmalloc-test/xmalloc-test.c", "-lpthread"],
    )?;
    cc(
        "g++",
        o("cache-scratch"),
        &["cache-scratch/cache-scratch.cpp", "-lpthread"],
    )?;
    cc(
        "g++",
        o("cache-thrash"),
        &["cache-thrash/cache-thrash.cpp", "-lpthread"],
    )?;
    cc("gcc", o("mstress"), &["mstress/mstress.c", "-lpthread"])?;
    cc(
        "gcc",
        o("rptest"),
        &[
            "-fpermissive",
            "-Irptest",
            "rptest/rptest.c",
            "rptest/thread.c",
            "rptest/timer.c",
            "-lpthread",
            "-lm",
        ],
    )?;
    cc(
        "gcc",
        o("glibc-simple"),
        &["glibc-bench/bench-malloc-simple.c", "-lpthread"],
    )?;
    cc(
        "gcc",
        o("glibc-thread"),
        &["glibc-bench/bench-malloc-thread.c", "-lpthread"],
    )?;
    cc(
        "g++",
        o("alloc-test"),
        &[
            "-DBENCH=4",
            "alloc-test/test_common.cpp",
            "alloc-test/allocator_tester.cpp",
            "-lpthread",
        ],
    )?;
    let pairs = repo_root().join("bench/c/pairs.c");
    run_ok(
        Command::new("gcc")
            .args(["-O2", "-o"])
            .arg(o("pairs"))
            .arg(pairs),
    )
}

fn programs(procs: usize, quick: bool) -> Vec<Program> {
    let p = procs.to_string();
    let secs = if quick { "2" } else { "5" };
    let loops = if quick { "100" } else { "500" };
    let prog = |label: &str, bin, args: &[&str], metric| Program {
        label: label.to_string(),
        bin,
        args: args.iter().map(|s| s.to_string()).collect(),
        metric,
    };
    vec![
        prog(
            "pairs, malloc(64)+free",
            "pairs",
            &["64", "30"],
            Metric::Pairs,
        ),
        prog(
            "larson",
            "larson",
            &[secs, "8", "1000", "5000", "100", "4141", &p],
            Metric::Rate("Throughput ="),
        ),
        prog(
            "larson-sized",
            "larson-sized",
            &[secs, "8", "1000", "5000", "100", "4141", &p],
            Metric::Rate("Throughput ="),
        ),
        prog(
            "xmalloc-test",
            "xmalloc-test",
            &["-w", &p, "-t", secs, "-s", "64"],
            Metric::Rate("free/sec:"),
        ),
        prog(
            "cache-scratch, 1 thread",
            "cache-scratch",
            &["1", "1000", "1", "2000000", &p],
            Metric::Wall,
        ),
        prog(
            &format!("cache-scratch, {procs} threads"),
            "cache-scratch",
            &[&p, "1000", "1", "2000000", &p],
            Metric::Wall,
        ),
        prog(
            "cache-thrash, 1 thread",
            "cache-thrash",
            &["1", "1000", "1", "2000000", &p],
            Metric::Wall,
        ),
        prog(
            &format!("cache-thrash, {procs} threads"),
            "cache-thrash",
            &[&p, "1000", "1", "2000000", &p],
            Metric::Wall,
        ),
        prog("mstress", "mstress", &[&p, "50", "25"], Metric::Wall),
        prog(
            "rptest",
            "rptest",
            &[&p, "0", "1", "2", loops, "1000", "100", "8", "16000"],
            Metric::Rate("ops: ........"),
        ),
        prog("glibc-simple", "glibc-simple", &[], Metric::Wall),
        prog(
            "glibc-thread",
            "glibc-thread",
            &[&p],
            Metric::Rate("iterations"),
        ),
        prog("alloc-test, 1 thread", "alloc-test", &["1"], Metric::Wall),
        prog(
            &format!("alloc-test, {procs} threads"),
            "alloc-test",
            &[&p],
            Metric::Wall,
        ),
    ]
}

/// The number after `key` in `text` (rptest's counts dots before it; for
/// glibc-thread the number comes before the word).
fn rate(text: &str, key: &str) -> Option<f64> {
    if key == "iterations" {
        let line = text
            .lines()
            .find(|l| l.trim_end().ends_with("iterations"))?;
        return line.split_whitespace().next()?.parse().ok();
    }
    let key = key.trim_end_matches('.');
    let at = text.find(key)? + key.len();
    let rest = text[at..].trim_start_matches(['.', ' ']);
    let num: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.parse().ok()
}

fn field(text: &str, key: &str) -> Option<f64> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
}

/// Runs one program under one allocator: its figure and peak RSS.
fn run_one(bin: &FsPath, prog: &Program, alloc: &Alloc) -> Result<Sample, String> {
    let mut cmd = Command::new(bin.join(prog.bin));
    cmd.args(&prog.args)
        .current_dir(bin)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(lib) = &alloc.lib {
        cmd.env("LD_PRELOAD", lib);
    }
    for (k, v) in alloc.env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let child = cmd.spawn().map_err(|e| format!("{}: {e}", prog.bin))?;
    let pid = child.id() as libc::pid_t;
    let out = child
        .wait_with_output_rusage(pid)
        .map_err(|e| format!("{}: {e}", prog.bin))?;
    let wall = start.elapsed().as_secs_f64();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!(
            "{} under {} failed ({:?}, signal {:?}): {}",
            prog.label,
            alloc.name,
            out.status.code(),
            out.status.signal(),
            text.lines().last().unwrap_or("")
        ));
    }
    let (value, sized) = match prog.metric {
        Metric::Wall => (wall, None),
        Metric::Rate(key) => (
            rate(&text, key).ok_or_else(|| format!("{}: no {key:?} in its output", prog.label))?,
            None,
        ),
        Metric::Pairs => (
            field(&text, "pair_ns=").ok_or("pairs: no pair_ns")?,
            field(&text, "sized_ns="),
        ),
    };
    Ok(Sample {
        value,
        sized,
        rss_kib: out.maxrss_kib,
    })
}

/// A child's output, status and peak RSS (`wait4`).
struct Finished {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: std::process::ExitStatus,
    maxrss_kib: f64,
}

trait WaitRusage {
    fn wait_with_output_rusage(self, pid: libc::pid_t) -> std::io::Result<Finished>;
}

impl WaitRusage for std::process::Child {
    fn wait_with_output_rusage(mut self, pid: libc::pid_t) -> std::io::Result<Finished> {
        use std::io::Read;
        // Read both pipes to the end before reaping, from two threads so a
        // full pipe never stalls the child.
        let mut err = self.stderr.take();
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(e) = err.as_mut() {
                let _ = e.read_to_end(&mut buf);
            }
            buf
        });
        let mut stdout = Vec::new();
        if let Some(mut o) = self.stdout.take() {
            o.read_to_end(&mut stdout)?;
        }
        let stderr = reader.join().unwrap_or_default();
        let mut status = 0;
        // SAFETY: a zeroed rusage is valid; wait4 fills it and `status`.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `pid` is our child, not yet reaped.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r != pid {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Finished {
            stdout,
            stderr,
            status: std::process::ExitStatus::from_raw(status),
            maxrss_kib: usage.ru_maxrss as f64,
        })
    }
}

/// Time-like ratio of allocator `i` to `j` in one round: below 1 is better.
fn cost_ratio(metric: Metric, a: &Sample, b: &Sample) -> f64 {
    match metric {
        Metric::Rate(_) => b.value / a.value,
        Metric::Wall | Metric::Pairs => a.value / b.value,
    }
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("c_report: {e}\n{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("c_report: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(opts: &Options) -> Result<(), String> {
    if !opts.bench_c.join("larson/larson.cpp").is_file() {
        return Err(format!(
            "no benchmark sources in {} (--bench-c DIR)",
            opts.bench_c.display()
        ));
    }
    let wanted = [
        ("libjemalloc.so.2", "libjemalloc2"),
        ("libmimalloc.so.2", "libmimalloc2.0"),
        ("libtcmalloc_minimal.so.4", "libtcmalloc-minimal4"),
    ];
    if opts.install {
        install_libraries(&wanted);
    }
    eprintln!("c_report: building libpercpu_alloc.so and the programs");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_ok(
        Command::new(&cargo)
            .args([
                "build",
                "--profile",
                "capi",
                "--quiet",
                "-p",
                "percpu-alloc-capi",
            ])
            .arg("--manifest-path")
            .arg(repo_root().join("Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir()),
    )?;
    let ours = target_dir().join("capi/libpercpu_alloc.so");
    let bin = target_dir().join("c-report/bin");
    build_programs(&opts.bench_c, &bin)?;

    let lib = |name: &str| {
        let p = FsPath::new(LIBDIR).join(name);
        p.exists().then_some(p)
    };
    let mut allocs = vec![Alloc {
        name: "glibc",
        lib: None,
        env: &[],
    }];
    let mut left_out = Vec::new();
    for (name, (file, pkg)) in ["jemalloc", "mimalloc", "tcmalloc"].into_iter().zip(wanted) {
        match lib(file) {
            Some(p) => allocs.push(Alloc {
                name,
                lib: Some(p),
                env: &[],
            }),
            None => left_out.push(format!("{name} ({pkg} not installed)")),
        }
    }
    let je = allocs.iter().position(|a| a.name == "jemalloc");
    allocs.push(Alloc {
        name: "percpu rseq",
        lib: Some(ours.clone()),
        env: &[("PERCPU_EXPECT_PATH", "rseq")],
    });
    allocs.push(Alloc {
        name: "percpu fallback",
        lib: Some(ours.clone()),
        env: &[("GLIBC_TUNABLES", "glibc.pthread.rseq=0")],
    });
    // The same library with nothing cached: every call goes through the C
    // ABI to the jemalloc this crate links (tikv-jemalloc-sys's build, not
    // Debian's), so it tells what the caches themselves change.
    allocs.push(Alloc {
        name: NO_CACHE,
        lib: Some(ours),
        env: &[("PERCPU_MAX_CACHED_SIZE", "0")],
    });
    let reference = je.unwrap_or(0);
    let procs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let progs = programs(procs, opts.quick);

    // samples[program][round][allocator]
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![Vec::new(); progs.len()];
    let started = Instant::now();
    for round in 0..opts.rounds {
        eprint!("c_report: round {}/{}:", round + 1, opts.rounds);
        for (p, prog) in progs.iter().enumerate() {
            eprint!(" {}", prog.bin);
            let mut row = vec![Sample::default(); allocs.len()];
            for k in 0..allocs.len() {
                let i = (round + p + k) % allocs.len();
                row[i] = run_one(&bin, prog, &allocs[i])?;
            }
            samples[p].push(row);
        }
        eprintln!();
    }

    // Allocator i against allocator `base` on program p: the median of the
    // per-round ratios, of cost and of peak RSS.
    let ratio_to = |p: usize, i: usize, base: usize| -> f64 {
        median(
            samples[p]
                .iter()
                .map(|r| cost_ratio(progs[p].metric, &r[i], &r[base]))
                .collect(),
        )
    };
    let rss_to = |p: usize, i: usize, base: usize| -> f64 {
        median(
            samples[p]
                .iter()
                .map(|r| r[i].rss_kib / r[base].rss_kib)
                .collect(),
        )
    };
    let ratio = |p: usize, i: usize| ratio_to(p, i, reference);
    let rss = |p: usize, i: usize| rss_to(p, i, reference);
    let names: Vec<&str> = allocs.iter().map(|a| a.name).collect();
    let ref_name = names[reference];

    let mut md = String::new();
    let _ = writeln!(md, "# percpu-alloc on the classic C benchmarks\n");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let _ = writeln!(
        md,
        "Written by `cargo run --release -p percpu-bench --bin c_report{}{}`; every figure is from that one run.\n",
        if args.is_empty() { "" } else { " -- " },
        args.join(" ")
    );
    md.push_str(&machine_header(true));
    let _ = writeln!(
        md,
        "- Rounds: {}, interleaved (each round starts one allocator later); {} CPUs given to the programs; {} mode",
        opts.rounds,
        procs,
        if opts.quick { "quick" } else { "full" }
    );
    if !left_out.is_empty() {
        let _ = writeln!(md, "- Left out: {}", left_out.join(", "));
    }
    let _ = writeln!(
        md,
        "\nEach program is run by `LD_PRELOAD` of the allocator's library (glibc: none; percpu fallback: libpercpu_alloc.so with `GLIBC_TUNABLES=glibc.pthread.rseq=0`; percpu no cache: the same with `PERCPU_MAX_CACHED_SIZE=0`). A figure is the median over rounds of that round's ratio to {ref_name}: of the program's own throughput where it reports one (larson, xmalloc-test, rptest, glibc-thread; inverted, so below 1 is faster everywhere), else of its wall time. Peak RSS is the child's `ru_maxrss` (from `wait4`). Sources: `../shared/bench-c` (mimalloc-bench's collection), built with its README's lines; `pairs` is `bench/c/pairs.c`.\n"
    );
    // One table: a row per program, a cell per allocator.
    let table = |md: &mut String, cell: &dyn Fn(usize, usize) -> String| {
        let _ = writeln!(md, "| program | {} |", names.join(" | "));
        let _ = writeln!(md, "|---|{}", "---:|".repeat(names.len()));
        for (p, prog) in progs.iter().enumerate() {
            let cells: Vec<String> = (0..allocs.len()).map(|i| cell(p, i)).collect();
            let _ = writeln!(md, "| {} | {} |", prog.label, cells.join(" | "));
        }
    };
    // The targets: percpu on the rseq path no slower than jemalloc and no
    // more peak RSS on every program, and faster than every other
    // allocator on at least three.
    let ours = names.iter().position(|n| *n == "percpu rseq").unwrap_or(0);
    let others: Vec<usize> = (0..allocs.len())
        .filter(|&i| !names[i].starts_with("percpu"))
        .collect();
    let no_cache = names.iter().position(|n| *n == NO_CACHE).unwrap_or(ours);
    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(
        md,
        "percpu on the rseq path: no slower than {ref_name} and no more peak RSS on every program; faster than every other allocator ({}) on at least three.\n",
        others.iter().map(|&i| names[i]).collect::<Vec<_>>().join(", ")
    );
    let _ = writeln!(
        md,
        "| program | time vs {ref_name} | peak RSS vs {ref_name} | fastest of all |"
    );
    let _ = writeln!(md, "|---|---|---|---|");
    let (mut slower, mut fatter, mut fastest) = (Vec::new(), Vec::new(), Vec::new());
    for (p, prog) in progs.iter().enumerate() {
        let t = ratio(p, ours);
        let m = rss(p, ours);
        let best = others.iter().all(|&i| t < ratio(p, i));
        if t > 1.0 {
            slower.push(format!("{} {t:.2}x", prog.label));
        }
        if m > 1.0 {
            fatter.push(format!("{} {m:.2}x", prog.label));
        }
        if best {
            fastest.push(prog.label.clone());
        }
        let mark = |ok: bool| if ok { "met" } else { "missed" };
        let _ = writeln!(
            md,
            "| {} | {t:.2}x {} | {m:.2}x {} | {} |",
            prog.label,
            mark(t <= 1.0),
            mark(m <= 1.0),
            if best { "yes" } else { "no" }
        );
    }
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join("; ")
        }
    };
    let _ = writeln!(
        md,
        "\n- No slower than {ref_name}: {}, held on {} of {} programs (slower: {}).",
        if slower.is_empty() { "met" } else { "missed" },
        progs.len() - slower.len(),
        progs.len(),
        list(&slower)
    );
    let _ = writeln!(
        md,
        "- No more peak RSS than {ref_name}: {}, held on {} of {} (more: {}).",
        if fatter.is_empty() { "met" } else { "missed" },
        progs.len() - fatter.len(),
        progs.len(),
        list(&fatter)
    );
    let _ = writeln!(
        md,
        "- Faster than every other allocator on at least three: {}, on {} ({}).\n",
        if fastest.len() >= 3 { "met" } else { "missed" },
        fastest.len(),
        list(&fastest)
    );
    // A miss above whose cause is the jemalloc build rather than the
    // caches shows up with the caches off too.
    let _ = writeln!(md, "## What the caches themselves change\n");
    let _ = writeln!(
        md,
        "`{NO_CACHE}` is the same library with `PERCPU_MAX_CACHED_SIZE=0`: nothing is cached, and every call goes through the C ABI to the jemalloc this crate links (tikv-jemalloc-sys's build of jemalloc 5.3, configured differently from Debian's libjemalloc2). Against it, percpu rseq shows what the caches do; against {ref_name}, it shows what the jemalloc build and the C ABI's wrapping do.\n"
    );
    let _ = writeln!(
        md,
        "| program | percpu rseq vs {NO_CACHE}: time | peak RSS | {NO_CACHE} vs {ref_name}: time | peak RSS |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    for (p, prog) in progs.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {} | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
            prog.label,
            ratio_to(p, ours, no_cache),
            rss_to(p, ours, no_cache),
            ratio(p, no_cache),
            rss(p, no_cache)
        );
    }
    let _ = writeln!(md);
    let _ = writeln!(md, "## Time against {ref_name} (below 1 is faster)\n");
    table(&mut md, &|p, i| format!("{:.2}", ratio(p, i)));
    let _ = writeln!(md, "\n## Peak RSS against {ref_name}\n");
    table(&mut md, &|p, i| format!("{:.2}", rss(p, i)));
    let _ = writeln!(md, "\n## Raw medians\n");
    let _ = writeln!(
        md,
        "Throughput as printed (larson: operations/s; xmalloc-test: M frees/s; rptest: memory ops per CPU second; glibc-thread: iterations), wall seconds otherwise, ns per pair for `pairs`; peak RSS in MiB.\n"
    );
    table(&mut md, &|p, i| {
        let v = median(samples[p].iter().map(|r| r[i].value).collect());
        let m = median(samples[p].iter().map(|r| r[i].rss_kib).collect()) / 1024.0;
        format!("{} / {m:.1}", short(v))
    });
    let pairs = progs.iter().position(|p| matches!(p.metric, Metric::Pairs));
    if let Some(p) = pairs {
        let sized: Vec<f64> = samples[p].iter().filter_map(|r| r[ours].sized).collect();
        let plain = median(samples[p].iter().map(|r| r[ours].value).collect());
        let je_pair = median(samples[p].iter().map(|r| r[reference].value).collect());
        let _ = writeln!(
            md,
            "\n**`free` without a size.** A malloc(64)+free pair took {plain:.2} ns under percpu rseq against {je_pair:.2} ns under {ref_name}; with C23's `free_sized` (which tells the size) it took {:.2} ns. The difference is what a plain `free` does to find the block's class: a lookup in the library's page map (`src/size_map.rs`); a block whose page has no record goes to jemalloc's own `free`, which finds the size itself.",
            median(sized)
        );
    }
    let _ = writeln!(md, "\n![time against {ref_name}](c-benchmarks/time.svg)");
    let _ = writeln!(
        md,
        "\nThe run took {:.0} s.",
        started.elapsed().as_secs_f64()
    );

    let charts = opts.out.join("c-benchmarks");
    std::fs::create_dir_all(&charts).map_err(|e| format!("{}: {e}", charts.display()))?;
    let rows: Vec<(String, Vec<f64>)> = (0..progs.len())
        .map(|p| {
            (
                progs[p].label.clone(),
                (0..allocs.len()).map(|i| ratio(p, i)).collect(),
            )
        })
        .collect();
    chart(&charts.join("time.svg"), &names, &rows, ref_name).map_err(|e| format!("chart: {e}"))?;
    let doc = opts.out.join("c-benchmarks.md");
    std::fs::write(&doc, &md).map_err(|e| format!("{}: {e}", doc.display()))?;
    println!("{md}");
    if let Some(readme) = &opts.readme {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Under `LD_PRELOAD`, time against {ref_name}'s (below 1 is faster), median of {} interleaved rounds; all programs, RSS and method in [docs/c-benchmarks.md](docs/c-benchmarks.md).\n",
            opts.rounds
        );
        let _ = writeln!(s, "| program | {} |", names.join(" | "));
        let _ = writeln!(s, "|---|{}", "---:|".repeat(names.len()));
        // The programs' main runs; the document has every variant.
        for (label, r) in &rows {
            let keep = [
                "pairs",
                "larson",
                "xmalloc-test",
                "rptest",
                "mstress",
                "glibc-thread",
            ]
            .iter()
            .any(|k| label.starts_with(k) && !label.starts_with("larson-"))
                || label == &format!("alloc-test, {procs} threads")
                || label == &format!("cache-scratch, {procs} threads");
            if keep {
                let cells: Vec<String> = r.iter().map(|v| format!("{v:.2}")).collect();
                let _ = writeln!(s, "| {label} | {} |", cells.join(" | "));
            }
        }
        write_between(
            readme,
            "<!-- c-benchmark-summary:begin -->",
            "<!-- c-benchmark-summary:end -->",
            &s,
        )?;
    }
    eprintln!("c_report: wrote {}", doc.display());
    Ok(())
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn write_between(file: &FsPath, begin: &str, end: &str, body: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let (Some(b), Some(e)) = (text.find(begin), text.find(end)) else {
        return Err(format!("{} has no {begin} ... {end} lines", file.display()));
    };
    if e < b {
        return Err(format!("{}: markers out of order", file.display()));
    }
    let new = format!("{}\n{body}{}", &text[..b + begin.len()], &text[e..]);
    std::fs::write(file, new).map_err(|e| format!("{}: {e}", file.display()))
}

/// One bar per allocator and program: the time ratio to the reference.
fn chart(
    file: &FsPath,
    names: &[&str],
    rows: &[(String, Vec<f64>)],
    reference: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(file, (1000, 60 + 40 * rows.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = rows
        .iter()
        .flat_map(|(_, r)| r.iter().copied())
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max)
        .min(6.0);
    let n = names.len() as f64;
    let mut c = ChartBuilder::on(&root)
        .caption(
            format!("time against {reference} (below 1 is faster)"),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(200)
        .build_cartesian_2d(0.0..top * 1.05, 0.0..rows.len() as f64)?;
    let labels: Vec<String> = rows.iter().map(|(l, _)| l.clone()).collect();
    c.configure_mesh()
        .disable_y_mesh()
        .y_labels(rows.len())
        .y_label_formatter(&|y| {
            let i = (*y - 0.5).round() as usize;
            labels.get(i).cloned().unwrap_or_default()
        })
        .draw()?;
    for (a, name) in names.iter().enumerate() {
        let color = Palette99::pick(a).to_rgba();
        c.draw_series(rows.iter().enumerate().map(|(p, (_, r))| {
            let y0 = p as f64 + 0.1 + 0.8 * a as f64 / n;
            let y1 = y0 + 0.8 / n;
            Rectangle::new([(0.0, y0), (r[a].min(top * 1.05), y1)], color.filled())
        }))?
        .label(*name)
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    c.draw_series(std::iter::once(PathElement::new(
        vec![(1.0, 0.0), (1.0, rows.len() as f64)],
        BLACK,
    )))?;
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
