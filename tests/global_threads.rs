//! Many threads on few CPUs with the allocator installed globally: blocks
//! of every class (and large ones) filled with a pattern of their address
//! and owner, a share of them freed by other threads, every pattern checked
//! before its free, threads moved between CPUs mid-loop. Afterwards the
//! caches must be within their caps and a trim must empty them
//! (docs/design.md sections 1, 4 and 9).

mod common;

use std::alloc::{alloc, dealloc, Layout};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{
    assert_within_caps, cached, cores, expect_pattern, fill, first_cached, serial, Watchdog,
    XorShift,
};
use percpu_alloc::PerCpuAlloc;

#[global_allocator]
static ALLOC: PerCpuAlloc = PerCpuAlloc::new();

/// Both tests end by checking the whole process's caches.
static SERIAL: Mutex<()> = Mutex::new(());

const THREADS: usize = 8;
const ITERS: usize = 200_000;
/// Iterations between moves to another CPU.
const MOVE_EVERY: usize = 2_000;
/// Blocks a thread keeps live before it starts freeing.
const LIVE: usize = 400;

/// A block in flight: address, layout and the tag its pattern was made with.
struct Block {
    addr: usize,
    size: usize,
    align: usize,
    tag: u64,
}

impl Block {
    fn new(rng: &mut XorShift, tag: u64) -> Block {
        let size = match rng.below(100) {
            // Every small class, most often.
            0..=79 => rng.log_size(1024),
            // Small classes jemalloc serves that the cache does not.
            80..=96 => 1025 + rng.below(14336 - 1024),
            // Large.
            _ => 16 * 1024 + rng.below(112 * 1024),
        };
        let align = match rng.below(20) {
            0 => 64,
            1 => 4096,
            2..=5 => 16,
            _ => 8,
        };
        let layout = Layout::from_size_align(size, align).unwrap();
        // SAFETY: non-zero size.
        let p = unsafe { alloc(layout) };
        assert!(!p.is_null(), "alloc({size}, {align}) failed");
        assert_eq!(p as usize % align, 0);
        // SAFETY: `p` holds `size` bytes.
        unsafe { fill(p, size, tag) };
        Block {
            addr: p as usize,
            size,
            align,
            tag,
        }
    }

    /// Checks the pattern, then frees.
    fn free(self, who: &str) {
        let p = self.addr as *mut u8;
        // SAFETY: the block is live with this layout and owned by whoever
        // holds this `Block`; its pattern was written with `tag`.
        unsafe {
            expect_pattern(p, self.size, self.tag, who);
            dealloc(p, Layout::from_size_align(self.size, self.align).unwrap());
        }
    }
}

/// The tag of a block made by `thread` at iteration `iter`: a block handed
/// out twice ends up with two different tags, one of which fails.
fn tag(thread: usize, iter: usize) -> u64 {
    (thread as u64) << 48 | iter as u64
}

fn worker(
    id: usize,
    rx: mpsc::Receiver<Block>,
    peers: Vec<mpsc::Sender<Block>>,
    cores: Vec<core_affinity::CoreId>,
) -> (usize, usize) {
    let mut rng = XorShift::new(id as u64 + 1);
    let mut live: Vec<Block> = Vec::with_capacity(LIVE);
    let (mut sent, mut received) = (0, 0);
    let mut moves = id;
    for iter in 0..ITERS {
        if iter % MOVE_EVERY == 0 {
            // Moving while holding blocks: they are freed on another CPU
            // than the one they came from.
            moves += 1;
            let core = cores[moves % cores.len()];
            assert!(
                core_affinity::set_for_current(core),
                "move to CPU {}",
                core.id
            );
        }
        live.push(Block::new(&mut rng, tag(id, iter)));
        if live.len() >= LIVE {
            // Free a random share, some of it by other threads.
            for _ in 0..rng.below(LIVE / 2) {
                let victim = live.swap_remove(rng.below(live.len()));
                if rng.chance(35) {
                    peers[rng.below(peers.len())].send(victim).unwrap();
                    sent += 1;
                } else {
                    victim.free("own block");
                }
            }
        }
        if iter % 16 == 0 {
            while let Ok(b) = rx.try_recv() {
                b.free("block from another thread");
                received += 1;
            }
        }
    }
    for b in live {
        b.free("own block at the end");
    }
    // Others may still send until they are done; each holds a sender to
    // us, so the channel closes once all have finished.
    drop(peers);
    for b in rx {
        b.free("block from another thread, at the end");
        received += 1;
    }
    (sent, received)
}

#[test]
fn threads_churn_across_cpus_with_cross_thread_frees() {
    let _serial = serial(&SERIAL);
    let _watchdog = Watchdog::new("global_threads churn", Duration::from_secs(120));
    let cores = cores();
    let start = Instant::now();
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..THREADS).map(|_| mpsc::channel::<Block>()).unzip();
    let handles: Vec<_> = receivers
        .into_iter()
        .enumerate()
        .map(|(id, rx)| {
            let peers: Vec<_> = senders
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != id)
                .map(|(_, s)| s.clone())
                .collect();
            let cores = cores.clone();
            std::thread::Builder::new()
                .name(format!("churn-{id}"))
                .spawn(move || worker(id, rx, peers, cores))
                .unwrap()
        })
        .collect();
    drop(senders);
    let (mut sent, mut received) = (0, 0);
    for h in handles {
        let (s, r) = h.join().expect("a worker failed");
        sent += s;
        received += r;
    }
    assert_eq!(sent, received, "blocks lost between threads");
    assert!(sent > 0, "no cross-thread frees happened");
    eprintln!(
        "{THREADS} threads x {ITERS} iterations, {sent} cross-thread frees, {:?}, {:?} path",
        start.elapsed(),
        ALLOC.path()
    );

    // Everything is joined: nothing allocates now but this thread.
    assert_within_caps(&ALLOC);
    let (blocks, _) = cached(&ALLOC);
    assert!(blocks > 0, "the churn left nothing cached");
    let report = ALLOC.trim();
    assert_eq!(report.cpus_skipped, 0, "{report:?}");
    assert_eq!(report.blocks, blocks, "{report:?}");
    assert_eq!(first_cached(&ALLOC), None, "cached after trim");
}

#[test]
fn short_lived_threads_free_what_others_allocated() {
    // Threads that exit (thread-locals torn down) while their blocks live
    // on, and blocks freed by threads that did not allocate them.
    let _serial = serial(&SERIAL);
    let _watchdog = Watchdog::new("short-lived threads", Duration::from_secs(60));
    let mut rng = XorShift::new(42);
    let mut carried: Vec<Block> = Vec::new();
    for round in 0..60 {
        // Deal the blocks of the threads that just exited among new ones.
        let mut shares: Vec<Vec<Block>> = (0..4).map(|_| Vec::new()).collect();
        for (i, b) in carried.drain(..).enumerate() {
            shares[i % 4].push(b);
        }
        let seed = rng.next_u64();
        let handles: Vec<_> = shares
            .into_iter()
            .enumerate()
            .map(|(t, mine)| {
                std::thread::spawn(move || {
                    let mut rng = XorShift::new(seed ^ t as u64);
                    for b in mine {
                        b.free("block inherited from an exited thread");
                    }
                    let mut made: Vec<Block> = (0..300)
                        .map(|i| Block::new(&mut rng, tag(round * 4 + t, i)))
                        .collect();
                    // Free half here, hand the rest on past this thread's end.
                    let keep = made.split_off(150);
                    for b in made {
                        b.free("own block");
                    }
                    keep
                })
            })
            .collect();
        for h in handles {
            carried.extend(h.join().expect("a short-lived thread failed"));
        }
    }
    for b in carried {
        b.free("block left at the end");
    }
    assert_within_caps(&ALLOC);
    let report = ALLOC.trim();
    assert_eq!(report.cpus_skipped, 0, "{report:?}");
    assert_eq!(first_cached(&ALLOC), None, "cached after trim");
}

/// Sets its flag when dropped, however the scope it lives in ends.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn trim_while_threads_churn_loses_nothing() {
    // A trim reaches every CPU's task lists while their owners keep
    // pushing, popping and splicing (on the rseq path: the drain bit and
    // the membarrier fence); the churning threads also trim their own
    // CPUs now and then. A block taken by both a trim and an allocation
    // would be freed to jemalloc while in use and handed out again: two
    // owners, two patterns, one check fails.
    //
    // On the fallback path a trim waits a bounded time for a CPU's slot; a
    // holder preempted for longer (on a loaded host) makes it skip that
    // CPU, and say so. That is allowed while the threads churn; the quiet
    // trim at the end must reach every CPU. On the rseq path nothing makes
    // a trim skip a CPU here.
    let _serial = serial(&SERIAL);
    let _watchdog = Watchdog::new("trim under churn", Duration::from_secs(60));
    let strict = ALLOC.path() == percpu_alloc::Path::Rseq;
    let skipped = std::sync::atomic::AtomicUsize::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (trims, released) = std::thread::scope(|s| {
        for t in 0..4usize {
            let (stop, skipped) = (&stop, &skipped);
            s.spawn(move || {
                let mut rng = XorShift::new(0x7121 ^ t as u64);
                let mut live: Vec<Block> = Vec::new();
                let mut iter = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || iter < 50_000 {
                    // Small blocks only, so the caches stay busy.
                    let tag = tag(100 + t, iter);
                    let size = 8 + rng.below(256);
                    let layout = Layout::from_size_align(size, 8).unwrap();
                    // SAFETY: non-zero size; filled before anyone sees it.
                    let p = unsafe { alloc(layout) };
                    assert!(!p.is_null());
                    // SAFETY: `p` holds `size` bytes.
                    unsafe { fill(p, size, tag) };
                    live.push(Block {
                        addr: p as usize,
                        size,
                        align: 8,
                        tag,
                    });
                    if live.len() > 300 || rng.chance(40) {
                        let at = rng.below(live.len());
                        let b = live.swap_remove(at);
                        if rng.chance(30) {
                            // Signal-context frees fill the signal lists,
                            // so allocs splice while trims take lists too.
                            let _signal = percpu_alloc::enter_signal_context();
                            b.free("block freed in signal context while trims run");
                        } else {
                            b.free("block freed while trims run");
                        }
                    }
                    iter += 1;
                    if iter % 2048 == 0 {
                        // The cheap trim, of this thread's CPU, while other
                        // threads on the same CPU keep using its lists.
                        let report = ALLOC.trim_current_cpu();
                        assert!(
                            !strict || report.cpus_skipped == 0,
                            "trim_current_cpu skipped"
                        );
                        skipped
                            .fetch_add(report.cpus_skipped, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                for b in live {
                    b.free("block left at the end");
                }
            });
        }
        // A failed assertion below must still stop the churning threads,
        // or the scope would wait for them forever and the watchdog would
        // report a hang instead of the failure.
        let _stop = StopOnDrop(&stop);
        let mut trims = 0usize;
        let mut released = 0usize;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            let report = ALLOC.trim();
            assert!(!strict || report.cpus_skipped == 0, "a trim skipped a CPU");
            skipped.fetch_add(report.cpus_skipped, std::sync::atomic::Ordering::Relaxed);
            trims += 1;
            released += report.blocks;
            std::thread::sleep(Duration::from_millis(1));
        }
        (trims, released)
    });
    let skipped = skipped.into_inner();
    if skipped > 0 {
        eprintln!("{skipped} CPUs skipped by trims under churn (fallback path, slot held)");
    }
    assert!(trims > 100, "only {trims} trims ran");
    assert!(released > 0, "no trim found anything to release");
    assert_within_caps(&ALLOC);
    let report = ALLOC.trim();
    assert_eq!(report.cpus_skipped, 0);
    assert_eq!(
        cached(&ALLOC),
        (0, 0),
        "the caches are not empty after a quiet trim"
    );
}
