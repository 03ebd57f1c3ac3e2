//! What the child's set-up steps share: their result type, their timing record and small file
//! tests. `spawn` drives the steps; `rootfs`, `process` and `tty` carry them out and depend only
//! on this module (and [`super::ContainerError`]), never on each other or on `spawn`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// How a child step failed: a message for the agent (the child has no other way to report).
pub type StepResult<T = ()> = Result<T, String>;

/// The child's set-up steps and their durations, as text for the "ready" frame (the child
/// cannot log: it has no console once in the container's root). Only at debug level: each
/// clock read is a system call in a guest without a vDSO clock.
#[derive(Debug)]
pub struct Steps {
    last: Option<std::time::Instant>,
    text: String,
}

impl Steps {
    /// Starts the record; it times nothing unless debug logging is on.
    pub(super) fn new() -> Self {
        Steps {
            last: log::log_enabled!(log::Level::Debug).then(std::time::Instant::now),
            text: String::new(),
        }
    }

    /// Whether steps are timed (debug logging on): a step's name worth building only then.
    pub fn timing(&self) -> bool {
        self.last.is_some()
    }

    /// Ends step `name`.
    pub fn mark(&mut self, name: &str) {
        use std::fmt::Write as _;
        let Some(last) = self.last else { return };
        let now = std::time::Instant::now();
        let sep = if self.text.is_empty() { "" } else { ", " };
        let _ = write!(
            self.text,
            "{sep}{name} {:.2} s",
            now.duration_since(last).as_secs_f64()
        );
        self.last = Some(now);
    }

    /// The steps marked so far, as `name 0.01 s, name 0.02 s`; empty when nothing was timed.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Whether `path` is an executable regular file.
pub fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
