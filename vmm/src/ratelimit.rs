//! Rate-limited logging for anything the guest can trigger.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Lets at most `BURST` messages through per second, per call site.
#[derive(Debug)]
pub struct RateLimiter {
    second: AtomicU64,
    count: AtomicU64,
}

/// Messages allowed per second and call site.
pub const BURST: u64 = 10;

impl RateLimiter {
    /// A limiter with nothing let through yet.
    pub const fn new() -> Self {
        RateLimiter {
            second: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Whether one more message may be logged now.
    pub fn allow(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.count.store(0, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed) < BURST
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// `log!` with a per-call-site limit of [`BURST`] messages a second.
#[macro_export]
macro_rules! ratelimited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMITER: $crate::ratelimit::RateLimiter = $crate::ratelimit::RateLimiter::new();
        if LIMITER.allow() {
            log::log!($level, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_silence() {
        let l = RateLimiter::new();
        let allowed = (0..100).filter(|_| l.allow()).count() as u64;
        // One second boundary may fall inside the loop.
        assert!((BURST..=2 * BURST).contains(&allowed), "{allowed}");
    }
}
