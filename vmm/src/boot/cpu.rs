//! The boot CPU's initial mode: descriptor tables, identity page tables and registers for the
//! 64-bit Linux entry, and the flat 32-bit protected mode the PVH entry expects.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{BOOT_STACK_TOP, GDT_ADDR, IDT_ADDR, PD_ADDR, PD_COUNT, PDPT_ADDR, PML4_ADDR};
use crate::memory::GuestMem;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 0x2;

/// Which kind of code segment the boot GDT carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeMode {
    Long64,
    Protected32,
}

/// Encodes a segment descriptor: `flags` holds the access byte (bits 0-7) and the
/// granularity/size nibble (bits 12-15), as in `0xa09b`.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The boot GDT: null, code, data, TSS.
pub fn boot_gdt(mode: CodeMode) -> [u64; 4] {
    let code = match mode {
        CodeMode::Long64 => gdt_entry(0xa09b, 0, 0xfffff),
        CodeMode::Protected32 => gdt_entry(0xc09b, 0, 0xfffff),
    };
    [0, code, gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)]
}

/// Decodes a descriptor into the form KVM wants in `kvm_sregs`.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Registers and special registers the boot CPU starts with.
#[derive(Clone, Debug)]
pub struct CpuBootState {
    pub regs: kvm_regs,
    pub mode: CodeMode,
    /// `CR3` (0 without paging).
    pub cr3: u64,
}

impl CpuBootState {
    /// 64-bit Linux boot protocol: long mode, identity map, RSI = boot_params.
    pub fn linux64(entry: u64, zero_page: u64) -> Self {
        let regs = kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry,
            rsp: BOOT_STACK_TOP,
            rbp: BOOT_STACK_TOP,
            rsi: zero_page,
            ..Default::default()
        };
        Self { regs, mode: CodeMode::Long64, cr3: PML4_ADDR }
    }

    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    pub fn pvh(entry: u64, start_info: u64) -> Self {
        let regs = kvm_regs { rflags: RFLAGS_RESERVED, rip: entry, rbx: start_info, ..Default::default() };
        Self { regs, mode: CodeMode::Protected32, cr3: 0 }
    }

    /// Applies the segment and control-register state on top of KVM's reset `sregs`.
    pub fn apply_sregs(&self, sregs: &mut kvm_sregs) {
        let gdt = boot_gdt(self.mode);
        let code = segment_from_gdt(gdt[1], 1);
        let data = segment_from_gdt(gdt[2], 2);
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
        sregs.idt.base = IDT_ADDR;
        sregs.idt.limit = 7;
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = segment_from_gdt(gdt[3], 3);
        match self.mode {
            CodeMode::Long64 => {
                sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_PG) & !(1 << 30 | 1 << 29);
                sregs.cr3 = self.cr3;
                sregs.cr4 |= CR4_PAE;
                sregs.efer |= EFER_LME | EFER_LMA;
            }
            CodeMode::Protected32 => {
                sregs.cr0 = CR0_PE | CR0_ET;
                sregs.cr3 = 0;
                sregs.cr4 = 0;
                sregs.efer = 0;
            }
        }
    }
}

/// Writes the boot GDT and an empty IDT.
pub fn write_descriptor_tables(mem: &GuestMem, mode: CodeMode) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, entry) in boot_gdt(mode).iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
}

/// Identity-maps the first 4 GiB with 2 MiB pages (what the 64-bit entry requires to be
/// mapped: kernel, boot_params, command line).
pub fn write_identity_page_tables(mem: &GuestMem) -> Result<(), vm_memory::GuestMemoryError> {
    const PRESENT_WRITABLE: u64 = 0x3;
    const HUGE: u64 = 0x80;
    mem.write_obj(PDPT_ADDR | PRESENT_WRITABLE, GuestAddress(PML4_ADDR))?;
    for pd in 0..PD_COUNT {
        let pd_addr = PD_ADDR + pd * 0x1000;
        mem.write_obj(pd_addr | PRESENT_WRITABLE, GuestAddress(PDPT_ADDR + pd * 8))?;
        for i in 0..512u64 {
            let frame = ((pd << 9) + i) << 21;
            mem.write_obj(frame | PRESENT_WRITABLE | HUGE, GuestAddress(pd_addr + i * 8))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    #[test]
    fn gdt_entries_match_the_architectural_encoding() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
        assert_eq!(gdt_entry(0x0089, 0x1234_5678, 0x67), 0x1200_8934_5678_0067);
    }

    #[test]
    fn segments_decode_from_descriptors() {
        let code = segment_from_gdt(0x00af_9b00_0000_ffff, 1);
        assert_eq!((code.selector, code.type_, code.l, code.db, code.g, code.present), (0x08, 0xb, 1, 0, 1, 1));
        assert_eq!((code.base, code.limit, code.s, code.dpl, code.unusable), (0, 0xffff_ffff, 1, 0, 0));
        let data = segment_from_gdt(0x00cf_9300_0000_ffff, 2);
        assert_eq!((data.selector, data.type_, data.l, data.db), (0x10, 0x3, 0, 1));
        let tss = segment_from_gdt(0x008f_8b00_0000_ffff, 3);
        assert_eq!((tss.selector, tss.type_, tss.s), (0x18, 0xb, 0));
    }

    #[test]
    fn page_tables_identity_map_4gib() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_identity_page_tables(&mem).unwrap();
        let read = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(read(0x9000), 0xa003);
        assert_eq!(read(0x9008), 0);
        assert_eq!(read(0xa000), 0xb003);
        assert_eq!(read(0xa018), 0xe003);
        assert_eq!(read(0xb000), 0x83);
        assert_eq!(read(0xb008), 0x20_0083);
        assert_eq!(read(0xeff8), 0xffe0_0083, "last entry maps the top 2 MiB below 4 GiB");
    }

    #[test]
    fn long_mode_sregs() {
        let state = CpuBootState::linux64(0x100_0000, 0x7000);
        assert_eq!(
            (state.regs.rip, state.regs.rsi, state.regs.rsp, state.regs.rflags),
            (0x100_0000, 0x7000, 0x8ff0, 2)
        );
        let mut sregs = kvm_sregs { cr0: 0x6000_0010, ..Default::default() };
        state.apply_sregs(&mut sregs);
        assert_eq!(sregs.cr0, 0x8000_0011, "PE, ET, PG; caches enabled");
        assert_eq!((sregs.cr3, sregs.cr4, sregs.efer), (0x9000, 0x20, 0x500));
        assert_eq!((sregs.gdt.base, sregs.gdt.limit, sregs.idt.base, sregs.idt.limit), (0x500, 31, 0x520, 7));
        assert_eq!((sregs.cs.selector, sregs.cs.l, sregs.ss.selector, sregs.tr.selector), (0x08, 1, 0x10, 0x18));
    }

    #[test]
    fn pvh_sregs() {
        let state = CpuBootState::pvh(0x10_0000, 0x6000);
        assert_eq!((state.regs.rip, state.regs.rbx), (0x10_0000, 0x6000));
        let mut sregs = kvm_sregs { cr0: 0x6000_0010, cr4: 0x20, efer: 0x500, ..Default::default() };
        state.apply_sregs(&mut sregs);
        assert_eq!((sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer), (0x11, 0, 0, 0));
        assert_eq!((sregs.cs.l, sregs.cs.db, sregs.cs.type_), (0, 1, 0xb));
    }
}
