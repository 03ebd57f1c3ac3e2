//! The control socket under real KVM: a tiny counting guest served on `--api-sock`'s ttrpc
//! service, driven by the generated client: Stats, Pause/Resume, Snapshot (validated, leaves
//! the VM as it found it, restorable), Shutdown.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{counter_program, machine, Captured, COUNTER, LOAD_ADDR};
use nutshell_protocol::generated::vmm as pb;
use nutshell_protocol::generated::vmm_ttrpc::VmmClient;
use nutshell_vmm::api::{ControlService, ControlSocket, SharedVm};
use nutshell_vmm::{Console, CpuProfileChoice, RestoreConfig, Vm, VmExit, VmRunState};
use vm_memory::{Bytes, GuestAddress};

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(10_000_000_000)
}

fn counter(vm: &SharedVm) -> u64 {
    let g = vm.lock().unwrap();
    g.as_ref()
        .unwrap()
        .memory()
        .read_obj(GuestAddress(COUNTER))
        .unwrap()
}

fn code(e: ttrpc::Error) -> ttrpc::Code {
    match e {
        ttrpc::Error::RpcStatus(s) => s.code(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn control_socket_pauses_snapshots_and_stops_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let console = Captured::default();
    let mut vm = Vm::new(machine(1, &console)).unwrap();
    vm.load_long_mode_program(&counter_program().0, LOAD_ADDR)
        .unwrap();
    let running = vm.start().unwrap();
    let exit = running.exit_handle();
    let shared: SharedVm = Arc::new(Mutex::new(Some(running)));
    let sock = dir.path().join("api.sock");
    // A non-socket file at the path is refused, not removed.
    std::fs::write(&sock, b"x").unwrap();
    assert!(ControlSocket::serve(
        &sock,
        ControlService::new(shared.clone(), exit.clone(), Instant::now())
    )
    .is_err());
    assert!(sock.is_file());
    std::fs::remove_file(&sock).unwrap();
    let server = ControlSocket::serve(
        &sock,
        ControlService::new(shared.clone(), exit.clone(), Instant::now()),
    )
    .unwrap();
    let client =
        VmmClient::new(ttrpc::Client::connect(&format!("unix://{}", sock.display())).unwrap());

    let stats = client.stats(ctx(), &pb::StatsRequest::new()).unwrap();
    assert_eq!(stats.vcpus, 1);
    assert_eq!(stats.memory_bytes, 16 << 20);
    assert!(stats.rss_bytes > 0);

    client.pause(ctx(), &pb::PauseRequest::new()).unwrap();
    let c = counter(&shared);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(counter(&shared), c, "paused guest kept counting");
    assert_eq!(
        code(client.pause(ctx(), &pb::PauseRequest::new()).unwrap_err()),
        ttrpc::Code::FAILED_PRECONDITION
    );
    client.resume(ctx(), &pb::ResumeRequest::new()).unwrap();
    assert_eq!(
        code(client.resume(ctx(), &pb::ResumeRequest::new()).unwrap_err()),
        ttrpc::Code::FAILED_PRECONDITION
    );

    // Snapshot: bad directories refused, then a running VM is snapshotted and left running.
    for bad in ["", "relative", "/no/such/parent/dir"] {
        let mut req = pb::SnapshotRequest::new();
        req.directory = bad.into();
        assert_eq!(
            code(client.snapshot(ctx(), &req).unwrap_err()),
            ttrpc::Code::INVALID_ARGUMENT,
            "{bad:?}"
        );
    }
    let snap = dir.path().join("snap");
    let mut req = pb::SnapshotRequest::new();
    req.directory = snap.to_string_lossy().into_owned();
    client.snapshot(ctx(), &req).unwrap();
    assert_eq!(
        shared.lock().unwrap().as_ref().unwrap().state(),
        VmRunState::Running
    );
    let c = counter(&shared);
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter(&shared) == c {
        assert!(Instant::now() < deadline, "the VM was not resumed");
        std::thread::sleep(Duration::from_millis(2));
    }
    // The snapshot restores.
    let restored = Vm::restore(
        &snap,
        RestoreConfig {
            console: Console::Writer(Box::new(Captured::default())),
            cpu_profile: CpuProfileChoice::Auto,
            started_at: None,
            expect_vcpus: Some(1),
            expect_memory_mib: Some(16),
            expect_template_key: None,
            backends: Vec::new(),
        },
    )
    .unwrap();
    drop(restored);

    // Shutdown with a grace period is not supported yet; without one it stops the VM.
    let mut req = pb::ShutdownRequest::new();
    req.grace_secs = 5;
    assert_eq!(
        code(client.shutdown(ctx(), &req).unwrap_err()),
        ttrpc::Code::UNIMPLEMENTED
    );
    client.shutdown(ctx(), &pb::ShutdownRequest::new()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !exit.is_requested() {
        assert!(Instant::now() < deadline, "Shutdown did not stop the VM");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        code(client.stats(ctx(), &pb::StatsRequest::new()).unwrap_err()),
        ttrpc::Code::FAILED_PRECONDITION
    );
    server.stop();
    assert!(!sock.exists(), "the socket is removed");
    let vm = shared.lock().unwrap().take().unwrap();
    assert!(matches!(vm.wait(), VmExit::Stopped(r) if r.contains("control socket")));
}
