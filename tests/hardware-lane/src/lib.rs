//! The hardware-KVM lane's report.
//!
//! The lane's test program (`cases.sh`, run inside the L1 system under QEMU TCG and, for the
//! figures beside it, on the `kvm_pvm` host) prints one `HWLANE` line per event on its
//! console; kernel messages may be interleaved, so everything before `HWLANE` on a line is
//! ignored:
//!
//! ```text
//! HWLANE <lane> plan binding=<case,...> informative=<case,...>
//! HWLANE <lane> start <case> attempt=<n>
//! HWLANE <lane> case <case> pass|fail attempt=<n> [-- <why>]
//! HWLANE <lane> figure <name> <seconds>
//! HWLANE <lane> note <text>
//! HWLANE <lane> done
//! ```
//!
//! A lane passes when it printed its plan and every binding case's last attempt passed.
//! Informative cases are reported (with their attempts) and never fail the lane.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The marker every line of the lane's program starts with.
pub const MARKER: &str = "HWLANE ";

/// What one case came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its last attempt passed.
    Pass,
    /// Its last attempt failed, for this reason.
    Fail(String),
    /// It started but never reported (the VM or the L1 system hung, or the time limit hit).
    Unfinished,
    /// It never started.
    NotRun,
}

/// One case of a lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    /// Its name (`boot-1vcpu`, ...).
    pub name: String,
    /// Whether a failure fails the lane.
    pub binding: bool,
    /// How many attempts started.
    pub attempts: u32,
    /// The last attempt's outcome.
    pub outcome: Outcome,
    /// Why earlier attempts failed.
    pub earlier_failures: Vec<String>,
}

/// Everything one lane printed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Lane {
    /// Whether the plan line was seen.
    pub planned: bool,
    /// The cases, in plan order.
    pub cases: Vec<Case>,
    /// Figures in seconds, by name.
    pub figures: BTreeMap<String, f64>,
    /// Notes (kernel warnings and the like), in order.
    pub notes: Vec<String>,
    /// Whether the program reached its end.
    pub done: bool,
    /// `HWLANE` lines that did not parse.
    pub malformed: usize,
    /// The L1 kernel's own fatal lines (a panic, a BUG, an oops): the emulated host failed.
    pub kernel_faults: Vec<String>,
    /// L1 boots for the informative cases that never started the test program.
    pub unstarted_informative_boots: u32,
}

/// How the L1 kernel's fatal lines start (`l1-init.sh` keeps the kernel's messages on the console).
const KERNEL_FAULTS: &[&str] = &["Kernel panic - not syncing", "BUG: ", "Oops: "];

impl Lane {
    /// Parses the lines of lane `name` from a console.
    pub fn parse(console: &str, name: &str) -> Lane {
        let mut lane = Lane::default();
        for line in console.lines() {
            let Some(at) = line.find(MARKER) else {
                if KERNEL_FAULTS.iter().any(|m| line.contains(m)) {
                    lane.kernel_faults.push(line.trim().to_owned());
                }
                continue;
            };
            let mut words = line[at + MARKER.len()..].trim_end().splitn(3, ' ');
            if words.next() != Some(name) {
                continue;
            }
            let kind = words.next().unwrap_or_default();
            let rest = words.next().unwrap_or_default();
            if lane.apply(kind, rest).is_none() {
                lane.malformed += 1;
            }
        }
        lane
    }

    /// One lane of several runs of its program (L1 boots of their own): cases, figures and
    /// notes of each in order; planned only when every run was, done when the last run was.
    /// A case that an earlier run left unfinished (the L1 system died or hung under it) and a
    /// later run ran again takes the later outcome, the earlier one kept among its failures.
    pub fn merge(runs: Vec<Lane>) -> Lane {
        let mut lane = Lane {
            planned: !runs.is_empty(),
            ..Lane::default()
        };
        for run in runs {
            lane.planned &= run.planned;
            lane.done = run.done;
            lane.absorb(run, false);
        }
        lane
    }

    /// Adds a run of an L1 boot for the informative cases alone: nothing in it can fail the
    /// lane. Its cases, figures, notes and kernel faults are reported; a boot that never
    /// started the test program (the emulated host hung or died before it) is counted and
    /// named in the report, not taken as the binding runs' missing plan.
    pub fn add_informative_run(&mut self, run: Lane) {
        if !run.planned {
            self.unstarted_informative_boots += 1;
        }
        self.absorb(run, true);
    }

    /// Takes in a later run's cases (all made informative if asked), figures, notes and faults.
    fn absorb(&mut self, run: Lane, informative: bool) {
        for mut case in run.cases {
            case.binding &= !informative;
            self.add_run_of(case);
        }
        self.figures.extend(run.figures);
        self.notes.extend(run.notes);
        self.malformed += run.malformed;
        self.kernel_faults.extend(run.kernel_faults);
    }

    fn apply(&mut self, kind: &str, rest: &str) -> Option<()> {
        match kind {
            "plan" => {
                for word in rest.split_whitespace() {
                    let (key, list) = word.split_once('=')?;
                    let binding = match key {
                        "binding" => true,
                        "informative" => false,
                        _ => return None,
                    };
                    for name in list.split(',').filter(|n| !n.is_empty()) {
                        self.cases.push(Case {
                            name: name.to_owned(),
                            binding,
                            attempts: 0,
                            outcome: Outcome::NotRun,
                            earlier_failures: Vec::new(),
                        });
                    }
                }
                self.planned = true;
            }
            "start" => {
                let (name, attempt) = rest.split_once(' ')?;
                let attempt: u32 = attempt.strip_prefix("attempt=")?.parse().ok()?;
                let case = self.case_mut(name)?;
                if let Outcome::Fail(why) = &case.outcome {
                    case.earlier_failures.push(why.clone());
                }
                case.attempts = case.attempts.max(attempt);
                case.outcome = Outcome::Unfinished;
            }
            "case" => {
                let (head, why) = rest.split_once(" -- ").unwrap_or((rest, ""));
                let mut words = head.split_whitespace();
                let name = words.next()?;
                let verdict = words.next()?;
                let case = self.case_mut(name)?;
                case.outcome = match verdict {
                    "pass" => Outcome::Pass,
                    "fail" => Outcome::Fail(why.trim().to_owned()),
                    _ => return None,
                };
            }
            "figure" => {
                let (name, value) = rest.split_once(' ')?;
                let value: f64 = value.trim().parse().ok()?;
                if !value.is_finite() || value < 0.0 {
                    return None;
                }
                self.figures.insert(name.to_owned(), value);
            }
            "note" => self.notes.push(rest.to_owned()),
            "done" => self.done = true,
            _ => return None,
        }
        Some(())
    }

    /// Adds a later run's `case` (see [`Lane::merge`]).
    fn add_run_of(&mut self, case: Case) {
        let Some(old) = self.case_mut(&case.name) else {
            self.cases.push(case);
            return;
        };
        if case.outcome == Outcome::NotRun {
            return;
        }
        let mut earlier = std::mem::take(&mut old.earlier_failures);
        match &old.outcome {
            Outcome::Fail(why) => earlier.push(why.clone()),
            Outcome::Unfinished => {
                earlier.push("did not finish: the L1 system failed under it".to_owned())
            }
            Outcome::Pass | Outcome::NotRun => {}
        }
        earlier.extend(case.earlier_failures);
        *old = Case {
            attempts: old.attempts + case.attempts,
            earlier_failures: earlier,
            ..case
        };
    }

    fn case_mut(&mut self, name: &str) -> Option<&mut Case> {
        self.cases.iter_mut().find(|c| c.name == name)
    }

    /// Whether the lane passed: planned, and every binding case passed.
    pub fn passed(&self) -> bool {
        self.planned
            && self
                .cases
                .iter()
                .filter(|c| c.binding)
                .all(|c| c.outcome == Outcome::Pass)
    }
}

/// The closing lines of a run: the informative cases' results, then the binding cases counted
/// as `hwlane: N passed, N failed` (the plain form CI reads).
pub fn summary(lane: &Lane) -> String {
    let mut informative: Vec<String> = lane
        .cases
        .iter()
        .filter(|c| !c.binding)
        .map(|c| format!("{} {}", c.name, outcome_text(c)))
        .collect();
    if lane.unstarted_informative_boots > 0 {
        informative.push(UNSTARTED_INFORMATIVE.to_owned());
    }
    let binding = lane.cases.iter().filter(|c| c.binding);
    let passed = binding
        .clone()
        .filter(|c| c.outcome == Outcome::Pass)
        .count();
    // No plan: the test program never ran, which counts as one failure.
    let failed = binding.count() - passed + usize::from(!lane.planned);
    format!(
        "hwlane: informative (not counted): {}\nhwlane: {passed} passed, {failed} failed\n",
        if informative.is_empty() {
            "none".to_owned()
        } else {
            informative.join("; ")
        }
    )
}

/// What the report and the summary say of an informative L1 boot that never started its
/// test program.
const UNSTARTED_INFORMATIVE: &str = "an L1 boot for the informative cases never started \
     its test program (the emulated host hung or died first): they have no verdict";

/// The figures the report shows side by side, with what each one measures.
pub const FIGURES: &[(&str, &str)] = &[
    (
        "l1.boot",
        "L1 system: kernel start to its init (guest uptime)",
    ),
    (
        "boot-1vcpu.exit",
        "1 vCPU: VMM spawn to test init reported and powered off",
    ),
    (
        "boot-1vcpu.init-uptime",
        "1 vCPU: guest uptime when the test init runs",
    ),
    (
        "boot-2vcpu.exit",
        "2 vCPUs: VMM spawn to test init reported and powered off",
    ),
    (
        "boot-2vcpu.init-uptime",
        "2 vCPUs: guest uptime when the test init runs",
    ),
    ("agent-1vcpu.health", "1 vCPU: VMM spawn to agent Health"),
    ("agent-2vcpu.health", "2 vCPUs: VMM spawn to agent Health"),
    (
        "container.health",
        "container case: VMM spawn to agent Health (1 vCPU, shared directory)",
    ),
    (
        "container.run",
        "container case: `agent-ctl run` (create, start, output, exit, remove)",
    ),
    (
        "container.case",
        "container case, all of it (spawn, sandbox, run, Shutdown, VMM exit)",
    ),
    (
        "template.build",
        "template build (boot to agent ready, snapshot)",
    ),
    (
        "template.restore-health",
        "restore from the template to agent Health",
    ),
];

/// What the report is made of.
#[derive(Debug)]
pub struct ReportInput<'a> {
    /// The lane under QEMU TCG with emulated SVM (`host` profile).
    pub l1: &'a Lane,
    /// The same cases on this machine's `kvm_pvm` (`compat` profile), if run.
    pub pvm: Option<&'a Lane>,
    /// Wall time of the whole L1 run (QEMU start to exit), seconds.
    pub l1_wall: Option<f64>,
    /// Wall time of the `kvm_pvm` run, seconds.
    pub pvm_wall: Option<f64>,
    /// When and where, one line (date, machine).
    pub context: &'a str,
}

fn outcome_text(case: &Case) -> String {
    let tries = if case.attempts > 1 {
        format!(" (attempt {})", case.attempts)
    } else {
        String::new()
    };
    let earlier = if case.earlier_failures.is_empty() {
        String::new()
    } else {
        format!("; earlier: {}", case.earlier_failures.join("; "))
    };
    let verdict = match &case.outcome {
        Outcome::Pass => "pass".to_owned(),
        Outcome::Fail(why) => format!("**fail**: {why}"),
        Outcome::Unfinished => "**did not finish** (hung or time limit)".to_owned(),
        Outcome::NotRun => "not run".to_owned(),
    };
    format!("{verdict}{tries}{earlier}")
}

fn seconds(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_owned(), |s| format!("{s:.1} s"))
}

/// The Markdown report.
pub fn render(input: &ReportInput<'_>) -> String {
    let l1 = input.l1;
    let mut out = String::new();
    let verdict = if l1.passed() { "PASS" } else { "FAIL" };
    let _ = writeln!(out, "# Hardware-KVM lane: {verdict}\n");
    let _ = writeln!(out, "{}\n", input.context);
    let _ = writeln!(
        out,
        "The L1 system is Debian's 6.1 kernel with `kvm.ko` and `kvm-amd.ko` under \
         `qemu-system-x86_64 -accel tcg,thread=multi -cpu EPYC,+svm -m 3G`: its \
         `/dev/kvm` is SVM, so `nutshell-vmm --cpu-profile auto` must pick `host`. \
         The 1-vCPU cases are binding (a failure fails the lane and CI) and run in an L1 boot \
         with one CPU (`-smp 1`): with two, the emulator intermittently breaks the L1 kernel's \
         own state around VMRUN. An L1 system that dies or hangs under a case leaves it \
         without a verdict; one more boot runs the cases that have none (a case that reported \
         a failure is never run again). The 2-vCPU cases run in an L1 boot with two CPUs \
         (`-smp 2`) and are informative (retried once, reported, never failing the lane), \
         because 2 vCPUs hang intermittently under the emulator.\n"
    );
    if !l1.planned {
        let _ = writeln!(out, "**The L1 system never started its test program.**\n");
    }
    let _ = writeln!(out, "| case | kind | result |\n|---|---|---|");
    for case in &l1.cases {
        let kind = if case.binding {
            "binding"
        } else {
            "informative"
        };
        let _ = writeln!(out, "| {} | {kind} | {} |", case.name, outcome_text(case));
    }
    if !l1.done {
        let _ = writeln!(out, "\nThe L1 test program did not reach its end.");
    }
    if l1.unstarted_informative_boots > 0 {
        let _ = writeln!(out, "\nNot counted: {UNSTARTED_INFORMATIVE}.");
    }
    if !l1.kernel_faults.is_empty() {
        let _ = writeln!(
            out,
            "\n**The L1 kernel itself failed** (the emulated host, below Nutshell): `{}`",
            l1.kernel_faults
                .iter()
                .map(|f| f.replace('`', "'"))
                .collect::<Vec<_>>()
                .join("` / `")
        );
    }
    if l1.malformed > 0 {
        let _ = writeln!(out, "\n{} malformed HWLANE lines ignored.", l1.malformed);
    }

    let _ = writeln!(
        out,
        "\n## Figures (seconds; both columns are emulated, neither is a hardware figure)\n"
    );
    let _ = writeln!(
        out,
        "| what | L1 (QEMU TCG + SVM, `host` profile) | `kvm_pvm` (`compat` profile) |\n|---|---|---|"
    );
    let pvm_figure = |name: &str| input.pvm.and_then(|p| p.figures.get(name).copied());
    let _ = writeln!(
        out,
        "| the whole run (wall) | {} | {} |",
        seconds(input.l1_wall),
        seconds(input.pvm_wall)
    );
    for (name, what) in FIGURES {
        let (a, b) = (l1.figures.get(*name).copied(), pvm_figure(name));
        if a.is_some() || b.is_some() {
            let _ = writeln!(out, "| {what} | {} | {} |", seconds(a), seconds(b));
        }
    }
    for (name, value) in l1
        .figures
        .iter()
        .filter(|(n, _)| !FIGURES.iter().any(|(f, _)| f == *n))
    {
        let _ = writeln!(
            out,
            "| {name} | {} | {} |",
            seconds(Some(*value)),
            seconds(pvm_figure(name))
        );
    }
    if let Some(pvm) = input.pvm {
        let failed: Vec<String> = pvm
            .cases
            .iter()
            .filter(|c| c.outcome != Outcome::Pass)
            .map(|c| format!("{}: {}", c.name, outcome_text(c)))
            .collect();
        if !failed.is_empty() {
            let _ = writeln!(
                out,
                "\n`kvm_pvm` cases without a figure (informative): {}",
                failed.join("; ")
            );
        }
    }
    let notes = [("L1", Some(l1)), ("`kvm_pvm`", input.pvm)];
    for (lane, notes) in notes
        .iter()
        .filter_map(|(n, l)| Some((n, &l.as_ref()?.notes)))
    {
        if notes.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\n## Notes from {lane}\n");
        for note in notes {
            let _ = writeln!(out, "- `{}`", note.replace('`', "'"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the failure report
    use super::*;

    const CONSOLE: &str = "\
[    1.0] some kernel line
HWLANE l1 plan binding=boot-1vcpu,template informative=boot-2vcpu
HWLANE l1 figure l1.boot 9.52
HWLANE l1 start boot-1vcpu attempt=1
[    5.1] kvm: WRMSHWLANE l1 case boot-1vcpu pass attempt=1
HWLANE l1 figure boot-1vcpu.exit 6.25
HWLANE l1 start template attempt=1
HWLANE l1 case template pass attempt=1
HWLANE l1 start boot-2vcpu attempt=1
HWLANE l1 case boot-2vcpu fail attempt=1 -- exit=137 (time limit)
HWLANE l1 start boot-2vcpu attempt=2
HWLANE l1 note Unhandled WRMSR(0xc0010007)
HWLANE pvm figure boot-1vcpu.exit 11.0
HWLANE pvm note boot-1vcpu entry: syscall_eflags_id=cleared
HWLANE l1 figure bogus -1
HWLANE l1 done
";

    /// The report of `lane` alone (no `kvm_pvm` column, no wall times).
    fn report_of(lane: &Lane) -> String {
        render(&ReportInput {
            l1: lane,
            pvm: None,
            l1_wall: None,
            pvm_wall: None,
            context: "test",
        })
    }

    #[test]
    fn parses_cases_figures_attempts_and_interleaved_lines() {
        let lane = Lane::parse(CONSOLE, "l1");
        assert!(lane.planned && lane.done);
        assert_eq!(lane.cases.len(), 3);
        assert_eq!(lane.cases[0].outcome, Outcome::Pass);
        let two = &lane.cases[2];
        assert!(!two.binding);
        assert_eq!(two.attempts, 2);
        assert_eq!(two.outcome, Outcome::Unfinished);
        assert_eq!(two.earlier_failures, ["exit=137 (time limit)"]);
        assert_eq!(lane.figures["boot-1vcpu.exit"], 6.25);
        assert_eq!(
            lane.figures.len(),
            2,
            "the pvm lane's and the negative figure are not l1's"
        );
        assert_eq!(lane.malformed, 1);
        assert_eq!(lane.notes, ["Unhandled WRMSR(0xc0010007)"]);
        // An unfinished informative case does not fail the lane.
        assert!(lane.passed());
    }

    #[test]
    fn a_failed_or_missing_binding_case_fails_the_lane() {
        let failed = CONSOLE.replace(
            "case boot-1vcpu pass attempt=1",
            "case boot-1vcpu fail attempt=1 -- profile compat",
        );
        let lane = Lane::parse(&failed, "l1");
        assert!(!lane.passed());
        assert_eq!(
            lane.cases[0].outcome,
            Outcome::Fail("profile compat".into())
        );
        let unfinished: String = CONSOLE
            .lines()
            .filter(|l| !l.contains("case template"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(!Lane::parse(&unfinished, "l1").passed());
        assert!(
            !Lane::parse("no lane here\n", "l1").passed(),
            "no plan, no pass"
        );
    }

    #[test]
    fn report_has_the_verdict_cases_and_both_columns() {
        let l1 = Lane::parse(CONSOLE, "l1");
        let pvm = Lane::parse(CONSOLE, "pvm");
        let report = render(&ReportInput {
            l1: &l1,
            pvm: Some(&pvm),
            l1_wall: Some(80.0),
            pvm_wall: None,
            context: "test",
        });
        assert!(report.starts_with("# Hardware-KVM lane: PASS"), "{report}");
        assert!(
            report.contains("| boot-2vcpu | informative | **did not finish**"),
            "{report}"
        );
        assert!(
            report.contains("VMM spawn to test init reported and powered off | 6.2 s | 11.0 s |"),
            "{report}"
        );
        assert!(
            report.contains("| the whole run (wall) | 80.0 s | – |"),
            "{report}"
        );
        assert!(report.contains("WRMSR"), "{report}");
        assert!(
            report.contains(
                "## Notes from `kvm_pvm`\n\n- `boot-1vcpu entry: syscall_eflags_id=cleared`"
            ),
            "{report}"
        );
    }

    #[test]
    fn runs_merge_into_one_lane_where_a_case_cut_by_an_l1_failure_runs_again() {
        let first = "HWLANE l1 plan binding=boot-1vcpu informative=\n\
                     HWLANE l1 start boot-1vcpu attempt=1\n\
                     HWLANE l1 case boot-1vcpu pass attempt=1\n\
                     HWLANE l1 figure boot-1vcpu.exit 3.5\n\
                     HWLANE l1 done\n";
        let second = "HWLANE l1 plan binding= informative=boot-2vcpu\n\
                      HWLANE l1 start boot-2vcpu attempt=1\n\
                      [   62.4] BUG: TASK stack guard page was hit at 0000\n\
                      [   62.5] Kernel panic - not syncing: Fatal exception in interrupt\n";
        let lane = Lane::merge(vec![Lane::parse(first, "l1"), Lane::parse(second, "l1")]);
        assert!(lane.planned);
        assert!(!lane.done, "the second run never reached its end");
        let names: Vec<&str> = lane.cases.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["boot-1vcpu", "boot-2vcpu"]);
        assert!(
            lane.passed(),
            "the binding case passed; the informative one hung"
        );
        assert_eq!(lane.figures["boot-1vcpu.exit"], 3.5);
        assert_eq!(lane.kernel_faults.len(), 2);
        let report = report_of(&lane);
        assert!(
            report.contains("**The L1 kernel itself failed** (the emulated host, below Nutshell): `[   62.4] BUG: TASK"),
            "{report}"
        );
        // A binding case that the first boot left unfinished and the second passed.
        let hung = "HWLANE l1 plan binding=boot-1vcpu,template informative=\n\
                    HWLANE l1 start boot-1vcpu attempt=1\n\
                    HWLANE l1 case boot-1vcpu pass attempt=1\n\
                    HWLANE l1 start template attempt=1\n\
                    HWLANE l1 note the L1 system fell silent for 180 s and was stopped\n";
        let again = "HWLANE l1 plan binding=template informative=\n\
                     HWLANE l1 start template attempt=1\n";
        let resumed = Lane::merge(vec![
            Lane::parse(hung, "l1"),
            Lane::parse(
                &format!("{again}HWLANE l1 case template pass attempt=1\n"),
                "l1",
            ),
        ]);
        assert!(resumed.passed(), "{resumed:?}");
        let template = &resumed.cases[1];
        assert_eq!(template.attempts, 2);
        assert_eq!(
            template.earlier_failures,
            ["did not finish: the L1 system failed under it"]
        );
        assert_eq!(resumed.cases.len(), 2);
        let failed_again = Lane::merge(vec![
            Lane::parse(hung, "l1"),
            Lane::parse(
                &format!("{again}HWLANE l1 case template fail attempt=1 -- triple fault\n"),
                "l1",
            ),
        ]);
        assert!(!failed_again.passed());
        let never = Lane::merge(vec![Lane::parse(hung, "l1"), Lane::parse(again, "l1")]);
        assert!(!never.passed(), "unfinished twice is a failure");

        let unplanned = Lane::merge(vec![Lane::parse(first, "l1"), Lane::default()]);
        assert!(
            !unplanned.passed(),
            "a run that never started fails the lane"
        );
        assert!(!Lane::merge(Vec::new()).passed());
    }

    #[test]
    fn an_informative_boot_is_reported_and_never_fails_the_lane() {
        let binding = "HWLANE l1 plan binding=boot-1vcpu informative=\n\
                       HWLANE l1 start boot-1vcpu attempt=1\n\
                       HWLANE l1 case boot-1vcpu pass attempt=1\n\
                       HWLANE l1 done\n";
        // An L1 boot with two CPUs that hung before its test program (CI, 2026-12-07).
        let mut lane = Lane::merge(vec![Lane::parse(binding, "l1")]);
        lane.add_informative_run(Lane::parse(
            "[    0.0] Linux version 6.1\n\
             HWLANE l1 note the L1 system fell silent for 180 s and was stopped\n",
            "l1",
        ));
        assert!(lane.planned && lane.done, "{lane:?}");
        assert!(lane.passed());
        assert_eq!(lane.unstarted_informative_boots, 1);
        let said = summary(&lane);
        assert!(
            said.contains(
                "informative (not counted): an L1 boot for the informative cases never started"
            ) && said.ends_with("hwlane: 1 passed, 0 failed\n"),
            "{said}"
        );
        let report = report_of(&lane);
        assert!(report.starts_with("# Hardware-KVM lane: PASS"), "{report}");
        assert!(
            !report.contains("never started its test program.**"),
            "{report}"
        );
        assert!(report.contains("Not counted: an L1 boot"), "{report}");

        // One that ran: its failures are reported, even a case its plan called binding.
        let mut lane = Lane::merge(vec![Lane::parse(binding, "l1")]);
        lane.add_informative_run(Lane::parse(
            "HWLANE l1 plan binding=agent-2vcpu informative=boot-2vcpu\n\
             HWLANE l1 start boot-2vcpu attempt=1\n\
             HWLANE l1 case boot-2vcpu fail attempt=1 -- exit=137\n\
             HWLANE l1 start agent-2vcpu attempt=1\n\
             HWLANE l1 case agent-2vcpu fail attempt=1 -- no Health\n\
             HWLANE l1 figure boot-2vcpu.exit 4.5\n",
            "l1",
        ));
        assert!(lane.passed(), "{lane:?}");
        assert!(lane.done, "the binding run reached its end");
        assert_eq!(lane.unstarted_informative_boots, 0);
        assert_eq!(lane.figures["boot-2vcpu.exit"], 4.5);
        assert!(lane.cases.iter().skip(1).all(|c| !c.binding));
        assert!(summary(&lane).contains("boot-2vcpu **fail**: exit=137"));

        // The binding boots still decide: one that never started fails the lane.
        let mut lane = Lane::merge(vec![Lane::default()]);
        lane.add_informative_run(Lane::parse(binding, "l1"));
        assert!(!lane.passed());
    }

    #[test]
    fn summary_counts_binding_cases_only() {
        let lane = Lane::parse(CONSOLE, "l1");
        let summary = summary(&lane);
        assert!(
            summary.ends_with("hwlane: 2 passed, 0 failed\n"),
            "{summary}"
        );
        assert!(
            summary.contains("boot-2vcpu **did not finish**"),
            "{summary}"
        );
        assert!(super::summary(&Lane::default()).ends_with("hwlane: 0 passed, 1 failed\n"));
    }
}
