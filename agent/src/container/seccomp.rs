//! OCI seccomp profiles → one classic-BPF program for x86_64.
//!
//! seccompiler's [`SeccompFilter`](seccompiler::SeccompFilter) has one action for every rule,
//! but an OCI profile gives each syscall group its own (Docker's default allows most calls and
//! answers `clone3` with `ENOSYS`). So [`compile`] lays out the program itself and uses
//! seccompiler for what it does well, the argument conditions: each OCI rule becomes a
//! [`SeccompRule`] of [`SeccompCondition`]s, compiled by seccompiler, followed by the rule's
//! own return.
//!
//! The program:
//! 1. The architecture: x86_64, and i386 when the profile lists `SCMP_ARCH_X86` (the guest
//!    kernel has `IA32_EMULATION`; i386 names are looked up in the i386 table and get a section
//!    of their own). Any other architecture, and an x32 syscall number (bit 30) under x86_64,
//!    → `KILL_PROCESS`, as libseccomp does for an architecture that is not in the filter
//!    (`SCMP_ARCH_X32` entries are accepted and ignored with a log).
//! 2. A binary tree of `JGE` over the sorted syscall numbers, with runs of at most 8 `JEQ` at
//!    its leaves: a call costs ~6 levels, not one comparison per syscall of the profile.
//! 3. Per syscall: its rules in profile order; the first whose conditions all hold returns its
//!    action; none → the default action. Any syscall not in the profile → the default action.
//!
//! Rules whose action is the default action are kept: runc drops them (libseccomp refuses
//! them), which lets a later rule for the same syscall allow a call that an earlier rule
//! denied; here the earlier rule wins. Unknown syscall names are skipped with a debug log
//! (Docker's profile names calls newer than some kernels and libraries). Several conditions on
//! the same argument index become alternatives (one rule each), as runc does; otherwise a
//! rule's conditions must all hold.

use std::collections::BTreeMap;
use std::str::FromStr;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag,
    LinuxSeccompOperator,
};
use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompRule,
};
use syscalls::x86_64::Sysno;

use crate::sys;

/// The errno of `SCMP_ACT_ERRNO` without `errnoRet`.
pub const DEFAULT_ERRNO: u32 = libc::EPERM as u32;

/// The largest program the kernel loads (`BPF_MAXINSNS`).
pub const MAX_INSTRUCTIONS: usize = 4096;

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const SECCOMP_DATA_NR_OFFSET: u32 = 0;
const SECCOMP_DATA_ARCH_OFFSET: u32 = 4;

// Classic BPF opcodes (`<linux/bpf_common.h>`): class | size | mode or class | op | source.
/// `BPF_LD | BPF_W | BPF_ABS` (BPF_LD and BPF_W are 0).
const BPF_LD_W_ABS: u16 = 0x20;
/// `BPF_JMP | BPF_JA`.
const BPF_JMP_JA: u16 = 0x05;
/// `BPF_JMP | BPF_JEQ | BPF_K`.
const BPF_JMP_JEQ_K: u16 = 0x15;
/// `BPF_JMP | BPF_JGE | BPF_K`.
const BPF_JMP_JGE_K: u16 = 0x35;
/// `BPF_RET | BPF_K`.
const BPF_RET_K: u16 = 0x06;

/// `SECCOMP_FILTER_FLAG_*` of `<linux/seccomp.h>`.
const SECCOMP_FILTER_FLAG_TSYNC: u32 = 1;
const SECCOMP_FILTER_FLAG_LOG: u32 = 2;
const SECCOMP_FILTER_FLAG_SPEC_ALLOW: u32 = 4;

/// Why a profile could not be compiled or applied.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// An action of the profile that the agent does not implement.
    #[error("seccomp action {0} is not supported yet")]
    UnsupportedAction(&'static str),
    /// A filter flag that the agent does not implement.
    #[error("seccomp flag {0} is not supported yet")]
    UnsupportedFlag(&'static str),
    /// The profile is for architectures that do not include x86_64.
    #[error("the profile's architectures ({0}) do not include x86_64")]
    NoNativeArch(String),
    /// An errno value outside 0..=4095.
    #[error("errnoRet {0} is outside 0..=4095")]
    InvalidErrno(u32),
    /// An argument condition that cannot be expressed.
    #[error("syscall {syscall}: argument condition {index}: {reason}")]
    InvalidArg {
        /// The syscall's name.
        syscall: String,
        /// The condition's position in `args`.
        index: usize,
        /// Why.
        reason: String,
    },
    /// seccompiler refused a rule.
    #[error("syscall {syscall}: cannot compile its conditions")]
    Rule {
        /// The syscall's name.
        syscall: String,
        /// The cause.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The program exceeds what the kernel loads.
    #[error("the seccomp program has {0} instructions, more than the kernel's limit of 4096")]
    TooLarge(usize),
    /// The kernel refused the program. `EACCES` means neither `no_new_privs` nor
    /// `CAP_SYS_ADMIN`.
    #[error("cannot install the seccomp filter (it needs no_new_privs or CAP_SYS_ADMIN)")]
    Apply(#[source] std::io::Error),
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// The seccompiler action for an OCI action; `errno` is the rule's `errnoRet`.
pub fn action(
    action: LinuxSeccompAction,
    errno: Option<u32>,
) -> Result<SeccompAction, SeccompError> {
    Ok(match action {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => {
            let errno = errno.unwrap_or(DEFAULT_ERRNO);
            if errno > 4095 {
                return Err(SeccompError::InvalidErrno(errno));
            }
            SeccompAction::Errno(errno)
        }
        // SECCOMP_RET_KILL was renamed KILL_THREAD; same value.
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActTrace => {
            return Err(SeccompError::UnsupportedAction("SCMP_ACT_TRACE"))
        }
        LinuxSeccompAction::ScmpActNotify => {
            return Err(SeccompError::UnsupportedAction("SCMP_ACT_NOTIFY"))
        }
    })
}

/// The seccompiler condition for one OCI argument condition. Arguments are compared as
/// 64-bit values, as libseccomp does on a 64-bit architecture. `MASKED_EQ` is
/// `(arg & value) == valueTwo`.
pub fn condition(arg: &LinuxSeccompArg) -> Result<SeccompCondition, String> {
    let index = u8::try_from(arg.index())
        .ok()
        .filter(|&i| i <= 5)
        .ok_or_else(|| format!("argument index {} is outside 0..=5", arg.index()))?;
    let (op, value) = match arg.op() {
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            let mask = arg.value();
            let expected = arg.value_two().unwrap_or(0);
            // seccompiler masks the expected value too; libseccomp would never match then.
            if expected & !mask != 0 {
                return Err(format!(
                    "MASKED_EQ valueTwo {expected:#x} has bits outside the mask {mask:#x} and can never match"
                ));
            }
            (SeccompCmpOp::MaskedEq(mask), expected)
        }
    };
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value).map_err(|e| e.to_string())
}

/// The rules for one OCI syscall entry's `args`: none → unconditional; distinct indexes → one
/// rule with all conditions; a repeated index → one rule per condition (alternatives), as runc.
fn rules_for(name: &str, args: &[LinuxSeccompArg]) -> Result<Vec<SeccompRule>, SeccompError> {
    let conditions = args
        .iter()
        .enumerate()
        .map(|(i, arg)| {
            condition(arg).map_err(|reason| SeccompError::InvalidArg {
                syscall: name.to_string(),
                index: i,
                reason,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if conditions.is_empty() {
        return Ok(Vec::new());
    }
    let mut per_index = [0usize; 6];
    for arg in args {
        // Checked by `condition` above.
        per_index[arg.index()] += 1;
    }
    let groups: Vec<Vec<SeccompCondition>> = if per_index.iter().any(|&n| n > 1) {
        conditions.into_iter().map(|c| vec![c]).collect()
    } else {
        vec![conditions]
    };
    groups
        .into_iter()
        .map(|g| {
            SeccompRule::new(g).map_err(|source| SeccompError::Rule {
                syscall: name.to_string(),
                source,
            })
        })
        .collect()
}

/// One syscall's rules in order: `None` conditions is unconditional.
type Chain = Vec<(Option<SeccompRule>, SeccompAction)>;

/// Syscalls per leaf of the dispatch tree: below this a linear run of comparisons is shorter.
const LEAF_SYSCALLS: usize = 8;

/// Compiles an OCI seccomp profile into a BPF program for x86_64 (see the module doc for the
/// layout and the semantics). The flags are separate: [`filter_flags`].
pub fn compile(spec: &LinuxSeccomp) -> Result<BpfProgram, SeccompError> {
    compile_with_leaf(spec, LEAF_SYSCALLS)
}

fn compile_with_leaf(spec: &LinuxSeccomp, leaf: usize) -> Result<BpfProgram, SeccompError> {
    let with_i386 = check_architectures(spec)?;
    if spec.listener_path().is_some() {
        log::debug!("seccomp listenerPath ignored: SCMP_ACT_NOTIFY is not supported");
    }
    let default = action(spec.default_action(), spec.default_errno_ret())?;
    let default_ret = u32::from(default);
    let kill = u32::from(SeccompAction::KillProcess);
    let leaf = leaf.max(1);

    let x86_64_nr = |name: &str| {
        Sysno::from_str(name)
            .ok()
            .and_then(|s| u32::try_from(s.id()).ok())
    };
    // x86_64: the number, refusing x32 numbers (bit 30), then the dispatch.
    let mut native = vec![
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR_OFFSET),
        jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(BPF_RET_K, kill),
    ];
    dispatch(
        &bodies(spec, x86_64_nr, default_ret)?,
        default_ret,
        leaf,
        &mut native,
    );

    let mut prog = vec![stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH_OFFSET)];
    if with_i386 {
        let i386_nr = |name: &str| {
            syscalls::x86::Sysno::from_str(name)
                .ok()
                .and_then(|s| u32::try_from(s.id()).ok())
        };
        let mut i386 = vec![stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR_OFFSET)];
        dispatch(
            &bodies(spec, i386_nr, default_ret)?,
            default_ret,
            leaf,
            &mut i386,
        );
        // i386: jump over the x86_64 check, its kill and the x86_64 section.
        prog.push(jump(BPF_JMP_JEQ_K, AUDIT_ARCH_I386, 0, 1));
        prog.push(stmt(BPF_JMP_JA, len_u32(2 + native.len())));
        prog.push(jump(BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64, 1, 0));
        prog.push(stmt(BPF_RET_K, kill));
        prog.extend(native);
        prog.extend(i386);
    } else {
        prog.push(jump(BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64, 1, 0));
        prog.push(stmt(BPF_RET_K, kill));
        prog.extend(native);
    }
    if prog.len() > MAX_INSTRUCTIONS {
        return Err(SeccompError::TooLarge(prog.len()));
    }
    Ok(prog)
}

/// The code of each syscall of the profile that `number` knows (an architecture's table),
/// sorted by number. Names it does not know are skipped.
fn bodies(
    spec: &LinuxSeccomp,
    number: impl Fn(&str) -> Option<u32>,
    default_ret: u32,
) -> Result<Vec<(u32, Vec<sock_filter>)>, SeccompError> {
    let mut chains: BTreeMap<u32, Chain> = BTreeMap::new();
    for entry in spec.syscalls().as_deref().unwrap_or_default() {
        let entry_action = action(entry.action(), entry.errno_ret())?;
        for name in entry.names() {
            let Some(nr) = number(name) else {
                log::debug!("seccomp: unknown syscall {name:?} skipped");
                continue;
            };
            let rules = rules_for(name, entry.args().as_deref().unwrap_or_default())?;
            let chain = chains.entry(nr).or_default();
            // After an unconditional rule nothing else of this syscall is reachable.
            if chain.iter().any(|(rule, _)| rule.is_none()) {
                continue;
            }
            if rules.is_empty() {
                chain.push((None, entry_action.clone()));
            } else {
                chain.extend(rules.into_iter().map(|r| (Some(r), entry_action.clone())));
            }
        }
    }
    Ok(chains
        .into_iter()
        .map(|(nr, chain)| (nr, chain_code(chain, default_ret)))
        .collect())
}

/// One syscall's rules, each followed by its return; the default action if none matched.
fn chain_code(chain: Chain, default_ret: u32) -> Vec<sock_filter> {
    let mut body = Vec::new();
    for (rule, act) in chain {
        match rule {
            // seccompiler's rule code falls through on a match and jumps over the one
            // instruction after it otherwise: that instruction is the rule's return.
            Some(rule) => body.extend(BpfProgram::from(rule)),
            None => {
                body.push(stmt(BPF_RET_K, u32::from(act)));
                return body;
            }
        }
        body.push(stmt(BPF_RET_K, u32::from(act)));
    }
    body.push(stmt(BPF_RET_K, default_ret));
    body
}

/// The syscall-number dispatch, with the number in the accumulator: a binary tree of `JGE`
/// over the sorted numbers, linear `JEQ` runs of at most `leaf` syscalls at its leaves. Every
/// path ends in a return, so subtrees need no join. Conditional jumps have 8-bit offsets:
/// long ones go through `JA` (32-bit).
fn dispatch(
    bodies: &[(u32, Vec<sock_filter>)],
    default_ret: u32,
    leaf: usize,
    prog: &mut BpfProgram,
) {
    if bodies.len() <= leaf {
        for (nr, body) in bodies {
            prog.push(jump(BPF_JMP_JEQ_K, *nr, 1, 0));
            prog.push(stmt(BPF_JMP_JA, len_u32(body.len())));
            prog.extend(body.iter().cloned());
        }
        prog.push(stmt(BPF_RET_K, default_ret));
        return;
    }
    let (low, high) = bodies.split_at(bodies.len() / 2);
    let mut low_code = Vec::new();
    dispatch(low, default_ret, leaf, &mut low_code);
    // nr >= pivot: the JA to the high half; below: skip it into the low half.
    prog.push(jump(BPF_JMP_JGE_K, high[0].0, 0, 1));
    prog.push(stmt(BPF_JMP_JA, len_u32(low_code.len())));
    prog.extend(low_code);
    dispatch(high, default_ret, leaf, prog);
}

fn len_u32(len: usize) -> u32 {
    // A program is at most 4096 instructions (checked by the caller); a longer one is refused
    // before it reaches the kernel, so saturating here cannot produce a wrong jump that loads.
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Checks that x86_64 is among the profile's architectures (an empty list means the native
/// one); returns whether i386 (`SCMP_ARCH_X86`) is too.
fn check_architectures(spec: &LinuxSeccomp) -> Result<bool, SeccompError> {
    let Some(archs) = spec.architectures().as_ref().filter(|a| !a.is_empty()) else {
        return Ok(false);
    };
    let mut native = false;
    let mut i386 = false;
    for arch in archs {
        match arch {
            Arch::ScmpArchX86_64 | Arch::ScmpArchNative => native = true,
            Arch::ScmpArchX86 => i386 = true,
            Arch::ScmpArchX32 => {
                log::debug!("seccomp architecture {arch} ignored: x32 system calls are killed")
            }
            other => log::debug!("seccomp architecture {other} ignored: not this machine's"),
        }
    }
    if native {
        Ok(i386)
    } else {
        let names: Vec<String> = archs.iter().map(ToString::to_string).collect();
        Err(SeccompError::NoNativeArch(names.join(", ")))
    }
}

/// The `SECCOMP_FILTER_FLAG_*` bits for the profile's `flags`: `LOG`, `SPEC_ALLOW` and `TSYNC`
/// are passed to seccomp(2); `WAIT_KILLABLE_RECV` belongs to `SCMP_ACT_NOTIFY` and is refused.
pub fn filter_flags(spec: &LinuxSeccomp) -> Result<u32, SeccompError> {
    let mut bits = 0;
    for flag in spec.flags().as_deref().unwrap_or_default() {
        bits |= match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => SECCOMP_FILTER_FLAG_SPEC_ALLOW,
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => SECCOMP_FILTER_FLAG_TSYNC,
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {
                return Err(SeccompError::UnsupportedFlag(
                    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
                ))
            }
        };
    }
    Ok(bits)
}

/// Installs the program on the calling thread; it is inherited across fork(2) and execve(2).
/// Call it as the last step before execve(2): every later syscall of the caller is filtered.
///
/// Unlike `seccompiler::apply_filter`, this does not set `no_new_privs`: that is the OCI
/// process's own `noNewPrivileges` setting (a container without it may run setuid binaries
/// under Docker's default profile). The kernel accepts the filter only with `no_new_privs` set
/// or with `CAP_SYS_ADMIN` in the caller's user namespace: apply it before dropping that
/// capability, or set `no_new_privs` first.
pub fn apply(prog: &BpfProgram) -> Result<(), SeccompError> {
    apply_with_flags(prog, 0)
}

/// [`apply`] with `SECCOMP_FILTER_FLAG_*` bits, usually the profile's [`filter_flags`].
pub fn apply_with_flags(prog: &BpfProgram, flags: u32) -> Result<(), SeccompError> {
    sys::seccomp_set_mode_filter(prog, flags).map_err(SeccompError::Apply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).unwrap()
    }

    /// A classic-BPF interpreter for the instructions our programs use; panics on others.
    fn run(prog: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = Vec::new();
        data.extend(nr.to_le_bytes());
        data.extend(arch.to_le_bytes());
        data.extend(0u64.to_le_bytes());
        for a in args {
            data.extend(a.to_le_bytes());
        }
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = &prog[pc];
            let k = i.k;
            pc += 1;
            let cond = |taken: bool| usize::from(if taken { i.jt } else { i.jf });
            match i.code {
                0x20 => {
                    let o = k as usize;
                    acc = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                }
                0x54 => acc &= k,
                0x05 => pc += k as usize,
                0x15 => pc += cond(acc == k),
                0x25 => pc += cond(acc > k),
                0x35 => pc += cond(acc >= k),
                0x45 => pc += cond(acc & k != 0),
                0x06 => return k,
                other => panic!("opcode {other:#x} at {}", pc - 1),
            }
        }
    }

    const DOCKER: &str = include_str!("../../tests/fixtures/docker-default-seccomp.json");

    #[test]
    fn dispatch_tree_answers_like_a_linear_scan() {
        for json in [
            DOCKER,
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["close"],"action":"SCMP_ACT_ERRNO","errnoRet":77,
                 "args":[{"index":0,"value":1000,"op":"SCMP_CMP_LT"},{"index":2,"value":5,"op":"SCMP_CMP_LE"}]},
                {"names":["read","write","openat","mmap","dup","exit"],"action":"SCMP_ACT_LOG"},
                {"names":["dup"],"action":"SCMP_ACT_TRAP","args":[{"index":0,"value":40,"op":"SCMP_CMP_GT"}]}]}"#,
        ] {
            let spec = profile(json);
            let linear = compile_with_leaf(&spec, usize::MAX).unwrap();
            let arg_sets = [
                [0u64; 6],
                [40, 1, 2, 3, 4, 5],
                [999, 0, 5, 0, 0, 0],
                [1000, 0, 6, 0, 0, 0],
                [0x7e02_0000 | 17, 0, 0, 0, 0, 0],
                [0xffff_ffff, 0, 0, 0, 0, 0],
                [1 << 40, u64::MAX, 0, 0, 0, 0],
            ];
            for leaf in [2, 3, LEAF_SYSCALLS] {
                let tree = compile_with_leaf(&spec, leaf).unwrap();
                // The small profile has 6 syscalls: a leaf of 8 holds them all.
                assert!(tree != linear || (leaf == LEAF_SYSCALLS && json != DOCKER));
                for nr in 0..=470 {
                    for (arch, args) in arg_sets
                        .iter()
                        .flat_map(|a| [(AUDIT_ARCH_X86_64, *a), (AUDIT_ARCH_I386, *a)])
                    {
                        assert_eq!(
                            run(&tree, arch, nr, args),
                            run(&linear, arch, nr, args),
                            "leaf {leaf} arch {arch:#x} nr {nr} args {args:?}"
                        );
                    }
                }
            }
        }
        let docker = compile(&profile(DOCKER)).unwrap();
        let x86 = |nr: u32| run(&docker, AUDIT_ARCH_X86_64, nr, [0; 6]);
        assert_eq!(x86(libc::SYS_write as u32), 0x7fff_0000);
        assert_eq!(x86(libc::SYS_keyctl as u32), 0x0005_0001);
        assert_eq!(x86(libc::SYS_clone3 as u32), 0x0005_0000 | 38);
        assert_eq!(x86(1000), 0x0005_0001);
        // The profile lists SCMP_ARCH_X86: i386 calls go by the i386 table.
        let i386 = |nr: u32| run(&docker, AUDIT_ARCH_I386, nr, [0; 6]);
        assert_eq!(i386(20), 0x7fff_0000); // getpid
        assert_eq!(i386(288), 0x0005_0001); // keyctl
        assert_eq!(i386(435), 0x0005_0000 | 38); // clone3
        assert_eq!(i386(120), 0x7fff_0000); // clone without namespace flags
        let new_user = [u64::from(libc::CLONE_NEWUSER as u32) | 17, 0, 0, 0, 0, 0];
        assert_eq!(run(&docker, AUDIT_ARCH_I386, 120, new_user), 0x0005_0001);
        // x32 numbers and other architectures are killed.
        assert_eq!(x86(X32_SYSCALL_BIT | 1), 0x8000_0000);
        assert_eq!(run(&docker, 0xc000_00b7, 1, [0; 6]), 0x8000_0000);
        // Without SCMP_ARCH_X86 in the list, i386 calls are killed.
        let native_only = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"]}"#,
        ))
        .unwrap();
        assert_eq!(run(&native_only, AUDIT_ARCH_I386, 20, [0; 6]), 0x8000_0000);
        assert_eq!(
            run(&native_only, AUDIT_ARCH_X86_64, 20, [0; 6]),
            0x7fff_0000
        );
    }

    #[test]
    fn actions_map() {
        assert_eq!(
            action(LinuxSeccompAction::ScmpActAllow, None).unwrap(),
            SeccompAction::Allow
        );
        assert_eq!(
            action(LinuxSeccompAction::ScmpActErrno, None).unwrap(),
            SeccompAction::Errno(libc::EPERM as u32)
        );
        assert_eq!(
            action(LinuxSeccompAction::ScmpActErrno, Some(38)).unwrap(),
            SeccompAction::Errno(38)
        );
        assert!(matches!(
            action(LinuxSeccompAction::ScmpActErrno, Some(70_000)),
            Err(SeccompError::InvalidErrno(70_000))
        ));
        assert_eq!(
            action(LinuxSeccompAction::ScmpActKill, None).unwrap(),
            SeccompAction::KillThread
        );
        assert_eq!(
            action(LinuxSeccompAction::ScmpActKillThread, None).unwrap(),
            SeccompAction::KillThread
        );
        assert_eq!(
            action(LinuxSeccompAction::ScmpActKillProcess, None).unwrap(),
            SeccompAction::KillProcess
        );
        assert_eq!(
            action(LinuxSeccompAction::ScmpActTrap, None).unwrap(),
            SeccompAction::Trap
        );
        assert_eq!(
            action(LinuxSeccompAction::ScmpActLog, None).unwrap(),
            SeccompAction::Log
        );
        let err = action(LinuxSeccompAction::ScmpActTrace, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "seccomp action SCMP_ACT_TRACE is not supported yet"
        );
        assert!(matches!(
            action(LinuxSeccompAction::ScmpActNotify, None),
            Err(SeccompError::UnsupportedAction("SCMP_ACT_NOTIFY"))
        ));
    }

    #[test]
    fn conditions_map_and_bad_ones_fail() {
        let arg = |json: &str| -> LinuxSeccompArg { serde_json::from_str(json).unwrap() };
        for op in [
            "SCMP_CMP_NE",
            "SCMP_CMP_LT",
            "SCMP_CMP_LE",
            "SCMP_CMP_EQ",
            "SCMP_CMP_GE",
            "SCMP_CMP_GT",
        ] {
            assert!(
                condition(&arg(&format!(r#"{{"index":1,"value":5,"op":"{op}"}}"#))).is_ok(),
                "{op}"
            );
        }
        assert!(condition(&arg(
            r#"{"index":0,"value":255,"valueTwo":8,"op":"SCMP_CMP_MASKED_EQ"}"#
        ))
        .is_ok());
        let err = condition(&arg(
            r#"{"index":0,"value":255,"valueTwo":256,"op":"SCMP_CMP_MASKED_EQ"}"#,
        ))
        .unwrap_err();
        assert!(err.contains("outside the mask"), "{err}");
        let err = condition(&arg(r#"{"index":6,"value":1,"op":"SCMP_CMP_EQ"}"#)).unwrap_err();
        assert!(err.contains("outside 0..=5"), "{err}");
        // An unknown operator does not even deserialize.
        assert!(serde_json::from_str::<LinuxSeccompArg>(
            r#"{"index":0,"value":1,"op":"SCMP_CMP_XX"}"#
        )
        .is_err());
    }

    #[test]
    fn bad_arg_index_is_an_error_naming_the_syscall() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["personality"],"action":"SCMP_ACT_ERRNO","args":[{"index":9,"value":0,"op":"SCMP_CMP_EQ"}]}]}"#,
        );
        let err = compile(&p).unwrap_err();
        assert!(
            matches!(err, SeccompError::InvalidArg { ref syscall, index: 0, .. } if syscall == "personality")
        );
    }

    #[test]
    fn unknown_names_are_skipped() {
        let with = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
                {"names":["getpid","no_such_syscall_xyz"],"action":"SCMP_ACT_ALLOW"}]}"#,
        );
        let without = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["getpid"],"action":"SCMP_ACT_ALLOW"}]}"#,
        );
        assert_eq!(compile(&with).unwrap(), compile(&without).unwrap());
    }

    #[test]
    fn layout_of_a_small_profile() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["getpid"],"action":"SCMP_ACT_ERRNO","errnoRet":38}]}"#,
        );
        let prog = compile(&p).unwrap();
        // 6 header + JEQ + JA + RET + final RET.
        assert_eq!(prog.len(), 10);
        assert_eq!(prog[6].k, libc::SYS_getpid as u32);
        assert_eq!(prog[8].code, BPF_RET_K);
        assert_eq!(prog[8].k, 0x0005_0000 | 38);
        assert_eq!(prog[9].k, 0x7fff_0000);
    }

    #[test]
    fn rules_with_the_default_action_are_kept_and_win_when_first() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
                {"names":["getpid"],"action":"SCMP_ACT_ERRNO"},
                {"names":["getpid"],"action":"SCMP_ACT_ALLOW"}]}"#,
        );
        let prog = compile(&p).unwrap();
        // 6 header + JEQ + JA + RET(errno) + final RET: the ALLOW after it is unreachable.
        assert_eq!(prog.len(), 10);
        assert_eq!(prog[8].k, 0x0005_0000 | libc::EPERM as u32);
    }

    #[test]
    fn architectures_and_flags() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86","SCMP_ARCH_X32"]}"#,
        );
        assert!(compile(&p).is_ok());
        let p =
            profile(r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_AARCH64"]}"#);
        assert!(matches!(compile(&p), Err(SeccompError::NoNativeArch(_))));
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","flags":["SECCOMP_FILTER_FLAG_LOG","SECCOMP_FILTER_FLAG_SPEC_ALLOW"]}"#,
        );
        assert_eq!(filter_flags(&p).unwrap(), 6);
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","flags":["SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"]}"#,
        );
        assert!(matches!(
            filter_flags(&p),
            Err(SeccompError::UnsupportedFlag(_))
        ));
        let p = profile(r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#);
        assert!(matches!(
            compile(&p),
            Err(SeccompError::UnsupportedAction("SCMP_ACT_NOTIFY"))
        ));
    }

    #[test]
    fn repeated_index_gives_alternatives() {
        let args: Vec<LinuxSeccompArg> = serde_json::from_str(
            r#"[{"index":0,"value":0,"op":"SCMP_CMP_EQ"},{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]"#,
        )
        .unwrap();
        assert_eq!(rules_for("personality", &args).unwrap().len(), 2);
        let args: Vec<LinuxSeccompArg> = serde_json::from_str(
            r#"[{"index":0,"value":0,"op":"SCMP_CMP_EQ"},{"index":1,"value":8,"op":"SCMP_CMP_EQ"}]"#,
        )
        .unwrap();
        assert_eq!(rules_for("x", &args).unwrap().len(), 1);
    }
}
