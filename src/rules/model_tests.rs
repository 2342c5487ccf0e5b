//! The rules engine against a model of `DESIGN.md` section 1, on random
//! operation sequences and random small configurations.
//!
//! The model is deliberately naive: each list is a `Vec` used as a stack
//! (top at the end), the deferred list a `Vec` in push order, jemalloc a
//! `Vec` of free blocks. It shares no code with the engine, so a wrong
//! count, a wrong comparison at a boundary or a block linked to the wrong
//! list shows up as a difference. Every step compares the outcome, the
//! exact block handed out (the model knows which one LIFO order gives), and
//! the full content and counts of every list; each case ends by checking
//! that every block is in exactly one place.

use super::*;
use crate::config::Config;
use crate::free_list::{count, read_link};
use crate::Path;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestError, TestRunner};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};

/// At most this many CPUs and classes are used, so that lists get long
/// enough to reach the thresholds and caps.
const MAX_CPUS: usize = 3;
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

#[derive(Clone, Copy, Debug)]
enum Op {
    Alloc {
        cpu: usize,
        class: Class,
    },
    /// Frees one of the blocks the test holds, in its own class.
    Free {
        pick: Index,
        cpu: usize,
        ctx: Context,
    },
    /// An alloc while someone else holds the CPU's slot.
    BusyAlloc {
        cpu: usize,
        class: Class,
    },
    /// A free while someone else holds the CPU's slot.
    BusyFree {
        pick: Index,
        cpu: usize,
        ctx: Context,
    },
    TakeDeferred {
        cpu: usize,
    },
}

/// An outcome with the block it names, comparable across engine and model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Hit(usize),
    Spliced(usize),
    Miss,
    Busy,
    Free(Free),
}

fn context() -> impl Strategy<Value = Context> {
    prop_oneof![
        3 => Just(Context::Task),
        3 => Just(Context::Signal),
        1 => Just(Context::Other),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    // CPU and class numbers are reduced modulo the case's counts when run,
    // so the same sequence shrinks independently of the setup.
    let cpu = 0..MAX_CPUS;
    let class = 0..MAX_CLASSES;
    prop_oneof![
        5 => (cpu.clone(), class.clone()).prop_map(|(cpu, class)| Op::Alloc { cpu, class }),
        7 => (any::<Index>(), cpu.clone(), context())
            .prop_map(|(pick, cpu, ctx)| Op::Free { pick, cpu, ctx }),
        1 => (cpu.clone(), class).prop_map(|(cpu, class)| Op::BusyAlloc { cpu, class }),
        2 => (any::<Index>(), cpu.clone(), context())
            .prop_map(|(pick, cpu, ctx)| Op::BusyFree { pick, cpu, ctx }),
        1 => cpu.prop_map(|cpu| Op::TakeDeferred { cpu }),
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

/// Section 1 of `DESIGN.md`, literally.
struct Model {
    cap: usize,
    threshold: usize,
    /// `[cpu][class]`, top of the stack at the end.
    task: Vec<Vec<Vec<usize>>>,
    sig: Vec<Vec<Vec<usize>>>,
    /// `[cpu]`, in push order.
    deferred: Vec<Vec<usize>>,
}

impl Model {
    fn new(s: &Setup) -> Model {
        let lists = vec![vec![Vec::new(); s.classes]; s.cpus];
        Model {
            cap: s.cap as usize,
            threshold: s.threshold as usize,
            task: lists.clone(),
            sig: lists,
            deferred: vec![Vec::new(); s.cpus],
        }
    }

    fn alloc(&mut self, cpu: usize, class: Class, busy: bool) -> Outcome {
        if busy {
            return Outcome::Busy;
        }
        let (task, sig) = (&mut self.task[cpu][class], &mut self.sig[cpu][class]);
        let spliced = task.is_empty() && sig.len() >= self.threshold;
        if spliced {
            *task = std::mem::take(sig);
        }
        match (task.pop(), spliced) {
            (None, _) => Outcome::Miss,
            (Some(b), false) => Outcome::Hit(b),
            (Some(b), true) => Outcome::Spliced(b),
        }
    }

    fn free(&mut self, cpu: usize, class: Class, b: usize, ctx: Context, busy: bool) -> Free {
        let held = self.task[cpu][class].len() + self.sig[cpu][class].len();
        let full = held >= self.cap;
        match ctx {
            Context::Other => Free::Other,
            Context::Task if !busy => {
                if full {
                    Free::Overflow
                } else {
                    self.task[cpu][class].push(b);
                    Free::Task
                }
            }
            // Signal context, or a task-context free that found the slot
            // busy: the signal list, or the deferred list past the cap.
            _ => {
                if full {
                    self.deferred[cpu].push(b);
                    Free::Deferred
                } else {
                    self.sig[cpu][class].push(b);
                    Free::Signal
                }
            }
        }
    }

    fn take_deferred(&mut self, cpu: usize) -> Option<Vec<usize>> {
        let mut taken = std::mem::take(&mut self.deferred[cpu]);
        if taken.is_empty() {
            return None;
        }
        // A stack: the last one pushed comes first.
        taken.reverse();
        Some(taken)
    }
}

/// The engine's side: a fallback-path table, and blocks that the test
/// holds or that "jemalloc" has.
struct Engine {
    table: *mut Table,
    // Boxed so blocks keep their addresses while the Vec grows.
    #[allow(clippy::vec_box)]
    pool: Vec<Box<[u64; 4]>>,
    /// Blocks the test holds, with their class.
    held: Vec<(usize, Class)>,
    /// Blocks given back to jemalloc; a miss reuses the latest, as
    /// jemalloc's own LIFO caches would, so addresses recur.
    jemalloc: Vec<usize>,
}

impl Engine {
    fn new(config: &Config) -> Engine {
        let table = Table::create(config, Path::Fallback, 0);
        assert!(!table.is_null());
        Engine {
            table,
            pool: Vec::new(),
            held: Vec::new(),
            jemalloc: Vec::new(),
        }
    }

    fn table(&self) -> &Table {
        // SAFETY: mapped in `new`, unmapped only in `drop`.
        unsafe { &*self.table }
    }

    fn jemalloc_alloc(&mut self) -> usize {
        self.jemalloc.pop().unwrap_or_else(|| {
            self.pool.push(Box::new([0; 4]));
            self.pool.last_mut().unwrap().as_mut_ptr() as usize
        })
    }

    fn alloc(&mut self, cpu: usize, class: Class, busy: bool) -> Outcome {
        let cache = self.table().cpu(cpu);
        if busy {
            assert!(cache.try_lock(), "the slot is free between steps");
        }
        let a = alloc_locked(self.table(), cpu, class + FIRST_CLASS);
        if busy {
            cache.unlock();
        }
        let (outcome, block) = match a {
            Alloc::Hit(p) => (Outcome::Hit(p as usize), p as usize),
            Alloc::Spliced(p) => (Outcome::Spliced(p as usize), p as usize),
            Alloc::Miss => (Outcome::Miss, self.jemalloc_alloc()),
            Alloc::Busy => (Outcome::Busy, self.jemalloc_alloc()),
        };
        self.held.push((block, class));
        outcome
    }

    fn free(&mut self, b: usize, class: Class, cpu: usize, ctx: Context, busy: bool) -> Free {
        let cache = self.table().cpu(cpu);
        if busy {
            assert!(cache.try_lock(), "the slot is free between steps");
        }
        // SAFETY: the test held `b`, a 32-byte 8-aligned block of its own,
        // and has just let go of it; the class only selects the lists.
        let f = unsafe { free_locked(self.table(), cpu, class + FIRST_CLASS, b as *mut u8, ctx) };
        if busy {
            cache.unlock();
        }
        if matches!(f, Free::Overflow | Free::Other) {
            self.jemalloc.push(b);
        }
        f
    }

    fn take_deferred(&mut self, cpu: usize) -> Option<Vec<usize>> {
        let taken: Vec<usize> = take_deferred(self.table(), cpu)?
            .map(|p| p as usize)
            .collect();
        self.jemalloc.extend(&taken);
        Some(taken)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // SAFETY: nothing else uses the table.
        unsafe { Table::destroy(self.table) };
    }
}

/// The blocks of a list word, head first, checking that every link carries
/// the length of the list it starts.
fn walk(word: u64) -> Result<Vec<usize>, TestCaseError> {
    let mut blocks = Vec::new();
    let mut counts = Vec::new();
    let mut w = word;
    while !head(w).is_null() {
        prop_assert!(blocks.len() < 10_000, "a list loops");
        blocks.push(head(w) as usize);
        counts.push(count(w));
        // SAFETY: between steps nothing else touches the lists, and the
        // blocks stay allocated in the engine's pool.
        w = unsafe { read_link(head(w)) };
    }
    prop_assert_eq!(w, 0, "a list ends in an empty word");
    let n = blocks.len() as u32;
    let expected: Vec<u32> = (1..=n).rev().collect();
    prop_assert_eq!(counts, expected, "the lengths carried by the links");
    Ok(blocks)
}

/// A model stack, head first, as the engine's list word links it.
fn top_first(stack: &[usize]) -> Vec<usize> {
    stack.iter().rev().copied().collect()
}

fn compare_lists(engine: &Engine, model: &Model) -> Result<(), TestCaseError> {
    for (cpu, deferred) in model.deferred.iter().enumerate() {
        let cache = engine.table().cpu(cpu);
        for (class, lists) in cache.lists.iter().enumerate() {
            let task = lists.task.load(Ordering::Relaxed);
            let modelled = class.checked_sub(FIRST_CLASS);
            let (want_task, want_sig) = match modelled.and_then(|c| model.task[cpu].get(c)) {
                Some(task) => (
                    top_first(task),
                    top_first(&model.sig[cpu][class - FIRST_CLASS]),
                ),
                None => (Vec::new(), Vec::new()),
            };
            // nr and nr_sig first: they are what the rules read.
            prop_assert_eq!(
                task_len(task) as usize,
                want_task.len(),
                "nr, cpu {} class {}",
                cpu,
                class
            );
            prop_assert_eq!(
                lists.sig.len() as usize,
                want_sig.len(),
                "nr_sig, cpu {} class {}",
                cpu,
                class
            );
            prop_assert_eq!(
                walk(task)?,
                want_task,
                "task list, cpu {} class {}",
                cpu,
                class
            );
            prop_assert_eq!(
                walk(lists.sig.word())?,
                want_sig,
                "signal list, cpu {} class {}",
                cpu,
                class
            );
        }
        prop_assert_eq!(
            walk(cache.deferred.word())?,
            top_first(deferred),
            "deferred, cpu {}",
            cpu
        );
    }
    Ok(())
}

/// How often each outcome came up over a run, so the run shows that it
/// reached every rule (a generator that never splices would prove little).
type Seen = BTreeMap<&'static str, usize>;

fn name(o: &Outcome) -> &'static str {
    match o {
        Outcome::Hit(_) => "hit",
        Outcome::Spliced(_) => "spliced",
        Outcome::Miss => "miss",
        Outcome::Busy => "busy",
        Outcome::Free(Free::Task) => "free task",
        Outcome::Free(Free::Signal) => "free signal",
        Outcome::Free(Free::Deferred) => "free deferred",
        Outcome::Free(Free::Overflow) => "free overflow",
        Outcome::Free(Free::Other) => "free other",
    }
}

fn run_case(s: Setup, ops: &[Op], seen: &mut Seen) -> Result<(), TestCaseError> {
    let config = Config::new()
        .cap(s.cap)
        .splice_threshold(s.threshold)
        .read_env(false);
    let mut engine = Engine::new(&config);
    let cpus = s.cpus.min(engine.table().header().ncpu as usize);
    let s = Setup { cpus, ..s };
    for class in 0..s.classes {
        // Small classes stay under the byte budget, so the cap is the
        // configured one and the model needs no budget arithmetic.
        prop_assert_eq!(engine.table().header().cap(class + FIRST_CLASS), s.cap);
    }
    prop_assert_eq!(engine.table().header().threshold, s.threshold);
    let mut model = Model::new(&s);

    for (step, op) in ops.iter().enumerate() {
        let (got, want) = match *op {
            Op::Alloc { cpu, class } | Op::BusyAlloc { cpu, class } => {
                let busy = matches!(op, Op::BusyAlloc { .. });
                let (cpu, class) = (cpu % s.cpus, class % s.classes);
                (
                    engine.alloc(cpu, class, busy),
                    model.alloc(cpu, class, busy),
                )
            }
            Op::Free { pick, cpu, ctx } | Op::BusyFree { pick, cpu, ctx } => {
                if engine.held.is_empty() {
                    continue;
                }
                let busy = matches!(op, Op::BusyFree { .. });
                let cpu = cpu % s.cpus;
                let (b, class) = engine.held.swap_remove(pick.index(engine.held.len()));
                (
                    Outcome::Free(engine.free(b, class, cpu, ctx, busy)),
                    Outcome::Free(model.free(cpu, class, b, ctx, busy)),
                )
            }
            Op::TakeDeferred { cpu } => {
                let cpu = cpu % s.cpus;
                prop_assert_eq!(
                    engine.take_deferred(cpu),
                    model.take_deferred(cpu),
                    "step {}",
                    step
                );
                compare_lists(&engine, &model)?;
                continue;
            }
        };
        prop_assert_eq!(got, want, "step {}: {:?}", step, op);
        *seen.entry(name(&got)).or_default() += 1;
        compare_lists(&engine, &model)
            .map_err(|e| TestCaseError::fail(format!("after step {step} ({op:?}): {e}")))?;
    }

    // Every block is in exactly one place: the test's hands, a list, a
    // deferred list, or jemalloc.
    let mut places: Vec<usize> = engine.held.iter().map(|&(b, _)| b).collect();
    places.extend(&engine.jemalloc);
    for cpu in 0..s.cpus {
        let cache = engine.table().cpu(cpu);
        for lists in &cache.lists {
            places.extend(walk(lists.task.load(Ordering::Relaxed))?);
            places.extend(walk(lists.sig.word())?);
        }
        places.extend(walk(cache.deferred.word())?);
    }
    let unique: HashSet<usize> = places.iter().copied().collect();
    prop_assert_eq!(unique.len(), places.len(), "a block is in two places");
    let all: HashSet<usize> = engine.pool.iter().map(|b| b.as_ptr() as usize).collect();
    prop_assert_eq!(unique, all, "a block was lost or made up");
    Ok(())
}

#[test]
fn the_engine_follows_the_model() {
    let mut config = RunnerConfig {
        failure_persistence: None,
        ..RunnerConfig::default()
    };
    // PROPTEST_CASES still wins, for a longer soak.
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 3000;
    }
    let mut runner = TestRunner::new(config);
    let seen = RefCell::new(Seen::new());
    let strategy = (setup(), prop::collection::vec(op(), 1..300));
    let result = runner.run(&strategy, |(s, ops)| {
        run_case(s, &ops, &mut seen.borrow_mut())
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, (s, ops))) => {
            panic!("{why}\nminimal case: {s:?}\n{} ops: {ops:#?}", ops.len())
        }
        Err(e) => panic!("{e}"),
    }
    let seen = seen.into_inner();
    eprintln!("outcomes over the run: {seen:?}");
    for outcome in [
        "hit",
        "spliced",
        "miss",
        "busy",
        "free task",
        "free signal",
        "free deferred",
        "free overflow",
        "free other",
    ] {
        let n = seen.get(outcome).copied().unwrap_or(0);
        assert!(n >= 100, "the run reached {outcome:?} only {n} times");
    }
}
