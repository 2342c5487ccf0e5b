//! The knobs of the cache, settable in a `const` context so that a
//! `#[global_allocator]` static can carry them.

use crate::size_class::{last_class_within, CLASS_SIZES, MAX_CACHEABLE_SIZE, NUM_CLASSES};

/// Configuration of a [`PerCpuAlloc`](crate::PerCpuAlloc).
///
/// Each knob has a setter `with_NAME` and a getter `NAME`. Every setter is
/// a `const fn`, so a configured allocator can still be a static:
///
/// ```
/// use percpu_alloc::{Config, PerCpuAlloc};
///
/// static ALLOC: PerCpuAlloc = PerCpuAlloc::with_config(
///     Config::new().with_splice_threshold(32).with_cap(128).with_max_cached_size(512),
/// );
/// # let _ = &ALLOC;
/// ```
///
/// Values out of range are rejected when the constant is evaluated, so a bad
/// static fails to compile rather than misbehave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    splice_threshold: u32,
    cap: u32,
    max_cached_size: usize,
    cpu_byte_budget: usize,
    force_fallback: bool,
    read_env: bool,
}

impl Config {
    /// The kernel's `PCPU_CACHE_IRQ_THRESHOLD`.
    ///
    /// ```
    /// use percpu_alloc::Config;
    ///
    /// assert_eq!(Config::new().splice_threshold(), Config::DEFAULT_SPLICE_THRESHOLD);
    /// ```
    pub const DEFAULT_SPLICE_THRESHOLD: u32 = 16;
    /// The kernel's `max_nr`: blocks per class per CPU.
    ///
    /// ```
    /// use percpu_alloc::Config;
    ///
    /// assert_eq!(Config::new().cap(), Config::DEFAULT_CAP);
    /// // Small classes get the whole cap: 16-byte blocks (class 1).
    /// assert_eq!(Config::new().class_cap(1), Config::DEFAULT_CAP);
    /// ```
    pub const DEFAULT_CAP: u32 = 256;
    /// Requests up to this many bytes are cached by default.
    ///
    /// ```
    /// use percpu_alloc::Config;
    ///
    /// // 1024 is a class size, so nothing is rounded off.
    /// assert_eq!(Config::new().max_cached_size(), Config::DEFAULT_MAX_CACHED_SIZE);
    /// ```
    pub const DEFAULT_MAX_CACHED_SIZE: usize = 1024;
    /// What one CPU may cache at worst, over all classes (tcmalloc's
    /// per-CPU default).
    ///
    /// ```
    /// use percpu_alloc::Config;
    ///
    /// let config = Config::new();
    /// assert_eq!(config.cpu_byte_budget(), Config::DEFAULT_CPU_BYTE_BUDGET);
    /// assert!(config.cpu_bound_bytes() <= Config::DEFAULT_CPU_BYTE_BUDGET);
    /// ```
    pub const DEFAULT_CPU_BYTE_BUDGET: usize = 1536 * 1024;
    /// The largest cap a class can have. Every CPU's record of a class has
    /// a slot (8 bytes of address space, touched only when used) per block
    /// of its cap, and a spliced signal list, which can pass the cap by
    /// one, must fit the task word's 13-bit chain length.
    ///
    /// ```
    /// use percpu_alloc::Config;
    ///
    /// assert_eq!(Config::new().with_cap(Config::MAX_CAP).cap(), Config::MAX_CAP);
    /// assert!(std::panic::catch_unwind(|| Config::new().with_cap(Config::MAX_CAP + 1)).is_err());
    /// ```
    pub const MAX_CAP: u32 = 1000;

    /// The defaults: threshold 16, cap 256, sizes up to 1 KiB cached,
    /// 1.5 MiB per CPU at most, rseq where available.
    ///
    /// ```
    /// use percpu_alloc::Config;
    ///
    /// const DEFAULTS: Config = Config::new();
    /// assert_eq!(DEFAULTS, Config::default());
    /// assert_eq!(DEFAULTS.splice_threshold(), 16);
    /// assert_eq!(DEFAULTS.cap(), 256);
    /// assert!(!DEFAULTS.force_fallback());
    /// ```
    pub const fn new() -> Self {
        Config {
            splice_threshold: Self::DEFAULT_SPLICE_THRESHOLD,
            cap: Self::DEFAULT_CAP,
            max_cached_size: Self::DEFAULT_MAX_CACHED_SIZE,
            cpu_byte_budget: Self::DEFAULT_CPU_BYTE_BUDGET,
            force_fallback: false,
            read_env: true,
        }
    }

    /// Splice the signal list onto an empty task list once it holds at least
    /// `n` blocks.
    ///
    /// ```
    /// use percpu_alloc::Config;
    ///
    /// const EAGER: Config = Config::new().with_splice_threshold(4);
    /// assert_eq!(EAGER.splice_threshold(), 4);
    /// ```
    ///
    /// # Panics
    /// If `n` is 0 or above [`Config::MAX_CAP`].
    pub const fn with_splice_threshold(mut self, n: u32) -> Self {
        assert!(
            n >= 1 && n <= Self::MAX_CAP,
            "splice threshold out of range"
        );
        self.splice_threshold = n;
        self
    }

    /// Cache at most `n` blocks of a class on one CPU, task and signal list
    /// together. Large classes may get less, from the byte budget.
    ///
    /// ```
    /// use percpu_alloc::Config;
    ///
    /// assert_eq!(Config::new().with_cap(64).class_cap(1), 64);
    /// // A cap of 0 caches nothing: every request goes to jemalloc.
    /// assert_eq!(Config::new().with_cap(0).cpu_bound_bytes(), 0);
    /// ```
    ///
    /// # Panics
    /// If `n` is above [`Config::MAX_CAP`].
    pub const fn with_cap(mut self, n: u32) -> Self {
        assert!(n <= Self::MAX_CAP, "cap out of range");
        self.cap = n;
        self
    }

    /// Cache requests of up to `bytes` (rounded down to a class size, at most
    /// 14336, jemalloc's largest small class); larger ones go to jemalloc.
    ///
    /// ```
    /// use percpu_alloc::{Config, MAX_CACHEABLE_SIZE};
    ///
    /// assert_eq!(Config::new().with_max_cached_size(1000).max_cached_size(), 896);
    /// let all = Config::new().with_max_cached_size(1 << 20);
    /// assert_eq!(all.max_cached_size(), MAX_CACHEABLE_SIZE);
    /// ```
    pub const fn with_max_cached_size(mut self, bytes: usize) -> Self {
        self.max_cached_size = if bytes > MAX_CACHEABLE_SIZE {
            MAX_CACHEABLE_SIZE
        } else {
            bytes
        };
        self
    }

    /// Bound what one CPU caches at worst to `bytes`, by lowering the caps of
    /// large classes. The budget is shared evenly among the cached classes.
    ///
    /// ```
    /// use percpu_alloc::Config;
    ///
    /// let small = Config::new().with_cpu_byte_budget(64 * 1024);
    /// assert!(small.cpu_bound_bytes() <= 64 * 1024);
    /// assert!(small.cpu_bound_bytes() < Config::new().cpu_bound_bytes());
    /// ```
    pub const fn with_cpu_byte_budget(mut self, bytes: usize) -> Self {
        self.cpu_byte_budget = bytes;
        self
    }

    /// Use the try-lock fallback even where rseq is available.
    ///
    /// ```
    /// use percpu_alloc::Config;
    ///
    /// assert!(Config::new().with_force_fallback(true).force_fallback());
    /// assert!(!Config::new().force_fallback());
    /// ```
    pub const fn with_force_fallback(mut self, yes: bool) -> Self {
        self.force_fallback = yes;
        self
    }

    /// Let the environment override this configuration (the default), or
    /// not. The variables, read once per process when the first allocator
    /// makes its caches:
    ///
    /// | variable | overrides | values |
    /// |---|---|---|
    /// | `PERCPU_SPLICE_THRESHOLD` | [`with_splice_threshold`](Self::with_splice_threshold) | 1 to 1000 |
    /// | `PERCPU_CAP` | [`with_cap`](Self::with_cap) | 0 to 1000 |
    /// | `PERCPU_MAX_CACHED_SIZE` | [`with_max_cached_size`](Self::with_max_cached_size) | 0 to 14336 |
    /// | `PERCPU_CPU_BYTE_BUDGET` | [`with_cpu_byte_budget`](Self::with_cpu_byte_budget) | bytes, `k`/`m`/`g` suffixes |
    /// | `PERCPU_FORCE_FALLBACK` | [`with_force_fallback`](Self::with_force_fallback) | 1/0, true/false, yes/no, on/off |
    /// | `PERCPU_STATS` | prints [`Stats`](crate::Stats) to stderr at exit | as above |
    ///
    /// A bad value is reported on standard error and ignored. The
    /// configuration in force is
    /// [`PerCpuAlloc::active_config`](crate::PerCpuAlloc::active_config).
    ///
    /// ```
    /// use percpu_alloc::{Config, PerCpuAlloc};
    ///
    /// // This instance keeps its cap whatever PERCPU_CAP says.
    /// static PINNED: PerCpuAlloc = PerCpuAlloc::with_config(Config::new().with_cap(32).with_read_env(false));
    /// assert_eq!(PINNED.active_config().cap(), 32);
    /// ```
    pub const fn with_read_env(mut self, yes: bool) -> Self {
        self.read_env = yes;
        self
    }

    /// Whether the environment may override this configuration.
    ///
    /// ```
    /// use percpu_alloc::Config;
    ///
    /// assert!(Config::new().read_env());
    /// assert!(!Config::new().with_read_env(false).read_env());
    /// ```
    pub const fn read_env(&self) -> bool {
        self.read_env
    }

    /// The splice threshold.
    ///
    /// ```
    /// use percpu_alloc::Config;
    ///
    /// assert_eq!(Config::new().with_splice_threshold(32).splice_threshold(), 32);
    /// ```
    pub const fn splice_threshold(&self) -> u32 {
        self.splice_threshold
    }

    /// The cap before the byte budget lowers it for large classes.
    ///
    /// ```
    /// use percpu_alloc::Config;
    ///
    /// let config = Config::new().with_cap(512);
    /// assert_eq!(config.cap(), 512);
    /// // 1 KiB blocks (class 20) get less, from the byte budget.
    /// assert!(config.class_cap(20) < config.cap());
    /// ```
    pub const fn cap(&self) -> u32 {
        self.cap
    }

    /// The largest cached size, rounded down to a class size (0: none).
    ///
    /// ```
    /// use percpu_alloc::Config;
    ///
    /// assert_eq!(Config::new().with_max_cached_size(300).max_cached_size(), 256);
    /// assert_eq!(Config::new().with_max_cached_size(0).max_cached_size(), 0);
    /// ```
    pub const fn max_cached_size(&self) -> usize {
        match last_class_within(self.max_cached_size) {
            Some(class) => class.size(),
            None => 0,
        }
    }

    /// The per-CPU byte budget.
    ///
    /// ```
    /// use percpu_alloc::Config;
    ///
    /// assert_eq!(Config::new().with_cpu_byte_budget(1 << 20).cpu_byte_budget(), 1 << 20);
    /// ```
    pub const fn cpu_byte_budget(&self) -> usize {
        self.cpu_byte_budget
    }

    /// Whether the fallback is forced.
    ///
    /// ```
    /// use percpu_alloc::Config;
    ///
    /// let config = Config::new().with_force_fallback(true);
    /// assert!(config.force_fallback());
    /// assert!(!config.with_force_fallback(false).force_fallback());
    /// ```
    pub const fn force_fallback(&self) -> bool {
        self.force_fallback
    }

    /// How many classes are cached.
    ///
    /// ```
    /// use percpu_alloc::{Config, CLASS_SIZES};
    ///
    /// // Sizes 8 to 1024: the first 21 classes.
    /// let config = Config::new();
    /// assert_eq!(config.cached_classes(), 21);
    /// assert_eq!(CLASS_SIZES[config.cached_classes() - 1], config.max_cached_size());
    /// assert_eq!(Config::new().with_max_cached_size(4).cached_classes(), 0);
    /// ```
    pub const fn cached_classes(&self) -> usize {
        match last_class_within(self.max_cached_size) {
            Some(class) => class.index() + 1,
            None => 0,
        }
    }

    /// The cap of `class` on one CPU: the base cap, lowered so that the
    /// class's share of the byte budget holds; 0 for classes not cached (and
    /// for the 8-byte class with the `hardened` feature).
    ///
    /// ```
    /// use percpu_alloc::Config;
    ///
    /// let config = Config::new();
    /// assert_eq!(config.class_cap(1), 256); // 16-byte blocks
    /// assert!(config.class_cap(20) < 256); // 1 KiB blocks: budgeted
    /// assert_eq!(config.class_cap(21), 0); // 1280 bytes: not cached
    /// ```
    pub const fn class_cap(&self, class: usize) -> u32 {
        let classes = self.cached_classes();
        // The `hardened` feature serves 8-byte requests from the 16-byte
        // class (see `size_class`), so the 8-byte class caches nothing.
        if class >= classes || (cfg!(feature = "hardened") && class == 0) {
            return 0;
        }
        let share = self.cpu_byte_budget / classes;
        let by_budget = share / CLASS_SIZES[class];
        if by_budget < self.cap as usize {
            by_budget as u32
        } else {
            self.cap
        }
    }

    /// The most bytes one CPU can hold in its cache: the sum over classes of
    /// cap x class size. At most the byte budget.
    ///
    /// ```
    /// use percpu_alloc::{Config, CLASS_SIZES};
    ///
    /// let config = Config::new().with_cap(100);
    /// let sum: usize = CLASS_SIZES
    ///     .iter()
    ///     .enumerate()
    ///     .map(|(class, size)| config.class_cap(class) as usize * size)
    ///     .sum();
    /// assert_eq!(config.cpu_bound_bytes(), sum);
    /// assert!(sum <= config.cpu_byte_budget());
    /// ```
    pub const fn cpu_bound_bytes(&self) -> usize {
        let mut total = 0;
        let mut class = 0;
        while class < NUM_CLASSES {
            total += self.class_cap(class) as usize * CLASS_SIZES[class];
            class += 1;
        }
        total
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_bound_is_within_the_budget() {
        let config = Config::new();
        assert!(config.cpu_bound_bytes() <= Config::DEFAULT_CPU_BYTE_BUDGET);
        assert_eq!(config.class_cap(1), 256);
        assert_eq!(config.class_cap(12), 256); // 256-byte blocks
        assert!(config.class_cap(20) < 256); // 1 KiB blocks are budgeted
        assert_eq!(config.class_cap(21), 0); // 1280 bytes: not cached
        assert_eq!(config.max_cached_size(), 1024);
    }

    #[test]
    fn a_small_budget_lowers_every_cap() {
        let config = Config::new().with_cpu_byte_budget(64 * 1024);
        assert!(config.cpu_bound_bytes() <= 64 * 1024);
        assert!(config.class_cap(8) < 256 && config.class_cap(1) > config.class_cap(8));
    }

    #[test]
    fn max_cached_size_rounds_down_to_a_class() {
        assert_eq!(
            Config::new().with_max_cached_size(1000).max_cached_size(),
            896
        );
        assert_eq!(
            Config::new()
                .with_max_cached_size(1 << 20)
                .max_cached_size(),
            14336
        );
        assert_eq!(Config::new().with_max_cached_size(4).cached_classes(), 0);
    }
}
