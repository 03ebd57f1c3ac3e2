//! `/proc/<pid>/stat`, as the shim, the benchmark harness and the tests read it.

/// The fields of a stat line after the command name (which may hold spaces and parentheses,
/// so it ends at the last `)`): the state first, then the parent PID…
fn fields_after_name(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat[stat.rfind(')')? + 1..].split_whitespace())
}

/// The parent PID of a stat line.
pub fn parse_ppid(stat: &str) -> Option<u32> {
    fields_after_name(stat)?.nth(1)?.parse().ok()
}

/// The process state letter of a stat line (`R`, `S`, `D`, `Z`…).
pub fn parse_state(stat: &str) -> Option<char> {
    fields_after_name(stat)?.next()?.chars().next()
}

/// Whether process `pid` exists and is neither a zombie nor dead.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| parse_state(&stat))
        .is_some_and(|state| !matches!(state, 'Z' | 'X'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_past_the_command_name() {
        assert_eq!(parse_ppid("42 (nutshell-vmm) S 7 42 7 0"), Some(7));
        assert_eq!(parse_ppid("42 (a) b) (c) S 9 42 7 0"), Some(9));
        assert_eq!(parse_ppid("7 (a b) c)) R 1 7 7"), Some(1));
        assert_eq!(parse_ppid("42 (x"), None);
        assert_eq!(parse_ppid("garbage"), None);
        assert_eq!(parse_state("42 (a) b) Z 1 2"), Some('Z'));
        assert_eq!(parse_state("7 (sh) S 1 7"), Some('S'));
        assert_eq!(parse_state("7 (sh)"), None);
    }

    #[test]
    fn this_process_is_alive() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX));
    }
}
