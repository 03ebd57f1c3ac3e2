//! [`ExitCell`]: one process's exit status, set once, for any number of waiters.
//!
//! The agent keeps one per container process (the reaper sets it, `wait` calls block on it);
//! the shim keeps one per VMM. The first value set wins: a later `set` (a second report of
//! the same exit) changes nothing, and every waiter sees the same value.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// A value set at most once (the first `set` wins) that waiters block on.
#[derive(Debug)]
pub struct ExitCell<T> {
    value: Mutex<Option<T>>,
    cond: Condvar,
}

impl<T> Default for ExitCell<T> {
    fn default() -> Self {
        ExitCell {
            value: Mutex::new(None),
            cond: Condvar::new(),
        }
    }
}

impl<T: Copy> ExitCell<T> {
    /// An empty cell.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `value` unless a value is already there, and wakes every waiter. Returns
    /// whether this call set it.
    pub fn set(&self, value: T) -> bool {
        let mut guard = self.lock();
        let first = guard.is_none();
        if first {
            *guard = Some(value);
        }
        self.cond.notify_all();
        first
    }

    /// The value, if set.
    pub fn get(&self) -> Option<T> {
        *self.lock()
    }

    /// Blocks until the value is set and returns it.
    pub fn wait(&self) -> T {
        let mut guard = self.lock();
        loop {
            if let Some(value) = *guard {
                return value;
            }
            guard = self
                .cond
                .wait(guard)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Blocks until the value is set or `timeout` has passed; `None` on timeout.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<T> {
        let deadline = Instant::now().checked_add(timeout);
        let mut guard = self.lock();
        loop {
            if let Some(value) = *guard {
                return Some(value);
            }
            let left = match deadline {
                Some(deadline) => deadline.checked_duration_since(Instant::now())?,
                // Beyond what an Instant holds: as good as forever.
                None => Duration::MAX,
            };
            guard = self
                .cond
                .wait_timeout(guard, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<T>> {
        self.value.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_value_wins() {
        let cell = ExitCell::new();
        assert_eq!(cell.get(), None);
        assert!(cell.set(3));
        assert!(!cell.set(4));
        assert_eq!(cell.get(), Some(3));
        assert_eq!(cell.wait(), 3);
        assert_eq!(cell.wait_timeout(Duration::ZERO), Some(3));
    }

    #[test]
    fn waiters_wake() {
        let cell = Arc::new(ExitCell::new());
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let cell = Arc::clone(&cell);
                std::thread::spawn(move || cell.wait())
            })
            .collect();
        let timed = {
            let cell = Arc::clone(&cell);
            std::thread::spawn(move || cell.wait_timeout(Duration::from_secs(30)))
        };
        std::thread::sleep(Duration::from_millis(20));
        cell.set(7);
        for w in waiters {
            assert_eq!(w.join().unwrap(), 7);
        }
        assert_eq!(timed.join().unwrap(), Some(7));
    }

    #[test]
    fn wait_timeout_expires() {
        let cell: ExitCell<i32> = ExitCell::new();
        assert_eq!(cell.wait_timeout(Duration::from_millis(10)), None);
    }
}
