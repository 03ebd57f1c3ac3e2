//! Parsers of what the workloads print: sysbench, fio's JSON, the probe, `smaps_rollup`.

/// Errors of parsing a workload's output.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseError {
    /// A figure was not in the output.
    #[error("no {what} in the output: {excerpt}")]
    Missing {
        /// What was looked for.
        what: &'static str,
        /// The start of the output.
        excerpt: String,
    },
    /// fio's JSON did not parse.
    #[error("fio output is not JSON: {0}")]
    FioJson(String),
}

fn missing(what: &'static str, text: &str) -> ParseError {
    ParseError::Missing {
        what,
        excerpt: text.chars().take(300).collect(),
    }
}

/// `sysbench cpu`: events per second.
pub fn sysbench_cpu_events_per_s(text: &str) -> Result<f64, ParseError> {
    text.lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix("events per second:")?;
            rest.trim().parse::<f64>().ok()
        })
        .ok_or_else(|| missing("sysbench events per second", text))
}

/// `sysbench memory`: MiB/s from `N MiB transferred (X MiB/sec)`.
pub fn sysbench_memory_mib_per_s(text: &str) -> Result<f64, ParseError> {
    text.lines()
        .find_map(|l| {
            if !l.contains("transferred") {
                return None;
            }
            let inner = l.split_once('(')?.1;
            let value = inner.split_whitespace().next()?;
            value.parse::<f64>().ok()
        })
        .ok_or_else(|| missing("sysbench MiB/sec", text))
}

/// One fio job's result.
#[derive(Debug, Clone, PartialEq)]
pub struct FioJob {
    /// The job's name.
    pub name: String,
    /// Read bandwidth, MiB/s.
    pub read_mib_s: f64,
    /// Read operations per second.
    pub read_iops: f64,
    /// Write bandwidth, MiB/s.
    pub write_mib_s: f64,
    /// Write operations per second.
    pub write_iops: f64,
}

/// `fio --output-format=json`: every job (anything fio printed before the JSON is skipped).
pub fn fio_jobs(text: &str) -> Result<Vec<FioJob>, ParseError> {
    let start = text
        .find("\n{")
        .map(|i| i + 1)
        .or_else(|| text.starts_with('{').then_some(0))
        .ok_or_else(|| missing("fio JSON", text))?;
    let value: serde_json::Value =
        serde_json::from_str(&text[start..]).map_err(|e| ParseError::FioJson(e.to_string()))?;
    let jobs = value["jobs"]
        .as_array()
        .ok_or_else(|| missing("fio jobs", text))?;
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    Ok(jobs
        .iter()
        .map(|j| FioJob {
            name: j["jobname"].as_str().unwrap_or("").to_owned(),
            read_mib_s: num(&j["read"]["bw_bytes"]) / (1024.0 * 1024.0),
            read_iops: num(&j["read"]["iops"]),
            write_mib_s: num(&j["write"]["bw_bytes"]) / (1024.0 * 1024.0),
            write_iops: num(&j["write"]["iops"]),
        })
        .collect())
}

/// The probe prints `name value` lines; the value of `name`.
pub fn probe_value(text: &str, name: &'static str) -> Result<f64, ParseError> {
    text.lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next()? == name).then_some(())?;
            it.next()?.parse::<f64>().ok()
        })
        .ok_or_else(|| missing(name, text))
}

/// The marker that starts a section of a multi-part run's output: `@@ NAME` on its own line.
pub const SECTION_MARKER: &str = "@@ ";

/// The output of several commands in one container, each after a `@@ NAME` line: the text of
/// section `name` (what came after its marker, up to the next one).
pub fn section<'a>(text: &'a str, name: &str) -> Result<&'a str, ParseError> {
    let mut found: Option<usize> = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let end = offset + line.len();
        if let Some(marker) = line.trim_end().strip_prefix(SECTION_MARKER) {
            if let Some(start) = found {
                return Ok(&text[start..offset]);
            }
            if marker == name {
                found = Some(end);
            }
        }
        offset = end;
    }
    found
        .map(|start| &text[start..])
        .ok_or_else(|| ParseError::Missing {
            what: "output section",
            excerpt: format!(
                "(\"{SECTION_MARKER}{name}\") {}",
                text.chars().take(300).collect::<String>()
            ),
        })
}

/// `/proc/<pid>/smaps_rollup`: the proportional set size in KiB.
pub fn smaps_rollup_pss_kib(text: &str) -> Result<u64, ParseError> {
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix("Pss:")?;
            let mut it = rest.split_whitespace();
            let v = it.next()?.parse::<u64>().ok()?;
            (it.next()? == "kB").then_some(v)
        })
        .ok_or_else(|| missing("Pss", text))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sections_split_on_their_markers() {
        let out = "noise\n@@ fio rootfs\n{\"jobs\": []}\n@@ fio volume\n{\"jobs\": [1]}\n@@ files\ncreate_per_s 7.5\n";
        assert_eq!(
            super::section(out, "fio rootfs").unwrap(),
            "{\"jobs\": []}\n"
        );
        assert_eq!(
            super::section(out, "fio volume").unwrap(),
            "{\"jobs\": [1]}\n"
        );
        assert_eq!(super::section(out, "files").unwrap(), "create_per_s 7.5\n");
        // A section cut off by a failure is missing, not empty-and-fine.
        assert!(super::section("@@ fio rootfs\n{}\n", "fio volume").is_err());
        // Only whole marker lines count.
        assert!(super::section("x @@ files\n", "files").is_err());
    }

    use super::*;

    const SYSBENCH_CPU: &str = "sysbench 1.0.20 (using system LuaJIT 2.1.0-beta3)

Running the test with following options:
Number of threads: 1

CPU speed:
    events per second:  1419.59

General statistics:
    total time:                          2.0006s
    total number of events:              2841
";

    const SYSBENCH_MEM: &str = "Total operations: 102400 (79512.06 per second)

102400.00 MiB transferred (79512.06 MiB/sec)


General statistics:
";

    #[test]
    fn sysbench_outputs() {
        assert_eq!(sysbench_cpu_events_per_s(SYSBENCH_CPU).unwrap(), 1419.59);
        assert_eq!(sysbench_memory_mib_per_s(SYSBENCH_MEM).unwrap(), 79512.06);
        assert!(sysbench_cpu_events_per_s(SYSBENCH_MEM).is_err());
        assert!(sysbench_memory_mib_per_s("").is_err());
    }

    #[test]
    fn fio_json_after_warnings() {
        let text = r#"fio: some warning
{
  "fio version" : "fio-3.33",
  "jobs" : [
    { "jobname" : "seqwrite", "read" : { "bw_bytes" : 0, "iops" : 0.0 },
      "write" : { "bw_bytes" : 104857600, "iops" : 100.0 } },
    { "jobname" : "randread", "read" : { "bw_bytes" : 2097152, "iops" : 512.5 },
      "write" : { "bw_bytes" : 0, "iops" : 0.0 } }
  ]
}"#;
        let jobs = fio_jobs(text).unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].name, "seqwrite");
        assert_eq!(jobs[0].write_mib_s, 100.0);
        assert_eq!(jobs[1].read_iops, 512.5);
        assert_eq!(jobs[1].read_mib_s, 2.0);
        assert!(fio_jobs("no json").is_err());
        assert!(matches!(fio_jobs("{ broken"), Err(ParseError::FioJson(_))));
    }

    #[test]
    fn smaps_rollup_pss() {
        let text = "55d0c5a4d000-7ffd2a5f3000 ---p 00000000 00:00 0 [rollup]
Rss:                4400 kB
Pss:                1234 kB
Pss_Anon:            900 kB
";
        assert_eq!(smaps_rollup_pss_kib(text).unwrap(), 1234);
        assert!(smaps_rollup_pss_kib("Rss: 1 kB\n").is_err());
    }

    #[test]
    fn probe_lines() {
        let text = "faults_per_s 2500.5\ngetpid_per_s 1e6\n";
        assert_eq!(probe_value(text, "faults_per_s").unwrap(), 2500.5);
        assert_eq!(probe_value(text, "getpid_per_s").unwrap(), 1e6);
        assert!(probe_value(text, "files_per_s").is_err());
    }
}
