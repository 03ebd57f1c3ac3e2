//! A fixed-window limit for log lines that someone untrusted can cause (a guest's console, a
//! tenant's connections): at most so many lines per period, the rest counted and reported once
//! when the next period starts.

use std::time::{Duration, Instant};

/// Lets at most `limit` events through per `period` and counts the rest.
#[derive(Debug)]
pub struct Window {
    limit: u32,
    period: Duration,
    start: Instant,
    admitted: u32,
    dropped: u64,
}

/// What to do with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Log this event.
    pub admit: bool,
    /// Events dropped in the period that has just ended, to report once (0: none).
    pub dropped_before: u64,
}

impl Window {
    /// A window that starts now with nothing let through.
    pub fn new(limit: u32, period: Duration) -> Self {
        Window {
            limit,
            period,
            start: Instant::now(),
            admitted: 0,
            dropped: 0,
        }
    }

    /// The verdict for one event now.
    pub fn check(&mut self) -> Verdict {
        self.check_at(Instant::now())
    }

    /// The verdict for one event at `now` (a clock that went back counts as the same period).
    pub fn check_at(&mut self, now: Instant) -> Verdict {
        let mut dropped_before = 0;
        if now.saturating_duration_since(self.start) >= self.period {
            dropped_before = std::mem::take(&mut self.dropped);
            self.start = now;
            self.admitted = 0;
        }
        let admit = self.admitted < self.limit;
        if admit {
            self.admitted += 1;
        } else {
            self.dropped += 1;
        }
        Verdict {
            admit,
            dropped_before,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_cut_at_the_limit_and_the_rest_reported_once_in_the_next_period() {
        let mut w = Window::new(3, Duration::from_secs(1));
        let t0 = Instant::now();
        let admitted = (0..10).filter(|_| w.check_at(t0).admit).count();
        assert_eq!(admitted, 3);
        let next = w.check_at(t0 + Duration::from_secs(1));
        assert_eq!(
            next,
            Verdict {
                admit: true,
                dropped_before: 7
            }
        );
        // Reported once only.
        assert_eq!(w.check_at(t0 + Duration::from_secs(1)).dropped_before, 0);
    }

    #[test]
    fn a_clock_going_back_stays_in_the_period() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut w = Window::new(1, Duration::from_secs(1));
        assert!(w.check_at(t0).admit);
        assert!(!w.check_at(t0 - Duration::from_secs(5)).admit);
    }
}
