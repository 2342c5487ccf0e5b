//! The rules engine against a model of its rules (`docs/design.md`), on
//! random operation sequences and random small configurations, through
//! both per-CPU paths: the real `rules::alloc` and `rules::free`, the real
//! sections and try-locks, the real jemalloc behind them.
//!
//! The model is deliberately naive: each list is a `Vec` used as a stack
//! (top at the end), the deferred list a `Vec` in push order. It shares no
//! code with the engine, so a wrong count, a wrong comparison at a boundary
//! or a block linked to the wrong list shows up as a difference. Every step
//! compares the block handed out (the model knows which one LIFO order
//! gives, or that it must be a fresh one), and the full content of every
//! list; each case ends by checking that no block is in two places.
//!
//! Operations name their CPU: the rseq path runs its sections on an rseq
//! area of the test's own ([`crate::rseq::fake`]) whose CPU number the
//! test sets, the fallback path takes its CPU from a test override
//! ([`crate::fallback::test_cpu`]).

use super::*;
use crate::config::Config;
use crate::context::enter_signal_context;
use crate::fallback::{test_cpu, Locked};
use crate::list::{read_link, ListWord};
use crate::percpu::Path;
use crate::rseq::{fake, Rseq};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestError, TestRunner};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;

/// At most this many CPUs (the machine has at least two, which a drain's
/// fence needs) and classes, so that lists get long enough to reach the
/// thresholds and caps.
const MAX_CPUS: usize = 2;
const MAX_CLASSES: usize = 3;
/// The model's class 0 is the engine's class 1 (16 bytes), and so on: the
/// 8-byte class caches nothing with the `hardened` feature.
const FIRST_CLASS: usize = 1;

#[derive(Clone, Copy, Debug)]
struct Setup {
    cap: u32,
    threshold: u32,
    cpus: usize,
    classes: usize,
}

/// Where an operation runs: a CPU, or none (a thread with no usable CPU).
type Cpu = Option<usize>;

#[derive(Clone, Copy, Debug)]
enum Op {
    Alloc {
        cpu: Cpu,
        class: usize,
        signal: bool,
    },
    /// Frees one of the blocks the test holds, in its own class.
    Free { pick: Index, cpu: Cpu, signal: bool },
    /// An alloc while someone else holds the CPU's slot (fallback only).
    BusyAlloc { cpu: usize, class: usize },
    /// A free while someone else holds the CPU's slot (fallback only).
    BusyFree { pick: Index, cpu: usize },
    /// A trim of one CPU.
    Trim { cpu: usize },
}

/// What a step did, comparable across engine and model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// An alloc got this block from the cache.
    Cached(usize),
    /// An alloc got a block from jemalloc.
    Fresh,
    /// A free (its block's place is in the lists compared after it).
    Freed,
    Trimmed,
}

fn cpu() -> impl Strategy<Value = Cpu> {
    prop_oneof![12 => (0..MAX_CPUS).prop_map(Some), 1 => Just(None)]
}

fn op(fallback: bool) -> impl Strategy<Value = Op> {
    // CPU and class numbers are reduced modulo the case's counts when run,
    // so the same sequence shrinks independently of the setup.
    let class = 0..MAX_CLASSES;
    let busy = if fallback { 1 } else { 0 };
    prop_oneof![
        6 => (cpu(), class.clone(), prop::bool::weighted(0.1))
            .prop_map(|(cpu, class, signal)| Op::Alloc { cpu, class, signal }),
        8 => (any::<Index>(), cpu(), prop::bool::weighted(0.45))
            .prop_map(|(pick, cpu, signal)| Op::Free { pick, cpu, signal }),
        busy => (0..MAX_CPUS, class).prop_map(|(cpu, class)| Op::BusyAlloc { cpu, class }),
        2 * busy => (any::<Index>(), 0..MAX_CPUS).prop_map(|(pick, cpu)| Op::BusyFree { pick, cpu }),
        1 => (0..MAX_CPUS).prop_map(|cpu| Op::Trim { cpu }),
    ]
}

fn setup() -> impl Strategy<Value = Setup> {
    (0u32..=40, 1u32..=20, 1..=MAX_CPUS, 1..=MAX_CLASSES).prop_map(
        |(cap, threshold, cpus, classes)| Setup {
            cap,
            threshold,
            cpus,
            classes,
        },
    )
}

/// One CPU's lists of one class in the model.
#[derive(Clone, Default)]
struct Lists {
    /// Bottom first.
    task: Vec<usize>,
    /// Whether the task list is a chain (spliced, linked), which a push
    /// extends too until it empties; else its blocks are in slots.
    chain: bool,
    sig: Vec<usize>,
}

/// The rules, literally.
struct Model {
    cap: usize,
    threshold: usize,
    /// `[cpu][class]`.
    lists: Vec<Vec<Lists>>,
    /// `[cpu]`, bottom first.
    deferred: Vec<Vec<usize>>,
    /// Every block the engine handed back to jemalloc is forgotten; the
    /// model needs no jemalloc.
    busy_slots: bool,
}

impl Model {
    fn new(s: &Setup) -> Model {
        Model {
            cap: s.cap as usize,
            threshold: s.threshold as usize,
            lists: vec![vec![Lists::default(); s.classes]; s.cpus],
            deferred: vec![Vec::new(); s.cpus],
            busy_slots: false,
        }
    }

    /// alloc: the block the cache hands out, or `None` for a miss.
    fn alloc(&mut self, cpu: Cpu, class: usize, signal: bool) -> Option<usize> {
        let cpu = cpu?;
        let busy = self.busy_slots;
        let l = &mut self.lists[cpu][class];
        // 2. A block in the task list: a hit (a busy slot is a miss).
        if !busy && !l.task.is_empty() {
            let b = l.task.pop();
            l.chain &= !l.task.is_empty();
            return b;
        }
        // 1. The task list empty and nr_sig >= threshold: splice.
        if l.task.is_empty() && l.sig.len() >= self.threshold {
            let mut rest = std::mem::take(&mut l.sig);
            let b = rest.pop();
            if !rest.is_empty() {
                if busy {
                    // The install needs the slot: the rest is deferred.
                    self.deferred[cpu].extend(rest);
                } else {
                    l.task = rest;
                    l.chain = true;
                }
            }
            return b;
        }
        // 3. A miss; task context first hands back the deferred blocks.
        if !signal {
            self.deferred[cpu].clear();
        }
        None
    }

    /// free: updates the lists; the engine's lists are compared after.
    fn free(&mut self, cpu: Cpu, class: usize, b: usize, signal: bool) {
        let busy = self.busy_slots;
        if signal || busy {
            // Rule 3 (and a busy slot, the analog of interrupt context):
            // the signal list, or past the cap the deferred list. With no
            // CPU, CPU 0's.
            let cpu = cpu.unwrap_or(0);
            let l = &mut self.lists[cpu][class];
            if l.task.len() + l.sig.len() >= self.cap {
                self.deferred[cpu].push(b);
            } else {
                l.sig.push(b);
            }
            return;
        }
        // Rule 4: no CPU, to jemalloc.
        let Some(cpu) = cpu else {
            return;
        };
        let l = &mut self.lists[cpu][class];
        // Rule 1: the cap counts both lists; an overflow hands back the
        // deferred blocks before it goes to jemalloc.
        if l.task.len() + l.sig.len() >= self.cap {
            self.deferred[cpu].clear();
            return;
        }
        // Rule 2.
        l.task.push(b);
    }

    fn lists_hold(&self, b: usize) -> bool {
        self.lists
            .iter()
            .flatten()
            .any(|l| l.task.contains(&b) || l.sig.contains(&b))
            || self.deferred.iter().flatten().any(|&d| d == b)
    }

    fn trim(&mut self, cpu: usize) {
        for l in &mut self.lists[cpu] {
            *l = Lists::default();
        }
        self.deferred[cpu].clear();
    }
}

/// The engine's side: a table on path `P`, and the blocks the test holds.
struct Engine {
    table: *mut Table,
    path: Path,
    /// Blocks the test holds, with their class.
    held: Vec<(usize, usize)>,
}

impl Engine {
    fn new(config: &Config, path: Path, cpus: usize) -> Engine {
        let offset = match path {
            Path::Rseq => fake::offset(),
            Path::Fallback => 0,
        };
        let table = Table::create(config, path, offset, cpus);
        assert!(!table.is_null());
        Engine {
            table,
            path,
            held: Vec::new(),
        }
    }

    fn table(&self) -> &Table {
        // SAFETY: mapped in `new`, unmapped only in `drop`.
        unsafe { &*self.table }
    }

    fn on(&self, cpu: Cpu) {
        match self.path {
            Path::Rseq => fake::set_cpu(cpu),
            Path::Fallback => test_cpu::set(Some(cpu.unwrap_or(usize::MAX))),
        }
    }

    fn class(&self, class: usize) -> Class {
        Class::from_index(class + FIRST_CLASS).unwrap()
    }

    fn alloc(&mut self, cpu: Cpu, class: usize, signal: bool) -> usize {
        self.on(cpu);
        let _signal = signal.then(enter_signal_context);
        let t = self.table();
        let site = t.site_of(self.class(class));
        let b = match self.path {
            Path::Rseq => alloc::<Rseq>(t, site, 0),
            Path::Fallback => alloc::<Locked>(t, site, 0),
        } as usize;
        assert_ne!(b, 0, "jemalloc is out of memory");
        self.held.push((b, class));
        b
    }

    fn free(&mut self, b: usize, class: usize, cpu: Cpu, signal: bool) {
        self.on(cpu);
        let _signal = signal.then(enter_signal_context);
        let t = self.table();
        let site = t.site_of(self.class(class));
        // SAFETY: the test held `b`, a block of this class from this
        // table's engine, and lets go of it now.
        unsafe {
            match self.path {
                Path::Rseq => free::<Rseq>(t, site, b as *mut u8),
                Path::Fallback => free::<Locked>(t, site, b as *mut u8),
            }
        }
    }

    fn trim(&self, cpu: usize) {
        let mut report = crate::stats::TrimReport::default();
        crate::drain::trim_cpu(self.table(), cpu, &mut report);
        assert_eq!(report.cpus_skipped, 0, "a quiet trim reaches its CPU");
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        test_cpu::set(None);
        fake::set_cpu(None);
        for &(b, class) in &self.held {
            // SAFETY: the test's own blocks, from jemalloc, of this class.
            unsafe { crate::backend::free_sized(b as *mut u8, self.class(class).size()) };
        }
        // SAFETY: nothing else uses the table.
        unsafe {
            crate::drain::teardown(self.table());
            Table::destroy(self.table);
        }
    }
}

/// The blocks of a list, head (top) first, checking that every link
/// carries the length of the list it starts.
fn walk(list: ListWord) -> Result<Vec<usize>, TestCaseError> {
    let mut blocks = Vec::new();
    let mut w = list;
    while !w.head().is_null() {
        prop_assert!(blocks.len() < 10_000, "a list loops");
        blocks.push((w.head() as usize, w.len()));
        // SAFETY: between steps nothing else touches the lists, and their
        // blocks are live jemalloc blocks.
        w = unsafe { read_link(w.head()) };
    }
    Ok(blocks.into_iter().map(|(b, _)| b).collect())
}

fn walk_exact(list: ListWord) -> Result<Vec<usize>, TestCaseError> {
    let blocks = walk(list)?;
    let mut w = list;
    for n in (1..=blocks.len() as u32).rev() {
        prop_assert_eq!(w.len(), n, "the lengths carried by the links");
        // SAFETY: as in `walk`.
        w = unsafe { read_link(w.head()) };
    }
    Ok(blocks)
}

/// The engine's task list of a record, bottom first, and whether it is a
/// chain.
fn task_list(rec: &Record) -> Result<(Vec<usize>, bool), TestCaseError> {
    let word = rec.task.load();
    prop_assert!(!word.is_draining(), "a drain left its bit");
    if let Some(chain) = word.in_chain() {
        let mut top_first = walk_exact(chain)?;
        top_first.reverse();
        return Ok((top_first, true));
    }
    let n = word.in_slots().unwrap_or(0);
    // SAFETY: slots below the length exist.
    let slots = (0..n).map(|i| unsafe { rec.slot(i) }.load(Ordering::Relaxed) as usize);
    Ok((slots.collect(), false))
}

fn compare_lists(engine: &Engine, model: &Model) -> Result<(), TestCaseError> {
    let t = engine.table();
    for (cpu, deferred) in model.deferred.iter().enumerate() {
        for (class, want) in model.lists[cpu].iter().enumerate() {
            let rec = t.record(cpu, engine.class(class)).unwrap();
            let (task, chain) = task_list(rec)?;
            prop_assert_eq!(&task, &want.task, "task list, cpu {} class {}", cpu, class);
            prop_assert_eq!(
                chain,
                want.chain && !want.task.is_empty(),
                "chain, cpu {} class {}",
                cpu,
                class
            );
            prop_assert_eq!(rec.task.load().len() as usize, want.task.len(), "nr");
            let mut sig = walk_exact(rec.sig.word())?;
            sig.reverse();
            prop_assert_eq!(&sig, &want.sig, "signal list, cpu {} class {}", cpu, class);
            prop_assert_eq!(rec.sig.len() as usize, want.sig.len(), "nr_sig");
        }
        let mut got = walk(t.cpu(cpu).deferred.word())?;
        got.reverse();
        prop_assert_eq!(&got, deferred, "deferred, cpu {}", cpu);
    }
    Ok(())
}

/// How often each outcome came up over a run, so the run shows that it
/// reached every rule (a generator that never splices would prove little).
type Seen = BTreeMap<&'static str, usize>;

fn run_case(path: Path, s: Setup, ops: &[Op], seen: &mut Seen) -> Result<(), TestCaseError> {
    let config = Config::new()
        .with_cap(s.cap)
        .with_splice_threshold(s.threshold)
        .with_read_env(false);
    let mut engine = Engine::new(&config, path, s.cpus);
    let t = engine.table();
    for class in 0..s.classes {
        // Small classes stay under the byte budget, so the cap is the
        // configured one and the model needs no budget arithmetic.
        prop_assert_eq!(t.cap(engine.class(class)), s.cap);
    }
    let mut model = Model::new(&s);
    let cpu_of = |c: Cpu| c.map(|c| c % s.cpus);
    let real_cpus = crate::table::possible_cpus().unwrap_or(1);

    for (step, op) in ops.iter().enumerate() {
        let (got, want) = match *op {
            Op::Alloc { cpu, class, signal } => {
                let (cpu, class) = (cpu_of(cpu), class % s.classes);
                let before: HashSet<usize> = engine.held.iter().map(|&(b, _)| b).collect();
                let b = engine.alloc(cpu, class, signal);
                prop_assert!(!before.contains(&b), "step {}: handed out twice", step);
                match model.alloc(cpu, class, signal) {
                    Some(m) => (Outcome::Cached(b), Outcome::Cached(m)),
                    // A fresh block is whatever jemalloc gives: never one
                    // the model still lists.
                    None => {
                        prop_assert!(
                            !model.lists_hold(b),
                            "step {}: a listed block was fresh",
                            step
                        );
                        (Outcome::Fresh, Outcome::Fresh)
                    }
                }
            }
            Op::BusyAlloc { cpu, class } => {
                let (cpu, class) = (cpu % s.cpus, class % s.classes);
                // SAFETY: mapped until `engine` drops, after this step.
                let head = unsafe { &*engine.table }.cpu(cpu);
                prop_assert!(head.try_lock(), "the slot is free between steps");
                model.busy_slots = true;
                let b = engine.alloc(Some(cpu), class, false);
                head.unlock();
                let m = model.alloc(Some(cpu), class, false);
                model.busy_slots = false;
                match m {
                    Some(m) => (Outcome::Cached(b), Outcome::Cached(m)),
                    None => (Outcome::Fresh, Outcome::Fresh),
                }
            }
            Op::Free { pick, cpu, signal } => {
                if engine.held.is_empty() {
                    continue;
                }
                let cpu = cpu_of(cpu);
                let (b, class) = engine.held.swap_remove(pick.index(engine.held.len()));
                engine.free(b, class, cpu, signal);
                model.free(cpu, class, b, signal);
                (Outcome::Freed, Outcome::Freed)
            }
            Op::BusyFree { pick, cpu } => {
                if engine.held.is_empty() {
                    continue;
                }
                let cpu = cpu % s.cpus;
                let (b, class) = engine.held.swap_remove(pick.index(engine.held.len()));
                // SAFETY: mapped until `engine` drops, after this step.
                let head = unsafe { &*engine.table }.cpu(cpu);
                prop_assert!(head.try_lock(), "the slot is free between steps");
                engine.free(b, class, Some(cpu), false);
                head.unlock();
                model.busy_slots = true;
                model.free(Some(cpu), class, b, false);
                model.busy_slots = false;
                (Outcome::Freed, Outcome::Freed)
            }
            Op::Trim { cpu } => {
                let cpu = cpu % s.cpus;
                if cpu >= real_cpus {
                    // The rseq path fences the CPU with that number.
                    continue;
                }
                engine.on(Some(cpu));
                engine.trim(cpu);
                model.trim(cpu);
                (Outcome::Trimmed, Outcome::Trimmed)
            }
        };
        prop_assert_eq!(got, want, "step {}: {:?}", step, op);
        let name = match (op, got) {
            (_, Outcome::Cached(_)) => "cached",
            (_, Outcome::Fresh) => "fresh",
            (Op::BusyFree { .. }, _) => "busy free",
            (Op::Free { signal: true, .. }, _) => "signal free",
            (Op::Free { cpu: None, .. }, _) => "free with no CPU",
            (_, Outcome::Freed) => "task free",
            (_, Outcome::Trimmed) => "trim",
        };
        *seen.entry(name).or_default() += 1;
        compare_lists(&engine, &model)
            .map_err(|e| TestCaseError::fail(format!("after step {step} ({op:?}): {e}")))?;
        for l in model.lists.iter().flatten() {
            *seen.entry("splice state").or_default() += l.chain as usize;
            *seen.entry("at the cap").or_default() +=
                (l.task.len() + l.sig.len() >= model.cap) as usize;
        }
        *seen.entry("deferred").or_default() += model.deferred.iter().map(Vec::len).sum::<usize>();
    }

    // No block is in two places: the test's hands, a list, a deferred
    // list. (What went back to jemalloc is jemalloc's.)
    let mut places: Vec<usize> = engine.held.iter().map(|&(b, _)| b).collect();
    for l in model.lists.iter().flatten() {
        places.extend(&l.task);
        places.extend(&l.sig);
    }
    places.extend(model.deferred.iter().flatten());
    let unique: HashSet<usize> = places.iter().copied().collect();
    prop_assert_eq!(unique.len(), places.len(), "a block is in two places");
    Ok(())
}

fn run(path: Path) {
    let mut config = RunnerConfig {
        failure_persistence: None,
        ..RunnerConfig::default()
    };
    // PROPTEST_CASES still wins, for a longer soak.
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 2000;
    }
    let mut runner = TestRunner::new(config);
    let seen = RefCell::new(Seen::new());
    let strategy = (
        setup(),
        prop::collection::vec(op(path == Path::Fallback), 1..300),
    );
    let result = runner.run(&strategy, |(s, ops)| {
        run_case(path, s, &ops, &mut seen.borrow_mut())
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, (s, ops))) => {
            panic!("{why}\nminimal case: {s:?}\n{} ops: {ops:#?}", ops.len())
        }
        Err(e) => panic!("{e}"),
    }
    let seen = seen.into_inner();
    eprintln!("{path}: outcomes over the run: {seen:?}");
    let mut expected = vec![
        "cached",
        "fresh",
        "task free",
        "signal free",
        "free with no CPU",
        "trim",
        "splice state",
        "at the cap",
        "deferred",
    ];
    if path == Path::Fallback {
        expected.push("busy free");
    }
    for outcome in expected {
        let n = seen.get(outcome).copied().unwrap_or(0);
        assert!(
            n >= 100,
            "{path}: the run reached {outcome:?} only {n} times"
        );
    }
}

#[test]
fn the_rseq_path_follows_the_model() {
    run(Path::Rseq);
}

#[test]
fn the_fallback_path_follows_the_model() {
    run(Path::Fallback);
}

/// A splice's install on the fallback path is plain code under the slot,
/// so a signal handler can interrupt it and free blocks in signal context
/// while the task list is about to receive the spliced chain. Those frees
/// must count the chain: the record may end at most one past the cap
/// (the documented race), never at the chain's length past it. Run with
/// the handler's frees landing before the chain is stored and after.
#[test]
fn signal_frees_during_an_install_count_the_chain() {
    use crate::fallback::test_hook::{self, Point};
    const CAP: u32 = 32;
    for point in [Point::BeforeInstall, Point::AfterInstall] {
        let config = Config::new()
            .with_cap(CAP)
            .with_splice_threshold(4)
            .with_read_env(false);
        let mut engine = Engine::new(&config, Path::Fallback, 1);
        let blocks: Vec<usize> = (0..2 * CAP)
            .map(|_| engine.alloc(Some(0), 0, false))
            .collect();
        engine.held.clear();
        let (spliced, handler) = blocks.split_at(CAP as usize);
        for &b in spliced {
            engine.free(b, 0, Some(0), true);
        }
        let table = engine.table;
        let class = engine.class(0);
        let handler = handler.to_vec();
        test_hook::set(point, move || {
            let _signal = enter_signal_context();
            // SAFETY: the table lives until `engine` drops; the blocks are
            // the test's, of this class, and it lets go of them here.
            unsafe {
                let t = &*table;
                for &b in &handler {
                    free::<Locked>(t, t.site_of(class), b as *mut u8);
                }
            }
        });
        let got = engine.alloc(Some(0), 0, false);
        assert!(spliced.contains(&got), "{point:?}: the alloc spliced");
        let rec = engine.table().record(0, class).unwrap();
        let total = rec.task.load().len() + rec.sig.len();
        assert!(
            total <= CAP + 1,
            "{point:?}: nr + nr_sig = {total} after an interrupted install, cap {CAP}"
        );
    }
}
