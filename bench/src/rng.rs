//! xorshift64: a fixed seed gives every allocator, and every run, the same
//! sizes and the same free order.

/// The generator; the seed must not be 0.
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value below `n`.
    #[inline]
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
