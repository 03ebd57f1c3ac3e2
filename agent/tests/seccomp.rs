//! OCI seccomp profiles compiled and installed for real: each check forks a child, which
//! installs the filter and makes system calls, and reports through its exit status (0 = as
//! expected, otherwise the number of the failed check). Between fork and exit the child makes
//! system calls only (no allocation: the test process has other threads).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use nutshell_agent::container::seccomp;
use oci_spec::runtime::LinuxSeccomp;
use seccompiler::BpfProgram;

fn profile(json: &str) -> LinuxSeccomp {
    serde_json::from_str(json).unwrap()
}

/// A raw syscall's result and errno (`libc::syscall` returns -1 and sets errno on failure).
fn errno_of(ret: libc::c_long) -> i32 {
    if ret == -1 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    }
}

/// How the child ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Exited(i32),
    Signaled(i32),
}

/// Forks; the child sets `no_new_privs`, installs `prog` and exits with `check()`.
fn in_child(prog: &BpfProgram, check: fn() -> i32) -> Outcome {
    // SAFETY: the child only makes system calls (prctl, seccomp, the checks) and _exits; it
    // touches no lock or allocator another thread may hold.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            // SAFETY: _exit ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(101) };
        }
        let code = match seccomp::apply(prog) {
            Ok(()) => check(),
            Err(_) => 100,
        };
        // SAFETY: as above.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child, writing its status into a local.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid);
    if libc::WIFSIGNALED(status) {
        Outcome::Signaled(libc::WTERMSIG(status))
    } else {
        Outcome::Exited(libc::WEXITSTATUS(status))
    }
}

#[test]
fn denied_calls_fail_with_the_profile_errno_and_others_work() {
    let prog = seccomp::compile(&profile(
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"], "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 99}
        ]}"#,
    ))
    .unwrap();
    fn check() -> i32 {
        // SAFETY: (whole block) raw syscalls with constant, valid arguments.
        unsafe {
            // mkdir in /tmp would succeed for anyone; EPERM comes from the filter.
            if errno_of(libc::syscall(
                libc::SYS_mkdir,
                c"/tmp/nutshell-seccomp-x".as_ptr(),
                0o700,
            )) != libc::EPERM
            {
                return 1;
            }
            if errno_of(libc::syscall(
                libc::SYS_mkdirat,
                libc::AT_FDCWD,
                c"/tmp/nutshell-seccomp-y".as_ptr(),
                0o700,
            )) != libc::EPERM
            {
                return 2;
            }
            if errno_of(libc::syscall(libc::SYS_getpid)) != 99 {
                return 3;
            }
            // Everything else goes through.
            if libc::syscall(libc::SYS_getppid) <= 0 {
                return 4;
            }
            let fd = libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/dev/null".as_ptr(),
                libc::O_RDONLY,
            );
            if fd < 0 || libc::syscall(libc::SYS_close, fd) != 0 {
                return 5;
            }
        }
        0
    }
    assert_eq!(in_child(&prog, check), Outcome::Exited(0));
    // The parent is not filtered.
    assert!(!std::path::Path::new("/tmp/nutshell-seccomp-x").exists());
}

#[test]
fn argument_conditions_select_the_rule() {
    let prog = seccomp::compile(&profile(
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["close"], "action": "SCMP_ACT_ERRNO", "errnoRet": 77,
             "args": [{"index": 0, "value": 1000, "op": "SCMP_CMP_EQ"}]},
            {"names": ["close"], "action": "SCMP_ACT_ERRNO", "errnoRet": 78,
             "args": [{"index": 0, "value": 65280, "valueTwo": 768, "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["close"], "action": "SCMP_ACT_ERRNO", "errnoRet": 79,
             "args": [{"index": 0, "value": 5000, "op": "SCMP_CMP_GE"},
                      {"index": 1, "value": 7, "op": "SCMP_CMP_NE"}]},
            {"names": ["dup"], "action": "SCMP_ACT_ERRNO", "errnoRet": 80,
             "args": [{"index": 0, "value": 2000, "op": "SCMP_CMP_EQ"},
                      {"index": 0, "value": 2001, "op": "SCMP_CMP_EQ"}]}
        ]}"#,
    ))
    .unwrap();
    fn check() -> i32 {
        let close = |fd: libc::c_long, second: libc::c_long| {
            // SAFETY: closing a descriptor number that is not open; the second argument is
            // ignored by the kernel.
            errno_of(unsafe { libc::syscall(libc::SYS_close, fd, second) })
        };
        // SAFETY: dup of a descriptor number that is not open.
        let dup = |fd: libc::c_long| errno_of(unsafe { libc::syscall(libc::SYS_dup, fd) });
        let cases = [
            (close(1000, 0), 77),
            (close(1001, 0), 78), // 0x3e9 & 0xff00 == 0x300
            (close(0x0305, 0), 78),
            (close(0x0405, 0), libc::EBADF),
            (close(6000, 0), 79),
            (close(6000, 7), libc::EBADF), // both conditions must hold
            (close(4999, 0), libc::EBADF),
            (dup(2000), 80), // same index twice: alternatives
            (dup(2001), 80),
            (dup(2002), libc::EBADF),
        ];
        for (i, (got, want)) in cases.iter().enumerate() {
            if got != want {
                return 10 + i as i32;
            }
        }
        0
    }
    assert_eq!(in_child(&prog, check), Outcome::Exited(0));
}

#[test]
fn kill_process_and_trap_end_the_child_with_sigsys() {
    for action in ["SCMP_ACT_KILL_PROCESS", "SCMP_ACT_TRAP"] {
        let prog = seccomp::compile(&profile(&format!(
            r#"{{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{{"names": ["getppid"], "action": "{action}"}}]}}"#
        )))
        .unwrap();
        fn check() -> i32 {
            // SAFETY: getppid has no arguments.
            unsafe { libc::syscall(libc::SYS_getppid) };
            42
        }
        assert_eq!(
            in_child(&prog, check),
            Outcome::Signaled(libc::SIGSYS),
            "{action}"
        );
    }
}

/// A profile modelled on Docker's default (its allow list, the personality, clone and socket
/// conditions, clone3 → ENOSYS), as the shim passes it in the OCI spec.
const DOCKER_DEFAULT: &str = include_str!("fixtures/docker-default-seccomp.json");

#[test]
fn docker_default_profile_compiles_and_behaves() {
    let spec = profile(DOCKER_DEFAULT);
    let prog = seccomp::compile(&spec).unwrap();
    assert!(prog.len() < seccomp::MAX_INSTRUCTIONS);
    eprintln!("docker default profile: {} BPF instructions", prog.len());
    assert_eq!(seccomp::filter_flags(&spec).unwrap(), 0);
    fn check() -> i32 {
        // SAFETY: (whole block) raw syscalls with valid or deliberately invalid arguments
        // that the filter or the kernel rejects; a clone that succeeds exits at once.
        unsafe {
            if libc::syscall(libc::SYS_getpid) <= 0 {
                return 1;
            }
            // Not in the allow list: the default errno 1 (EPERM).
            if errno_of(libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0)) != libc::EPERM {
                return 2;
            }
            if errno_of(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWNS)) != libc::EPERM {
                return 3;
            }
            // clone3 → ENOSYS, so that libcs fall back to clone.
            if errno_of(libc::syscall(libc::SYS_clone3, 0, 0)) != libc::ENOSYS {
                return 4;
            }
            // personality: querying (0xffffffff) is allowed, other personas are not.
            if libc::syscall(libc::SYS_personality, 0xffff_ffff_u64) < 0 {
                return 5;
            }
            if errno_of(libc::syscall(libc::SYS_personality, 0x0040_0000)) != libc::EPERM {
                return 6;
            }
            // clone with a namespace flag is refused by MASKED_EQ.
            let r = libc::syscall(
                libc::SYS_clone,
                (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_long,
                0,
            );
            if r == 0 {
                libc::_exit(0);
            }
            if errno_of(r) != libc::EPERM {
                return 7;
            }
            // A plain fork-like clone is allowed.
            let r = libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0);
            if r == 0 {
                libc::_exit(0);
            }
            if r < 0 {
                return 8;
            }
            let mut status = 0;
            if libc::waitpid(r as libc::pid_t, &mut status, 0) != r as libc::pid_t {
                return 9;
            }
            // socket: AF_VSOCK (40) gets EAFNOSUPPORT (97); AF_UNIX works.
            if errno_of(libc::syscall(libc::SYS_socket, 40, libc::SOCK_STREAM, 0))
                != libc::EAFNOSUPPORT
            {
                return 10;
            }
            let fd = libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if fd < 0 {
                return 11;
            }
            libc::syscall(libc::SYS_close, fd);
        }
        0
    }
    assert_eq!(in_child(&prog, check), Outcome::Exited(0));
}

#[test]
fn unsupported_actions_are_refused_before_anything_is_installed() {
    let e = seccomp::compile(&profile(
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["getpid"], "action": "SCMP_ACT_TRACE"}]}"#,
    ))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "seccomp action SCMP_ACT_TRACE is not supported yet"
    );
}

/// An i386 system call from this 64-bit process (`int 0x80`), as a 32-bit program makes it.
fn int80(nr: i32) -> i32 {
    let ret: i32;
    // SAFETY: `int 0x80` enters the kernel's i386 entry with the call number in eax and no
    // arguments used by the calls tested here; the kernel returns in eax and zeroes r8-r11.
    unsafe {
        std::arch::asm!(
            "int 0x80",
            inlateout("eax") nr => ret,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _,
            options(nostack)
        );
    }
    ret
}

const I386_GETPID: i32 = 20;
const I386_GETPPID: i32 = 64;

#[test]
fn i386_calls_follow_the_i386_table_or_are_killed() {
    // Does this kernel run i386 calls at all (IA32_EMULATION)? Ask in a child: without it
    // `int 0x80` kills the caller.
    let allow_all = seccomp::compile(&profile(r#"{"defaultAction": "SCMP_ACT_ALLOW"}"#)).unwrap();
    fn probe() -> i32 {
        // SAFETY: getpid has no arguments.
        if i64::from(int80(I386_GETPID)) == unsafe { libc::syscall(libc::SYS_getpid) } {
            0
        } else {
            1
        }
    }
    let with_x86 = seccomp::compile(&profile(
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"], "syscalls": []}"#,
    ))
    .unwrap();
    if in_child(&with_x86, probe) != Outcome::Exited(0) {
        eprintln!("SKIPPED: this kernel does not run i386 system calls");
        return;
    }
    // A profile without SCMP_ARCH_X86 kills i386 calls, even with an ALLOW default.
    assert_eq!(in_child(&allow_all, probe), Outcome::Signaled(libc::SIGSYS));
    let prog = seccomp::compile(&profile(
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
            "syscalls": [{"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 99}]}"#,
    ))
    .unwrap();
    fn check() -> i32 {
        if int80(I386_GETPID) != -99 {
            return 1;
        }
        // SAFETY: getpid has no arguments.
        if errno_of(unsafe { libc::syscall(libc::SYS_getpid) }) != 99 {
            return 2;
        }
        if int80(I386_GETPPID) <= 0 {
            return 3;
        }
        0
    }
    assert_eq!(in_child(&prog, check), Outcome::Exited(0));
}
