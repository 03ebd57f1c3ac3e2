//! Pure parsers of cgroup v2 files: strict, a malformed line is an error.

use std::collections::HashMap;

/// What is wrong with the content of a cgroup file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A line does not have the expected shape.
    #[error("line {line}: expected {expected}, found {found:?}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// The shape expected.
        expected: &'static str,
        /// The line (cut to 80 bytes).
        found: String,
    },
    /// A number does not parse.
    #[error("line {line}: {value:?} is not an unsigned 64-bit number")]
    Number {
        /// 1-based line number.
        line: usize,
        /// The value (cut to 80 bytes).
        value: String,
    },
    /// A key appears twice.
    #[error("line {line}: duplicate key {key:?}")]
    Duplicate {
        /// 1-based line number.
        line: usize,
        /// The key.
        key: String,
    },
}

pub(super) fn cut(s: &str) -> String {
    let mut end = s.len().min(80);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn parse_u64(value: &str, line: usize) -> Result<u64, ParseError> {
    // `u64::from_str` accepts a leading '+'; the kernel never writes one.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::Number {
            line,
            value: cut(value),
        });
    }
    value.parse().map_err(|_| ParseError::Number {
        line,
        value: cut(value),
    })
}

/// Parses a flat-keyed file (`cpu.stat`, `memory.stat`, `memory.events`, `cgroup.events`): one
/// `key value` pair per line, value an unsigned number, keys unique.
pub fn parse_flat_keyed(content: &str) -> Result<HashMap<String, u64>, ParseError> {
    let mut map = HashMap::new();
    for (i, raw) in content.lines().enumerate() {
        let line = i + 1;
        if raw.is_empty() {
            continue;
        }
        let mut fields = raw.split(' ');
        let (Some(key), Some(value), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(ParseError::Line {
                line,
                expected: "\"key value\"",
                found: cut(raw),
            });
        };
        if key.is_empty() {
            return Err(ParseError::Line {
                line,
                expected: "\"key value\"",
                found: cut(raw),
            });
        }
        let value = parse_u64(value, line)?;
        if map.insert(key.to_string(), value).is_some() {
            return Err(ParseError::Duplicate {
                line,
                key: cut(key),
            });
        }
    }
    Ok(map)
}

/// The lines of a nested-keyed file: device (`"8:0"`) and its `key=value` pairs.
pub type NestedKeyed = Vec<(String, HashMap<String, u64>)>;

/// Parses a nested-keyed file (`io.stat`): `MAJ:MIN key=value key=value …` per line. Returns
/// the devices and their pairs, in file order.
pub fn parse_nested_keyed(content: &str) -> Result<NestedKeyed, ParseError> {
    let mut devices = Vec::new();
    for (i, raw) in content.lines().enumerate() {
        let line = i + 1;
        if raw.is_empty() {
            continue;
        }
        let mut fields = raw.split(' ');
        let device = fields.next().unwrap_or_default();
        let valid_device = device
            .split_once(':')
            .is_some_and(|(maj, min)| parse_u64(maj, line).is_ok() && parse_u64(min, line).is_ok());
        if !valid_device {
            return Err(ParseError::Line {
                line,
                expected: "\"MAJ:MIN key=value …\"",
                found: cut(raw),
            });
        }
        let mut pairs = HashMap::new();
        for field in fields {
            let Some((key, value)) = field.split_once('=').filter(|(k, _)| !k.is_empty()) else {
                return Err(ParseError::Line {
                    line,
                    expected: "\"key=value\"",
                    found: cut(field),
                });
            };
            if pairs
                .insert(key.to_string(), parse_u64(value, line)?)
                .is_some()
            {
                return Err(ParseError::Duplicate {
                    line,
                    key: cut(key),
                });
            }
        }
        devices.push((device.to_string(), pairs));
    }
    Ok(devices)
}

/// Parses a single-value file that may say `max` (`memory.max`, `pids.max`): `None` is `max`.
pub fn parse_max(content: &str) -> Result<Option<u64>, ParseError> {
    let value = single_line(content)?;
    if value == "max" {
        return Ok(None);
    }
    parse_u64(value, 1).map(Some)
}

/// Parses a single-number file (`memory.current`, `memory.peak`, `pids.current`).
pub fn parse_single_u64(content: &str) -> Result<u64, ParseError> {
    parse_u64(single_line(content)?, 1)
}

fn single_line(content: &str) -> Result<&str, ParseError> {
    let value = content.strip_suffix('\n').unwrap_or(content);
    if value.contains('\n') || value.is_empty() {
        return Err(ParseError::Line {
            line: 1,
            expected: "a single value",
            found: cut(content),
        });
    }
    Ok(value)
}

/// Parses `cgroup.procs`: one PID per line.
pub fn parse_procs(content: &str) -> Result<Vec<u32>, ParseError> {
    content
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| {
            parse_u64(l, i + 1).and_then(|pid| {
                u32::try_from(pid).map_err(|_| ParseError::Number {
                    line: i + 1,
                    value: cut(l),
                })
            })
        })
        .collect()
}

/// Parses `cgroup.controllers` / `cgroup.subtree_control`: names separated by spaces.
pub fn parse_controllers(content: &str) -> Result<Vec<String>, ParseError> {
    let value = content.strip_suffix('\n').unwrap_or(content);
    if value.contains('\n') {
        return Err(ParseError::Line {
            line: 2,
            expected: "one line of controller names",
            found: cut(content),
        });
    }
    value
        .split(' ')
        .filter(|name| !name.is_empty())
        .map(|name| {
            if name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                Ok(name.to_string())
            } else {
                Err(ParseError::Line {
                    line: 1,
                    expected: "controller names",
                    found: cut(name),
                })
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::{io_stats_from, IoStats};
    use super::*;
    #[test]
    fn flat_keyed_parses_and_rejects() {
        let m = parse_flat_keyed("usage_usec 100\nuser_usec 60\nsystem_usec 40\n").unwrap();
        assert_eq!(m["usage_usec"], 100);
        assert_eq!(m["system_usec"], 40);
        assert!(parse_flat_keyed("").unwrap().is_empty());
        assert!(matches!(
            parse_flat_keyed("a 1\nb\n"),
            Err(ParseError::Line { line: 2, .. })
        ));
        assert!(matches!(
            parse_flat_keyed("a 1 2\n"),
            Err(ParseError::Line { line: 1, .. })
        ));
        assert!(matches!(
            parse_flat_keyed("a -1\n"),
            Err(ParseError::Number { line: 1, .. })
        ));
        assert!(matches!(
            parse_flat_keyed("a +1\n"),
            Err(ParseError::Number { .. })
        ));
        assert!(matches!(
            parse_flat_keyed("a 99999999999999999999\n"),
            Err(ParseError::Number { .. })
        ));
        assert!(matches!(
            parse_flat_keyed("a 1\na 2\n"),
            Err(ParseError::Duplicate { line: 2, .. })
        ));
        assert!(matches!(
            parse_flat_keyed(" 1\n"),
            Err(ParseError::Line { .. })
        ));
    }

    #[test]
    fn nested_keyed_parses_io_stat() {
        let content = "8:0 rbytes=1024 wbytes=2048 rios=1 wios=2 dbytes=0 dios=0\n\
                       253:1 rbytes=10 wbytes=20 rios=1 wios=1 dbytes=0 dios=0\n";
        let parsed = parse_nested_keyed(content).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1].0, "253:1");
        assert_eq!(
            io_stats_from(&parsed),
            IoStats {
                read_bytes: 1034,
                write_bytes: 2068
            }
        );
        assert!(parse_nested_keyed("sda rbytes=1\n").is_err());
        assert!(parse_nested_keyed("8:0 rbytes\n").is_err());
        assert!(parse_nested_keyed("8:0 rbytes=x\n").is_err());
        assert!(parse_nested_keyed("8:0 =1\n").is_err());
        assert!(parse_nested_keyed("8:x rbytes=1\n").is_err());
        assert!(parse_nested_keyed("8:0 rbytes=1 rbytes=2\n").is_err());
    }

    #[test]
    fn single_values() {
        assert_eq!(parse_max("max\n").unwrap(), None);
        assert_eq!(parse_max("4096\n").unwrap(), Some(4096));
        assert!(parse_max("").is_err());
        assert!(parse_max("1\n2\n").is_err());
        assert!(parse_max("maximum\n").is_err());
        assert_eq!(parse_single_u64("12\n").unwrap(), 12);
        assert!(parse_single_u64("max\n").is_err());
        assert!(parse_single_u64("-3\n").is_err());
    }

    #[test]
    fn procs_and_controllers() {
        assert_eq!(parse_procs("1\n22\n333\n").unwrap(), vec![1, 22, 333]);
        assert!(parse_procs("").unwrap().is_empty());
        assert!(parse_procs("1\nx\n").is_err());
        assert!(parse_procs("4294967296\n").is_err());
        assert_eq!(
            parse_controllers("cpuset cpu io memory pids\n").unwrap(),
            vec!["cpuset", "cpu", "io", "memory", "pids"]
        );
        assert!(parse_controllers("\n").unwrap().is_empty());
        assert!(parse_controllers("cpu\nmemory\n").is_err());
        assert!(parse_controllers("cpu +memory\n").is_err());
    }
}
