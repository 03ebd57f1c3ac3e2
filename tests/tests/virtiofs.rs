//! Slow lane: virtio-fs with the real guest kernel. The test init mounts the export
//! (`mount -t virtiofs nutshell /mnt`), prints a file the host put there, writes one the host
//! then reads, and times a sequential write and read and the creation of small files; the test
//! runs the same workloads on the host directory and prints the ratios.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use nutshell_tests::GuestBoot;

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
const BENCH_MIB: usize = 8;
const BENCH_FILES: usize = 100;

/// The value of `key=` in the `virtiofs-bench` line.
fn bench_field(console: &str, key: &str) -> f64 {
    let line = console
        .lines()
        .find(|l| l.starts_with("NUTSHELL_TEST_INIT virtiofs-bench "))
        .unwrap_or_else(|| panic!("no virtiofs-bench line in:\n{console}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .parse()
        .unwrap()
}

/// The guest's workloads, on the host directory `dir`: (write s, read s, create s).
fn host_baseline(dir: &Path) -> (f64, f64, f64) {
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::create(dir.join("host-write.bin")).unwrap();
    for _ in 0..BENCH_MIB {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let write_s = t.elapsed().as_secs_f64();

    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::open(dir.join("bench-read.bin")).unwrap();
    while f.read(&mut buf).unwrap() > 0 {}
    let read_s = t.elapsed().as_secs_f64();

    std::fs::create_dir(dir.join("host-small")).unwrap();
    let t = Instant::now();
    for i in 0..BENCH_FILES {
        std::fs::write(dir.join(format!("host-small/f{i}")), [b'x'; 100]).unwrap();
    }
    let create_s = t.elapsed().as_secs_f64();
    (write_s, read_s, create_s)
}

#[test]
#[ignore = "slow lane: boots the real guest kernel (scripts/test.sh runs it)"]
fn guest_mounts_the_shared_directory_reads_and_writes() {
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join("from-host.txt"), "hello-from-host\n").unwrap();
    let pattern: Vec<u8> = (0..BENCH_MIB << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(shared.path().join("bench-read.bin"), &pattern).unwrap();
    // Outside the export: the guest must not reach it.
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), shared.path().join("outside")).unwrap();

    let vm = GuestBoot::new("test-initramfs.cpio")
        .cmdline("quiet nutshell_test.action=virtiofs-check")
        .shared_dir(shared.path())
        .spawn()
        .unwrap();
    let out = vm.wait(BOOT_TIMEOUT).unwrap();
    out.assert_status(0);
    assert!(
        !out.console.contains("NUTSHELL_TEST_INIT error"),
        "{}",
        out.console
    );
    assert!(
        out.console
            .contains("NUTSHELL_TEST_INIT virtiofs read=hello-from-host"),
        "{}",
        out.console
    );
    assert_eq!(
        std::fs::read_to_string(shared.path().join("from-guest.txt")).unwrap(),
        "hello-from-guest\n"
    );
    let written = std::fs::read(shared.path().join("bench-write.bin")).unwrap();
    assert_eq!(written.len(), BENCH_MIB << 20);
    assert!(written.iter().all(|b| *b == 0x5a));
    assert_eq!(
        std::fs::read_dir(shared.path().join("small"))
            .unwrap()
            .count(),
        BENCH_FILES
    );
    assert_eq!(
        bench_field(&out.console, "read_bytes") as usize,
        BENCH_MIB << 20
    );
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);

    let guest_write = bench_field(&out.console, "write_s");
    let guest_read = bench_field(&out.console, "read_s");
    let guest_create = bench_field(&out.console, "create_s");
    let (host_write, host_read, host_create) = host_baseline(shared.path());
    let mib = BENCH_MIB as f64;
    eprintln!(
        "virtio-fs vs host: write {BENCH_MIB} MiB {:.1} vs {:.1} MiB/s (x{:.1} slower); read {:.1} vs {:.1} MiB/s (x{:.1}); {BENCH_FILES} small files {:.2} vs {:.3} s (x{:.1})",
        mib / guest_write,
        mib / host_write,
        guest_write / host_write,
        mib / guest_read,
        mib / host_read,
        guest_read / host_read,
        guest_create,
        host_create,
        guest_create / host_create,
    );
}
