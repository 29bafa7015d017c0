//! Command-line parsing and the `run` command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value};
use vmm::api::ApiServer;
use vmm::config::{DEFAULT_CMDLINE, DiskConfig, NetConfig, ShmConfig, VsockConfig};
use vmm::snapshot::MemoryMode;
use vmm::{BootProtocol, BuildError, RamBacking, SerialConfig, VmBuilder, VmConfig};

use crate::console::{self, RawTerminal, StdinMode, StopSignals};
use crate::sandbox::{self, SandboxArgs};

/// Exit status for bad input (flags, config file, kernel image).
pub const STATUS_BAD_INPUT: u8 = 2;
/// Exit status when the VMM fails at run time.
pub const STATUS_FAILURE: u8 = 1;

#[derive(Parser)]
#[command(name = "vmm", version, about = "A KVM virtual machine monitor for live component replacement")]
pub struct Cli {
    /// Log level for the VMM's own messages (on stderr).
    #[arg(long, global = true, default_value = "warn", value_name = "LEVEL", value_parser = parse_level)]
    pub log_level: log::LevelFilter,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Boot a kernel and run it until the guest ends.
    Run(Box<RunArgs>),
    /// Boot the bundled microguest and show what the VMM can do.
    Demo(DemoArgs),
    /// Write the bundled microguest image to a file (to use with `vmm run --kernel`).
    ExportMicroguest {
        /// Where to write the ELF image.
        path: PathBuf,
    },
    /// Build a Linux guest (bzImage and initramfs) from Debian's packages, for the Linux boot
    /// test.
    Image(ImageArgs),
    /// Control a running VM through its API socket (`vmm run --api-sock`).
    Ctl(crate::ctl::CtlArgs),
    /// Wait for a primary to replicate to this process, and become the VM at its switchover.
    Shadow(crate::shadow::ShadowArgs),
    /// Run a swarm: per-layer VMs joined by shared-memory rings behind an HTTP front end.
    Swarm(crate::swarm::SwarmArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell; e.g. `vmm completions bash > /etc/bash_completion.d/vmm`.
        shell: clap_complete::Shell,
    },
    /// Write man pages (vmm.1 and one per subcommand) into a directory.
    Man {
        /// The directory, created if missing; e.g. `man -l DIR/vmm-run.1`.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Args)]
pub struct ImageArgs {
    /// Directory for vmlinuz and initrd.cpio (created if missing).
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// Kernel package: a metapackage such as linux-image-cloud-amd64, or a versioned one.
    #[arg(long, value_name = "PACKAGE", default_value = "linux-image-cloud-amd64")]
    pub kernel_package: String,
}

#[derive(Args)]
pub struct RunArgs {
    /// Kernel image: 64-bit ELF (vmlinux, the microguest) or bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    #[arg(long, value_name = "STR", help = format!("Kernel command line [default: \"{DEFAULT_CMDLINE}\"]"))]
    pub cmdline: Option<String>,
    /// Guest RAM in MiB, at least 16 [default: 128].
    #[arg(long, value_name = "N")]
    pub mem_mib: Option<u64>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
    /// What guest RAM lives in: anonymous, memfd, hugetlbfs (2 MiB pages from
    /// vm.nr_hugepages) or file=PATH [default: anonymous].
    #[arg(long, value_name = "BACKING", value_parser = parse_ram_backing)]
    pub ram_backing: Option<RamBacking>,
    /// Serial console: stdout (the terminal: Ctrl-A x stops the VM), none or file:PATH
    /// [default: stdout].
    #[arg(long, value_name = "DEST", value_parser = parse_serial)]
    pub serial: Option<SerialConfig>,
    /// Boot protocol: auto (PVH if the kernel supports it), linux or pvh [default: auto].
    #[arg(long, value_name = "PROTO", value_parser = parse_protocol)]
    pub boot_protocol: Option<BootProtocol>,
    /// A virtio-blk disk: path=FILE[,readonly=on][,engine=sync|io_uring][,id=NAME] or
    /// nbd=HOST:PORT|nbd=unix:PATH[,export=NAME][,readonly=on][,id=NAME]. Repeatable; ids
    /// default to disk0, disk1, ...
    #[arg(long = "disk", value_name = "OPTIONS", value_parser = parse_disk)]
    pub disks: Vec<DiskConfig>,
    /// A virtio-net interface: tap=NAME[,mac=MAC][,mtu=N][,id=NAME] or
    /// unix=PATH[,mac=MAC][,id=NAME]. Repeatable; ids default to net0, net1, ...
    #[arg(long = "net", value_name = "OPTIONS", value_parser = parse_net)]
    pub nets: Vec<NetConfig>,
    /// The virtio-vsock device: cid=N,socket=PATH[,id=NAME]; the id defaults to vsock0.
    #[arg(long, value_name = "OPTIONS", value_parser = parse_vsock)]
    pub vsock: Option<VsockConfig>,
    /// A region of a swarm fabric, mapped as shared guest RAM with doorbells:
    /// socket=PATH,region=NAME,party=N (see docs/swarm.md). Repeatable: windows 0, 1, ...
    #[arg(long = "shm", value_name = "OPTIONS", value_parser = parse_shm)]
    pub shm: Vec<ShmConfig>,
    /// Shared-memory windows to have, for regions attached now or later through the API
    /// (PUT /shm/{window}) [default: one per --shm].
    #[arg(long, value_name = "N")]
    pub shm_windows: Option<u32>,
    /// JSON file with the same fields (kernel, initrd, cmdline, mem_mib, vcpus, serial,
    /// boot_protocol, ram_backing, disks, nets, vsock); flags override it. Examples in
    /// the repository's examples/ directory.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Serve the control API (HTTP/1.1 + JSON) on this Unix socket while the VM runs.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Keep the VM's configuration in this file as it stands: written at start and after every
    /// committed swap (atomically, mode 0600), so `--resume-state` restarts a killed VMM on the
    /// images its devices use now.
    #[arg(long, value_name = "PATH", conflicts_with = "resume_state")]
    pub state_file: Option<PathBuf>,
    /// Start the VM a `--state-file` describes (after a crash, say), and keep that file up to
    /// date; only --serial and --api-sock go with it.
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with_all = ["kernel", "initrd", "cmdline", "mem_mib", "vcpus", "ram_backing", "boot_protocol", "disks", "nets", "vsock", "shm", "shm_windows", "config", "restore"]
    )]
    pub resume_state: Option<PathBuf>,
    /// Continue the VM saved in this snapshot directory (`vmm ctl snapshot create`) instead of
    /// booting; the machine and its backends come from the snapshot, so only --serial,
    /// --api-sock and --memory apply.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["kernel", "initrd", "cmdline", "mem_mib", "vcpus", "ram_backing", "boot_protocol", "disks", "nets", "vsock", "shm", "shm_windows", "config"]
    )]
    pub restore: Option<PathBuf>,
    /// With --restore, how guest RAM is filled: eager (read before the guest runs), mmap (the
    /// memory file mapped privately: the guest runs at once, pages come in as touched) or uffd
    /// (empty RAM, each page filled on first touch by a userfaultfd handler).
    #[arg(long, value_name = "MODE", requires = "restore", default_value = "eager", value_parser = parse_memory_mode)]
    pub memory: MemoryMode,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

fn parse_ram_backing(s: &str) -> Result<RamBacking, String> {
    s.parse()
}

fn parse_memory_mode(s: &str) -> Result<MemoryMode, String> {
    s.parse()
}

#[derive(Args)]
pub struct DemoArgs {
    /// Show only the guest programs' output, not the VMM's commentary.
    #[arg(long)]
    pub quiet: bool,
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse().map_err(|_| format!("invalid log level {s:?} (expected off, error, warn, info, debug or trace)"))
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    s.parse()
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    s.parse()
}

fn parse_shm(s: &str) -> Result<ShmConfig, String> {
    s.parse()
}

fn parse_vsock(s: &str) -> Result<VsockConfig, String> {
    s.parse()
}

pub(crate) fn parse_serial(s: &str) -> Result<SerialConfig, String> {
    s.parse()
}

fn parse_protocol(s: &str) -> Result<BootProtocol, String> {
    s.parse()
}

/// An error with the exit status it deserves.
pub struct Failure {
    pub status: u8,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn bad_input(error: anyhow::Error) -> Self {
        Self { status: STATUS_BAD_INPUT, error }
    }

    pub fn runtime(error: anyhow::Error) -> Self {
        Self { status: STATUS_FAILURE, error }
    }
}

impl From<BuildError> for Failure {
    fn from(e: BuildError) -> Self {
        let status = match e {
            BuildError::Config(_) | BuildError::Boot(_) | BuildError::SerialFile { .. } | BuildError::Snapshot(_) => {
                STATUS_BAD_INPUT
            }
            _ => STATUS_FAILURE,
        };
        Failure { status, error: anyhow!(e) }
    }
}

/// Prints a clap error as clap renders it: the error, its tip, the usage of the subcommand
/// at fault and which `--help` to read. Help and version go to stdout with status 0.
pub fn report_clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind::*;
    if matches!(e.kind(), DisplayHelp | DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    // clap says "try '--help'": name the command that flag belongs to.
    let text = e.render().to_string().replace("try '--help'", &format!("try '{} --help'", subcommand_path()));
    eprint!("{text}");
    ExitCode::from(STATUS_BAD_INPUT)
}

/// `vmm run`, `vmm ctl swap`, ...: the subcommands named on our command line.
fn subcommand_path() -> String {
    use clap::CommandFactory;
    let mut command = Cli::command();
    let mut path = vec!["vmm".to_string()];
    for arg in std::env::args_os().skip(1) {
        let Some(sub) = arg.to_str().and_then(|a| command.find_subcommand(a)).cloned() else { continue };
        path.push(sub.get_name().to_string());
        command = sub;
    }
    path.join(" ")
}

/// Merges the config file (if any) with the flags; flags win.
pub fn resolve_config(args: &RunArgs) -> Result<VmConfig, Failure> {
    let mut fields = match args.config.as_ref().or(args.resume_state.as_ref()) {
        Some(path) => read_config_file(path).map_err(Failure::bad_input)?,
        None => Map::new(),
    };
    let mut set = |key: &str, value: Option<Value>| {
        if let Some(v) = value {
            fields.insert(key.to_string(), v);
        }
    };
    set("kernel", args.kernel.as_ref().map(|p| Value::from(p.to_string_lossy().into_owned())));
    set("initrd", args.initrd.as_ref().map(|p| Value::from(p.to_string_lossy().into_owned())));
    set("cmdline", args.cmdline.clone().map(Value::from));
    set("mem_mib", args.mem_mib.map(Value::from));
    set("vcpus", args.vcpus.map(Value::from));
    set("serial", args.serial.as_ref().map(|s| Value::from(s.to_string())));
    set("boot_protocol", args.boot_protocol.map(|p| Value::from(p.to_string())));
    // Device flags replace the config file's lists; serializing them cannot fail.
    let json = |v: serde_json::Result<Value>| v.unwrap_or_default();
    set("ram_backing", args.ram_backing.as_ref().map(|b| json(serde_json::to_value(b))));
    set("disks", (!args.disks.is_empty()).then(|| json(serde_json::to_value(&args.disks))));
    set("nets", (!args.nets.is_empty()).then(|| json(serde_json::to_value(&args.nets))));
    set("vsock", args.vsock.as_ref().map(|v| json(serde_json::to_value(v))));
    set("shm", (!args.shm.is_empty()).then(|| json(serde_json::to_value(&args.shm))));
    set("shm_windows", args.shm_windows.map(Value::from));
    if !fields.contains_key("kernel") {
        return Err(Failure::bad_input(anyhow!(
            "no kernel given: pass --kernel PATH or set \"kernel\" in the --config file"
        )));
    }
    serde_json::from_value(Value::Object(fields)).map_err(|e| Failure::bad_input(anyhow!("invalid configuration: {e}")))
}

fn read_config_file(path: &Path) -> anyhow::Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(anyhow!("config file {}: expected a JSON object", path.display())),
        Err(e) => Err(anyhow!("config file {} is not valid JSON: {e}", path.display())),
    }
}

/// `vmm run`.
pub fn run(args: &RunArgs) -> Result<u8, Failure> {
    let started = std::time::Instant::now();
    // First: the PID namespace forks, which must happen while this is the only thread.
    let jail = args.sandbox.prepare()?;
    let jailed = |path: &Path| sandbox::jailed_path(jail.as_ref(), path);
    let api_sock = args.api_sock.as_deref().map(jailed).transpose()?;
    let state_file = args.state_file.as_ref().or(args.resume_state.as_ref()).map(|p| jailed(p)).transpose()?;
    let builder = match &args.restore {
        Some(dir) => {
            let serial = args.serial.clone().unwrap_or_default();
            VmBuilder::restore(dir, args.memory).serial(serial)
        }
        None => {
            let mut config = resolve_config(args)?;
            if let Some(vsock) = &mut config.vsock {
                vsock.socket = jailed(&vsock.socket)?;
            }
            if args.resume_state.is_some() {
                forget_crashed_ram(&config.ram_backing)?;
            }
            VmBuilder::from_config(config)
        }
    };
    let builder = builder.sandbox(args.sandbox.sandbox(jail));
    let signals = StopSignals::catch().map_err(|e| Failure::runtime(anyhow!("cannot handle signals: {e}")))?;
    if args.sandbox.jail.is_some() {
        // Blocked since the fork into the PID namespace; the handlers now exist.
        vmm_sandbox::jail::unblock_stop_signals();
    }
    // The console is set up before the guest can print: the hint comes first, and keys typed
    // from the first instant reach the guest raw.
    let stdin_mode = (builder.config().serial == SerialConfig::Stdout).then(StdinMode::detect);
    // Restored when this function returns (an error included), before anything else prints.
    let mut _raw_terminal = None;
    if stdin_mode == Some(StdinMode::Terminal) {
        match RawTerminal::enter() {
            Ok(raw) => {
                _raw_terminal = Some(raw);
                eprint!("vmm: the guest's serial console; Ctrl-A x stops the VM, Ctrl-A h for help\r\n");
            }
            Err(e) => log::warn!("the terminal stays line-buffered: {e}"),
        }
    }
    let vm = Arc::new(builder.start()?);
    let info = vm.info();
    log::info!(
        "{} {} kernel via {} at {:#x}: {} vCPUs, {} MiB; setup took {:.2} ms wall, {:.2} ms CPU",
        if args.restore.is_some() { "restored" } else { "started" },
        info.kernel_format,
        info.boot_protocol,
        info.entry_point,
        info.vcpus,
        info.mem_bytes >> 20,
        started.elapsed().as_secs_f64() * 1e3,
        process_cpu_ms()
    );
    if let Some(path) = &state_file {
        vm.keep_config_in(path)
            .with_context(|| format!("cannot write the state file {}", path.display()))
            .map_err(Failure::runtime)?;
    }
    // Dropped (socket file removed) when this function returns.
    let _api = match &api_sock {
        Some(path) => Some(ApiServer::start(path, vm.clone()).map_err(|e| Failure::bad_input(anyhow!(e)))?),
        None => None,
    };
    signals
        .stop(vm.clone(), api_sock.as_deref())
        .map_err(|e| Failure::runtime(anyhow!("cannot handle signals: {e}")))?;
    match stdin_mode {
        Some(StdinMode::Background) => {
            log::info!("in the background: the terminal is not read (`vmm ctl serial-input` types at the guest)")
        }
        Some(mode) => console::forward_stdin(vm.clone(), mode),
        None => {}
    }
    let exit = vm.wait();
    drop(_raw_terminal);
    log::info!("VM ended: {exit}");
    drop(_api);
    release(vm);
    if let vmm::VmExit::Crashed(crash) = &exit {
        return Err(Failure::runtime(anyhow!("{crash}")));
    }
    if let Some(signal) = console::stopped_by_signal() {
        return Ok((128 + signal) as u8);
    }
    Ok(exit.process_status() as u8)
}

/// A VMM killed with a file RAM backing leaves the file full of the old guest's memory, which
/// a new VM would refuse to overwrite; on `--resume-state` that memory is dead (the guest boots
/// again), so the file is emptied.
fn forget_crashed_ram(backing: &vmm::RamBacking) -> Result<(), Failure> {
    if let vmm::RamBacking::File { path } = backing
        && std::fs::metadata(path).is_ok_and(|m| m.len() > 0)
    {
        log::info!("{}: the crashed VM's RAM, emptied for the resumed one", path.display());
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(0))
            .with_context(|| format!("cannot empty the RAM file {}", path.display()))
            .map_err(Failure::runtime)?;
    }
    Ok(())
}

/// Drops the VM here, so that what it removes when dropped (its vsock socket, a RAM file it
/// created) is gone before the process exits: a thread that stopped it (a signal, Ctrl-A x)
/// may hold it a moment longer, and the process would not wait for that thread.
fn release(mut vm: Arc<vmm::Vm>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match Arc::try_unwrap(vm) {
            Ok(vm) => return drop(vm),
            Err(shared) if std::time::Instant::now() < deadline => {
                vm = shared;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(_) => return log::warn!("the VM is still in use at exit; its files may stay"),
        }
    }
}

/// CPU time (user + system) this process has used so far, in milliseconds.
fn process_cpu_ms() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// `vmm completions SHELL`.
pub fn completions(shell: clap_complete::Shell) -> Result<u8, Failure> {
    use clap::CommandFactory;
    clap_complete::generate(shell, &mut Cli::command(), "vmm", &mut std::io::stdout());
    Ok(0)
}

/// `vmm man --out DIR`: vmm.1, and vmm-run.1, vmm-ctl.1, vmm-ctl-swap.1, ... for every
/// subcommand.
pub fn man(out: &Path) -> Result<u8, Failure> {
    use clap::CommandFactory;
    let write = || -> std::io::Result<usize> {
        std::fs::create_dir_all(out)?;
        let mut command = Cli::command();
        command.build();
        let mut pages = 0;
        let mut stack = vec![(String::from("vmm"), command)];
        while let Some((name, command)) = stack.pop() {
            let mut page = Vec::new();
            clap_mangen::Man::new(command.clone().name(name.clone())).render(&mut page)?;
            std::fs::write(out.join(format!("{name}.1")), page)?;
            pages += 1;
            for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
                stack.push((format!("{name}-{}", sub.get_name()), sub.clone()));
            }
        }
        Ok(pages)
    };
    let pages =
        write().with_context(|| format!("cannot write man pages to {}", out.display())).map_err(Failure::runtime)?;
    eprintln!("wrote {pages} man pages to {}", out.display());
    Ok(0)
}

/// `vmm export-microguest PATH`.
pub fn export_microguest(path: &Path) -> Result<u8, Failure> {
    std::fs::write(path, guest_agent::microguest())
        .with_context(|| format!("cannot write {}", path.display()))
        .map_err(Failure::runtime)?;
    eprintln!("wrote the microguest ({} bytes) to {}", guest_agent::microguest().len(), path.display());
    Ok(0)
}

/// `vmm image --output DIR`.
pub fn image(args: &ImageArgs) -> Result<u8, Failure> {
    let mut opts = guest_image::ImageOptions::new(&args.output);
    opts.kernel_package = args.kernel_package.clone();
    let image = guest_image::build_linux_image(&opts, &mut |line| eprintln!("{line}"))
        // The error's message already carries its cause; `{:#}` would print it twice.
        .map_err(|e| Failure::runtime(anyhow!("cannot build the Linux image: {e}")))?;
    // Absolute paths, so the printed commands work from any directory.
    let absolute = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (kernel, initrd) = (absolute(&image.kernel), absolute(&image.initrd));
    eprintln!();
    eprintln!("kernel: {} (Linux {})", kernel.display(), image.kernel_release);
    eprintln!("initrd: {} ({} modules)", initrd.display(), image.modules.len());
    eprintln!();
    let vmm = std::env::current_exe().unwrap_or_else(|_| "vmm".into());
    eprintln!("Boot it (on a host whose KVM has VMX or SVM):");
    eprintln!(
        "  {} run --kernel {} --initrd {} --mem-mib 512 --vcpus 2 --cmdline \"{}\"",
        vmm.display(),
        kernel.display(),
        initrd.display(),
        LINUX_CMDLINE
    );
    eprintln!("Run the Linux boot test with it:");
    eprintln!(
        "  VMM_TEST_LINUX_KERNEL={} VMM_TEST_LINUX_INITRD={} VMM_TEST_LINUX_EXPECT=\"{}\" \
         cargo test -p vmm --test linux -- --ignored",
        kernel.display(),
        initrd.display(),
        guest_image::READY_MARKER
    );
    Ok(0)
}

/// The command line the Linux boot test (tests/linux.rs) uses: `reboot=k` makes the guest's
/// reboot reset through the i8042, which ends the VMM cleanly; the i8042 flags keep Linux
/// from probing what the VMM's minimal controller does not have.
const LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 rdinit=/init i8042.noaux i8042.nomux i8042.dumbkbd";
