//! Pure parsers for what the guest kernel tells init, so they can be tested on the host.

/// The kernel command-line parameter that picks what init does after reporting.
pub const ACTION_PARAM: &str = "nutshell_test.action";

/// The kernel command-line parameter that asks for the `entry` line (`nutshell_test.entry=1`).
pub const ENTRY_PARAM: &str = "nutshell_test.entry";

/// What init does once it has printed its report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `sync`, then `reboot(RB_POWER_OFF)`; the default.
    PowerOff,
    /// `reboot(RB_AUTOBOOT)`.
    Reboot,
    /// Exit, which makes the kernel panic ("Attempted to kill init").
    Panic,
    /// Sleep forever.
    Hang,
    /// Echo one vsock connection on port 1024 until EOF, send a line to host port 1025, power off.
    VsockEcho,
    /// Mount the virtio-fs tag `nutshell` on `/mnt`, read `from-host.txt`, write
    /// `from-guest.txt`, time a few workloads, power off.
    VirtiofsCheck,
}

/// Errors of parsing kernel-provided text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error(
        "unknown {ACTION_PARAM} value {0:?} (expected poweroff, reboot, panic, hang, vsock-echo or virtiofs-check)"
    )]
    UnknownAction(String),
    #[error("invalid CPU list {0:?}")]
    CpuList(String),
    #[error("no MemTotal line in /proc/meminfo")]
    NoMemTotal,
    #[error("invalid MemTotal line {0:?}")]
    MemTotal(String),
    #[error("invalid /proc/uptime {0:?}")]
    Uptime(String),
}

/// Finds `nutshell_test.action=VALUE` in a kernel command line; the last one wins, as for
/// kernel parameters. Without one the action is [`Action::PowerOff`].
pub fn parse_action(cmdline: &str) -> Result<Action, ParseError> {
    let mut action = Action::PowerOff;
    for word in cmdline.split_ascii_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        if key != ACTION_PARAM {
            continue;
        }
        action = match value {
            "poweroff" => Action::PowerOff,
            "reboot" => Action::Reboot,
            "panic" => Action::Panic,
            "hang" => Action::Hang,
            "vsock-echo" => Action::VsockEcho,
            "virtiofs-check" => Action::VirtiofsCheck,
            other => return Err(ParseError::UnknownAction(other.to_owned())),
        };
    }
    Ok(action)
}

/// Whether the command line asks for the `entry` line: `nutshell_test.entry=1` (the last
/// one wins; any other value is no).
pub fn entry_wanted(cmdline: &str) -> bool {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.split_once('='))
        .rfind(|(key, _)| *key == ENTRY_PARAM)
        .is_some_and(|(_, value)| value == "1")
}

/// Counts the CPUs in a kernel CPU list such as `0-1`, `0` or `0-3,8,10-11` (the format of
/// `/sys/devices/system/cpu/online`).
pub fn parse_cpu_list(list: &str) -> Result<usize, ParseError> {
    let invalid = || ParseError::CpuList(list.to_owned());
    let list = list.trim();
    if list.is_empty() {
        return Err(invalid());
    }
    let mut count = 0usize;
    for range in list.split(',') {
        let (first, last) = match range.split_once('-') {
            Some((first, last)) => (first, last),
            None => (range, range),
        };
        let first: usize = first.parse().map_err(|_| invalid())?;
        let last: usize = last.parse().map_err(|_| invalid())?;
        if last < first {
            return Err(invalid());
        }
        count = count.checked_add(last - first + 1).ok_or_else(invalid)?;
    }
    Ok(count)
}

/// The `MemTotal` of `/proc/meminfo`, in KiB.
pub fn parse_mem_total_kib(meminfo: &str) -> Result<u64, ParseError> {
    let line = meminfo
        .lines()
        .find(|line| line.starts_with("MemTotal:"))
        .ok_or(ParseError::NoMemTotal)?;
    let mut words = line.split_ascii_whitespace().skip(1);
    match (words.next(), words.next(), words.next()) {
        (Some(value), Some("kB"), None) => value
            .parse()
            .map_err(|_| ParseError::MemTotal(line.to_owned())),
        _ => Err(ParseError::MemTotal(line.to_owned())),
    }
}

/// The seconds since boot, the first field of `/proc/uptime`, as the kernel wrote it.
pub fn parse_uptime(uptime: &str) -> Result<&str, ParseError> {
    let invalid = || ParseError::Uptime(uptime.to_owned());
    let secs = uptime.split_ascii_whitespace().next().ok_or_else(invalid)?;
    match secs.parse::<f64>() {
        Ok(value) if value.is_finite() && value >= 0.0 => Ok(secs),
        _ => Err(invalid()),
    }
}

/// Those of `wanted` that the first CPU's `flags` line in `/proc/cpuinfo` lists, in `wanted`'s
/// order.
pub fn cpu_features<'a>(cpuinfo: &str, wanted: &[&'a str]) -> Vec<&'a str> {
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == "flags").then_some(value)
        })
        .map(|v| v.split_whitespace().collect())
        .unwrap_or_default();
    wanted
        .iter()
        .copied()
        .filter(|w| flags.contains(w))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_defaults_to_power_off() {
        assert_eq!(parse_action(""), Ok(Action::PowerOff));
        assert_eq!(
            parse_action("console=ttyS0 reboot=k panic=1 nutshell_test.actionx=hang"),
            Ok(Action::PowerOff)
        );
    }

    #[test]
    fn action_is_read_from_cmdline() {
        for (cmdline, action) in [
            ("nutshell_test.action=reboot", Action::Reboot),
            ("quiet nutshell_test.action=vsock-echo", Action::VsockEcho),
            ("nutshell_test.action=virtiofs-check", Action::VirtiofsCheck),
            (
                "console=ttyS0 nutshell_test.action=panic quiet",
                Action::Panic,
            ),
            ("a=b\tnutshell_test.action=hang\n", Action::Hang),
            ("nutshell_test.action=poweroff", Action::PowerOff),
            // The last one wins, as for kernel parameters.
            (
                "nutshell_test.action=hang nutshell_test.action=reboot",
                Action::Reboot,
            ),
            // Only the exact parameter counts.
            ("xnutshell_test.action=panic", Action::PowerOff),
        ] {
            assert_eq!(parse_action(cmdline), Ok(action), "{cmdline:?}");
        }
    }

    #[test]
    fn unknown_action_is_an_error() {
        assert_eq!(
            parse_action("nutshell_test.action=explode"),
            Err(ParseError::UnknownAction("explode".to_owned()))
        );
        assert!(parse_action("nutshell_test.action=").is_err());
    }

    #[test]
    fn entry_line_only_when_asked() {
        assert!(!entry_wanted("console=ttyS0 nutshell_test.entryx=1"));
        assert!(entry_wanted("quiet nutshell_test.entry=1 console=ttyS0"));
        assert!(!entry_wanted("nutshell_test.entry=1 nutshell_test.entry=0"));
        assert!(!entry_wanted(""));
    }

    #[test]
    fn cpu_lists_are_counted() {
        for (list, count) in [("0\n", 1), ("0-1\n", 2), ("0-3,8,10-11", 7), ("  2-2 ", 1)] {
            assert_eq!(parse_cpu_list(list), Ok(count), "{list:?}");
        }
    }

    #[test]
    fn bad_cpu_lists_are_errors() {
        for list in ["", "\n", "a", "1-", "-1", "3-1", "0,,1", "0-1-2", "0,"] {
            assert!(parse_cpu_list(list).is_err(), "{list:?}");
        }
    }

    #[test]
    fn mem_total_is_found() {
        let meminfo = "MemTotal:         497412 kB\nMemFree:          470000 kB\n";
        assert_eq!(parse_mem_total_kib(meminfo), Ok(497_412));
        assert_eq!(
            parse_mem_total_kib("MemFree: 1 kB\n"),
            Err(ParseError::NoMemTotal)
        );
        assert!(parse_mem_total_kib("MemTotal: lots kB\n").is_err());
        assert!(parse_mem_total_kib("MemTotal: 12 MB\n").is_err());
    }

    #[test]
    fn uptime_is_first_field() {
        assert_eq!(parse_uptime("0.52 0.31\n"), Ok("0.52"));
        assert!(parse_uptime("").is_err());
        assert!(parse_uptime("soon 1.0").is_err());
        assert!(parse_uptime("-1.0 1.0").is_err());
    }

    #[test]
    fn cpu_features_from_the_first_flags_line() {
        let cpuinfo = "processor\t: 0\nflags\t\t: fpu tsc_deadline_timer avx hypervisor\n\
                       processor\t: 1\nflags\t\t: fpu smap\n";
        let wanted = ["tsc_deadline_timer", "smap", "hypervisor", "avx2"];
        assert_eq!(
            cpu_features(cpuinfo, &wanted),
            ["tsc_deadline_timer", "hypervisor"]
        );
        assert!(cpu_features("no flags here", &wanted).is_empty());
    }
}
