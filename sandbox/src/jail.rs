//! The jail: what `vmm run --jail DIR --uid N --gid N` does once the VM's host resources are
//! open (`/dev/kvm`, taps, disk images, RAM) and before its first thread starts.
//!
//! - **PID namespace** ([`enter_pid_namespace`], at process start): the VMM runs as PID 1 of
//!   a namespace of its own, so it cannot see or signal any other process; the original
//!   process only waits for it, passes on SIGTERM/SIGINT/SIGHUP and exits with its status.
//! - **Mount, IPC and UTS namespaces** ([`Jail::isolate`], while the process has one thread)
//!   **and `pivot_root`** into `DIR` ([`Jail::enter`]): the
//!   host's file system is gone (detached, not just hidden by a chroot that a root process
//!   could climb out of); paths given to the API afterwards (a disk to swap to, a snapshot
//!   directory) are paths inside `DIR`.
//! - **rlimits**: no core files (guest memory must not land on disk), a bound on open files
//!   and on file size.
//! - **An unprivileged user**: supplementary groups cleared, then the group, then the user, all
//!   three of real, effective and saved; this drops every capability.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

/// Why the jail could not be entered.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("--jail needs root (to create namespaces and change user); run as root or drop --jail")]
    NotRoot,
    #[error("jail directory {path}: {source}")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("jail directory {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("--uid 0 would keep root inside the jail; give an unprivileged user")]
    RootUser,
    #[error("{path} is outside the jail {root}: files the VMM creates once jailed must lie inside it")]
    Outside { path: PathBuf, root: PathBuf },
    #[error("cannot {what}: {source}")]
    Call {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn check(what: &'static str, ret: libc::c_int) -> Result<(), JailError> {
    if ret == 0 { Ok(()) } else { Err(JailError::Call { what, source: std::io::Error::last_os_error() }) }
}

/// Limits applied inside the jail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open descriptors (`RLIMIT_NOFILE`).
    pub open_files: u64,
    /// The largest file the VMM may write (`RLIMIT_FSIZE`), in bytes.
    pub file_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        // Enough for every device, its backends, API connections and a swap's second backend;
        // files as large as any disk image (1 TiB).
        Limits { open_files: 4096, file_size: 1 << 40 }
    }
}

/// Where the VMM is jailed, and as whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jail {
    root: PathBuf,
    uid: u32,
    gid: u32,
    limits: Limits,
    /// The namespaces are entered ([`Jail::isolate`]).
    isolated: bool,
}

impl Jail {
    /// Checks what can be checked before anything is opened: root privileges, the directory,
    /// an unprivileged target user.
    pub fn new(root: &Path, uid: u32, gid: u32) -> Result<Self, JailError> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(JailError::NotRoot);
        }
        if uid == 0 {
            return Err(JailError::RootUser);
        }
        let root = root.canonicalize().map_err(|source| JailError::Root { path: root.to_path_buf(), source })?;
        if !root.is_dir() {
            return Err(JailError::NotADirectory(root));
        }
        Ok(Jail { root, uid, gid, limits: Limits::default(), isolated: false })
    }

    pub fn with_limits(self, limits: Limits) -> Self {
        Jail { limits, ..self }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// `host`, a host path under the jail's directory, relative to that directory: the VMM
    /// works in it before and after `pivot_root` makes it `/`, so the relative path names the
    /// same file throughout (a socket bound before the jail and reopened inside it, say).
    pub fn relative(&self, host: &Path) -> Result<PathBuf, JailError> {
        let outside = || JailError::Outside { path: host.to_path_buf(), root: self.root.clone() };
        // The file may not exist yet: its directory is resolved, its name kept.
        let (Some(dir), Some(name)) = (host.parent(), host.file_name()) else {
            return Err(outside());
        };
        let dir = dir.canonicalize().map_err(|_| outside())?;
        let relative = dir.strip_prefix(&self.root).map_err(|_| outside())?;
        Ok(relative.join(name))
    }

    /// Enters new mount, IPC and UTS namespaces, with every mount private. Only the calling
    /// thread moves, so this must run while it is the only one: it fails otherwise.
    pub fn isolate(&mut self) -> Result<(), JailError> {
        let threads = std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0);
        if threads != 1 {
            let e = std::io::Error::other(format!("{threads} threads exist; only the calling one would move"));
            return Err(JailError::Call { what: "enter the jail's namespaces", source: e });
        }
        // SAFETY: namespace and mount calls with valid C strings; each result is checked.
        unsafe {
            check(
                "create mount, IPC and UTS namespaces",
                libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS),
            )?;
            // Nothing mounted or unmounted from here on reaches the host's namespace.
            check(
                "make the mounts private",
                libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ),
            )?;
            let hostname = b"vmm-jail";
            check("set the jail's host name", libc::sethostname(hostname.as_ptr().cast(), hostname.len()))?;
        }
        self.isolated = true;
        Ok(())
    }

    /// Closes the jail: `pivot_root` into the directory (every thread of the namespace
    /// follows), rlimits, then the unprivileged user (every thread: glibc applies it to all).
    /// Call [`isolate`](Self::isolate) first, before any thread starts; then this once the
    /// host resources are open and before starting threads that the guest can reach.
    pub fn enter(&self) -> Result<(), JailError> {
        if !self.isolated {
            let e = std::io::Error::other("Jail::isolate must run first, while the process has one thread");
            return Err(JailError::Call { what: "enter the jail", source: e });
        }
        let root =
            CString::new(self.root.as_os_str().as_bytes()).map_err(|_| JailError::NotADirectory(self.root.clone()))?;
        // SAFETY: mount and directory calls with valid C strings and no pointers kept; each
        // result is checked.
        unsafe {
            // pivot_root needs the new root to be a mount point.
            check(
                "bind-mount the jail directory",
                libc::mount(
                    root.as_ptr(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ),
            )?;
            check("enter the jail directory", libc::chdir(root.as_ptr()))?;
            // Stack the old root under the new one, then detach it: no path leads out.
            check(
                "pivot_root into the jail",
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
            )?;
            check("detach the host's file system", libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
            check("enter the jail's root", libc::chdir(c"/".as_ptr()))?;
            // A write past RLIMIT_FSIZE fails with EFBIG instead of killing the VMM.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        }
        self.set_limits()?;
        self.drop_user()?;
        // SAFETY: getpid and prctl on ourselves.
        unsafe {
            // Changing credentials cleared the parent-death signal: as PID 1 of our own
            // namespace, die with the process waiting for us, as before.
            if libc::getpid() == 1 {
                check("set the parent-death signal", libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
            }
        }
        Ok(())
    }

    fn set_limits(&self) -> Result<(), JailError> {
        let limit = |resource, value: u64| {
            let lim = libc::rlimit { rlim_cur: value, rlim_max: value };
            // SAFETY: setrlimit with a valid struct.
            unsafe { libc::setrlimit(resource, &lim) }
        };
        check("set RLIMIT_CORE", limit(libc::RLIMIT_CORE, 0))?;
        check("set RLIMIT_NOFILE", limit(libc::RLIMIT_NOFILE, self.limits.open_files))?;
        check("set RLIMIT_FSIZE", limit(libc::RLIMIT_FSIZE, self.limits.file_size))
    }

    fn drop_user(&self) -> Result<(), JailError> {
        // SAFETY: credential calls; glibc applies them to every thread of the process.
        unsafe {
            check("clear the supplementary groups", libc::setgroups(0, std::ptr::null()))?;
            check("change group", libc::setresgid(self.gid, self.gid, self.gid))?;
            check("change user", libc::setresuid(self.uid, self.uid, self.uid))?;
            // Setting the user back to root must now fail; if it does not, nothing was dropped.
            if libc::setuid(0) == 0 {
                return Err(JailError::Call {
                    what: "drop root",
                    source: std::io::Error::other("setuid(0) still succeeds"),
                });
            }
        }
        Ok(())
    }
}

/// The process the original `vmm` waits for, for the signal forwarder.
static CHILD: AtomicI32 = AtomicI32::new(0);

/// The signals the original process passes on, and the child blocks until it can act on them.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

extern "C" fn forward_signal(signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // A terminal's Ctrl-C or hang-up goes to the whole process group, the VMM included:
    // passing it on would deliver it twice (and a second signal means "stop now").
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    if unsafe { (*info).si_code } == libc::SI_KERNEL {
        return;
    }
    let child = CHILD.load(Ordering::Relaxed);
    if child > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(child, signal) };
    }
}

fn stop_signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill our own set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in STOP_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// Lets SIGTERM, SIGINT and SIGHUP through again in the jailed VMM, once its handlers are in
/// place: [`enter_pid_namespace`] blocks them, because PID 1 of a namespace drops a signal
/// whose action is still the default, and one sent before the handlers existed would be lost.
/// Call it on the main thread before it starts others (they inherit its mask).
pub fn unblock_stop_signals() {
    let set = stop_signal_set();
    // SAFETY: pthread_sigmask with a valid set.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
}

/// Moves the VMM into a PID namespace of its own. Returns in the new process (PID 1 there);
/// the original process waits for it, passes on SIGTERM, SIGINT and SIGHUP, and exits with
/// its status (128 + N if it was killed by signal N). Call it first thing, before any thread
/// exists: `fork` keeps only the calling thread.
pub fn enter_pid_namespace() -> Result<(), JailError> {
    // Blocked across the fork: the parent unblocks them once it forwards them, the child once
    // its own handlers exist (unblock_stop_signals); none is lost in between.
    let set = stop_signal_set();
    // SAFETY: unshare and fork before any other thread exists; the child only returns.
    let child = unsafe {
        check("create a PID namespace", libc::unshare(libc::CLONE_NEWPID))?;
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::fork()
    };
    match child {
        -1 => Err(JailError::Call { what: "fork into the PID namespace", source: std::io::Error::last_os_error() }),
        0 => {
            // Killed with the waiting parent (a SIGKILL it cannot pass on). getppid() reads 0
            // across the namespace boundary, so a parent killed before this line goes
            // unnoticed: only in the instant between fork and here.
            // SAFETY: prctl on ourselves.
            check("set the parent-death signal", unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) })
        }
        pid => {
            CHILD.store(pid, Ordering::Relaxed);
            // SAFETY: handlers that only call kill(2); waitpid on our own child.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = forward_signal as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                for signal in STOP_SIGNALS {
                    libc::sigaction(signal, &action, std::ptr::null_mut());
                }
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                let mut status = 0;
                loop {
                    if libc::waitpid(pid, &mut status, 0) == pid {
                        break;
                    }
                    if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                        libc::_exit(1);
                    }
                }
                let code =
                    if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) };
                std::process::exit(code)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jail(root: &Path) -> Jail {
        Jail { root: root.canonicalize().unwrap(), uid: 1000, gid: 1000, limits: Limits::default(), isolated: false }
    }

    #[test]
    fn host_paths_map_into_the_jail_and_others_are_refused() {
        let dir = std::env::temp_dir().join(format!("vmm-jail-paths-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let j = jail(&dir);
        assert_eq!(j.relative(&dir.join("api.sock")).unwrap(), Path::new("api.sock"));
        assert_eq!(j.relative(&dir.join("sub/vm.state")).unwrap(), Path::new("sub/vm.state"));
        assert_eq!(j.relative(&dir.join("sub/../x")).unwrap(), Path::new("x"));
        let outside = j.relative(Path::new("/tmp/elsewhere.sock")).unwrap_err();
        assert!(outside.to_string().contains("outside the jail"), "{outside}");
        assert!(j.relative(&dir.join("../escape.sock")).is_err());
        assert!(j.relative(&dir.join("missing-dir/api.sock")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn root_as_the_jailed_user_is_refused() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: checks only the non-root refusal");
            assert!(matches!(Jail::new(Path::new("/"), 1000, 1000), Err(JailError::NotRoot)));
            return;
        }
        assert!(matches!(Jail::new(Path::new("/"), 0, 0), Err(JailError::RootUser)));
        assert!(matches!(Jail::new(Path::new("/proc/self/status"), 1, 1), Err(JailError::NotADirectory(_))));
        assert!(matches!(Jail::new(Path::new("/no/such/jail"), 1, 1), Err(JailError::Root { .. })));
    }
}
