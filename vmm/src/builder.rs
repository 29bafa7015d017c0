//! Assembling a VM from its configuration, top to bottom: hypervisor, RAM, kernel, devices,
//! vCPUs. Composition only; each step's logic lives in its own module.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::blk::VirtioBlock;
use devices::bus::{Bus, BusError, BusRange};
use devices::interrupt::EventFdInterrupt;
use devices::legacy::{DebugExit, I8042, SerialConsole, SerialOutput, ports};
use devices::net::{NetSettings, VirtioNet};
use devices::vsock::VirtioVsock;
use vm_memory::GuestAddressSpace;

use crate::acpi::{self, AcpiConfig, AcpiError, MmioDevice};
use crate::boot::{self, BootError, BootProtocol, BootSpec};
use crate::config::{ConfigError, SerialConfig, VmConfig};
use crate::device_manager::{DeviceError, DeviceHandle, DeviceManagerBuilder, backends};
use crate::hv::{CpuidShape, HvError, Hypervisor, KvmVcpu, KvmVm, MemSlot, shape_cpuid};
use crate::memory::{GuestRam, MemoryError, RamBacking};
use crate::vcpu::{ExitContext, Vcpus};
use crate::vm::exit::ExitState;
use crate::vm::{Vm, VmInfo};

/// Why a VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Hypervisor(#[from] HvError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("cannot open serial output file {path}: {source}")]
    SerialFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("device wiring: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("cannot build ACPI tables: {0}")]
    Acpi(#[from] AcpiError),
    #[error("cannot set up {what}: {source}")]
    Io {
        what: &'static str,
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
}

impl VmBuilder {
    /// A VM booting `kernel`, with defaults for everything else.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self::from_config(VmConfig::new(kernel))
    }

    pub fn from_config(config: VmConfig) -> Self {
        Self { config, serial_output: None }
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.config.cmdline = cmdline.into();
        self
    }

    pub fn initrd(mut self, initrd: impl Into<PathBuf>) -> Self {
        self.config.initrd = Some(initrd.into());
        self
    }

    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.config.mem_mib = mib;
        self
    }

    pub fn vcpus(mut self, vcpus: u32) -> Self {
        self.config.vcpus = vcpus;
        self
    }

    pub fn boot_protocol(mut self, protocol: BootProtocol) -> Self {
        self.config.boot_protocol = protocol;
        self
    }

    pub fn ram_backing(mut self, backing: RamBacking) -> Self {
        self.config.ram_backing = backing;
        self
    }

    /// Sends serial output to an arbitrary writer (overrides the configured `serial`).
    pub fn serial_output(mut self, output: SerialOutput) -> Self {
        self.serial_output = Some(output);
        self
    }

    /// Creates the VM and starts its vCPUs.
    pub fn start(self) -> Result<Vm, BuildError> {
        let config = self.config;
        config.validate(None)?;
        let hv = Hypervisor::open()?;
        config.validate(Some(hv.max_vcpus() as u32))?;
        if config.vcpus as usize > hv.recommended_vcpus() {
            log::info!(
                "{} vCPUs is more than the {} this host recommends; they will share host CPUs",
                config.vcpus,
                hv.recommended_vcpus()
            );
        }

        let ram = GuestRam::new(config.mem_mib << 20, &config.ram_backing)?;
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

        let mut devices = DeviceManagerBuilder::new(ram.memory())
            .map_err(|source| BuildError::Io { what: "device event loop", source })?;
        let ids = config.device_ids();
        for (disk, id) in config.disks.iter().zip(&ids) {
            let backend = backends::open_disk(disk, id)?;
            devices.add(&kvm, id, |irq, mem| VirtioBlock::new(backend, id, irq, mem), DeviceHandle::Block)?;
        }
        for (net, id) in config.nets.iter().zip(&ids[config.disks.len()..]) {
            let settings = NetSettings { mac: backends::nic_mac(net, id)?, mtu: net.mtu };
            let backend = backends::open_net(net, id)?;
            devices.add(&kvm, id, |irq, mem| VirtioNet::new(backend, settings, irq, mem), DeviceHandle::Net)?;
        }
        if let (Some(vsock), Some(id)) = (&config.vsock, ids.last()) {
            let backend = backends::open_vsock(&vsock.socket, id)?;
            let cid = vsock.cid;
            devices.add(
                &kvm,
                id,
                |irq, mem| VirtioVsock::new(cid, Box::new(backend), irq, mem),
                DeviceHandle::Vsock,
            )?;
        }

        // Devices are announced on the command line (the microguest, kernels with
        // CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES) and in the ACPI DSDT (distribution kernels).
        let mut cmdline = config.cmdline.clone();
        for entry in devices.cmdline_entries() {
            cmdline.push(' ');
            cmdline.push_str(&entry);
        }
        let guest_mem = ram.memory().memory();
        let acpi_config = AcpiConfig {
            vcpus: config.vcpus,
            virtio_mmio: devices
                .slots()
                .iter()
                .map(|s| MmioDevice { base: s.base, size: s.size, irq: s.irq })
                .collect(),
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
        drop(guest_mem);

        let exit = Arc::new(ExitState::new());
        let serial_output = match self.serial_output {
            Some(output) => output,
            None => serial_output(&config.serial)?,
        };
        let (pio, serial) = legacy_devices(&kvm, &exit, serial_output)?;

        let vcpus = create_vcpus(&hv, &kvm, config.vcpus, &booted.cpu)?;
        let (mmio, devices) = devices.start().map_err(|source| BuildError::Io { what: "device event loop", source })?;
        let ctx = Arc::new(ExitContext::new(Arc::new(pio), Arc::new(mmio), exit.clone()));
        let vcpus = Vcpus::start(vcpus, ctx).map_err(|source| BuildError::Io { what: "vCPU threads", source })?;

        let info = VmInfo {
            vcpus: config.vcpus,
            mem_bytes: ram.size(),
            boot_protocol: booted.protocol,
            kernel_format: booted.kernel.format,
            entry_point: booted.cpu.regs.rip,
        };
        Ok(Vm::new(vcpus, exit, serial, devices, info, kvm, ram))
    }
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
) -> Result<(Bus, Arc<Mutex<SerialConsole>>), BuildError> {
    let irq = EventFdInterrupt::new().map_err(|source| BuildError::Io { what: "serial interrupt", source })?;
    kvm.register_irqfd(irq.eventfd(), ports::COM1_IRQ)?;
    let serial = Arc::new(Mutex::new(SerialConsole::new(Box::new(irq), serial_output)));

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

/// Creates and configures every vCPU; vCPU 0 gets the boot state, the others wait for
/// INIT/SIPI from the guest as on real hardware.
fn create_vcpus(
    hv: &Hypervisor,
    kvm: &KvmVm,
    count: u32,
    boot: &boot::CpuBootState,
) -> Result<Vec<KvmVcpu>, BuildError> {
    let mut vcpus = Vec::with_capacity(count as usize);
    for id in 0..count {
        let vcpu = kvm.create_vcpu(id)?;
        let tsc_khz = vcpu.tsc_khz().unwrap_or(0);
        vcpu.set_cpuid(&shape_cpuid(hv.supported_cpuid(), CpuidShape { apic_id: id, vcpu_count: count, tsc_khz }))?;
        vcpu.set_boot_msrs()?;
        vcpu.set_fpu_defaults()?;
        vcpu.set_lapic_lint()?;
        if id == 0 {
            vcpu.set_regs(&boot.regs)?;
            vcpu.update_sregs(|sregs| boot.apply_sregs(sregs))?;
        }
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}
