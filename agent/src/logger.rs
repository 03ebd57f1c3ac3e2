//! A small `log` implementation that writes one line per record to standard error, which is
//! `/dev/console` for PID 1. The level comes from the kernel command line (`nutshell.log=`).

use std::io::Write;
use std::time::Instant;

use log::{LevelFilter, Log, Metadata, Record};

/// The kernel command line parameter that sets the level.
pub const LOG_PARAM: &str = "nutshell.log";

/// Writes records to standard error with the time since the logger started.
#[derive(Debug)]
pub struct ConsoleLogger {
    started: Instant,
}

static LOGGER: std::sync::OnceLock<ConsoleLogger> = std::sync::OnceLock::new();

/// Installs the console logger at `level`. A second call only changes the level.
pub fn init(level: LevelFilter) {
    let logger = LOGGER.get_or_init(|| ConsoleLogger {
        started: Instant::now(),
    });
    // Fails only if a logger is already set, which is then ours.
    let _ = log::set_logger(logger);
    log::set_max_level(level);
}

/// The level that `cmdline` asks for with `nutshell.log=<level>` (the last one wins), or `None`
/// when it does not say or names no level.
pub fn level_from_cmdline(cmdline: &str) -> Option<LevelFilter> {
    cmdline
        .split_whitespace()
        .rev()
        .find_map(|w| w.strip_prefix(LOG_PARAM)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

impl Log for ConsoleLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let t = self.started.elapsed();
        let line = format!(
            "[{:>5}.{:03}] nutshell-agent {:<5} {}: {}\n",
            t.as_secs(),
            t.subsec_millis(),
            record.level(),
            record.target(),
            record.args()
        );
        // One write per line so that lines of different threads do not interleave; a console
        // that cannot be written to leaves nothing better to do.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_comes_from_the_cmdline() {
        assert_eq!(
            level_from_cmdline("quiet nutshell.log=debug rdinit=/init"),
            Some(LevelFilter::Debug)
        );
        assert_eq!(
            level_from_cmdline("nutshell.log=warn nutshell.log=TRACE"),
            Some(LevelFilter::Trace)
        );
        assert_eq!(level_from_cmdline("quiet"), None);
        assert_eq!(level_from_cmdline("nutshell.log=loud"), None);
        assert_eq!(level_from_cmdline("xnutshell.log=debug"), None);
        assert_eq!(level_from_cmdline("nutshell.logx=debug"), None);
    }
}
