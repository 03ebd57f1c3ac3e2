//! Slow lane: the short fault soak (`nutshell_tests::soak`; the long one is `nutshell-soak
//! --cycles N`). One cycle per fault: SIGKILL to the shim and to the VMM after
//! RunPodSandbox, after StartContainer and during ExecSync, an ExecSync timeout followed by
//! the container's removal while its pod runs, and a containerd restart; then nothing may be
//! left.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use nutshell_tests::cri_rig::{rig, SERIAL};
use nutshell_tests::soak::{self, ROUND};

#[test]
#[ignore = "slow lane: needs root, containerd, KVM and the guest kernel (scripts/test.sh runs it)"]
fn every_fault_once_leaves_nothing_behind() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = rig("soak");
    let report = soak::run(&mut rig, ROUND.len(), |c| {
        eprintln!(
            "cycle {} ({}): {:.1} s, {} calls failed after the fault, failures {:?}, leaks {}",
            c.index,
            c.fault,
            c.duration.as_secs_f64(),
            c.tolerated.len(),
            c.failures,
            c.leaks.total()
        );
    });
    eprintln!("{report}");
    assert!(report.passed(), "{report}");
    rig.assert_nothing_left();
}
