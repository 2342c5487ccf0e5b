//! Model checking of the lock-free lists with loom.
//!
//! Run with
//! `RUSTFLAGS="--cfg loom" cargo test --release --lib --target-dir target/loom loom`.
//!
//! A signal handler that interrupts a push between its load and its CAS is,
//! to the list, one more thread whose whole operation lands in that gap;
//! loom runs each model under every interleaving of the atomics (up to its
//! preemption bound), so that gap is explored along with all the others.
//! Links live in block memory, which loom does not track; the lists'
//! correctness rests on the atomics, which it does. Each model is small (2-3
//! threads, 1-3 operations each) to keep the state space small.

use super::*;
use loom::sync::Arc;
use loom::thread;
use std::collections::HashSet;

/// Blocks for one model run, freed when it ends (loom runs a model many
/// times; leaking would grow with each run).
struct Blocks(Vec<usize>);

impl Blocks {
    fn new(n: usize) -> Blocks {
        Blocks(
            (0..n)
                .map(|_| Box::into_raw(Box::new([0u64; 2])) as usize)
                .collect(),
        )
    }

    fn get(&self, i: usize) -> *mut u8 {
        self.0[i] as *mut u8
    }
}

impl Drop for Blocks {
    fn drop(&mut self) {
        for &b in &self.0 {
            // SAFETY: made by `Box::into_raw` in `new`, freed only here,
            // after every thread of the run has finished with it.
            drop(unsafe { Box::from_raw(b as *mut [u64; 2]) });
        }
    }
}

/// The blocks of a list word that the caller owns, head first, checking
/// that every link carries the length of the list it starts.
fn walk(word: ListWord) -> Vec<usize> {
    walk_checking(word, true)
}

/// As [`walk`]; `exact_links` false skips the check of the lengths behind
/// the head, which `push_chain` leaves as they were in the chain: it is for
/// the deferred lists, whose lengths mean nothing and which are only ever
/// taken whole.
fn walk_checking(word: ListWord, exact_links: bool) -> Vec<usize> {
    let mut blocks = Vec::new();
    let mut w = word;
    while !w.head().is_null() {
        assert!(blocks.len() < 64, "a list loops");
        blocks.push((w.head() as usize, w.len()));
        // SAFETY: the caller owns the list; its blocks are live `Blocks`.
        w = unsafe { read_link(w.head()) };
    }
    let n = blocks.len() as u32;
    assert_eq!(
        blocks.first().map_or(0, |&(_, c)| c),
        n,
        "the head's length"
    );
    for (i, &(_, c)) in blocks.iter().enumerate().filter(|_| exact_links) {
        assert_eq!(c, n - i as u32, "a link's length");
    }
    blocks.into_iter().map(|(b, _)| b).collect()
}

/// Every block is in exactly one of `places`, and none is missing.
fn exactly_once(blocks: &Blocks, places: &[&[usize]]) {
    let mut seen = HashSet::new();
    for place in places {
        for &b in *place {
            assert!(seen.insert(b), "block {b:#x} in two places");
        }
    }
    let all: HashSet<usize> = blocks.0.iter().copied().collect();
    assert_eq!(seen, all, "a block was lost or made up");
}

fn push(list: &AtomicList, block: *mut u8) {
    // SAFETY: each model hands every block to exactly one push.
    assert!(unsafe { list.push_unless(block, |_| false) });
}

/// (a) A push races another push: the second one can land between the
/// first one's load and its CAS, which must then fail and retry.
#[test]
fn loom_racing_pushes_lose_nothing() {
    loom::model(|| {
        let blocks = Arc::new(Blocks::new(3));
        let list = Arc::new(AtomicList::new());
        let t = {
            let (blocks, list) = (blocks.clone(), list.clone());
            thread::spawn(move || {
                push(&list, blocks.get(0));
                push(&list, blocks.get(1));
            })
        };
        push(&list, blocks.get(2));
        t.join().unwrap();
        let word = list.take();
        assert_eq!(word.len(), 3);
        exactly_once(&blocks, &[&walk(word)]);
    });
}

/// (a') The same for the deferred lists' unbounded push.
#[test]
fn loom_racing_saturating_pushes_lose_nothing() {
    loom::model(|| {
        let blocks = Arc::new(Blocks::new(2));
        let list = Arc::new(AtomicList::new());
        let t = {
            let (blocks, list) = (blocks.clone(), list.clone());
            // SAFETY: block 0 is this thread's.
            thread::spawn(move || unsafe { list.push_saturating(blocks.get(0)) })
        };
        // SAFETY: block 1 is ours.
        unsafe { list.push_saturating(blocks.get(1)) };
        t.join().unwrap();
        let word = list.take();
        assert_eq!(word.len(), 2);
        exactly_once(&blocks, &[&walk(word)]);
    });
}

/// (b) A splice (`take_if_at_least`) races pushes: each block ends up
/// exactly once, in the taken chain or on the list; both counts match
/// their chains, and a splice never takes fewer than the threshold.
///
/// Run twice: with the list below the threshold until a push lands, and
/// at the threshold from the start. The second is the one where a push
/// lands between the splice's load and its CAS. (loom's search tracks one
/// last access per atomic, so with the first alone it never tries a splice
/// that saw the push and then races the next one: a splice that stores 0
/// instead of its CAS passed that model.)
#[test]
fn loom_splice_racing_pushes_loses_nothing() {
    const THRESHOLD: u32 = 2;
    for before in 1..=2 {
        loom::model(move || {
            let blocks = Arc::new(Blocks::new(before + 2));
            let list = Arc::new(AtomicList::new());
            for i in 0..before {
                push(&list, blocks.get(i));
            }
            let pusher = {
                let (blocks, list) = (blocks.clone(), list.clone());
                thread::spawn(move || {
                    push(&list, blocks.get(before));
                    push(&list, blocks.get(before + 1));
                })
            };
            let taken = list.take_if_at_least(THRESHOLD);
            pusher.join().unwrap();
            if !taken.is_empty() {
                assert!(taken.len() >= THRESHOLD, "spliced {}", taken.len());
            }
            let spliced = walk(taken);
            let left = list.take();
            assert_eq!(taken.len() + left.len(), before as u32 + 2);
            exactly_once(&blocks, &[&spliced, &walk(left)]);
        });
    }
}

/// (b') Two splices race a push: at most one of them gets the blocks, and
/// nothing is handed out twice.
#[test]
fn loom_two_splices_never_share_a_block() {
    loom::model(|| {
        let blocks = Arc::new(Blocks::new(2));
        let list = Arc::new(AtomicList::new());
        push(&list, blocks.get(0));
        let splicer = {
            let list = list.clone();
            thread::spawn(move || list.take_if_at_least(1))
        };
        let pusher = {
            let (blocks, list) = (blocks.clone(), list.clone());
            thread::spawn(move || push(&list, blocks.get(1)))
        };
        let mine = list.take_if_at_least(1);
        let theirs = splicer.join().unwrap();
        pusher.join().unwrap();
        let left = list.take();
        exactly_once(&blocks, &[&walk(mine), &walk(theirs), &walk(left)]);
    });
}

/// (c) The cap check of a signal-list push (`push_unless`, as
/// `rules::free_to_signal_list` uses it) races a task-list push (check,
/// then store, as the fallback slot holder does) and another signal-list
/// push. The task list is modelled as a chain: its length is all the
/// check reads.
/// `nr + nr_sig` may pass the cap by one, never more: the documented drift.
#[test]
fn loom_cap_check_drifts_by_one_at_most() {
    const CAP: u32 = 3;
    loom::model(|| {
        let blocks = Arc::new(Blocks::new(5));
        // One block on each list: one more fits under the cap.
        let task = Arc::new(AtomicU64::new(0));
        let sig = Arc::new(AtomicList::new());
        // SAFETY: block 0 is ours, and the task list is empty.
        unsafe { write_link(blocks.get(0), ListWord::EMPTY) };
        task.store(ListWord::new(blocks.get(0), 1).bits(), Ordering::Relaxed);
        push(&sig, blocks.get(1));

        let signal_push = |i: usize| {
            let (blocks, task, sig) = (blocks.clone(), task.clone(), sig.clone());
            thread::spawn(move || {
                let full = |n_sig: u32| {
                    ListWord::from_bits(task.load(Ordering::Relaxed)).len() + n_sig >= CAP
                };
                // SAFETY: block `i` is this thread's.
                unsafe { sig.push_unless(blocks.get(i), full) }
            })
        };
        let s1 = signal_push(2);
        let s2 = signal_push(3);
        // The slot holder: only it writes the task list.
        let word = ListWord::from_bits(task.load(Ordering::Relaxed));
        let n = word.len();
        let pushed_task = n + sig.len() < CAP;
        if pushed_task {
            // SAFETY: block 4 is ours; we are the task list's only writer.
            unsafe { write_link(blocks.get(4), word) };
            task.store(
                ListWord::new(blocks.get(4), n + 1).bits(),
                Ordering::Relaxed,
            );
        }
        let pushed = [s1.join().unwrap(), s2.join().unwrap()];

        let on_task = walk(ListWord::from_bits(task.load(Ordering::Relaxed)));
        let on_sig = walk(sig.take());
        let total = (on_task.len() + on_sig.len()) as u32;
        assert!(total <= CAP + 1, "nr + nr_sig = {total}, cap {CAP}");
        assert_eq!(on_task.len(), 1 + pushed_task as usize);
        assert_eq!(on_sig.len(), 1 + pushed.iter().filter(|&&p| p).count());
        let refused: Vec<usize> = [2, 3]
            .iter()
            .zip(pushed)
            .filter(|&(_, p)| !p)
            .map(|(&i, _)| blocks.0[i])
            .chain((!pushed_task).then_some(blocks.0[4]))
            .collect();
        exactly_once(&blocks, &[&on_task, &on_sig, &refused]);
    });
}

/// (d) A chain pushed to a deferred list (a splice that could not install
/// its rest) races task context taking the list: each block comes back
/// exactly once.
#[test]
fn loom_push_chain_racing_take_loses_nothing() {
    loom::model(|| {
        let blocks = Arc::new(Blocks::new(4));
        let deferred = Arc::new(AtomicList::new());
        // SAFETY: block 0 is ours.
        unsafe { deferred.push_saturating(blocks.get(0)) };
        let pusher = {
            let (blocks, deferred) = (blocks.clone(), deferred.clone());
            thread::spawn(move || {
                // A chain of blocks 1-3, as a taken signal list would be.
                let mut chain = ListWord::EMPTY;
                for i in 1..4 {
                    // SAFETY: blocks 1-3 are this thread's.
                    unsafe { write_link(blocks.get(i), chain) };
                    chain = ListWord::new(blocks.get(i), chain.len() + 1);
                }
                // SAFETY: the chain is ours and is given up.
                unsafe { deferred.push_chain(chain) };
            })
        };
        let taken = deferred.take();
        pusher.join().unwrap();
        let left = deferred.take();
        assert_eq!(taken.len() + left.len(), 4);
        let (taken, left) = (walk_checking(taken, false), walk_checking(left, false));
        exactly_once(&blocks, &[&taken, &left]);
    });
}
