//! Parsers of what the workloads print: sysbench, fio's and iperf3's JSON, the probe,
//! `smaps_rollup`.

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
    /// iperf3's JSON did not parse.
    #[error("iperf3 output is not JSON: {0}")]
    Iperf3Json(String),
    /// iperf3 reported that the test failed (its JSON's `error`).
    #[error("iperf3: {0}")]
    Iperf3Failed(String),
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

/// One iperf3 TCP test, as `iperf3 --client … --json` reports it at its end.
#[derive(Debug, Clone, PartialEq)]
pub struct Iperf3Tcp {
    /// What the receiving side counted, bits per second: the figure the benchmark reports
    /// (bytes the sender still had in flight at the end are not in it).
    pub received_bits_per_s: f64,
    /// What the sending side wrote, bits per second.
    pub sent_bits_per_s: f64,
    /// Whether the server sent (`--reverse`): then the client was the receiver.
    pub reverse: bool,
    /// Seconds the receiver measured over.
    pub seconds: f64,
}

/// `iperf3 --client … --json`: the test's totals (`end.sum_received`, `end.sum_sent`). A
/// failed test (iperf3 puts its reason in `error`, e.g. a refused connection) is an error.
pub fn iperf3_tcp(text: &str) -> Result<Iperf3Tcp, ParseError> {
    let start = text.find('{').ok_or_else(|| missing("iperf3 JSON", text))?;
    let value: serde_json::Value =
        serde_json::from_str(&text[start..]).map_err(|e| ParseError::Iperf3Json(e.to_string()))?;
    if let Some(e) = value["error"].as_str() {
        return Err(ParseError::Iperf3Failed(e.to_owned()));
    }
    let end = &value["end"];
    let received = end["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| missing("iperf3 end.sum_received.bits_per_second", text))?;
    let sent = end["sum_sent"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| missing("iperf3 end.sum_sent.bits_per_second", text))?;
    Ok(Iperf3Tcp {
        received_bits_per_s: received,
        sent_bits_per_s: sent,
        reverse: value["start"]["test_start"]["reverse"].as_i64() == Some(1),
        seconds: end["sum_received"]["seconds"].as_f64().unwrap_or(0.0),
    })
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

    /// Real output of Debian's iperf3 3.12 (`iperf3 -c 127.0.0.1 -t 1 --json`, then with
    /// `-R`, and against a closed port), captured on the development machine over loopback.
    const IPERF3_FORWARD: &str = include_str!("testdata/iperf3-host-to-server.json");
    const IPERF3_REVERSE: &str = include_str!("testdata/iperf3-reverse.json");
    const IPERF3_REFUSED: &str = include_str!("testdata/iperf3-refused.json");

    #[test]
    fn iperf3_json_totals_and_direction() {
        let fwd = iperf3_tcp(IPERF3_FORWARD).unwrap();
        assert!(!fwd.reverse);
        assert_eq!(fwd.received_bits_per_s, 12_357_029_778.528_477);
        assert_eq!(fwd.sent_bits_per_s, 12_500_605_978.198_566);
        assert!((0.9..1.2).contains(&fwd.seconds), "{fwd:?}");
        let rev = iperf3_tcp(IPERF3_REVERSE).unwrap();
        assert!(rev.reverse);
        assert_eq!(rev.received_bits_per_s, 6_607_242_884.781_38);
        // A warning line before the JSON is skipped, as with fio.
        let noisy = format!("iperf3: warning\n{IPERF3_REVERSE}");
        assert_eq!(iperf3_tcp(&noisy).unwrap(), rev);
    }

    #[test]
    fn iperf3_failures_are_errors() {
        assert_eq!(
            iperf3_tcp(IPERF3_REFUSED),
            Err(ParseError::Iperf3Failed(
                "unable to connect to server: Connection refused".into()
            ))
        );
        assert!(matches!(
            iperf3_tcp("{ \"start\": "),
            Err(ParseError::Iperf3Json(_))
        ));
        assert!(matches!(
            iperf3_tcp("no json"),
            Err(ParseError::Missing { .. })
        ));
        // Totals cut off (an interrupted client): missing, not zero.
        assert!(matches!(
            iperf3_tcp(r#"{"start": {}, "end": {}}"#),
            Err(ParseError::Missing { .. })
        ));
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
