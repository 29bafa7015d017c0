//! Assembling a VM from its configuration, top to bottom: hypervisor, RAM, kernel, devices,
//! vCPUs. Composition only; each step's logic lives in its own module.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::blk::VirtioBlock;
use devices::bus::{Bus, BusError, BusRange};
use devices::interrupt::EventFdInterrupt;
use devices::legacy::{DebugExit, I8042, SerialConsole, SerialOutput, SerialSnapshot, ports};
use devices::net::{NetSettings, VirtioNet};
use devices::vsock::VirtioVsock;
use vm_memory::GuestAddressSpace;
use vmm_sandbox::Sandbox;

use crate::acpi::{self, AcpiConfig, AcpiError, MmioDevice};
use crate::boot::{self, BootError, BootProtocol, BootSpec};
use crate::config::{ConfigError, NetConfig, SerialConfig, VmConfig};
use crate::device_manager::shm::{ShmError, ShmWindows};
use crate::device_manager::{DeviceError, DeviceHandle, DeviceManagerBuilder, Registered, backends};
use crate::exit::ExitState;
use crate::hv::{CpuidShape, HvError, Hypervisor, KvmVcpu, KvmVm, MemSlot, shape_cpuid};
use crate::memory::{GuestRam, MemoryError, RamBacking};
use crate::snapshot::{self, MemoryMode, SnapshotError, VmSnapshot};
use crate::vcpu::{ExitContext, Vcpus};
use crate::vm::{Crash, CrashKind, Vm, VmExit, VmInfo, VmParts};

/// Why a VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration is invalid (checked before KVM is opened, then against KVM's vCPU limit).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A disk's undo log could not start ([`VmBuilder::log_disk_overwrites`]).
    #[error("cannot log disk writes for undo: {0}")]
    Undo(String),
    /// KVM could not be opened, or refused to create or set up the VM or a vCPU.
    #[error(transparent)]
    Hypervisor(#[from] HvError),
    /// Guest RAM could not be allocated or mapped with the chosen backing.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel, initrd or command line could not be loaded into guest memory.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The serial output file could not be opened for appending.
    #[error("cannot open serial output file {path}: {source}")]
    SerialFile {
        /// The configured output file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A legacy device could not be placed on the port I/O bus.
    #[error("device wiring: {0}")]
    Bus(#[from] BusError),
    /// A virtio device could not be created or wired up, or its backend opened.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The ACPI tables cannot describe the machine (too many vCPUs or devices) or be written.
    #[error("cannot build ACPI tables: {0}")]
    Acpi(#[from] AcpiError),
    /// The snapshot to restore could not be loaded or does not fit the rebuilt machine.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A shared-memory region could not be attached.
    #[error(transparent)]
    Shm(#[from] ShmError),
    /// The sandbox ([`VmBuilder::sandbox`]) could not be entered.
    #[error("sandbox: {0}")]
    Sandbox(#[from] vmm_sandbox::SandboxError),
    /// A host resource (event loop, interrupt eventfd, thread...) could not be set up.
    #[error("cannot set up {what}: {source}")]
    Io {
        /// What was being set up.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Builds and starts a VM.
///
/// ```no_run
/// use vmm::VmBuilder;
///
/// let vm = VmBuilder::new("microguest.elf")
///     .cmdline("prog=hello")
///     .memory_mib(64)
///     .vcpus(2)
///     .start()?;
/// println!("{}", vm.wait());
/// # Ok::<(), vmm::BuildError>(())
/// ```
pub struct VmBuilder {
    config: VmConfig,
    serial_output: Option<SerialOutput>,
    /// Continue the VM saved in this snapshot directory instead of booting.
    restore: Option<(PathBuf, MemoryMode)>,
    /// Log what the disks overwrite in this directory, so that it can be undone.
    undo_dir: Option<PathBuf>,
    /// Closed around the process once the host resources are open.
    sandbox: Sandbox,
}

impl VmBuilder {
    /// A VM booting `kernel`, with defaults for everything else.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self::from_config(VmConfig::new(kernel))
    }

    /// A VM described by `config` (devices included); it is validated by [`start`](Self::start).
    pub fn from_config(config: VmConfig) -> Self {
        Self { config, serial_output: None, restore: None, undo_dir: None, sandbox: Sandbox::default() }
    }

    /// A VM that continues where the one saved in snapshot directory `dir` stopped, on the same
    /// machine configuration and backends, with RAM filled as `memory` says. The serial output
    /// can still be chosen ([`serial`](Self::serial), [`serial_output`](Self::serial_output));
    /// nothing else applies.
    pub fn restore(dir: impl Into<PathBuf>, memory: MemoryMode) -> Self {
        Self {
            config: VmConfig::new(""),
            serial_output: None,
            restore: Some((dir.into(), memory)),
            undo_dir: None,
            sandbox: Sandbox::default(),
        }
    }

    /// The configuration built so far (for a restore only its `serial` applies: the snapshot
    /// carries the rest).
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The kernel command line, replacing the default
    /// ([`DEFAULT_CMDLINE`](crate::config::DEFAULT_CMDLINE)); virtio devices are appended to it.
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.config.cmdline = cmdline.into();
        self
    }

    /// An initial ramdisk to load for the kernel.
    pub fn initrd(mut self, initrd: impl Into<PathBuf>) -> Self {
        self.config.initrd = Some(initrd.into());
        self
    }

    /// Guest RAM size in MiB ([`DEFAULT_MEM_MIB`](crate::config::DEFAULT_MEM_MIB) by default).
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.config.mem_mib = mib;
        self
    }

    /// Number of vCPUs ([`DEFAULT_VCPUS`](crate::config::DEFAULT_VCPUS) by default).
    pub fn vcpus(mut self, vcpus: u32) -> Self {
        self.config.vcpus = vcpus;
        self
    }

    /// How to boot the kernel ([`BootProtocol::Auto`] by default).
    pub fn boot_protocol(mut self, protocol: BootProtocol) -> Self {
        self.config.boot_protocol = protocol;
        self
    }

    /// What guest RAM's pages live in ([`RamBacking::Anonymous`] by default).
    pub fn ram_backing(mut self, backing: RamBacking) -> Self {
        self.config.ram_backing = backing;
        self
    }

    /// Where serial output goes (stdout by default).
    pub fn serial(mut self, serial: SerialConfig) -> Self {
        self.config.serial = serial;
        self
    }

    /// Sends serial output to an arbitrary writer (overrides the configured `serial`).
    pub fn serial_output(mut self, output: SerialOutput) -> Self {
        self.serial_output = Some(output);
        self
    }

    /// Has every disk log, in `dir`, the blocks its writes overwrite, from before the guest
    /// runs, so that [`Vm::undo_disk_writes`] can take them all back (a shadow that may have
    /// to hand the VM back to its primary); [`Vm::keep_disk_writes`] ends the logging.
    pub fn log_disk_overwrites(mut self, dir: impl Into<PathBuf>) -> Self {
        self.undo_dir = Some(dir.into());
        self
    }

    /// Enters `sandbox` (a jail, seccomp filters) once the VM's host resources are open (KVM,
    /// RAM, disk images, taps, sockets) and before its device loop and vCPUs start: they
    /// start inside it, the vCPUs and the device loop each under their own narrower filter.
    pub fn sandbox(mut self, sandbox: Sandbox) -> Self {
        self.sandbox = sandbox;
        self
    }

    /// Creates the VM and starts its vCPUs.
    pub fn start(self) -> Result<Vm, BuildError> {
        let saved = match &self.restore {
            Some((dir, mode)) => Some((snapshot::load(dir)?, *mode)),
            None => None,
        };
        // Checked before and after opening KVM: a bad configuration is reported as such even
        // where KVM is missing.
        let validate = |config: &VmConfig, max_vcpus| match saved {
            Some(_) => config.validate_machine(max_vcpus),
            None => config.validate(max_vcpus),
        };
        let config = match &saved {
            // The saved machine, with the serial output chosen now.
            Some((loaded, _)) => VmConfig { serial: self.config.serial, ..loaded.state.config.clone() },
            None => self.config,
        };
        validate(&config, None)?;
        let hv = Hypervisor::open()?;
        validate(&config, Some(hv.max_vcpus() as u32))?;
        if config.vcpus as usize > hv.recommended_vcpus() {
            log::info!(
                "{} vCPUs is more than the {} this host recommends; they will share host CPUs",
                config.vcpus,
                hv.recommended_vcpus()
            );
        }

        let exit = Arc::new(ExitState::new());
        let ram = match &saved {
            Some((loaded, mode)) => {
                let exit = exit.clone();
                let on_fatal = Box::new(move |what| {
                    exit.report(VmExit::Crashed(Crash { vcpu: 0, kind: CrashKind::Memory(what), rip: None }));
                });
                snapshot::restore::guest_ram(loaded, *mode, on_fatal)?
            }
            None => GuestRam::new(config.mem_mib << 20, &config.ram_backing)?,
        };
        let kvm = hv.create_vm()?;
        for region in ram.regions() {
            let slot = MemSlot {
                slot: region.slot,
                guest_addr: region.guest_addr,
                size: region.size,
                host_addr: region.host_addr,
            };
            // SAFETY: the mapping is owned by `ram`, which the returned Vm keeps alive longer
            // than the VM file descriptor (see Vm's field order).
            unsafe { kvm.set_memslot(&slot)? };
        }

        let mut devices = add_devices(&kvm, &ram, &config)?;
        let shm = devices.add_shm_windows(config.shm_window_count(), ram.size())?;
        for (window, region) in (0..).zip(&config.shm) {
            shm.attach(&kvm, window, region)?;
        }
        let serial_output = match self.serial_output {
            Some(output) => output,
            None => serial_output(&config.serial)?,
        };
        let snapshot = saved.as_ref().map(|(loaded, _)| &loaded.state);
        let (pio, serial) = legacy_devices(&kvm, &exit, serial_output, snapshot.map(|s| &s.serial))?;

        let (vcpus, info) = match snapshot {
            None => boot(&hv, &kvm, &ram, &config, &devices, &shm)?,
            Some(snapshot) => {
                let vcpus = restore_machine(&hv, &kvm, snapshot)?;
                snapshot::restore::import_devices(devices.entries(), snapshot).map_err(SnapshotError::from)?;
                (vcpus, snapshot.info.clone())
            }
        };
        // Before the devices take requests: a restored queue may hold some already.
        let mut undo = Vec::new();
        if let Some(dir) = &self.undo_dir {
            for entry in devices.entries() {
                let log = entry.handle.log_overwrites(&entry.id, dir).map_err(BuildError::Undo)?;
                undo.extend(log.map(|log| (entry.id.clone(), log)));
            }
        }
        self.sandbox.enter()?;
        let (mmio, devices) = devices.start().map_err(|source| BuildError::Io { what: "device event loop", source })?;
        let ctx = Arc::new(ExitContext::new(Arc::new(pio), Arc::new(mmio), exit.clone()));
        let vcpus = Vcpus::start(vcpus, ctx).map_err(|source| BuildError::Io { what: "vCPU threads", source })?;
        Ok(Vm::new(VmParts { vcpus, exit, serial, devices, info, config, kvm, shm, ram, undo }))
    }
}

/// The virtio devices, in the configuration's order (which fixes their MMIO slots: a restore
/// relies on it).
fn add_devices(kvm: &KvmVm, ram: &GuestRam, config: &VmConfig) -> Result<DeviceManagerBuilder, BuildError> {
    let mut devices = DeviceManagerBuilder::new(ram.memory())
        .map_err(|source| BuildError::Io { what: "device event loop", source })?;
    let ids = config.device_ids();
    for (disk, id) in config.disks.iter().zip(&ids) {
        let backend = backends::open_disk(disk, id)?;
        devices.add(
            kvm,
            id,
            |irq, mem| VirtioBlock::new(backend, id, irq, mem),
            |d| DeviceHandle::new(Registered::new(d, disk.clone())),
        )?;
    }
    for (net, id) in config.nets.iter().zip(&ids[config.disks.len()..]) {
        let settings = NetSettings { mac: backends::nic_mac(net, id)?, mtu: net.mtu };
        let backend = backends::open_net(net, id)?;
        // The MAC in use, generated or not, is part of the device: a snapshot or a shadow
        // rebuilds the NIC with the one the guest knows.
        let mac = settings.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        let net = NetConfig { mac: Some(mac), ..net.clone() };
        devices.add(
            kvm,
            id,
            |irq, mem| VirtioNet::new(backend, settings, irq, mem),
            |d| DeviceHandle::new(Registered::new(d, net)),
        )?;
    }
    if let (Some(vsock), Some(id)) = (&config.vsock, ids.last()) {
        let backend = backends::open_vsock(&vsock.socket, id)?;
        let cid = vsock.cid;
        let make = |irq, mem| VirtioVsock::new(cid, Box::new(backend), irq, mem);
        let config = vsock.clone();
        devices.add(kvm, id, make, move |d| DeviceHandle::new(Registered::new(d, config)))?;
    }
    Ok(devices)
}

/// A fresh boot: ACPI tables and the kernel in RAM, vCPU 0 at the kernel's entry.
fn boot(
    hv: &Hypervisor,
    kvm: &KvmVm,
    ram: &GuestRam,
    config: &VmConfig,
    devices: &DeviceManagerBuilder,
    shm: &ShmWindows,
) -> Result<(Vec<KvmVcpu>, VmInfo), BuildError> {
    // Devices are announced on the command line (the microguest, kernels with
    // CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES) and in the ACPI DSDT (distribution kernels).
    let mut cmdline = config.cmdline.clone();
    for entry in devices.cmdline_entries().iter().chain(&shm.cmdline_entries()) {
        cmdline.push(' ');
        cmdline.push_str(entry);
    }
    let guest_mem = ram.memory().memory();
    let acpi_config = AcpiConfig {
        vcpus: config.vcpus,
        virtio_mmio: devices.slots().iter().map(|s| MmioDevice { base: s.base, size: s.size, irq: s.irq }).collect(),
        shm_windows: shm.acpi_windows(),
    };
    let rsdp = acpi::write(&guest_mem, &acpi_config)?;

    let ranges: Vec<(u64, u64)> = ram.regions().iter().map(|r| (r.guest_addr, r.size)).collect();
    let spec = BootSpec {
        kernel: &config.kernel,
        initrd: config.initrd.as_deref(),
        cmdline: &cmdline,
        protocol: config.boot_protocol,
        vcpus: config.vcpus,
        rsdp: Some(rsdp),
    };
    let booted = boot::load(&guest_mem, &ranges, &spec)?;
    if let Some((addr, size)) = booted.initrd {
        log::debug!("initrd: {size} bytes at {addr:#x}");
    }
    let vcpus = create_vcpus(hv, kvm, config.vcpus, Some(&booted.cpu))?;
    let info = VmInfo {
        vcpus: config.vcpus,
        mem_bytes: ram.size(),
        boot_protocol: booted.protocol,
        kernel_format: booted.kernel.format,
        entry_point: booted.cpu.regs.rip,
    };
    Ok((vcpus, info))
}

/// A restore: the in-kernel irqchip, PIT and clock, then every vCPU, as the snapshot has them.
fn restore_machine(hv: &Hypervisor, kvm: &KvmVm, snapshot: &VmSnapshot) -> Result<Vec<KvmVcpu>, BuildError> {
    let count = snapshot.config.vcpus;
    if snapshot.vcpus.len() != count as usize {
        let e = format!("the snapshot holds {} vCPU states for {count} vCPUs", snapshot.vcpus.len());
        return Err(SnapshotError::State(e).into());
    }
    kvm.restore_state(&snapshot.vm)?;
    let vcpus = create_vcpus(hv, kvm, count, None)?;
    for (vcpu, state) in vcpus.iter().zip(&snapshot.vcpus) {
        vcpu.restore_state(state)?;
    }
    Ok(vcpus)
}

fn serial_output(config: &SerialConfig) -> Result<SerialOutput, BuildError> {
    Ok(match config {
        SerialConfig::Stdout => SerialOutput::Stdout,
        SerialConfig::None => SerialOutput::Sink,
        SerialConfig::File(path) => SerialOutput::File(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| BuildError::SerialFile { path: path.clone(), source })?,
        ),
    })
}

/// COM1, the i8042 reset line and the debug-exit port, on a fresh port bus.
fn legacy_devices(
    kvm: &KvmVm,
    exit: &Arc<ExitState>,
    serial_output: SerialOutput,
    saved_serial: Option<&SerialSnapshot>,
) -> Result<(Bus, Arc<Mutex<SerialConsole>>), BuildError> {
    let irq = EventFdInterrupt::new().map_err(|source| BuildError::Io { what: "serial interrupt", source })?;
    kvm.register_irqfd(irq.eventfd(), ports::COM1_IRQ)?;
    let serial = match saved_serial {
        Some(state) => SerialConsole::restore(Box::new(irq), serial_output, state)
            .map_err(|source| BuildError::Io { what: "serial port", source })?,
        None => SerialConsole::new(Box::new(irq), serial_output),
    };
    let serial = Arc::new(Mutex::new(serial));

    let mut pio = Bus::new();
    pio.insert(BusRange::new(ports::COM1, ports::COM1_LEN), "serial", serial.clone())?;
    pio.insert(BusRange::new(ports::I8042, ports::I8042_LEN), "i8042", Arc::new(Mutex::new(I8042::new(exit.clone()))))?;
    pio.insert(
        BusRange::new(ports::DEBUG_EXIT, ports::DEBUG_EXIT_LEN),
        "debug-exit",
        Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
    )?;
    Ok((pio, serial))
}

/// Creates and configures every vCPU; with `boot`, vCPU 0 gets the boot state and the others
/// wait for INIT/SIPI from the guest as on real hardware (a restore sets all of them after).
fn create_vcpus(
    hv: &Hypervisor,
    kvm: &KvmVm,
    count: u32,
    boot: Option<&boot::CpuBootState>,
) -> Result<Vec<KvmVcpu>, BuildError> {
    let mut vcpus = Vec::with_capacity(count as usize);
    for id in 0..count {
        let vcpu = kvm.create_vcpu(id)?;
        let tsc_khz = vcpu.tsc_khz().unwrap_or(0);
        vcpu.set_cpuid(&shape_cpuid(hv.supported_cpuid(), CpuidShape { apic_id: id, vcpu_count: count, tsc_khz }))?;
        vcpu.set_boot_msrs()?;
        vcpu.set_fpu_defaults()?;
        vcpu.set_lapic_lint()?;
        if let Some(boot) = boot.filter(|_| id == 0) {
            vcpu.set_regs(&boot.regs)?;
            vcpu.update_sregs(|sregs| boot.apply_sregs(sregs))?;
        }
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}
