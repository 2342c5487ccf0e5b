//! Which context a free happens in: ordinary thread code (task), a signal
//! handler (signal), or somewhere caching is unsafe or pointless (other).
//!
//! A process has no `in_hardirq()`, so signal handlers say so themselves:
//! with a [`SignalGuard`] held for the handler's body, or by being installed
//! through [`install_signal_handler`], which wraps the handler in one. The
//! mark is a per-thread depth counter in a `const`-initialised thread-local
//! with no destructor: reading or changing it is a plain memory access at a
//! fixed offset from the thread pointer, with no allocation, no lazy
//! initialisation and no registration, so it is async-signal-safe and still
//! works while the thread's other thread-locals are being destroyed. (In a
//! library `dlopen`ed after start-up, thread-locals may be allocated on
//! first touch by glibc; link this crate into the executable.)

use core::cell::Cell;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicUsize, Ordering};

/// The context of an allocator call, as the rules see it.
///
/// ```
/// use percpu_alloc::{current_context, Context};
///
/// // Where a free goes depends on the context it runs in.
/// let list = match current_context() {
///     Context::Task => "task list",
///     Context::Signal => "signal list",
///     Context::Other => "jemalloc",
/// };
/// assert_eq!(list, "task list");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Context {
    /// Ordinary thread code: frees go to the task list.
    Task,
    /// Inside a marked signal handler: frees go to the signal list and never
    /// call jemalloc.
    Signal,
    /// Where caching is unsafe or pointless: straight to jemalloc.
    Other,
}

thread_local! {
    // No destructor and a const initialiser: see the module comment.
    static SIGNAL_DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Marks held now, over every thread. A thread whose depth is above zero
/// has counted itself here first (and uncounts itself last), so zero means
/// no thread of the process is in signal context, this one included.
///
/// The hot free path reads this one word instead of the thread-local
/// depth: a thread-local in a library is reached with the general-dynamic
/// TLS model, a call to `__tls_get_addr` as the compiler sees it (which the
/// linker then relaxes into two instructions), and values live across
/// that call cost every free the saving of registers.
static SCOPES: AtomicUsize = AtomicUsize::new(0);

/// Whether some thread may be in signal context now: the cheap test the
/// hot free path makes before [`current_context`]. False only when the
/// calling thread is certainly in task context.
#[inline(always)]
pub(crate) fn any_signal_context() -> bool {
    SCOPES.load(Ordering::Relaxed) != 0
}

/// The context of the calling thread: [`Context::Signal`] inside a marked
/// signal handler, [`Context::Task`] otherwise.
///
/// ```
/// use percpu_alloc::{current_context, enter_signal_context, Context};
///
/// assert_eq!(current_context(), Context::Task);
/// let guard = enter_signal_context();
/// assert_eq!(current_context(), Context::Signal);
/// drop(guard);
/// assert_eq!(current_context(), Context::Task);
/// ```
#[inline]
pub fn current_context() -> Context {
    // `try_with` only fails for thread-locals with destructors; keep the
    // fallible form anyway so no path here can panic.
    match SIGNAL_DEPTH.try_with(Cell::get) {
        Ok(0) => Context::Task,
        Ok(_) => Context::Signal,
        Err(_) => Context::Other,
    }
}

/// Marks the calling thread as in signal context until dropped. Nests.
///
/// Hold one for the body of any signal handler that may free memory, so
/// that its frees follow the signal-list rule and never call into jemalloc
/// (which is not async-signal-safe). Not `Send`: the mark is per thread.
///
/// ```
/// use percpu_alloc::{current_context, enter_signal_context, Context};
///
/// let outer = enter_signal_context();
/// let inner = enter_signal_context();
/// drop(inner);
/// // Still inside the outer mark.
/// assert_eq!(current_context(), Context::Signal);
/// drop(outer);
/// assert_eq!(current_context(), Context::Task);
/// ```
#[must_use = "the signal context ends when the guard is dropped"]
pub struct SignalGuard {
    _not_send: PhantomData<*mut ()>,
}

/// Enters signal context; see [`SignalGuard`]. Async-signal-safe.
///
/// ```
/// extern "C" fn on_signal(_sig: libc::c_int) {
///     let _signal = percpu_alloc::enter_signal_context();
///     // Frees here go to the signal list (or are deferred), never to jemalloc.
/// }
/// # let _ = on_signal;
/// ```
#[inline]
pub fn enter_signal_context() -> SignalGuard {
    // Counted before the depth rises: see `SCOPES`. An atomic add is
    // async-signal-safe.
    SCOPES.fetch_add(1, Ordering::Relaxed);
    let _ = SIGNAL_DEPTH.try_with(|d| d.set(d.get().wrapping_add(1)));
    SignalGuard {
        _not_send: PhantomData,
    }
}

impl Drop for SignalGuard {
    #[inline]
    fn drop(&mut self) {
        leave_signal_context();
    }
}

/// Ends one mark of [`enter_signal_context`]: the guard's drop, and C's
/// `percpu_alloc_signal_leave`, whose caller pairs it with an enter.
#[inline]
pub(crate) fn leave_signal_context() {
    let _ = SIGNAL_DEPTH.try_with(|d| d.set(d.get().wrapping_sub(1)));
    SCOPES.fetch_sub(1, Ordering::Relaxed);
}

/// A signal handler run by [`install_signal_handler`], with the signal
/// number.
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use percpu_alloc::{install_signal_handler, SignalHandler};
///
/// static RAN: AtomicBool = AtomicBool::new(false);
///
/// fn on_usr2(_sig: libc::c_int) {
///     RAN.store(true, Ordering::Relaxed);
/// }
///
/// let handler: SignalHandler = on_usr2;
/// // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
/// unsafe { install_signal_handler(libc::SIGUSR2, handler) }.unwrap();
/// // SAFETY: raising a signal we handle; it runs before `raise` returns.
/// unsafe { libc::raise(libc::SIGUSR2) };
/// assert!(RAN.load(Ordering::Relaxed));
/// ```
pub type SignalHandler = fn(libc::c_int);

const NSIG: usize = 65;

/// The handler for each signal number, as an address (0: none).
static HANDLERS: [core::sync::atomic::AtomicUsize; NSIG] =
    [const { core::sync::atomic::AtomicUsize::new(0) }; NSIG];

extern "C" fn trampoline(sig: libc::c_int) {
    let _signal = enter_signal_context();
    let slot = match HANDLERS.get(sig as usize) {
        Some(slot) => slot,
        None => return,
    };
    let addr = slot.load(core::sync::atomic::Ordering::Acquire);
    if addr != 0 {
        // SAFETY: only `install_signal_handler` stores here, and it stores
        // a `SignalHandler`.
        let handler: SignalHandler = unsafe { core::mem::transmute::<usize, SignalHandler>(addr) };
        handler(sig);
    }
}

/// Installs `handler` for `signal` with `sigaction` (`SA_RESTART`),
/// wrapped so that it runs in signal context.
///
/// The handler runs on the interrupted thread's own stack, not on an
/// alternate one: the one Rust's std gives each thread is sized for its
/// stack-overflow message (`SIGSTKSZ`, of which the kernel's signal frame
/// takes several KiB on AVX-512 machines), and a debug build's free alone
/// needs more. Where a program wants its own alternate stack, it calls
/// `sigaction` with `SA_ONSTACK` itself and marks the scope with
/// [`enter_signal_context`](crate::enter_signal_context).
///
/// ```
/// fn on_usr1(_sig: libc::c_int) {
///     // Runs with the signal-context mark set.
///     assert_eq!(percpu_alloc::current_context(), percpu_alloc::Context::Signal);
/// }
///
/// // SAFETY: the handler only does async-signal-safe work.
/// unsafe { percpu_alloc::install_signal_handler(libc::SIGUSR1, on_usr1) }.unwrap();
/// // SAFETY: raising a signal we handle.
/// unsafe { libc::raise(libc::SIGUSR1) };
/// ```
///
/// # Errors
/// The `sigaction` error, or `EINVAL` for a signal number out of range.
///
/// # Safety
/// `handler` runs in signal context: it must only do what is
/// async-signal-safe. Freeing memory through [`PerCpuAlloc`](crate::PerCpuAlloc)
/// is; allocating is only when it hits the cache (a miss calls jemalloc,
/// as any `malloc` would: see [`PerCpuAlloc::alloc_cached`](crate::PerCpuAlloc::alloc_cached)).
pub unsafe fn install_signal_handler(
    signal: libc::c_int,
    handler: SignalHandler,
) -> std::io::Result<()> {
    if signal <= 0 || signal as usize >= NSIG {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    HANDLERS[signal as usize].store(handler as usize, core::sync::atomic::Ordering::Release);
    // SAFETY: a zeroed sigaction is valid; we fill in what we use, and the
    // trampoline has the plain `sa_handler` signature.
    let rc = unsafe {
        let mut action: libc::sigaction = core::mem::zeroed();
        action.sa_sigaction = trampoline as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(signal, &action, core::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
