//! The terminal side of `vmm run`: the guest's serial console on stdin/stdout, and the signals
//! that end a VM from the outside.
//!
//! On an interactive terminal the console is raw, as QEMU's `-nographic` is: every key goes to
//! the guest at once (Ctrl-C included), and Ctrl-A is the escape key (`Ctrl-A x` stops the VM,
//! `Ctrl-A h` lists the others). Started in the background (`vmm run ... &`), the VMM does not
//! touch the terminal at all: reading it would get the whole process stopped by SIGTTIN, and
//! the guest with it. Input then comes through `vmm ctl serial-input`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vmm::{SerialInput, Vm};

/// The escape key: Ctrl-A, as in QEMU and screen.
const ESCAPE: u8 = 0x01;

const HELP: &str = "\r\nvmm console: Ctrl-A x  stop the VM and exit\r\n\
                    \x20            Ctrl-A h  this help\r\n\
                    \x20            Ctrl-A Ctrl-A  send Ctrl-A to the guest\r\n";

/// How stdin reaches the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StdinMode {
    /// An interactive terminal, ours: raw, with the escape key.
    Terminal,
    /// A pipe or a file: copied as it is, until it ends.
    Stream,
    /// Not read: a terminal that belongs to another job (we run in the background).
    Background,
}

impl StdinMode {
    /// What stdin is now.
    pub fn detect() -> Self {
        // SAFETY: plain queries on descriptor 0.
        let (tty, foreground, ours) = unsafe { (libc::isatty(0) == 1, libc::tcgetpgrp(0), libc::getpgrp()) };
        match (tty, foreground == ours) {
            (false, _) => StdinMode::Stream,
            (true, true) => StdinMode::Terminal,
            (true, false) => StdinMode::Background,
        }
    }
}

/// The terminal's settings before we made it raw; put back on drop (and by the panic hook,
/// through [`restore_terminal`], when a panic ends the process first).
pub struct RawTerminal(());

static SAVED_TERMIOS: OnceLock<libc::termios> = OnceLock::new();

impl RawTerminal {
    /// Makes stdin raw: no line editing, no echo, no signals from keys. Output processing
    /// stays on, so a guest's bare `\n` still starts a new line.
    pub fn enter() -> std::io::Result<Self> {
        // SAFETY: tcgetattr/tcsetattr on descriptor 0 with a termios we own.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut saved) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let _ = SAVED_TERMIOS.set(saved);
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            raw.c_oflag |= libc::OPOST | libc::ONLCR;
            if libc::tcsetattr(0, libc::TCSANOW, &raw) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(RawTerminal(()))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Puts the terminal back as it was before [`RawTerminal::enter`] (a no-op if it never was).
pub fn restore_terminal() {
    if let Some(saved) = SAVED_TERMIOS.get() {
        // SAFETY: restores settings tcgetattr gave us.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, saved) };
    }
}

/// Copies stdin into the guest's serial port on a background thread. On a terminal, the
/// escape key's commands act on `vm`.
pub fn forward_stdin(vm: Arc<Vm>, mode: StdinMode) {
    let input = vm.serial_input();
    // Weak: a thread blocked reading stdin must not keep the VM (and the files it removes when
    // dropped) alive past the end of `run`.
    let vm = Arc::downgrade(&vm);
    let spawned = std::thread::Builder::new().name("serial-stdin".into()).spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 256];
        // Survives across reads: Ctrl-A may end one read and its command start the next.
        let mut escaped = false;
        while let Ok(n @ 1..) = stdin.read(&mut buf) {
            if mode != StdinMode::Terminal {
                // A pipe or file: nobody can type an escape, so waiting for the guest is fine
                // and loses nothing.
                send_all(&input, &buf[..n]);
                continue;
            }
            let mut plain = Vec::with_capacity(n);
            for &byte in &buf[..n] {
                match (escaped, byte) {
                    (false, ESCAPE) => escaped = true,
                    (false, _) => plain.push(byte),
                    (true, _) => {
                        escaped = false;
                        match byte {
                            // At once, whatever the guest has not read: the way out must work
                            // when the guest is stuck.
                            b'x' | b'X' => {
                                eprint!("\r\nvmm: stopped from the console (Ctrl-A x)\r\n");
                                if let Some(vm) = vm.upgrade() {
                                    vm.stop();
                                }
                                return;
                            }
                            ESCAPE => plain.push(ESCAPE),
                            b'h' | b'H' | b'?' => eprint!("{HELP}"),
                            _ => {}
                        }
                    }
                }
            }
            type_at(&input, &plain);
        }
    });
    if let Err(e) = spawned {
        log::warn!("serial input disabled: {e}");
    }
}

/// Sends all of `bytes`, however long the guest takes to read them.
fn send_all(input: &SerialInput, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let sent = input.send_all(bytes, Duration::from_secs(1));
        bytes = &bytes[sent..];
    }
}

/// Sends what was typed, waiting a moment for a guest that reads slowly; what a guest that is
/// not reading at all (paused, stuck, busy) will not take is dropped with a bell, as a full
/// UART drops it, so that the next keys (Ctrl-A x among them) are still read.
fn type_at(input: &SerialInput, bytes: &[u8]) {
    if input.send_all(bytes, TYPING_WAIT) < bytes.len() {
        eprint!("\x07");
    }
}

/// How long typed keys wait for room in the guest's receive FIFO.
const TYPING_WAIT: Duration = Duration::from_millis(500);

/// The signal that stopped the VM, 0 while none has.
static STOPPED_BY: AtomicI32 = AtomicI32::new(0);

/// The API socket, for a second signal to remove on its way out.
static API_SOCKET: OnceLock<PathBuf> = OnceLock::new();

/// SIGINT, SIGTERM and SIGHUP, caught from the start. Until [`StopSignals::stop`] hands them a
/// VM, a signal ends the process at once (nothing runs yet that a clean stop would protect),
/// removing what [`StopSignals::remove_on_early_exit`] named; from then on it stops the VM.
pub struct StopSignals {
    target: Arc<Mutex<SignalTarget>>,
}

#[derive(Default)]
struct SignalTarget {
    /// Weak: the VM is dropped when `run` returns (removing its sockets and RAM file), even
    /// though this thread lives on.
    vm: Option<Weak<Vm>>,
    cleanup: Vec<PathBuf>,
}

impl StopSignals {
    /// Catches the three signals, except those this process was started ignoring (`nohup`
    /// ignores SIGHUP; a shell without job control has its `&` jobs ignore SIGINT): the
    /// caller asked for those to pass by.
    pub fn catch() -> std::io::Result<Self> {
        let wanted: Vec<i32> = [SIGINT, SIGTERM, SIGHUP].into_iter().filter(|&s| !ignored(s)).collect();
        let mut signals = Signals::new(wanted)?;
        let target = Arc::new(Mutex::new(SignalTarget::default()));
        let watched = target.clone();
        std::thread::Builder::new().name("signals".into()).spawn(move || {
            for signal in signals.forever() {
                let (vm, cleanup) = {
                    let target = watched.lock().unwrap_or_else(|p| p.into_inner());
                    (target.vm.as_ref().and_then(Weak::upgrade), target.cleanup.clone())
                };
                let Some(vm) = vm else {
                    restore_terminal();
                    for path in cleanup {
                        let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
                    }
                    std::process::exit(128 + signal);
                };
                if STOPPED_BY.swap(signal, Ordering::SeqCst) != 0 {
                    restore_terminal();
                    if let Some(path) = API_SOCKET.get() {
                        let _ = std::fs::remove_file(path);
                    }
                    std::process::exit(128 + signal);
                }
                let name = signal_hook::low_level::signal_name(signal).unwrap_or("signal");
                let _ = writeln!(std::io::stderr(), "vmm: {name}: stopping the guest");
                vm.stop();
            }
        })?;
        Ok(StopSignals { target })
    }

    /// Files or directories a signal removes if it comes before there is a VM (a shadow's
    /// directory and listening socket).
    pub fn remove_on_early_exit(&self, paths: Vec<PathBuf>) {
        self.target.lock().unwrap_or_else(|p| p.into_inner()).cleanup = paths;
    }

    /// From now on a signal stops `vm` cleanly: the vCPUs stop, the caller returns and the API
    /// socket (`api_socket`) is removed on the way out. A second signal ends the process at
    /// once, still removing the socket and restoring the terminal.
    pub fn stop(&self, vm: Arc<Vm>, api_socket: Option<&Path>) -> std::io::Result<()> {
        if let Some(path) = api_socket {
            let _ = API_SOCKET.set(path.to_path_buf());
        }
        self.target.lock().unwrap_or_else(|p| p.into_inner()).vm = Some(Arc::downgrade(&vm));
        Ok(())
    }
}

/// Whether `signal`'s disposition is SIG_IGN.
fn ignored(signal: i32) -> bool {
    // SAFETY: sigaction with a null new action only reads the current one into ours.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut current) == 0 && current.sa_sigaction == libc::SIG_IGN
    }
}

/// The signal that stopped the VM, if one did: `run` exits with 128 + its number, as a shell
/// reports a process a signal killed.
pub fn stopped_by_signal() -> Option<i32> {
    match STOPPED_BY.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}
