//! Snapshot and restore under real KVM: a tiny guest counts in memory and prints the count's
//! last digit to COM1 in a loop; paused, snapshotted and restored into new VMs it must go on
//! exactly where it stopped, and a damaged or mismatched snapshot must be refused.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{assert_consecutive, counter_program, machine, Asm, Captured, COUNTER, LOAD_ADDR};
use nutshell_vmm::devices::virtio::manager::{Backend, DeviceConfig};
use nutshell_vmm::snapshot::{self, SnapshotError};
use nutshell_vmm::{
    Console, CpuProfileChoice, RestoreConfig, RunningVm, Vm, VmError, VmExit, VmRunState,
};
use vm_memory::{Bytes, GuestAddress};

fn restore_config(console: &Captured) -> RestoreConfig {
    RestoreConfig {
        console: Console::Writer(Box::new(console.clone())),
        cpu_profile: CpuProfileChoice::Auto,
        started_at: None,
        expect_vcpus: None,
        expect_memory_mib: None,
        expect_template_key: None,
        backends: Vec::new(),
    }
}

fn counter(vm: &RunningVm) -> u64 {
    vm.memory().read_obj(GuestAddress(COUNTER)).unwrap()
}

/// Waits until the guest counter passes `at_least`.
fn wait_counter(vm: &RunningVm, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = counter(vm);
        if c >= at_least {
            return c;
        }
        assert!(Instant::now() < deadline, "guest counter stuck at {c}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Boots the counter guest with `vcpus` vCPUs, lets it count, pauses it, snapshots it into
/// `dir`, stops it. Returns the counter at the snapshot and the console up to it.
fn counting_snapshot(vcpus: u8, dir: &Path) -> (u64, String) {
    let console = Captured::default();
    let mut vm = Vm::new(machine(vcpus, &console)).unwrap();
    vm.load_long_mode_program(&counter_program().0, LOAD_ADDR)
        .unwrap();
    vm.set_payload("counter program");
    let mut running = vm.start().unwrap();
    wait_counter(&running, 200);
    running.pause().unwrap();
    let at_pause = counter(&running);
    running.snapshot(dir).unwrap();
    assert_eq!(counter(&running), at_pause, "paused guest kept counting");
    running
        .exit_handle()
        .request(VmExit::Stopped("test".into()));
    assert_eq!(running.wait(), VmExit::Stopped("test".into()));
    (at_pause, console.text())
}

#[test]
fn restored_guest_continues_exactly_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let (at_snapshot, before) = counting_snapshot(1, dir.path());
    assert!(at_snapshot >= 200);
    assert_consecutive(&before);

    let console = Captured::default();
    let started = Instant::now();
    let vm = Vm::restore(dir.path(), restore_config(&console)).unwrap();
    assert_eq!(vm.payload(), Some("counter program"));
    let restored = vm.start().unwrap();
    let restore_ms = started.elapsed().as_secs_f64() * 1e3;
    let first = counter(&restored);
    assert!(first >= at_snapshot, "{first} < {at_snapshot}");
    let later = wait_counter(&restored, at_snapshot + 500);
    assert!(later > first);
    restored
        .exit_handle()
        .request(VmExit::Stopped("test".into()));
    // Read after the request: the vCPU may still finish one increment before it sees it.
    std::thread::sleep(Duration::from_millis(20));
    let last = counter(&restored);
    assert_eq!(restored.wait(), VmExit::Stopped("test".into()));
    let after = console.text();
    assert!(!after.is_empty());
    let all = format!("{before}{after}");
    assert_consecutive(&all);
    // One digit per increment: the restored guest printed every count since the snapshot.
    let printed = all.len() as u64;
    assert!(
        printed + 1 >= last && printed <= last + 1,
        "{printed} digits for counter {last}"
    );
    // The saved state itself: decodes, and holds what a guest kernel needs.
    let bytes = std::fs::read(dir.path().join("state")).unwrap();
    let (header, rest) = snapshot::decode_header(&bytes).unwrap();
    assert_eq!((header.vcpus, header.memory_size), (1, 16 << 20));
    let saved = snapshot::decode_state(&header, rest).unwrap();
    let vcpu = &saved.vcpus[0];
    let msrs: Vec<u32> = vcpu.msrs.iter().map(|m| m.index).collect();
    for must in [0x10, 0x2ff, 0xc000_0082, 0xc000_0102] {
        assert!(msrs.contains(&must), "MSR {must:#x} not saved: {msrs:x?}");
    }
    // EFER and the APIC base travel in the special registers.
    assert_eq!(vcpu.sregs.efer & 0x500, 0x500, "long mode active");
    assert_eq!(vcpu.sregs.apic_base & 0xffff_f000, 0xfee0_0000);
    eprintln!(
        "saved {} MSRs, xcrs {}, xsave {}",
        msrs.len(),
        vcpu.xcrs.is_some(),
        vcpu.xsave.is_some()
    );
    use std::os::unix::fs::MetadataExt;
    let state = std::fs::metadata(dir.path().join("state")).unwrap().len();
    let memory = std::fs::metadata(dir.path().join("memory")).unwrap();
    assert_eq!(memory.len(), 16 << 20);
    // Zero pages are holes: the tiny guest wrote a few pages only.
    let on_disk = memory.blocks() * 512;
    assert!(on_disk < 1 << 20, "memory takes {on_disk} bytes on disk");
    eprintln!(
        "snapshot: state {state} bytes, memory {} bytes ({on_disk} on disk); restore to running {restore_ms:.1} ms",
        memory.len()
    );
}

#[test]
fn two_restores_run_independently_on_private_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (at_snapshot, _) = counting_snapshot(1, dir.path());
    let (c1, c2) = (Captured::default(), Captured::default());
    let a = Vm::restore(dir.path(), restore_config(&c1))
        .unwrap()
        .start()
        .unwrap();
    let b = Vm::restore(dir.path(), restore_config(&c2))
        .unwrap()
        .start()
        .unwrap();
    a.memory()
        .write_obj(0xdead_beef_u64, GuestAddress(0x30_0000))
        .unwrap();
    let marker: u64 = b.memory().read_obj(GuestAddress(0x30_0000)).unwrap();
    assert_eq!(marker, 0, "a write in one restored VM is seen in the other");
    wait_counter(&a, at_snapshot + 300);
    wait_counter(&b, at_snapshot + 300);
    drop(a);
    assert!(counter(&b) > at_snapshot);
    let still = counter(&b);
    wait_counter(&b, still + 100);
    drop(b);
    // The snapshot's files were not written through: it restores again.
    let again = Vm::restore(dir.path(), restore_config(&Captured::default())).unwrap();
    let marker: u64 = again.memory().read_obj(GuestAddress(0x30_0000)).unwrap();
    assert_eq!(marker, 0);
}

/// `Private_Dirty` (KiB) of the mapping that starts at `addr` and the file it maps, from
/// /proc/self/smaps.
fn mapping_private_dirty(addr: usize) -> Option<(u64, String)> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut file = None;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        if let Some((lo, _)) = words.next().and_then(|r| r.split_once('-')) {
            if let Ok(lo) = usize::from_str_radix(lo, 16) {
                file = (lo == addr).then(|| words.nth(4).unwrap_or("").to_owned());
                continue;
            }
        }
        if let (Some(f), Some(v)) = (&file, line.strip_prefix("Private_Dirty:")) {
            return Some((
                v.trim().trim_end_matches("kB").trim().parse().ok()?,
                f.clone(),
            ));
        }
    }
    None
}

#[test]
fn restored_memory_is_a_private_copy_on_write_file_mapping() {
    use vm_memory::{GuestMemory, GuestMemoryRegion};
    let dir = tempfile::tempdir().unwrap();
    counting_snapshot(1, dir.path());
    let vm = Vm::restore(dir.path(), restore_config(&Captured::default())).unwrap();
    let mem = vm.memory();
    let region = mem.iter().next().unwrap();
    let start = mem.get_host_address(region.start_addr()).unwrap() as usize;
    // Reading every page maps the file's pages without copying them.
    let mut buf = vec![0u8; region.len() as usize];
    mem.read_slice(&mut buf, region.start_addr()).unwrap();
    let (dirty, file) = mapping_private_dirty(start).unwrap();
    assert!(file.ends_with("/memory"), "guest RAM maps {file:?}");
    assert_eq!(dirty, 0, "reading guest RAM copied pages");
    // A write copies one page, and only in this VM.
    mem.write_obj(1u64, GuestAddress(0x40_0000)).unwrap();
    let (dirty, _) = mapping_private_dirty(start).unwrap();
    // (4 KiB, or one huge page where the host backs copies with them.)
    assert!(
        (4..=2048).contains(&dirty),
        "{dirty} KiB copied for one write"
    );
    let on_disk = std::fs::read(dir.path().join("memory")).unwrap();
    assert_eq!(on_disk[0x40_0000], 0);
}

#[test]
fn pause_resume_and_illegal_transitions() {
    let console = Captured::default();
    let mut vm = Vm::new(machine(2, &console)).unwrap();
    vm.load_long_mode_program(&counter_program().0, LOAD_ADDR)
        .unwrap();
    let mut running = vm.start().unwrap();
    assert_eq!(running.state(), VmRunState::Running);
    let err = running.resume().unwrap_err();
    assert!(matches!(err, VmError::IllegalTransition { .. }), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let err = running.snapshot(dir.path()).unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot snapshot a VM that is running"),
        "{err}"
    );

    wait_counter(&running, 100);
    for _ in 0..3 {
        running.pause().unwrap();
        assert_eq!(running.state(), VmRunState::Paused);
        let err = running.pause().unwrap_err();
        assert!(
            err.to_string().contains("cannot pause a VM that is paused"),
            "{err}"
        );
        let c = counter(&running);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(counter(&running), c);
        running.resume().unwrap();
        wait_counter(&running, c + 50);
    }
    // A paused VM stops cleanly.
    running.pause().unwrap();
    running
        .exit_handle()
        .request(VmExit::Stopped("test".into()));
    assert_eq!(running.wait(), VmExit::Stopped("test".into()));
}

#[test]
fn a_stopped_vm_cannot_be_paused() {
    let mut p = Asm::default();
    common::poweroff(&mut p);
    let mut vm = Vm::new(machine(1, &Captured::default())).unwrap();
    vm.load_long_mode_program(&p.0, LOAD_ADDR).unwrap();
    let mut running = vm.start().unwrap();
    let exit = running.exit_handle();
    while exit.reason().is_none() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let err = running.pause().unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot pause a VM that is stopped"),
        "{err}"
    );
    assert_eq!(running.state(), VmRunState::Stopped);
    assert_eq!(running.wait(), VmExit::PowerOff);
}

fn refused(dir: &Path, config: RestoreConfig) -> VmError {
    Vm::restore(dir, config).unwrap_err()
}

#[test]
fn damaged_or_mismatched_snapshots_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    counting_snapshot(1, dir.path());
    let state_path = dir.path().join("state");
    let memory_path = dir.path().join("memory");
    let state = std::fs::read(&state_path).unwrap();
    let memory = std::fs::read(&memory_path).unwrap();
    let c = Captured::default();

    // A flipped byte in the state.
    let mut bad = state.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    std::fs::write(&state_path, &bad).unwrap();
    let err = refused(dir.path(), restore_config(&c));
    assert!(
        matches!(err, VmError::Snapshot(SnapshotError::StateChecksum { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("corrupted"), "{err}");

    // Truncated state.
    std::fs::write(&state_path, &state[..state.len() - 100]).unwrap();
    let err = refused(dir.path(), restore_config(&c));
    assert!(
        matches!(err, VmError::Snapshot(SnapshotError::StateChecksum { .. })),
        "{err}"
    );
    std::fs::write(&state_path, &state[..6]).unwrap();
    let err = refused(dir.path(), restore_config(&c));
    assert!(
        matches!(err, VmError::Snapshot(SnapshotError::Truncated { .. })),
        "{err}"
    );

    // Another format version (the previous one, with a valid checksum).
    let mut other = state.clone();
    other[8..12].copy_from_slice(&1u32.to_le_bytes());
    let n = other.len();
    let crc = crc32fast::hash(&other[..n - 4]);
    other[n - 4..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&state_path, &other).unwrap();
    let err = refused(dir.path(), restore_config(&c));
    assert!(
        matches!(
            err,
            VmError::Snapshot(SnapshotError::FormatVersion { found: 1 })
        ),
        "{err}"
    );
    std::fs::write(&state_path, &state).unwrap();

    // A flipped byte, or a missing page, in memory.
    let mut bad = memory.clone();
    bad[(COUNTER + 3) as usize] ^= 0x80;
    std::fs::write(&memory_path, &bad).unwrap();
    let err = refused(dir.path(), restore_config(&c));
    assert!(
        matches!(err, VmError::Snapshot(SnapshotError::MemoryChecksum { .. })),
        "{err}"
    );
    std::fs::write(&memory_path, &memory[..memory.len() - 4096]).unwrap();
    let err = refused(dir.path(), restore_config(&c));
    assert!(
        matches!(err, VmError::Snapshot(SnapshotError::MemorySize { .. })),
        "{err}"
    );
    std::fs::write(&memory_path, &memory).unwrap();

    // Another shape than asked.
    let err = refused(
        dir.path(),
        RestoreConfig {
            expect_vcpus: Some(2),
            ..restore_config(&c)
        },
    );
    assert!(
        matches!(err, VmError::Snapshot(SnapshotError::Shape { .. })),
        "{err}"
    );
    assert_eq!(err.to_string(), "snapshot has vCPUs 1, 2 asked");
    let err = refused(
        dir.path(),
        RestoreConfig {
            expect_memory_mib: Some(32),
            ..restore_config(&c)
        },
    );
    assert!(
        err.to_string().contains("MiB of memory 16, 32 asked"),
        "{err}"
    );

    // Not a snapshot at all, or none there.
    std::fs::write(&state_path, b"not a snapshot, just some text").unwrap();
    let err = refused(dir.path(), restore_config(&c));
    assert!(
        matches!(err, VmError::Snapshot(SnapshotError::BadMagic)),
        "{err}"
    );
    let empty = tempfile::tempdir().unwrap();
    let err = refused(empty.path(), restore_config(&c));
    assert!(
        matches!(err, VmError::Snapshot(SnapshotError::Io { .. })),
        "{err}"
    );

    // Restored intact, it still works.
    std::fs::write(&state_path, &state).unwrap();
    let vm = Vm::restore(dir.path(), restore_config(&c)).unwrap();
    drop(vm.start().unwrap());
}

#[test]
fn smp_guest_snapshot_restores() {
    // The boot vCPU counts; the others wait for a startup IPI, in KVM_RUN, and are saved so.
    let dir = tempfile::tempdir().unwrap();
    let (at_snapshot, _) = counting_snapshot(2, dir.path());
    let c = Captured::default();
    let vm = Vm::restore(
        dir.path(),
        RestoreConfig {
            expect_vcpus: Some(2),
            ..restore_config(&c)
        },
    )
    .unwrap();
    let running = vm.start().unwrap();
    wait_counter(&running, at_snapshot + 300);
    drop(running);
    assert_consecutive(&c.text());
}

#[test]
fn vm_with_vsock_restores_onto_a_new_socket() {
    let dir = tempfile::tempdir().unwrap();
    let console = Captured::default();
    let mut config = machine(1, &console);
    let old_uds = dir.path().join("vsock.sock");
    config.devices.push(DeviceConfig::Vsock(
        nutshell_vmm::devices::virtio::vsock::VsockConfig {
            guest_cid: 7,
            uds_path: old_uds.clone(),
        },
    ));
    let mut vm = Vm::new(config).unwrap();
    vm.load_long_mode_program(&counter_program().0, LOAD_ADDR)
        .unwrap();
    let mut running = vm.start().unwrap();
    wait_counter(&running, 200);
    running.pause().unwrap();
    let snap = dir.path().join("snap");
    running.snapshot(&snap).unwrap();
    drop(running);
    assert!(!old_uds.exists(), "the first VM removed its socket");

    // The snapshot has a vsock device: a restore needs a new host socket for it.
    let c = Captured::default();
    let err = Vm::restore(&snap, restore_config(&c)).unwrap_err();
    assert!(err.to_string().contains("--vsock-uds"), "{err}");

    let new_uds = dir.path().join("new.sock");
    let vm = Vm::restore(
        &snap,
        RestoreConfig {
            backends: vec![Backend::Vsock(new_uds.clone())],
            ..restore_config(&c)
        },
    )
    .unwrap();
    let running = vm.start().unwrap();
    assert!(
        std::os::unix::net::UnixStream::connect(&new_uds).is_ok(),
        "the restored vsock device listens on the new socket"
    );
    assert_eq!(running.vsock_connections(), Some(0));
    wait_counter(&running, 400);
    drop(running);
    assert!(!new_uds.exists());
}

#[test]
fn vm_with_virtio_fs_restores_onto_a_new_directory() {
    let dir = tempfile::tempdir().unwrap();
    let console = Captured::default();
    let mut config = machine(1, &console);
    let template_dir = dir.path().join("empty");
    std::fs::create_dir(&template_dir).unwrap();
    config.devices.push(DeviceConfig::Fs(
        nutshell_vmm::devices::virtio::fs::FsConfig {
            shared_dir: template_dir,
            tag: "pod-fs".into(),
        },
    ));
    let mut vm = Vm::new(config).unwrap();
    vm.load_long_mode_program(&counter_program().0, LOAD_ADDR)
        .unwrap();
    let mut running = vm.start().unwrap();
    wait_counter(&running, 200);
    running.pause().unwrap();
    let snap = dir.path().join("snap");
    running.snapshot(&snap).unwrap();
    drop(running);

    // The snapshot has a virtio-fs device: a restore needs a directory for it to export.
    let c = Captured::default();
    let err = Vm::restore(&snap, restore_config(&c)).unwrap_err();
    assert!(err.to_string().contains("--shared-dir"), "{err}");
    assert!(err.to_string().contains("pod-fs"), "{err}");
    let missing = dir.path().join("missing");
    let err = Vm::restore(
        &snap,
        RestoreConfig {
            backends: vec![Backend::Fs(missing.clone())],
            ..restore_config(&c)
        },
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains(&*missing.to_string_lossy()),
        "the new directory is the one exported: {err:#}"
    );

    let pod_dir = dir.path().join("pod");
    std::fs::create_dir(&pod_dir).unwrap();
    let vm = Vm::restore(
        &snap,
        RestoreConfig {
            backends: vec![Backend::Fs(pod_dir)],
            ..restore_config(&c)
        },
    )
    .unwrap();
    let running = vm.start().unwrap();
    wait_counter(&running, 400);
    drop(running);
}

#[test]
fn mismatched_template_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let console = Captured::default();
    let mut vm = Vm::new(machine(1, &console)).unwrap();
    vm.load_long_mode_program(&counter_program().0, LOAD_ADDR)
        .unwrap();
    vm.set_template_key("key-a");
    let mut running = vm.start().unwrap();
    wait_counter(&running, 50);
    running.pause().unwrap();
    running.snapshot(dir.path()).unwrap();
    drop(running);

    let c = Captured::default();
    let err = Vm::restore(
        dir.path(),
        RestoreConfig {
            expect_template_key: Some("key-b".into()),
            ..restore_config(&c)
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, VmError::Snapshot(SnapshotError::TemplateKey { .. })),
        "{err}"
    );
    assert!(
        err.to_string().contains("key-a") && err.to_string().contains("key-b"),
        "{err}"
    );
    Vm::restore(
        dir.path(),
        RestoreConfig {
            expect_template_key: Some("key-a".into()),
            ..restore_config(&c)
        },
    )
    .unwrap();
}
