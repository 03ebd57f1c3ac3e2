//! `nutshell-test-init`: the `/init` (PID 1) of the slow-lane boot test.
//!
//! It mounts `/proc` and `/sys`, prints one line for the test to check,
//!
//! ```text
//! NUTSHELL_TEST_INIT uptime=<secs> epoch=<wall clock, s since 1970> cpus=<online CPUs> mem_kib=<MemTotal> clocksource=<current> clocksources=<available, comma-separated> features=<those of FEATURES the CPU has> cmdline=<cmdline>
//! ```
//!
//! then does what `nutshell_test.action=` on the kernel command line says: `poweroff` (the
//! default: sync, then `reboot(RB_POWER_OFF)`), `reboot` (`RB_AUTOBOOT`), `panic` (exit, so the
//! kernel panics), `hang` (sleep forever) or `vsock-echo` (echo one connection on vsock port
//! 1024 until EOF, then write `hello-from-guest` to host port 1025, then power off) or
//! `virtiofs-check` (mount the virtio-fs tag `nutshell` on `/mnt`, print `from-host.txt`, write
//! `from-guest.txt`, time a sequential write and read and the creation of small files, print one
//! `virtiofs-bench` line, power off). With `nutshell_test.entry=1` it prints a second line
//! after the first, on how system calls enter the kernel and on the tick (for the guest
//! kernel's kvm_pvm-only patches, guest-kernel/README.md):
//!
//! ```text
//! NUTSHELL_TEST_INIT entry syscall_getpid=<ok|got:N> syscall_eflags_id=<kept|cleared> int80_getpid=<ok|...> int80_prefixed_getpid=<ok|signal:N|...> hz=<1e9 / resolution of CLOCK_MONOTONIC_COARSE> coarse_steps=<steps of that clock while spinning> spin_s=<seconds spun>
//! ```
//!
//! On any failure it prints
//! `NUTSHELL_TEST_INIT error: <what>` instead and powers off.
//!
//! It must never panic: a panic aborts PID 1, which is a kernel panic the test did not ask for.

mod parse;
mod sys;

use std::error::Error;
use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::process;
use std::thread;
use std::time::{Duration, Instant};

use parse::{Action, ParseError};
use sys::{ChildEnd, RebootCmd};

/// The prefix of every line this init prints.
const PREFIX: &str = "NUTSHELL_TEST_INIT";
const ONLINE_CPUS: &str = "/sys/devices/system/cpu/online";
const CLOCKSOURCE: &str = "/sys/devices/system/clocksource/clocksource0/current_clocksource";
const CLOCKSOURCES: &str = "/sys/devices/system/clocksource/clocksource0/available_clocksource";
/// CPU features the report line names when `/proc/cpuinfo` lists them: what tells the host and
/// compat CPU profiles apart, and the TSC-deadline timer the VMM offers.
const FEATURES: &[&str] = &[
    "tsc_deadline_timer",
    "x2apic",
    "hypervisor",
    "xsave",
    "avx",
    "avx2",
    "smap",
    "smep",
];

/// Why init could not report.
#[derive(Debug, thiserror::Error)]
enum InitError {
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot count online CPUs from {ONLINE_CPUS}: {sysfs}; nor with sched_getaffinity")]
    Cpus {
        sysfs: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Parse(#[from] ParseError),
}

fn main() {
    let action = match report() {
        Ok(action) => action,
        Err(e) => {
            print_error(&e);
            Action::PowerOff
        }
    };
    act(action)
}

/// Mounts what it needs, prints the report line and returns the action asked for.
fn report() -> Result<Action, InitError> {
    mount("proc", c"proc", "/proc", c"/proc")?;
    mount("sysfs", c"sysfs", "/sys", c"/sys")?;

    let cmdline = read("/proc/cmdline")?;
    let cmdline = cmdline.trim();
    let uptime = read("/proc/uptime")?;
    let uptime = parse::parse_uptime(&uptime)?;
    let cpus = online_cpus()?;
    let mem_kib = parse::parse_mem_total_kib(&read("/proc/meminfo")?)?;
    // Before the epoch (no clock source for the wall time) reads as 0.
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Which clock the guest kernel keeps time with (kvm-clock, tsc, refined-jiffies, ...), and
    // which it has (with an invariant TSC Linux prefers tsc to a registered kvm-clock).
    let sysfs_words = |path| {
        fs::read_to_string(path).map_or_else(
            |_| "unknown".to_owned(),
            |s| s.split_whitespace().collect::<Vec<_>>().join(","),
        )
    };
    let clocksource = sysfs_words(CLOCKSOURCE);
    let clocksources = sysfs_words(CLOCKSOURCES);
    let features = parse::cpu_features(&read("/proc/cpuinfo")?, FEATURES).join(",");
    print_line(format_args!(
        "{PREFIX} uptime={uptime} epoch={epoch} cpus={cpus} mem_kib={mem_kib} clocksource={clocksource} clocksources={clocksources} features={features} cmdline={cmdline}"
    ));
    if parse::entry_wanted(cmdline) {
        print_line(format_args!("{PREFIX} entry {}", entry_report()));
    }
    Ok(parse::parse_action(cmdline)?)
}

/// How long the `entry` line's tick count spins.
const TICK_SPIN: Duration = Duration::from_millis(500);

/// The `entry` line's fields: how a 64-bit `syscall` and a 32-bit `int $0x80` (plain and with a
/// prefix byte) come back, and what the tick is.
fn entry_report() -> String {
    let pid = sys::getpid();
    let (ret, id_kept) = sys::syscall_getpid_keeps_eflags_id();
    let syscall = if ret == pid {
        "ok".to_owned()
    } else {
        format!("got:{ret}")
    };
    let int80 = |f| match sys::in_child(f) {
        Ok(ChildEnd::Exited(0)) => "ok".to_owned(),
        Ok(ChildEnd::Exited(_)) => "wrong-pid".to_owned(),
        Ok(ChildEnd::Signaled(sig)) => format!("signal:{sig}"),
        Err(e) => format!("fork-error:{}", e.raw_os_error().unwrap_or(0)),
    };
    let plain = int80(|| i32::from(sys::int80_getpid(false) != sys::getpid()));
    let prefixed = int80(|| i32::from(sys::int80_getpid(true) != sys::getpid()));
    // A coarse clock moves once per tick; its resolution is the tick length (1/HZ). A busy
    // CPU ticks even with NO_HZ_IDLE, so its steps while spinning count the ticks it got.
    let coarse = libc::CLOCK_MONOTONIC_COARSE;
    let hz = sys::clock_res_ns(coarse)
        .ok()
        .filter(|&ns| ns > 0)
        .map_or_else(
            || "unknown".to_owned(),
            |ns| (1_000_000_000 / ns).to_string(),
        );
    let spun = Instant::now();
    let mut steps = 0u32;
    let mut last = sys::clock_ns(coarse).unwrap_or(0);
    while spun.elapsed() < TICK_SPIN {
        let now = sys::clock_ns(coarse).unwrap_or(last);
        if now != last {
            steps += 1;
            last = now;
        }
    }
    format!(
        "syscall_getpid={syscall} syscall_eflags_id={} int80_getpid={plain} int80_prefixed_getpid={prefixed} hz={hz} coarse_steps={steps} spin_s={:.2}",
        if id_kept { "kept" } else { "cleared" },
        spun.elapsed().as_secs_f64()
    )
}

fn act(action: Action) -> ! {
    match action {
        Action::PowerOff => power_off(),
        Action::Reboot => {
            sys::drain_console();
            sys::sync();
            print_error(&sys::reboot(RebootCmd::Restart));
            power_off()
        }
        // PID 1 exiting is what makes the kernel panic ("Attempted to kill init!").
        Action::Panic => process::exit(1),
        Action::Hang => loop {
            thread::sleep(Duration::from_secs(3600));
        },
        Action::VirtiofsCheck => {
            if let Err(e) = virtiofs_check() {
                print_error(&e);
            }
            power_off()
        }
        Action::VsockEcho => {
            match vsock_echo() {
                Ok(bytes) => print_line(format_args!("{PREFIX} vsock-echo done bytes={bytes}")),
                Err(e) => print_error(&e),
            }
            power_off()
        }
    }
}

/// Echoes one connection on vsock port 1024 until EOF, then says hello to host port 1025.
fn vsock_echo() -> io::Result<u64> {
    use std::io::Read;
    let mut conn = sys::vsock_accept_one(1024)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        conn.write_all(&buf[..n])?;
        total += n as u64;
    }
    drop(conn);
    let mut host = sys::vsock_connect(libc::VMADDR_CID_HOST, 1025)?;
    host.write_all(b"hello-from-guest\n")?;
    // Wait until the host closes, so that the line has left the guest before power-off.
    let _ = host.read(&mut buf);
    Ok(total)
}

/// Size of the sequential write and read of `virtiofs-check`.
const BENCH_MIB: usize = 8;
/// Number of small files `virtiofs-check` creates.
const BENCH_FILES: usize = 100;

/// Mounts the virtio-fs export, exchanges one file each way with the host, times the
/// workloads and prints them on one line.
fn virtiofs_check() -> io::Result<()> {
    use std::io::Read;
    use std::time::Instant;
    match fs::create_dir("/mnt") {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let tag = CString::new(nutshell_protocol::SHARED_FS_TAG)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    sys::mount_virtiofs(&tag, c"/mnt")?;
    let from_host = fs::read_to_string("/mnt/from-host.txt")?;
    print_line(format_args!(
        "{PREFIX} virtiofs read={}",
        from_host.trim_end()
    ));
    fs::write("/mnt/from-guest.txt", b"hello-from-guest\n")?;

    // Sequential write of BENCH_MIB in 1 MiB writes, then fsync.
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut f = fs::File::create("/mnt/bench-write.bin")?;
    for _ in 0..BENCH_MIB {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    drop(f);
    let write_s = t.elapsed().as_secs_f64();

    // Sequential read of a file the host wrote (never in this guest's page cache).
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut f = fs::File::open("/mnt/bench-read.bin")?;
    let mut read = 0usize;
    loop {
        match f.read(&mut buf)? {
            0 => break,
            n => read += n,
        }
    }
    let read_s = t.elapsed().as_secs_f64();

    // Small files: create, write 100 bytes, close.
    fs::create_dir("/mnt/small")?;
    let t = Instant::now();
    for i in 0..BENCH_FILES {
        fs::write(format!("/mnt/small/f{i}"), [b'x'; 100])?;
    }
    let create_s = t.elapsed().as_secs_f64();
    sys::sync();
    print_line(format_args!(
        "{PREFIX} virtiofs-bench write_mib={BENCH_MIB} write_s={write_s:.3} read_bytes={read} read_s={read_s:.3} files={BENCH_FILES} create_s={create_s:.3}"
    ));
    Ok(())
}

/// Syncs and powers off; if even that fails, exits, which panics the kernel: the most visible
/// failure left.
fn power_off() -> ! {
    sys::drain_console();
    sys::sync();
    print_error(&sys::reboot(RebootCmd::PowerOff));
    process::exit(1)
}

fn mount(
    fstype: &'static str,
    fstype_c: &'static std::ffi::CStr,
    target: &'static str,
    target_c: &'static std::ffi::CStr,
) -> Result<(), InitError> {
    // The initramfs should hold the mount points; create them if it does not.
    match fs::create_dir(target) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(InitError::Mount {
                fstype,
                target,
                source,
            })
        }
    }
    sys::mount_pseudo(fstype_c, target_c).map_err(|source| InitError::Mount {
        fstype,
        target,
        source,
    })
}

fn read(path: &'static str) -> Result<String, InitError> {
    fs::read_to_string(path).map_err(|source| InitError::Read { path, source })
}

/// Online CPUs from sysfs, or from the affinity mask if sysfs cannot tell.
fn online_cpus() -> Result<usize, InitError> {
    let sysfs = match fs::read_to_string(ONLINE_CPUS) {
        Ok(list) => match parse::parse_cpu_list(&list) {
            Ok(count) => return Ok(count),
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    };
    thread::available_parallelism()
        .map(usize::from)
        .map_err(|source| InitError::Cpus { sysfs, source })
}

/// Prints one line to stdout (the console) and flushes. Errors are ignored: with no console
/// there is nobody to tell.
fn print_line(line: std::fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Prints `NUTSHELL_TEST_INIT error: ` and the error with its causes, once.
fn print_error(e: &dyn Error) {
    let what = nutshell_protocol::error_chain(e);
    print_line(format_args!("{PREFIX} error: {what}"));
}
