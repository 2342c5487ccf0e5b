//! Text for people, written without allocating: from inside the allocator
//! (a message before an abort), while it is the global one (stats), and at
//! exit.

use core::fmt;

/// Text formatted into a fixed buffer; what does not fit is cut.
pub(crate) struct Buf<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> Buf<N> {
    pub(crate) const fn new() -> Self {
        Buf {
            bytes: [0; N],
            len: 0,
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only whole characters are copied in (see `push`).
        core::str::from_utf8(self.as_bytes()).unwrap_or("")
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    /// Copies as much of `s` as fits, cut at a character boundary so the
    /// buffer stays UTF-8; returns the bytes taken.
    fn push(&mut self, s: &str) -> usize {
        let mut take = s.len().min(N - self.len);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.bytes[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        take
    }
}

impl<const N: usize> fmt::Write for Buf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.push(s) == s.len() {
            Ok(())
        } else {
            Err(fmt::Error)
        }
    }
}

/// Standard error through `write(2)` and a stack buffer: no allocation,
/// no lock.
pub(crate) struct Stderr(Buf<512>);

impl Stderr {
    pub(crate) const fn new() -> Self {
        Stderr(Buf::new())
    }

    fn flush(&mut self) {
        let mut bytes = self.0.as_bytes();
        while !bytes.is_empty() {
            // SAFETY: writes from a live buffer of that length.
            let n = unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
            if n <= 0 {
                break;
            }
            bytes = &bytes[n as usize..];
        }
        self.0.clear();
    }
}

impl fmt::Write for Stderr {
    fn write_str(&mut self, mut s: &str) -> fmt::Result {
        loop {
            s = &s[self.0.push(s)..];
            if s.is_empty() {
                return Ok(());
            }
            self.flush();
        }
    }
}

impl Drop for Stderr {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn a_full_buffer_cuts_at_a_character() {
        let mut b = Buf::<5>::new();
        assert!(write!(b, "ab").is_ok());
        assert!(write!(b, "cdé").is_err());
        assert_eq!(b.as_str(), "abcd");
    }
}
