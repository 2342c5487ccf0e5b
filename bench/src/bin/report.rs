//! The benchmark report: percpu-alloc beside system malloc, jemalloc and
//! mimalloc, same work, same run, as a Markdown report and two SVG charts.
//!
//! ```text
//! cargo run --release -p percpu-bench --bin report                  # quick mode (the default), a few minutes
//! cargo run --release -p percpu-bench --bin report -- --full        # more rounds, bigger workloads
//! cargo run --release -p percpu-bench --bin report -- --out DIR     # default target/percpu-report/
//! cargo run --release -p percpu-bench --bin report -- --docs        # docs/benchmarks.md and the README summary
//! cargo run --release -p percpu-bench --bin report -- --json FILE   # add a JSON document (repeatable)
//! cargo run --release -p percpu-bench --bin report -- --rounds N    # rounds of the whole programs
//! cargo run --release -p percpu-bench --bin report -- --no-build     # reuse the binaries of an earlier run
//! cargo run --release -p percpu-bench --bin report -- --only batch   # only the matching whole programs (repeatable)
//! ```
//!
//! `--only SUBSTRING` keeps the whole-program cases whose label contains
//! one of the substrings given and skips part 2, so one question (say
//! `--only "hot pair" --only batch`) takes a minute rather than the whole
//! report; targets whose cases did not run read "not run".
//!
//! Three parts:
//!
//! 1. Builds `src/bin/workloads.rs` five times (and `pair_floor` once) with nested
//!    `cargo build --release -p percpu-bench --bin workloads` (no feature: system
//!    malloc; `global-jemalloc`; `global-mimalloc`; `global-percpu`: percpu,
//!    declared in the program as an application would; `global-percpu,hardened`,
//!    for the feature's cost) and
//!    copies each binary to `TARGET/percpu-report/bin/`, because cargo writes every build to
//!    the same path.
//! 2. Micro workloads in this process (hot pair per size, batches, realloc
//!    growth), calling each allocator's `GlobalAlloc` directly: short
//!    chunks taken in turn (system, jemalloc, mimalloc, percpu rseq, percpu
//!    fallback; each round starts one later), each ratio the median over
//!    rounds of one chunk's time against the other allocator's chunk of
//!    the same round. A slow phase of a shared host hits a whole round
//!    alike, so the ratios hold where absolute times swing.
//! 3. Whole programs, each allocator the global allocator of its own child
//!    process (the percpu fallback row is the percpu binary run with
//!    `GLIBC_TUNABLES=glibc.pthread.rseq=0`; each percpu child checks its
//!    path and refuses to run on the wrong one), interleaved the same way
//!    over several rounds: median, min-max spread, per-round ratios, peak
//!    RSS. The hot pair and the batches of part 2 are here too, written as
//!    a program writes them (`Box::new`, `Vec::with_capacity`), because
//!    the allocator a program reaches through `__rust_alloc` is inlined
//!    differently from a `GlobalAlloc` called in this process. Last, the
//!    pairs and batches again, the `hardened` build against the plain one,
//!    and `pair_floor` (the hot pair's loop under a null allocator, and
//!    bare sections) beside the jemalloc and percpu pairs.
//!
//! The targets are checked against this run's ratios, the whole-program
//! ones first; those from part 2 are marked in-process.
//!
//! The report is written to `OUT/benchmarks.md` (and printed), the charts
//! to `OUT/benchmarks/scaling.svg` and `OUT/benchmarks/memory.svg`; with
//! `--readme FILE` a short summary table replaces the lines between
//! `<!-- benchmark-summary:begin -->` and `<!-- benchmark-summary:end -->`
//! of FILE. `--docs` writes the repository's own copy (`docs/` and
//! `README.md`). Quote ratios, not times.

use std::alloc::System;
use std::fmt::Write as _;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use mimalloc::MiMalloc;
use percpu_alloc::{Config, Path, PerCpuAlloc};
use tikv_jemallocator::Jemalloc;

use percpu_bench::host::{machine_header, median, repo_root, target_dir};
use percpu_bench::micro::{self, Batch, Growth, Order, BATCH_SIZES, PAIR_SIZES};

static PERCPU: PerCpuAlloc = PerCpuAlloc::new();
static FALLBACK: PerCpuAlloc = PerCpuAlloc::with_config(Config::new().with_force_fallback(true));

/// The five rows of every table, in order.
const ALLOCS: [&str; 5] = [
    "system",
    "jemalloc",
    "mimalloc",
    "percpu rseq",
    "percpu fallback",
];
const SYS: usize = 0;
const JE: usize = 1;
const MI: usize = 2;
const RSEQ: usize = 3;
const FB: usize = 4;

/// Runs `$body` with `$a` bound to allocator number `$i` of [`ALLOCS`],
/// each arm monomorphised, so no dispatch sits on the measured path.
macro_rules! on_alloc {
    ($i:expr, |$a:ident| $body:expr) => {
        match $i {
            SYS => {
                let $a = &System;
                $body
            }
            JE => {
                let $a = &Jemalloc;
                $body
            }
            MI => {
                let $a = &MiMalloc;
                $body
            }
            RSEQ => {
                let $a = &PERCPU;
                $body
            }
            _ => {
                let $a = &FALLBACK;
                $body
            }
        }
    };
}

/// Per-round figures of five allocators, kept by round so that ratios are
/// taken within a round.
struct Rounds(Vec<[f64; 5]>);

impl Rounds {
    fn median(&self, i: usize) -> f64 {
        median(self.0.iter().map(|r| r[i]).collect())
    }

    /// Median over rounds of `i`'s figure divided by `j`'s.
    fn ratio(&self, i: usize, j: usize) -> f64 {
        median(self.0.iter().map(|r| r[i] / r[j]).collect())
    }

    fn min(&self, i: usize) -> f64 {
        self.0.iter().map(|r| r[i]).fold(f64::INFINITY, f64::min)
    }

    fn max(&self, i: usize) -> f64 {
        self.0.iter().map(|r| r[i]).fold(0.0, f64::max)
    }
}

/// Runs `chunk(allocator)` for every allocator, `rounds` times, starting
/// one allocator later each round, after one unrecorded warm-up chunk each.
fn interleave(rounds: usize, mut chunk: impl FnMut(usize) -> f64) -> Rounds {
    for i in 0..ALLOCS.len() {
        chunk(i);
    }
    let mut out = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let mut t = [0.0; 5];
        for k in 0..ALLOCS.len() {
            let i = (r + k) % ALLOCS.len();
            t[i] = chunk(i);
        }
        out.push(t);
    }
    Rounds(out)
}

// ---------------------------------------------------------------------------
// Options.

struct Options {
    full: bool,
    /// Where `benchmarks.md` and its charts go.
    out: PathBuf,
    /// A README whose summary (between [`SUMMARY_BEGIN`] and
    /// [`SUMMARY_END`]) this run rewrites.
    readme: Option<PathBuf>,
    rounds: usize,
    micro_rounds: usize,
    /// Alloc+free operations per micro chunk.
    chunk_ops: usize,
    json_files: Vec<PathBuf>,
    /// Reuse the binaries in `TARGET/percpu-report/bin`, for a machine with no cargo or no
    /// registry (the binaries were built elsewhere and copied over).
    no_build: bool,
    /// Substrings of the whole-program labels to run; empty runs them all
    /// and the micro part too.
    only: Vec<String>,
}

const USAGE: &str = "usage: report [--quick | --full] [--out DIR] [--readme FILE] [--docs]
              [--rounds N] [--json FILE]... [--no-build] [--only SUBSTRING]...
  --quick      the default: 5 rounds of short whole programs, 11 micro rounds
  --full       7 rounds, bigger programs (1024 threads, depth 18), 31 micro rounds
  --out DIR    where benchmarks.md and its charts go (target/percpu-report/)
  --readme FILE
               also rewrite the benchmark summary of FILE, between its
               <!-- benchmark-summary:begin/end --> lines
  --docs       the repository's own copy: --out docs --readme README.md
  --rounds N   rounds of the whole programs
  --json FILE  also run the JSON workload on FILE (repeatable); the corpora in
               ../shared/data/json are used when that folder exists
  --no-build   use the workload binaries already in TARGET/percpu-report/bin
  --only SUBSTRING
               run only the whole programs whose label contains SUBSTRING
               (repeatable: any of them), and skip the in-process micro part;
               e.g. --only 'hot pair' --only batch (a bare 'pair' also
               matches the producer-consumer cases, 'N pairs')";

fn parse_args(args: &[String]) -> Result<Option<Options>, String> {
    let mut full = false;
    let mut out = None;
    let mut readme = None;
    let mut rounds = None;
    let mut json_files = Vec::new();
    let mut no_build = false;
    let mut only = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => full = false,
            "--full" => full = true,
            "--out" => out = Some(PathBuf::from(it.next().ok_or("--out needs a folder")?)),
            "--readme" => readme = Some(PathBuf::from(it.next().ok_or("--readme needs a file")?)),
            "--docs" => {
                out = Some(repo_root().join("docs"));
                readme = Some(repo_root().join("README.md"));
            }
            "--rounds" => {
                rounds = Some(
                    it.next()
                        .and_then(|n| n.parse().ok())
                        .filter(|&n: &usize| n > 0)
                        .ok_or("--rounds needs a positive number")?,
                )
            }
            "--json" => json_files.push(PathBuf::from(it.next().ok_or("--json needs a file")?)),
            "--no-build" => no_build = true,
            "--only" => only.push(it.next().ok_or("--only needs a substring")?.clone()),
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let corpora = repo_root().join("../shared/data/json");
    for name in ["canada.json", "citm_catalog.json", "twitter.json"] {
        let file = corpora.join(name);
        if file.is_file() {
            json_files.push(file);
        }
    }
    Ok(Some(Options {
        full,
        out: out.unwrap_or_else(|| target_dir().join("percpu-report")),
        readme,
        rounds: rounds.unwrap_or(if full { 7 } else { 5 }),
        micro_rounds: if full { 31 } else { 11 },
        chunk_ops: if full { 1 << 19 } else { 1 << 17 },
        json_files,
        no_build,
        only,
    }))
}

// ---------------------------------------------------------------------------
// Part 1: the builds: `workloads` five times, `pair_floor` once.

/// (copy's name, cargo binary, cargo features) of each build: `workloads`
/// once per allocator and once more as the percpu program with `hardened`,
/// whose cost has its own table; and `pair_floor`, the parts of the hot
/// pair's time no allocator removes.
const BUILDS: [(&str, &str, &str); 6] = [
    ("workloads-system", "workloads", ""),
    ("workloads-jemalloc", "workloads", "global-jemalloc"),
    ("workloads-mimalloc", "workloads", "global-mimalloc"),
    ("workloads-percpu", "workloads", "global-percpu"),
    (
        "workloads-percpu-hardened",
        "workloads",
        "global-percpu,hardened",
    ),
    ("pair_floor", "pair_floor", ""),
];
/// The percpu build in [`BUILDS`], the same program with `hardened`, and
/// `pair_floor`.
const PERCPU_BIN: usize = 3;
const HARDENED_BIN: usize = 4;
const FLOOR_BIN: usize = 5;

/// Where the workload binaries are kept: under the target folder, never
/// beside the report (which may be the repository's `docs/`).
fn bin_dir() -> PathBuf {
    target_dir().join("percpu-report/bin")
}

fn build_workloads() -> Result<Vec<PathBuf>, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = FsPath::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let target = target_dir();
    let bin_dir = bin_dir();
    std::fs::create_dir_all(&bin_dir).map_err(|e| format!("{}: {e}", bin_dir.display()))?;
    let mut bins = Vec::new();
    for (name, program, features) in BUILDS {
        eprintln!("building {name}");
        let mut cmd = Command::new(&cargo);
        cmd.args(["build", "--release", "--quiet", "--bin", program])
            .arg("--manifest-path")
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&target);
        if !features.is_empty() {
            cmd.args(["--features", features]);
        }
        let status = cmd
            .status()
            .map_err(|e| format!("cannot run {cargo}: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build of {name} failed ({status})"));
        }
        let built = target.join("release").join(program);
        let bin = bin_dir.join(name);
        // Copied to a new file (not over a running one) each time.
        let _ = std::fs::remove_file(&bin);
        std::fs::copy(&built, &bin).map_err(|e| format!("{}: {e}", built.display()))?;
        bins.push(bin);
    }
    Ok(bins)
}

// ---------------------------------------------------------------------------
// Part 2: micro workloads in this process.

struct MicroRow {
    group: &'static str,
    name: String,
    /// Pair size in bytes, or live blocks of a batch.
    size: usize,
    rounds: Rounds,
}

fn run_micro(opts: &Options) -> Vec<MicroRow> {
    assert_eq!(
        FALLBACK.path(),
        Path::Fallback,
        "force_fallback was ignored"
    );
    let mut rows = Vec::new();
    let ns_per = |start: Instant, ops: usize| start.elapsed().as_nanos() as f64 / ops as f64;
    eprint!("micro: hot pair");
    for size in PAIR_SIZES {
        let n = opts.chunk_ops;
        let rounds = interleave(opts.micro_rounds, |i| {
            let start = Instant::now();
            on_alloc!(i, |a| micro::pair(a, size, n));
            ns_per(start, n)
        });
        rows.push(MicroRow {
            group: "pair",
            name: format!("hot pair, {size} B"),
            size,
            rounds,
        });
    }
    eprint!(", batches");
    for n in BATCH_SIZES {
        for order in Order::ALL {
            let mut batch = Batch::new(n, order);
            let reps = (opts.chunk_ops / n).max(1);
            let rounds = interleave(opts.micro_rounds, |i| {
                let start = Instant::now();
                on_alloc!(i, |a| batch.run(a, reps));
                ns_per(start, reps * batch.blocks())
            });
            rows.push(MicroRow {
                group: "batch",
                name: format!("batch of {n}, {} free", order.name()),
                size: n,
                rounds,
            });
        }
    }
    eprintln!(", realloc growth");
    for g in Growth::ALL {
        let reps = (opts.chunk_ops / g.calls()).max(1);
        let rounds = interleave(opts.micro_rounds, |i| {
            let start = Instant::now();
            on_alloc!(i, |a| g.run(a, reps));
            ns_per(start, reps * g.calls())
        });
        rows.push(MicroRow {
            group: "growth",
            name: g.name().to_string(),
            size: 0,
            rounds,
        });
    }
    rows
}

// ---------------------------------------------------------------------------
// Part 3: whole programs in child processes.

/// What a case is, for the tables and the targets that pick it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    ProdCons,
    Scaling,
    ManyThreads,
    /// serde_json on a corpus file (`--json` or ../shared/data/json).
    JsonCorpus,
    /// serde_json on a generated document.
    JsonGenerated,
    BinaryTrees,
    BTree,
    /// `Box::new` (zeroed: `Box::new([0; size])`, else `Box::new_uninit`)
    /// and drop of `size` bytes.
    Pair {
        size: usize,
        zeroed: bool,
    },
    /// This many live blocks of 8..=256 bytes, freed in random order.
    BatchMixed(usize),
    /// This many live blocks of [`ONE_CLASS`] bytes, freed in random order.
    BatchOneClass(usize),
    Other,
}

/// The block size of the single-class batches: one class, so "past the
/// cap" is exact, as in the in-process batches.
const ONE_CLASS: usize = micro::BATCH_BLOCK;

struct Case {
    label: String,
    kind: Kind,
    workload: &'static str,
    args: Vec<String>,
    /// Threads or pairs, for the scaling chart and tables.
    threads: usize,
}

fn cases(opts: &Options) -> Vec<Case> {
    let full = opts.full;
    let case = |label: String, kind, workload, args: &[String], threads| Case {
        label,
        kind,
        workload,
        args: args.to_vec(),
        threads,
    };
    let mut v = Vec::new();
    let blocks = if full { 1_000_000 } else { 100_000 };
    for pairs in [1, 2, 4] {
        v.push(case(
            format!("prodcons, {pairs} pair{}", if pairs > 1 { "s" } else { "" }),
            Kind::ProdCons,
            "prodcons",
            &[format!("pairs={pairs}"), format!("blocks={blocks}")],
            pairs,
        ));
    }
    let ops = if full { 1_000_000 } else { 100_000 };
    for threads in [1, 2, 4, 8, 16, 32] {
        v.push(case(
            format!(
                "scaling, {threads} thread{}",
                if threads > 1 { "s" } else { "" }
            ),
            Kind::Scaling,
            "scaling",
            &[format!("threads={threads}"), format!("ops={ops}")],
            threads,
        ));
    }
    let (threads, steps) = if full { (1024, 10_000) } else { (512, 1_000) };
    v.push(case(
        format!("many threads, {threads}"),
        Kind::ManyThreads,
        "many_threads",
        &[format!("threads={threads}"), format!("steps={steps}")],
        threads,
    ));
    let iters = if full { 10 } else { 2 };
    v.push(case(
        "json, generated".into(),
        Kind::JsonGenerated,
        "json",
        &[
            format!("records={}", if full { 5000 } else { 2000 }),
            format!("iters={iters}"),
        ],
        1,
    ));
    for file in &opts.json_files {
        let stem = file
            .file_stem()
            .map_or("?".into(), |s| s.to_string_lossy().into_owned());
        v.push(case(
            format!("json, {stem}"),
            Kind::JsonCorpus,
            "json",
            &[format!("file={}", file.display()), format!("iters={iters}")],
            1,
        ));
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let depth = if full { 18 } else { 16 };
    v.push(case(
        format!("binary-trees, depth {depth}, {cores} threads"),
        Kind::BinaryTrees,
        "binary_trees",
        &[format!("depth={depth}"), format!("threads={cores}")],
        cores,
    ));
    let scale = if full { 1 } else { 3 };
    v.push(case(
        "BTreeMap<String, Vec<u8>> churn".into(),
        Kind::BTree,
        "btree",
        &[format!("ops={}", 600_000 / scale)],
        1,
    ));
    v.push(case(
        "Vec<Box<[u8]>> churn".into(),
        Kind::Other,
        "vec_box",
        &[format!("ops={}", 12_000_000 / scale / 2)],
        1,
    ));
    v.push(case(
        "strings (format!, push_str)".into(),
        Kind::Other,
        "strings",
        &[format!("ops={}", 360_000 / scale / 2)],
        1,
    ));
    // (size, zeroed) per hot pair. Quick mode keeps the 256-byte pair for
    // `Box::new([0; 256])` alone: a value built before the alloc and moved
    // in after, which an inlined alloc can get in the way of
    // (docs/design.md, "An alloc the optimiser can see across").
    let pairs: &[(usize, bool)] = if full {
        &[
            (16, true),
            (16, false),
            (64, true),
            (64, false),
            (256, true),
            (256, false),
        ]
    } else {
        &[(64, true), (64, false), (256, true)]
    };
    let pair_ops = PAIR_OPS_QUICK * if full { 3 } else { 1 };
    for &(size, zeroed) in pairs {
        let (label, init) = if zeroed {
            (
                format!("hot pair, {size} B, Box::new([0; {size}])"),
                "zeroed",
            )
        } else {
            (format!("hot pair, {size} B, Box::new_uninit"), "none")
        };
        v.push(case(
            label,
            Kind::Pair { size, zeroed },
            "pair",
            &[
                format!("size={size}"),
                format!("ops={pair_ops}"),
                format!("init={init}"),
            ],
            1,
        ));
    }
    let batch_ops = |live| {
        let quick = match live {
            100 => BATCH_OPS_QUICK[0],
            1000 => BATCH_OPS_QUICK[1],
            _ => BATCH_OPS_QUICK[2],
        };
        format!("ops={}", if full { quick * 3 } else { quick })
    };
    for live in [100, 1000] {
        v.push(case(
            format!("batch of {live}, mixed 8-256 B, random free"),
            Kind::BatchMixed(live),
            "batch",
            &[
                format!("live={live}"),
                batch_ops(live),
                "sizes=mixed".into(),
                "order=random".into(),
            ],
            1,
        ));
    }
    for live in [1000, 10_000] {
        v.push(case(
            format!("batch of {live}, {ONE_CLASS} B each, random free"),
            Kind::BatchOneClass(live),
            "batch",
            &[
                format!("live={live}"),
                batch_ops(live),
                format!("sizes={ONE_CLASS}"),
                "order=random".into(),
            ],
            1,
        ));
    }
    if !opts.only.is_empty() {
        v.retain(|c| opts.only.iter().any(|o| c.label.contains(o.as_str())));
    }
    v
}

// Alloc+free pairs per child in quick mode (three times as many in full
// mode): about 0.35-0.45 s under jemalloc on a 2-CPU cloud host (3.4 ns
// a hot pair, 6-14 ns a batched pair), up to three times that for system
// malloc and the fallback path: long enough that a scheduler tick or a
// page fault more or less in one child does not move a round's ratio.

/// The hot pair.
const PAIR_OPS_QUICK: usize = 100_000_000;
/// The batches of 100 (mixed), 1000 (mixed and single-class) and 10 000.
const BATCH_OPS_QUICK: [usize; 3] = [60_000_000, 50_000_000, 30_000_000];

#[derive(Clone, Copy, Default)]
struct Sample {
    ns: f64,
    ops: f64,
    rss_kib: f64,
    je_allocated: Option<f64>,
    je_resident: Option<f64>,
    cached: Option<f64>,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Runs one child: allocator `i` of [`ALLOCS`] on `case`.
fn run_child(bins: &[PathBuf], i: usize, case: &Case) -> Result<Sample, String> {
    let (bin, alloc, path) = match i {
        SYS => (&bins[0], "system", "-"),
        JE => (&bins[1], "jemalloc", "-"),
        MI => (&bins[2], "mimalloc", "-"),
        RSEQ => (&bins[PERCPU_BIN], "percpu", "rseq"),
        _ => (&bins[PERCPU_BIN], "percpu", "fallback"),
    };
    run_bin(
        bin,
        alloc,
        path,
        &format!("{} / {}", ALLOCS[i], case.label),
        case,
    )
}

/// Runs `bin` on `case` and checks that it ran `alloc` on `path` (`-`
/// for the allocators without one; `fallback` turns glibc's rseq off).
fn run_bin(
    bin: &FsPath,
    alloc: &str,
    path: &str,
    what: &str,
    case: &Case,
) -> Result<Sample, String> {
    let mut cmd = Command::new(bin);
    cmd.arg(case.workload).args(&case.args);
    if path != "-" {
        cmd.arg(format!("expect-path={path}"));
    }
    if path == "fallback" {
        cmd.env("GLIBC_TUNABLES", "glibc.pthread.rseq=0");
    }
    let line = result_line(cmd, what)?;
    let line = line.as_str();
    if field(line, "alloc") != Some(alloc) || field(line, "path") != Some(path) {
        return Err(format!(
            "{what}: asked for {alloc} on path {path}, got {line:?}"
        ));
    }
    let num = |key| field(line, key).and_then(|v| v.parse::<f64>().ok());
    let need = |key| num(key).ok_or_else(|| format!("{what}: no {key} in {line:?}"));
    Ok(Sample {
        ns: need("ns")?,
        ops: need("ops")?,
        // VmHWM where /proc has it: the child's ru_maxrss starts at this
        // parent's RSS (see `peak_hwm_kib` in workloads.rs).
        rss_kib: num("hwm_kib").map_or_else(|| need("maxrss_kib"), Ok)?,
        je_allocated: num("je_allocated"),
        je_resident: num("je_resident"),
        cached: num("cached"),
    })
}

/// samples[case][round][allocator]
fn run_programs(
    opts: &Options,
    bins: &[PathBuf],
    cases: &[Case],
) -> Result<Vec<Vec<[Sample; 5]>>, String> {
    let mut samples = vec![Vec::new(); cases.len()];
    for round in 0..opts.rounds {
        eprint!("whole programs, round {}/{}:", round + 1, opts.rounds);
        for (c, case) in cases.iter().enumerate() {
            eprint!(" {}", case.workload);
            let mut row = [Sample::default(); 5];
            for k in 0..ALLOCS.len() {
                let i = (round + c + k) % ALLOCS.len();
                row[i] = run_child(bins, i, case)?;
            }
            samples[c].push(row);
        }
        eprintln!();
    }
    Ok(samples)
}

/// The pairs and batches, the hit paths' workloads, that the `hardened`
/// table covers.
fn hit_path_case(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Pair { .. } | Kind::BatchMixed(_) | Kind::BatchOneClass(_)
    )
}

/// Per [`hit_path_case`], the time of the `hardened` percpu program over
/// the plain one's, each round (the two interleaved, each round starting
/// with the other).
fn run_hardened(
    opts: &Options,
    bins: &[PathBuf],
    cases: &[Case],
) -> Result<Vec<(String, Vec<f64>)>, String> {
    let picked: Vec<&Case> = cases.iter().filter(|c| hit_path_case(c.kind)).collect();
    let mut ratios: Vec<(String, Vec<f64>)> = picked
        .iter()
        .map(|c| (c.label.clone(), Vec::new()))
        .collect();
    for round in 0..opts.rounds {
        eprint!(
            "hardened against plain, round {}/{}:",
            round + 1,
            opts.rounds
        );
        for (k, case) in picked.iter().enumerate() {
            eprint!(" {}", case.workload);
            let mut ns = [0.0; 2];
            for j in 0..2 {
                let b = (round + k + j) % 2;
                let (bin, name) = if b == 0 {
                    (PERCPU_BIN, "percpu")
                } else {
                    (HARDENED_BIN, "percpu hardened")
                };
                let what = format!("{name} / {}", case.label);
                ns[b] = run_bin(&bins[bin], "percpu", "rseq", &what, case)?.ns;
            }
            ratios[k].1.push(ns[1] / ns[0]);
        }
        eprintln!();
    }
    Ok(ratios)
}

/// What one round of the floor measured, in ns per pair: `pair_floor`'s
/// loop under a null allocator and its bare sections (`None` where it
/// has no rseq area), and beside them the same 64-byte uninitialised pair
/// under jemalloc and under percpu.
#[derive(Clone, Copy)]
struct Floor {
    loop_ns: f64,
    sections_ns: Option<f64>,
    /// The count word's round trips alone.
    chain_ns: Option<f64>,
    /// Two try-lock takes and releases (the fallback's per-pair minimum).
    locks_ns: f64,
    jemalloc_ns: f64,
    percpu_ns: f64,
}

/// `pair_floor` once per round, with the pair case's operation count, and
/// the jemalloc and percpu pair beside it (the three interleaved, so the
/// ratios are of neighbouring runs); empty when no 64-byte uninitialised
/// pair runs.
fn run_floor(opts: &Options, bins: &[PathBuf], cases: &[Case]) -> Result<Vec<Floor>, String> {
    let Some(pair) = cases.iter().find(|c| {
        c.kind
            == Kind::Pair {
                size: 64,
                zeroed: false,
            }
    }) else {
        return Ok(Vec::new());
    };
    let ops = pair
        .args
        .iter()
        .find(|a| a.starts_with("ops="))
        .ok_or("the pair case has no ops")?;
    let bin = &bins[FLOOR_BIN];
    let mut floors = Vec::new();
    eprint!("pair floor, {} rounds", opts.rounds);
    for round in 0..opts.rounds {
        let pair_ns = |i: usize, alloc: &str, path: &str| {
            run_bin(
                &bins[i],
                alloc,
                path,
                &format!("{alloc} / the floor's pair"),
                pair,
            )
            .map(|s| s.ns / s.ops)
        };
        // The three in turn, each round starting with the next one.
        let (mut jemalloc_ns, mut percpu_ns, mut line) = (0.0, 0.0, String::new());
        for k in 0..3 {
            match (round + k) % 3 {
                0 => jemalloc_ns = pair_ns(JE, "jemalloc", "-")?,
                1 => percpu_ns = pair_ns(PERCPU_BIN, "percpu", "rseq")?,
                _ => {
                    let mut cmd = Command::new(bin);
                    cmd.arg(ops);
                    line = result_line(cmd, "pair_floor")?;
                }
            }
        }
        let num = |key| field(&line, key).and_then(|v| v.parse::<f64>().ok());
        let n = num("ops").ok_or("pair_floor: no ops")?;
        floors.push(Floor {
            loop_ns: num("loop_ns").ok_or("pair_floor: no loop_ns")? / n,
            sections_ns: num("sections_ns").map(|ns| ns / n),
            chain_ns: num("chain_ns").map(|ns| ns / n),
            locks_ns: num("locks_ns").ok_or("pair_floor: no locks_ns")? / n,
            jemalloc_ns,
            percpu_ns,
        });
    }
    eprintln!();
    Ok(floors)
}

/// Runs `cmd`, a child that prints a `result ...` line, and returns that
/// line; a child that fails or prints none is an error naming `what`.
fn result_line(mut cmd: Command, what: &str) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: cannot run {cmd:?}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{what}: child failed ({})\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    stdout
        .lines()
        .find(|l| l.starts_with("result "))
        .map(str::to_string)
        .ok_or_else(|| format!("{what}: no result line in {stdout:?}"))
}

fn rounds_of(samples: &[[Sample; 5]], f: impl Fn(&Sample) -> f64) -> Rounds {
    Rounds(samples.iter().map(|r| r.each_ref().map(&f)).collect())
}

// ---------------------------------------------------------------------------
// The report.

fn micro_table(md: &mut String, rows: &[MicroRow]) {
    let _ = writeln!(
        md,
        "| workload | system | jemalloc | mimalloc | percpu rseq | percpu fallback | rseq / jemalloc | rseq / system | rseq / mimalloc | fallback / jemalloc |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let r = &row.rounds;
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} |",
            row.name,
            r.median(SYS),
            r.median(JE),
            r.median(MI),
            r.median(RSEQ),
            r.median(FB),
            r.ratio(RSEQ, JE),
            r.ratio(RSEQ, SYS),
            r.ratio(RSEQ, MI),
            r.ratio(FB, JE),
        );
    }
}

fn mib(kib: f64) -> f64 {
    kib / 1024.0
}

fn programs_table(md: &mut String, cases: &[Case], samples: &[Vec<[Sample; 5]>]) {
    let _ = writeln!(
        md,
        "| workload | allocator | median ms | min–max ms | vs system | vs jemalloc | peak RSS MiB | jemalloc allocated / resident MiB | cached KiB |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (case, s) in cases.iter().zip(samples) {
        let t = rounds_of(s, |x| x.ns / 1e6);
        let rss = rounds_of(s, |x| mib(x.rss_kib));
        for (i, alloc) in ALLOCS.iter().enumerate() {
            let je = match (
                s.iter()
                    .filter_map(|r| r[i].je_allocated)
                    .collect::<Vec<_>>(),
                s.iter()
                    .filter_map(|r| r[i].je_resident)
                    .collect::<Vec<_>>(),
            ) {
                (a, r) if !a.is_empty() && !r.is_empty() => format!(
                    "{:.1} / {:.1}",
                    median(a) / 1048576.0,
                    median(r) / 1048576.0
                ),
                _ => "-".into(),
            };
            let cached: Vec<f64> = s.iter().filter_map(|r| r[i].cached).collect();
            let cached = if cached.is_empty() {
                "-".into()
            } else {
                format!("{:.0}", median(cached) / 1024.0)
            };
            let _ = writeln!(
                md,
                "| {} | {alloc} | {:.1} | {:.1}–{:.1} | {:.2} | {:.2} | {:.1} | {je} | {cached} |",
                case.label,
                t.median(i),
                t.min(i),
                t.max(i),
                t.ratio(i, SYS),
                t.ratio(i, JE),
                rss.median(i),
            );
        }
    }
}

/// Million operations per second of each allocator, from its median time.
fn throughput(s: &[[Sample; 5]]) -> [f64; 5] {
    let ops = s.first().map_or(0.0, |r| r[0].ops);
    let t = rounds_of(s, |x| x.ns);
    std::array::from_fn(|i| ops / t.median(i) * 1e3)
}

fn scaling_table(md: &mut String, cases: &[Case], samples: &[Vec<[Sample; 5]>]) {
    let _ = writeln!(md, "| threads | system | jemalloc | mimalloc | percpu rseq | percpu fallback | rseq / jemalloc (time) |");
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|");
    for (case, s) in cases.iter().zip(samples) {
        if case.kind != Kind::Scaling {
            continue;
        }
        let m = throughput(s);
        let r = rounds_of(s, |x| x.ns).ratio(RSEQ, JE);
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {r:.2} |",
            case.threads, m[0], m[1], m[2], m[3], m[4]
        );
    }
}

/// One target: its text, what this run measured, and whether it was met
/// (`None`: none of its cases ran).
struct Target {
    what: String,
    measured: String,
    met: Option<bool>,
}

/// The worst (largest) of some named ratios, with its name, and their
/// median: a target holds only if its worst row holds, and the median
/// says whether a miss is one row or all of them.
fn worst(rows: &[(String, f64)]) -> (String, f64, f64) {
    let (name, w) = rows.iter().fold(("none", f64::NEG_INFINITY), |a, b| {
        if b.1 > a.1 || b.1.is_nan() {
            (b.0.as_str(), b.1)
        } else {
            a
        }
    });
    (
        name.to_string(),
        w,
        median(rows.iter().map(|x| x.1).collect()),
    )
}

/// A target on named ratios: met when the worst is at most `limit` (below
/// it, where `strict`); one row is shown bare, several as worst and median.
fn limit_target(what: String, rows: Vec<(String, f64)>, limit: f64, strict: bool) -> Target {
    if rows.is_empty() {
        return Target {
            what,
            measured: "not run".into(),
            met: None,
        };
    }
    let (name, w, med) = worst(&rows);
    Target {
        what,
        measured: if rows.len() == 1 {
            format!("{w:.2}x")
        } else {
            format!("worst {w:.2}x ({name}), median {med:.2}x")
        },
        met: Some(if strict { w < limit } else { w <= limit }),
    }
}

fn targets(
    micro: &[MicroRow],
    cases: &[Case],
    samples: &[Vec<[Sample; 5]>],
    hardened: &[(String, Vec<f64>)],
) -> Vec<Target> {
    // Median over rounds of the per-round time ratio of allocator `i` to
    // `j`, for every case of a kind.
    let ratios = |pick: &dyn Fn(Kind) -> bool, i: usize, j: usize| -> Vec<(String, f64)> {
        cases
            .iter()
            .zip(samples)
            .filter(|(c, _)| pick(c.kind))
            .map(|(c, s)| (c.label.clone(), rounds_of(s, |x| x.ns).ratio(i, j)))
            .collect()
    };
    let of = |kind: Kind| move |k: Kind| k == kind;
    let mut t = Vec::new();
    let pair = |k: Kind| matches!(k, Kind::Pair { size: 64, .. });
    for zeroed in [true, false] {
        let this = move |k: Kind| k == Kind::Pair { size: 64, zeroed };
        let how = if zeroed {
            "Box::new([0; 64])"
        } else {
            "Box::new_uninit"
        };
        t.push(limit_target(
            format!("hot pair, 64 B, {how}: <= 0.7x jemalloc"),
            ratios(&this, RSEQ, JE),
            0.7,
            false,
        ));
        t.push(limit_target(
            format!("hot pair, 64 B, {how}: <= 0.35x system malloc (glibc)"),
            ratios(&this, RSEQ, SYS),
            0.35,
            false,
        ));
    }
    for (live, limit) in [(100, 0.9), (1000, 0.8)] {
        t.push(limit_target(
            format!("batch of {live}, mixed 8-256 B, random free: <= {limit}x jemalloc"),
            ratios(&of(Kind::BatchMixed(live)), RSEQ, JE),
            limit,
            false,
        ));
    }
    for live in [1000, 10_000] {
        t.push(limit_target(
            format!(
                "batch of {live}, {ONE_CLASS} B each (past the cap), random free: <= 1.05x jemalloc"
            ),
            ratios(&of(Kind::BatchOneClass(live)), RSEQ, JE),
            1.05,
            false,
        ));
    }
    t.push(limit_target(
        "binary-trees: <= 1.05x jemalloc".into(),
        ratios(&of(Kind::BinaryTrees), RSEQ, JE),
        1.05,
        false,
    ));
    let json = ratios(&of(Kind::JsonCorpus), RSEQ, JE);
    if json.is_empty() {
        t.push(limit_target(
            "serde_json roundtrip of a JSON corpus: <= 0.95x jemalloc".into(),
            Vec::new(),
            0.95,
            false,
        ));
    }
    for row in json {
        t.push(limit_target(
            format!("serde_json roundtrip ({}): <= 0.95x jemalloc", row.0),
            vec![row],
            0.95,
            false,
        ));
    }
    t.push(limit_target(
        "BTreeMap<String, Vec<u8>> churn: <= 0.95x jemalloc".into(),
        ratios(&of(Kind::BTree), RSEQ, JE),
        0.95,
        false,
    ));
    t.push(limit_target(
        "producer-consumer: no slower than jemalloc at any pair count (<= 1.0x)".into(),
        ratios(&of(Kind::ProdCons), RSEQ, JE),
        1.0,
        false,
    ));
    t.push(limit_target(
        "thread scaling: no slower than jemalloc at any thread count (<= 1.0x)".into(),
        ratios(&of(Kind::Scaling), RSEQ, JE),
        1.0,
        false,
    ));
    t.push(limit_target(
        "fallback path, hot pair, 64 B: percpu fallback <= 1.5x jemalloc".into(),
        ratios(&pair, FB, JE),
        1.5,
        false,
    ));
    for (c, s) in cases.iter().zip(samples) {
        if c.kind == Kind::ManyThreads {
            let rss = rounds_of(s, |x| mib(x.rss_kib));
            let (p, j, f) = (rss.median(RSEQ), rss.median(JE), rss.median(FB));
            t.push(Target {
                what: "many threads: peak RSS below jemalloc's".into(),
                met: Some(p < j),
                measured: format!(
                    "{}: rseq {p:.1} MiB, fallback {f:.1} MiB, jemalloc {j:.1} MiB ({:.2}x)",
                    c.label,
                    p / j
                ),
            });
        }
    }

    t.push(limit_target(
        "hardened: at most 1.15x the plain percpu program, hot pairs and batches".into(),
        hardened
            .iter()
            .map(|(label, r)| (label.clone(), median(r.clone())))
            .collect(),
        1.15,
        false,
    ));

    let cached = Config::new().max_cached_size();
    let micro_ratios = |pick: &dyn Fn(&MicroRow) -> bool, i: usize, j: usize| {
        micro
            .iter()
            .filter(|r| pick(r))
            .map(|r| (r.name.clone(), r.rounds.ratio(i, j)))
            .collect::<Vec<_>>()
    };
    let pairs = |r: &MicroRow| r.group == "pair" && r.size <= cached;
    let within = |r: &MicroRow| r.group == "batch" && r.size <= 256;
    let past = |r: &MicroRow| r.group == "batch" && r.size > 256;
    t.push(limit_target(
        "in-process: hot pair <= 0.6x jemalloc, every cached class".into(),
        micro_ratios(&pairs, RSEQ, JE),
        0.6,
        false,
    ));
    t.push(limit_target(
        "in-process: hot pair <= 0.3x system malloc, every cached class".into(),
        micro_ratios(&pairs, RSEQ, SYS),
        0.3,
        false,
    ));
    t.push(limit_target(
        "in-process: hot pair faster than mimalloc, every cached class".into(),
        micro_ratios(&pairs, RSEQ, MI),
        1.0,
        true,
    ));
    t.push(limit_target(
        "in-process: batches within the cap (100, 256) faster than jemalloc".into(),
        micro_ratios(&within, RSEQ, JE),
        1.0,
        true,
    ));
    t.push(limit_target(
        "in-process: batches within the cap (100, 256) faster than mimalloc".into(),
        micro_ratios(&within, RSEQ, MI),
        1.0,
        true,
    ));
    t.push(limit_target(
        "in-process: batches past the cap (1000, 10000) <= 1.1x jemalloc".into(),
        micro_ratios(&past, RSEQ, JE),
        1.1,
        false,
    ));
    t
}

// ---------------------------------------------------------------------------
// Charts.

const COLORS: [plotters::style::RGBColor; 5] = [
    plotters::style::RGBColor(120, 120, 120),
    plotters::style::RGBColor(31, 119, 180),
    plotters::style::RGBColor(44, 160, 44),
    plotters::style::RGBColor(214, 39, 40),
    plotters::style::RGBColor(255, 127, 14),
];

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Throughput against threads, one line per allocator, threads on a log2
/// axis (1 to 32).
fn scaling_chart(
    file: &FsPath,
    cases: &[Case],
    samples: &[Vec<[Sample; 5]>],
    cores: usize,
) -> DrawResult {
    use plotters::prelude::*;
    let points: Vec<(f64, [f64; 5])> = cases
        .iter()
        .zip(samples)
        .filter(|(c, _)| c.kind == Kind::Scaling)
        .map(|(c, s)| ((c.threads as f64).log2(), throughput(s)))
        .collect();
    let xmax = points.iter().map(|p| p.0).fold(0.0, f64::max);
    let ymax = points.iter().flat_map(|p| p.1).fold(0.0, f64::max) * 1.15;
    let root = SVGBackend::new(file, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Thread scaling: churn throughput ({cores} CPUs)"),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(-0.2..xmax + 0.2, 0.0..ymax.max(1.0))?;
    chart
        .configure_mesh()
        .x_labels(points.len().max(2))
        .x_label_formatter(&|x| format!("{}", 2f64.powf(*x).round() as u64))
        .x_desc("threads")
        .y_desc("million alloc+free per second")
        .draw()?;
    for (i, name) in ALLOCS.iter().enumerate() {
        let color = COLORS[i];
        let line: Vec<(f64, f64)> = points.iter().map(|p| (p.0, p.1[i])).collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(line.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Peak RSS of every workload, a bar per allocator. Horizontal, so the
/// workload names read as plain text at the left.
fn memory_chart(file: &FsPath, cases: &[Case], samples: &[Vec<[Sample; 5]>]) -> DrawResult {
    use plotters::prelude::*;
    let rss: Vec<[f64; 5]> = samples
        .iter()
        .map(|s| {
            let r = rounds_of(s, |x| mib(x.rss_kib));
            std::array::from_fn(|i| r.median(i))
        })
        .collect();
    let n = cases.len();
    let xmax = rss.iter().flatten().fold(0.0, |a: f64, &b| a.max(b)) * 1.5;
    let root = SVGBackend::new(file, (1000, 120 + 36 * n as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Peak RSS per workload (median of rounds)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(260)
        // Log scale: mimalloc's many-threads peak is tens of times the rest.
        .build_cartesian_2d((1.0..xmax.max(2.0)).log_scale(), -0.5..n as f64 - 0.5)?;
    // The first workload at the top.
    let row = |w: usize| (n - 1 - w) as f64;
    let labels: Vec<String> = cases.iter().map(|c| c.label.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&|y| {
            let k = y.round();
            if (y - k).abs() < 1e-6 && k >= 0.0 && (k as usize) < n {
                labels[n - 1 - k as usize].clone()
            } else {
                String::new()
            }
        })
        .y_label_style(("sans-serif", 13))
        .x_desc("peak RSS, MiB (VmHWM, log scale)")
        .draw()?;
    let height = 0.8 / ALLOCS.len() as f64;
    for (i, name) in ALLOCS.iter().enumerate() {
        let color = COLORS[i];
        chart
            .draw_series(rss.iter().enumerate().map(|(w, r)| {
                let y0 = row(w) + 0.4 - (i + 1) as f64 * height;
                Rectangle::new([(1.0, y0), (r[i].max(1.0), y0 + height)], color.filled())
            }))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

// ---------------------------------------------------------------------------

fn run(opts: &Options) -> Result<(), String> {
    let started = Instant::now();
    std::fs::create_dir_all(&opts.out).map_err(|e| format!("{}: {e}", opts.out.display()))?;
    let bins = if opts.no_build {
        let bins: Vec<PathBuf> = BUILDS
            .iter()
            .map(|(name, _, _)| bin_dir().join(name))
            .collect();
        if let Some(missing) = bins.iter().find(|b| !b.is_file()) {
            return Err(format!("--no-build: {} is missing", missing.display()));
        }
        bins
    } else {
        build_workloads()?
    };
    let built = started.elapsed().as_secs_f64();
    let cases = cases(opts);
    if cases.is_empty() {
        return Err(format!(
            "no whole-program case matches --only {:?}",
            opts.only
        ));
    }
    let micro = if opts.only.is_empty() {
        run_micro(opts)
    } else {
        Vec::new()
    };
    let samples = run_programs(opts, &bins, &cases)?;
    let hardened = run_hardened(opts, &bins, &cases)?;
    let floor = run_floor(opts, &bins, &cases)?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());

    let doc = Doc {
        opts,
        micro: &micro,
        cases: &cases,
        samples: &samples,
        hardened: &hardened,
        floor: &floor,
    };
    let charts = opts.out.join("benchmarks");
    std::fs::create_dir_all(&charts).map_err(|e| format!("{}: {e}", charts.display()))?;
    let scaling_svg = charts.join("scaling.svg");
    let memory_svg = charts.join("memory.svg");
    let scaling = cases.iter().any(|c| c.kind == Kind::Scaling);
    if scaling {
        scaling_chart(&scaling_svg, &cases, &samples, cores)
            .map_err(|e| format!("scaling chart: {e}"))?;
    } else {
        // A chart left from an earlier run would be read as this one's.
        let _ = std::fs::remove_file(&scaling_svg);
    }
    memory_chart(&memory_svg, &cases, &samples).map_err(|e| format!("memory chart: {e}"))?;
    let mut md = doc.document(scaling);
    let _ = writeln!(
        md,
        "\nThe run took {:.0} s ({:.0} s of it building the workload binaries).",
        started.elapsed().as_secs_f64(),
        built
    );
    let report = opts.out.join("benchmarks.md");
    std::fs::write(&report, &md).map_err(|e| format!("{}: {e}", report.display()))?;
    println!("{md}");
    let mut wrote = vec![report.display().to_string()];
    if scaling {
        wrote.push(scaling_svg.display().to_string());
    }
    wrote.push(memory_svg.display().to_string());
    if let Some(readme) = &opts.readme {
        write_summary(readme, &doc.summary(readme, &report))?;
        wrote.push(format!("the summary in {}", readme.display()));
    }
    eprintln!("wrote {}", wrote.join(", "));
    Ok(())
}

// ---------------------------------------------------------------------------
// The documents: benchmarks.md and the README summary.

/// The lines that enclose the README's generated summary.
const SUMMARY_BEGIN: &str = "<!-- benchmark-summary:begin -->";
const SUMMARY_END: &str = "<!-- benchmark-summary:end -->";

/// One run's results, for the documents written from it.
struct Doc<'a> {
    opts: &'a Options,
    micro: &'a [MicroRow],
    cases: &'a [Case],
    samples: &'a [Vec<[Sample; 5]>],
    /// Per hot pair and batch, the `hardened` program's time over the
    /// plain one's, each round.
    hardened: &'a [(String, Vec<f64>)],
    /// `pair_floor`, each round.
    floor: &'a [Floor],
}

impl Doc<'_> {
    /// The command line that reproduces this run.
    fn command(&self) -> String {
        // Quoted as a shell would need them, so the line can be pasted.
        let args: Vec<String> = std::env::args()
            .skip(1)
            .map(|a| {
                let plain = a
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+".contains(c));
                if plain && !a.is_empty() {
                    a
                } else {
                    format!("'{}'", a.replace('\'', "'\\''"))
                }
            })
            .collect();
        let mut cmd = "cargo run --release -p percpu-bench --bin report".to_string();
        if !args.is_empty() {
            cmd.push_str(" -- ");
            cmd.push_str(&args.join(" "));
        }
        cmd
    }

    /// Median over rounds of the per-round time ratio of `i` to `j` in
    /// case number `c`.
    fn ratio(&self, c: usize, i: usize, j: usize) -> f64 {
        rounds_of(&self.samples[c], |x| x.ns).ratio(i, j)
    }

    fn document(&self, scaling: bool) -> String {
        let opts = self.opts;
        let mut md = String::new();
        let _ = writeln!(md, "# percpu-alloc benchmarks\n");
        let _ = writeln!(
            md,
            "Written by `{}`; every figure below is from that one run. Rerun it rather than edit this file.\n",
            self.command()
        );
        md.push_str(&machine_header(true));
        let micro_mode = if opts.only.is_empty() {
            format!(
                "{} micro rounds of {} operations per chunk",
                opts.micro_rounds, opts.chunk_ops
            )
        } else {
            let only: Vec<String> = opts.only.iter().map(|o| format!("{o:?}")).collect();
            format!(
                "only the whole programs matching {}, no micro rounds",
                only.join(" or ")
            )
        };
        let _ = writeln!(
            md,
            "- Mode: {} ({micro_mode}, {} rounds of whole programs); percpu rseq row on the {} path\n",
            if opts.full { "full" } else { "quick" },
            opts.rounds,
            PERCPU.path()
        );
        md.push_str(METHOD);
        self.wins_and_losses(&mut md);

        let _ = writeln!(md, "\n## Targets\n");
        let _ = writeln!(
            md,
            "percpu on the rseq path (the fallback row: the percpu binary with glibc's rseq off) against the allocator named, as the median over rounds of the per-round time ratio; whole programs unless marked in-process.\n"
        );
        let _ = writeln!(md, "| target | measured | result |");
        let _ = writeln!(md, "|---|---|---|");
        for t in targets(self.micro, self.cases, self.samples, self.hardened) {
            let result = match t.met {
                Some(true) => "met",
                Some(false) => "missed",
                None => "not run",
            };
            let _ = writeln!(md, "| {} | {} | {result} |", t.what, t.measured);
        }

        let _ = writeln!(
            md,
            "\n## Micro-benchmarks (in-process, each allocator's GlobalAlloc called directly)\n"
        );
        let _ = writeln!(
            md,
            "Median ns per alloc+free (pairs, batches) or per allocator call (growth); ratios are medians of per-round ratios. Batches are {}-byte blocks; the cap is 256 blocks per class per CPU.\n",
            micro::BATCH_BLOCK
        );
        if self.micro.is_empty() {
            let _ = writeln!(md, "Skipped (`--only`).");
        } else {
            micro_table(&mut md, self.micro);
        }

        let _ = writeln!(
            md,
            "\n## Thread scaling (million alloc+free per second, from median times)\n"
        );
        if scaling {
            scaling_table(&mut md, self.cases, self.samples);
        } else {
            let _ = writeln!(md, "No thread-scaling case ran.");
        }

        let _ = writeln!(
            md,
            "\n## Whole programs (each allocator the process's global allocator)\n"
        );
        let _ = writeln!(
            md,
            "Wall time of the workload alone, median and min–max over {} rounds; ratios are medians of per-round ratios (below 1 is faster). Peak RSS is the child's `VmHWM` (its own peak resident memory; its `ru_maxrss` would start at the parent's RSS, as Linux carries it over the spawn); jemalloc's `stats.allocated` / `stats.resident` and the per-CPU caches' bytes are read when the workload ends.\n",
            opts.rounds
        );
        programs_table(&mut md, self.cases, self.samples);

        self.floor_section(&mut md);

        let _ = writeln!(md, "\n## What `hardened` costs\n");
        let _ = writeln!(
            md,
            "The percpu program built with `--features hardened` against the same program without it, both on the rseq path, interleaved, {} rounds: its time over the plain one's, the median and min–max of the per-round ratios. With the feature every task free checks and writes a key (a double-free check) and an encoded empty link, and every slot pop checks the link and clears the key, all inside the restartable sections' asm; the feature's hit paths are leaves too.\n",
            opts.rounds
        );
        if self.hardened.is_empty() {
            let _ = writeln!(md, "No hot pair or batch ran.");
        } else {
            let _ = writeln!(md, "| workload | hardened / plain | min–max |");
            let _ = writeln!(md, "|---|---:|---:|");
            for (label, r) in self.hardened {
                let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = r.iter().copied().fold(0.0, f64::max);
                let _ = writeln!(
                    md,
                    "| {label} | {:.2} | {lo:.2}–{hi:.2} |",
                    median(r.clone())
                );
            }
        }

        let _ = writeln!(md, "\n## Charts\n");
        if scaling {
            let _ = writeln!(md, "![thread scaling](benchmarks/scaling.svg)\n");
        }
        let _ = writeln!(md, "![peak RSS](benchmarks/memory.svg)");
        md
    }

    /// The hot pair's time taken apart: the program's own loop and two bare
    /// sections, against jemalloc's and percpu's pairs of the same run.
    fn floor_section(&self, md: &mut String) {
        let _ = writeln!(md, "\n## How far the hot pair can go\n");
        if self.floor.is_empty() {
            let _ = writeln!(md, "The 64-byte uninitialised pair did not run.");
            return;
        }
        // Medians of the parts, and of each part's per-round ratio to the
        // jemalloc pair of the same round.
        let med = |f: &dyn Fn(&Floor) -> Option<f64>| {
            let v: Vec<f64> = self.floor.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| median(v))
        };
        let ratio = |f: &dyn Fn(&Floor) -> Option<f64>| {
            med(&|x: &Floor| f(x).map(|ns| ns / x.jemalloc_ns)).unwrap_or(f64::NAN)
        };
        let _ = writeln!(
            md,
            "`pair_floor` (`bench/src/bin/pair_floor.rs`) runs the loop of the `Box::new_uninit` pair under a global allocator that does nothing (one static block, nothing freed), and two bare sections per pair (the `rseq_cs` store, the `cpu_id` load, the CPU's record, the count and the slot: what a hit must run). Each of {} rounds runs it beside the jemalloc and the percpu programs' 64-byte pair. Medians, ns per alloc+free pair, and the median of each part's per-round ratio to that round's jemalloc pair:\n",
            self.floor.len()
        );
        let _ = writeln!(md, "| part | ns per pair | / jemalloc's pair |");
        let _ = writeln!(md, "|---|---:|---:|");
        let mut row = |what: &str, f: &dyn Fn(&Floor) -> Option<f64>| {
            let _ = match med(f) {
                Some(ns) => writeln!(md, "| {what} | {ns:.2} | {:.2} |", ratio(f)),
                None => writeln!(md, "| {what} | - (no rseq area) | - |"),
            };
        };
        row("the program's loop alone (null allocator)", &|f| {
            Some(f.loop_ns)
        });
        row(
            "the count word's round trips alone (in the sections)",
            &|f| f.chain_ns,
        );
        row("two bare sections", &|f| f.sections_ns);
        row(
            "the two together: the floor of a hit path, estimated",
            &|f| f.sections_ns.map(|s| s + f.loop_ns),
        );
        row("jemalloc's pair", &|f| Some(f.jemalloc_ns));
        row("percpu's pair", &|f| Some(f.percpu_ns));
        row(
            "the fallback's slot taken and released twice (compare-and-swap, release store)",
            &|f| Some(f.locks_ns),
        );
        let _ = writeln!(
            md,
            "\nThe sum estimates the floor: neither part waits long on a chain of latencies (the count word's store-to-load round trips, the only chain from one pair to the next, are the second row), both are bound by how fast the core issues instructions, so their times add, and no hit path can run fewer instructions than its section. What percpu spends over the sum is the code around its sections: the table pointer, the size limit, the record's offset and the rseq offset read per operation, the signal-scope check of a free and the `nr_sig` and cap reads of a push; measured by taking parts out, the scope check costs nothing measurable and the `nr_sig` read about 5% (docs/design.md, \"How far a hit can go\"). The last row is what the try-lock fallback pays per pair before its CPU read, its lists or the program's loop: an atomic read-modify-write costs several times a plain store."
        );
    }

    /// Every whole program sorted into faster, even and slower than
    /// jemalloc, each with what decides its case, then the fallback path,
    /// mimalloc and memory.
    fn wins_and_losses(&self, md: &mut String) {
        let _ = writeln!(md, "\n## Where percpu wins and loses, and why\n");
        let _ = writeln!(
            md,
            "percpu on the rseq path against jemalloc, whole programs, time ratio (below 1 is faster). Within 5% either way counts as even: this machine's run-to-run spread on single rows is about that.\n"
        );
        // Faster below 0.95, even up to 1.05, slower above.
        let group = |r: f64| usize::from(r >= 0.95) + usize::from(r > 1.05);
        let titles = [
            "Faster than jemalloc",
            "Even with jemalloc",
            "Slower than jemalloc",
        ];
        for (g, title) in titles.iter().enumerate() {
            let rows: Vec<(usize, f64)> = (0..self.cases.len())
                .map(|c| (c, self.ratio(c, RSEQ, JE)))
                .filter(|&(_, r)| group(r) == g)
                .collect();
            let _ = writeln!(
                md,
                "**{title}** ({} of {}):\n",
                rows.len(),
                self.cases.len()
            );
            if rows.is_empty() {
                let _ = writeln!(md, "- none");
            }
            for (c, r) in rows {
                let case = &self.cases[c];
                let _ = writeln!(md, "- {}: {r:.2}x. {}", case.label, why(case));
            }
            let _ = writeln!(md);
        }
        let fallback: Vec<f64> = (0..self.cases.len())
            .map(|c| self.ratio(c, FB, JE))
            .collect();
        let (lo, hi) = fallback
            .iter()
            .fold((f64::INFINITY, 0.0f64), |(lo, hi), &r| {
                (lo.min(r), hi.max(r))
            });
        // Two takes and releases of a slot against jemalloc's pair, from
        // `pair_floor`'s rounds, where the pair ran.
        let locks = (!self.floor.is_empty()).then(|| {
            median(
                self.floor
                    .iter()
                    .map(|f| f.locks_ns / f.jemalloc_ns)
                    .collect(),
            )
        });
        let locks = locks.map_or_else(String::new, |r| {
            format!(" (in this run the two, alone in a loop, took {r:.2}x jemalloc's whole 64-byte pair: \"How far the hot pair can go\")")
        });
        let _ = writeln!(
            md,
            "**The fallback path** (glibc's rseq off) takes {lo:.2}x to {hi:.2}x jemalloc's time (median {:.2}x). Each operation there takes and releases its CPU's slot with an atomic compare-and-swap and a release store; an atomic read-modify-write costs several times a plain store, and a pair needs two{locks}. It is the path for machines without rseq, not a rival to it.\n",
            median(fallback.clone())
        );
        let mi_faster: Vec<&str> = (0..self.cases.len())
            .filter(|&c| self.ratio(c, MI, RSEQ) < 0.95)
            .map(|c| self.cases[c].label.as_str())
            .collect();
        let _ = writeln!(
            md,
            "**mimalloc** is more than 5% faster than percpu on {} of {} whole programs{}. mimalloc frees into per-page lists and allocates from them without jemalloc's layers; percpu is bounded by the jemalloc behind it whenever a request misses the cache.\n",
            mi_faster.len(),
            self.cases.len(),
            if mi_faster.is_empty() {
                String::new()
            } else {
                format!(" ({})", mi_faster.join("; "))
            }
        );
        let rss: Vec<(String, f64)> = self
            .cases
            .iter()
            .zip(self.samples)
            .map(|(c, s)| (c.label.clone(), rounds_of(s, |x| x.rss_kib).ratio(RSEQ, JE)))
            .collect();
        let (name, w, med) = worst(&rss);
        let _ = writeln!(
            md,
            "**Memory**: percpu's peak RSS is at most {w:.2}x jemalloc's ({name}), median {med:.2}x. Each CPU caches at most `cpu_bound_bytes()` (937.8 KiB with the defaults), whatever the number of threads; the caches hold blocks jemalloc has already counted as allocated, which is the difference in the small programs."
        );
    }

    /// The README's summary: one table of time ratios to jemalloc over the
    /// workloads a reader compares first, the machine, and a link to the
    /// whole document `report` (relative to the README where it can be).
    fn summary(&self, readme: &FsPath, report: &FsPath) -> String {
        const ROWS: [&str; 10] = [
            "hot pair, 64 B, Box::new_uninit",
            "hot pair, 64 B, Box::new([0; 64])",
            "hot pair, 256 B, Box::new([0; 256])",
            "batch of 100, mixed",
            "batch of 1000, mixed",
            "batch of 10000",
            "binary-trees",
            "BTreeMap",
            "json, twitter",
            "many threads",
        ];
        let dir = readme.parent().unwrap_or(FsPath::new("."));
        let canon = |p: &FsPath| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let link = canon(report)
            .strip_prefix(canon(dir))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| report.display().to_string());
        let mut md = String::new();
        let _ = writeln!(
            md,
            "Time against jemalloc's (below 1 is faster; each allocator the global allocator of its own process, the median of per-round ratios over {} interleaved rounds). Full tables, the method, what wins and loses and why: [{link}]({link}).\n",
            self.opts.rounds
        );
        let _ = writeln!(
            md,
            "| workload | system | jemalloc | mimalloc | percpu | percpu fallback |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
        for row in ROWS {
            for (c, case) in self.cases.iter().enumerate() {
                if !case.label.starts_with(row) {
                    continue;
                }
                let r: Vec<String> = (0..ALLOCS.len())
                    .map(|i| format!("{:.2}", self.ratio(c, i, JE)))
                    .collect();
                let _ = writeln!(md, "| {} | {} |", case.label, r.join(" | "));
                if case.kind == Kind::ManyThreads {
                    let rss = rounds_of(&self.samples[c], |x| x.rss_kib);
                    let r: Vec<String> = (0..ALLOCS.len())
                        .map(|i| format!("{:.2}", rss.ratio(i, JE)))
                        .collect();
                    let _ = writeln!(md, "| {}: peak RSS | {} |", case.label, r.join(" | "));
                }
            }
        }
        let hardened: Vec<f64> = self
            .hardened
            .iter()
            .map(|(_, r)| median(r.clone()))
            .collect();
        if !hardened.is_empty() {
            let lo = hardened.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = hardened.iter().copied().fold(0.0, f64::max);
            let _ = writeln!(
                md,
                "\nWith `--features hardened`, the hot pairs and batches take {lo:.2}x to {hi:.2}x the plain program's time."
            );
        }
        let _ = writeln!(md);
        md.push_str(&machine_header(false));
        md
    }
}

/// What decides a whole program's ratio, by kind of case.
fn why(case: &Case) -> &'static str {
    match case.kind {
        Kind::Pair { zeroed: false, .. } => "Every alloc and free is a hit: one restartable section each, a leaf of about 25 instructions with no atomic and no call.",
        Kind::Pair { zeroed: true, .. } => "Hits as in the uninitialised pair, plus the program's own zeroing. `Box::new` builds the array, allocates, then moves the array in. The inlined alloc reads its table pointer with a `readonly` asm load, which LLVM does not take for a fence, so LLVM writes the zeroes straight into the block, as it does around jemalloc's opaque call. With an atomic load there, LLVM zeroed a stack copy and copied it in: 1.14x jemalloc at 64 bytes and 2.2x at 256 (docs/design.md, \"An alloc the optimiser can see across\").",
        Kind::BatchMixed(live) if live <= 256 => "All live blocks fit the caches (fewer than the cap per class), so nearly every operation is a hit; the random free order does not matter to a per-class list.",
        Kind::BatchMixed(_) => "About 80 live blocks per class, within the cap, so the caches serve nearly everything; jemalloc's thread cache flushes and refills its bins at this depth.",
        Kind::BatchOneClass(live) if live <= 1000 => "Four times the cap in one class: a quarter of the frees are pushed, the rest overflow to jemalloc, and allocs miss as often.",
        Kind::BatchOneClass(_) => "Forty times the cap in one class: nearly every operation misses or overflows and pays a refused section and a call before jemalloc's own path.",
        Kind::BinaryTrees => "Trees of far more nodes than the cap: most frees overflow and most allocs miss, so most of the work is jemalloc's, with the cache's refused section added to it.",
        Kind::JsonCorpus | Kind::JsonGenerated => "Parsing builds a document of far more blocks than the cap and dropping it frees them all: about nine allocs in ten miss and as many frees overflow (the `stats` counters: 88% on twitter.json, 92% on the generated document), so the caches save little. The rest is code shape: serde_json's generic parsing, map and drop code is compiled into the program, where the inlined hit paths make those functions larger and LLVM inlines less into them. The same binary with nothing cached (`PERCPU_MAX_CACHED_SIZE=0`) is about as slow, so it is not the work the caches do.",
        Kind::BTree | Kind::Other => "Mixed sizes, some past the largest cached size (1 KiB), with the allocator inlined into the program's own functions; the ratio moves by about 0.1 from run to run.",
        Kind::ProdCons => "Blocks are allocated on one thread and freed on another, so the consumer's CPU fills its lists to the cap and overflows while the producer's misses; both end in jemalloc.",
        Kind::Scaling => "Threads churn a small ring of blocks: hits on each CPU's own lists, nothing shared between CPUs on the hot path.",
        Kind::ManyThreads => "Hundreds of threads on few CPUs: the caches are per CPU, not per thread, so what they hold stays bounded by the CPU count.",
    }
}

/// Replaces the lines between [`SUMMARY_BEGIN`] and [`SUMMARY_END`] of
/// `readme` with `summary`.
fn write_summary(readme: &FsPath, summary: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(readme).map_err(|e| format!("{}: {e}", readme.display()))?;
    let (Some(begin), Some(end)) = (text.find(SUMMARY_BEGIN), text.find(SUMMARY_END)) else {
        return Err(format!(
            "{} has no {SUMMARY_BEGIN} ... {SUMMARY_END} lines to write the summary between",
            readme.display()
        ));
    };
    if end < begin {
        return Err(format!(
            "{}: summary markers out of order",
            readme.display()
        ));
    }
    let head = &text[..begin + SUMMARY_BEGIN.len()];
    let tail = &text[end..];
    let new = format!("{head}\n{summary}{tail}");
    std::fs::write(readme, new).map_err(|e| format!("{}: {e}", readme.display()))
}

/// How the figures are taken, for the document's readers.
const METHOD: &str = "## How it was measured

Five allocators, same work, same run: system malloc (glibc), jemalloc (tikv-jemallocator), mimalloc, percpu-alloc on the rseq path and percpu-alloc on the try-lock fallback.

- **Whole programs, one process per allocator.** `bench/src/bin/workloads.rs` is built once per allocator (no feature: system malloc; `global-jemalloc`; `global-mimalloc`; `global-percpu`, where the program declares `#[global_allocator] static ALLOC: PerCpuAlloc` as an application does, so the allocator is inlined into the program's loops). The fallback row is the percpu binary run with `GLIBC_TUNABLES=glibc.pthread.rseq=0`; every percpu child checks its path and refuses to run on the wrong one. The children run interleaved, each round starting one allocator later, and each workload checks its own result. Workloads: hot pairs as a program writes them (`Box::new([0u8; 64])` and `Box::new([0u8; 256])`, `Box::<[u8; 64]>::new_uninit()`); batches of 100 and 1000 live `Vec`s of mixed sizes and of 1000 and 10 000 of 64 bytes (past the cap), refilled in random order; producer-consumer pairs of threads; thread scaling (threads replacing random blocks of a 64-block ring); hundreds of threads alive at once; serde_json on a generated document and on the corpora in `../shared/data/json` where that folder exists; binary-trees; `BTreeMap<String, Vec<u8>>` churn; `Vec<Box<[u8]>>` churn; `format!`/`push_str` strings.
- **Micro workloads, in one process.** Each allocator's `GlobalAlloc` is called directly, in short chunks taken in turn, each round starting one allocator later; each ratio is the median over rounds of a chunk's time against the other allocator's chunk of the same round, so the host's slow phases, which hit a whole round, stay out of the ratios. Hot pairs for every cached class and two sizes past the cache; batches of 100 to 10 000 live 64-byte blocks freed LIFO, FIFO and at random; realloc growth.
- **Ratios, not times.** On a shared machine only figures taken side by side mean much. Every ratio is a median of per-round ratios; the absolute times are there to show the spread.
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match parse_args(&args) {
        Ok(Some(opts)) => run(&opts),
        Ok(None) => {
            println!("{USAGE}");
            Ok(())
        }
        Err(e) => Err(format!("{e}\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("report: {e}");
            ExitCode::FAILURE
        }
    }
}
