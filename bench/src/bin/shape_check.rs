//! A deterministic check of the allocator's hot path as machine code.
//!
//! ```text
//! shape_check BINARY [--budget N]      (default budget: 30 instructions)
//! ```
//!
//! CI builds `bench/src/bin/shape_probe.rs` (a program that installs
//! `PerCpuAlloc` as its `#[global_allocator]`) in release mode and runs this
//! checker on it:
//!
//! ```text
//! cargo build --release -p percpu-bench --bin shape_probe
//! cargo run --release -p percpu-bench --bin shape_check -- target/release/shape_probe
//! ```
//!
//! The checker disassembles the binary with binutils' `objdump` (Intel
//! syntax) and looks at the two shims rustc emits for the global allocator,
//! `__rust_alloc` and `__rust_dealloc`, into which the allocator's hot path
//! is inlined. For each it builds the control-flow graph of the function's
//! instructions and finds the *rseq hit path*: the shortest path (fewest
//! instructions) from the entry to a `ret` that passes through the store of
//! the rseq critical-section descriptor into the thread's rseq area, a store
//! to `fs:[REG+0x8]` (the `rseq_cs` field), and after it through a store to
//! ordinary memory (the section's commit: a refused section stores
//! nothing). That is the path a cache hit takes. The check fails (exit
//! status 1) if that path
//!
//! - contains a `push` (a callee-saved register spilled, i.e. the hot path
//!   pays for register pressure that belongs to a cold path),
//! - contains a `call`,
//! - is longer than the budget,
//!
//! or if the function's first instruction is a `push` (a prologue that every
//! call pays, whichever path it takes), or if no such path exists at all.
//!
//! A second check reads `shape_probe_box_of_zeros`, the probe's
//! `Box::new([0u8; 256])` with the hit path inlined into it, and fails if
//! it reaches `memcpy` or `memmove`: the zeros must be written straight
//! into the block, as they are under an allocator LLVM cannot see into.
//! Anything in the inlined alloc that LLVM takes for a fence (an atomic
//! load is one) makes it build the array on the stack and copy it.
//!
//! It is pure text analysis of the disassembly, so its verdict depends only
//! on the binary, never on timing or on the machine it runs on. Exit status:
//! 0 when every check passes, 1 when a rule fails, 2 when the check could
//! not run (bad arguments, objdump missing, the functions not found).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::process::{Command, ExitCode};

/// Default limit on the number of instructions on the hit path.
const DEFAULT_BUDGET: usize = 30;

/// The functions checked, as rustc names them before mangling.
const TARGETS: [&str; 2] = ["__rust_alloc", "__rust_dealloc"];

/// The function the copy check reads, exported unmangled by the probe.
const COPY_PROBE: &str = "shape_probe_box_of_zeros";

/// One disassembled instruction.
#[derive(Debug, Clone)]
struct Insn {
    addr: u64,
    /// The instruction as objdump printed it (comment included), for reports.
    text: String,
    /// The mnemonic, lowercased, with prefixes such as `bnd`, `notrack` or
    /// `rep` removed (so `bnd jmp` is a `jmp` and `repz ret` a `ret`).
    mnemonic: String,
    /// The operands without objdump's trailing `# ...` comment.
    operands: String,
}

/// One function of the disassembly: its symbol and its instructions in
/// address order.
#[derive(Debug, Clone)]
struct Function {
    name: String,
    insns: Vec<Insn>,
}

/// Parses `objdump -d --no-show-raw-insn -M intel` output into functions.
///
/// Function headers look like `000000000002dc10 <symbol>:`; instruction
/// lines like `   2dc10:\tpush   rbp`. Everything else (section banners,
/// blank lines, `...` for skipped zeros) is ignored.
fn parse_objdump(text: &str) -> Vec<Function> {
    let mut functions: Vec<Function> = Vec::new();
    for line in text.lines() {
        if let Some(name) = parse_header(line) {
            functions.push(Function {
                name,
                insns: Vec::new(),
            });
        } else if let Some(insn) = parse_insn(line) {
            // Instructions before any header (should not happen) are dropped.
            if let Some(f) = functions.last_mut() {
                f.insns.push(insn);
            }
        }
    }
    functions
}

/// `000000000002dc10 <symbol>:` gives `symbol`.
fn parse_header(line: &str) -> Option<String> {
    let line = line.trim_end();
    let (addr, rest) = line.split_once(' ')?;
    if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let name = rest.strip_prefix('<')?.strip_suffix(">:")?;
    Some(name.to_string())
}

/// `   2dc10:\tpush   rbp` gives an instruction at 0x2dc10.
fn parse_insn(line: &str) -> Option<Insn> {
    let (addr, rest) = line.trim_start().split_once(':')?;
    let addr = u64::from_str_radix(addr, 16).ok()?;
    // The address is followed by a tab; a header line never gets here (its
    // address is followed by a space, so `addr` above fails to parse).
    let text = rest.trim();
    if text.is_empty() {
        return None;
    }
    // objdump appends `# d3488 <symbol>` to rip-relative operands; the
    // comment is for humans and must not be mistaken for an operand.
    let code = match text.find('#') {
        Some(i) => text[..i].trim_end(),
        None => text,
    };
    let mut words = code.split_whitespace().peekable();
    // Prefixes objdump prints as separate words before the mnemonic: `bnd`
    // and `notrack` (CET), `rep`/`repz` (as in `repz ret`), `lock`, size
    // overrides, and `ds`/`cs` branch hints. None changes how control
    // flows, so the classification below looks past them.
    const PREFIXES: [&str; 12] = [
        "bnd", "notrack", "rep", "repz", "repe", "repnz", "repne", "lock", "data16", "addr32",
        "ds", "cs",
    ];
    let mut mnemonic = String::new();
    while let Some(w) = words.next() {
        let w = w.to_ascii_lowercase();
        // A prefix is only a prefix when an instruction follows it.
        if PREFIXES.contains(&w.as_str()) && words.peek().is_some() {
            continue;
        }
        mnemonic = w;
        break;
    }
    let operands = words.collect::<Vec<_>>().join(" ");
    Some(Insn {
        addr,
        text: text.to_string(),
        mnemonic,
        operands,
    })
}

/// Whether `symbol` is rustc's shim named `base` (`__rust_alloc`), and not
/// a longer name that merely starts the same (`__rust_alloc_zeroed`,
/// `__rust_alloc_error_handler`) nor `__rust_realloc`.
///
/// Accepted spellings: the plain symbol (older rustc exported it unmangled),
/// the v0 mangling, where the identifier is length-prefixed and, because it
/// starts with `_`, separated by one more `_` (`..._7___rustc12___rust_alloc`),
/// and a demangled `__rustc::__rust_alloc`. A `.llvm.NNN` suffix added by
/// LTO is ignored.
fn is_target_symbol(symbol: &str, base: &str) -> bool {
    let symbol = match symbol.find(".llvm.") {
        Some(i) => &symbol[..i],
        None => symbol,
    };
    let v0 = format!("{}_{}", base.len(), base);
    symbol == base || symbol.ends_with(&v0) || symbol.ends_with(&format!("::{base}"))
}

/// How control leaves an instruction.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    /// Falls through to the next instruction (ordinary instructions, and
    /// `call`, which returns there).
    Next,
    /// A conditional branch: the next instruction, and the target if it is
    /// an instruction of this function (a target outside is a conditional
    /// tail call, which ends that path).
    Branch(Option<u64>),
    /// An unconditional direct `jmp`; `None` when it leaves the function
    /// (a tail call) or is indirect (through a register or memory, also
    /// treated as a tail call).
    Jump(Option<u64>),
    /// `ret`: the end the hit path looks for.
    Ret,
    /// A trap (`ud2`, `ud1`, `int3`, `hlt`, ...): the path ends, and not in
    /// a `ret`.
    Trap,
}

/// The direct target of a jump (`2dd67 <sym+0x157>`), or `None` when the
/// operand is a register or memory (`QWORD PTR [rip+0xa3cbc]`, `rax`).
fn direct_target(operands: &str) -> Option<u64> {
    let first = operands.split_whitespace().next()?;
    // No x86 register name consists only of hex digits, so this does not
    // mistake `jmp rax` for a direct jump.
    u64::from_str_radix(first, 16).ok()
}

fn flow(insn: &Insn) -> Flow {
    let m = insn.mnemonic.as_str();
    match m {
        "ret" | "retq" | "retn" | "retf" => Flow::Ret,
        "jmp" | "jmpq" => Flow::Jump(direct_target(&insn.operands)),
        "ud0" | "ud1" | "ud2" | "int3" | "hlt" | "(bad)" => Flow::Trap,
        // `j*` other than `jmp` (je, jne, ja, jrcxz, ...), and the `loop`
        // family, branch on a condition.
        _ if m.starts_with('j') || m.starts_with("loop") => {
            Flow::Branch(direct_target(&insn.operands))
        }
        _ => Flow::Next,
    }
}

fn is_push(insn: &Insn) -> bool {
    insn.mnemonic.starts_with("push")
}

fn is_call(insn: &Insn) -> bool {
    insn.mnemonic.starts_with("call")
}

/// Whether `insn` stores to `fs:[REG+0x8]`: the store of the critical-section
/// descriptor's address into the thread's `rseq.rseq_cs` (glibc places the
/// rseq area at a fixed offset from the thread pointer, so the code adds
/// that offset in a register and stores at +8, the field's offset).
///
/// Intel syntax puts the destination first: `mov QWORD PTR fs:[rsi+0x8],r8`
/// is the store; `mov rdx,QWORD PTR fs:[rcx+0x8]` is a load and does not
/// count.
fn is_rseq_cs_store(insn: &Insn) -> bool {
    if insn.mnemonic != "mov" && insn.mnemonic != "movq" {
        return false;
    }
    // Memory operands in Intel syntax contain no commas, so the first comma
    // ends the destination.
    let dest = insn.operands.split(',').next().unwrap_or("");
    let Some(start) = dest.find("fs:[") else {
        return false;
    };
    let inner = &dest[start + 4..];
    let Some(inner) = inner.split(']').next() else {
        return false;
    };
    // Exactly a base register and a displacement of 8: `rsi+0x8`.
    let Some((reg, disp)) = inner.split_once('+') else {
        return false;
    };
    let reg_ok = reg.starts_with(|c: char| c.is_ascii_lowercase())
        && reg.chars().all(|c| c.is_ascii_alphanumeric());
    let disp_ok = disp
        .strip_prefix("0x")
        .and_then(|d| u64::from_str_radix(d, 16).ok())
        == Some(8);
    reg_ok && disp_ok
}

/// Whether `insn` stores to ordinary memory (no segment): a `mov` whose
/// destination is a memory operand, as the commit of a section is.
fn is_plain_store(insn: &Insn) -> bool {
    if !insn.mnemonic.starts_with("mov") {
        return false;
    }
    let dest = insn.operands.split(',').next().unwrap_or("");
    dest.contains("PTR [") && !dest.contains("fs:") && !dest.contains("gs:")
}

/// How far along a hit path is: before the `rseq_cs` store, after it, or
/// after the commit that follows it.
fn phase_after(phase: usize, insn: &Insn) -> usize {
    match phase {
        0 if is_rseq_cs_store(insn) => 1,
        1 if is_plain_store(insn) => 2,
        p => p,
    }
}

/// The control-flow graph of one function: for each instruction, the indices
/// of the instructions control can reach next.
fn successors(f: &Function) -> Vec<Vec<usize>> {
    let index: HashMap<u64, usize> = f
        .insns
        .iter()
        .enumerate()
        .map(|(i, insn)| (insn.addr, i))
        .collect();
    // A target is inside the function only if it is the address of one of
    // its instructions; anything else is a jump elsewhere.
    let inside = |t: Option<u64>| t.and_then(|a| index.get(&a).copied());
    f.insns
        .iter()
        .enumerate()
        .map(|(i, insn)| {
            // Falling off the end of the function ends the path.
            let next = (i + 1 < f.insns.len()).then_some(i + 1);
            match flow(insn) {
                Flow::Next => next.into_iter().collect(),
                Flow::Branch(t) => next.into_iter().chain(inside(t)).collect(),
                Flow::Jump(t) => inside(t).into_iter().collect(),
                Flow::Ret | Flow::Trap => Vec::new(),
            }
        })
        .collect()
}

/// The rseq hit path: the shortest path, in instructions, from the entry to
/// a `ret` that passes through an `fs:[REG+0x8]` store and then a store to
/// ordinary memory. Returns the indices of its instructions in order, or
/// `None` if there is no such path.
///
/// Dijkstra over states (instruction, phase: see [`phase_after`]). Every
/// instruction costs one; among equally short paths it prefers the one with
/// fewest pushes and calls, and after that the lowest addresses, so the
/// answer is unique and the same on every run.
fn hit_path(f: &Function) -> Option<Vec<usize>> {
    const PHASES: usize = 3;
    if f.insns.is_empty() {
        return None;
    }
    let succ = successors(f);
    let n = f.insns.len();
    let state = |i: usize, phase: usize| i * PHASES + phase;
    let bad = |i: usize| u32::from(is_push(&f.insns[i]) || is_call(&f.insns[i]));
    let mut best: Vec<Option<(u32, u32)>> = vec![None; PHASES * n];
    let mut pred: Vec<Option<usize>> = vec![None; PHASES * n];
    let mut heap = BinaryHeap::new();

    let phase0 = phase_after(0, &f.insns[0]);
    best[state(0, phase0)] = Some((1, bad(0)));
    heap.push(Reverse((1u32, bad(0), 0usize, phase0)));
    while let Some(Reverse((len, nbad, i, phase))) = heap.pop() {
        let s = state(i, phase);
        if best[s] != Some((len, nbad)) {
            continue; // a stale entry: this state was reached better since
        }
        if phase == PHASES - 1 && flow(&f.insns[i]) == Flow::Ret {
            // The first goal popped is the best one.
            let mut path = vec![i];
            let mut cur = s;
            while let Some(p) = pred[cur] {
                path.push(p / PHASES);
                cur = p;
            }
            path.reverse();
            return Some(path);
        }
        for &j in &succ[i] {
            let phase_j = phase_after(phase, &f.insns[j]);
            let cost = (len + 1, nbad + bad(j));
            let t = state(j, phase_j);
            let better = match best[t] {
                None => true,
                Some(b) => cost < b,
            };
            if better {
                best[t] = Some(cost);
                pred[t] = Some(s);
                heap.push(Reverse((cost.0, cost.1, j, phase_j)));
            }
        }
    }
    None
}

/// A rule the function broke.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// No path from the entry through an `fs:[REG+0x8]` store to a `ret`.
    NoHitPath,
    /// The function's first instruction saves a register.
    PushAtEntry { addr: u64, text: String },
    /// A register save on the hit path.
    PushOnPath { addr: u64, text: String },
    /// A call on the hit path.
    CallOnPath { addr: u64, text: String },
    /// The hit path is longer than the budget.
    OverBudget { len: usize, budget: usize },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::NoHitPath => write!(
                f,
                "no rseq hit path found (no path from the entry through a store to fs:[REG+0x8], then a store to memory, to a ret)"
            ),
            Failure::PushAtEntry { addr, text } => write!(
                f,
                "register save at entry: the first instruction, {addr:x}: `{text}`, is a push"
            ),
            Failure::PushOnPath { addr, text } => {
                write!(f, "register save on the hit path: {addr:x}: `{text}`")
            }
            Failure::CallOnPath { addr, text } => {
                write!(f, "call on the hit path: {addr:x}: `{text}`")
            }
            Failure::OverBudget { len, budget } => write!(
                f,
                "hit path is {len} instructions, over the budget of {budget}"
            ),
        }
    }
}

/// The result of checking one function.
struct Outcome {
    /// Indices of the hit path's instructions, if there is one.
    path: Option<Vec<usize>>,
    failures: Vec<Failure>,
}

/// Applies the rules to one function.
fn check_function(f: &Function, budget: usize) -> Outcome {
    let mut failures = Vec::new();
    if let Some(first) = f.insns.first() {
        if is_push(first) {
            failures.push(Failure::PushAtEntry {
                addr: first.addr,
                text: first.text.clone(),
            });
        }
    }
    let path = hit_path(f);
    match &path {
        None => failures.push(Failure::NoHitPath),
        Some(path) => {
            for &i in path {
                let insn = &f.insns[i];
                let (addr, text) = (insn.addr, insn.text.clone());
                if is_push(insn) {
                    failures.push(Failure::PushOnPath { addr, text });
                } else if is_call(insn) {
                    failures.push(Failure::CallOnPath { addr, text });
                }
            }
            if path.len() > budget {
                failures.push(Failure::OverBudget {
                    len: path.len(),
                    budget,
                });
            }
        }
    }
    Outcome { path, failures }
}

/// "1 call", "2 calls", "no calls".
fn count(n: usize, what: &str, plural: &str) -> String {
    match n {
        0 => format!("no {plural}"),
        1 => format!("1 {what}"),
        _ => format!("{n} {plural}"),
    }
}

/// Prints the path and the verdict for one function; returns whether it
/// passed.
fn report(label: &str, f: &Function, budget: usize) -> bool {
    let outcome = check_function(f, budget);
    println!("== {label} ({})", f.name);
    let summary = match &outcome.path {
        Some(path) => {
            println!("rseq hit path, {} instructions:", path.len());
            for &i in path {
                let insn = &f.insns[i];
                let mark = if is_rseq_cs_store(insn) {
                    "  <- rseq_cs store"
                } else {
                    ""
                };
                println!("  {:8x}:  {}{mark}", insn.addr, insn.text);
            }
            let pushes = path.iter().filter(|&&i| is_push(&f.insns[i])).count();
            let calls = path.iter().filter(|&&i| is_call(&f.insns[i])).count();
            format!(
                "{label}: rseq hit path {} instructions, {}, {} (budget {budget})",
                path.len(),
                count(pushes, "register save", "register saves"),
                count(calls, "call", "calls"),
            )
        }
        None => format!("{label}: no rseq hit path found in {label} (budget {budget})"),
    };
    for failure in &outcome.failures {
        println!("FAIL {label}: {failure}");
    }
    let ok = outcome.failures.is_empty();
    println!("{summary}: {}", if ok { "ok" } else { "FAIL" });
    ok
}

/// The instructions of `f` that reach `memcpy` or `memmove`: a call or
/// jump to one (`<memcpy@plt>`), or a load of its address from the GOT,
/// which objdump names in its comment (`# 110d60 <memcpy@GLIBC_2.14>`).
fn copy_references(f: &Function) -> Vec<&Insn> {
    f.insns
        .iter()
        .filter(|i| i.text.contains("<memcpy") || i.text.contains("<memmove"))
        .collect()
}

/// Prints the copy check's verdict on the probe; returns whether it passed.
fn report_copy(f: &Function) -> bool {
    println!("== Box::new([0u8; 256]) ({})", f.name);
    let refs = copy_references(f);
    for insn in &refs {
        println!(
            "FAIL {COPY_PROBE}: copies through the stack: {:x}:  {}",
            insn.addr, insn.text
        );
    }
    let ok = refs.is_empty();
    println!(
        "{COPY_PROBE}: {}: {}",
        if ok {
            "the zeros go straight into the block (no memcpy, no memmove)"
        } else {
            "the array is built on the stack and copied into the block"
        },
        if ok { "ok" } else { "FAIL" }
    );
    ok
}

fn usage() -> ExitCode {
    eprintln!("usage: shape_check BINARY [--budget N]   (default budget {DEFAULT_BUDGET})");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut binary: Option<String> = None;
    let mut budget = DEFAULT_BUDGET;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--budget" {
            match args.next().and_then(|v| v.parse().ok()) {
                Some(b) => budget = b,
                None => return usage(),
            }
        } else if arg.starts_with('-') || binary.is_some() {
            return usage();
        } else {
            binary = Some(arg);
        }
    }
    let Some(binary) = binary else {
        return usage();
    };

    let output = match Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "-M", "intel", &binary])
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "shape_check: objdump not found on PATH; it comes with binutils \
                 (e.g. `apt-get install binutils`)"
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("shape_check: could not run objdump: {e}");
            return ExitCode::from(2);
        }
    };
    if !output.status.success() {
        eprintln!(
            "shape_check: objdump failed ({}) on {binary}:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        return ExitCode::from(2);
    }
    let functions = parse_objdump(&String::from_utf8_lossy(&output.stdout));

    let mut all_ok = true;
    for target in TARGETS {
        let found: Vec<&Function> = functions
            .iter()
            .filter(|f| is_target_symbol(&f.name, target))
            .collect();
        match found.as_slice() {
            [f] => all_ok &= report(target, f, budget),
            [] => {
                eprintln!(
                    "shape_check: no function {target} in {binary} (is it a Rust binary \
                     with a #[global_allocator], and not stripped?)"
                );
                return ExitCode::from(2);
            }
            many => {
                let names: Vec<&str> = many.iter().map(|f| f.name.as_str()).collect();
                eprintln!(
                    "shape_check: {} functions named {target} in {binary}: {}",
                    many.len(),
                    names.join(", ")
                );
                return ExitCode::from(2);
            }
        }
    }
    match functions
        .iter()
        .filter(|f| f.name == COPY_PROBE)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [f] => all_ok &= report_copy(f),
        found => {
            eprintln!(
                "shape_check: {} functions named {COPY_PROBE} in {binary} (built from \
                 bench/src/bin/shape_probe.rs?)",
                found.len()
            );
            return ExitCode::from(2);
        }
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wraps instruction lines (`addr:\ttext`) in a function header, as
    /// objdump prints them.
    fn function(name: &str, insns: &[(u64, &str)]) -> String {
        let mut s = format!("\n{:016x} <{name}>:\n", insns[0].0);
        for (addr, text) in insns {
            s.push_str(&format!("  {addr:x}:\t{text}\n"));
        }
        s
    }

    fn only(text: &str) -> Function {
        let fs = parse_objdump(text);
        assert_eq!(fs.len(), 1, "{fs:?}");
        fs.into_iter().next().unwrap()
    }

    const ALLOC: &str = "_RNvCsfLfy6EI15iL_7___rustc12___rust_alloc";

    /// A hit path: load the rseq offset, store the descriptor, pop a block,
    /// commit, return; a miss branch tail-calls the slow path.
    fn straight() -> Vec<(u64, &'static str)> {
        vec![
            (0x1000, "mov    rcx,QWORD PTR [rdi+0x10]"),
            (0x1004, "lea    rax,[rip+0x100]        # 2000 <cs>"),
            (0x100b, "mov    QWORD PTR fs:[rcx+0x8],rax"),
            (0x1010, "mov    rdx,QWORD PTR fs:[rcx]"),
            (0x1014, "test   rdx,rdx"),
            (0x1017, "js     1030 <x+0x30>"),
            (0x1019, "mov    rax,QWORD PTR [rdx]"),
            (0x101c, "test   rax,rax"),
            (0x101f, "je     1030 <x+0x30>"),
            (0x1020, "mov    QWORD PTR [rdx],rax"),
            (0x1021, "ret"),
            (
                0x1022,
                "ud1    edi,DWORD PTR [rip+0x53053053]        # 53054079 <y>",
            ),
            (0x1029, "jmp    1004 <x+0x4>"),
            (0x1030, "jmp    QWORD PTR [rip+0x3000]        # 4030 <slow>"),
        ]
    }

    #[test]
    fn straight_hit_path_passes() {
        let f = only(&function(ALLOC, &straight()));
        let out = check_function(&f, 30);
        assert_eq!(out.failures, vec![]);
        let path = out.path.unwrap();
        // entry .. ret, through the store, skipping the abort handler.
        assert_eq!(path, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    }

    #[test]
    fn push_at_entry_fails() {
        let mut insns = straight();
        insns.insert(0, (0xff0, "push   rbx"));
        insns.insert(11, (0x1020, "pop    rbx"));
        let f = only(&function(ALLOC, &insns));
        let out = check_function(&f, 30);
        assert!(out.path.is_some());
        assert_eq!(
            out.failures,
            vec![
                Failure::PushAtEntry {
                    addr: 0xff0,
                    text: "push   rbx".into()
                },
                Failure::PushOnPath {
                    addr: 0xff0,
                    text: "push   rbx".into()
                },
            ]
        );
    }

    #[test]
    fn call_on_hit_path_fails() {
        let insns = vec![
            (0x1000, "mov    rcx,QWORD PTR [rdi+0x10]"),
            (
                0x1004,
                "call   QWORD PTR [rip+0x3000]        # 4004 <sched_getcpu>",
            ),
            (0x100a, "mov    QWORD PTR fs:[rcx+0x8],rax"),
            (0x100e, "mov    QWORD PTR [rcx],rax"),
            (0x100f, "ret"),
        ];
        let f = only(&function(ALLOC, &insns));
        let out = check_function(&f, 30);
        assert_eq!(
            out.failures,
            vec![Failure::CallOnPath {
                addr: 0x1004,
                text: "call   QWORD PTR [rip+0x3000]        # 4004 <sched_getcpu>".into()
            }]
        );
    }

    #[test]
    fn path_over_budget_fails() {
        // The short path to a ret avoids the store; the only path through
        // it is 3 + 40 nops + the commit + ret = 45 instructions.
        let mut insns = vec![
            (0x1000, "test   rdi,rdi".to_string()),
            (0x1003, "jne    1010 <x+0x10>".to_string()),
            (0x1005, "ret".to_string()),
            (0x1010, "mov    QWORD PTR fs:[rsi+0x8],r8".to_string()),
        ];
        for k in 0..40 {
            insns.push((0x1100 + k, "nop".to_string()));
        }
        insns.push((0x11f0, "mov    QWORD PTR [rsi],r8".to_string()));
        insns.push((0x1200, "ret".to_string()));
        let insns: Vec<(u64, &str)> = insns.iter().map(|(a, t)| (*a, t.as_str())).collect();
        let f = only(&function(ALLOC, &insns));
        let out = check_function(&f, 30);
        assert_eq!(
            out.failures,
            vec![Failure::OverBudget {
                len: 45,
                budget: 30
            }]
        );
        // The same function is fine under a budget that covers it.
        assert_eq!(check_function(&f, 45).failures, vec![]);
    }

    #[test]
    fn call_on_cold_branch_passes() {
        let insns = vec![
            (0x1000, "mov    rcx,QWORD PTR [rdi+0x10]"),
            (0x1004, "test   rcx,rcx"),
            (0x1007, "je     1020 <x+0x20>"),
            (0x1009, "mov    QWORD PTR fs:[rcx+0x8],rax"),
            (0x100e, "mov    rax,QWORD PTR [rdx]"),
            (0x1010, "mov    QWORD PTR [rdx],rcx"),
            (0x1011, "ret"),
            // Cold: initialise, then rejoin the hot path.
            (0x1020, "push   rbx"),
            (0x1021, "call   4000 <init>"),
            (0x1026, "pop    rbx"),
            (0x1027, "jmp    1009 <x+0x9>"),
        ];
        let f = only(&function(ALLOC, &insns));
        let out = check_function(&f, 30);
        assert_eq!(out.failures, vec![]);
        assert_eq!(out.path.unwrap(), vec![0, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn a_refused_section_is_not_the_hit_path() {
        // The section's refusal leaves without storing and reaches a `ret`
        // sooner (as when a cold block returns in place); the hit path is
        // the one that commits.
        let insns = vec![
            (0x1000, "mov    QWORD PTR fs:[rcx+0x8],rax"),
            (0x1005, "mov    r8,QWORD PTR [rdx]"),
            (0x1008, "test   r8,r8"),
            (0x100b, "jle    1020 <x+0x20>"),
            (0x100d, "mov    rax,QWORD PTR [rdx+r8*8+0x18]"),
            (0x1012, "sub    r8,0x1"),
            (0x1016, "mov    QWORD PTR [rdx],r8"),
            (0x1019, "ret"),
            (0x1020, "xor    eax,eax"),
            (0x1022, "ret"),
        ];
        let f = only(&function(ALLOC, &insns));
        let out = check_function(&f, 30);
        assert_eq!(out.failures, vec![]);
        assert_eq!(out.path.unwrap(), vec![0, 1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn no_store_means_no_hit_path() {
        // A load from fs:[rcx+0x8] is not the store.
        let insns = vec![
            (0x1000, "mov    rdx,QWORD PTR fs:[rcx+0x8]"),
            (0x1002, "mov    QWORD PTR [rcx],rdx"),
            (0x1004, "ret"),
        ];
        let f = only(&function(ALLOC, &insns));
        assert_eq!(check_function(&f, 30).failures, vec![Failure::NoHitPath]);
    }

    #[test]
    fn symbol_names() {
        let alloc = "__rust_alloc";
        assert!(is_target_symbol(ALLOC, alloc));
        assert!(is_target_symbol("__rust_alloc", alloc));
        assert!(is_target_symbol("__rustc::__rust_alloc", alloc));
        assert!(!is_target_symbol(
            "_RNvCsfLfy6EI15iL_7___rustc19___rust_alloc_zeroed",
            alloc
        ));
        assert!(!is_target_symbol(
            "_RNvCsfLfy6EI15iL_7___rustc26___rust_alloc_error_handler",
            alloc
        ));
        assert!(!is_target_symbol(
            "_RNvCsfLfy6EI15iL_7___rustc14___rust_realloc",
            alloc
        ));
        assert!(is_target_symbol(
            "_RNvCsfLfy6EI15iL_7___rustc14___rust_dealloc",
            "__rust_dealloc"
        ));
    }

    #[test]
    fn parses_objdump_lines() {
        let text = "\nDisassembly of section .text:\n\n\
                    000000000002dc10 <f>:\n   2dc10:\tpush   rbp\n   \
                    2dc11:\tbnd jmp 2dc10 <f>\n   2dc13:\trepz ret\n\t...\n";
        let f = only(text);
        assert_eq!(f.insns.len(), 3);
        assert_eq!(f.insns[1].mnemonic, "jmp");
        assert_eq!(flow(&f.insns[1]), Flow::Jump(Some(0x2dc10)));
        assert_eq!(flow(&f.insns[2]), Flow::Ret);
        let indirect =
            parse_insn("  1:\tjmp    QWORD PTR [rip+0xa3cbc]        # d1930 <x>").unwrap();
        assert_eq!(flow(&indirect), Flow::Jump(None));
        let reg = parse_insn("  1:\tjmp    rax").unwrap();
        assert_eq!(flow(&reg), Flow::Jump(None));
    }

    #[test]
    fn copy_check_finds_memcpy_however_reached() {
        // As objdump printed the probe when an atomic load sat in the
        // inlined alloc: the call through memcpy's GOT slot.
        let through_got = function(
            COPY_PROBE,
            &[
                (0x10, "movaps XMMWORD PTR [rsp+0xf0],xmm0"),
                (
                    0x18,
                    "call   QWORD PTR [rip+0xdde5a]        # 110d60 <memcpy@GLIBC_2.14>",
                ),
                (0x1e, "ret"),
            ],
        );
        assert_eq!(copy_references(&only(&through_got)).len(), 1);
        // Its address loaded once for a loop, then called through a register.
        let hoisted = function(
            COPY_PROBE,
            &[
                (
                    0x10,
                    "mov    rbx,QWORD PTR [rip+0x123999]        # 174d70 <memcpy@GLIBC_2.14>",
                ),
                (0x17, "call   rbx"),
            ],
        );
        assert_eq!(copy_references(&only(&hoisted)).len(), 1);
        let plt = function(COPY_PROBE, &[(0x10, "jmp    1040 <memmove@plt>")]);
        assert_eq!(copy_references(&only(&plt)).len(), 1);
    }

    #[test]
    fn copy_check_passes_stores_into_the_block() {
        let in_place = function(
            COPY_PROBE,
            &[
                (
                    0x10,
                    "call   QWORD PTR [rip+0xddf21]        # 110d48 <_DYNAMIC+0x2b0>",
                ),
                (0x16, "movups XMMWORD PTR [rax+0xf0],xmm0"),
                (
                    0x1d,
                    "call   QWORD PTR [rip+0xdd000]        # 110d80 <memset@GLIBC_2.2.5>",
                ),
                (0x23, "ret"),
            ],
        );
        assert!(copy_references(&only(&in_place)).is_empty());
    }
}
