//! Slow lane: the real guest kernel boots the agent initramfs (`nutshell-agent` as `/init`);
//! the host-side client calls it over hybrid vsock, then shuts the guest down.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::{Duration, Instant};

use nutshell_protocol::client::{AgentClient, ConnectOptions};
use nutshell_protocol::types::ServingStatus;
use nutshell_tests::GuestBoot;

#[test]
#[ignore = "slow lane: boots the real guest kernel (scripts/test.sh runs it)"]
fn agent_answers_health_and_version_then_powers_off() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let spawned = Instant::now();
    let vm = GuestBoot::new("initramfs.cpio")
        .cmdline("quiet nutshell.log=debug")
        .vsock(&uds)
        .spawn()
        .unwrap();

    let opts = ConnectOptions {
        retry_interval: Duration::from_millis(20),
        ..Default::default()
    };
    let client = match AgentClient::connect(&uds, &opts) {
        Ok(c) => c,
        Err(e) => panic!("{e:?}\nconsole:\n{}", vm.console()),
    };
    assert_eq!(client.check().unwrap(), ServingStatus::Serving);
    let to_health = spawned.elapsed();

    let version = client.version().unwrap();
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(version.api_version, nutshell_protocol::AGENT_API_VERSION);
    assert!(
        version.kernel_release.starts_with("6.1"),
        "{}",
        version.kernel_release
    );

    // Round trips of Health.Check: the RPC latency over hybrid vsock.
    let mut rtts: Vec<Duration> = (0..50)
        .map(|_| {
            let t = Instant::now();
            client.check().unwrap();
            t.elapsed()
        })
        .collect();
    rtts.sort();
    eprintln!(
        "agent: VMM spawn -> Health answered {:.2} s; Check round trip median {:.1} ms (min {:.1}, max {:.1}); kernel {}",
        to_health.as_secs_f64(),
        rtts[rtts.len() / 2].as_secs_f64() * 1e3,
        rtts[0].as_secs_f64() * 1e3,
        rtts[rtts.len() - 1].as_secs_f64() * 1e3,
        version.kernel_release
    );

    if let Some(line) = vm
        .console()
        .lines()
        .find(|l| l.contains("serving on vsock port"))
    {
        eprintln!("agent: {}", line.trim());
    }

    client.shutdown().unwrap();
    let out = vm.wait(Duration::from_secs(60)).unwrap();
    out.assert_status(0);
    assert!(
        out.stderr.contains("guest powered off"),
        "{}\n{}",
        out.console,
        out.stderr
    );
    assert!(
        out.console.contains("shutdown requested"),
        "{}",
        out.console
    );
    // PID 1 left the initramfs for a tmpfs root, so that containers can pivot_root.
    assert!(
        out.console.contains("running from a tmpfs root"),
        "{}",
        out.console
    );
    // The agent says which clocksource the guest keeps time with. A one-vCPU guest has a
    // high-resolution one (kvm-clock, which the VMM asks for on kvm_pvm; kvm-clock or tsc on
    // hardware KVM): it can stop its tick when idle and read the time without a syscall.
    let clocksource = out
        .console
        .split(", clocksource ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no clocksource in the agent's line:\n{}", out.console));
    assert!(
        ["kvm-clock", "tsc"].contains(&clocksource),
        "clocksource {clocksource}:\n{}",
        out.console
    );
    assert!(!uds.exists(), "the VMM removes its socket on exit");
}

#[test]
#[ignore = "slow lane: boots the real guest kernel (scripts/test.sh runs it)"]
fn agent_without_vsock_says_why_and_powers_off() {
    let vm = GuestBoot::new("initramfs.cpio").spawn().unwrap();
    let out = vm.wait(Duration::from_secs(120)).unwrap();
    out.assert_status(0);
    assert!(
        out.console.contains("no virtio-vsock device") && out.console.contains("powering off"),
        "{}",
        out.console
    );
}
