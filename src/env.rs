//! Configuration from the environment, read once at start-up.
//!
//! | variable | sets | values |
//! |---|---|---|
//! | `PERCPU_SPLICE_THRESHOLD` | splice threshold | 1 to 1000 |
//! | `PERCPU_CAP` | cap per class per CPU | 0 to 1000 |
//! | `PERCPU_MAX_CACHED_SIZE` | largest cached size | 0 to 14336 bytes |
//! | `PERCPU_CPU_BYTE_BUDGET` | per-CPU byte budget | bytes |
//! | `PERCPU_FORCE_FALLBACK` | force the try-lock path | 1/0, true/false, yes/no, on/off |
//! | `PERCPU_STATS` | print stats at exit | as above |
//!
//! Byte values take a `k`, `m` or `g` suffix (powers of 1024).
//!
//! The first allocator table made reads them, inside the process's first
//! allocation: so no `std::env` (it allocates) and no formatting machinery
//! that allocates; `getenv` and parsing of the bytes in place. A bad value
//! is reported on standard error once and ignored, keeping the configured
//! value.

use core::fmt::Write;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crate::config::Config;
use crate::size_class::MAX_CACHEABLE_SIZE;
use crate::stderr::Stderr;

/// What the environment asks for; `None` where it says nothing (or
/// something invalid).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Overrides {
    pub(crate) threshold: Option<u32>,
    pub(crate) cap: Option<u32>,
    pub(crate) max_cached_size: Option<usize>,
    pub(crate) cpu_byte_budget: Option<usize>,
    pub(crate) force_fallback: Option<bool>,
    pub(crate) print_stats: bool,
}

impl Overrides {
    /// `config` with these overrides applied.
    pub(crate) fn apply(&self, mut config: Config) -> Config {
        if let Some(n) = self.threshold {
            config = config.with_splice_threshold(n);
        }
        if let Some(n) = self.cap {
            config = config.with_cap(n);
        }
        if let Some(n) = self.max_cached_size {
            config = config.with_max_cached_size(n);
        }
        if let Some(n) = self.cpu_byte_budget {
            config = config.with_cpu_byte_budget(n);
        }
        if let Some(yes) = self.force_fallback {
            config = config.with_force_fallback(yes);
        }
        config
    }
}

/// The parsed environment, shared by every allocator in the process.
/// `NONE` marks an absent value.
static STATE: AtomicU8 = AtomicU8::new(UNREAD);
static VALUES: [AtomicU64; 6] = [const { AtomicU64::new(NONE) }; 6];
const UNREAD: u8 = 0;
const READING: u8 = 1;
const READ: u8 = 2;
const NONE: u64 = u64::MAX;

/// The environment's overrides, read and reported on the first call.
///
/// A thread that comes while another is reading parses for itself,
/// silently, rather than wait inside an allocation.
pub(crate) fn overrides() -> Overrides {
    match STATE.compare_exchange(UNREAD, READING, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {
            let o = read(true);
            let values = [
                o.threshold.map(u64::from),
                o.cap.map(u64::from),
                o.max_cached_size.map(|n| n as u64),
                o.cpu_byte_budget.map(|n| n as u64),
                o.force_fallback.map(u64::from),
                Some(u64::from(o.print_stats)),
            ];
            for (slot, v) in VALUES.iter().zip(values) {
                slot.store(v.unwrap_or(NONE), Ordering::Relaxed);
            }
            STATE.store(READ, Ordering::Release);
            o
        }
        Err(READ) => {
            let get = |i: usize| match VALUES[i].load(Ordering::Relaxed) {
                NONE => None,
                v => Some(v),
            };
            Overrides {
                threshold: get(0).map(|v| v as u32),
                cap: get(1).map(|v| v as u32),
                max_cached_size: get(2).map(|v| v as usize),
                cpu_byte_budget: get(3).map(|v| v as usize),
                force_fallback: get(4).map(|v| v != 0),
                print_stats: get(5) == Some(1),
            }
        }
        Err(_) => read(false),
    }
}

/// Reads every variable; `report`: say on stderr what was ignored.
fn read(report: bool) -> Overrides {
    let max = Config::MAX_CAP as u64;
    Overrides {
        threshold: number("PERCPU_SPLICE_THRESHOLD\0", 1, max, report).map(|n| n as u32),
        cap: number("PERCPU_CAP\0", 0, max, report).map(|n| n as u32),
        max_cached_size: number(
            "PERCPU_MAX_CACHED_SIZE\0",
            0,
            MAX_CACHEABLE_SIZE as u64,
            report,
        )
        .map(|n| n as usize),
        cpu_byte_budget: number("PERCPU_CPU_BYTE_BUDGET\0", 0, isize::MAX as u64, report)
            .map(|n| n as usize),
        force_fallback: flag("PERCPU_FORCE_FALLBACK\0", report),
        print_stats: flag("PERCPU_STATS\0", report).unwrap_or(false),
    }
}

/// The value of `name` (NUL-terminated), if set.
fn get(name: &'static str) -> Option<&'static [u8]> {
    debug_assert!(name.ends_with('\0'));
    // SAFETY: `name` is NUL-terminated. `getenv` returns a pointer into the
    // environment, valid until someone changes it; the value is parsed at
    // once. Changing the environment while other threads run is the
    // caller's race (it is `unsafe` in Rust for that reason).
    unsafe {
        let value = libc::getenv(name.as_ptr().cast());
        (!value.is_null()).then(|| core::ffi::CStr::from_ptr(value).to_bytes())
    }
}

fn number(name: &'static str, min: u64, max: u64, report: bool) -> Option<u64> {
    let value = get(name)?;
    match parse_number(value) {
        Some(n) if (min..=max).contains(&n) => Some(n),
        _ => {
            if report {
                complain(
                    name,
                    value,
                    format_args!("expected a whole number from {min} to {max}"),
                );
            }
            None
        }
    }
}

fn flag(name: &'static str, report: bool) -> Option<bool> {
    let value = get(name)?;
    let parsed = parse_flag(value);
    if parsed.is_none() && report {
        complain(
            name,
            value,
            format_args!("expected 1/0, true/false, yes/no or on/off"),
        );
    }
    parsed
}

fn complain(name: &str, value: &[u8], expected: core::fmt::Arguments<'_>) {
    let name = name.trim_end_matches('\0');
    let mut err = Stderr::new();
    let _ = write!(err, "percpu-alloc: ignoring {name}=\"");
    // Print the value as it was, within reason, without trusting it to be
    // UTF-8.
    for &b in value.iter().take(64) {
        let c = if b.is_ascii_graphic() || b == b' ' {
            b as char
        } else {
            '?'
        };
        let _ = err.write_char(c);
    }
    let _ = writeln!(err, "\": {expected}; keeping the configured value");
}

/// A decimal number with an optional `k`, `m` or `g` suffix (x 1024^n).
pub(crate) fn parse_number(s: &[u8]) -> Option<u64> {
    let (digits, shift) = match s.last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    n.checked_mul(1 << shift)
}

/// `1`/`0`, `true`/`false`, `yes`/`no`, `on`/`off`, any case.
pub(crate) fn parse_flag(s: &[u8]) -> Option<bool> {
    const YES: [&[u8]; 4] = [b"1", b"true", b"yes", b"on"];
    const NO: [&[u8]; 4] = [b"0", b"false", b"no", b"off"];
    if YES.iter().any(|y| y.eq_ignore_ascii_case(s)) {
        Some(true)
    } else if NO.iter().any(|n| n.eq_ignore_ascii_case(s)) {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_parse_with_suffixes() {
        assert_eq!(parse_number(b"256"), Some(256));
        assert_eq!(parse_number(b"0"), Some(0));
        assert_eq!(parse_number(b"512k"), Some(512 << 10));
        assert_eq!(parse_number(b"2M"), Some(2 << 20));
        assert_eq!(parse_number(b"1g"), Some(1 << 30));
        for bad in [
            &b""[..],
            b"k",
            b"-1",
            b"12x",
            b"1.5M",
            b" 3",
            b"99999999999999999999",
        ] {
            assert_eq!(parse_number(bad), None, "{:?}", core::str::from_utf8(bad));
        }
    }

    #[test]
    fn flags_parse() {
        for yes in [&b"1"[..], b"true", b"YES", b"On"] {
            assert_eq!(parse_flag(yes), Some(true));
        }
        for no in [&b"0"[..], b"false", b"No", b"OFF"] {
            assert_eq!(parse_flag(no), Some(false));
        }
        assert_eq!(parse_flag(b"maybe"), None);
        assert_eq!(parse_flag(b""), None);
    }

    #[test]
    fn overrides_replace_the_const_config() {
        let o = Overrides {
            threshold: Some(8),
            cap: Some(64),
            max_cached_size: Some(512),
            cpu_byte_budget: Some(1 << 20),
            force_fallback: Some(true),
            print_stats: false,
        };
        let c = o.apply(Config::new());
        assert_eq!(c.splice_threshold(), 8);
        assert_eq!(c.cap(), 64);
        assert_eq!(c.max_cached_size(), 512);
        assert_eq!(c.cpu_byte_budget(), 1 << 20);
        assert!(c.force_fallback());
        assert_eq!(Overrides::default().apply(Config::new()), Config::new());
    }
}
