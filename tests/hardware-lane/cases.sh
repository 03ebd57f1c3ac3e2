# The hardware-KVM lane's cases, in POSIX sh: sourced by l1-init.sh inside the L1 system
# (busybox) and by run.sh on this host (for the kvm_pvm figures beside L1's).
# Each prints HWLANE lines (format: src/lib.rs) that nutshell-hwlane turns into the report.
#
# Set before sourcing: LANE (l1|pvm), VMM, CTL, KERNEL, TEST_INITRD, AGENT_INITRD, WORK (an
# empty scratch directory), EXPECT_PROFILE (host|compat), VM_LIMIT (seconds one VM may take);
# optionally SKIP (case names not to run).
# shellcheck shell=sh

# The lane's cases: binding ones (a failure fails the lane) and informative ones (reported).
BINDING_CASES="boot-1vcpu agent-1vcpu template container"
INFORMATIVE_CASES="boot-2vcpu agent-2vcpu"

say() { echo "HWLANE $LANE $*"; }

# Seconds since boot, with hundredths (busybox and the host alike have /proc/uptime).
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# Waits up to $3 seconds for file $1 to contain the fixed string $2.
wait_for() {
    _i=0
    while [ "$_i" -lt $(($3 * 5)) ]; do
        grep -aqF "$2" "$1" 2>/dev/null && return 0
        sleep 0.2
        _i=$((_i + 1))
    done
    return 1
}

# Adds a problem to the current case's list.
problem() { PROBLEMS="${PROBLEMS:+$PROBLEMS; }$*"; }

# The checks every VM of this lane gets: the profile the VMM logged, and its XSAVE check.
check_vmm_log() { # LOG HOW(new|restored)
    grep -q "guest CPU profile: $EXPECT_PROFILE ($2 VM" "$1" ||
        problem "VMM did not log profile $EXPECT_PROFILE for a $2 VM: $(grep -m1 'CPU profile' "$1")"
    grep -q 'leaf 0xd is inconsistent' "$1" && problem "$(grep -m1 'inconsistent' "$1")"
    return 0
}

# Cold boot of the test init (default action: power off) with N vCPUs.
case_boot() { # N
    n=$1 d=$WORK/boot-$1vcpu
    rm -rf "$d" && mkdir -p "$d"
    t0=$(now)
    # nutshell_test.entry=1: the test init also reports how system calls enter the kernel and
    # the tick (check_entry).
    timeout -s KILL "$VM_LIMIT" "$VMM" --kernel "$KERNEL" --initrd "$TEST_INITRD" --vcpus "$n" \
        --memory-mib 128 --cpu-profile auto --cmdline nutshell_test.entry=1 \
        --console "$d/console" 2>"$d/vmm.log"
    rc=$?
    secs=$(since "$t0")
    [ "$rc" = 0 ] || problem "VMM exit status $rc (0 = guest powered off)"
    check_vmm_log "$d/vmm.log" new
    line=$(grep -a -m1 'NUTSHELL_TEST_INIT uptime=' "$d/console")
    if [ -z "$line" ]; then
        problem "no test init report on the console: $(tail -c 300 "$d/console" | tr '\n' '|')"
        return
    fi
    say note "boot-${n}vcpu: $(grep -m1 -o 'guest CPU profile: .*' "$d/vmm.log"); guest: ${line%% cmdline=*}"
    grep -a -m1 -o 'XSAVE consistency problem.*' "$d/console" | while IFS= read -r w; do
        say note "boot-${n}vcpu guest: $w"
    done
    say figure "boot-${n}vcpu.exit" "$secs"
    say figure "boot-${n}vcpu.init-uptime" "$(echo "$line" | sed -n 's/.* uptime=\([0-9.]*\) .*/\1/p')"
    case "$line" in *" cpus=$n "*) ;; *) problem "not $n CPUs online: $line" ;; esac
    check_entry "boot-${n}vcpu" "$d/console"
    if [ "$EXPECT_PROFILE" = host ]; then
        cmdline=" ${line#* cmdline=} "
        case "$cmdline" in *" nopv "*) problem "nopv on the host profile's cmdline" ;; esac
        case "$cmdline" in *clearcpuid=*) problem "clearcpuid= on the host profile's cmdline" ;; esac
        case "$line" in *clocksources=*kvm-clock*) ;; *) problem "no kvm-clock: $line" ;; esac
        # The VMM offers the TSC-deadline timer that KVM emulates (docs/vmm.md, CPU profiles).
        case "$line" in *features=*tsc_deadline_timer*) ;; *) problem "no tsc_deadline_timer: $line" ;; esac
        case "$line" in
            *" clocksource=kvm-clock "* | *" clocksource=tsc "*) ;;
            *) problem "clocksource is not kvm-clock or tsc: $line" ;;
        esac
    fi
}

# The test init's entry line (guest-kernel/README.md, "What the hardware-KVM lane shows"):
# a 64-bit `syscall` (getpid) made with EFLAGS.ID set, and a 32-bit `int $0x80` getpid, plain
# and with a DS prefix byte (in a child). Under hardware KVM the CPU executes both, so ID
# survives the syscall (patch 0004, which completes a SYSCALL delivered as a page fault, would
# have cleared it) and the prefixed int $0x80 works (patch 0005 matches only CD 80 at the
# faulting address, so a #UD-delivered prefixed int $0x80 gets SIGILL). On kvm_pvm both patches
# do fire, and the lane asserts that it sees them there (ID cleared, the prefixed form SIGILL):
# the check tells the two paths apart in every run. HZ is the coarse
# clock's resolution; its steps during a 0.5 s spin are the ticks the busy vCPU got.
check_entry() { # NAME CONSOLE
    entry=$(grep -a -m1 'NUTSHELL_TEST_INIT entry ' "$2" | tr -d '\r')
    if [ -z "$entry" ]; then
        problem "no entry line from the test init"
        return
    fi
    entry=${entry#*NUTSHELL_TEST_INIT entry }
    say note "$1 entry: $entry"
    field() { echo " $entry " | sed -n "s/.* $1=\([^ ]*\) .*/\1/p"; }
    [ "$(field syscall_getpid)" = ok ] || problem "syscall getpid: $(field syscall_getpid)"
    [ "$(field int80_getpid)" = ok ] || problem "int \$0x80 getpid: $(field int80_getpid)"
    [ "$(field hz)" = 20 ] || problem "HZ $(field hz), 20 expected (CONFIG_HZ_20)"
    if [ "$EXPECT_PROFILE" = host ]; then
        [ "$(field syscall_eflags_id)" = kept ] ||
            problem "EFLAGS.ID cleared by a syscall: patch 0004's path ran under hardware KVM"
        [ "$(field int80_prefixed_getpid)" = ok ] ||
            problem "prefixed int \$0x80: $(field int80_prefixed_getpid) (raised #UD under hardware KVM)"
    else
        [ "$(field syscall_eflags_id)" = cleared ] ||
            problem "EFLAGS.ID kept by a syscall on $EXPECT_PROFILE: patch 0004 did not run, or the check cannot see it"
        [ "$(field int80_prefixed_getpid)" = signal:4 ] ||
            problem "prefixed int \$0x80 on $EXPECT_PROFILE: $(field int80_prefixed_getpid), SIGILL (signal:4) expected"
    fi
}

# The agent cold-booted with N vCPUs: Health and Version, then Shutdown (the VMM exits 0).
# Waits for VMM $1, which was asked to shut its guest down (or terminated when the agent did not
# answer): its exit status must be 0, the guest powered off.
await_power_off() { # PID
    wait "$1"
    rc=$?
    [ "$rc" = 0 ] || problem "VMM exit status $rc after Shutdown (0 = guest powered off)"
}

case_agent() { # N
    n=$1 d=$WORK/agent-$1vcpu
    rm -rf "$d" && mkdir -p "$d"
    timeout -s KILL "$VM_LIMIT" "$VMM" --kernel "$KERNEL" --initrd "$AGENT_INITRD" --vcpus "$n" \
        --memory-mib 128 --cpu-profile auto --console "$d/console" --vsock-uds "$d/vsock" \
        2>"$d/vmm.log" &
    pid=$!
    if "$CTL" --uds "$d/vsock" version --timeout "$VM_LIMIT" >"$d/ctl.out" 2>&1; then
        health=$(sed -n 's/^agent health: .* (\([0-9.]*\) s after.*/\1/p' "$d/ctl.out")
        say figure "agent-${n}vcpu.health" "$health"
        grep -q '^agent version: .* guest kernel 6\.1' "$d/ctl.out" ||
            problem "Version: $(tr '\n' '|' <"$d/ctl.out")"
        "$CTL" --uds "$d/vsock" shutdown --timeout 30 >>"$d/ctl.out" 2>&1 ||
            problem "Shutdown: $(tail -1 "$d/ctl.out")"
    else
        problem "agent did not answer: $(tail -1 "$d/ctl.out")"
        kill -TERM "$pid" 2>/dev/null
    fi
    await_power_off "$pid"
    grep -q 'guest powered off' "$d/vmm.log" || problem "VMM did not log the power-off"
    check_vmm_log "$d/vmm.log" new
    if [ "$EXPECT_PROFILE" = host ]; then
        grep -aqE 'clocksource (kvm-clock|tsc)\)' "$d/console" ||
            problem "agent's clocksource: $(grep -a -m1 'serving on vsock' "$d/console")"
    fi
}

# A container through the agent API, as the shim drives it: a cold-booted agent (1 vCPU) with
# a virtio-fs shared directory holding a busybox root file system; `nutshell-agent-ctl sandbox`
# (CreateSandbox mounts the share at /run/shared) and `run` (CreateContainer, StartContainer,
# stdout and stderr over vsock, WaitProcess, RemoveContainer); then Shutdown.
case_container() {
    d=$WORK/container
    r=$d/shared/c1/rootfs
    rm -rf "$d" && mkdir -p "$r/bin" "$r/proc" "$r/dev" "$r/tmp" "$r/etc"
    cp /bin/busybox "$r/bin/busybox" && ln -s busybox "$r/bin/sh" && ln -s busybox "$r/bin/cat" ||
        { problem "cannot make the busybox root file system"; return; }
    echo "from the $LANE host" >"$r/etc/greeting"
    t_case=$(now)
    # The guest's view of the spec: its root under /run/shared (the VMM's --shared-dir).
    cat >"$d/config.json" <<'SPEC'
{
  "ociVersion": "1.0.2",
  "process": {
    "user": {"uid": 0, "gid": 0},
    "args": ["sh", "-c", "cat /etc/greeting; echo written-by-c1 >/tmp/from-container; echo pid=$$ >&2; exit 7"],
    "env": ["PATH=/bin"],
    "cwd": "/"
  },
  "root": {"path": "/run/shared/c1/rootfs", "readonly": false},
  "mounts": [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}
  ],
  "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]}
}
SPEC
    timeout -s KILL "$VM_LIMIT" "$VMM" --kernel "$KERNEL" --initrd "$AGENT_INITRD" --vcpus 1 \
        --memory-mib 128 --cpu-profile auto --console "$d/console" --vsock-uds "$d/vsock" \
        --shared-dir "$d/shared" 2>"$d/vmm.log" &
    pid=$!
    if "$CTL" --uds "$d/vsock" --timeout "$VM_LIMIT" sandbox --id lane >"$d/ctl.out" 2>&1; then
        say figure container.health "$(sed -n 's/^agent health: .* (\([0-9.]*\) s after.*/\1/p' "$d/ctl.out")"
        t0=$(now)
        "$CTL" --uds "$d/vsock" --timeout 60 run --id c1 --spec "$d/config.json" \
            >"$d/c1.out" 2>"$d/c1.err"
        rc=$?
        say figure container.run "$(since "$t0")"
        [ "$rc" = 7 ] || problem "agent-ctl run exit status $rc, the container's 7 expected: $(tr '\n' '|' <"$d/c1.err")"
        [ "$(cat "$d/c1.out")" = "from the $LANE host" ] ||
            problem "container stdout: $(tr '\n' '|' <"$d/c1.out")"
        grep -qx 'pid=1' "$d/c1.err" || problem "container stderr (pid=1 expected): $(tr '\n' '|' <"$d/c1.err")"
        grep -q 'container c1 exited with status 7 .*removed' "$d/c1.err" ||
            problem "no exit and removal from agent-ctl: $(tail -1 "$d/c1.err")"
        [ "$(cat "$r/tmp/from-container" 2>/dev/null)" = written-by-c1 ] ||
            problem "the container's file did not reach the shared directory"
        "$CTL" --uds "$d/vsock" shutdown --timeout 30 >>"$d/ctl.out" 2>&1 ||
            problem "Shutdown: $(tail -1 "$d/ctl.out")"
    else
        problem "agent did not create the sandbox: $(tail -1 "$d/ctl.out")"
        kill -TERM "$pid" 2>/dev/null
    fi
    await_power_off "$pid"
    check_vmm_log "$d/vmm.log" new
    say figure container.case "$(since "$t_case")"
}

# Template build, restore to Health, RefreshGuest (clock and entropy), then SIGTERM (exit 0).
case_template() {
    d=$WORK/template
    rm -rf "$d" && mkdir -p "$d"
    t0=$(now)
    # nutshell-template owns the cache and readiness; the VMM boots and snapshots (--api-sock).
    timeout -s KILL "$VM_LIMIT" "$TPL" --vmm "$VMM" --kernel "$KERNEL" --initrd "$AGENT_INITRD" \
        --vcpus 1 --memory-mib 128 --cpu-profile auto --cache "$d/cache" \
        >"$d/restore-args" 2>"$d/build.log" ||
        { problem "template build failed: $(tail -1 "$d/build.log")"; return; }
    say figure template.build "$(since "$t0")"
    # The template VM's log is kept in the template: DIR/vmm.log.
    check_vmm_log "$(sed -n 's/^--restore \([^ ]*\) .*/\1/p' "$d/restore-args")/vmm.log" new
    # shellcheck disable=SC2046 # the printed arguments: --restore DIR --template-key KEY
    timeout -s KILL "$VM_LIMIT" "$VMM" $(cat "$d/restore-args") --cpu-profile auto \
        --console "$d/console" --vsock-uds "$d/vsock" 2>"$d/vmm.log" &
    pid=$!
    if "$CTL" --uds "$d/vsock" refresh --timeout "$VM_LIMIT" >"$d/ctl.out" 2>&1; then
        health=$(sed -n 's/^agent health: .* (\([0-9.]*\) s after.*/\1/p' "$d/ctl.out")
        say figure template.restore-health "$health"
        grep -q 'guest clock and entropy refreshed' "$d/ctl.out" || problem "RefreshGuest"
    else
        problem "restored agent did not answer: $(tail -1 "$d/ctl.out")"
    fi
    grep -q 'restored .* in ' "$d/vmm.log" || problem "the VMM did not restore the template"
    check_vmm_log "$d/vmm.log" restored
    kill -TERM "$pid"
    wait "$pid"
    rc=$?
    [ "$rc" = 0 ] || problem "VMM exit status $rc after SIGTERM (0 expected)"
    grep -q 'received SIGTERM' "$d/vmm.log" || problem "VMM did not log the SIGTERM"
}

# After a failed attempt of case $1: the last lines of the VMM's log and of the guest console in
# the case's directory ($d), as notes, so that the report says how the VM ended (an emulator
# fault, a guest panic, a VMM error). Printable characters only: the guest wrote the console.
evidence() { # NAME ATTEMPT
    for f in build.log vmm.log console; do
        [ -s "$d/$f" ] || continue
        tail -c 4096 "$d/$f" | tr -d '\000-\011\013-\037\177' | grep -v '^ *$' | tail -n 8 | cut -c1-300 |
            while IFS= read -r l; do say note "$1 attempt $2 $f: $l"; done
    done
}

# Runs case $1 (a function and its arguments in $3...) as case name $2, up to $ATTEMPTS times
# until it passes.
run_case() { # ATTEMPTS NAME FUNCTION ARGS...
    attempts=$1 name=$2
    shift 2
    a=1
    while [ "$a" -le "$attempts" ]; do
        say start "$name" "attempt=$a"
        PROBLEMS=""
        "$@"
        if [ -z "$PROBLEMS" ]; then
            say case "$name" pass "attempt=$a"
            return 0
        fi
        say case "$name" fail "attempt=$a" -- "$PROBLEMS"
        evidence "$name" "$a"
        a=$((a + 1))
    done
    return 1
}

# Whether case $1 runs: not named in $SKIP (space-separated).
wanted() {
    case " ${SKIP:-} " in *" $1 "*) return 1 ;; esac
    return 0
}

# The lane's cases not named in $SKIP: binding cases (1 vCPU) first, then the informative ones
# (2 vCPUs, retried once), so that a run that hangs in a 2-vCPU case has reported the binding
# ones. (run.sh gives L1 the two kinds in boots of their own.)
run_lane() {
    binding="" informative=""
    for c in $BINDING_CASES; do wanted $c && binding="$binding,$c"; done
    for c in $INFORMATIVE_CASES; do wanted $c && informative="$informative,$c"; done
    say plan "binding=${binding#,}" "informative=${informative#,}"
    wanted boot-1vcpu && run_case 1 boot-1vcpu case_boot 1
    wanted agent-1vcpu && run_case 1 agent-1vcpu case_agent 1
    wanted template && run_case 1 template case_template
    # After the template: on kvm_pvm, whose run has a time limit, the older figures come first.
    wanted container && run_case 1 container case_container
    wanted boot-2vcpu && run_case 2 boot-2vcpu case_boot 2
    wanted agent-2vcpu && run_case 2 agent-2vcpu case_agent 2
    say done
}
