//! Which system calls each thread role may make, and their names for the SIGSYS report.
//!
//! The lists come from tracing every thread of `vmm run` and `vmm shadow` through the test
//! suite (`strace -ff`, each thread told apart by the name it sets), then reading them: a call
//! is here because a named part of the VMM needs it. Everything else stays forbidden, among
//! them the calls a compromised VMM would want most: `execve`,
//! `ptrace`, `mount`, `pivot_root`, `unshare`, `setns`, `bpf`, `perf_event_open`,
//! `process_vm_writev`, module loading and `kexec`, the `set*id` family, `keyctl`.
//!
//! `ioctl` is bounded by request type for every role: the vCPUs may ask only KVM; the device
//! loop KVM (irqfd updates), TUN/terminal (`'T'`: a tap's `FIONBIO`) and block-device
//! queries; the control plane adds userfaultfd (lazy restore), `PAGEMAP_SCAN` (`'f'`: finding
//! the pages a guest populated) and socket interface queries.

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use crate::seccomp::Role;

/// Calls every thread makes: memory, locks, signals, its own start and end.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    // The allocator grows large buffers in place, and the main arena moves its break.
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_prctl,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The device loop: queues, backends (files, io_uring, sockets, taps), eventfds.
const DEVICES: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    // discard and write-zeroes on an image file.
    libc::SYS_fallocate,
    libc::SYS_lseek,
    // A backend dropped on the loop (the old one after a swap) waits for its last I/O.
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_fcntl,
    libc::SYS_io_uring_enter,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    // vsock: a connection the guest opens to a host port is a new Unix stream socket.
    libc::SYS_socket,
    libc::SYS_connect,
    // vsock: a host program connecting in is accepted by the loop.
    libc::SYS_accept4,
    libc::SYS_getsockopt,
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_ioctl,
];

/// The control plane: everything the API can ask (swaps open backends and start threads,
/// snapshots and replication write files and talk over sockets), and building a VM (the shadow
/// builds one at its switchover).
const CONTROL: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_set_tid_address,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    libc::SYS_kill,
    libc::SYS_getpgrp,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_sched_getparam,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_setscheduler,
    libc::SYS_prlimit64,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_pipe2,
    libc::SYS_epoll_create1,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_setsockopt,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_register,
    libc::SYS_memfd_create,
    libc::SYS_userfaultfd,
    libc::SYS_ftruncate,
    libc::SYS_flock,
    libc::SYS_fchmod,
    libc::SYS_chmod,
    libc::SYS_fchmodat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_getcwd,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rmdir,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_copy_file_range,
    libc::SYS_fadvise64,
    libc::SYS_sync_file_range,
    libc::SYS_wait4,
    // A thread narrows its inherited filter by adding its role's (filters only ever tighten).
    libc::SYS_seccomp,
];

/// ioctl request types (the `_IOC_TYPE` byte) each role may use.
const KVM: u64 = 0xae;
const USERFAULTFD: u64 = 0xaa;
/// TUN/TAP (`TUNSETIFF`...) and terminals (`TCGETS`, `FIONBIO`...): both `'T'`.
const TTY_TUN: u64 = b'T' as u64;
/// `BLKGETSIZE64` and friends: a raw block device as a disk.
const BLOCK: u64 = 0x12;
/// `PAGEMAP_SCAN` (and the other `'f'` file ioctls).
const FILE: u64 = b'f' as u64;
/// `SIOC*`: socket and interface queries.
const SOCKET: u64 = 0x89;

fn ioctl_types(role: Role) -> &'static [u64] {
    match role {
        Role::Vcpu => &[KVM],
        Role::Devices => &[KVM, TTY_TUN, BLOCK],
        Role::Control => &[KVM, USERFAULTFD, TTY_TUN, BLOCK, FILE, SOCKET],
    }
}

/// `role`'s allowed calls, each with the rules its arguments must match (none: any).
pub(crate) fn allowed(role: Role) -> Vec<(i64, Vec<SeccompRule>)> {
    let mut calls: Vec<i64> = COMMON.to_vec();
    match role {
        Role::Vcpu => calls.push(libc::SYS_ioctl),
        Role::Devices => calls.extend(DEVICES),
        Role::Control => {
            calls.extend(DEVICES);
            calls.extend(CONTROL);
        }
    }
    calls.sort_unstable();
    calls.dedup();
    calls
        .into_iter()
        .map(|nr| {
            let rules = if nr == libc::SYS_ioctl { ioctl_rules(role) } else { Vec::new() };
            (nr, rules)
        })
        .collect()
}

/// One rule per allowed request type: `(request & 0xff00) == type << 8`.
fn ioctl_rules(role: Role) -> Vec<SeccompRule> {
    ioctl_types(role)
        .iter()
        .map(|&kind| {
            let condition =
                SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(0xff00), kind << 8)
                    .expect("a valid ioctl condition");
            SeccompRule::new(vec![condition]).expect("a rule with one condition")
        })
        .collect()
}

/// x86_64 system call names by number, from the kernel's `asm/unistd_64.h`; `?` for gaps.
const NAMES: &str = "\
read write open close stat fstat lstat poll lseek mmap mprotect munmap brk rt_sigaction \
rt_sigprocmask rt_sigreturn ioctl pread64 pwrite64 readv writev access pipe select sched_yield \
mremap msync mincore madvise shmget shmat shmctl dup dup2 pause nanosleep getitimer alarm setitimer \
getpid sendfile socket connect accept sendto recvfrom sendmsg recvmsg shutdown bind listen \
getsockname getpeername socketpair setsockopt getsockopt clone fork vfork execve exit wait4 kill \
uname semget semop semctl shmdt msgget msgsnd msgrcv msgctl fcntl flock fsync fdatasync truncate \
ftruncate getdents getcwd chdir fchdir rename mkdir rmdir creat link unlink symlink readlink chmod \
fchmod chown fchown lchown umask gettimeofday getrlimit getrusage sysinfo times ptrace getuid \
syslog getgid setuid setgid geteuid getegid setpgid getppid getpgrp setsid setreuid setregid \
getgroups setgroups setresuid getresuid setresgid getresgid getpgid setfsuid setfsgid getsid capget \
capset rt_sigpending rt_sigtimedwait rt_sigqueueinfo rt_sigsuspend sigaltstack utime mknod uselib \
personality ustat statfs fstatfs sysfs getpriority setpriority sched_setparam sched_getparam \
sched_setscheduler sched_getscheduler sched_get_priority_max sched_get_priority_min \
sched_rr_get_interval mlock munlock mlockall munlockall vhangup modify_ldt pivot_root _sysctl prctl \
arch_prctl adjtimex setrlimit chroot sync acct settimeofday mount umount2 swapon swapoff reboot \
sethostname setdomainname iopl ioperm create_module init_module delete_module get_kernel_syms \
query_module quotactl nfsservctl getpmsg putpmsg afs_syscall tuxcall security gettid readahead \
setxattr lsetxattr fsetxattr getxattr lgetxattr fgetxattr listxattr llistxattr flistxattr \
removexattr lremovexattr fremovexattr tkill time futex sched_setaffinity sched_getaffinity \
set_thread_area io_setup io_destroy io_getevents io_submit io_cancel get_thread_area lookup_dcookie \
epoll_create epoll_ctl_old epoll_wait_old remap_file_pages getdents64 set_tid_address \
restart_syscall semtimedop fadvise64 timer_create timer_settime timer_gettime timer_getoverrun \
timer_delete clock_settime clock_gettime clock_getres clock_nanosleep exit_group epoll_wait \
epoll_ctl tgkill utimes vserver mbind set_mempolicy get_mempolicy mq_open mq_unlink mq_timedsend \
mq_timedreceive mq_notify mq_getsetattr kexec_load waitid add_key request_key keyctl ioprio_set \
ioprio_get inotify_init inotify_add_watch inotify_rm_watch migrate_pages openat mkdirat mknodat \
fchownat futimesat newfstatat unlinkat renameat linkat symlinkat readlinkat fchmodat faccessat \
pselect6 ppoll unshare set_robust_list get_robust_list splice tee sync_file_range vmsplice \
move_pages utimensat epoll_pwait signalfd timerfd_create eventfd fallocate timerfd_settime \
timerfd_gettime accept4 signalfd4 eventfd2 epoll_create1 dup3 pipe2 inotify_init1 preadv pwritev \
rt_tgsigqueueinfo perf_event_open recvmmsg fanotify_init fanotify_mark prlimit64 name_to_handle_at \
open_by_handle_at clock_adjtime syncfs sendmmsg setns getcpu process_vm_readv process_vm_writev \
kcmp finit_module sched_setattr sched_getattr renameat2 seccomp getrandom memfd_create \
kexec_file_load bpf execveat userfaultfd membarrier mlock2 copy_file_range preadv2 pwritev2 \
pkey_mprotect pkey_alloc pkey_free statx io_pgetevents rseq ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? \
? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? \
? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? ? pidfd_send_signal io_uring_setup io_uring_enter \
io_uring_register open_tree move_mount fsopen fsconfig fsmount fspick pidfd_open clone3 close_range \
openat2 pidfd_getfd faccessat2 process_madvise epoll_pwait2 mount_setattr quotactl_fd \
landlock_create_ruleset landlock_add_rule landlock_restrict_self memfd_secret process_mrelease \
futex_waitv set_mempolicy_home_node";

/// The name of system call `nr`, for the SIGSYS report; allocation-free (a signal handler
/// calls it).
pub(crate) fn name(nr: i32) -> &'static str {
    usize::try_from(nr).ok().and_then(|nr| NAMES.split(' ').nth(nr)).unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_line_up_with_numbers() {
        assert_eq!(name(libc::SYS_read as i32), "read");
        assert_eq!(name(libc::SYS_execve as i32), "execve");
        assert_eq!(name(libc::SYS_socket as i32), "socket");
        assert_eq!(name(libc::SYS_io_uring_setup as i32), "io_uring_setup");
        assert_eq!(name(libc::SYS_process_madvise as i32), "process_madvise");
        assert_eq!(name(-1), "unknown");
        assert_eq!(name(100_000), "unknown");
    }

    #[test]
    fn the_dangerous_calls_are_on_no_list() {
        let never = [
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_pivot_root,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_process_vm_writev,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_kexec_load,
            libc::SYS_setuid,
            libc::SYS_setresuid,
            libc::SYS_keyctl,
            libc::SYS_fork,
            libc::SYS_execve,
        ];
        for role in [Role::Control, Role::Devices, Role::Vcpu] {
            let calls: Vec<i64> = allowed(role).into_iter().map(|(nr, _)| nr).collect();
            for nr in never {
                assert!(!calls.contains(&nr), "{role:?} allows {}", name(nr as i32));
            }
        }
    }
}
