//! A seccomp filter per thread role.
//!
//! [`enable`] compiles one allow-list filter per [`Role`] and installs the [`Role::Control`]
//! filter on the calling (main) thread, before it starts any other: every thread the VMM
//! starts inherits it. Threads that a guest drives directly narrow it further with [`enter`]
//! at their start: the vCPU threads ([`Role::Vcpu`]) and the device event loop
//! ([`Role::Devices`]). Filters stack (the kernel runs all of them and takes the strictest
//! answer), so a narrowed thread keeps the process-wide bounds as well.
//!
//! A forbidden system call raises SIGSYS. The handler writes one line naming the thread, its
//! role and the call, then ends the process with status 159 (128 + SIGSYS): a VMM that lost a
//! vCPU or its device loop part-way through a request is not one to keep running, and killing
//! just the thread would leave its locks held and its guest hung.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

use crate::syscalls;

/// What a thread does, which decides what it may ask of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The main thread and everything the control plane runs: the API server and its
    /// connections, swaps, snapshots, replication, signal and console threads. The widest list,
    /// and the one every thread inherits.
    Control,
    /// The device event loop: virtio queues, backends' completions, eventfds.
    Devices,
    /// A vCPU: `KVM_RUN` and the exits it handles (MMIO and port I/O to the devices).
    Vcpu,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Control => "control",
            Role::Devices => "devices",
            Role::Vcpu => "vcpu",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Which command the filters are for: they differ in what the control plane may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Process {
    /// `vmm run`: a VM. Every thread is filtered.
    Run,
    /// `vmm shadow`: a replica. Its validation trials start `qemu-img` and `qemu-nbd`, and a
    /// filter is inherited across `execve`, so its control plane stays unfiltered; its vCPUs
    /// and device loop, the threads its guest reaches, are filtered as in `vmm run`.
    Shadow,
}

/// Why the filters could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {role} filter: {source}")]
    Build {
        role: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("cannot install the {role} filter: {source}")]
    Install {
        role: &'static str,
        #[source]
        source: seccompiler::Error,
    },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
    #[error("the seccomp filters are already enabled")]
    AlreadyEnabled,
}

/// The compiled filters, one per role (`None`: the role is not filtered); set once by [`enable`].
static FILTERS: OnceLock<[Option<BpfProgram>; 3]> = OnceLock::new();

thread_local! {
    // Read by the SIGSYS handler: plain values in static TLS, no lazy initialisation or
    // destructor, so reading them there is async-signal-safe.
    static THREAD_ROLE: Cell<Option<Role>> = const { Cell::new(None) };
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Builds every role's filter, installs the SIGSYS reporter and puts every thread of the
/// process under the [`Role::Control`] filter (for [`Process::Run`]).
pub fn enable(process: Process) -> Result<(), SeccompError> {
    if FILTERS.get().is_some() {
        return Err(SeccompError::AlreadyEnabled);
    }
    let control = match process {
        Process::Run => Some(compile(Role::Control)?),
        Process::Shadow => None,
    };
    let filters = [control, Some(compile(Role::Devices)?), Some(compile(Role::Vcpu)?)];
    install_reporter()?;
    let filters = FILTERS.get_or_init(|| filters);
    remember_thread(Role::Control);
    if let Some(control) = &filters[Role::Control.index()] {
        // Every thread, not only this one: a backend may have started one already (an NBD
        // connection's I/O thread, a lazy restore's fault handler).
        seccompiler::apply_filter_all_threads(control)
            .map_err(|source| SeccompError::Install { role: Role::Control.name(), source })?;
    }
    Ok(())
}

/// Whether [`enable`] has run in this process.
pub fn enabled() -> bool {
    FILTERS.get().is_some()
}

/// Narrows the calling thread to `role`'s filter (on top of what it inherited). A no-op
/// unless [`enable`] has run: embedders that do not sandbox lose nothing.
pub fn enter(role: Role) -> Result<(), SeccompError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    remember_thread(role);
    match &filters[role.index()] {
        Some(filter) => {
            seccompiler::apply_filter(filter).map_err(|source| SeccompError::Install { role: role.name(), source })
        }
        None => Ok(()),
    }
}

fn compile(role: Role) -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = syscalls::allowed(role).into_iter().collect();
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|source| SeccompError::Build { role: role.name(), source })?;
    filter.try_into().map_err(|source| SeccompError::Build { role: role.name(), source })
}

fn remember_thread(role: Role) {
    let mut name = [0u8; 16];
    if let Some(current) = std::thread::current().name() {
        let len = current.len().min(15);
        name[..len].copy_from_slice(&current.as_bytes()[..len]);
    }
    THREAD_ROLE.with(|r| r.set(Some(role)));
    THREAD_NAME.with(|n| n.set(name));
}

fn install_reporter() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction with our handler and an empty mask is a valid argument; the
    // handler only formats into a stack buffer and calls write(2) and _exit(2).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = report_forbidden as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// The exit status of a VMM stopped by its seccomp filter: 128 + SIGSYS, as a shell reports a
/// process killed by that signal.
pub const FORBIDDEN_EXIT_STATUS: i32 = 128 + libc::SIGSYS;

extern "C" fn report_forbidden(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SIGSYS's siginfo carries the call number after the call address: `_sigsys._syscall`,
    // 24 bytes into the structure on x86_64 (the 16-byte header, then an 8-byte pointer).
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let nr = unsafe { std::ptr::read_unaligned((info as *const u8).add(24) as *const i32) };
    let mut line = Line::default();
    line.push(b"vmm: seccomp: thread '");
    let mut name = THREAD_NAME.with(Cell::get);
    if name[0] == 0 {
        // A thread that inherited its filter without entering a role: ask the kernel.
        // SAFETY: PR_GET_NAME writes at most 16 bytes into our buffer; prctl is on every list.
        unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    }
    line.push(&name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())]);
    line.push(b"' (");
    line.push(THREAD_ROLE.with(Cell::get).map_or("control", Role::name).as_bytes());
    line.push(b" filter) made system call ");
    line.push_number(nr);
    line.push(b" (");
    line.push(syscalls::name(nr).as_bytes());
    line.push(b"), which its filter forbids; stopping the VMM\n");
    // SAFETY: write(2) of our own buffer to stderr, then exit_group: both async-signal-safe
    // and on every role's list.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(FORBIDDEN_EXIT_STATUS);
    }
}

/// A fixed buffer: the SIGSYS handler must not allocate.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line { buf: [0; 256], len: 0 }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, n: i32) {
        let mut digits = [0u8; 11];
        let mut at = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            at -= 1;
            digits[at] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            self.push(b"-");
        }
        self.push(&digits[at..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles() {
        for role in [Role::Control, Role::Devices, Role::Vcpu] {
            let program = compile(role).unwrap();
            assert!(program.len() > 10, "{role:?}: {} instructions", program.len());
        }
    }

    #[test]
    fn narrower_roles_allow_nothing_control_forbids() {
        // Filters stack: a call the Control filter forbids dies whatever the role says, so a
        // role's list naming it would only mislead a reader.
        let control: Vec<i64> = syscalls::allowed(Role::Control).into_iter().map(|(nr, _)| nr).collect();
        for role in [Role::Devices, Role::Vcpu] {
            for (nr, _) in syscalls::allowed(role) {
                assert!(control.contains(&nr), "{role:?} allows {} which Control forbids", syscalls::name(nr as i32));
            }
        }
    }

    #[test]
    fn the_report_line_formats_numbers_without_allocating() {
        let mut line = Line::default();
        line.push_number(0);
        line.push(b" ");
        line.push_number(435);
        line.push(b" ");
        line.push_number(-1);
        assert_eq!(&line.buf[..line.len], b"0 435 -1");
    }
}
