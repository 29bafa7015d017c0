//! `/dev/kvm` and VM-level objects.

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::{HvError, IoctlContext, KvmVcpu, Result};

/// Where KVM puts the real-mode TSS and identity-map pages it needs on Intel hosts: three pages
/// just below the IOAPIC, inside the MMIO gap so they never shadow guest RAM.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Capabilities the VMM cannot work without.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

/// The opened hypervisor and what it supports.
pub struct Hypervisor {
    kvm: Kvm,
    supported_cpuid: CpuId,
}

impl Hypervisor {
    /// Opens `/dev/kvm` and checks the API version and required capabilities.
    pub fn open() -> Result<Self> {
        let kvm = Kvm::new().map_err(HvError::Open)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(HvError::ApiVersion(version));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(HvError::MissingCapability(name));
            }
        }
        let supported_cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).op("KVM_GET_SUPPORTED_CPUID")?;
        Ok(Self { kvm, supported_cpuid })
    }

    /// Most vCPUs one VM may have.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// vCPUs the host recommends per VM (KVM_CAP_NR_VCPUS).
    pub fn recommended_vcpus(&self) -> usize {
        self.kvm.get_nr_vcpus()
    }

    /// The CPUID leaves KVM can present to a guest.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// Creates a VM with an in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT.
    pub fn create_vm(&self) -> Result<KvmVm> {
        let fd = self.kvm.create_vm().op("KVM_CREATE_VM")?;
        fd.set_tss_address(KVM_TSS_ADDRESS).op("KVM_SET_TSS_ADDR")?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS).op("KVM_SET_IDENTITY_MAP_ADDR")?;
        fd.create_irq_chip().op("KVM_CREATE_IRQCHIP")?;
        // The PC speaker port (0x61) is served by a dummy in the kernel: no exits for it.
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).op("KVM_CREATE_PIT2")?;
        let run_size = self.kvm.get_vcpu_mmap_size().op("KVM_GET_VCPU_MMAP_SIZE")?;
        let saveable_msrs = self.kvm.get_msr_index_list().op("KVM_GET_MSR_INDEX_LIST")?.as_slice().into();
        Ok(KvmVm { fd, run_size, saveable_msrs })
    }
}

/// One guest-RAM mapping as KVM sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemSlot {
    pub slot: u32,
    pub guest_addr: u64,
    pub size: u64,
    pub host_addr: u64,
}

/// A KVM virtual machine.
pub struct KvmVm {
    pub(super) fd: VmFd,
    run_size: usize,
    /// The MSRs KVM says a snapshot must carry (KVM_GET_MSR_INDEX_LIST), for every vCPU.
    saveable_msrs: std::sync::Arc<[u32]>,
}

impl KvmVm {
    /// Maps (or, with `size == 0`, removes) a memory slot.
    ///
    /// # Safety
    /// `host_addr..host_addr + size` must stay mapped and owned by the caller for as long as the
    /// slot exists: the guest reads and writes it.
    pub unsafe fn set_memslot(&self, slot: &MemSlot) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.set_memslot_flags(slot, 0) }
    }

    /// Turns KVM's dirty page log for memory slot `slot` (already mapped as given) on or off.
    /// Turning it on starts with an empty log.
    ///
    /// # Safety
    /// As for [`set_memslot`](Self::set_memslot): `slot` must describe the mapping in use.
    pub unsafe fn set_dirty_logging(&self, slot: &MemSlot, on: bool) -> Result<()> {
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        // SAFETY: forwarded from the caller; only the flags of the existing slot change.
        unsafe { self.set_memslot_flags(slot, flags) }
    }

    /// The pages of slot `slot` (`size` bytes) the guest wrote since the last call (or since
    /// logging was turned on), one bit per 4 KiB page; reading clears the log.
    pub fn take_dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>> {
        self.fd.get_dirty_log(slot, size as usize).op("KVM_GET_DIRTY_LOG")
    }

    unsafe fn set_memslot_flags(&self, slot: &MemSlot, flags: u32) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot: slot.slot,
            flags,
            guest_phys_addr: slot.guest_addr,
            memory_size: slot.size,
            userspace_addr: slot.host_addr,
        };
        // SAFETY: forwarded from the caller.
        unsafe { self.fd.set_user_memory_region(region) }.op("KVM_SET_USER_MEMORY_REGION")
    }

    /// Removes memory slot `slot`; the guest range reads as MMIO until the slot is re-added.
    pub fn remove_memslot(&self, slot: u32) -> Result<()> {
        // SAFETY: a zero-sized region deletes the slot; no host memory is referenced.
        unsafe { self.set_memslot(&MemSlot { slot, guest_addr: 0, size: 0, host_addr: 0 }) }
    }

    /// Routes writes to `evt` into guest interrupt `gsi`, in the kernel.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()> {
        self.fd.register_irqfd(evt, gsi).op("KVM_IRQFD")
    }

    /// Stops routing `evt` into `gsi`.
    pub fn unregister_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()> {
        self.fd.unregister_irqfd(evt, gsi).op("KVM_IRQFD (deassign)")
    }

    /// Undoes [`register_mmio_ioevent`](Self::register_mmio_ioevent) with the same arguments.
    pub fn unregister_mmio_ioevent(&self, evt: &EventFd, addr: u64, datamatch: Option<u32>) -> Result<()> {
        let addr = IoEventAddress::Mmio(addr);
        match datamatch {
            Some(value) => self.fd.unregister_ioevent(evt, &addr, value),
            None => self.fd.unregister_ioevent(evt, &addr, kvm_ioctls::NoDatamatch),
        }
        .op("KVM_IOEVENTFD (deassign)")
    }

    /// Makes guest writes to `addr` signal `evt` in the kernel instead of exiting to the VMM.
    pub fn register_mmio_ioevent(&self, evt: &EventFd, addr: u64, datamatch: Option<u32>) -> Result<()> {
        let addr = IoEventAddress::Mmio(addr);
        match datamatch {
            Some(value) => self.fd.register_ioevent(evt, &addr, value),
            None => self.fd.register_ioevent(evt, &addr, kvm_ioctls::NoDatamatch),
        }
        .op("KVM_IOEVENTFD")
    }

    /// Creates vCPU `id` (its local APIC id too).
    pub fn create_vcpu(&self, id: u32) -> Result<KvmVcpu> {
        let fd = self.fd.create_vcpu(u64::from(id)).op("KVM_CREATE_VCPU")?;
        Ok(KvmVcpu::new(fd, id, self.run_size, self.saveable_msrs.clone()))
    }
}
