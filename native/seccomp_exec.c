/*
 * fc_seccomp_exec: install flashchat's tool-sandbox seccomp filter, then exec a program.
 *
 *     fc_seccomp_exec PROGRAM [ARGS...]          (infer/sandbox.py runs stage 2's python through it)
 *     fc_seccomp_exec --check                    (exit 0 when the kernel accepts the filter; prints nothing)
 *
 * Why a C program: a seccomp filter must be installed by the process that will run the code (it is inherited over
 * fork and execve and can never be removed), and building the BPF program with ctypes inside Python would be
 * more fragile than these few lines. infer/sandbox.py has already dropped to an unprivileged uid and set
 * PR_SET_NO_NEW_PRIVS when it execs this; we set no_new_privs again (required by the kernel for an unprivileged
 * filter) and never run anything but execve after the filter is in.
 *
 * The filter is a deny list (a Python interpreter uses too many syscalls for a short allow list to stay correct
 * across versions): the code keeps ordinary file, memory, process and AF_UNIX socket calls, and gets EPERM for
 *   - sockets of every family but AF_UNIX (the network, whatever the namespace setup achieved);
 *   - new namespaces (unshare, setns, clone/clone3 with CLONE_NEW* flags): no user namespace to regain
 *     capabilities in;
 *   - debugging and reading other processes (ptrace, process_vm_readv/writev, pidfd_getfd);
 *   - mounts and filesystem handles (mount, umount2, pivot_root, chroot, the new mount API, open_by_handle_at);
 *   - kernel surface rarely needed by user code and often used by exploits: bpf, perf_event_open, userfaultfd,
 *     io_uring, keyctl/add_key/request_key, kexec, modules, reboot, swap, clock setting, syslog, quotactl, acct.
 * A syscall of another ABI (x32 on x86-64, or another audit arch) kills the process.
 * Limits: a deny list cannot name syscalls added by newer kernels; everything not named above (including
 * plenty of kernel attack surface) stays reachable. See infer/sandbox.py's docstring for the other layers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/sched.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__)
#define FC_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define FC_AUDIT_ARCH AUDIT_ARCH_AARCH64
#else
#error "fc_seccomp_exec supports x86-64 and aarch64"
#endif

#define CLONE_NS_FLAGS (CLONE_NEWNS | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | \
                        CLONE_NEWCGROUP)

static const int denied[] = {
    SYS_ptrace, SYS_process_vm_readv, SYS_process_vm_writev, SYS_unshare, SYS_setns, SYS_mount, SYS_umount2,
    SYS_pivot_root, SYS_chroot, SYS_open_by_handle_at, SYS_name_to_handle_at, SYS_bpf, SYS_perf_event_open,
    SYS_userfaultfd, SYS_keyctl, SYS_add_key, SYS_request_key, SYS_kexec_load, SYS_init_module,
    SYS_finit_module, SYS_delete_module, SYS_reboot, SYS_swapon, SYS_swapoff, SYS_settimeofday,
    SYS_clock_settime, SYS_clock_adjtime, SYS_adjtimex, SYS_syslog, SYS_quotactl, SYS_acct, SYS_vhangup,
#ifdef SYS_kexec_file_load
    SYS_kexec_file_load,
#endif
#ifdef SYS_io_uring_setup
    SYS_io_uring_setup, SYS_io_uring_enter, SYS_io_uring_register,
#endif
#ifdef SYS_pidfd_getfd
    SYS_pidfd_getfd,
#endif
#ifdef SYS_fsopen
    SYS_fsopen, SYS_fsconfig, SYS_fsmount, SYS_fspick, SYS_open_tree, SYS_move_mount,
#endif
#ifdef SYS_mount_setattr
    SYS_mount_setattr,
#endif
#ifdef SYS_iopl
    SYS_iopl, SYS_ioperm,
#endif
};
#define NUM_DENIED ((int)(sizeof(denied) / sizeof(denied[0])))

/* The low 32 bits of args[0] (little-endian on both supported arches): socket's domain, clone's flags. */
#define STMT(code, k) ((struct sock_filter)BPF_STMT((code), (k)))
#define LOAD(field) STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, field))
#define LOAD_ARG0_LO STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0]))
#define RET(v) STMT(BPF_RET | BPF_K, (v))
#define ERR(e) RET(SECCOMP_RET_ERRNO | ((e) & SECCOMP_RET_DATA))

static int install_filter(void) {
    struct sock_filter prog[16 + 2 * 64];
    int n = 0;
    prog[n++] = LOAD(arch);
    prog[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, FC_AUDIT_ARCH, 1, 0);
    prog[n++] = RET(SECCOMP_RET_KILL_PROCESS);
    prog[n++] = LOAD(nr);
#if defined(__x86_64__)
    /* x32 syscalls share the arch value and add 0x40000000 to the number: refuse the whole ABI. */
    prog[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000u, 0, 1);
    prog[n++] = RET(SECCOMP_RET_KILL_PROCESS);
#endif
    for (int i = 0; i < NUM_DENIED; i++) {
        prog[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)denied[i], 0, 1);
        prog[n++] = ERR(EPERM);
    }
    /* socket(domain, ...): AF_UNIX only. */
    prog[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_socket, 0, 4);
    prog[n++] = LOAD_ARG0_LO;
    prog[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AF_UNIX, 0, 1);
    prog[n++] = RET(SECCOMP_RET_ALLOW);
    prog[n++] = ERR(EPERM);
    /* clone(flags, ...) with namespace flags (clone's flags are arg 0 on both arches); clone3 takes its flags in
     * a struct BPF cannot read, so it answers ENOSYS and the C library falls back to clone. */
    prog[n++] = LOAD(nr);
    prog[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone, 0, 4);
    prog[n++] = LOAD_ARG0_LO;
    prog[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, CLONE_NS_FLAGS, 0, 1);
    prog[n++] = ERR(EPERM);
    prog[n++] = RET(SECCOMP_RET_ALLOW);
#ifdef SYS_clone3
    prog[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone3, 0, 1);
    prog[n++] = ERR(ENOSYS);
#endif
    prog[n++] = RET(SECCOMP_RET_ALLOW);
    if (n > (int)(sizeof(prog) / sizeof(prog[0]))) {
        fprintf(stderr, "fc_seccomp_exec: filter too long (%d)\n", n);
        return -1;
    }
    struct sock_fprog fprog = {.len = (unsigned short)n, .filter = prog};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        perror("fc_seccomp_exec: no_new_privs");
        return -1;
    }
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog) != 0) {
        perror("fc_seccomp_exec: seccomp filter");
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "--check") == 0)
        return install_filter() == 0 ? 0 : 1;
    if (argc < 2) {
        fprintf(stderr, "usage: fc_seccomp_exec PROGRAM [ARGS...] | --check\n");
        return 2;
    }
    if (install_filter() != 0)
        return 126; /* the sandbox's "setup failed" code: the code never ran */
    execv(argv[1], argv + 1);
    perror("fc_seccomp_exec: execv");
    return 126;
}
