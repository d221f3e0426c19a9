//! A job's rate limit (QEMU's `speed`): a token bucket the VMM's loop
//! consults with its own clock, since the library has none.
//!
//! The bucket earns `speed` bytes per second, at most one
//! [`RateLimit::SLICE_NS`] slice ahead (idle time does not bank a burst);
//! a step is allowed while it holds any, and the progress a step made is
//! charged after it (so one step may overdraw, and the next waits until
//! the debt is paid). `speed` 0 is unlimited.
//!
//! ```
//! use blockgraph::jobs::RateLimit;
//!
//! let mut limit = RateLimit::new(1_000_000); // 1 MB/s
//! let ms = 1_000_000; // nanoseconds
//! assert!(limit.allows(ms)); // the first look grants a 100 ms slice
//! limit.charge(262_144); // what the step copied: 162 144 bytes owed
//! assert!(!limit.allows(2 * ms));
//! assert!(limit.allows(170 * ms)); // paid off after about 163 ms
//! ```

/// A token bucket of `speed` bytes per second (module docs).
///
/// The tokens are whole bytes in an `i128`: `speed` times any `u64`
/// nanoseconds fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    speed: u64,
    /// Bytes it may still copy (negative: owed).
    tokens: i128,
    /// When it was last filled (the caller's clock, nanoseconds), once it
    /// has been.
    filled: Option<u64>,
}

impl RateLimit {
    /// Most time the bucket earns ahead: 100 ms, as QEMU's rate limit
    /// slices.
    pub const SLICE_NS: u64 = 100_000_000;

    /// A limit of `speed` bytes per second (0: unlimited), empty.
    pub const fn new(speed: u64) -> Self {
        Self {
            speed,
            tokens: 0,
            filled: None,
        }
    }

    /// The limit, bytes per second (0: unlimited).
    pub const fn speed(&self) -> u64 {
        self.speed
    }

    /// Whether the job may step at `now_ns` (any monotonic clock in
    /// nanoseconds; the first call starts it).
    pub fn allows(&mut self, now_ns: u64) -> bool {
        if self.speed == 0 {
            return true;
        }
        let first = self.filled.is_none();
        let since = self
            .filled
            .map_or(0, |filled| now_ns.saturating_sub(filled));
        self.filled = Some(now_ns);
        let speed = i128::from(self.speed);
        let earned = speed * i128::from(since) / 1_000_000_000;
        let cap = speed * i128::from(Self::SLICE_NS) / 1_000_000_000;
        self.tokens = (self.tokens + earned).min(cap);
        // The first look grants one slice: a fresh job starts at once.
        if first {
            self.tokens = cap.max(1);
        }
        self.tokens > 0
    }

    /// Counts `bytes` of progress.
    pub fn charge(&mut self, bytes: u64) {
        if self.speed != 0 {
            self.tokens -= i128::from(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn the_bucket_holds_a_job_until_its_progress_is_paid_for() {
        let mut limit = RateLimit::new(1000);
        assert!(limit.allows(0));
        limit.charge(100 + 500);
        // 0.4 s later it has earned 400 of the 500 owed: still held.
        assert!(!limit.allows(400 * MS));
        assert!(limit.allows(600 * MS));
        // Idle time earns at most one slice ahead.
        assert!(limit.allows(60_000 * MS));
        limit.charge(101);
        assert!(!limit.allows(60_000 * MS));
        let mut unlimited = RateLimit::new(0);
        unlimited.charge(u64::MAX);
        assert!(unlimited.allows(0));
    }
}
