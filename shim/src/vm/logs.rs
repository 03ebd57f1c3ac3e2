//! The VMM's stderr and the guest console, followed into the shim's log: cut, masked and
//! rate-limited (the guest writes what it wants).

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nutshell_protocol::ratelimit::Window;

use super::ExitCell;

/// Longest line of VMM stderr or guest console logged; the rest is cut.
const MAX_LOG_LINE: usize = 512;

/// Guest console lines logged per second at most (the guest writes what it wants).
const CONSOLE_LINES_PER_SEC: u32 = 50;

/// Cuts a log line to [`MAX_LOG_LINE`] and masks control characters.
pub(super) fn clean_line(line: &str) -> String {
    nutshell_protocol::types::clean_line(line, MAX_LOG_LINE)
}

/// Follows the guest console file and logs its lines with the sandbox id, rate-limited.
pub(super) fn spawn_console_tail(id: String, path: PathBuf, exit: Arc<ExitCell>) {
    let _ = std::thread::Builder::new()
        .name(format!("console-{id}"))
        .spawn(move || {
            let mut pos = 0u64;
            let mut partial = Vec::new();
            let mut limit = Window::new(CONSOLE_LINES_PER_SEC, Duration::from_secs(1));
            loop {
                let done = exit.get().is_some();
                let mut buf = Vec::new();
                if let Ok(mut f) = std::fs::File::open(&path) {
                    if f.seek(SeekFrom::Start(pos)).is_ok() {
                        // At most 64 KiB per round: the guest cannot make us buffer more.
                        if let Ok(n) = f.take(64 << 10).read_to_end(&mut buf) {
                            pos += n as u64;
                        }
                    }
                }
                partial.extend_from_slice(&buf);
                while let Some(nl) = partial.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = partial.drain(..=nl).collect();
                    log_console_line(&id, &mut limit, &line);
                }
                // A line longer than the cap is logged cut, and counts against the limit.
                if partial.len() > MAX_LOG_LINE {
                    log_console_line(&id, &mut limit, &partial);
                    partial.clear();
                }
                if done && buf.is_empty() {
                    break;
                }
                if buf.is_empty() {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        });
}

/// Logs one guest console line if `limit` admits it, and the count of lines it dropped.
fn log_console_line(id: &str, limit: &mut Window, line: &[u8]) {
    let verdict = limit.check();
    if verdict.dropped_before > 0 {
        log::warn!(
            "guest[{id}]: {} console lines not logged (rate limit)",
            verdict.dropped_before
        );
    }
    if verdict.admit {
        log::info!(
            "guest[{id}]: {}",
            clean_line(&String::from_utf8_lossy(line))
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn log_lines_are_cut_and_masked() {
        assert_eq!(clean_line("a\x1b[2Jb\r\n"), "a?[2Jb");
        assert_eq!(clean_line(&"x".repeat(5000)).len(), MAX_LOG_LINE);
    }
}
