/*
 * test-init: a static /init for measuring and checking the guest kernel.
 * Build: musl-gcc -static -O2 -o test-init test-init.c
 *
 * Prints "INIT_MARKER uptime=<s>" on the console as its first action, then
 * does what the first word of its arguments or NUTSHELL_TEST says:
 *   poweroff (default)  reboot(RB_POWER_OFF)
 *   reboot              reboot(RB_AUTOBOOT)
 *   panic               exits, so the kernel panics ("Attempted to kill init")
 *   features            checks what a pod needs (mounts, namespaces, cgroup v2
 *                       controllers, seccomp, sockets, ptys, scripts, int 0x80,
 *                       timers), prints one line per check and "FEATURES ok=N
 *                       failed=M", then powers off
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/fanotify.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif

static int ok, failed;

static void cpuid(unsigned leaf, unsigned sub, unsigned r[4])
{
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

/* What CPUID tells user space for the bits the VMM may hide. */
static void print_cpuid(void)
{
    static const struct { const char *name; unsigned leaf, reg, bit; } f[] = {
        {"popcnt", 1, 2, 23}, {"cx16", 1, 2, 13}, {"xsave", 1, 2, 26}, {"pcid", 1, 2, 17},
        {"x2apic", 1, 2, 21}, {"fsgsbase", 7, 1, 0}, {"smep", 7, 1, 7}, {"erms", 7, 1, 9},
        {"invpcid", 7, 1, 10}, {"smap", 7, 1, 20}, {"clflushopt", 7, 1, 23}, {"clwb", 7, 1, 24},
        {"pku", 7, 2, 3}, {"rdpid", 7, 2, 22}, {"fsrm", 7, 3, 4}, {"avx2", 7, 1, 5},
    };
    char line[512]; int n = snprintf(line, sizeof line, "CPUID visible:");
    for (unsigned i = 0; i < sizeof f / sizeof f[0]; i++) {
        unsigned r[4]; cpuid(f[i].leaf, 0, r);
        if (r[f[i].reg] >> f[i].bit & 1) n += snprintf(line + n, sizeof line - n, " %s", f[i].name);
    }
    snprintf(line + n, sizeof line - n, "\n");
    write(1, line, strlen(line));
}

static void check(const char *what, int good, const char *detail)
{
    if (good) ok++; else failed++;
    printf("%s %s%s%s%s\n", good ? "ok  " : "FAIL", what, detail ? " (" : "",
           detail ? detail : "", detail ? ")" : "");
    fflush(stdout);
}
#define CHECK(what, expr) do { errno = 0; int _g = (expr); check(what, _g, _g ? NULL : strerror(errno)); } while (0)

static int write_file(const char *path, const char *s)
{
    int fd = open(path, O_WRONLY);
    if (fd < 0) return -1;
    int r = write(fd, s, strlen(s)) == (ssize_t)strlen(s) ? 0 : -1;
    close(fd);
    return r;
}

static int read_file(const char *path, char *buf, size_t n)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    ssize_t r = read(fd, buf, n - 1);
    close(fd);
    if (r < 0) return -1;
    buf[r] = 0;
    return 0;
}

static int child_in_namespaces(void *arg)
{
    (void)arg;
    /* PID 1 of a new PID namespace, in new UTS/IPC/NET/mount/cgroup ns. */
    if (getpid() != 1) return 10;
    if (sethostname("pod", 3)) return 11;
    if (mount("none", "/", NULL, MS_REC | MS_PRIVATE, NULL)) return 12;
    if (mount("proc", "/mnt/proc", "proc", 0, NULL)) return 13;
    /* seccomp filter: make getppid fail with EPERM, allow the rest. */
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getppid, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = { .len = 4, .filter = f };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) return 14;
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog)) return 15;
    errno = 0;
    if (syscall(SYS_getppid) != -1 || errno != EPERM) return 16;
    return 0;
}

static long int80_getpid(void)
{
    long r;
    __asm__ volatile("int $0x80" : "=a"(r) : "a"(20L /* i386 getpid */) : "memory");
    return r;
}

static void features(const char *self)
{
    char buf[512];
    mkdir("/proc", 0755); mkdir("/sys", 0755); mkdir("/dev", 0755); mkdir("/tmp", 0755);
    CHECK("mount proc", mount("proc", "/proc", "proc", 0, NULL) == 0);
    CHECK("mount sysfs", mount("sysfs", "/sys", "sysfs", 0, NULL) == 0);
    CHECK("mount devtmpfs", mount("devtmpfs", "/dev", "devtmpfs", 0, NULL) == 0);
    CHECK("mount tmpfs", mount("tmpfs", "/tmp", "tmpfs", 0, "size=4m") == 0);
    mkdir("/sys/fs/cgroup", 0755);
    CHECK("mount cgroup2", mount("cgroup2", "/sys/fs/cgroup", "cgroup2", 0, NULL) == 0);
    CHECK("cgroup controllers", read_file("/sys/fs/cgroup/cgroup.controllers", buf, sizeof buf) == 0);
    buf[strcspn(buf, "\n")] = 0;
    printf("     controllers: %s\n", buf);
    CHECK("cgroup has cpuset cpu memory pids", strstr(buf, "cpuset") && strstr(buf, "cpu ") &&
          strstr(buf, "memory") && strstr(buf, "pids"));
    CHECK("cgroup subtree_control", write_file("/sys/fs/cgroup/cgroup.subtree_control", "+cpu +cpuset +memory +pids") == 0);
    CHECK("cgroup mkdir", mkdir("/sys/fs/cgroup/pod", 0755) == 0);
    CHECK("cgroup cpu.max (CFS bandwidth)", write_file("/sys/fs/cgroup/pod/cpu.max", "50000 100000") == 0);
    CHECK("cgroup memory.max", write_file("/sys/fs/cgroup/pod/memory.max", "16777216") == 0);
    CHECK("cgroup pids.max", write_file("/sys/fs/cgroup/pod/pids.max", "64") == 0);
    CHECK("cgroup freeze", write_file("/sys/fs/cgroup/pod/cgroup.freeze", "1") == 0 &&
          write_file("/sys/fs/cgroup/pod/cgroup.freeze", "0") == 0);
    /* overlayfs on tmpfs */
    mkdir("/tmp/l", 0755); mkdir("/tmp/u", 0755); mkdir("/tmp/w", 0755); mkdir("/tmp/m", 0755);
    CHECK("mount overlay", mount("overlay", "/tmp/m", "overlay", 0,
                                 "lowerdir=/tmp/l,upperdir=/tmp/u,workdir=/tmp/w") == 0);
    CHECK("fuse device", access("/dev/fuse", F_OK) == 0);
    mkdir("/dev/pts", 0755);
    CHECK("mount devpts", mount("devpts", "/dev/pts", "devpts", 0, "newinstance,ptmxmode=0666") == 0);
    CHECK("ptmx (UNIX98 pty)", open("/dev/pts/ptmx", O_RDWR | O_NOCTTY) >= 0);
    CHECK("AF_UNIX", socket(AF_UNIX, SOCK_STREAM, 0) >= 0);
    CHECK("AF_INET", socket(AF_INET, SOCK_STREAM, 0) >= 0);
    CHECK("AF_INET6", socket(AF_INET6, SOCK_STREAM, 0) >= 0);
    CHECK("AF_VSOCK", socket(AF_VSOCK, SOCK_STREAM, 0) >= 0);
    CHECK("epoll", epoll_create1(0) >= 0);
    CHECK("eventfd", eventfd(0, 0) >= 0);
    sigset_t ss; sigemptyset(&ss); sigaddset(&ss, SIGUSR1);
    CHECK("signalfd", signalfd(-1, &ss, 0) >= 0);
    CHECK("timerfd", timerfd_create(CLOCK_MONOTONIC, 0) >= 0);
    CHECK("inotify", inotify_init1(0) >= 0);
    CHECK("fanotify", fanotify_init(FAN_CLASS_NOTIF, O_RDONLY) >= 0);
    CHECK("flock", flock(open("/tmp", O_RDONLY), LOCK_EX) == 0);
    CHECK("POSIX timer", ({ timer_t t; timer_create(CLOCK_MONOTONIC, NULL, &t) == 0; }));
    CHECK("int $0x80 getpid", int80_getpid() == getpid());
    /* 1 ms sleep: needs high-resolution timers with HZ=20 */
    struct timespec a, b, d = {0, 1000000};
    clock_gettime(CLOCK_MONOTONIC, &a); nanosleep(&d, NULL); clock_gettime(CLOCK_MONOTONIC, &b);
    long us = (b.tv_sec - a.tv_sec) * 1000000 + (b.tv_nsec - a.tv_nsec) / 1000;
    snprintf(buf, sizeof buf, "took %ld us", us);
    check("nanosleep 1 ms < 20 ms", us < 20000, buf);
    printf("     nanosleep(1 ms) took %ld us\n", us);
    /* namespaces: user+pid+uts+ipc+net+mnt+cgroup in one clone, time via unshare */
    mkdir("/mnt", 0755); mkdir("/mnt/proc", 0755);
    static char stack[64 * 1024];
    int flags = CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET |
                CLONE_NEWNS | CLONE_NEWCGROUP | SIGCHLD;
    pid_t p = clone(child_in_namespaces, stack + sizeof stack, flags, NULL);
    int st = -1;
    if (p > 0) waitpid(p, &st, 0);
    snprintf(buf, sizeof buf, "clone=%d status=%d", p, st);
    check("namespaces user/pid/uts/ipc/net/mnt/cgroup + seccomp", p > 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0, buf);
    CHECK("time namespace", unshare(CLONE_NEWTIME) == 0);
    /* fork + exec of a #! script */
    int fd = open("/tmp/s.sh", O_WRONLY | O_CREAT, 0755);
    snprintf(buf, sizeof buf, "#!%s exit7\n", self);
    write(fd, buf, strlen(buf)); close(fd);
    p = fork();
    if (p == 0) { execl("/tmp/s.sh", "/tmp/s.sh", NULL); _exit(99); }
    waitpid(p, &st, 0);
    snprintf(buf, sizeof buf, "status=%d", st);
    check("fork + exec #! script", WIFEXITED(st) && WEXITSTATUS(st) == 7, buf);
    if (read_file("/proc/cpuinfo", buf, sizeof buf) == 0) {}
    int ncpu = 0; FILE *f = fopen("/proc/cpuinfo", "r"); char line[256];
    while (f && fgets(line, sizeof line, f)) if (!strncmp(line, "processor", 9)) ncpu++;
    printf("     cpus online: %d\n", ncpu);
    printf("FEATURES ok=%d failed=%d\n", ok, failed);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    struct timespec ts;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    /* When run as a #! interpreter: argv = {self, "exit7", script} */
    if (argc > 1 && !strcmp(argv[1], "exit7")) return 7;
    int con = open("/dev/console", O_WRONLY);
    if (con >= 0) { dup2(con, 1); dup2(con, 2); }
    char m[96];
    int n = snprintf(m, sizeof m, "INIT_MARKER uptime=%ld.%06ld\n", (long)ts.tv_sec, ts.tv_nsec / 1000);
    write(1, m, n);
    print_cpuid();
    const char *mode = getenv("NUTSHELL_TEST");
    for (int i = 1; i < argc && !mode; i++) mode = argv[i];
    if (!mode) mode = "poweroff";
    if (!strcmp(mode, "features")) features(argv[0]);
    if (!strcmp(mode, "panic")) return 1;
    if (!strcmp(mode, "reboot")) reboot(RB_AUTOBOOT);
    reboot(RB_POWER_OFF);
    printf("reboot() returned: %s\n", strerror(errno));
    for (;;) pause();
}
